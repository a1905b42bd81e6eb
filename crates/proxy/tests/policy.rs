//! Traffic policy against real peers: the breaker, timeouts, routes.

use std::time::{Duration, Instant};

use weft_test_support::backend::{Backend, Behaviour};
use weft_test_support::client::{self, get, text};
use weft_test_support::control::Control;
use weft_test_support::mesh::{MeshCa, meshed};
use weft_test_support::proxy::Proxy;
use weft_test_support::{DestinationsFile, workspace_binary};

const PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// Where the proxy's policy comes from: the same YAML either way.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// The proxy reads the destinations file itself.
    File,
    /// weft-control serves the file; the proxy follows Destination `Get`
    /// and OutboundPolicies `Watch`.
    Control,
}

/// The destinations file, and the control plane serving it (if any).
struct Dests {
    file: DestinationsFile,
    _control: Option<(MeshCa, Control)>,
}

impl Dests {
    fn write_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        self.file.write_yaml(yaml)
    }
}

async fn proxy_in(mode: Mode, yaml: &str) -> anyhow::Result<(Dests, Proxy)> {
    let file = DestinationsFile::from_yaml(yaml)?;
    match mode {
        Mode::File => {
            let proxy = Proxy::start(
                PROXY.as_ref(),
                &[("WEFT_PROXY_DESTINATIONS", &file.path_str())],
            )
            .await?;
            Ok((
                Dests {
                    file,
                    _control: None,
                },
                proxy,
            ))
        }
        Mode::Control => {
            let ca = MeshCa::new()?;
            let control = Control::start(
                &workspace_binary("weft-control")?,
                &ca,
                &["--destinations", &file.path_str()],
            )
            .await?;
            let env = meshed(&ca, &control, "web.demo")?;
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let proxy = Proxy::start(PROXY.as_ref(), &env).await?;
            Ok((
                Dests {
                    file,
                    _control: Some((ca, control)),
                },
                proxy,
            ))
        }
    }
}

/// A test run with the policy from the file and from the control plane:
/// both must behave the same.
macro_rules! in_both_modes {
    ($($body:ident => $file:ident, $control:ident;)*) => {$(
        #[tokio::test]
        async fn $file() -> anyhow::Result<()> {
            $body(Mode::File).await
        }

        #[tokio::test]
        async fn $control() -> anyhow::Result<()> {
            $body(Mode::Control).await
        }
    )*};
}

in_both_modes! {
    a_fast_failing_endpoint_is_not_preferred_by_default_in
        => a_fast_failing_endpoint_is_not_preferred_by_default,
           from_control_a_fast_failing_endpoint_is_not_preferred;
    a_destination_timeout_answers_504_in_time_in
        => a_destination_timeout_answers_504_in_time,
           from_control_a_destination_timeout_answers_504_in_time;
    header_routes_and_weighted_splits_in
        => header_routes_and_weighted_splits,
           from_control_header_routes_and_weighted_splits;
    unmatched_requests_404_and_route_timeouts_override_in
        => unmatched_requests_404_and_route_timeouts_override,
           from_control_unmatched_requests_404_and_route_timeouts_override;
    a_split_edit_applies_within_a_second_with_no_failures_in
        => a_split_edit_applies_within_a_second_with_no_failures,
           from_control_a_split_edit_applies_within_a_second_with_no_failures;
    retries_repeat_only_what_is_safe_to_repeat_in
        => retries_repeat_only_what_is_safe_to_repeat,
           from_control_retries_repeat_only_what_is_safe_to_repeat;
    with_retries_a_dead_replica_fails_no_idempotent_request_in
        => with_retries_a_dead_replica_fails_no_idempotent_request,
           from_control_with_retries_a_dead_replica_fails_no_idempotent_request;
    an_exhausted_budget_stops_retries_in
        => an_exhausted_budget_stops_retries,
           from_control_an_exhausted_budget_stops_retries;
    hedging_cuts_the_tail_in
        => hedging_cuts_the_tail,
           from_control_hedging_cuts_the_tail;
    ejections_are_counted_and_the_set_fails_open_in
        => ejections_are_counted_and_the_set_fails_open,
           from_control_ejections_are_counted_and_the_set_fails_open;
}

