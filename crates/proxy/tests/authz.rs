//! Inbound policy from the destinations file (static mode), enforced on
//! real clients: route-level rules by source network (GET allowed, POST
//! denied, with 403 and `l5d-proxy-error`; gRPC PERMISSION_DENIED), edits
//! applied within a second without cutting requests in flight, an opaque
//! port refusing at connect, per-client rate limits holding their rate
//! while another client is unaffected, and a flood of distinct clients
//! not growing the proxy beyond the limiter's bound, gRPC refusals as
//! gRPC statuses, source networks between two hosts (network namespaces),
//! and identities from the control plane between meshed proxies.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, text};
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

fn ip(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

fn policy(port: u16, methods: &str) -> String {
    format!(
        r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: loopback-reads
            clients: {{networks: [127.0.0.0/8]}}
            routes: [{{path_prefix: /v1/, methods: [{methods}]}}, {{path_prefix: /slow/, methods: [GET]}}]
"#
    )
}

async fn inbound_proxy(
    file: &DestinationsFile,
    app: SocketAddr,
    extra: &[(&str, &str)],
) -> anyhow::Result<Proxy> {
    let path = file.path_str();
    let app = app.to_string();
    let mut env = vec![
        ("WEFT_PROXY_DESTINATIONS", path.as_str()),
        ("WEFT_PROXY_INBOUND_FORWARD", app.as_str()),
        ("WEFT_PROXY_INBOUND_SERVER", "api.demo"),
    ];
    env.extend_from_slice(extra);
    Proxy::start(PROXY.as_ref(), &env).await
}

fn request(method: &str, path: &str) -> anyhow::Result<http::Request<Full<Bytes>>> {
    Ok(http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "api.demo:8080")
        .body(Full::new(Bytes::new()))?)
}

