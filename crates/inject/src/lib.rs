//! Meshing a Kubernetes workload: the pod template gains the capture step
//! (`weft init` in an init container with only NET_ADMIN and NET_RAW) and
//! weft's proxy as a native sidecar (an init container with
//! `restartPolicy: Always`: it starts, and is ready, before the
//! application, and does not keep a Job from completing), with its
//! identity from the pod's ServiceAccount (a projected token, audience
//! `weft`), the mesh's trust anchors, ports and probes. Annotations
//! override the defaults. Injecting twice gives what injecting once gave.
//!
//! The same code serves `weft inject` (files) and the admission webhook
//! (one pod at a time). It works on JSON values, so everything it does not
//! touch is kept as it was.

use serde_json::{Map, Value, json};

/// Asks for injection (`enabled`) or against it (`disabled`), on a
/// workload, its pod template or (through the webhook) its namespace.
pub const INJECT: &str = "weft.io/inject";
/// The names injection gives what it adds: injecting again replaces them.
pub const PROXY_CONTAINER: &str = "weft-proxy";
pub const INIT_CONTAINER: &str = "weft-init";
const TOKEN_VOLUME: &str = "weft-token";
const ANCHORS_VOLUME: &str = "weft-trust-anchors";
/// A writable /run for iptables' lock file, the root filesystem being
/// read-only.
const INIT_RUN_VOLUME: &str = "weft-init-run";
/// The uid the proxy runs as: its own traffic is not captured.
pub const PROXY_UID: i64 = 2102;

/// What every injected pod shares.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `weft-proxy` image, e.g. `ghcr.io/weft/weft-proxy:0.1.0`.
    pub proxy_image: String,
    /// The `weft` CLI image (runs `weft init`).
    pub init_image: String,
    /// Where proxies reach the control plane.
    pub control_addr: String,
    /// The ConfigMap holding `ca.crt`.
    pub anchors_config_map: String,
    pub trust_domain: String,
}

impl Settings {
    /// The defaults for a release, with the control plane in `namespace`.
    pub fn new(registry: &str, version: &str, namespace: &str) -> Self {
        Self {
            proxy_image: format!("{registry}/weft-proxy:{version}"),
            init_image: format!("{registry}/weft:{version}"),
            control_addr: format!("weft-control.{namespace}.svc.cluster.local:8086"),
            anchors_config_map: "weft-trust-anchors".into(),
            trust_domain: "weft.local".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("{kind} {name}: {what} is not an object")]
    Shape {
        kind: String,
        name: String,
        what: &'static str,
    },
    #[error("{kind} {name}: annotation {key}={value:?}: {reason}")]
    Annotation {
        kind: String,
        name: String,
        key: String,
        value: String,
        reason: &'static str,
    },
}

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Not a workload, not asked for, or asked against.
    Skipped(&'static str),
}

/// Injects `object` (any kind; a `List`'s items one by one) when it asks
/// for it or `all`; returns what happened to each workload in it.
pub fn inject_object(
    object: &mut Value,
    settings: &Settings,
    all: bool,
) -> Result<Vec<Outcome>, InjectError> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" || (kind.ends_with("List") && object["items"].is_array()) {
        let mut outcomes = Vec::new();
        if let Some(items) = object["items"].as_array_mut() {
            for item in items {
                outcomes.extend(inject_object(item, settings, all)?);
            }
        }
        return Ok(outcomes);
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("(unnamed)")
        .to_string();
    let workload_wants = wants(&object["metadata"]);
    let Some(template) = pod_template(object, &kind) else {
        return Ok(vec![Outcome::Skipped("not a workload")]);
    };
    let asked = match (wants(&template["metadata"]), workload_wants) {
        (Some(w), _) | (None, Some(w)) => Some(w),
        (None, None) => None,
    };
    match asked {
        Some(false) => return Ok(vec![Outcome::Skipped("weft.io/inject: disabled")]),
        None if !all => return Ok(vec![Outcome::Skipped("not asked for")]),
        _ => {}
    }
    inject_template(template, settings, &kind, &name)?;
    Ok(vec![Outcome::Injected])
}

/// Whether `metadata`'s annotations ask for injection: `Some(true)`,
/// `Some(false)` (disabled), or `None` (silent).
fn wants(metadata: &Value) -> Option<bool> {
    match metadata["annotations"][INJECT].as_str() {
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        _ => None,
    }
}