/// Sends `n` GETs one after another on one connection; returns each
/// status and `x-backend`.
async fn send_many(
    proxy: &Proxy,
    authority: &str,
    n: usize,
    header: Option<(&str, &str)>,
) -> anyhow::Result<Vec<(u16, String)>> {
    let mut send = client::http1(proxy.outbound).await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        send.ready().await?;
        let mut req = get(authority, "/")?;
        if let Some((k, v)) = header {
            req.headers_mut()
                .insert(http::HeaderName::from_bytes(k.as_bytes())?, v.parse()?);
        }
        let (status, headers, _) = text(send.send_request(req).await?).await?;
        let backend = headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        out.push((status.as_u16(), backend));
    }
    Ok(out)
}

/// One replica of three answers every request with a fast 500. Without
/// any configuration it is not preferred for being fast: each failure
/// counts as a 1 s response, so the balancer leaves it after its first
/// (the breaker would eject it after 7; `ejections_are_counted...` shows
/// that). Round robin would succeed 67 % of the time.
async fn a_fast_failing_endpoint_is_not_preferred_by_default_in(mode: Mode) -> anyhow::Result<()> {
    let any = "127.0.0.1:0".parse()?;
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let bad = Backend::start_with(
        "bad",
        any,
        Behaviour {
            delay: Duration::ZERO,
            fail_every: Some(1),
            slow: None,
        },
    )
    .await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints:\n      - addr: {}\n      - addr: {}\n      - addr: {}\n",
        a.addr, b.addr, bad.addr
    ))
    .await?;
    let results = send_many(&proxy, "api.test:80", 600, None).await?;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    eprintln!(
        "{ok} of 600 succeeded; the failing replica saw {}",
        bad.hits()
    );
    assert!(ok >= 582, "{ok} of 600 succeeded (97 % is 582)");
    assert_eq!(ok as u64 + bad.hits(), 600);
    Ok(())
}

/// A destination timeout answers 504 within the timeout (+50 ms), with a
/// reason, and cancels the upstream request.
async fn a_destination_timeout_answers_504_in_time_in(mode: Mode) -> anyhow::Result<()> {
    let slow =
        Backend::start_with_delay("slow", "127.0.0.1:0".parse()?, Duration::from_secs(3)).await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    timeout: 500ms\n    endpoints:\n      - addr: {}\n",
        slow.addr
    ))
    .await?;
    let started = Instant::now();
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let (status, headers, _) = text(send.send_request(get("api.test:80", "/")?).await?).await?;
    let took = started.elapsed();
    assert_eq!(status, 504);
    assert!(took < Duration::from_millis(600), "took {took:?}");
    let reason = headers["l5d-proxy-error"].to_str()?;
    assert!(reason.contains("500ms"), "{reason}");
    // The upstream request was cancelled, not left running.
    let deadline = Instant::now() + Duration::from_secs(2);
    while slow.cancelled() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "upstream request not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A route matching a header sends those requests to another destination;
/// a weighted split sends 10 % to the canary, within ±4 points over 2,000
/// requests; a request matching no route is refused with 404.
async fn header_routes_and_weighted_splits_in(mode: Mode) -> anyhow::Result<()> {
    let stable = Backend::start("stable").await?;
    let canary = Backend::start("canary").await?;
    let (_dests, proxy) = proxy_in(
        mode,
        &format!(
            r#"destinations:
  "api.test:80":
    endpoints: [{{addr: {stable}}}]
    routes:
      - name: canary-header
        match: {{headers: {{x-canary: "1"}}}}
        backends: [{{destination: "api-v2.test:80"}}]
      - name: split
        match: {{path_prefix: /}}
        backends:
          - {{destination: "api.test:80", weight: 90}}
          - {{destination: "api-v2.test:80", weight: 10}}
  "api-v2.test:80":
    endpoints: [{{addr: {canary}}}]
"#,
            stable = stable.addr,
            canary = canary.addr
        ),
    )
    .await?;
    let flagged = send_many(&proxy, "api.test:80", 50, Some(("x-canary", "1"))).await?;
    assert!(
        flagged.iter().all(|(s, b)| *s == 200 && b == "canary"),
        "{flagged:?}"
    );
    let split = send_many(&proxy, "api.test:80", 2_000, None).await?;
    assert!(split.iter().all(|(s, _)| *s == 200));
    let to_canary = split.iter().filter(|(_, b)| b == "canary").count();
    let share = to_canary as f64 / 2_000.0;
    assert!((0.06..=0.14).contains(&share), "canary share {share}");
    // Metrics say which route each request took, under the logical name.
    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    let on = |route: &str| {
        m.sum(
            "request_total",
            &[("authority", "api.test:80"), ("route", route)],
        )
    };
    assert_eq!(
        (on("canary-header"), on("split")),
        (50.0, 2_000.0),
        "{}",
        m.text
    );
    Ok(())
}

