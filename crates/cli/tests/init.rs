//! `weft init` in network namespaces of the test's own: the rules it
//! installs, that installing twice changes nothing, that `--remove` leaves
//! the table as it found it, and that an application that knows nothing of
//! the proxy is meshed both ways.
//!
//! Needs root, iproute2, iptables and curl; `.ci/run` installs them.

use std::process::Command;
use std::time::{Duration, Instant};

use weft_test_support::netns::{AS_NOBODY, Netns};
use weft_test_support::proxy::Proxy;
use weft_test_support::workspace_binary;

fn weft() -> anyhow::Result<String> {
    Ok(workspace_binary("weft")?.to_string_lossy().into_owned())
}

#[test]
fn a_dry_run_prints_the_rules_and_needs_no_privilege() -> anyhow::Result<()> {
    // As nobody: a dry run must not touch (or need to read) anything.
    let (setpriv, args) = AS_NOBODY.split_first().expect("a prefix");
    let out = Command::new(setpriv)
        .args(args)
        .arg(weft()?)
        .args([
            "init",
            "--proxy-uid",
            "2102",
            "--skip-inbound-ports",
            "22,8000-8100",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "169.254.169.254",
            "--dry-run",
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rule in [
        "-A WEFT_PREROUTING -p tcp --dport 4143 -j RETURN",
        "-A WEFT_PREROUTING -p tcp --dport 4191 -j RETURN",
        "-A WEFT_PREROUTING -p tcp --dport 8000:8100 -j RETURN",
        "-A WEFT_PREROUTING -p tcp -j REDIRECT --to-ports 4143",
        "-A WEFT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A WEFT_OUTPUT -o lo -j RETURN",
        "-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
        "-A PREROUTING -j WEFT_PREROUTING",
        "-A OUTPUT -j WEFT_OUTPUT",
    ] {
        assert!(stdout.contains(rule), "{rule:?} missing from\n{stdout}");
    }
    // The skips come before the redirect they are exceptions to.
    let pos = |s: &str| stdout.find(s).unwrap_or(usize::MAX);
    assert!(pos("--uid-owner") < pos("--to-ports 4140"), "{stdout}");
    assert!(pos("--dport 22 ") < pos("--to-ports 4143"), "{stdout}");
    Ok(())
}

#[test]
fn bad_input_and_missing_privilege_are_named() -> anyhow::Result<()> {
    let run = |pre: &[&str], args: &[&str], path: Option<&str>| -> anyhow::Result<(bool, String)> {
        let mut c = match pre.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(weft()?);
                c
            }
            None => Command::new(weft()?),
        };
        if let Some(path) = path {
            c.env("PATH", path);
        }
        let out = c.arg("init").args(args).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, err) = run(&[], &["--skip-inbound-ports", "22,http", "--dry-run"], None)?;
    assert!(!ok && err.contains("\"http\" is not a port"), "{err}");
    let (ok, err) = run(
        &[],
        &["--skip-outbound-cidrs", "10.0.0.0/40", "--dry-run"],
        None,
    )?;
    assert!(!ok && err.contains("10.0.0.0/40"), "{err}");
    let (ok, err) = run(&[], &["--dry-run"], None)?;
    assert!(!ok && err.contains("--proxy-uid"), "{err}");
    let (ok, err) = run(&AS_NOBODY, &["--proxy-uid", "1"], None)?;
    assert!(
        !ok && err.contains("run it as root or with CAP_NET_ADMIN"),
        "{err}"
    );
    let (ok, err) = run(&[], &["--proxy-uid", "1"], Some("/nonexistent"))?;
    assert!(!ok && err.contains("apt install iptables"), "{err}");
    Ok(())
}