/// (status, l5d-proxy-error, retry-after) of one request from `from`.
async fn send(
    proxy: &Proxy,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String, Option<String>)> {
    let mut conn = client::http1_from(from, proxy.inbound).await?;
    let (status, headers, _) = text(conn.send_request(request(method, path)?).await?).await?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Ok((
        status.as_u16(),
        header("l5d-proxy-error").unwrap_or_default(),
        header("retry-after"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_authorized_per_request_and_edits_apply_within_a_second() -> anyhow::Result<()> {
    let app = Backend::start("api").await?;
    let file = DestinationsFile::from_yaml(&policy(app.addr.port(), "GET"))?;
    let proxy = inbound_proxy(&file, app.addr, &[]).await?;

    assert_eq!(send(&proxy, None, "GET", "/v1/users").await?.0, 200);
    let (status, error, _) = send(&proxy, None, "POST", "/v1/users").await?;
    assert_eq!(status, 403);
    let server = format!("api.demo:{}", app.addr.port());
    assert_eq!(
        error,
        format!(
            "unauthorized: no authorization of route \"default\" on server \"{server}\" admits unauthenticated clients"
        )
    );
    assert_eq!(send(&proxy, None, "GET", "/v2/").await?.0, 403);
    assert_eq!(app.hits(), 1, "denied requests never reach the application");

    // gRPC clients read the refusal from grpc-status.
    let mut h2 = client::http2(proxy.inbound).await?;
    let req = http::Request::post(format!("http://{server}/demo.Echo/Say"))
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))?;
    let rsp = h2.send_request(req).await?;
    assert_eq!(
        rsp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"7"[..]),
        "{:?}",
        rsp.headers()
    );

    // A slow request in flight while the policy changes finishes.
    let inbound = proxy.inbound;
    let slow = tokio::spawn(async move {
        let mut conn = client::http1(inbound).await?;
        let (status, _, _) = text(conn.send_request(request("GET", "/slow/1500")?).await?).await?;
        anyhow::Ok(status.as_u16())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // POST allowed too: applied to new requests within a second.
    file.write_yaml(&policy(app.addr.port(), "GET, POST"))?;
    let changed = Instant::now();
    loop {
        if send(&proxy, None, "POST", "/v1/users").await?.0 == 200 {
            break;
        }
        anyhow::ensure!(
            changed.elapsed() < Duration::from_secs(1),
            "not applied within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("policy edit applied after {:?}", changed.elapsed());
    assert_eq!(slow.await??, 200, "the request in flight was cut");

    let m = scrape(proxy.admin).await?;
    let allowed = |route| {
        m.sum(
            "inbound_http_authz_allow_total",
            &[
                ("srv_name", &server),
                ("authz_name", "loopback-reads"),
                ("route_name", route),
            ],
        )
    };
    assert_eq!(allowed("GET /v1/*"), 1.0);
    assert_eq!(allowed("GET /slow/*"), 1.0);
    assert!(allowed("POST /v1/*") >= 1.0);
    let denied = m.sum(
        "inbound_http_authz_deny_total",
        &[
            ("srv_name", &server),
            ("route_name", "default"),
            ("tls", "no_identity"),
        ],
    );
    assert!(denied >= 2.0, "denied {denied}");
    Ok(())
}

fn opaque_policy(port: u16, network: &str) -> String {
    format!(
        r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{port}":
        protocol: opaque
        default: deny
        authorizations:
          - name: trusted-host
            clients: {{networks: [{network}]}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_port_refuses_at_connect_and_closes_on_revocation() -> anyhow::Result<()> {
    let echo = weft_test_support::tcp::echo().await?;
    let file = DestinationsFile::from_yaml(&opaque_policy(echo.addr.port(), "127.0.0.2/32"))?;
    let proxy = inbound_proxy(&file, echo.addr, &[]).await?;
    let mut kept = None;
    for (from, allowed) in [("127.0.0.2", true), ("127.0.0.3", false)] {
        let mut stream = client::connect_from(ip(from), proxy.inbound).await?;
        // Sent first, as a client of an opaque protocol may.
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
        let mut buf = [0u8; 18];
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await?;
        if allowed {
            read?;
            assert_eq!(
                &buf, b"GET / HTTP/1.1\r\n\r\n",
                "echoed as bytes, not parsed"
            );
            kept = Some(stream);
        } else {
            assert!(read.is_err(), "{from} was let in");
        }
    }
    // Revoked: the open connection is closed within a second.
    let mut stream = kept.ok_or_else(|| anyhow::anyhow!("no allowed connection"))?;
    file.write_yaml(&opaque_policy(echo.addr.port(), "127.0.0.9/32"))?;
    let revoked = Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await?;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    println!("revoked connection closed after {:?}", revoked.elapsed());
    assert!(revoked.elapsed() < Duration::from_secs(1));

    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "inbound_tcp_authz_allow_total",
            &[("authz_name", "trusted-host")]
        ),
        1.0
    );
    assert_eq!(m.sum("inbound_tcp_authz_deny_total", &[]), 1.0);
    assert_eq!(m.sum("inbound_tcp_authz_terminate_total", &[]), 1.0);
    Ok(())
}

/// Offers `rps` requests per second from `from` for `secs` seconds; counts
/// the answers by status.
async fn offer(
    proxy: &Proxy,
    from: &str,
    rps: u32,
    secs: u64,
) -> anyhow::Result<(u32, u32, Option<String>)> {
    let mut conn = client::http1_from(ip(from), proxy.inbound).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    let (mut ok, mut limited, mut retry_after) = (0, 0, None);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tick.tick().await;
        conn.ready().await?;
        let (status, headers, _) = text(conn.send_request(request("GET", "/v1/x")?).await?).await?;
        match status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                retry_after = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
            }
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    Ok((ok, limited, retry_after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_rate_limits_hold_and_distinct_clients_stay_bounded() -> anyhow::Result<()> {
    let app = Backend::start("api").await?;
    let file = DestinationsFile::from_yaml(&format!(
        r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{}":
        default: allow-all
        rate_limit: {{per_client_rps: 10}}
"#,
        app.addr.port()
    ))?;
    let proxy = inbound_proxy(
        &file,
        app.addr,
        &[("WEFT_PROXY_RATE_LIMIT_CLIENTS", "1000")],
    )
    .await?;

    // One client offers 40 rps for 2 s (spending its burst), then 10 s
    // more are measured; meanwhile another at 5 rps is never limited.
    let limited_client = async {
        let (_, limited, retry_after) = offer(&proxy, "127.0.0.2", 40, 2).await?;
        anyhow::ensure!(limited > 0);
        assert_eq!(retry_after.as_deref(), Some("1"));
        offer(&proxy, "127.0.0.2", 40, 10).await
    };
    let (a, b) = tokio::join!(limited_client, offer(&proxy, "127.0.0.3", 5, 12));
    let (ok, limited, _) = a?;
    let rate = f64::from(ok) / 10.0;
    println!("limited client: {rate:.1} rps admitted of 40 offered ({limited} refused)");
    assert!(
        (9.0..=11.0).contains(&rate),
        "{rate} rps admitted, want 10 ± 10 %"
    );
    let (ok_b, limited_b, _) = b?;
    assert_eq!(limited_b, 0, "the other client was limited");
    assert!(ok_b >= 55, "{ok_b}");

    // gRPC from the limited client, its bucket just spent: RESOURCE_EXHAUSTED.
    let mut h2 = client::http2_from(ip("127.0.0.2"), proxy.inbound).await?;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let req = http::Request::post("http://api.demo:8080/demo.Echo/Say")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::new()))?;
        let rsp = h2.send_request(req).await?;
        codes.push(
            rsp.headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        );
    }
    assert!(codes.contains(&Some("8".into())), "{codes:?}");

    // 100,000 distinct clients, one request each: the limiter keeps 1,000.
    let rss_before = proxy.rss_bytes()?;
    let started = Instant::now();
    let inbound = proxy.inbound;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0u32..16 {
        tasks.spawn(async move {
            let mut served = 0u32;
            let mut i = worker;
            while i < 100_000 {
                // 127.1.0.0 – 127.2.134.159: all this host's.
                let n = 0x7f01_0000 + i;
                let from = IpAddr::from(n.to_be_bytes());
                let mut conn = client::http1_from(Some(from), inbound).await?;
                let (status, _, _) =
                    text(conn.send_request(request("GET", "/v1/x")?).await?).await?;
                anyhow::ensure!(status == 200, "client {from}: {status}");
                served += 1;
                i += 16;
            }
            anyhow::Ok(served)
        });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        served += r??;
    }
    let rss_after = proxy.rss_bytes()?;
    println!(
        "100,000 distinct clients in {:?}: RSS {} → {} KiB",
        started.elapsed(),
        rss_before / 1024,
        rss_after / 1024
    );
    assert_eq!(served, 100_000);
    // 1,000 buckets are under 100 KiB; 100,000 would be about 8 MiB.
    assert!(
        rss_after < rss_before + 4 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after}"
    );
    Ok(())
}

/// Policy from weft-control's `InboundServerPolicies`, enforced between
/// meshed proxies by the identity each client proved over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_authorized_from_the_control_plane() -> anyhow::Result<()> {
    use weft_test_support::client::Conn;
    use weft_test_support::mesh::{Mesh, api_destination, meshed, start_proxy};

    let mesh = Mesh::start().await?;
    let port = mesh.backend.addr.port();
    let servers = |web_methods: &str| {
        format!(
            r#"servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: web-reads
            clients: {{identities: ["web.demo"]}}
            routes: [{{path_prefix: /, methods: [{web_methods}]}}]
          - name: batch
            clients: {{identities: ["*.batch.demo"]}}
"#
        )
    };
    let dests = |web_methods: &str| {
        format!(
            "{}{}",
            api_destination(mesh.server.inbound, "api.demo"),
            servers(web_methods)
        )
    };
    mesh.dests.write_yaml(&dests("GET"))?;
    let batch = start_proxy(&meshed(&mesh.ca, &mesh.control, "etl.batch.demo")?).await?;
    let other = start_proxy(&meshed(&mesh.ca, &mesh.control, "other.demo")?).await?;

    let request = |proxy: std::net::SocketAddr, method: &'static str| async move {
        let mut conn = client::http1(proxy).await?;
        let req = http::Request::builder()
            .method(method)
            .uri("http://api.demo:8080/items")
            .header(http::header::HOST, "api.demo:8080")
            .body(Full::new(Bytes::new()))?;
        let (status, headers, _) = text(conn.send_request(req).await?).await?;
        let error = headers
            .get("l5d-proxy-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        anyhow::Ok((status.as_u16(), error))
    };
    // The file is polled every 250 ms; the policy follows within a second
    // (until then the mesh-wide default, allow-all, applies).
    let written = Instant::now();
    while request(other.outbound, "GET").await?.0 != 403 {
        anyhow::ensure!(
            written.elapsed() < Duration::from_secs(3),
            "policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server_name = format!("api.demo:{port}");
    assert_eq!(request(mesh.client.outbound, "GET").await?.0, 200);
    let (status, error) = request(mesh.client.outbound, "POST").await?;
    assert_eq!(status, 403);
    assert_eq!(
        error,
        format!(
            "unauthorized: no authorization of route \"default\" on server \"{server_name}\" admits client web.demo"
        )
    );
    assert_eq!(request(batch.outbound, "POST").await?.0, 200);
    assert_eq!(request(other.outbound, "GET").await?.0, 403);
    // An unmeshed client, in plaintext straight to the inbound side.
    let mut plain = Conn::connect(mesh.server.inbound, false).await?;
    let (status, _, _) = plain.get("api.demo:8080", "/items").await?;
    assert_eq!(status, 403);
    // gRPC from web (a POST) is PERMISSION_DENIED.
    let mut h2 = client::http2(mesh.client.outbound).await?;
    let req = http::Request::post("http://api.demo:8080/demo.Echo/Say")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))?;
    let rsp = h2.send_request(req).await?;
    assert_eq!(
        rsp.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"7"[..])
    );

    // Revoking web's reads applies within a second.
    mesh.dests.write_yaml(&dests("HEAD"))?;
    let revoked = Instant::now();
    while request(mesh.client.outbound, "GET").await?.0 != 403 {
        anyhow::ensure!(
            revoked.elapsed() < Duration::from_secs(1),
            "revocation not applied within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("revocation applied after {:?}", revoked.elapsed());

    let m = scrape(mesh.server.admin).await?;
    assert!(
        m.sum(
            "inbound_http_authz_allow_total",
            &[
                ("authz_name", "web-reads"),
                ("client_id", "web.demo"),
                ("tls", "true"),
                ("srv_name", &server_name)
            ],
        ) >= 2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum(
            "inbound_http_authz_allow_total",
            &[("authz_name", "batch"), ("client_id", "etl.batch.demo")]
        ),
        1.0
    );
    assert!(
        m.sum(
            "inbound_http_authz_deny_total",
            &[("client_id", "other.demo")]
        ) >= 1.0
    );
    assert_eq!(
        m.sum("inbound_http_authz_deny_total", &[("tls", "no_identity")]),
        1.0
    );
    Ok(())
}

/// Two hosts (network namespaces on a veth pair, each with an address in
/// two networks): the server's policy admits clients from 10.97.0.0/24
/// only, so the same client host is let in from one of its addresses and
/// refused from the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rules_admit_by_source_cidr_between_hosts() -> anyhow::Result<()> {
    use weft_test_support::netns::Netns;
    use weft_test_support::workspace_binary;

    let client_host = Netns::new("authz-c")?;
    let server_host = Netns::new("authz-s")?;
    client_host.link(
        &server_host,
        "10.97.0.1/24,10.97.1.1/24",
        "10.97.0.2/24,10.97.1.2/24",
    )?;
    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let _app = server_host.spawn(&[&backend, "--listen", "127.0.0.1:8080", "--name", "api"])?;
    let file = DestinationsFile::from_yaml(
        r#"destinations: {}
servers:
  "api.demo":
    ports:
      "8080":
        default: deny
        authorizations:
          - name: office
            clients: {networks: [10.97.0.0/24]}
"#,
    )?;
    let path = file.path_str();
    let wrapper = ["ip", "netns", "exec", server_host.name.as_str()];
    let _proxy = Proxy::spawn(
        &wrapper,
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &path),
            ("WEFT_PROXY_INBOUND_LISTEN", "0.0.0.0:4143"),
            ("WEFT_PROXY_ADMIN_LISTEN", "127.0.0.1:4191"),
            ("WEFT_PROXY_INBOUND_FORWARD", "127.0.0.1:8080"),
            ("WEFT_PROXY_INBOUND_SERVER", "api.demo"),
        ],
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server_host
        .exec(&["curl", "-sf", "http://127.0.0.1:8080/"])
        .is_err()
        || server_host
            .exec(&["curl", "-sf", "http://127.0.0.1:4191/ready"])
            .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "server host never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = |from: &str, to: &str| {
        client_host.exec(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--interface",
            from,
            &format!("http://{to}:4143/"),
        ])
    };
    assert_eq!(status("10.97.0.1", "10.97.0.2")?, "200");
    assert_eq!(status("10.97.1.1", "10.97.1.2")?, "403");
    let metrics = server_host.exec(&["curl", "-s", "http://127.0.0.1:4191/metrics"])?;
    let m = weft_test_support::metrics::Scrape::parse(metrics)?;
    assert_eq!(
        m.sum(
            "inbound_http_authz_allow_total",
            &[("authz_name", "office")]
        ),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.sum("inbound_http_authz_deny_total", &[("tls", "no_identity")]),
        1.0
    );
    Ok(())
}