/// With routes, a request none of them matches gets 404 and a reason; a
/// route's own timeout overrides the destination's.
async fn unmatched_requests_404_and_route_timeouts_override_in(mode: Mode) -> anyhow::Result<()> {
    let slow =
        Backend::start_with_delay("slow", "127.0.0.1:0".parse()?, Duration::from_millis(400))
            .await?;
    let (_dests, proxy) = proxy_in(
        mode,
        &format!(
            r#"destinations:
  "api.test:80":
    endpoints: [{{addr: {slow}}}]
    timeout: 2s
    routes:
      - name: fast-only
        match: {{path_prefix: /fast}}
        backends: [{{destination: "api.test:80"}}]
        timeout: 100ms
      - name: rest
        match: {{path_prefix: /api, method: GET}}
        backends: [{{destination: "api.test:80"}}]
"#,
            slow = slow.addr
        ),
    )
    .await?;
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let (status, headers, _) =
        text(send.send_request(get("api.test:80", "/other")?).await?).await?;
    assert_eq!(status, 404);
    assert!(headers["l5d-proxy-error"].to_str()?.contains("no route"));
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let started = Instant::now();
    let (status, _, _) = text(send.send_request(get("api.test:80", "/fast/x")?).await?).await?;
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_millis(300));
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let (status, _, _) = text(send.send_request(get("api.test:80", "/api/x")?).await?).await?;
    assert_eq!(status, 200, "the destination's 2 s applies on other routes");
    Ok(())
}

/// Shifting a split by editing the file takes effect within a second and
/// fails no request on the way.
async fn a_split_edit_applies_within_a_second_with_no_failures_in(
    mode: Mode,
) -> anyhow::Result<()> {
    let stable = Backend::start("stable").await?;
    let canary = Backend::start("canary").await?;
    let yaml = |stable_weight: u32, canary_weight: u32| {
        format!(
            r#"destinations:
  "api.test:80":
    endpoints: [{{addr: {stable}}}]
    routes:
      - name: split
        backends:
          - {{destination: "api.test:80", weight: {stable_weight}}}
          - {{destination: "api-v2.test:80", weight: {canary_weight}}}
  "api-v2.test:80":
    endpoints: [{{addr: {canary}}}]
"#,
            stable = stable.addr,
            canary = canary.addr
        )
    };
    let (dests, proxy) = proxy_in(mode, &yaml(100, 1)).await?;
    let mut send = client::http1(proxy.outbound).await?;
    let mut failed = 0;
    for _ in 0..50 {
        send.ready().await?;
        let (status, _, _) = text(send.send_request(get("api.test:80", "/")?).await?).await?;
        failed += usize::from(status != 200);
    }
    dests.write_yaml(&yaml(1, 100))?;
    let changed = Instant::now();
    let mut canary_run = 0;
    while canary_run < 20 {
        anyhow::ensure!(
            changed.elapsed() < Duration::from_secs(3),
            "the split never moved"
        );
        send.ready().await?;
        let (status, headers, _) = text(send.send_request(get("api.test:80", "/")?).await?).await?;
        failed += usize::from(status != 200);
        if headers.get("x-backend").and_then(|v| v.to_str().ok()) == Some("canary") {
            canary_run += 1;
        } else {
            canary_run = 0;
        }
    }
    // 20 canary answers in a row happen by chance at 99 % only after the
    // edit; allow for the run itself.
    assert!(
        changed.elapsed() < Duration::from_millis(1_500),
        "took {:?}",
        changed.elapsed()
    );
    assert_eq!(failed, 0);
    Ok(())
}

