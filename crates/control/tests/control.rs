//! The real weft-control binary, driven through the Linkerd proxy API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{GetDestination, Update, WeightedAddr, update};
use linkerd2_proxy_api::identity::CertifyRequest;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use tonic::Streaming;
use weft_control::destination::apply_update;
use weft_identity::{CaDir, CertInfo, Name, TokenKey, new_csr, verify_signed_by};
use weft_test_support::control::Control;
use weft_test_support::{DestinationsFile, workspace_binary};

const DESTINATIONS: &str = r#"
destinations:
  "web.demo:8080":
    endpoints:
      - addr: 127.0.0.1:18081
        identity: web.demo
      - addr: 127.0.0.1:18082
        weight: 3
        identity: web.demo
  "db.demo:5432":
    opaque: true
    endpoints: []
"#;

fn get(path: &str) -> GetDestination {
    GetDestination {
        scheme: "k8s".into(),
        path: path.into(),
        ..Default::default()
    }
}

async fn next(stream: &mut Streaming<Update>) -> anyhow::Result<Update> {
    tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A control plane serving `DESTINATIONS` from a file.
async fn with_destinations() -> anyhow::Result<(DestinationsFile, Control)> {
    let file = DestinationsFile::from_yaml(DESTINATIONS)?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &["--destinations", &file.path_str()],
    )
    .await?;
    Ok((file, control))
}

#[tokio::test]
async fn get_streams_the_file_and_its_edits() -> anyhow::Result<()> {
    let (file, control) = with_destinations().await?;
    let mut client = DestinationClient::connect(control.url()).await?;

    let mut web = client.get(get("web.demo:8080")).await?.into_inner();
    let mut state: BTreeMap<SocketAddr, WeightedAddr> = BTreeMap::new();
    apply_update(&mut state, &next(&mut web).await?);
    assert_eq!(
        state.keys().copied().collect::<Vec<_>>(),
        [addr(18081), addr(18082)]
    );
    assert_eq!(state[&addr(18082)].weight, 3);
    let tls = state[&addr(18081)]
        .tls_identity
        .as_ref()
        .and_then(|t| t.server_name.as_ref());
    assert_eq!(tls.map(|n| n.name.as_str()), Some("web.demo"));

    // An unknown name and a known empty one: told apart, as the API asks.
    let mut unknown = client.get(get("nowhere.demo:80")).await?.into_inner();
    match next(&mut unknown).await?.update {
        Some(update::Update::NoEndpoints(n)) => assert!(!n.exists),
        other => anyhow::bail!("expected no_endpoints, got {other:?}"),
    }
    let mut db = client.get(get("db.demo:5432")).await?.into_inner();
    match next(&mut db).await?.update {
        Some(update::Update::NoEndpoints(n)) => assert!(n.exists),
        other => anyhow::bail!("expected no_endpoints, got {other:?}"),
    }

    // An edit reaches open streams as a difference, within a second.
    let started = std::time::Instant::now();
    file.write_yaml(&DESTINATIONS.replace(
        "      - addr: 127.0.0.1:18081\n        identity: web.demo\n",
        "      - addr: 127.0.0.1:18083\n",
    ))?;
    while state.keys().copied().collect::<Vec<_>>() != [addr(18082), addr(18083)] {
        apply_update(&mut state, &next(&mut web).await?);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "edit took {took:?}");
    assert!(
        state[&addr(18083)].tls_identity.is_none(),
        "unmeshed endpoint"
    );

    let err = client.get(get("no-port.demo")).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("host:port"), "{}", err.message());
    Ok(())
}

#[tokio::test]
async fn get_profile_names_the_service() -> anyhow::Result<()> {
    let (_file, control) = with_destinations().await?;
    let mut client = DestinationClient::connect(control.url()).await?;
    let mut web = client.get_profile(get("web.demo:8080")).await?.into_inner();
    let p = web
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no profile"))?;
    assert_eq!(p.fully_qualified_name, "web.demo");
    assert!(!p.opaque_protocol);
    let budget = p.retry_budget.ok_or_else(|| anyhow::anyhow!("no budget"))?;
    assert!((budget.retry_ratio - 0.2).abs() < 1e-6);
    let mut db = client.get_profile(get("db.demo:5432")).await?.into_inner();
    let p = db
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no profile"))?;
    assert!(p.opaque_protocol);
    let mut unknown = client.get_profile(get("x.demo:1")).await?.into_inner();
    let p = unknown
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no profile"))?;
    assert_eq!(p.fully_qualified_name, "");
    Ok(())
}

struct Ca {
    _tmp: tempfile::TempDir,
    dir: CaDir,
    tokens: TokenKey,
}

