//! What a hostile or broken peer can make the proxy hold, and what it
//! cannot make it do: real sockets against the real binary, each test
//! bounded in time.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_test_support::DestinationsFile;
use weft_test_support::backend::Backend;
use weft_test_support::client::{self, get, text};
use weft_test_support::metrics::scrape;
use weft_test_support::proxy::Proxy;

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// Sends raw bytes and reads what comes back until the proxy closes or
/// `within` passes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8], within: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn ok_through(proxy: &Proxy, authority: &str) -> anyhow::Result<()> {
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let (status, _, _) = text(send.send_request(get(authority, "/")?).await?).await?;
    anyhow::ensure!(status == 200, "{authority}: {status}\n{}", proxy.log());
    Ok(())
}

/// Whether the proxy has closed `s` (EOF or reset), waiting up to `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_and_preface_only_connections_are_closed_in_time() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let file = DestinationsFile::new(&[("svc.test:80", &[(backend.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_HEADER_READ_TIMEOUT", "2s"),
            ("WEFT_PROXY_HTTP2_IDLE_TIMEOUT", "2s"),
        ],
    )
    .await?;
    let mut held = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(proxy.outbound).await?;
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: svc.test\r\nX-Slow: ")
                .await?;
        } else {
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        }
        held.push(s);
    }
    // Everyone else is served meanwhile.
    for _ in 0..20 {
        ok_through(&proxy, "svc.test").await?;
    }
    let started = Instant::now();
    let mut open = 0;
    for s in &mut held {
        let left = Duration::from_secs(8).saturating_sub(started.elapsed());
        if !closed(s, left).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections still open after their timeouts");
    assert!(started.elapsed() < Duration::from_secs(8));
    ok_through(&proxy, "svc.test").await?;
    Ok(())
}

#[tokio::test]
async fn absolute_form_wins_and_two_hosts_are_refused() -> anyhow::Result<()> {
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let file =
        DestinationsFile::new(&[("a.test:80", &[(a.addr, 1)]), ("b.test:80", &[(b.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
    )
    .await?;

    // Routed by the absolute-form target, and the upstream is told the
    // same authority: it never sees `Host: b.test`.
    let rsp = raw(
        proxy.outbound,
        b"GET http://a.test/headers HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(rsp.contains("x-backend: a"), "{rsp}");
    assert!(rsp.contains("host: a.test\n"), "{rsp}");
    assert!(!rsp.contains("b.test"), "{rsp}");

    let rsp = raw(
        proxy.outbound,
        b"GET /headers HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("more than one Host"), "{rsp}");
    assert_eq!((a.hits(), b.hits()), (1, 0));
    Ok(())
}

#[tokio::test]
async fn a_malformed_client_body_is_the_clients_400_and_remote_clients_see_no_addresses()
-> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string())],
    )
    .await?;
    let rsp = raw(
        proxy.inbound,
        b"POST /echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(!rsp.contains(&backend.addr.to_string()), "{rsp}");
    assert!(!rsp.contains("127.0.0.1"), "{rsp}");
    Ok(())
}

#[tokio::test]
async fn twenty_thousand_hosts_do_not_grow_the_metrics() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string()),
            ("WEFT_PROXY_INBOUND_AUTHORITIES", "svc.test:80"),
        ],
    )
    .await?;
    let mut conn = client::http1(proxy.inbound).await?;
    // Warm up, so the allocator's first growth is not counted.
    for i in 0..500 {
        conn.ready().await?;
        text(
            conn.send_request(get(&format!("warm{i}.test"), "/")?)
                .await?,
        )
        .await?;
    }
    let before = proxy.peak_rss_bytes()?;
    for i in 0..20_000 {
        conn.ready().await?;
        let (status, _, _) = text(
            conn.send_request(get(&format!("h{i}.random.test"), "/")?)
                .await?,
        )
        .await?;
        assert_eq!(status, 200);
    }
    conn.ready().await?;
    text(conn.send_request(get("svc.test", "/")?).await?).await?;
    let grown = proxy.peak_rss_bytes()?.saturating_sub(before);
    assert!(grown < 2 * 1024 * 1024, "RSS grew {grown} bytes");
    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("authority", "other")]
        ),
        20_500.0
    );
    assert_eq!(
        m.sum(
            "request_total",
            &[("direction", "inbound"), ("authority", "svc.test:80")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "metrics_authority_overflow_total",
            &[("direction", "inbound")]
        ),
        20_500.0
    );
    let series = m
        .samples()
        .iter()
        .filter(|s| s.metric == "request_total")
        .count();
    assert!(series <= 3, "{series} request_total series");
    Ok(())
}