fn failing(every: u64) -> Behaviour {
    Behaviour {
        delay: Duration::ZERO,
        fail_every: Some(every),
        slow: None,
    }
}

async fn request(
    proxy: &Proxy,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, bytes::Bytes)> {
    use http_body_util::BodyExt;
    let mut send = client::http1(proxy.outbound).await?;
    send.ready().await?;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://api.test:80{path}"))
        .header("host", "api.test:80")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status().as_u16();
    Ok((status, rsp.into_body().collect().await?.to_bytes()))
}

/// Every other response of the only replica is a 500. Idempotent requests
/// are retried (their bodies replayed, including the part the failed try
/// never read) and all succeed; a POST is never retried; a body over
/// 64 KiB is not kept, so its request is not retried either.
async fn retries_repeat_only_what_is_safe_to_repeat_in(mode: Mode) -> anyhow::Result<()> {
    let flaky = Backend::start_with("flaky", "127.0.0.1:0".parse()?, failing(2)).await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints: [{{addr: {}}}]\n    breaker: {{consecutive_failures: 0}}\n    retry: {{attempts: 2}}\n",
        flaky.addr
    ))
    .await?;
    let gets = send_many(&proxy, "api.test:80", 100, None).await?;
    assert!(gets.iter().all(|(s, _)| *s == 200), "{gets:?}");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..10 {
        let (status, echoed) = request(&proxy, http::Method::PUT, "/echo", payload.clone()).await?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&echoed));
        assert_eq!(
            echoed.as_ref(),
            &payload[..],
            "a replayed body must arrive whole"
        );
    }
    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    let retried = m.sum("retry_requests_total", &[("authority", "api.test:80")]);
    // The retry takes the replica's next (good) answer, so every request
    // after the first meets a failure once: about one retry per request
    // (a few more where the replica closed mid-body, a reset).
    assert!(
        (100.0..=130.0).contains(&retried),
        "{retried} retries\n{}",
        m.text
    );

    let mut failed_posts = 0;
    for _ in 0..10 {
        let (status, _) = request(&proxy, http::Method::POST, "/", Vec::new()).await?;
        failed_posts += usize::from(status == 500);
    }
    assert_eq!(failed_posts, 5, "POSTs are not retried");
    let big = vec![7u8; 100 * 1024];
    let mut failed_big = 0;
    for _ in 0..4 {
        let (status, _) = request(&proxy, http::Method::PUT, "/count", big.clone()).await?;
        failed_big += usize::from(status != 200);
    }
    assert_eq!(failed_big, 2, "bodies over 64 KiB are not kept for a retry");
    Ok(())
}

/// One replica of three always fails; with retries not one GET fails.
async fn with_retries_a_dead_replica_fails_no_idempotent_request_in(
    mode: Mode,
) -> anyhow::Result<()> {
    let any = "127.0.0.1:0".parse()?;
    let a = Backend::start("a").await?;
    let b = Backend::start("b").await?;
    let bad = Backend::start_with("bad", any, failing(1)).await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints: [{{addr: {}}}, {{addr: {}}}, {{addr: {}}}]\n    retry: {{attempts: 2}}\n",
        a.addr, b.addr, bad.addr
    ))
    .await?;
    let results = send_many(&proxy, "api.test:80", 600, None).await?;
    let failed = results.iter().filter(|(s, _)| *s != 200).count();
    assert_eq!(failed, 0, "the failing replica saw {}", bad.hits());
    Ok(())
}

/// A budget of no share and 1 retry per second allows 10 retries in the
/// 10 s window, however many requests fail.
async fn an_exhausted_budget_stops_retries_in(mode: Mode) -> anyhow::Result<()> {
    let dead = Backend::start_with("dead", "127.0.0.1:0".parse()?, failing(1)).await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints: [{{addr: {}}}]\n    breaker: {{consecutive_failures: 0}}\n    retry: {{attempts: 1, budget: {{ratio: 0, min_per_second: 1}}}}\n",
        dead.addr
    ))
    .await?;
    let results = send_many(&proxy, "api.test:80", 30, None).await?;
    assert!(results.iter().all(|(s, _)| *s == 500));
    assert_eq!(
        dead.hits(),
        30 + 10,
        "30 requests and the 10 retries the budget allows"
    );
    Ok(())
}