#[test]
fn installing_twice_is_installing_once_and_remove_leaves_nothing() -> anyhow::Result<()> {
    let ns = Netns::new("init")?;
    let weft = weft()?;
    // Someone else's rule, which must survive everything weft does.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1",
        "-j",
        "RETURN",
    ])?;
    let pristine = ns.nat_rules()?;
    let pristine6 = ns.nat_rules_v6()?;
    let init = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec![weft.as_str(), "init"];
        all.extend_from_slice(args);
        ns.exec(&all)
    };
    let install = [
        "--proxy-uid",
        "2102",
        "--skip-inbound-ports",
        "22",
        "--skip-outbound-cidrs",
        "169.254.169.254,fd00:ec2::254",
    ];
    let said = init(&install)?;
    assert!(
        said.contains("capturing inbound TCP to port 4143") && said.contains("IPv4 and IPv6"),
        "{said}"
    );
    let once = ns.nat_rules()?;
    let once6 = ns.nat_rules_v6()?;
    for want in [
        "-A PREROUTING -j WEFT_PREROUTING",
        "-A OUTPUT -j WEFT_OUTPUT",
        "-A WEFT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A WEFT_PREROUTING -p tcp -m tcp --dport 22 -j RETURN",
        "-A OUTPUT -d 192.0.2.1/32 -j RETURN",
        "-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN",
    ] {
        assert!(once.contains(want), "{want:?} not in\n{once}");
    }
    // The same capture for IPv6, each network in its own family's table.
    for want in [
        "-A PREROUTING -j WEFT_PREROUTING",
        "-A OUTPUT -j WEFT_OUTPUT",
        "-A WEFT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A WEFT_OUTPUT -d fd00:ec2::254/128 -j RETURN",
        "-A WEFT_OUTPUT -p tcp -j REDIRECT --to-ports 4140",
    ] {
        assert!(once6.contains(want), "{want:?} not in\n{once6}");
    }
    assert!(!once.contains("fd00") && !once6.contains("169.254"));
    init(&install)?;
    assert_eq!(ns.nat_rules()?, once, "a second run changed the rules");
    assert_eq!(
        ns.nat_rules_v6()?,
        once6,
        "a second run changed the IPv6 rules"
    );
    // --ipv6 off leaves IPv6 alone.
    let said = init(&["--proxy-uid", "2102", "--ipv6", "off", "--dry-run"])?;
    assert!(!said.contains("ip6tables"), "{said}");

    // Narrowing to inbound only takes the outbound chain away.
    init(&["--inbound-only"])?;
    let inbound = ns.nat_rules()?;
    assert!(!inbound.contains("WEFT_OUTPUT"), "{inbound}");
    assert!(
        inbound.contains("-A PREROUTING -j WEFT_PREROUTING"),
        "{inbound}"
    );

    let said = init(&["--remove"])?;
    assert!(said.contains("removed"), "{said}");
    assert_eq!(ns.nat_rules()?, pristine);
    assert_eq!(ns.nat_rules_v6()?, pristine6);
    let said = init(&["--remove"])?;
    assert!(said.contains("no weft rules were installed"), "{said}");
    Ok(())
}

fn curl(ns: &Netns, url: &str) -> anyhow::Result<String> {
    ns.exec(&["curl", "-fsS", "--max-time", "5", url])
}

/// The proxy in `ns` has counted exactly one `metric` with `labels`.
fn assert_one(ns: &Netns, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    assert_count(ns, metric, labels, 1)
}

/// The proxy in `ns` has counted exactly `n` `metric` with `labels`.
fn assert_count(ns: &Netns, metric: &str, labels: &[(&str, &str)], n: u32) -> anyhow::Result<()> {
    let m = weft_test_support::metrics::Scrape::parse(curl(ns, "http://127.0.0.1:4191/metrics")?)?;
    assert_eq!(
        m.sum(metric, labels),
        f64::from(n),
        "{metric} {labels:?} in\n{}",
        m.text
    );
    Ok(())
}

async fn wait_for(ns: &Netns, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(ns, url).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} never answered in {}",
            ns.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A control plane in the test's own namespace, serving `file`, on every
