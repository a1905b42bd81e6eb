//! `weft install`: the manifest that installs weft on a Kubernetes cluster,
//! on stdout, for `kubectl apply -f -`: the namespace, the control plane
//! (two replicas, least-privilege RBAC, probes, limits, non-root, read-only
//! root filesystem, no capabilities), its Services, the mesh's identity
//! (the issuer and token key in a Secret, the trust anchor in a ConfigMap;
//! never the anchor's private key), and the injection webhook with a
//! serving certificate signed by the mesh's issuer.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine as _;
use serde_json::{Value, json};
use weft_identity::{CaDir, Issuer, Name, to_pem};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The namespace weft runs in.
    #[arg(long, default_value = "weft")]
    namespace: String,
    /// The mesh's CA (`weft identity init --dir DIR --anchor-key-out ...`):
    /// ca.crt, issuer.crt, issuer.key, token.key.
    #[arg(long, value_name = "DIR")]
    identity_dir: PathBuf,
    /// Create the CA in --identity-dir first (which must not hold one),
    /// with the anchor's key written to --anchor-key-out, never to the
    /// cluster.
    #[arg(long, requires = "anchor_key_out")]
    generate_ca: bool,
    /// Where --generate-ca puts the trust anchor's private key: keep it
    /// offline; it is needed only to mint a new issuer.
    #[arg(long, value_name = "PATH")]
    anchor_key_out: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, default_value = "weft.local")]
    trust_domain: Name,
    /// Where the images come from.
    #[arg(long, default_value = "ghcr.io/weft")]
    registry: String,
    /// The images' version.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
}

const CONTROL_PORT: u16 = 8086;
pub(crate) const ADMIN_PORT: u16 = 9990;

/// The names of the objects `weft install` makes, which `weft check
/// --kubernetes` looks for.
pub(crate) mod names {
    /// The ServiceAccount, Deployment, Service and pods' label.
    pub(crate) const CONTROL: &str = "weft-control";
    pub(crate) const WEBHOOK_SERVICE: &str = "weft-webhook";
    pub(crate) const WEBHOOK_TLS: &str = "weft-webhook-tls";
    pub(crate) const TRUST_ANCHORS: &str = "weft-trust-anchors";
    pub(crate) const IDENTITY: &str = "weft-identity";
    /// The label every control-plane object carries.
    pub(crate) const NAME_LABEL: &str = "app.kubernetes.io/name";

    /// Cluster-scoped objects carry the namespace, so that installs in two
    /// namespaces do not collide.
    pub(crate) fn cluster_role(ns: &str) -> String {
        format!("weft-control-{ns}")
    }

    pub(crate) fn webhook_configuration(ns: &str) -> String {
        format!("weft-inject-{ns}")
    }
}

/// What weft-control may do, and nothing else: (API group, resources,
/// verbs).
pub(crate) const CONTROL_RULES: &[(&str, &[&str], &[&str])] = &[
    ("", &["services", "pods"], &["get", "list", "watch"]),
    (
        "discovery.k8s.io",
        &["endpointslices"],
        &["get", "list", "watch"],
    ),
    ("authentication.k8s.io", &["tokenreviews"], &["create"]),
];

/// What installing creates: (API group, resource, namespaced).
pub(crate) const CREATES: &[(&str, &str, bool)] = &[
    ("", "namespaces", false),
    ("", "serviceaccounts", true),
    ("rbac.authorization.k8s.io", "clusterroles", false),
    ("rbac.authorization.k8s.io", "clusterrolebindings", false),
    ("", "configmaps", true),
    ("", "secrets", true),
    ("apps", "deployments", true),
    ("", "services", true),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        false,
    ),
];
const WEBHOOK_PORT: u16 = 8443;

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let ca = match (&args.generate_ca, &args.anchor_key_out) {
        (true, Some(key_out)) => {
            let ca = CaDir::with_anchor_key(&args.identity_dir, key_out);
            ca.init(&args.trust_domain, false)
                .with_context(|| format!("creating the CA in {}", args.identity_dir.display()))?;
            eprintln!(
                "weft install: a new CA in {}; its anchor key is in {} (keep it offline)",
                args.identity_dir.display(),
                key_out.display()
            );
            ca
        }
        _ => CaDir::new(&args.identity_dir),
    };
    let docs = manifests(&args, &ca)?;
    print!("{}", serde_saphyr::to_string_multiple(&docs)?);
    Ok(())
}