/// The pod template of a workload kind (the Pod itself for a Pod).
fn pod_template<'a>(object: &'a mut Value, kind: &str) -> Option<&'a mut Value> {
    match kind {
        "Pod" => Some(object),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => object.get_mut("spec")?.get_mut("template"),
        "CronJob" => object
            .get_mut("spec")?
            .get_mut("jobTemplate")?
            .get_mut("spec")?
            .get_mut("template"),
        _ => None,
    }
}

/// Injects one pod template (`{metadata, spec}`), replacing what an
/// earlier injection added.
pub fn inject_template(
    template: &mut Value,
    settings: &Settings,
    kind: &str,
    name: &str,
) -> Result<(), InjectError> {
    let shape = |what| InjectError::Shape {
        kind: kind.to_string(),
        name: name.to_string(),
        what,
    };
    let annotations = template["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let get = |key: &str| annotations.get(key).and_then(Value::as_str);
    let annotation_error = |key: &str, value: &str, reason| InjectError::Annotation {
        kind: kind.to_string(),
        name: name.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    let ports = |key: &str| -> Result<Option<String>, InjectError> {
        match get(key) {
            None => Ok(None),
            Some(v) if v.split(',').all(|p| valid_port_or_range(p.trim())) => {
                Ok(Some(v.to_string()))
            }
            Some(v) => Err(annotation_error(
                key,
                v,
                "must be ports or ranges, comma-separated (22,8000-8100)",
            )),
        }
    };
    let quantity = |key: &str| -> Result<Option<String>, InjectError> {
        match get(key) {
            None => Ok(None),
            Some(v) if valid_quantity(v) => Ok(Some(v.to_string())),
            Some(v) => Err(annotation_error(
                key,
                v,
                "must be a quantity such as 100m or 64Mi",
            )),
        }
    };
    let skip_in = ports("weft.io/skip-inbound-ports")?;
    let skip_out = ports("weft.io/skip-outbound-ports")?;
    let cpu_request = quantity("weft.io/proxy-cpu-request")?.unwrap_or_else(|| "10m".into());
    let cpu_limit = quantity("weft.io/proxy-cpu-limit")?;
    let memory_request = quantity("weft.io/proxy-memory-request")?.unwrap_or_else(|| "20Mi".into());
    let memory_limit = quantity("weft.io/proxy-memory-limit")?.unwrap_or_else(|| "128Mi".into());

    let spec = template
        .as_object_mut()
        .ok_or(shape("the pod template"))?
        .entry("spec")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or(shape("the pod spec"))?;

    let mut init_args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
    ];
    if let Some(p) = &skip_in {
        init_args.extend(["--skip-inbound-ports".into(), p.clone()]);
    }
    if let Some(p) = &skip_out {
        init_args.extend(["--skip-outbound-ports".into(), p.clone()]);
    }
    let init = json!({
        "name": INIT_CONTAINER,
        "image": settings.init_image,
        "args": init_args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "10Mi"}, "limits": {"memory": "50Mi"}},
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
    });
    let mut limits = Map::new();
    if let Some(cpu) = cpu_limit {
        limits.insert("cpu".into(), json!(cpu));
    }
    limits.insert("memory".into(), json!(memory_limit));
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env_from = |name: &str, path: &str| {
        let mut e = field(path);
        e["name"] = json!(name);
        e
    };
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": 4191},
            "periodSeconds": 2,
            "failureThreshold": 3,
        })
    };
    let proxy = json!({
        "name": PROXY_CONTAINER,
        "image": settings.proxy_image,
        // A native sidecar: started (and ready, by its startup probe)
        // before the application, stopped after it, never holding a Job.
        "restartPolicy": "Always",
        "env": [
            env_from("WEFT_POD_NAME", "metadata.name"),
            env_from("WEFT_POD_NAMESPACE", "metadata.namespace"),
            env_from("WEFT_POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env_from("WEFT_POD_IP", "status.podIP"),
            {"name": "WEFT_PROXY_IDENTITY_NAME", "value": format!("$(WEFT_POD_SERVICE_ACCOUNT).$(WEFT_POD_NAMESPACE).serviceaccount.identity.{}", settings.trust_domain)},
            {"name": "WEFT_PROXY_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/weft/token/token"},
            {"name": "WEFT_PROXY_TRUST_ANCHORS", "value": "/var/run/weft/trust-anchors/ca.crt"},
            {"name": "WEFT_PROXY_CONTROL_ADDR", "value": settings.control_addr},
            {"name": "WEFT_PROXY_OUTBOUND_LISTEN", "value": "127.0.0.1:4140"},
            {"name": "WEFT_PROXY_INBOUND_LISTEN", "value": "0.0.0.0:4143"},
            {"name": "WEFT_PROXY_ADMIN_LISTEN", "value": "0.0.0.0:4191"},
        ],
        "ports": [
            {"name": "weft-inbound", "containerPort": 4143, "protocol": "TCP"},
            {"name": "weft-admin", "containerPort": 4191, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/ready", "port": 4191},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/live"),
        "resources": {
            "requests": {"cpu": cpu_request, "memory": memory_request},
            "limits": limits,
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/weft/token", "readOnly": true},
            {"name": ANCHORS_VOLUME, "mountPath": "/var/run/weft/trust-anchors", "readOnly": true},
        ],
    });
    // Capture first, then the proxy, then whatever init containers the
    // pod had (which then run meshed).
    let mut inits: Vec<Value> = spec
        .get("initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    inits.retain(|c| {
        let n = c["name"].as_str();
        n != Some(INIT_CONTAINER) && n != Some(PROXY_CONTAINER)
    });
    let mut all = vec![init, proxy];
    all.extend(inits);
    spec.insert("initContainers".into(), Value::Array(all));

    let mut volumes: Vec<Value> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    volumes.retain(|v| {
        let n = v["name"].as_str();
        n != Some(TOKEN_VOLUME) && n != Some(ANCHORS_VOLUME) && n != Some(INIT_RUN_VOLUME)
    });
    volumes.push(json!({"name": INIT_RUN_VOLUME, "emptyDir": {}}));
    volumes.push(json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": "weft",
            "expirationSeconds": 3600,
            "path": "token",
        }}]},
    }));
    volumes.push(json!({
        "name": ANCHORS_VOLUME,
        "configMap": {"name": settings.anchors_config_map},
    }));
    spec.insert("volumes".into(), Value::Array(volumes));
    Ok(())
}

