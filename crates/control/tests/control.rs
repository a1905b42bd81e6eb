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
use weft_identity::{CertInfo, Name, new_csr, verify_signed_by};
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::{DestinationsFile, workspace_binary};

const DESTINATIONS: &str = r#"
destinations:
  "web.demo:8080":
    addresses: ["10.96.0.10:8080"]
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
async fn with_destinations() -> anyhow::Result<(DestinationsFile, MeshCa, Control)> {
    let file = DestinationsFile::from_yaml(DESTINATIONS)?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--destinations", &file.path_str()],
    )
    .await?;
    Ok((file, ca, control))
}

#[tokio::test]
async fn get_streams_the_file_and_its_edits() -> anyhow::Result<()> {
    let (file, _ca, control) = with_destinations().await?;
    let mut client = DestinationClient::new(control.channel().await?);

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

/// A redirected connection's original destination may be a service's own
/// address (a virtual IP): answered with the service's endpoints, and an
/// endpoint's address with that endpoint alone.
#[tokio::test]
async fn an_address_is_answered_with_the_service_or_endpoint_it_belongs_to() -> anyhow::Result<()> {
    let (_file, _ca, control) = with_destinations().await?;
    let mut client = DestinationClient::new(control.channel().await?);
    let mut state: BTreeMap<SocketAddr, WeightedAddr> = BTreeMap::new();
    let mut vip = client.get(get("10.96.0.10:8080")).await?.into_inner();
    apply_update(&mut state, &next(&mut vip).await?);
    assert_eq!(
        state.keys().copied().collect::<Vec<_>>(),
        [addr(18081), addr(18082)]
    );
    let mut state: BTreeMap<SocketAddr, WeightedAddr> = BTreeMap::new();
    let mut one = client.get(get("127.0.0.1:18082")).await?.into_inner();
    apply_update(&mut state, &next(&mut one).await?);
    assert_eq!(state.keys().copied().collect::<Vec<_>>(), [addr(18082)]);
    let id = state[&addr(18082)]
        .tls_identity
        .as_ref()
        .and_then(|t| t.server_name.as_ref());
    assert_eq!(id.map(|n| n.name.as_str()), Some("web.demo"));
    Ok(())
}

#[tokio::test]
async fn get_profile_names_the_service() -> anyhow::Result<()> {
    let (_file, _ca, control) = with_destinations().await?;
    let mut client = DestinationClient::new(control.channel().await?);
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

fn certify_request(
    ca: &MeshCa,
    identity: &str,
    token_for: &str,
    csr_for: &str,
) -> anyhow::Result<CertifyRequest> {
    let token = ca.token(token_for, Duration::from_secs(600))?;
    let (_key, csr) = new_csr(&csr_for.parse::<Name>()?)?;
    Ok(CertifyRequest {
        identity: identity.into(),
        token: token.into_bytes(),
        certificate_signing_request: csr,
    })
}

#[tokio::test]
async fn certify_signs_only_what_the_token_allows() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--leaf-lifetime", "1h"],
    )
    .await?;
    let mut client = IdentityClient::new(control.channel().await?);

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
    let ca = MeshCa::new()?;
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &[]).await?;
    let mut client = IdentityClient::new(control.channel().await?);
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

/// Certifies `name` with a token over an anonymous channel and returns the
/// certificate as a client certificate for the control channel.
async fn certified(
    control: &Control,
    ca: &MeshCa,
    name: &str,
) -> anyhow::Result<std::sync::Arc<weft_channel::CurrentCert>> {
    let (key, csr) = new_csr(&name.parse::<Name>()?)?;
    let mut client = IdentityClient::new(control.channel().await?);
    let rsp = client
        .certify(CertifyRequest {
            identity: name.into(),
            token: ca.token(name, Duration::from_secs(600))?.into_bytes(),
            certificate_signing_request: csr,
        })
        .await?
        .into_inner();
    let mut chain = vec![rsp.leaf_certificate.into()];
    chain.extend(rsp.intermediate_certificates.into_iter().map(Into::into));
    let cert = std::sync::Arc::new(weft_channel::CurrentCert::default());
    cert.set(weft_channel::certified_key(&key, chain)?);
    Ok(cert)
}

fn renewal(identity: &str) -> anyhow::Result<CertifyRequest> {
    let (_key, csr) = new_csr(&identity.parse::<Name>()?)?;
    Ok(CertifyRequest {
        identity: identity.into(),
        token: Vec::new(),
        certificate_signing_request: csr,
    })
}

