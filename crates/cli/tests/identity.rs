//! `weft identity csr`: the identity directory linkerd2-proxy reads
//! (`key.p8`, `csr.der`), certified by the real weft-control as
//! linkerd2-proxy would have it certified.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use linkerd2_proxy_api::identity::CertifyRequest;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use weft_identity::CertInfo;
use weft_test_support::control::Control;
use weft_test_support::mesh::MeshCa;
use weft_test_support::workspace_binary;

async fn weft(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn a_csr_directory_is_certified_for_its_key() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("identity");
    let dir_str = dir.to_string_lossy().into_owned();
    let (ok, err) = weft(&["identity", "csr", "web.demo", "--dir", &dir_str]).await?;
    assert!(ok, "{err}");
    let key = std::fs::read(dir.join("key.p8"))?;
    let mode = std::fs::metadata(dir.join("key.p8"))?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the owner's alone");

    // A second run keeps the key unless told otherwise.
    let (ok, err) = weft(&["identity", "csr", "web.demo", "--dir", &dir_str]).await?;
    assert!(!ok);
    assert!(err.contains("key.p8 exists"), "{err}");
    assert_eq!(std::fs::read(dir.join("key.p8"))?, key);

    let ca = MeshCa::new()?;
    let control = Control::start(&workspace_binary("weft-control")?, &ca, &[]).await?;
    let mut identity = IdentityClient::new(control.channel().await?);
    let rsp = identity
        .certify(CertifyRequest {
            identity: "web.demo".into(),
            token: ca.token("web.demo", Duration::from_secs(60))?.into_bytes(),
            certificate_signing_request: std::fs::read(dir.join("csr.der"))?,
        })
        .await?
        .into_inner();
    let leaf = CertInfo::parse(&rsp.leaf_certificate).map_err(anyhow::Error::msg)?;
    assert_eq!(leaf.dns_names, ["web.demo"]);
    // The certificate is for the key in key.p8: rustls pairs them.
    let certified = weft_channel::certified_key_der(key, vec![rsp.leaf_certificate.into()])?;
    certified.keys_match()?;
    Ok(())
}