fn valid_port_or_range(s: &str) -> bool {
    let port = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    match s.split_once('-') {
        Some((a, b)) => port(a) && port(b),
        None => port(s),
    }
}

/// A Kubernetes quantity, as far as a resource annotation needs: digits
/// (optionally a decimal point) and a known suffix.
fn valid_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::new("ghcr.io/weft", "0.1.0", "weft")
    }

    fn deployment(annotations: Value) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}, "annotations": annotations},
                    "spec": {
                        "initContainers": [{"name": "migrate", "image": "m"}],
                        "containers": [{"name": "app", "image": "web:1"}],
                    },
                },
            },
        })
    }

    #[test]
    fn injection_adds_capture_and_a_native_sidecar_before_the_pods_own_init() {
        let mut d = deployment(json!({"weft.io/inject": "enabled"}));
        assert_eq!(
            inject_object(&mut d, &settings(), false),
            Ok(vec![Outcome::Injected])
        );
        let spec = &d["spec"]["template"]["spec"];
        let names: Vec<&str> = spec["initContainers"]
            .as_array()
            .expect("inits")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(spec["initContainers"][1]["restartPolicy"], "Always");
        assert_eq!(
            spec["initContainers"][0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(
            spec["containers"],
            json!([{"name": "app", "image": "web:1"}])
        );
        // Twice is once.
        let once = d.clone();
        inject_object(&mut d, &settings(), false).expect("again");
        assert_eq!(d, once);
    }

    #[test]
    fn only_what_asks_is_injected_and_bad_annotations_are_named() {
        let mut silent = deployment(json!({}));
        assert_eq!(
            inject_object(&mut silent, &settings(), false),
            Ok(vec![Outcome::Skipped("not asked for")])
        );
        let mut disabled = deployment(json!({"weft.io/inject": "disabled"}));
        assert_eq!(
            inject_object(&mut disabled, &settings(), true),
            Ok(vec![Outcome::Skipped("weft.io/inject: disabled")])
        );
        let mut service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}});
        assert_eq!(
            inject_object(&mut service, &settings(), true),
            Ok(vec![Outcome::Skipped("not a workload")])
        );
        let mut bad =
            deployment(json!({"weft.io/inject": "enabled", "weft.io/proxy-cpu-limit": "lots"}));
        let err = inject_object(&mut bad, &settings(), false).expect_err("bad");
        assert!(
            err.to_string().contains("weft.io/proxy-cpu-limit=\"lots\""),
            "{err}"
        );
        let mut ports = deployment(
            json!({"weft.io/inject": "enabled", "weft.io/skip-outbound-ports": "5432,8000-8100"}),
        );
        inject_object(&mut ports, &settings(), false).expect("ports");
        let args = &ports["spec"]["template"]["spec"]["initContainers"][0]["args"];
        assert!(
            args.as_array()
                .expect("args")
                .contains(&json!("5432,8000-8100")),
            "{args}"
        );
    }
}
