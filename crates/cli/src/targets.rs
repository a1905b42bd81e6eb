//! Where the proxies' admin endpoints are: a Prometheus `file_sd` JSON file,
//! so the CLI (embedded mode) and a real Prometheus read one list.
//!
//! Each group's labels describe its targets. weft reads two of them:
//! `workload`, the name of the service the proxy fronts, and `identity`,
//! the proxy's mTLS identity. Prometheus attaches both to every series it
//! scrapes, so queries group by the same names in either mode.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One file_sd group.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Group {
    pub targets: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One proxy to scrape.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub admin: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// A control plane's admin endpoint, not a proxy's.
    pub(crate) fn is_control(&self) -> bool {
        self.labels.get("role").map(String::as_str) == Some("control")
    }

    /// A proxy's admin endpoint (a group without a role is one).
    pub(crate) fn is_proxy(&self) -> bool {
        matches!(
            self.labels.get("role").map(String::as_str),
            None | Some("proxy")
        )
    }

    /// `weft probe`'s endpoint (`role: probe`).
    pub(crate) fn is_probe(&self) -> bool {
        self.labels.get("role").map(String::as_str) == Some("probe")
    }

    /// The service this proxy fronts, else its address.
    pub(crate) fn workload(&self) -> String {
        self.labels
            .get("workload")
            .cloned()
            .unwrap_or_else(|| self.admin.to_string())
    }
}

/// weft-control's default listen addresses.
pub(crate) const DEFAULT_CONTROL: &str = "127.0.0.1:8086";
pub(crate) const DEFAULT_CONTROL_ADMIN: &str = "127.0.0.1:9990";

/// The control plane's gRPC and admin addresses, if the targets list it.
pub(crate) fn control_of(listed: &[Target]) -> (Option<String>, Option<String>) {
    let entry = listed.iter().find(|t| t.is_control());
    (
        entry.and_then(|t| t.labels.get("grpc").cloned()),
        entry.map(|t| t.admin.to_string()),
    )
}

/// The trust anchors file the control group names (label `anchors`), as
/// `weft demo` writes it.
pub(crate) fn anchors_of(listed: &[Target]) -> Option<PathBuf> {
    listed
        .iter()
        .find(|t| t.is_control())
        .and_then(|t| t.labels.get("anchors"))
        .map(PathBuf::from)
}

/// Where `weft demo` writes its targets, and where other commands look
/// when neither `--targets` nor `WEFT_TARGETS` says otherwise.
pub(crate) fn default_path() -> PathBuf {
    std::env::temp_dir().join("weft-demo").join("targets.json")
}

pub(crate) fn load(path: &Path) -> anyhow::Result<Vec<Target>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the proxy targets file {} (start `weft demo`, or pass --targets FILE: a Prometheus file_sd JSON list of proxy admin addresses)",
            path.display()
        )
    })?;
    parse(&text).with_context(|| format!("in the proxy targets file {}", path.display()))
}

pub(crate) fn parse(text: &str) -> anyhow::Result<Vec<Target>> {
    let groups: Vec<Group> =
        serde_json::from_str(text).context("not a file_sd JSON list of {targets, labels}")?;
    from_groups(groups)
}

/// One target per address of each group, with the group's labels.
pub(crate) fn from_groups(groups: Vec<Group>) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for group in groups {
        for t in group.targets {
            let admin = t
                .parse()
                .with_context(|| format!("target {t:?} is not an IP:port address"))?;
            out.push(Target {
                admin,
                labels: group.labels.clone(),
            });
        }
    }
    Ok(out)
}

/// Writes `groups` atomically: Prometheus re-reads the file when it
/// changes and must never see half of it.
pub(crate) fn write(path: &Path, groups: &[Group]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".targets.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(groups)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_file_sd_groups_with_labels() -> anyhow::Result<()> {
        let targets = parse(
            r#"[{"targets":["127.0.0.1:4191","127.0.0.1:4192"],"labels":{"workload":"web"}},
                {"targets":["[::1]:4191"]}]"#,
        )?;
        assert_eq!(targets.len(), 3);
        assert_eq!(targets[1].workload(), "web");
        assert_eq!(targets[2].workload(), "[::1]:4191");
        Ok(())
    }

    #[test]
    fn names_a_bad_target() {
        let err = parse(r#"[{"targets":["web:80x"]}]"#)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("\"web:80x\"")));
    }
}
