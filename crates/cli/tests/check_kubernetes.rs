//! `weft check --kubernetes` against the API server double holding exactly
//! what `weft install` printed, with a real weft-control behind the pods'
//! addresses: all checks pass; then each thing an operator gets wrong
//! (RBAC trimmed, an image that cannot be pulled, anchors from another CA,
//! a webhook certificate from another CA, no webhook endpoint) fails with
//! what to do. `--pre` checks the version and the user's permissions.

use std::process::Command;

use serde_json::{Value, json};
use weft_test_support::control::Control;
use weft_test_support::kube_api::{ApiServer, Resource};
use weft_test_support::mesh::MeshCa;
use weft_test_support::workspace_binary;

struct Installed {
    api: ApiServer,
    dir: tempfile::TempDir,
    docs: Vec<Value>,
    ca: MeshCa,
    control: Control,
}

/// `weft install`'s output applied to the double, weft-control running as
/// its two pods would, and the status controllers would write.
async fn installed() -> anyhow::Result<Installed> {
    let api = ApiServer::start().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let ca = MeshCa::new()?;
    let docs = install(&ca.dir_str())?;
    for doc in &docs {
        api.apply_value(doc.clone())?;
    }
    let kubeconfig_arg = kubeconfig.to_string_lossy().into_owned();
    let control = Control::start(
        &workspace_binary("weft-control")?,
        &ca,
        &["--kubeconfig", &kubeconfig_arg, "--dns", "false"],
    )
    .await?;
    let mut deployment = find(&docs, "Deployment", "weft-control")?.clone();
    deployment["status"] = json!({"replicas": 2, "readyReplicas": 2});
    api.apply_value(deployment)?;
    for name in ["weft-control-7d9f-a", "weft-control-7d9f-b"] {
        api.apply_value(pod(name, control.admin.port(), None))?;
    }
    api.apply_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "weft-webhook-x1", "namespace": "weft",
                     "labels": {"kubernetes.io/service-name": "weft-webhook"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}],
    }))?;
    Ok(Installed {
        api,
        dir,
        docs,
        ca,
        control,
    })
}

fn install(identity_dir: &str) -> anyhow::Result<Vec<Value>> {
    let out = Command::new(workspace_binary("weft")?)
        .args(["install", "--identity-dir", identity_dir])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "weft install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_saphyr::from_multiple(&String::from_utf8(
        out.stdout,
    )?)?)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow::anyhow!("no {kind} {name}"))
}

/// A weft-control pod at 127.0.0.1 whose admin port is `admin`; ready, or
/// waiting for `waiting` (a reason).
fn pod(name: &str, admin: u16, waiting: Option<&str>) -> Value {
    let ready = if waiting.is_some() { "False" } else { "True" };
    let state = match waiting {
        Some(reason) => {
            json!({"waiting": {"reason": reason, "message": "Back-off pulling image \"ghcr.io/weft/weft-control:0.1.0\""}})
        }
        None => json!({"running": {"startedAt": "2026-11-29T12:00:00Z"}}),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "weft",
                     "labels": {"app.kubernetes.io/name": "weft-control", "app.kubernetes.io/part-of": "weft"}},
        "spec": {"containers": [{
            "name": "weft-control",
            "image": "ghcr.io/weft/weft-control:0.1.0",
            "ports": [{"name": "admin", "containerPort": admin, "protocol": "TCP"}],
        }]},
        "status": {
            "phase": if waiting.is_some() { "Pending" } else { "Running" },
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": ready}],
            "containerStatuses": [{
                "name": "weft-control",
                "image": "ghcr.io/weft/weft-control:0.1.0",
                "imageID": "",
                "ready": waiting.is_none(),
                "restartCount": 0,
                "state": state,
            }],
        },
    })
}

/// Runs `weft check --kubernetes` with `extra` flags: (passed, checks).
/// (Asynchronously: the double runs on this test's runtime.)
async fn check(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<(bool, Vec<Value>)> {
    let out = tokio::process::Command::new(workspace_binary("weft")?)
        .args(["check", "--kubernetes", "-o", "json", "--kubeconfig"])
        .arg(dir.join("kubeconfig"))
        .args(extra)
        .env_remove("KUBECONFIG")
        .output()
        .await?;
    let stdout = String::from_utf8(out.stdout)?;
    let checks: Vec<Value> = serde_json::from_str(&stdout).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.success(), checks))
}