fn read(path: PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every object, in the order `kubectl apply` wants them.
fn manifests(args: &Args, ca: &CaDir) -> anyhow::Result<Vec<Value>> {
    let ns = args.namespace.as_str();
    ca.check_served()
        .context("the identity directory must not hold the trust anchor's key")?;
    let anchors = read(ca.anchor_cert())?;
    let issuer_cert = read(ca.issuer_cert())?;
    let issuer_key = read(ca.issuer_key())?;
    let token_key = read(ca.token_key())?;

    // The webhook's serving certificate: from the mesh's issuer, so the
    // trust anchor is its caBundle.
    let webhook_name: Name = format!("weft-webhook.{ns}.svc")
        .parse()
        .with_context(|| format!("--namespace {ns:?} makes no valid service name"))?;
    let issuer = Issuer::load(ca).context("loading the issuer")?;
    let (key, csr) = weft_identity::new_csr(&webhook_name)?;
    let leaf = issuer
        .certify(
            &csr,
            &webhook_name,
            Duration::from_secs(365 * 24 * 3600),
            SystemTime::now(),
        )
        .context("signing the webhook's certificate")?;
    let webhook_chain = format!("{}{}", to_pem(&leaf.der), to_pem(issuer.cert()));

    let labels = json!({names::NAME_LABEL: names::CONTROL, "app.kubernetes.io/part-of": "weft"});
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels});
    let image = |bin: &str| format!("{}/{bin}:{}", args.registry, args.version);
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": 5, "failureThreshold": 3});
    let webhook = |name: &str, path: &str, selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "service": {"name": names::WEBHOOK_SERVICE, "namespace": ns, "path": path, "port": 443},
                "caBundle": b64(&anchors),
            },
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            // A weft outage must not stop pods from starting: they start
            // unmeshed, and `weft check` shows them.
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": selector,
        })
    };
    Ok(vec![
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"weft.io/inject": "disabled", "app.kubernetes.io/part-of": "weft"}},
        }),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(names::CONTROL)}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": names::cluster_role(ns), "labels": labels},
            "rules": CONTROL_RULES.iter().map(|(group, resources, verbs)| json!({
                "apiGroups": [group], "resources": resources, "verbs": verbs,
            })).collect::<Vec<_>>(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": names::cluster_role(ns), "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": names::cluster_role(ns)},
            "subjects": [{"kind": "ServiceAccount", "name": names::CONTROL, "namespace": ns}],
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(names::TRUST_ANCHORS),
            "data": {"ca.crt": anchors},
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(names::IDENTITY),
            "type": "Opaque",
            "data": {
                "ca.crt": b64(&anchors),
                "issuer.crt": b64(&issuer_cert),
                "issuer.key": b64(&issuer_key),
                "token.key": b64(&token_key),
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(names::WEBHOOK_TLS),
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(&webhook_chain), "tls.key": b64(&key.serialize_pem())},
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(names::CONTROL),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {names::NAME_LABEL: names::CONTROL}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": names::CONTROL,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 2103, "runAsGroup": 2103, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "weft-control",
                            "image": image("weft-control"),
                            "args": [
                                "--listen", format!("0.0.0.0:{CONTROL_PORT}"),
                                "--admin-listen", format!("0.0.0.0:{ADMIN_PORT}"),
                                "--name", format!("weft-control.{ns}.svc.cluster.local"),
                                "--identity-dir", "/var/run/weft/identity",
                                "--spent-tokens", "/var/run/weft/spent/tokens",
                                "--kubernetes",
                                "--trust-domain", args.trust_domain.as_str(),
                                "--namespace", ns,
                                "--webhook-listen", format!("0.0.0.0:{WEBHOOK_PORT}"),
                                "--webhook-cert", "/var/run/weft/webhook/tls.crt",
                                "--webhook-key", "/var/run/weft/webhook/tls.key",
                                "--inject-registry", args.registry.as_str(),
                                "--inject-version", args.version.as_str(),
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": CONTROL_PORT, "protocol": "TCP"},
                                {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                                {"name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"},
                            ],
                            "readinessProbe": probe("/ready"),
                            "livenessProbe": probe("/live"),
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "64Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "identity", "mountPath": "/var/run/weft/identity", "readOnly": true},
                                {"name": "webhook-tls", "mountPath": "/var/run/weft/webhook", "readOnly": true},
                                {"name": "spent", "mountPath": "/var/run/weft/spent"},
                            ],
                        }],
                        "volumes": [
                            {"name": "identity", "secret": {"secretName": names::IDENTITY, "defaultMode": 0o400}},
                            {"name": "webhook-tls", "secret": {"secretName": names::WEBHOOK_TLS, "defaultMode": 0o400}},
                            {"name": "spent", "emptyDir": {}},
                        ],
                    },
                },
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(names::CONTROL),
            "spec": {
                "selector": {names::NAME_LABEL: names::CONTROL},
                "ports": [{"name": "grpc", "port": CONTROL_PORT, "targetPort": "grpc", "protocol": "TCP"}],
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(names::WEBHOOK_SERVICE),
            "spec": {
                "selector": {names::NAME_LABEL: names::CONTROL},
                "ports": [{"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": names::webhook_configuration(ns), "labels": labels},
            "webhooks": [
                // Namespaces labelled weft.io/inject=enabled: every pod
                // that does not say disabled.
                webhook("namespaces.inject.weft.io", "/inject-all", json!({
                    "matchLabels": {"weft.io/inject": "enabled"},
                })),
                // Elsewhere (never weft's own namespace or kube-system):
                // pods annotated weft.io/inject=enabled.
                webhook("pods.inject.weft.io", "/inject", json!({
                    "matchExpressions": [
                        {"key": "weft.io/inject", "operator": "NotIn", "values": ["enabled", "disabled"]},
                        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns, "kube-system"]},
                    ],
                })),
            ],
        }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `weft check --kubernetes --pre` asks for permission to create what
    /// CREATES lists: it must be everything the manifest holds.
    #[test]
    fn creates_lists_every_kind_installed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let args = Args {
            namespace: "weft".into(),
            identity_dir: dir.path().join("ca"),
            generate_ca: true,
            anchor_key_out: Some(dir.path().join("anchor.key")),
            trust_domain: "weft.local".parse()?,
            registry: "r".into(),
            version: "v".into(),
        };
        let ca = CaDir::with_anchor_key(&args.identity_dir, dir.path().join("anchor.key"));
        ca.init(&args.trust_domain, false)?;
        for doc in manifests(&args, &ca)? {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let group = doc["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .rsplit_once('/')
                .map_or("", |(g, _)| g);
            let namespaced = doc["metadata"]["namespace"].is_string();
            let plural = format!("{}s", kind.to_lowercase());
            assert!(
                CREATES.contains(&(group, plural.as_str(), namespaced)),
                "{kind} ({group}, {plural}, namespaced {namespaced}) is not in CREATES"
            );
        }
        Ok(())
    }
}
