//! Bootstrap tokens: how a workload proves to the control plane which
//! identity it may be certified for.
//!
//! A token is `weft1.<expiry unix seconds>.<name>.<hex HMAC-SHA256>` over
//! everything before the last dot, keyed with the control plane's token key.
//! A single-use token is `weft1-once.<expiry>.<nonce>.<name>.<signature>`:
//! the control plane remembers its nonce once used, until it expires. The
//! control plane both mints and checks them, so a symmetric key is enough;
//! the name is in the clear so an operator can read what a token is for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use crate::Name;

const PREFIX: &str = "weft1";
const PREFIX_ONCE: &str = "weft1-once";
/// 128 random bits: nonces never collide.
const NONCE_LEN: usize = 16;
/// 256-bit keys, as HMAC-SHA256 wants.
pub(crate) const KEY_LEN: usize = 32;

/// The secret that signs and verifies tokens.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a weft bootstrap token (expected weft1.<expiry>.<name>.<signature>)")]
    Malformed,
    #[error(
        "the token's signature does not verify: it was not minted with this control plane's token key"
    )]
    BadSignature,
    #[error("the token expired at {expired_at} (unix seconds)")]
    Expired { expired_at: u64 },
    #[error("the token was minted for {token_name}, not {requested}")]
    WrongName {
        token_name: String,
        requested: String,
    },
    #[error("the token key must be {KEY_LEN} bytes written as {} hex digits", KEY_LEN * 2)]
    BadKey,
    #[error("no randomness available to generate a token key")]
    Rng,
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: Name,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
    /// For a single-use token, the nonce that marks it spent.
    pub once: Option<String>,
}

impl TokenKey {
    pub fn generate() -> Result<(Self, String), TokenError> {
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| TokenError::Rng)?;
        let hex = to_hex(&bytes);
        Ok((Self::from_bytes(&bytes), hex))
    }

    /// Reads a key written by [`TokenKey::generate`]: hex digits, surrounding
    /// whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        let bytes = from_hex(text.trim()).ok_or(TokenError::BadKey)?;
        if bytes.len() != KEY_LEN {
            return Err(TokenError::BadKey);
        }
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// A token for `name`, valid for `valid_for` from `now`.
    pub fn mint(&self, name: &Name, valid_for: Duration, now: SystemTime) -> String {
        let expiry = unix(now).saturating_add(valid_for.as_secs());
        self.sign(format!("{PREFIX}.{expiry}.{name}"))
    }

    /// A token for `name` that the control plane accepts once, within
    /// `valid_for` from `now`.
    pub fn mint_once(
        &self,
        name: &Name,
        valid_for: Duration,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        let mut nonce = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| TokenError::Rng)?;
        let expiry = unix(now).saturating_add(valid_for.as_secs());
        Ok(self.sign(format!("{PREFIX_ONCE}.{expiry}.{}.{name}", to_hex(&nonce))))
    }

    fn sign(&self, body: String) -> String {
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", to_hex(tag.as_ref()))
    }

    /// What `token` grants, if its signature verifies and it has not
    /// expired at `now`. Whether a single-use token was already used is the
    /// caller's to check ([`Grant::once`]).
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Grant, TokenError> {
        let token = token.trim();
        let (body, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (prefix, rest) = body.split_once('.').ok_or(TokenError::Malformed)?;
        let (expiry, rest) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let (once, name) = match prefix {
            PREFIX => (None, rest),
            PREFIX_ONCE => {
                let (nonce, name) = rest.split_once('.').ok_or(TokenError::Malformed)?;
                if nonce.len() != NONCE_LEN * 2 || from_hex(nonce).is_none() {
                    return Err(TokenError::Malformed);
                }
                (Some(nonce.to_string()), name)
            }
            _ => return Err(TokenError::Malformed),
        };
        let expires: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let sig = from_hex(sig).ok_or(TokenError::Malformed)?;
        // The signature is checked before anything the token claims is
        // believed.
        hmac::verify(&self.key, body.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
        if unix(now) >= expires {
            return Err(TokenError::Expired {
                expired_at: expires,
            });
        }
        let name = name.parse().map_err(|_| TokenError::Malformed)?;
        Ok(Grant {
            name,
            expires,
            once,
        })
    }

    /// Like [`TokenKey::verify`], and the token must be for `requested`.
    pub fn authorize(
        &self,
        token: &str,
        requested: &Name,
        now: SystemTime,
    ) -> Result<Grant, TokenError> {
        let grant = self.verify(token, now)?;
        if &grant.name != requested {
            return Err(TokenError::WrongName {
                token_name: grant.name.to_string(),
                requested: requested.to_string(),
            });
        }
        Ok(grant)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        s.parse().expect("valid name")
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let (key, hex) = TokenKey::generate().expect("rng");
        let now = SystemTime::now();
        let token = key.mint(&name("web.demo"), Duration::from_secs(60), now);
        assert_eq!(
            key.verify(&token, now).map(|g| g.name),
            Ok(name("web.demo"))
        );
        let reloaded = TokenKey::from_hex(&format!("{hex}\n")).expect("hex key");
        let grant = reloaded.verify(&token, now).expect("verifies");
        assert_eq!((grant.name, grant.once), (name("web.demo"), None));
        assert!(matches!(
            key.verify(&token, now + Duration::from_secs(61)),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn tampering_or_another_key_is_refused() {
        let (key, _) = TokenKey::generate().expect("rng");
        let (other, _) = TokenKey::generate().expect("rng");
        let now = SystemTime::now();
        let token = key.mint(&name("web.demo"), Duration::from_secs(60), now);
        assert_eq!(other.verify(&token, now), Err(TokenError::BadSignature));
        let forged = token.replace("web.demo", "api.demo");
        assert_eq!(key.verify(&forged, now), Err(TokenError::BadSignature));
        let extended = token.replacen('.', ".9", 1);
        assert_eq!(key.verify(&extended, now), Err(TokenError::BadSignature));
        for junk in ["", "weft1", "weft1.x.web.demo.00", "nope.1.web.demo.00"] {
            assert_eq!(key.verify(junk, now), Err(TokenError::Malformed), "{junk}");
        }
        assert!(matches!(
            key.authorize(&token, &name("api.demo"), now),
            Err(TokenError::WrongName { .. })
        ));
    }

    #[test]
    fn single_use_tokens_carry_a_distinct_signed_nonce() {
        let (key, _) = TokenKey::generate().expect("rng");
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        let a = key.mint_once(&name("web.demo"), ttl, now).expect("rng");
        let b = key.mint_once(&name("web.demo"), ttl, now).expect("rng");
        let (ga, gb) = (
            key.verify(&a, now).expect("a"),
            key.verify(&b, now).expect("b"),
        );
        assert_eq!(ga.name, name("web.demo"));
        assert!(ga.once.is_some() && ga.once != gb.once, "{ga:?} {gb:?}");
        // The nonce is under the signature: a reusable token cannot be made
        // from a single-use one by dropping it.
        let nonce = ga.once.clone().expect("nonce");
        let stripped = a
            .replace("weft1-once", "weft1")
            .replace(&format!(".{nonce}"), "");
        assert_eq!(key.verify(&stripped, now), Err(TokenError::BadSignature));
        assert!(matches!(
            key.verify(&a, now + ttl),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn keys_must_be_32_hex_bytes() {
        assert_eq!(TokenKey::from_hex("abcd").err(), Some(TokenError::BadKey));
        assert_eq!(
            TokenKey::from_hex(&"zz".repeat(32)).err(),
            Some(TokenError::BadKey)
        );
    }
}