/// A rule on `/path/public` is judged on the path the application will
/// serve: dot segments (plain, percent-encoded, after `//`) are resolved
/// before policy sees the path and the application gets the resolved
/// path; an escaped slash, which an application might decode into a
/// separator policy never saw, is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_climb_out_of_an_allowed_prefix() -> anyhow::Result<()> {
    let app = Backend::start("api").await?;
    let port = app.addr.port();
    let file = DestinationsFile::from_yaml(&format!(
        r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: public
            clients: {{networks: [127.0.0.0/8]}}
            routes: [{{path_prefix: /path/public}}]
"#
    ))?;
    let proxy = inbound_proxy(&file, app.addr, &[]).await?;
    let body = |path: &'static str| {
        let proxy = &proxy;
        async move {
            let mut conn = client::http1(proxy.inbound).await?;
            let (status, _, body) = text(conn.send_request(request("GET", path)?).await?).await?;
            anyhow::Ok((status.as_u16(), body))
        }
    };
    assert_eq!(
        body("/path/public/a").await?,
        (200, "/path/public/a".into())
    );
    assert_eq!(
        body("/path/public/./a//b?q=/../x").await?,
        (200, "/path/public/a/b?q=/../x".into()),
        "the application gets the path policy judged; the query is left alone"
    );
    for climb in [
        "/path/public/../admin",
        "/path/public/%2e%2e/admin",
        "/path/public/.%2E/admin",
        "/path/public//../../path/admin",
    ] {
        let (status, error, _) = send(&proxy, None, "GET", climb).await?;
        assert_eq!(status, 403, "{climb}: {error}");
    }
    let hits = app.hits();
    let (status, error, _) = send(&proxy, None, "GET", "/path/public/..%2fadmin").await?;
    assert_eq!(status, 400);
    assert!(error.contains("escaped slash"), "{error}");
    assert_eq!(
        app.hits(),
        hits,
        "refused requests never reach the application"
    );
    Ok(())
}