/// address (the namespaces reach it over their links to the root).
async fn control_plane(
    ca: &weft_test_support::mesh::MeshCa,
    file: &weft_test_support::DestinationsFile,
) -> anyhow::Result<weft_test_support::control::Control> {
    weft_test_support::control::Control::start(
        &workspace_binary("weft-control")?,
        ca,
        &[
            "--destinations",
            &file.path_str(),
            "--dns",
            "false",
            "--listen",
            "0.0.0.0:0",
        ],
    )
    .await
}

/// The user the proxy runs as in the tests that capture outbound traffic
/// (`weft init --proxy-uid 2102`).
const PROXY_UID: &str = "2102";

/// A proxy in `ns`, as `uid` (root when `None`), listening outbound on
/// 127.0.0.1:4140 and inbound and admin on every address unless `env`
/// says otherwise; once it is ready.
async fn host_proxy(
    ns: &Netns,
    uid: Option<&str>,
    env: Vec<(String, String)>,
) -> anyhow::Result<Proxy> {
    let mut all: Vec<(String, String)> = [
        ("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140"),
        ("WEFT_PROXY_INBOUND_LISTEN", "0.0.0.0:4143"),
        ("WEFT_PROXY_ADMIN_LISTEN", "0.0.0.0:4191"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    // Later entries win.
    all.extend(env);
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut wrapper = vec!["ip", "netns", "exec", ns.name.as_str()];
    if let Some(uid) = uid {
        wrapper.extend(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
    }
    let proxy = Proxy::spawn(&wrapper, &workspace_binary("weft-proxy")?, &all).await?;
    wait_for(ns, "http://127.0.0.1:4191/ready").await?;
    Ok(proxy)
}

/// A per-node proxy's environment: the control plane at `control`, the
/// workloads in `workloads`, an outbound listener the node's workloads
/// (other addresses) can reach.
fn per_node(
    ca: &weft_test_support::mesh::MeshCa,
    control: String,
    workloads: &std::path::Path,
) -> Vec<(String, String)> {
    env(&[
        ("WEFT_PROXY_CONTROL_ADDR", &control),
        ("WEFT_PROXY_TRUST_ANCHORS", &ca.anchors()),
        ("WEFT_PROXY_WORKLOADS", &workloads.to_string_lossy()),
        ("WEFT_PROXY_OUTBOUND_LISTEN", "0.0.0.0:4140"),
    ])
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `meshed`'s environment for `name`, with the control plane at `addr`.
fn meshed_at(
    ca: &weft_test_support::mesh::MeshCa,
    control: &weft_test_support::control::Control,
    name: &str,
    addr: String,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = weft_test_support::mesh::meshed(ca, control, name)?;
    for (k, v) in env.iter_mut() {
        if k == "WEFT_PROXY_CONTROL_ADDR" {
            *v = addr.clone();
        }
    }
    Ok(env)
}

/// The same over IPv6: `weft init` captures both families, and a proxy
/// listening on both (`127.0.0.1:4140,[::1]:4140`) meshes an IPv6 client
/// and an IPv6 server as it does IPv4 ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_traffic_is_captured_and_meshed_both_ways() -> anyhow::Result<()> {
    let app = Netns::new("app6")?;
    let peer = Netns::new("peer6")?;
    app.link(
        &peer,
        "10.98.7.1/24,fd00:98::1/64",
        "10.98.7.2/24,fd00:98::2/64",
    )?;
    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let _remote = peer.spawn(&[
        &backend,
        "--listen",
        "[fd00:98::2]:8080",
        "--name",
        "remote6",
    ])?;
    let _local = app.spawn(&[
        &backend,
        "--listen",
        "[fd00:98::1]:9000",
        "--name",
        "local6",
    ])?;

    let _proxy = host_proxy(
        &app,
        Some(PROXY_UID),
        env(&[
            ("WEFT_PROXY_OUTBOUND_LISTEN", "127.0.0.1:4140,[::1]:4140"),
            ("WEFT_PROXY_INBOUND_LISTEN", "0.0.0.0:4143,[::]:4143"),
        ]),
    )
    .await?;
    let said = app.exec(&[&weft()?, "init", "--proxy-uid", "2102"])?;
    assert!(said.contains("IPv4 and IPv6"), "{said}");
    wait_for(&peer, "http://[fd00:98::2]:8080/").await?;
    // A fresh link's first IPv6 connection waits about a second for
    // neighbour discovery (plain curl too), longer than the proxy's
    // connect timeout: warm it as the proxy's user, whose traffic is not
    // captured.
    let mut warm = vec![
        "setpriv",
        "--reuid",
        PROXY_UID,
        "--regid",
        PROXY_UID,
        "--clear-groups",
    ];
    warm.extend(["curl", "-fsS", "--max-time", "5", "-o", "/dev/null"]);
    warm.push("http://[fd00:98::2]:8080/");
    app.exec(&warm)?;

    assert_eq!(curl(&app, "http://[fd00:98::2]:8080/")?, "remote6");
    assert_eq!(curl(&peer, "http://[fd00:98::1]:9000/")?, "local6");
    assert_one(
        &app,
        "request_total",
        &[
            ("direction", "outbound"),
            ("authority", "[fd00:98::2]:8080"),
        ],
    )?;
    assert_one(
        &app,
        "response_total",
        &[
            ("direction", "inbound"),
            ("authority", "[fd00:98::1]:9000"),
            ("status_code", "200"),
        ],
    )?;
    app.exec(&[&weft()?, "init", "--remove"])?;
    assert!(!app.nat_rules_v6()?.contains("WEFT"));
    Ok(())
}

/// Two hosts on a veth pair. On `app`, `weft init` captures traffic for a
/// proxy running as uid 2102; the applications on both hosts know nothing
/// of it: `app`'s client reaches `peer` through the outbound proxy, and
/// `peer`'s client reaches `app`'s server through the inbound proxy, at
/// the address it dialled, while a server bound to loopback stays out of
/// reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_application_is_meshed_both_ways() -> anyhow::Result<()> {
    let app = Netns::new("app")?;
    let peer = Netns::new("peer")?;
    app.link(&peer, "10.98.0.1/24", "10.98.0.2/24")?;
    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let _remote = peer.spawn(&[&backend, "--listen", "10.98.0.2:8080", "--name", "remote"])?;
    let _local = app.spawn(&[&backend, "--listen", "0.0.0.0:9000", "--name", "local"])?;
    let _private = app.spawn(&[&backend, "--listen", "127.0.0.1:9001", "--name", "private"])?;

    let _proxy = host_proxy(&app, Some(PROXY_UID), Vec::new()).await?;
    app.exec(&[&weft()?, "init", "--proxy-uid", "2102"])?;
    wait_for(&peer, "http://10.98.0.2:8080/").await?;
    wait_for(&app, "http://127.0.0.1:9000/").await?;

    // Outbound: the client's connection is redirected, and the proxy's
    // own connection to the peer is not (or it would loop).
    assert_eq!(curl(&app, "http://10.98.0.2:8080/")?, "remote");
    // Inbound: redirected to the proxy, which forwards to the address the
    // client dialled.
    assert_eq!(curl(&peer, "http://10.98.0.1:9000/")?, "local");
    // A server bound to loopback is not exposed by the proxy.
    assert!(curl(&peer, "http://10.98.0.1:9001/").is_err());
    // The admin port is never captured.
    assert!(curl(&peer, "http://10.98.0.1:4191/ready").is_ok());
    // Loopback is never captured.
    assert_eq!(curl(&app, "http://127.0.0.1:9001/")?, "private");

    assert_one(
        &app,
        "request_total",
        &[("direction", "outbound"), ("authority", "10.98.0.2:8080")],
    )?;
    assert_one(
        &app,
        "response_total",
        &[
            ("direction", "inbound"),
            ("authority", "10.98.0.1:9000"),
            ("status_code", "200"),
        ],
    )?;
    // The loopback-only server was tried at the address dialled, and
    // refused.
    assert_one(
        &app,
        "response_total",
        &[
            ("direction", "inbound"),
            ("authority", "10.98.0.1:9001"),
            ("error", "connect"),
        ],
    )?;

    app.exec(&[&weft()?, "init", "--remove"])?;
    assert!(!app.nat_rules()?.contains("WEFT"));
    Ok(())
}

/// The mesh with no configuration in the applications: the control plane
/// knows `10.98.0.2:8080` as an endpoint of `api.demo` with that identity,
/// so the `app` host's proxy, seeing a redirected connection to it, uses
/// mutual TLS, and the `peer` host's inbound proxy (capturing with
/// `--inbound-only`) sees `web.demo` calling. The applications run as
/// nobody; the proxies as root, whose traffic is not captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_traffic_to_a_meshed_peer_is_mutual_tls() -> anyhow::Result<()> {
    use weft_test_support::DestinationsFile;
    use weft_test_support::mesh::MeshCa;

    let app = Netns::new("mtls-app")?;
    let peer = Netns::new("mtls-peer")?;
    app.link(&peer, "10.98.1.1/24", "10.98.1.2/24")?;
    // Unique per test process: two test runs must not share root-side
    // addresses.
    let net = 100 + std::process::id() % 100;
    app.link_root(&format!("10.97.{net}.1/30"), &format!("10.97.{net}.2/30"))?;
    peer.link_root(&format!("10.97.{net}.5/30"), &format!("10.97.{net}.6/30"))?;

    let ca = MeshCa::new()?;
    // The peer's services, as the control plane knows them: addresses and
    // the identity that serves them, nothing about protocols.
    let file = DestinationsFile::from_yaml(
        "destinations:\n\
         \x20 \"api.demo:8080\":\n    endpoints: [{addr: \"10.98.1.2:8080\", identity: api.demo}]\n\
         \x20 \"grpc.demo:9090\":\n    endpoints: [{addr: \"10.98.1.2:9090\", identity: api.demo}]\n\
         \x20 \"echo.demo:7\":\n    endpoints: [{addr: \"10.98.1.2:7\", identity: api.demo}]\n\
         \x20 \"smtp.demo:25\":\n    endpoints: [{addr: \"10.98.1.2:25\", identity: api.demo}]\n",
    )?;
    let control = control_plane(&ca, &file).await?;
    let port = control.grpc.port();

    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let _api = peer.spawn(&[&backend, "--listen", "10.98.1.2:8080", "--name", "api"])?;
    let _grpc = peer.spawn(&[&backend, "--mode", "grpc", "--listen", "10.98.1.2:9090"])?;
    let _echo = peer.spawn(&[&backend, "--mode", "echo", "--listen", "10.98.1.2:7"])?;
    let _smtp = peer.spawn(&[&backend, "--mode", "banner", "--listen", "10.98.1.2:25"])?;

    let mut proxies = Vec::new();
    for (ns, name, control_ip) in [
        (&app, "web.demo", format!("10.97.{net}.2:{port}")),
        (&peer, "api.demo", format!("10.97.{net}.6:{port}")),
    ] {
        let env = meshed_at(&ca, &control, name, control_ip)?;
        proxies.push(host_proxy(ns, None, env).await?);
    }
    let weft = weft()?;
    app.exec(&[&weft, "init", "--proxy-uid", "0"])?;
    peer.exec(&[&weft, "init", "--inbound-only"])?;
    wait_for(&peer, "http://10.98.1.2:8080/").await?;

    // An application that knows nothing of the mesh, dialling an address.
    let as_nobody = |cmd: &[&str]| {
        let mut args = AS_NOBODY.to_vec();
        args.extend(cmd);
        app.exec(&args)
    };
    assert_eq!(
        as_nobody(&["curl", "-fsS", "--max-time", "5", "http://10.98.1.2:8080/"])?,
        "api"
    );
    // A gRPC client (tonic), HTTP/2 on its own connection: 1 is SERVING.
    assert_eq!(
        as_nobody(&[
            &backend,
            "--mode",
            "grpc-check",
            "--listen",
            "10.98.1.2:9090"
        ])?
        .trim(),
        "1"
    );
    // Raw TCP, client first: echoed. (Bytes that cannot start an HTTP
    // request line: a client that might be sending one is given the
    // header read timeout to finish it.)
    let tcp = "exec 3<>/dev/tcp/10.98.1.2/7; printf 'echo: weft' >&3; head -c 10 <&3";
    let echoed = as_nobody(&["timeout", "5", "bash", "-c", tcp]);
    assert_eq!(
        echoed.as_deref().ok(),
        Some("echo: weft"),
        "{echoed:?}\napp:\n{}\npeer:\n{}",
        proxies[0].log(),
        proxies[1].log()
    );
    // Server speaks first: the client says nothing until the banner.
    let banner = "exec 3<>/dev/tcp/10.98.1.2/25; head -c 21 <&3";
    assert_eq!(
        as_nobody(&["timeout", "5", "bash", "-c", banner])?,
        "220 weft-test ready\r\n"
    );

    // The HTTP request and the gRPC call.
    assert_count(
        &peer,
        "request_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("client_id", "web.demo"),
        ],
        2,
    )?;
    assert_count(
        &app,
        "response_total",
        &[
            ("direction", "outbound"),
            ("tls", "true"),
            ("server_id", "api.demo"),
            ("status_code", "200"),
        ],
        2,
    )?;
    // Every connection that reached the peer's inbound proxy (HTTP/1.1,
    // gRPC, echo, banner) was mutual TLS from web.demo; none was plain.
    let m =
        weft_test_support::metrics::Scrape::parse(curl(&peer, "http://127.0.0.1:4191/metrics")?)?;
    let inbound = |tls: &str| {
        m.sum(
            "tcp_open_total",
            &[("direction", "inbound"), ("peer", "src"), ("tls", tls)],
        )
    };
    assert_eq!(inbound("no_identity"), 0.0, "{}", m.text);
    assert!(
        m.sum(
            "tcp_open_total",
            &[
                ("direction", "inbound"),
                ("peer", "src"),
                ("tls", "true"),
                ("client_id", "web.demo")
            ]
        ) >= 4.0,
        "{}",
        m.text
    );
    let m =
        weft_test_support::metrics::Scrape::parse(curl(&app, "http://127.0.0.1:4191/metrics")?)?;
    assert!(
        m.sum(
            "tcp_open_total",
            &[
                ("direction", "outbound"),
                ("peer", "dst"),
                ("tls", "true"),
                ("server_id", "api.demo")
            ]
        ) >= 4.0,
        "{}",
        m.text
    );
    Ok(())
}