/// Every replica answers one request in forty 200 ms late: 2.5 %, so the
/// unhedged p99 is in the tail, while the few a hedge cannot save (before
/// the window has samples, or when both tries are late) stay under 1 %.
/// Hedging after 20 ms sends a second try elsewhere, which is almost never
/// late too: the p99 falls from the tail to about the hedge delay.
async fn hedging_cuts_the_tail_in(mode: Mode) -> anyhow::Result<()> {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let tail = Behaviour {
        slow: Some((40, Duration::from_millis(200))),
        ..Behaviour::default()
    };
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(Backend::start_with(name, any, tail).await?);
    }
    let endpoints: Vec<String> = replicas
        .iter()
        .map(|r| format!("{{addr: {}}}", r.addr))
        .collect();
    let endpoints = endpoints.join(", ");
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints: [{endpoints}]\n    hedge: {{after: 20ms}}\n  \"plain.test:80\":\n    endpoints: [{endpoints}]\n  \"pct.test:80\":\n    endpoints: [{endpoints}]\n    hedge: {{after: p80}}\n"
    ))
    .await?;
    let p99 = async |authority: &str| -> anyhow::Result<Duration> {
        let mut send = client::http1(proxy.outbound).await?;
        let mut took = Vec::new();
        for _ in 0..400 {
            send.ready().await?;
            let started = Instant::now();
            let (status, _, _) = text(send.send_request(get(authority, "/")?).await?).await?;
            anyhow::ensure!(status == 200);
            took.push(started.elapsed());
        }
        took.sort();
        Ok(took[took.len() * 99 / 100])
    };
    let plain = p99("plain.test:80").await?;
    let hedged = p99("api.test:80").await?;
    // After the destination's own recent p80: no delay to tune.
    let at_p80 = p99("pct.test:80").await?;
    eprintln!("p99 without hedging {plain:?}, with {hedged:?}, after p80 {at_p80:?}");
    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    assert!(
        at_p80 < Duration::from_millis(100),
        "p80-hedged p99 {at_p80:?}\n{}",
        m.text
    );
    assert!(
        plain >= Duration::from_millis(150),
        "no tail to cut: {plain:?}"
    );
    assert!(hedged < Duration::from_millis(100), "hedged p99 {hedged:?}");
    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    // About one hedge per late first try (2.5 % of 400).
    assert!(m.sum("hedge_requests_total", &[("authority", "api.test:80")]) >= 5.0);
    Ok(())
}

/// Breaker state is visible: an endpoint failing three times in a row
/// (this destination's setting) is ejected, counted and shown open; with
/// no other endpoint the set fails open and keeps sending to it.
async fn ejections_are_counted_and_the_set_fails_open_in(mode: Mode) -> anyhow::Result<()> {
    let dead = Backend::start_with("dead", "127.0.0.1:0".parse()?, failing(1)).await?;
    let (_dests, proxy) = proxy_in(mode, &format!(
        "destinations:\n  \"api.test:80\":\n    endpoints: [{{addr: {}}}]\n    breaker: {{consecutive_failures: 3, min_open: 30s, max_open: 60s}}\n",
        dead.addr
    ))
    .await?;
    let results = send_many(&proxy, "api.test:80", 10, None).await?;
    assert!(results.iter().all(|(s, _)| *s == 500), "{results:?}");
    assert_eq!(
        dead.hits(),
        10,
        "failing open, every request still tries it"
    );
    let m = weft_test_support::metrics::scrape(proxy.admin).await?;
    let endpoint = dead.addr.to_string();
    let labels = [("direction", "outbound"), ("endpoint", endpoint.as_str())];
    assert_eq!(
        m.sum("endpoint_breaker_ejections_total", &labels),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(m.sum("endpoint_breaker_open", &labels), 1.0, "{}", m.text);
    Ok(())
}