#[tokio::test]
async fn an_empty_destinations_file_keeps_the_last_routes() -> anyhow::Result<()> {
    let backend = Backend::start("ok").await?;
    let file = DestinationsFile::new(&[("svc.test:80", &[(backend.addr, 1)])])?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
    )
    .await?;
    ok_through(&proxy, "svc.test").await?;
    file.write_yaml("")?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ok_through(&proxy, "svc.test").await?;
    assert!(
        proxy.log().contains("bad destinations edit ignored"),
        "{}",
        proxy.log()
    );
    Ok(())
}

#[tokio::test]
async fn a_hung_application_gets_a_504_and_cancelled_requests_are_counted() -> anyhow::Result<()> {
    // Accepts and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hung_addr = hung.local_addr()?;
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_INBOUND_FORWARD", &hung_addr.to_string()),
            ("WEFT_PROXY_INBOUND_RESPONSE_TIMEOUT", "500ms"),
            ("WEFT_PROXY_INBOUND_AUTHORITIES", "svc.test"),
        ],
    )
    .await?;
    let started = Instant::now();
    let mut send = client::http1(proxy.inbound).await?;
    send.ready().await?;
    let (status, headers, _) = text(send.send_request(get("svc.test", "/")?).await?).await?;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    let reason = headers["l5d-proxy-error"].to_str()?;
    assert!(!reason.contains(&hung_addr.to_string()), "{reason}");

    // A client that gives up first is counted too.
    let mut send = client::http1(proxy.inbound).await?;
    send.ready().await?;
    let _ = tokio::time::timeout(
        Duration::from_millis(100),
        send.send_request(get("svc.test", "/")?),
    )
    .await;
    drop(send);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = scrape(proxy.admin).await?;
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "response_timeout"), ("status_code", "504")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "response_total",
            &[("error", "cancelled"), ("classification", "failure")]
        ),
        1.0
    );
    Ok(())
}

