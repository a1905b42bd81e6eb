//! Identity names: what a workload is called in its certificate.

use std::fmt;
use std::str::FromStr;

/// A workload identity such as `web.demo.weft.local`: a DNS-like name that
/// the workload's certificate carries as its only subject alternative name,
/// and that a client sends as TLS server name to reach it.
///
/// Lower case, 1–253 bytes, at least two labels, each label 1–63 bytes of
/// `a-z`, `0-9` and `-`, not starting or ending with `-`. Holding a `Name`
/// means the string has been checked, so rustls and rcgen accept it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid identity name {name:?}: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: &'static str,
}

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| NameError {
            name: s.to_string(),
            reason,
        };
        if s.is_empty() || s.len() > 253 {
            return Err(err("must be 1 to 253 characters"));
        }
        let mut labels = 0;
        for label in s.split('.') {
            labels += 1;
            if label.is_empty() || label.len() > 63 {
                return Err(err("each dot-separated label must be 1 to 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(err(
                    "only lower-case letters, digits, '-' and '.' are allowed",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(err("a label must not start or end with '-'"));
            }
        }
        if labels < 2 {
            return Err(err("needs at least two labels, such as web.demo"));
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(err("looks like an IP address"));
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_like_names() {
        for ok in ["web.demo", "api-v2.prod.weft.local", "a1.b2"] {
            assert_eq!(ok.parse::<Name>().map(|n| n.to_string()), Ok(ok.into()));
        }
    }

    #[test]
    fn rejects_what_a_certificate_cannot_carry() {
        for bad in [
            "",
            "web",
            "Web.demo",
            "web..demo",
            "-web.demo",
            "web-.demo",
            "web.demo.",
            "web demo.x",
            "10.0.0.1",
            "web_1.demo",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.demo", "a".repeat(64));
        assert!(long.parse::<Name>().is_err());
    }
}
