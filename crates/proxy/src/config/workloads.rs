//! Per-node mode: the workloads one proxy serves, each with an identity of
//! its own (`WEFT_PROXY_WORKLOADS`, a YAML file).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weft_identity::Name;

/// One local workload: who it is, how it proves it, and the addresses its
/// connections come from (outbound) and arrive at (inbound).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(serialize_with = "super::serialize_display")]
    pub identity: Name,
    pub token_file: PathBuf,
    pub addresses: Vec<IpAddr>,
    /// Local users whose connections are this workload's (on a host where
    /// workloads share an address).
    pub uids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    workloads: Vec<WorkloadModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadModel {
    name: String,
    identity: String,
    token_file: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    uids: Vec<u32>,
}

/// The workloads file at `path`, checked whole: every error names the
/// workload and key. Token files must be readable, unless `upgrading`
/// (the certificates come from the process being replaced).
pub(super) fn load(path: &Path, upgrading: bool) -> Result<Vec<WorkloadConfig>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    parse(&text, upgrading)
}

fn parse(text: &str, upgrading: bool) -> Result<Vec<WorkloadConfig>, String> {
    let model: FileModel =
        serde_saphyr::from_str(text).map_err(|e| format!("not a workloads file: {e}"))?;
    if model.workloads.is_empty() {
        return Err("`workloads` lists none".into());
    }
    let mut names = HashSet::new();
    let mut owners: std::collections::HashMap<IpAddr, String> = Default::default();
    let mut uid_owners: std::collections::HashMap<u32, String> = Default::default();
    let mut out = Vec::with_capacity(model.workloads.len());
    for (i, w) in model.workloads.into_iter().enumerate() {
        let at = format!("workloads[{i}] ({:?})", w.name);
        if w.name.is_empty() || !names.insert(w.name.clone()) {
            return Err(format!("{at}: name must be set and unique"));
        }
        let identity: Name = w
            .identity
            .parse()
            .map_err(|e: weft_identity::NameError| format!("{at}.identity: {}", e.reason))?;
        if !upgrading {
            let token = std::fs::read_to_string(&w.token_file)
                .map_err(|e| format!("{at}.token_file {:?}: cannot read it: {e}", w.token_file))?;
            if token.trim().is_empty() {
                return Err(format!("{at}.token_file {:?}: empty", w.token_file));
            }
        }
        if w.addresses.is_empty() && w.uids.is_empty() {
            return Err(format!(
                "{at}: list its addresses (where its connections come from) or its uids (the local users that run it)"
            ));
        }
        for uid in &w.uids {
            if let Some(other) = uid_owners.insert(*uid, w.name.clone()) {
                return Err(format!(
                    "{at}.uids: {uid} belongs to workload {other:?} already"
                ));
            }
        }
        let mut addresses = Vec::with_capacity(w.addresses.len());
        for a in &w.addresses {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("{at}.addresses: {a:?} is not an IP address"))?;
            if let Some(other) = owners.insert(ip, w.name.clone()) {
                return Err(format!(
                    "{at}.addresses: {ip} belongs to workload {other:?} already"
                ));
            }
            addresses.push(ip);
        }
        out.push(WorkloadConfig {
            name: w.name,
            identity,
            token_file: PathBuf::from(w.token_file),
            addresses,
            uids: w.uids,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_two_workloads_and_its_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("t");
        std::fs::write(&token, "weft1.x").expect("token");
        let t = token.display();
        let ok = parse(
            &format!(
                "workloads:\n  - {{name: web, identity: web.demo, token_file: {t}, addresses: [10.0.0.5]}}\n  - {{name: batch, identity: batch.demo, token_file: {t}, addresses: [10.0.0.6, \"fd00::6\"]}}\n"
            ),
            false,
        )
        .expect("valid");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].identity.as_str(), "batch.demo");
        assert_eq!(ok[1].addresses.len(), 2);

        for (text, want) in [
            ("workloads: []\n".to_string(), "lists none".to_string()),
            (
                format!("workloads:\n  - {{name: web, identity: Web, token_file: {t}, addresses: [10.0.0.5]}}\n"),
                "workloads[0] (\"web\").identity".into(),
            ),
            (
                "workloads:\n  - {name: web, identity: web.demo, token_file: /nonexistent, addresses: [10.0.0.5]}\n".into(),
                "token_file \"/nonexistent\": cannot read it".into(),
            ),
            (
                format!("workloads:\n  - {{name: web, identity: web.demo, token_file: {t}, addresses: [nope]}}\n"),
                "\"nope\" is not an IP address".into(),
            ),
            (
                format!("workloads:\n  - {{name: a, identity: a.demo, token_file: {t}, addresses: [10.0.0.5]}}\n  - {{name: b, identity: b.demo, token_file: {t}, addresses: [10.0.0.5]}}\n"),
                "10.0.0.5 belongs to workload \"a\" already".into(),
            ),
            (
                format!("workloads:\n  - {{name: a, identity: a.demo, token_file: {t}, addresses: [10.0.0.5]}}\n  - {{name: a, identity: b.demo, token_file: {t}, addresses: [10.0.0.6]}}\n"),
                "name must be set and unique".into(),
            ),
        ] {
            let err = parse(&text, false).expect_err(&text);
            assert!(err.contains(&want), "{err} (wanted {want})");
        }
        let uids = parse(
            &format!("workloads:\n  - {{name: cron, identity: cron.demo, token_file: {t}, uids: [2301]}}\n"),
            false,
        )
        .expect("uids alone");
        assert_eq!(
            (uids[0].uids.as_slice(), uids[0].addresses.len()),
            (&[2301][..], 0)
        );
        let err = parse(
            &format!("workloads:\n  - {{name: a, identity: a.demo, token_file: {t}}}\n"),
            false,
        )
        .expect_err("neither");
        assert!(err.contains("addresses") && err.contains("uids"), "{err}");
        let err = parse(
            &format!("workloads:\n  - {{name: a, identity: a.demo, token_file: {t}, uids: [7]}}\n  - {{name: b, identity: b.demo, token_file: {t}, uids: [7]}}\n"),
            false,
        )
        .expect_err("shared uid");
        assert!(err.contains("7 belongs to workload \"a\""), "{err}");
        // Taking over from an upgraded process, the certificates come with
        // the sockets: a token file may be gone.
        let gone = "workloads:\n  - {name: web, identity: web.demo, token_file: /nonexistent, addresses: [10.0.0.5]}\n";
        assert_eq!(parse(gone, true).expect("upgrading").len(), 1);
    }
}