fn ca() -> anyhow::Result<Ca> {
    let tmp = tempfile::tempdir()?;
    let dir = CaDir::new(tmp.path().join("ca"));
    dir.init(&"weft.local".parse()?, false)?;
    let tokens = TokenKey::from_hex(&std::fs::read_to_string(dir.token_key())?)?;
    Ok(Ca {
        _tmp: tmp,
        dir,
        tokens,
    })
}

fn certify_request(
    ca: &Ca,
    identity: &str,
    token_for: &str,
    csr_for: &str,
) -> anyhow::Result<CertifyRequest> {
    let token = ca.tokens.mint(
        &token_for.parse()?,
        Duration::from_secs(600),
        SystemTime::now(),
    );
    let (_key, csr) = new_csr(&csr_for.parse::<Name>()?)?;
    Ok(CertifyRequest {
        identity: identity.into(),
        token: token.into_bytes(),
        certificate_signing_request: csr,
    })
}

#[tokio::test]
async fn certify_signs_only_what_the_token_allows() -> anyhow::Result<()> {
    let ca = ca()?;
    let dir = ca
        .dir
        .dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("path"))?
        .to_string();
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &["--identity-dir", &dir, "--leaf-lifetime", "1h"],
    )
    .await?;
    let mut client = IdentityClient::connect(control.url()).await?;

    let rsp = client
        .certify(certify_request(&ca, "web.demo", "web.demo", "web.demo")?)
        .await?
        .into_inner();
    let issuer = &rsp.intermediate_certificates[0];
    verify_signed_by(&rsp.leaf_certificate, issuer).map_err(anyhow::Error::msg)?;
    let anchor = weft_identity::read_pem_certs(&ca.dir.anchor_cert())?;
    verify_signed_by(issuer, &anchor[0]).map_err(anyhow::Error::msg)?;
    let leaf = CertInfo::parse(&rsp.leaf_certificate).map_err(anyhow::Error::msg)?;
    assert_eq!(leaf.dns_names, ["web.demo"]);
    let valid_until = rsp
        .valid_until
        .ok_or_else(|| anyhow::anyhow!("no valid_until"))?;
    let left = valid_until.seconds
        - SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs() as i64;
    assert!((3500..=3600).contains(&left), "leaf lives {left}s");

    // A token for someone else, a CSR for someone else, garbage: refused,
    // each saying why.
    let err = client
        .certify(certify_request(&ca, "web.demo", "api.demo", "web.demo")?)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("minted for api.demo"),
        "{}",
        err.message()
    );
    let err = client
        .certify(certify_request(&ca, "web.demo", "web.demo", "api.demo")?)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("must name exactly web.demo"),
        "{}",
        err.message()
    );
    let mut forged = certify_request(&ca, "web.demo", "web.demo", "web.demo")?;
    forged.token = b"weft1.99999999999.web.demo.00".to_vec();
    let err = client.certify(forged).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("signature"), "{}", err.message());
    let err = client
        .certify(certify_request(&ca, "Web", "web.demo", "web.demo")?)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let log = control.process.log();
    assert!(log.contains("certify refused"), "{log}");
    let metrics = weft_test_support::metrics::get_text(control.admin, "/metrics").await?;
    assert!(
        metrics.contains("identity_certify_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("identity_certify_total{result=\"denied\"} 2"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_rotated_issuer_signs_the_next_leaf() -> anyhow::Result<()> {
    let ca = ca()?;
    let dir = ca
        .dir
        .dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("path"))?
        .to_string();
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &["--identity-dir", &dir],
    )
    .await?;
    let mut client = IdentityClient::connect(control.url()).await?;
    let before = client
        .certify(certify_request(&ca, "web.demo", "web.demo", "web.demo")?)
        .await?
        .into_inner();
    ca.dir.rotate_issuer(&"weft.local".parse()?)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let after = client
            .certify(certify_request(&ca, "web.demo", "web.demo", "web.demo")?)
            .await?
            .into_inner();
        if after.intermediate_certificates != before.intermediate_certificates {
            verify_signed_by(&after.leaf_certificate, &after.intermediate_certificates[0])
                .map_err(anyhow::Error::msg)?;
            let anchor = weft_identity::read_pem_certs(&ca.dir.anchor_cert())?;
            verify_signed_by(&after.intermediate_certificates[0], &anchor[0])
                .map_err(anyhow::Error::msg)?;
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "issuer never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_bad_value_names_its_variable() -> anyhow::Result<()> {
    let out = tokio::process::Command::new(workspace_binary("weft-control")?)
        .env_clear()
        .env("WEFT_CONTROL_LEAF_LIFETIME", "5s")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("WEFT_CONTROL_LEAF_LIFETIME=\"5s\""),
        "{stderr}"
    );
    assert!(stderr.contains("at least 1m"), "{stderr}");
    Ok(())
}