/// The status line a raw HTTP/1.1 `CONNECT` gets, and the stream, open
/// if the tunnel is.
async fn connect(proxy: &Proxy, target: &str) -> anyhow::Result<(String, tokio::net::TcpStream)> {
    let mut s = tokio::net::TcpStream::connect(proxy.inbound).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    Ok((head.lines().next().unwrap_or_default().to_string(), s))
}

/// An inbound CONNECT would be a tunnel to the application past every
/// later request-level decision: routes without a method (the default
/// policy's included) do not admit it (404, counted), only a route naming
/// CONNECT does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connect_needs_a_route_that_names_it() -> anyhow::Result<()> {
    let app = Backend::start("api").await?;
    let port = app.addr.port();
    let target = format!("api.demo:{port}");

    let no_policy = DestinationsFile::from_yaml("destinations: {}\n")?;
    let open = inbound_proxy(&no_policy, app.addr, &[]).await?;
    let (status, _) = connect(&open, &target).await?;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let metrics = scrape(open.admin).await?.text;
    assert!(
        metrics.lines().any(|l| l.starts_with("response_total{")
            && l.contains("direction=\"inbound\"")
            && l.contains("error=\"route_not_found\"")),
        "the refusal is counted"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("inbound_http_route_not_found_total{")),
        "{metrics}"
    );

    let policy = |connect_route: &str| {
        format!(
            r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: everything
            clients: {{networks: [127.0.0.0/8]}}
            routes: [{{path_prefix: /}}{connect_route}]
"#
        )
    };
    let file = DestinationsFile::from_yaml(&policy(""))?;
    let proxy = inbound_proxy(&file, app.addr, &[]).await?;
    assert_eq!(send(&proxy, None, "GET", "/x").await?.0, 200);
    let (status, _) = connect(&proxy, &target).await?;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert_eq!(app.hits(), 1, "only the GET reached the application");

    file.write_yaml(&policy(", {path_prefix: /, methods: [CONNECT]}"))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tunnel = loop {
        let (status, s) = connect(&proxy, &target).await?;
        if status.starts_with("HTTP/1.1 200") {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tunnel
        .write_all(b"GET /path/through HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut rsp = String::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_string(&mut rsp)).await??;
    assert!(rsp.ends_with("/path/through"), "{rsp}");
    let metrics = scrape(proxy.admin).await?.text;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("inbound_http_authz_allow_total{") && l.contains("route_name=\"")
        ),
        "{metrics}"
    );
    Ok(())
}
