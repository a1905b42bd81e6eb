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
const ADMIN_PORT: u16 = 9990;
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

    let labels =
        json!({"app.kubernetes.io/name": "weft-control", "app.kubernetes.io/part-of": "weft"});
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels});
    let image = |bin: &str| format!("{}/{bin}:{}", args.registry, args.version);
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": 5, "failureThreshold": 3});
    let webhook = |name: &str, path: &str, selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "service": {"name": "weft-webhook", "namespace": ns, "path": path, "port": 443},
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
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("weft-control")}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": format!("weft-control-{ns}"), "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("weft-control-{ns}"), "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("weft-control-{ns}")},
            "subjects": [{"kind": "ServiceAccount", "name": "weft-control", "namespace": ns}],
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("weft-trust-anchors"),
            "data": {"ca.crt": anchors},
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("weft-identity"),
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
            "metadata": meta("weft-webhook-tls"),
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(&webhook_chain), "tls.key": b64(&key.serialize_pem())},
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("weft-control"),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app.kubernetes.io/name": "weft-control"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "weft-control",
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
                            {"name": "identity", "secret": {"secretName": "weft-identity", "defaultMode": 0o400}},
                            {"name": "webhook-tls", "secret": {"secretName": "weft-webhook-tls", "defaultMode": 0o400}},
                            {"name": "spent", "emptyDir": {}},
                        ],
                    },
                },
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("weft-control"),
            "spec": {
                "selector": {"app.kubernetes.io/name": "weft-control"},
                "ports": [{"name": "grpc", "port": CONTROL_PORT, "targetPort": "grpc", "protocol": "TCP"}],
            },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("weft-webhook"),
            "spec": {
                "selector": {"app.kubernetes.io/name": "weft-control"},
                "ports": [{"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": format!("weft-inject-{ns}"), "labels": labels},
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
