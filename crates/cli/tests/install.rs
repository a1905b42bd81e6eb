//! `weft install`: a complete manifest that is valid Kubernetes by the real
//! schemas (`kubernetes-validate --strict`, 1.29 and 1.37), grants the
//! control plane only what it uses, never carries the trust anchor's key,
//! runs the control plane with flags it has, and serves the webhook with a
//! certificate the caBundle verifies for the webhook's name.

use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};
use weft_test_support::workspace_binary;

fn b64(v: &Value) -> anyhow::Result<String> {
    let s = v
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("not a string: {v}"))?;
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(s)?,
    )?)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| anyhow::anyhow!("no {kind} {name}"))
}

#[test]
fn the_manifest_is_complete_valid_and_least_privileged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let anchor_key = dir.path().join("anchor.key");
    let out = Command::new(workspace_binary("weft")?)
        .args(["install", "--generate-ca", "--identity-dir"])
        .arg(&ca)
        .arg("--anchor-key-out")
        .arg(&anchor_key)
        .output()?;
    let yaml = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Secret",
            "Secret",
            "Deployment",
            "Service",
            "Service",
            "MutatingWebhookConfiguration"
        ]
    );
    let path = dir.path().join("install.yaml");
    std::fs::write(&path, &yaml)?;
    for version in ["1.29.0", "1.37.0"] {
        let v = Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .arg(&path)
            .output()
            .map_err(|e| anyhow::anyhow!("kubernetes-validate (.ci/run installs it): {e}"))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(
            v.status.success() && !said.contains("ERROR") && !said.contains("WARN"),
            "{version}: {said}"
        );
    }

    // The anchor's key stays on this machine.
    let key = std::fs::read_to_string(&anchor_key)?;
    // The whole body: every P-256 PKCS#8 key starts with the same bytes.
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!yaml.replace('\n', "").contains(&key_body));
    for secret in ["weft-identity", "weft-webhook-tls"] {
        for (_, v) in find(&docs, "Secret", secret)?["data"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let text: String = b64(v)?
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect();
            assert!(!text.contains(&key_body), "{secret} holds the anchor key");
        }
    }

    // Least privilege: reading Services, Pods and EndpointSlices, and
    // creating TokenReviews; nothing else.
    assert_eq!(
        find(&docs, "ClusterRole", "weft-control-weft")?["rules"],
        json!([
            {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        ])
    );

    // The control plane: two replicas, hardened, with flags it really has.
    let deployment = find(&docs, "Deployment", "weft-control")?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/live");
    let help = Command::new(workspace_binary("weft-control")?)
        .arg("--help")
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    for arg in container["args"].as_array().into_iter().flatten() {
        if let Some(flag) = arg.as_str().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "weft-control has no {flag}"
            );
        }
    }

    // The webhook's certificate: for weft-webhook.weft.svc, verified by the
    // configuration's caBundle.
    let tls = find(&docs, "Secret", "weft-webhook-tls")?;
    let chain = b64(&tls["data"]["tls.crt"])?;
    let hook = find(&docs, "MutatingWebhookConfiguration", "weft-inject-weft")?;
    let bundle = b64(&hook["webhooks"][0]["clientConfig"]["caBundle"])?;
    let split = chain
        .find("-----END CERTIFICATE-----")
        .map(|i| i + 26)
        .unwrap_or(0);
    let (leaf, intermediate) = chain.split_at(split);
    for (name, text) in [
        ("leaf.pem", leaf),
        ("issuer.pem", intermediate),
        ("bundle.pem", bundle.as_str()),
    ] {
        std::fs::write(dir.path().join(name), text)?;
    }
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "weft-webhook.weft.svc",
            "-CAfile",
        ])
        .arg(dir.path().join("bundle.pem"))
        .arg("-untrusted")
        .arg(dir.path().join("issuer.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()?;
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // Both webhook entries: namespaces that opt in, and annotated pods
    // elsewhere; a weft outage never blocks pods.
    let paths: Vec<&str> = hook["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["clientConfig"]["service"]["path"].as_str())
        .collect();
    assert_eq!(paths, ["/inject-all", "/inject"]);
    assert_eq!(hook["webhooks"][1]["failurePolicy"], "Ignore");

    // A directory that holds the anchor's key is refused.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad)?;
    for f in ["ca.crt", "issuer.crt", "issuer.key", "token.key"] {
        std::fs::copy(ca.join(f), bad.join(f))?;
    }
    std::fs::copy(&anchor_key, bad.join("ca.key"))?;
    let out = Command::new(workspace_binary("weft")?)
        .args(["install", "--identity-dir"])
        .arg(&bad)
        .output()?;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("anchor"), "{said}");
    Ok(())
}
