//! ServiceAccount identity: a pod proves who it is with its projected
//! ServiceAccount token (audience `weft`), which the Kubernetes API checks
//! (`TokenReview`: signature, expiry, audience, and for a bound token that
//! its pod still exists). The identity granted is exactly that
//! ServiceAccount's: `<sa>.<namespace>.serviceaccount.identity.<trust
//! domain>`.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use weft_identity::Name;

/// The audience projected tokens for weft carry.
pub const AUDIENCE: &str = "weft";
/// How long the API may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the Kubernetes API did not answer the TokenReview: {0}")]
    Unavailable(String),
    #[error("the token is not valid: {0}")]
    Rejected(String),
    #[error("the token is not a ServiceAccount's (it names {0})")]
    NotServiceAccount(String),
    #[error("the token is {actual}'s, not {wanted}'s")]
    OtherIdentity { actual: String, wanted: String },
}

pub struct TokenReviewer {
    client: kube::Client,
    trust_domain: String,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, trust_domain: String) -> Self {
        Self {
            client,
            trust_domain,
        }
    }

    /// The identity a ServiceAccount has in the mesh.
    pub fn identity_of(&self, namespace: &str, serviceaccount: &str) -> String {
        format!(
            "{serviceaccount}.{namespace}.serviceaccount.identity.{}",
            self.trust_domain
        )
    }

    /// Whether `token` proves `wanted`.
    pub async fn review(&self, token: &str, wanted: &Name) -> Result<(), ReviewError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = tokio::time::timeout(TIMEOUT, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| ReviewError::Unavailable(format!("no answer within {TIMEOUT:?}")))?
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Rejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(ReviewError::Rejected(format!(
                "not issued for the audience {AUDIENCE:?}"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let Some((namespace, serviceaccount)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(ReviewError::NotServiceAccount(username));
        };
        let actual = self.identity_of(namespace, serviceaccount);
        if actual != wanted.as_str() {
            return Err(ReviewError::OtherIdentity {
                actual,
                wanted: wanted.to_string(),
            });
        }
        Ok(())
    }
}
