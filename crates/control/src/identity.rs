//! `io.linkerd.proxy.identity.Identity`: signs workload CSRs for callers that
//! prove, with a bootstrap token, which identity they may claim.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse, identity_server::Identity};
use tonic::{Request, Response, Status};
use weft_identity::{CaDir, CaError, CsrError, Issuer, Name, TokenKey};

use crate::metrics::Metrics;

/// How often the issuer files are checked for a rotation.
const ISSUER_POLL: Duration = Duration::from_secs(1);

pub struct IdentityService {
    issuer: Arc<ArcSwap<Issuer>>,
    token_key: TokenKey,
    leaf_lifetime: Duration,
    metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("loading the issuer: {0}")]
    Issuer(#[source] CaError),
    #[error("loading the token key {}: {reason}", path.display())]
    TokenKey { path: PathBuf, reason: String },
}

/// What the control plane signs with now, for `/identity` on the admin
/// port: operators (and `weft check`) see the issuer actually in use, not
/// only what the files say.
#[derive(Clone)]
pub struct IdentityView {
    issuer: Arc<ArcSwap<Issuer>>,
    anchor_path: PathBuf,
}

#[derive(serde::Serialize)]
struct IdentityJson {
    /// The trust anchors file as it is now, PEM.
    anchors_pem: String,
    /// The issuer in use, PEM.
    issuer_pem: String,
}

impl IdentityView {
    pub fn to_json(&self) -> Result<String, String> {
        let anchors_pem = std::fs::read_to_string(&self.anchor_path)
            .map_err(|e| format!("reading {}: {e}", self.anchor_path.display()))?;
        let issuer_pem = weft_identity::to_pem(self.issuer.load().cert());
        serde_json::to_string_pretty(&IdentityJson {
            anchors_pem,
            issuer_pem,
        })
        .map_err(|e| e.to_string())
    }
}

impl IdentityService {
    pub fn view(&self, dir: &CaDir) -> IdentityView {
        IdentityView {
            issuer: self.issuer.clone(),
            anchor_path: dir.anchor_cert(),
        }
    }

    /// Loads the issuer and token key from `dir` and follows issuer
    /// rotations: a new issuer is used for the next CSR.
    pub fn load(
        dir: CaDir,
        leaf_lifetime: Duration,
        metrics: Metrics,
    ) -> Result<Self, IdentityError> {
        let issuer = Issuer::load(&dir).map_err(IdentityError::Issuer)?;
        let key_path = dir.token_key();
        let token_key = std::fs::read_to_string(&key_path)
            .map_err(|e| e.to_string())
            .and_then(|t| TokenKey::from_hex(&t).map_err(|e| e.to_string()))
            .map_err(|reason| IdentityError::TokenKey {
                path: key_path,
                reason,
            })?;
        metrics.set_issuer_expiry(issuer.not_after());
        let issuer = Arc::new(ArcSwap::from_pointee(issuer));
        tokio::spawn(follow_issuer(dir, Arc::downgrade(&issuer), metrics.clone()));
        Ok(Self {
            issuer,
            token_key,
            leaf_lifetime,
            metrics,
        })
    }
}

/// Reloads the issuer when its files change. A half-written or mismatched
/// pair is logged and the current issuer kept.
async fn follow_issuer(dir: CaDir, issuer: std::sync::Weak<ArcSwap<Issuer>>, metrics: Metrics) {
    let read = |dir: &CaDir| {
        (
            std::fs::read(dir.issuer_cert()).ok(),
            std::fs::read(dir.issuer_key()).ok(),
        )
    };
    let mut last = read(&dir);
    loop {
        tokio::time::sleep(ISSUER_POLL).await;
        let Some(issuer) = issuer.upgrade() else {
            return;
        };
        let now = read(&dir);
        if now == last {
            continue;
        }
        match Issuer::load(&dir) {
            Ok(next) => {
                tracing::info!(expires = ?next.not_after(), "issuer reloaded");
                metrics.set_issuer_expiry(next.not_after());
                issuer.store(Arc::new(next));
                last = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "new issuer files not usable yet; keeping the current issuer")
            }
        }
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let req = request.into_inner();
        let result = self.certify(&req);
        match &result {
            Ok(_) => {
                tracing::info!(identity = %req.identity, %peer, "certified");
                self.metrics.certify("ok");
            }
            Err(status) => {
                tracing::warn!(identity = %req.identity, %peer, reason = %status.message(), "certify refused");
                self.metrics.certify(match status.code() {
                    tonic::Code::PermissionDenied => "denied",
                    tonic::Code::InvalidArgument => "invalid",
                    _ => "error",
                });
            }
        }
        result.map(Response::new)
    }
}

impl IdentityService {
    fn certify(&self, req: &CertifyRequest) -> Result<CertifyResponse, Status> {
        let name: Name = req
            .identity
            .parse()
            .map_err(|e: weft_identity::NameError| Status::invalid_argument(e.to_string()))?;
        let token = std::str::from_utf8(&req.token)
            .map_err(|_| Status::invalid_argument("the token is not UTF-8 text"))?;
        let now = SystemTime::now();
        self.token_key
            .authorize(token, &name, now)
            .map_err(|e| Status::permission_denied(format!("token refused for {name}: {e}")))?;
        let issuer = self.issuer.load();
        let leaf = issuer
            .certify(
                &req.certificate_signing_request,
                &name,
                self.leaf_lifetime,
                now,
            )
            .map_err(|e| match e {
                CsrError::IssuerExpired | CsrError::Sign(_) => Status::unavailable(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        Ok(CertifyResponse {
            leaf_certificate: leaf.der.to_vec(),
            intermediate_certificates: vec![issuer.cert().to_vec()],
            valid_until: Some(timestamp(leaf.not_after)),
        })
    }
}