#[tokio::test]
async fn the_control_channel_is_tls_with_the_control_planes_own_name() -> anyhow::Result<()> {
    let (_file, ca, control) = with_destinations().await?;

    // Plaintext gRPC, as every client spoke before: refused at the
    // handshake, and the refusal is logged.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", control.grpc))?
        .connect()
        .await?;
    let err = DestinationClient::new(plain)
        .get(get("web.demo:8080"))
        .await
        .expect_err("plaintext refused");
    // The TLS alert reads as garbage to an HTTP/2 client.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown
        ),
        "{err}"
    );
    control
        .process
        .wait_for_log("control connection refused", Duration::from_secs(5))
        .await?;

    // A client expecting another name, or trusting another CA, refuses
    // the control plane.
    let roots = weft_channel::load_roots(&control.anchors)?;
    let other_name = weft_channel::ClientTls::new(roots, &"other.weft.local".parse()?, None)?;
    let err = weft_channel::connect(
        &control.grpc.to_string(),
        &other_name,
        Duration::from_secs(5),
    )
    .await
    .expect_err("wrong name");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    let stranger = MeshCa::new()?;
    let roots = weft_channel::load_roots(&stranger.dir.anchor_cert())?;
    let other_ca = weft_channel::ClientTls::new(roots, &weft_channel::DEFAULT_NAME.parse()?, None)?;
    let err = weft_channel::connect(&control.grpc.to_string(), &other_ca, Duration::from_secs(5))
        .await
        .expect_err("unknown issuer");
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    // The right anchors and name: served.
    let mut client = DestinationClient::new(control.channel().await?);
    let mut web = client.get(get("web.demo:8080")).await?.into_inner();
    next(&mut web).await?;
    drop(ca);
    Ok(())
}

#[tokio::test]
async fn renewal_is_proved_by_the_certificate_not_a_token() -> anyhow::Result<()> {
    let ca = MeshCa::new()?;
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &[]).await?;
    let web = certified(&control, &ca, "web.demo").await?;

    // Holding web.demo's certificate, web.demo is renewed with no token.
    let mut as_web = IdentityClient::new(control.channel_as(Some(web)).await?);
    let rsp = as_web.certify(renewal("web.demo")?).await?.into_inner();
    let leaf = CertInfo::parse(&rsp.leaf_certificate).map_err(anyhow::Error::msg)?;
    assert_eq!(leaf.dns_names, ["web.demo"]);
    // ...but that certificate proves nothing about api.demo,
    let err = as_web
        .certify(renewal("api.demo")?)
        .await
        .expect_err("not web's to ask");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("certificate is for web.demo"),
        "{}",
        err.message()
    );
    // and without a certificate, no token means no certificate.
    let mut anonymous = IdentityClient::new(control.channel().await?);
    let err = anonymous
        .certify(renewal("web.demo")?)
        .await
        .expect_err("no proof");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("presented no certificate"),
        "{}",
        err.message()
    );
    let log = control.process.log();
    assert!(
        log.contains("proof=\"certificate\"") || log.contains("proof=certificate"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_single_use_token_is_refused_the_second_time_even_after_a_restart() -> anyhow::Result<()>
{
    let ca = MeshCa::new()?;
    let bin = workspace_binary("weft-control")?;
    let control = Control::start(&bin, &ca, &[]).await?;
    let token = ca.token_once("web.demo", Duration::from_secs(3600))?;
    let request = |token: &str| -> anyhow::Result<CertifyRequest> {
        let (_key, csr) = new_csr(&"web.demo".parse::<Name>()?)?;
        Ok(CertifyRequest {
            identity: "web.demo".into(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
    };
    let mut client = IdentityClient::new(control.channel().await?);
    // A CSR that fails does not use the token up.
    let mut bad = request(&token)?;
    bad.certificate_signing_request = b"garbage".to_vec();
    client.certify(bad).await.expect_err("bad csr");
    client.certify(request(&token)?).await?;
    let err = client
        .certify(request(&token)?)
        .await
        .expect_err("replayed");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("already used"), "{}", err.message());
    // The token never appears in the log: it is a credential.
    let signature = token.rsplit('.').next().unwrap_or_default();
    assert!(!control.process.log().contains(signature));
    drop(client);
    drop(control);

    let restarted = Control::start(&bin, &ca, &[]).await?;
    let mut client = IdentityClient::new(restarted.channel().await?);
    let err = client
        .certify(request(&token)?)
        .await
        .expect_err("replayed after restart");
    assert!(err.message().contains("already used"), "{}", err.message());
    // Another single-use token still works once.
    let fresh = ca.token_once("web.demo", Duration::from_secs(3600))?;
    client.certify(request(&fresh)?).await?;
    Ok(())
}

#[tokio::test]
async fn one_client_follows_a_bounded_number_of_names() -> anyhow::Result<()> {
    let file = DestinationsFile::from_yaml(DESTINATIONS)?;
    let ca = MeshCa::new()?;
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &[
            "--destinations",
            &file.path_str(),
            "--max-names-per-client",
            "3",
        ],
    )
    .await?;
    let mut client = DestinationClient::new(control.channel().await?);
    let mut held = Vec::new();
    for n in 0..3 {
        let mut s = client
            .get(get(&format!("n{n}.demo:80")))
            .await?
            .into_inner();
        next(&mut s).await?;
        held.push(s);
    }
    let err = client
        .get(get("n3.demo:80"))
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("max-names-per-client"),
        "{}",
        err.message()
    );
    // The same client on another connection is the same client.
    let mut other = DestinationClient::new(control.channel().await?);
    let err = other.get(get("n3.demo:80")).await.expect_err("still over");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    // Closing a stream frees its place.
    held.pop();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client.get(get("n3.demo:80")).await {
            Ok(s) => {
                next(&mut s.into_inner()).await?;
                break;
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                anyhow::ensure!(std::time::Instant::now() < deadline, "place never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