/// Per-node mode (a DaemonSet's proxy): one proxy on `node` serves
/// workloads `web` (10.98.4.5), `batch` (10.98.4.6) and `cron` (the
/// node's own address, run as uid 2301), each certified as itself. Outbound, each workload's requests reach the peer as mutual
/// TLS from its own identity; inbound, the peer's proxy dialling each
/// workload is answered with that workload's certificate (SNI). Metrics
/// carry the `workload` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_proxy_per_node_serves_each_workload_as_its_own_identity() -> anyhow::Result<()> {
    use weft_test_support::DestinationsFile;
    use weft_test_support::mesh::MeshCa;

    let node = Netns::new("node")?;
    let peer = Netns::new("node-peer")?;
    node.link(&peer, "10.98.3.1/24", "10.98.3.2/24")?;
    // The workloads' addresses live on the node; the peer routes to them
    // through it.
    for ip in ["10.98.4.5/32", "10.98.4.6/32"] {
        node.exec(&["ip", "addr", "add", ip, "dev", "lo"])?;
    }
    peer.exec(&["ip", "route", "add", "10.98.4.0/24", "via", "10.98.3.1"])?;
    let net = 100 + (std::process::id() + 50) % 100;
    node.link_root(&format!("10.96.{net}.1/30"), &format!("10.96.{net}.2/30"))?;
    peer.link_root(&format!("10.96.{net}.5/30"), &format!("10.96.{net}.6/30"))?;

    let ca = MeshCa::new()?;
    let file = DestinationsFile::from_yaml(
        "destinations:\n\
         \x20 \"api.demo:8080\":\n    endpoints: [{addr: \"10.98.3.2:8080\", identity: api.demo}]\n\
         \x20 \"web.node:8080\":\n    endpoints: [{addr: \"10.98.4.5:8080\", identity: web.demo}]\n\
         \x20 \"batch.node:8080\":\n    endpoints: [{addr: \"10.98.4.6:8080\", identity: batch.demo}]\n",
    )?;
    let control = control_plane(&ca, &file).await?;
    let port = control.grpc.port();

    let backend = workspace_binary("weft-test-backend")?;
    let backend = backend.to_string_lossy().into_owned();
    let _api = peer.spawn(&[&backend, "--listen", "10.98.3.2:8080", "--name", "api"])?;
    let _web = node.spawn(&[&backend, "--listen", "10.98.4.5:8080", "--name", "web"])?;
    let _batch = node.spawn(&[&backend, "--listen", "10.98.4.6:8080", "--name", "batch"])?;

    let dir = tempfile::tempdir()?;
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(
        &workloads,
        format!(
            "workloads:\n\
             \x20 - {{name: web, identity: web.demo, token_file: {}, addresses: [10.98.4.5]}}\n\
             \x20 - {{name: batch, identity: batch.demo, token_file: {}, addresses: [10.98.4.6]}}\n\
             \x20 - {{name: cron, identity: cron.demo, token_file: {}, uids: [2301]}}\n",
            ca.token_file("web.demo")?,
            ca.token_file("batch.demo")?,
            ca.token_file("cron.demo")?
        ),
    )?;
    let node_env = per_node(&ca, format!("10.96.{net}.2:{port}"), &workloads);
    let peer_env = meshed_at(&ca, &control, "api.demo", format!("10.96.{net}.6:{port}"))?;
    let mut proxies = [
        host_proxy(&node, None, node_env).await?,
        host_proxy(&peer, None, peer_env).await?,
    ];
    let weft = weft()?;
    node.exec(&[&weft, "init", "--inbound-only"])?;
    peer.exec(&[&weft, "init", "--inbound-only"])?;
    wait_for(&peer, "http://10.98.3.2:8080/").await?;

    // Outbound: each workload's client uses the node's proxy.
    for (src, ns_name) in [("10.98.4.5", "web"), ("10.98.4.6", "batch")] {
        let said = node.exec(&[
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "--interface",
            src,
            "-x",
            "http://10.98.3.1:4140",
            "http://api.demo:8080/",
        ]);
        assert_eq!(
            said.as_deref().ok(),
            Some("api"),
            "{ns_name}: {said:?}\nnode:\n{}\npeer:\n{}",
            proxies[0].log(),
            proxies[1].log()
        );
    }
    // A workload that shares the node's address, told apart by the user
    // that runs it.
    let mut as_cron = vec![
        "setpriv",
        "--reuid",
        "2301",
        "--regid",
        "2301",
        "--clear-groups",
    ];
    as_cron.extend([
        "curl",
        "-fsS",
        "--max-time",
        "5",
        "-x",
        "http://10.98.3.1:4140",
        "http://api.demo:8080/",
    ]);
    assert_eq!(node.exec(&as_cron)?, "api");
    for client in ["web.demo", "batch.demo", "cron.demo"] {
        assert_one(
            &peer,
            "request_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("client_id", client),
            ],
        )?;
    }
    for workload in ["web", "batch"] {
        assert_one(
            &node,
            "request_total",
            &[("direction", "outbound"), ("workload", workload)],
        )?;
        // Its connections too: from it, and to the peer as it.
        assert_one(
            &node,
            "tcp_open_total",
            &[
                ("direction", "outbound"),
                ("peer", "src"),
                ("workload", workload),
            ],
        )?;
        assert_one(
            &node,
            "tcp_open_total",
            &[
                ("direction", "outbound"),
                ("peer", "dst"),
                ("workload", workload),
                ("tls", "true"),
                ("server_id", "api.demo"),
            ],
        )?;
    }

    // Inbound: the peer dials each workload, which must prove its own name.
    for (name, body) in [("web.node:8080", "web"), ("batch.node:8080", "batch")] {
        let said = peer.exec(&[
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "-x",
            "http://127.0.0.1:4140",
            &format!("http://{name}/"),
        ]);
        assert_eq!(
            said.as_deref().ok(),
            Some(body),
            "{name}: {said:?}\nnode:\n{}\npeer:\n{}",
            proxies[0].log(),
            proxies[1].log()
        );
    }
    for server in ["web.demo", "batch.demo"] {
        assert_one(
            &peer,
            "response_total",
            &[
                ("direction", "outbound"),
                ("tls", "true"),
                ("server_id", server),
                ("status_code", "200"),
            ],
        )?;
    }
    for workload in ["web", "batch"] {
        assert_one(
            &node,
            "request_total",
            &[
                ("direction", "inbound"),
                ("workload", workload),
                ("tls", "true"),
                ("client_id", "api.demo"),
            ],
        )?;
    }

    // Failover: another node's proxy lists `web` too (same identity, same
    // address). With the node's own proxy down, web's client is refused
    // there and goes to the neighbour's, still as web.demo.
    let node2 = Netns::new("node2")?;
    node.link(&node2, "10.98.6.1/24", "10.98.6.2/24")?;
    node2.link(&peer, "10.98.5.1/24", "10.98.5.2/24")?;
    node2.exec(&["ip", "route", "add", "10.98.4.0/24", "via", "10.98.6.1"])?;
    node2.exec(&["ip", "route", "add", "10.98.3.0/24", "via", "10.98.5.2"])?;
    node2.link_root(&format!("10.96.{net}.9/30"), &format!("10.96.{net}.10/30"))?;
    let web_only = dir.path().join("web-only.yaml");
    std::fs::write(
        &web_only,
        format!(
            "workloads:\n  - {{name: web, identity: web.demo, token_file: {}, addresses: [10.98.4.5]}}\n",
            ca.token_file("web.demo")?
        ),
    )?;
    let neighbour_env = per_node(&ca, format!("10.96.{net}.10:{port}"), &web_only);
    let _neighbour = host_proxy(&node2, None, neighbour_env).await?;
    proxies[0].terminate()?;
    proxies[0].wait(Duration::from_secs(10)).await?;
    let through = |proxy: &str| {
        node.exec(&[
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "--interface",
            "10.98.4.5",
            "-x",
            proxy,
            "http://api.demo:8080/",
        ])
    };
    let own = through("http://10.98.3.1:4140");
    assert!(own.is_err(), "the node's proxy is down: {own:?}");
    assert_eq!(through("http://10.98.6.2:4140")?, "api");
    assert_count(
        &peer,
        "request_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("client_id", "web.demo"),
        ],
        2,
    )?;
    Ok(())
}