/// CVE-2023-44487's shape: streams opened and reset at once, 10,000 of
/// them, on as many connections as the proxy makes the attacker open.
#[tokio::test]
async fn rapid_reset_leaves_the_proxy_serving_with_bounded_cpu() -> anyhow::Result<()> {
    use weft_test_support::process::cpu_seconds;
    let backend =
        Backend::start_with_delay("api", "127.0.0.1:0".parse()?, Duration::from_millis(20)).await?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_INBOUND_FORWARD", &backend.addr.to_string())],
    )
    .await?;
    let pid = proxy.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let (mut sent, mut connections) = (0u32, 0u32);
    while sent < 10_000 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "only {sent} resets sent in 60 s"
        );
        let tcp = TcpStream::connect(proxy.inbound).await?;
        connections += 1;
        let Ok((mut h2, mut conn)) = h2::client::handshake(tcp).await else {
            continue;
        };
        let mut ping = conn
            .ping_pong()
            .ok_or_else(|| anyhow::anyhow!("no ping handle"))?;
        let driver = tokio::spawn(conn);
        while sent < 10_000 {
            // A PING answered means the proxy has read every frame before
            // it: the resets really arrive, in batches of 50.
            if sent % 50 == 0
                && !matches!(
                    tokio::time::timeout(Duration::from_secs(2), ping.ping(h2::Ping::opaque()))
                        .await,
                    Ok(Ok(_))
                )
            {
                break;
            }
            h2 = match h2.ready().await {
                Ok(h2) => h2,
                Err(_) => break,
            };
            let request = http::Request::get("http://svc.test/").body(())?;
            match h2.send_request(request, true) {
                Ok((_response, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        driver.abort();
    }
    let attack = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    // The proxy's work per reset stream is bounded: well under a
    // millisecond of CPU each, even in a debug build.
    let per_stream_us = cpu / f64::from(sent) * 1e6;
    eprintln!(
        "{sent} resets on {connections} connections in {attack:?}: proxy CPU {cpu:.2} s ({per_stream_us:.0} µs per stream)"
    );
    assert!(
        per_stream_us < 500.0,
        "{per_stream_us:.0} µs per reset stream"
    );
    // Still serving, at once, on a fresh connection.
    let mut send = client::http2(proxy.inbound).await?;
    let rsp = tokio::time::timeout(
        Duration::from_secs(2),
        send.send_request(client::get_h2("svc.test", "/")?),
    )
    .await??;
    assert_eq!(rsp.status(), 200);
    // And idle afterwards: no work left behind by the abandoned streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_before = cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = cpu_seconds(pid)? - idle_before;
    assert!(
        idle < 0.1,
        "proxy used {idle:.2} s of CPU in 1 s idle after the attack"
    );
    Ok(())
}

/// At its file-descriptor limit the proxy backs off instead of spinning on
/// EMFILE, says so in a few lines rather than thousands, and serves again
/// as soon as descriptors are free.
#[tokio::test]
async fn at_the_fd_limit_the_proxy_waits_quietly_and_recovers() -> anyhow::Result<()> {
    use weft_test_support::process::cpu_seconds;
    let backend = Backend::start("api").await?;
    let dests = DestinationsFile::from_yaml(&format!(
        "destinations:\n  \"api.test:80\":\n    endpoints:\n      - addr: {}\n",
        backend.addr
    ))?;
    let proxy = Proxy::spawn(
        &["prlimit", "--nofile=256:256", "--"],
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &dests.path_str())],
    )
    .await?;
    proxy.wait_ready(Duration::from_secs(10)).await?;
    let started = Instant::now();
    let pid = proxy.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    // 400 clients that send half a request head and wait: more than the
    // proxy has descriptors for.
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut s = TcpStream::connect(proxy.outbound).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n").await?;
        held.push(s);
    }
    // Those it cannot accept wait in the kernel's queue (a backlog of
    // 1024, not the libraries' 128, whose overflow costs clients seconds
    // of SYN retries).
    anyhow::ensure!(
        started.elapsed() < Duration::from_secs(3),
        "400 connects took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accept_failures = |log: &str| log.matches("accept failed").count();
    let lines_before = accept_failures(&proxy.log());
    let cpu_before = cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let lines = accept_failures(&proxy.log()) - lines_before;
    assert!(lines_before >= 1, "EMFILE never reported:\n{}", proxy.log());
    // Backing off to 500 ms between attempts: a few milliseconds of CPU,
    // where a spinning accept loop burns the whole 3 s.
    assert!(
        cpu < 0.3,
        "proxy used {cpu:.2} s of CPU in 3 s at the fd limit"
    );
    assert!(
        lines <= 1,
        "{lines} 'accept failed' lines in 3 s:\n{}",
        proxy.log()
    );
    drop(held);
    let freed = Instant::now();
    // Descriptors come back as the proxy sees the clients go; then it
    // serves again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ok_through(&proxy, "api.test:80")).await
        {
            Ok(Ok(())) => break,
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "not serving after the clients left: {other:?}\n{}",
                proxy.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("serving again {:?} after the clients left", freed.elapsed());
    Ok(())
}

/// One of three replicas is frozen (SIGSTOP: the kernel still accepts its
/// connections, nothing ever answers). Requests to the others are not held
/// up behind it, and once clients have given up on it a few times it stops
/// being picked.
#[tokio::test]
async fn a_frozen_endpoint_stalls_no_one_and_stops_being_picked() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let healthy = [Backend::start("a").await?, Backend::start("b").await?];
    let mut frozen = weft_test_support::process::command(weft_test_support::workspace_binary(
        "weft-test-backend",
    )?)
    .args(["--name", "frozen"])
    .stdout(std::process::Stdio::piped())
    .spawn()?;
    let stdout = frozen
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await?;
    let frozen_addr = line.trim().trim_start_matches("listening ").to_string();
    let pid = frozen.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let stop = |signal: &str| {
        std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
    };
    anyhow::ensure!(stop("-STOP")?.success());
    let dests = DestinationsFile::from_yaml(&format!(
        "destinations:\n  \"api.test:80\":\n    endpoints:\n      - addr: {}\n      - addr: {}\n      - addr: {frozen_addr}\n",
        healthy[0].addr, healthy[1].addr
    ))?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[("WEFT_PROXY_DESTINATIONS", &dests.path_str())],
    )
    .await?;

    // Ten clients, each sending 30 requests one after another and giving
    // up on any that takes a second.
    let send = client::http2(proxy.outbound).await?;
    let mut workers = Vec::new();
    for _ in 0..10 {
        let mut send = send.clone();
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..30 {
                let started = Instant::now();
                let request = client::get_h2("api.test:80", "/")?;
                let outcome = tokio::time::timeout(Duration::from_secs(1), async {
                    send.ready().await?;
                    let rsp = send.send_request(request).await?;
                    anyhow::Ok(rsp.status().as_u16())
                })
                .await;
                results.push((started, started.elapsed(), outcome.ok()));
            }
            anyhow::Ok(results)
        }));
    }
    let mut results = Vec::new();
    for w in workers {
        results.extend(w.await??);
    }
    anyhow::ensure!(stop("-CONT")?.success());
    // In the order the requests were sent.
    results.sort_by_key(|(started, _, _)| *started);
    let gave_up = |r: &[(Instant, Duration, Option<anyhow::Result<u16>>)]| {
        r.iter().filter(|(_, _, o)| o.is_none()).count()
    };
    let ok: Vec<Duration> = results
        .iter()
        .filter(|(_, _, o)| matches!(o, Some(Ok(200))))
        .map(|(_, d, _)| *d)
        .collect();
    let (first, last) = results.split_at(results.len() / 2);
    eprintln!(
        "{} ok, gave up on {} in the first half and {} in the second",
        ok.len(),
        gave_up(first),
        gave_up(last)
    );
    // Every request the frozen replica did not take was answered at once.
    assert_eq!(ok.len() + gave_up(&results), results.len());
    let slowest_ok = ok.iter().max().copied().unwrap_or_default();
    assert!(
        slowest_ok < Duration::from_millis(500),
        "an answered request took {slowest_ok:?}"
    );
    // A few clients find out; then it is left alone.
    assert!(gave_up(first) <= 10, "gave up on {} early", gave_up(first));
    assert_eq!(
        gave_up(last),
        0,
        "the frozen endpoint was still picked late"
    );
    Ok(())
}

