//! `weft inject`: workloads that ask are meshed, the rest pass through,
//! injecting twice is injecting once, and what comes out is valid
//! Kubernetes by the real schemas (`kubernetes-validate --strict`, from
//! PyPI; `.ci/run` installs it), for the oldest version weft supports
//! (1.29: native sidecars) and the newest the tool ships (1.37).

use std::io::Write as _;
use std::process::{Command, Stdio};

use weft_test_support::workspace_binary;

const MANIFESTS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        weft.io/inject: enabled
        weft.io/skip-outbound-ports: "5432"
        weft.io/proxy-cpu-limit: 500m
    spec:
      serviceAccountName: web
      initContainers:
        - name: migrate
          image: "web:1"
      containers:
        - name: app
          image: "web:1"
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  annotations: {weft.io/inject: enabled}
spec:
  schedule: "*/5 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: "report:1"}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: once, image: "once:1"}]
"#;

/// `weft inject ARGS -` with `input` on stdin: (success, stdout, stderr).
fn inject(args: &[&str], input: &str) -> anyhow::Result<(bool, String, String)> {
    let mut child = Command::new(workspace_binary("weft")?)
        .arg("inject")
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

fn validate(yaml: &str, version: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("out.yaml");
    std::fs::write(&path, yaml)?;
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version])
        .arg(&path)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "kubernetes-validate (pip install kubernetes-validate; .ci/run does): {e}"
            )
        })?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "{version}: {said}");
    anyhow::ensure!(
        !said.contains("ERROR") && !said.contains("WARN"),
        "{version}: {said}"
    );
    Ok(())
}

#[test]
fn workloads_that_ask_are_meshed_validly_and_twice_is_once() -> anyhow::Result<()> {
    let (ok, out, said) = inject(&[], MANIFESTS)?;
    assert!(ok, "{said}");
    for line in [
        "Deployment web: injected",
        "Service web: skipped (not a workload)",
        "CronJob report: injected",
        "Job once: skipped (not asked for)",
    ] {
        assert!(said.contains(line), "{line:?} not in {said}");
    }
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out)?;
    assert_eq!(docs.len(), 4);
    let web = &docs[0]["spec"]["template"]["spec"];
    let inits: Vec<&str> = web["initContainers"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no init containers"))?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(inits, ["weft-init", "weft-proxy", "migrate"]);
    let proxy = &web["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["resources"]["limits"]["cpu"], "500m");
    assert!(
        web["initContainers"][0]["args"]
            .to_string()
            .contains("5432")
    );
    // Untouched: the Service and the Job, exactly.
    let original: Vec<serde_json::Value> = serde_saphyr::from_multiple(MANIFESTS)?;
    assert_eq!(docs[1], original[1]);
    assert_eq!(docs[3], original[3]);

    let (ok, again, _) = inject(&[], &out)?;
    assert!(ok);
    assert_eq!(again, out, "injecting twice must equal injecting once");

    let (ok, all, said) = inject(&["--all"], MANIFESTS)?;
    assert!(ok && said.contains("Job once: injected"), "{said}");

    for version in ["1.29.0", "1.37.0"] {
        validate(&out, version)?;
        validate(&all, version)?;
    }
    Ok(())
}

#[test]
fn json_lists_pods_and_bad_annotations() -> anyhow::Result<()> {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "p", "annotations": {"weft.io/inject": "enabled"}},
         "spec": {"containers": [{"name": "c", "image": "i"}]}}]}"#;
    let (ok, out, said) = inject(&[], list)?;
    assert!(ok, "{said}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v["items"][0]["spec"]["initContainers"][1]["name"],
        "weft-proxy"
    );

    let bad = MANIFESTS.replace("500m", "lots");
    let (ok, _, said) = inject(&[], &bad)?;
    assert!(!ok);
    assert!(
        said.contains("Deployment web: annotation weft.io/proxy-cpu-limit=\"lots\""),
        "{said}"
    );
    let (ok, _, said) = inject(&[], "kind: [unclosed")?;
    assert!(!ok && said.contains("not YAML"), "{said}");
    Ok(())
}