/// The one check named `name` (a prefix) in `section`.
fn named<'a>(checks: &'a [Value], section: &str, name: &str) -> anyhow::Result<&'a Value> {
    checks
        .iter()
        .find(|c| {
            c["section"] == section && c["name"].as_str().is_some_and(|n| n.starts_with(name))
        })
        .ok_or_else(|| anyhow::anyhow!("no check {section}/{name} in {checks:#?}"))
}

fn failures(checks: &[Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect()
}

#[tokio::test]
async fn a_complete_installation_passes_every_check() -> anyhow::Result<()> {
    let i = installed().await?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    let not_ok: Vec<&Value> = checks.iter().filter(|c| c["status"] != "ok").collect();
    assert!(passed && not_ok.is_empty(), "{not_ok:#?}");
    for (section, name, says) in [
        ("kubernetes API", "reachable", "v1.33.0"),
        (
            "weft-control's permissions",
            "system:serviceaccount:weft:weft-control",
            "endpointslices",
        ),
        ("identity in the cluster", "anchors agree", "same anchors"),
        (
            "injection webhook",
            "namespaces.inject.weft.io",
            "failurePolicy Ignore",
        ),
        ("injection webhook", "pods.inject.weft.io", "/inject"),
        (
            "injection webhook",
            "serving certificate",
            "weft-webhook.weft.svc, chains to the caBundle",
        ),
        ("injection webhook", "endpoints", "1 ready"),
        ("control-plane pods", "Deployment weft/weft-control", "2/2"),
        (
            "control-plane pods",
            "pod weft-control-7d9f-a",
            "serving the anchors in the ConfigMap",
        ),
        (
            "control-plane pods",
            "pod weft-control-7d9f-b",
            "serving the anchors in the ConfigMap",
        ),
    ] {
        let c = named(&checks, section, name)?;
        assert!(
            c["detail"].as_str().is_some_and(|d| d.contains(says)),
            "{section}/{name}: {c:#}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn each_broken_part_fails_with_what_to_do() -> anyhow::Result<()> {
    let i = installed().await?;

    // RBAC: the ClusterRole loses `watch` on EndpointSlices.
    let mut role = find(&i.docs, "ClusterRole", "weft-control-weft")?.clone();
    for rule in role["rules"].as_array_mut().into_iter().flatten() {
        if rule["resources"] == json!(["endpointslices"]) {
            rule["verbs"] = json!(["get", "list"]);
        }
    }
    i.api.apply_value(role)?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    assert!(!passed);
    let rbac = named(
        &checks,
        "weft-control's permissions",
        "system:serviceaccount",
    )?;
    assert_eq!(rbac["status"], "fail", "{rbac:#}");
    assert!(
        rbac["detail"] == "may not watch endpointslices (discovery.k8s.io)"
            && rbac["hint"]
                .as_str()
                .is_some_and(|h| h.contains("weft-control-weft")),
        "{rbac:#}"
    );
    assert_eq!(failures(&checks).len(), 1, "{:#?}", failures(&checks));
    i.api
        .apply_value(find(&i.docs, "ClusterRole", "weft-control-weft")?.clone())?;

    // A pod whose image cannot be pulled; the Deployment is half ready.
    i.api
        .apply_value(pod("weft-control-7d9f-b", 1, Some("ImagePullBackOff")))?;
    let mut deployment = find(&i.docs, "Deployment", "weft-control")?.clone();
    deployment["status"] = json!({"replicas": 2, "readyReplicas": 1});
    i.api.apply_value(deployment)?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    assert!(!passed);
    let b = named(&checks, "control-plane pods", "pod weft-control-7d9f-b")?;
    assert!(
        b["status"] == "fail"
            && b["detail"]
                .as_str()
                .is_some_and(|d| d.contains("ImagePullBackOff"))
            && b["hint"]
                .as_str()
                .is_some_and(|h| h.contains("cannot be pulled")),
        "{b:#}"
    );
    let d = named(&checks, "control-plane pods", "Deployment")?;
    assert_eq!(
        (d["status"].as_str(), d["detail"].as_str()),
        (Some("warn"), Some("1/2 replicas ready"))
    );
    i.api
        .apply_value(pod("weft-control-7d9f-b", i.control.admin.port(), None))?;

    // The ConfigMap's anchors come from another CA: neither the Secret nor
    // the running control plane agrees with what proxies would trust.
    let other = MeshCa::new()?;
    let mut anchors = find(&i.docs, "ConfigMap", "weft-trust-anchors")?.clone();
    anchors["data"]["ca.crt"] = json!(std::fs::read_to_string(other.anchors())?);
    i.api.apply_value(anchors)?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    assert!(!passed);
    let agree = named(&checks, "identity in the cluster", "anchors agree")?;
    assert_eq!(agree["status"], "fail", "{agree:#}");
    let chain = named(&checks, "identity in the cluster", "issuer chain")?;
    assert_eq!(chain["status"], "fail", "{chain:#}");
    let a = named(&checks, "control-plane pods", "pod weft-control-7d9f-a")?;
    assert!(
        a["status"] == "fail"
            && a["detail"]
                .as_str()
                .is_some_and(|d| d.contains("differ from ConfigMap weft/weft-trust-anchors"))
            && a["hint"]
                .as_str()
                .is_some_and(|h| h.contains("rollout restart")),
        "{a:#}"
    );
    i.api
        .apply_value(find(&i.docs, "ConfigMap", "weft-trust-anchors")?.clone())?;

    // The webhook's serving certificate from another installation's CA.
    let foreign = install(&other.dir_str())?;
    i.api
        .apply_value(find(&foreign, "Secret", "weft-webhook-tls")?.clone())?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    assert!(!passed);
    let cert = named(&checks, "injection webhook", "serving certificate")?;
    assert!(
        cert["status"] == "fail"
            && cert["detail"]
                .as_str()
                .is_some_and(|d| d.contains("does not chain to the webhook's caBundle")),
        "{cert:#}"
    );
    assert_eq!(failures(&checks).len(), 1, "{:#?}", failures(&checks));
    i.api
        .apply_value(find(&i.docs, "Secret", "weft-webhook-tls")?.clone())?;

    // No ready endpoint behind the webhook's Service.
    i.api.apply_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "weft-webhook-x1", "namespace": "weft",
                     "labels": {"kubernetes.io/service-name": "weft-webhook"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": false}}],
    }))?;
    let (passed, checks) = check(i.dir.path(), &[]).await?;
    assert!(!passed);
    let ep = named(&checks, "injection webhook", "endpoints")?;
    assert!(
        ep["status"] == "fail"
            && ep["detail"]
                .as_str()
                .is_some_and(|d| d.contains("no ready endpoint")),
        "{ep:#}"
    );

    // And a namespace weft is not in.
    let (passed, checks) = check(i.dir.path(), &["--namespace", "elsewhere"]).await?;
    assert!(!passed);
    let ns = named(&checks, "kubernetes API", "namespace elsewhere")?;
    assert!(
        ns["hint"]
            .as_str()
            .is_some_and(|h| h.contains("weft install --namespace elsewhere")),
        "{ns:#}"
    );
    drop(i.ca);
    Ok(())
}

#[tokio::test]
async fn pre_install_checks_version_and_permissions() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    let dir = tempfile::tempdir()?;
    api.write_kubeconfig(&dir.path().join("kubeconfig"))?;

    let (passed, checks) = check(dir.path(), &["--pre"]).await?;
    assert!(passed, "{checks:#?}");
    // One permission asked for each kind `weft install` creates.
    let asked = checks
        .iter()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("can create "))
        })
        .count();
    assert_eq!(asked, 9, "{checks:#?}");
    assert_eq!(
        named(&checks, "kubernetes API", "namespace weft")?["detail"],
        "free"
    );

    api.deny("create", Resource::ClusterRoles);
    api.deny("create", Resource::MutatingWebhookConfigurations);
    api.set_version("1", "28");
    let (passed, checks) = check(dir.path(), &["--pre"]).await?;
    assert!(!passed);
    assert_eq!(
        failures(&checks),
        [
            "\"version\": \"1.28 is older than 1.29: the injected proxy is a native sidecar, which it does not run\"",
            "\"can create clusterroles\": \"you may not create clusterroles: denied by the double\"",
            "\"can create mutatingwebhookconfigurations\": \"you may not create mutatingwebhookconfigurations: denied by the double\"",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_cluster_says_so() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let api = ApiServer::start().await?;
    api.write_kubeconfig(&dir.path().join("kubeconfig"))?;
    drop(api);
    let (passed, checks) = check(dir.path(), &[]).await?;
    assert!(!passed);
    let c = named(&checks, "kubernetes API", "reachable")?;
    assert!(
        c["status"] == "fail"
            && c["hint"]
                .as_str()
                .is_some_and(|h| h.contains("kubectl version")),
        "{c:#}"
    );
    assert_eq!(checks.len(), 1, "nothing else is tried: {checks:#?}");
    Ok(())
}