/// An endpoint whose connects hang (SYNs dropped: a full accept queue
/// here, a dead host or a firewall in life). Concurrent requests share one
/// connect attempt and fail over together after one connect timeout, not
/// one after another; later requests skip the endpoint while it backs off.
#[tokio::test]
async fn a_blackholed_endpoint_costs_one_connect_timeout_not_one_per_request() -> anyhow::Result<()>
{
    let healthy = Backend::start("healthy").await?;
    // Listening, never accepting, with the smallest queue: once two
    // connections wait in it, the kernel drops further SYNs.
    let hole = tokio::net::TcpSocket::new_v4()?;
    hole.bind("127.0.0.1:0".parse()?)?;
    let hole = hole.listen(0)?;
    let hole_addr = hole.local_addr()?;
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(hole_addr)).await
        {
            fillers.push(s);
        }
    }
    let probe =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(hole_addr)).await;
    anyhow::ensure!(probe.is_err(), "the black hole still accepts connects");

    let dests = DestinationsFile::from_yaml(&format!(
        "destinations:\n  \"api.test:80\":\n    endpoints:\n      - addr: {}\n      - addr: {hole_addr}\n",
        healthy.addr
    ))?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &dests.path_str()),
            ("WEFT_PROXY_CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let send = client::http2(proxy.outbound).await?;
    let wave = |n: usize| {
        let send = send.clone();
        async move {
            let mut tasks = Vec::new();
            for _ in 0..n {
                let mut send = send.clone();
                tasks.push(tokio::spawn(async move {
                    let started = Instant::now();
                    send.ready().await?;
                    let rsp = send
                        .send_request(client::get_h2("api.test:80", "/")?)
                        .await?;
                    anyhow::Ok((rsp.status().as_u16(), started.elapsed()))
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await??);
            }
            anyhow::Ok(out)
        }
    };
    let first = tokio::time::timeout(Duration::from_secs(10), wave(40)).await??;
    let slowest = first.iter().map(|(_, d)| *d).max().unwrap_or_default();
    assert!(first.iter().all(|(s, _)| *s == 200), "{first:?}");
    // Some requests did wait for the black hole...
    assert!(slowest >= Duration::from_millis(900), "slowest {slowest:?}");
    // ...for one connect timeout (1 s) and a failover, however many
    // queued behind the connect.
    assert!(slowest < Duration::from_millis(2500), "slowest {slowest:?}");
    let second = tokio::time::timeout(Duration::from_secs(10), wave(40)).await??;
    let slowest = second.iter().map(|(_, d)| *d).max().unwrap_or_default();
    assert!(second.iter().all(|(s, _)| *s == 200), "{second:?}");
    // Backing off: the black hole is not tried again right away.
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    drop(fillers);
    Ok(())
}

/// On inbound (where detection relays a silent client as opaque), a
/// request line trickled past the detection timeout and a client silent
/// throughout are both closed at the header read timeout, as HAProxy
/// closes them, without reaching the application; a client that connected
/// early and then sends a request is served as HTTP, under the HTTP policy
/// (a denied path is 403, not relayed as bytes past it); a
/// server-speaks-first application still greets its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_inbound_clients_cannot_escape_the_header_timeout() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let port = app.addr.port();
    let file = DestinationsFile::from_yaml(&format!(
        r#"destinations: {{}}
servers:
  "api.demo":
    ports:
      "{port}":
        default: deny
        authorizations:
          - name: reads
            clients: {{networks: [127.0.0.0/8]}}
            routes: [{{path_prefix: /allowed}}]
"#
    ))?;
    let app_addr = app.addr.to_string();
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_INBOUND_FORWARD", &app_addr),
            ("WEFT_PROXY_INBOUND_SERVER", "api.demo"),
            ("WEFT_PROXY_HEADER_READ_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let mut held = Vec::new();
    let started = Instant::now();
    for i in 0..200 {
        let mut s = TcpStream::connect(proxy.inbound).await?;
        if i % 2 == 0 {
            s.write_all(b"GET /allow").await?;
        }
        held.push(s);
    }
    let mut late = TcpStream::connect(proxy.inbound).await?;
    let mut denied = TcpStream::connect(proxy.inbound).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    late.write_all(b"GET /allowed HTTP/1.1\r\nHost: api.demo\r\nConnection: close\r\n\r\n")
        .await?;
    denied
        .write_all(b"GET /admin HTTP/1.1\r\nHost: api.demo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut rsp = String::new();
    tokio::time::timeout(Duration::from_secs(3), late.read_to_string(&mut rsp)).await??;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    let mut rsp = String::new();
    tokio::time::timeout(Duration::from_secs(3), denied.read_to_string(&mut rsp)).await??;
    assert!(
        rsp.starts_with("HTTP/1.1 403"),
        "policy applies to a late speaker: {rsp}"
    );

    let mut open = 0;
    for s in &mut held {
        let left = Duration::from_secs(4).saturating_sub(started.elapsed());
        if !closed(s, left).await {
            open += 1;
        }
    }
    let took = started.elapsed();
    assert_eq!(open, 0, "connections still open after the header timeout");
    assert!(
        took >= Duration::from_millis(900),
        "closed before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        app.hits(),
        1,
        "only the one allowed request reached the application"
    );

    // A server that speaks first is still relayed.
    let smtp = weft_test_support::tcp::server_first(b"220 ready\r\n").await?;
    let smtp_addr = smtp.addr.to_string();
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let relay = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_INBOUND_FORWARD", &smtp_addr),
            ("WEFT_PROXY_HEADER_READ_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let mut s = TcpStream::connect(relay.inbound).await?;
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut banner)).await??;
    assert_eq!(&banner, b"220 ready\r\n");
    Ok(())
}

/// A declared body beyond any sane size is refused up front, and an
/// HTTP/1.1 request that merely says `application/grpc` (gRPC is HTTP/2)
/// does not escape the inbound response timeout gRPC streams are exempt
/// from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_and_http1_grpc_get_no_special_treatment() -> anyhow::Result<()> {
    let app = Backend::start("app").await?;
    let app_addr = app.addr.to_string();
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_INBOUND_FORWARD", &app_addr),
            ("WEFT_PROXY_INBOUND_RESPONSE_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let rsp = raw(
        proxy.inbound,
        b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 2000000000000\r\n\r\nabc",
        Duration::from_secs(3),
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("beyond the 1 TiB"), "{rsp}");
    assert_eq!(app.hits(), 0);

    // Read for 2.5 s: the application answers at 5 s, the bound at 1 s.
    let rsp = raw(
        proxy.inbound,
        b"POST /slow/5000 HTTP/1.1\r\nHost: app\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n",
        Duration::from_millis(2500),
    )
    .await?;
    // Answered as the client asked (gRPC DEADLINE_EXCEEDED), at the bound.
    assert!(rsp.contains("no response headers within 1s"), "{rsp}");
    assert!(rsp.contains("grpc-status: 4"), "{rsp}");
    Ok(())
}

/// 12,000 requests through `conn`, each naming a new address (127.x.y.z
/// on a port nothing listens on), each refused upstream; the proxy's RSS
/// after them.
async fn distinct_addresses(
    proxy: &Proxy,
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    from: u32,
) -> anyhow::Result<u64> {
    for i in from..from + 12_000 {
        let authority = format!("127.{}.{}.{}:9", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        conn.ready().await?;
        let (status, _, _) = text(conn.send_request(get(&authority, "/")?).await?).await?;
        anyhow::ensure!(status == 503, "{authority}: {status}\n{}", proxy.log());
    }
    proxy.rss_bytes()
}

/// Outbound state per authority is bounded in count: a client naming
/// tens of thousands of distinct addresses grows the proxy no further
/// once the per-map caps (2,000 targets) are met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_outbound_authorities_do_not_grow_the_proxy() -> anyhow::Result<()> {
    let file = DestinationsFile::from_yaml("destinations: {}\n")?;
    let proxy = Proxy::start(
        PROXY.as_ref(),
        &[
            ("WEFT_PROXY_DESTINATIONS", &file.path_str()),
            ("WEFT_PROXY_CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let mut conn = client::http1(proxy.outbound).await?;
    let first = distinct_addresses(&proxy, &mut conn, 1).await?;
    let second = distinct_addresses(&proxy, &mut conn, 20_001).await?;
    let grown = second.saturating_sub(first);
    // Before the endpoint map was swept: 6.5 MiB more per 12,000.
    assert!(grown < 1024 * 1024, "RSS grew {grown} bytes past the caps");
    Ok(())
}
