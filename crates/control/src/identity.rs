//! `io.linkerd.proxy.identity.Identity`: signs workload CSRs for callers that
//! prove which identity they may claim: with the certificate they hold for
//! it (renewal, on the control channel's TLS), or with a bootstrap token
//! (the first certificate). Also issues and renews weft-control's own
//! certificate for the control channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse, identity_server::Identity};
use rustls::sign::CertifiedKey;
use tonic::{Request, Response, Status};
use weft_channel::{CurrentCert, Peer};
use weft_identity::{CaDir, CaError, CsrError, Grant, Issuer, Name, TokenKey};

use crate::metrics::Metrics;
use crate::spent::{SpendError, SpentTokens};

/// How often the issuer files are checked for a rotation.
const ISSUER_POLL: Duration = Duration::from_secs(1);
/// Renew the control plane's own certificate when this share of its life
/// has passed, as proxies do.
const RENEW_AT: f64 = 0.7;
const RENEW_RETRY: Duration = Duration::from_secs(10);

pub struct IdentityService {
    issuer: Arc<ArcSwap<Issuer>>,
    token_key: TokenKey,
    spent: std::sync::Arc<SpentTokens>,
    leaf_lifetime: Duration,
    metrics: Metrics,
    /// With Kubernetes: ServiceAccount tokens, checked by TokenReview.
    reviewer: Option<crate::token_review::TokenReviewer>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity directory: {0}")]
    Dir(#[source] CaError),
    #[error("loading the issuer: {0}")]
    Issuer(#[source] CaError),
    #[error("loading the token key: {0}")]
    TokenKey(#[source] CaError),
    #[error("loading the used single-use tokens: {0}")]
    Spent(#[from] SpendError),
    #[error("issuing weft-control's own certificate for {name}: {reason}")]
    OwnCert { name: Name, reason: String },
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

    /// ServiceAccount tokens are accepted too, checked by `reviewer`.
    pub fn with_reviewer(mut self, reviewer: crate::token_review::TokenReviewer) -> Self {
        self.reviewer = Some(reviewer);
        self
    }

    /// Loads the issuer and token key from `dir` and follows issuer
    /// rotations: a new issuer is used for the next CSR. `spent` is where
    /// used single-use tokens are remembered.
    pub fn load(
        dir: CaDir,
        leaf_lifetime: Duration,
        spent: PathBuf,
        metrics: Metrics,
    ) -> Result<Self, IdentityError> {
        dir.check_served().map_err(IdentityError::Dir)?;
        let issuer = Issuer::load(&dir).map_err(IdentityError::Issuer)?;
        let token_key = dir.read_token_key().map_err(IdentityError::TokenKey)?;
        let spent = std::sync::Arc::new(SpentTokens::load(spent, unix(SystemTime::now()))?);
        metrics.set_issuer_expiry(issuer.not_after());
        let issuer = Arc::new(ArcSwap::from_pointee(issuer));
        tokio::spawn(follow_issuer(dir, Arc::downgrade(&issuer), metrics.clone()));
        Ok(Self {
            issuer,
            token_key,
            spent,
            leaf_lifetime,
            metrics,
            reviewer: None,
        })
    }

    /// weft-control's own certificate for the control channel, issued now
    /// and kept current: renewed at 70 % of its life and as soon as the
    /// issuer is rotated, so it always chains through the issuer in use.
    pub fn serve_cert(&self, name: Name) -> Result<Arc<CurrentCert>, IdentityError> {
        let current = Arc::new(CurrentCert::default());
        let issuer = self.issuer.load_full();
        let (key, not_after) = issue_own(&issuer, &name, self.leaf_lifetime).map_err(|reason| {
            IdentityError::OwnCert {
                name: name.clone(),
                reason,
            }
        })?;
        current.set(key);
        tracing::info!(%name, expires = %humantime::format_rfc3339_seconds(not_after), "control plane certificate issued");
        tokio::spawn(renew_own(
            Arc::downgrade(&self.issuer),
            Arc::downgrade(&current),
            name,
            self.leaf_lifetime,
            (issuer, not_after),
        ));
        Ok(current)
    }
}

fn issue_own(
    issuer: &Issuer,
    name: &Name,
    lifetime: Duration,
) -> Result<(CertifiedKey, SystemTime), String> {
    let (key, csr) = weft_identity::new_csr(name).map_err(|e| e.to_string())?;
    let leaf = issuer
        .certify(&csr, name, lifetime, SystemTime::now())
        .map_err(|e| e.to_string())?;
    let chain = vec![leaf.der, issuer.cert().clone()];
    let key = weft_channel::certified_key(&key, chain).map_err(|e| e.to_string())?;
    Ok((key, leaf.not_after))
}

async fn renew_own(
    issuer: std::sync::Weak<ArcSwap<Issuer>>,
    current: std::sync::Weak<CurrentCert>,
    name: Name,
    lifetime: Duration,
    (mut signed_by, mut not_after): (Arc<Issuer>, SystemTime),
) {
    let mut due = renew_due(not_after);
    loop {
        tokio::time::sleep(ISSUER_POLL).await;
        let (Some(issuer), Some(current)) = (issuer.upgrade(), current.upgrade()) else {
            return;
        };
        let now_issuer = issuer.load_full();
        let rotated = !Arc::ptr_eq(&now_issuer, &signed_by);
        if !rotated && SystemTime::now() < due {
            continue;
        }
        match issue_own(&now_issuer, &name, lifetime) {
            Ok((key, expires)) => {
                current.set(key);
                tracing::info!(%name, rotated, expires = %humantime::format_rfc3339_seconds(expires), "control plane certificate renewed");
                (signed_by, not_after) = (now_issuer, expires);
                due = renew_due(not_after);
            }
            Err(reason) => {
                tracing::warn!(%name, %reason, retry_in = ?RENEW_RETRY, "renewing the control plane certificate failed");
                due = SystemTime::now() + RENEW_RETRY;
            }
        }
    }
}

fn renew_due(not_after: SystemTime) -> SystemTime {
    let now = SystemTime::now();
    now + not_after
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .mul_f64(RENEW_AT)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
        let peer = request.extensions().get::<Peer>().cloned();
        let caller = peer.as_ref().and_then(|p| p.identity.clone());
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.addr.to_string());
        let req = request.into_inner();
        // The token itself is never logged: it is a credential.
        let result = self.certify(&req, caller.as_ref()).await;
        match &result {
            Ok((_, proof)) => {
                tracing::info!(identity = %req.identity, %peer, proof, "certified");
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
        result.map(|(rsp, _)| Response::new(rsp))
    }
}

impl IdentityService {
    /// Signs `req` if the caller proved `req.identity`; returns how it
    /// proved it.
    async fn certify(
        &self,
        req: &CertifyRequest,
        caller: Option<&Name>,
    ) -> Result<(CertifyResponse, &'static str), Status> {
        let name: Name = req
            .identity
            .parse()
            .map_err(|e: weft_identity::NameError| Status::invalid_argument(e.to_string()))?;
        let now = SystemTime::now();
        let serviceaccount = self.reviewer.as_ref().filter(|_| {
            caller != Some(&name) && !req.token.is_empty() && !req.token.starts_with(b"weft1.")
        });
        let grant = if caller == Some(&name) {
            // Renewal: the connection's client certificate, verified by
            // the handshake, already names this identity.
            None
        } else if let Some(reviewer) = serviceaccount {
            let token = std::str::from_utf8(&req.token)
                .map_err(|_| Status::invalid_argument("the token is not UTF-8 text"))?;
            reviewer.review(token, &name).await.map_err(|e| match e {
                crate::token_review::ReviewError::Unavailable(_) => {
                    Status::unavailable(e.to_string())
                }
                _ => Status::permission_denied(format!(
                    "ServiceAccount token refused for {name}: {e}"
                )),
            })?;
            None
        } else {
            Some(self.authorize_token(req, &name, caller, now)?)
        };
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
        let proof = match grant {
            None if serviceaccount.is_some() => "serviceaccount token",
            None => "certificate",
            Some(Grant { once: None, .. }) => "token",
            Some(Grant {
                once: Some(nonce),
                expires,
                ..
            }) => {
                // Recorded only once signing succeeded: a bad CSR does not
                // use the token up. A concurrent use of the same token
                // loses here.
                // The fsync runs on a blocking thread, not the runtime's.
                let spent = self.spent.clone();
                let at = unix(now);
                tokio::task::spawn_blocking(move || spent.spend(&nonce, expires, at))
                    .await
                    .map_err(|e| Status::internal(format!("recording the token failed: {e}")))?
                    .map_err(|e| match e {
                        SpendError::Replayed => {
                            Status::permission_denied(format!("token refused for {name}: {e}"))
                        }
                        _ => Status::unavailable(e.to_string()),
                    })?;
                "single-use token"
            }
        };
        Ok((
            CertifyResponse {
                leaf_certificate: leaf.der.to_vec(),
                intermediate_certificates: vec![issuer.cert().to_vec()],
                valid_until: Some(timestamp(leaf.not_after)),
            },
            proof,
        ))
    }

    fn authorize_token(
        &self,
        req: &CertifyRequest,
        name: &Name,
        caller: Option<&Name>,
        now: SystemTime,
    ) -> Result<Grant, Status> {
        if req.token.is_empty() {
            return Err(Status::permission_denied(match caller {
                Some(other) => {
                    format!("no token, and the connection's certificate is for {other}, not {name}")
                }
                None => format!("no token, and the connection presented no certificate for {name}"),
            }));
        }
        let token = std::str::from_utf8(&req.token)
            .map_err(|_| Status::invalid_argument("the token is not UTF-8 text"))?;
        let grant = self
            .token_key
            .authorize(token, name, now)
            .map_err(|e| Status::permission_denied(format!("token refused for {name}: {e}")))?;
        if let Some(nonce) = &grant.once
            && self.spent.is_spent(nonce)
        {
            return Err(Status::permission_denied(format!(
                "token refused for {name}: {}",
                SpendError::Replayed
            )));
        }
        Ok(grant)
    }
}
