//! Certificates for this proxy's identity: a key generated here (it never
//! leaves the process), a CSR sent with the bootstrap token to the control
//! plane's Identity API, and renewal at 70 % of each certificate's life.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use linkerd2_proxy_api::identity::CertifyRequest;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::control::Control;
use crate::metrics::IdentityMetrics;
use crate::tls::{Tls, provider};

const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Renew when this share of the certificate's remaining life has passed.
const RENEW_AT: f64 = 0.7;

#[derive(Debug, thiserror::Error)]
enum CertifyError {
    #[error("cannot read the token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Connect(#[from] weft_channel::ChannelError),
    #[error("cannot generate a key: {0}")]
    Key(#[from] weft_identity::CertError),
    #[error("the control plane refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the control plane did not answer within {CERTIFY_TIMEOUT:?}")]
    Timeout,
    #[error("the certificate returned is not usable: {0}")]
    Invalid(String),
}

/// Keeps `tls` certified until the process ends.
pub async fn maintain(
    tls: Arc<Tls>,
    control: Control,
    token_file: PathBuf,
    metrics: IdentityMetrics,
) {
    let mut retry = RETRY_MIN;
    // A certificate handed over by an upgrade is renewed when its own
    // would have been, not at once.
    if let Some(not_after) = tls.cert().not_after() {
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tracing::info!(identity = %tls.name, expires = %humantime::format_rfc3339_seconds(not_after), "certificate handed over");
        tokio::time::sleep(left.mul_f64(RENEW_AT)).await;
    }
    loop {
        match certify(&tls, &control, &token_file).await {
            Ok((key, pkcs8, not_after)) => {
                tls.set_cert(key, pkcs8);
                metrics.refreshed(not_after);
                retry = RETRY_MIN;
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let renew_in = left.mul_f64(RENEW_AT);
                tracing::info!(identity = %tls.name, expires = %humantime::format_rfc3339_seconds(not_after), renew_in = ?renew_in, "certified");
                tokio::time::sleep(renew_in).await;
            }
            Err(e) => {
                tracing::warn!(identity = %tls.name, control = %control.addr, error = %e, retry_in = ?retry, "certification failed");
                let jitter = retry.mul_f64(fastrand::f64() * 0.5);
                tokio::time::sleep(retry + jitter).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

async fn certify(
    tls: &Tls,
    control: &Control,
    token_file: &PathBuf,
) -> Result<(CertifiedKey, Vec<u8>, SystemTime), CertifyError> {
    // A proxy that holds a valid certificate proves its identity with it
    // (the control channel presents it); the token is for the first one,
    // and for a proxy whose certificate lapsed.
    let held = tls
        .cert()
        .not_after()
        .is_some_and(|t| t > SystemTime::now() + Duration::from_secs(5));
    let token = if held {
        Vec::new()
    } else {
        let token = tokio::fs::read(token_file)
            .await
            .map_err(|source| CertifyError::Token {
                path: token_file.clone(),
                source,
            })?;
        token.trim_ascii().to_vec()
    };
    let (key, csr) = weft_identity::new_csr(&tls.name)?;
    let channel = tokio::time::timeout(CERTIFY_TIMEOUT, control.connect_fresh())
        .await
        .map_err(|_| CertifyError::Timeout)??;
    let mut client = IdentityClient::new(channel);
    let request = CertifyRequest {
        identity: tls.name.to_string(),
        token,
        certificate_signing_request: csr,
    };
    let rsp = match tokio::time::timeout(CERTIFY_TIMEOUT, client.certify(request)).await {
        Err(_) => return Err(CertifyError::Timeout),
        Ok(Err(status)) => {
            return Err(CertifyError::Refused {
                code: status.code(),
                message: status.message().to_string(),
            });
        }
        Ok(Ok(rsp)) => rsp.into_inner(),
    };
    let leaf = CertificateDer::from(rsp.leaf_certificate);
    let intermediates: Vec<CertificateDer<'static>> = rsp
        .intermediate_certificates
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    // Check the certificate as a peer will: chained to the trust anchors,
    // naming exactly this proxy, valid now. Serving one peers reject would
    // fail every connection.
    let verifier = WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), provider())
        .build()
        .map_err(|e| CertifyError::Invalid(e.to_string()))?;
    let name = ServerName::try_from(tls.name.as_str().to_string())
        .map_err(|e| CertifyError::Invalid(e.to_string()))?;
    verifier
        .verify_server_cert(&leaf, &intermediates, &name, &[], UnixTime::now())
        .map_err(|e| CertifyError::Invalid(e.to_string()))?;
    let not_after = weft_identity::CertInfo::parse(&leaf)
        .map_err(CertifyError::Invalid)?
        .not_after;
    let mut chain = vec![leaf];
    chain.extend(intermediates);
    let pkcs8 = key.serialize_der();
    let key = weft_channel::certified_key(&key, chain)
        .map_err(|e| CertifyError::Invalid(e.to_string()))?;
    Ok((key, pkcs8, not_after))
}
