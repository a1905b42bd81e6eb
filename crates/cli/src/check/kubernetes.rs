//! `weft check --kubernetes`: before installing, whether this cluster and
//! this user can take weft; after, whether what `weft install` made is
//! there and working: weft-control's permissions, its pods, the webhook
//! and its certificate, and one set of trust anchors everywhere.

use std::collections::BTreeSet;
use std::time::SystemTime;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use weft_identity::verify_signed_by;

use super::{ANCHOR_WARN, ISSUER_WARN, Report, Status, certs, fail, validity, warn};
use crate::install::{ADMIN_PORT, CONTROL_RULES, CREATES, names};

/// The oldest Kubernetes weft supports: the injected proxy is a native
/// sidecar (an init container with `restartPolicy: Always`), on by default
/// since 1.29.
const OLDEST: (u32, u32) = (1, 29);
/// A webhook certificate this close to expiry is a warning.
const WEBHOOK_WARN: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

const API: &str = "kubernetes API";
const RBAC: &str = "weft-control's permissions";
const IDENTITY: &str = "identity in the cluster";
const WEBHOOK: &str = "injection webhook";
const CONTROL: &str = "control-plane pods";

/// A failed check: status, what is wrong, what to do.
type Problem = (Status, String, String);
type Outcome = Result<String, Problem>;
type Certs = Vec<(Vec<u8>, weft_identity::CertInfo)>;

pub(super) struct Options<'a> {
    pub kubeconfig: Option<&'a std::path::Path>,
    pub namespace: &'a str,
    /// Before `weft install`: can it be installed here?
    pub pre: bool,
}

pub(super) async fn run(report: &mut Report, opts: Options<'_>) {
    let client = match weft_control::kubernetes_client(opts.kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            report.push(
                API,
                "configuration",
                fail(
                    e.to_string(),
                    "set KUBECONFIG or pass --kubeconfig FILE (what `kubectl` uses)",
                ),
            );
            return;
        }
    };
    if !version(report, &client).await {
        return;
    }
    let ns = opts.namespace;
    let namespace = Api::<Namespace>::all(client.clone()).get_opt(ns).await;
    if opts.pre {
        pre_install(report, &client, ns, namespace).await;
        return;
    }
    match namespace {
        Ok(Some(_)) => report.push(API, format!("namespace {ns}"), Ok("exists".into())),
        Ok(None) => {
            report.push(
                API,
                format!("namespace {ns}"),
                fail(
                    "not found: weft is not installed here",
                    format!(
                        "`weft install --namespace {ns} --identity-dir DIR | kubectl apply -f -` (check first with `weft check --kubernetes --pre`)"
                    ),
                ),
            );
            return;
        }
        Err(e) => {
            report.push(
                API,
                format!("namespace {ns}"),
                api_error(&e, "get namespaces"),
            );
            return;
        }
    }
    rbac(report, &client, ns).await;
    let anchors = trust_anchors(report, &client, ns).await;
    webhook(report, &client, ns).await;
    control_pods(report, &client, ns, anchors.as_ref()).await;
}

/// What an API error means for the operator.
fn api_error(e: &kube::Error, doing: &str) -> Outcome {
    match e {
        kube::Error::Api(status) if status.code == 403 => fail(
            format!("forbidden to {doing}: {}", status.message),
            "run this as a user who may read the weft namespace and cluster-scoped objects (a cluster administrator)",
        ),
        e => fail(
            format!("{doing}: {e}"),
            "check that the cluster is reachable (`kubectl version`)",
        ),
    }
}

async fn version(report: &mut Report, client: &kube::Client) -> bool {
    let info = match client.apiserver_version().await {
        Ok(i) => i,
        Err(e) => {
            report.push(
                API,
                "reachable",
                fail(
                    format!("{e}"),
                    "check KUBECONFIG / --kubeconfig and that `kubectl version` answers",
                ),
            );
            return false;
        }
    };
    report.push(
        API,
        "reachable",
        Ok(format!("Kubernetes {}", info.git_version)),
    );
    // Minor versions may carry a suffix ("29+") on managed clusters.
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    let outcome = match (number(&info.major), number(&info.minor)) {
        (Some(major), Some(minor)) if (major, minor) >= OLDEST => {
            Ok(format!("{major}.{minor} ≥ {}.{}", OLDEST.0, OLDEST.1))
        }
        (Some(major), Some(minor)) => fail(
            format!(
                "{major}.{minor} is older than {}.{}: the injected proxy is a native sidecar, which it does not run",
                OLDEST.0, OLDEST.1
            ),
            "upgrade the cluster to Kubernetes 1.29 or newer",
        ),
        _ => warn(
            format!("cannot read the version {:?}.{:?}", info.major, info.minor),
            "make sure the cluster runs Kubernetes 1.29 or newer",
        ),
    };
    report.push(API, "version", outcome);
    true
}

async fn pre_install(
    report: &mut Report,
    client: &kube::Client,
    ns: &str,
    namespace: Result<Option<Namespace>, kube::Error>,
) {
    match namespace {
        Ok(None) => report.push(API, format!("namespace {ns}"), Ok("free".into())),
        Ok(Some(_)) => report.push(
            API,
            format!("namespace {ns}"),
            warn(
                "exists: weft may be installed here already",
                format!(
                    "`weft check --kubernetes --namespace {ns}` checks that installation; applying again updates it in place"
                ),
            ),
        ),
        Err(e) => report.push(
            API,
            format!("namespace {ns}"),
            api_error(&e, "get namespaces"),
        ),
    }
    let reviews = Api::<SelfSubjectAccessReview>::all(client.clone());
    for (group, resource, namespaced) in CREATES {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    verb: Some("create".into()),
                    namespace: namespaced.then(|| ns.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let outcome = match reviews.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Ok("allowed".into()),
            Ok(r) => fail(
                format!(
                    "you may not create {resource}{}",
                    r.status
                        .and_then(|s| s.reason)
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                "`weft install` needs a cluster administrator: run it as one, or have one bind you to a role that can",
            ),
            Err(e) => api_error(&e, "create selfsubjectaccessreviews"),
        };
        report.push(API, format!("can create {resource}"), outcome);
    }
}

/// Does weft-control's ServiceAccount have every permission it needs? Asked
/// with SubjectAccessReviews, so the answer is the cluster's own RBAC
/// evaluation, whatever bindings grant it.
async fn rbac(report: &mut Report, client: &kube::Client, ns: &str) {
    let user = format!("system:serviceaccount:{ns}:{}", names::CONTROL);
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    let mut missing = Vec::new();
    for (group, resources, verbs) in CONTROL_RULES {
        for resource in *resources {
            for verb in *verbs {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.clone()),
                        groups: Some(vec![
                            "system:serviceaccounts".into(),
                            format!("system:serviceaccounts:{ns}"),
                            "system:authenticated".into(),
                        ]),
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(group.to_string()),
                            resource: Some(resource.to_string()),
                            verb: Some(verb.to_string()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match reviews.create(&PostParams::default(), &review).await {
                    Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
                    Ok(_) => {
                        let group = if group.is_empty() { "core" } else { group };
                        missing.push(format!("{verb} {resource} ({group})"));
                    }
                    Err(e) => {
                        report.push(
                            RBAC,
                            &user,
                            match api_error(&e, "create subjectaccessreviews") {
                                Err((_, detail, hint)) => {
                                    warn(format!("cannot check: {detail}"), hint)
                                }
                                ok => ok,
                            },
                        );
                        return;
                    }
                }
            }
        }
    }
    let outcome = if missing.is_empty() {
        Ok("may watch services, pods and endpointslices and create tokenreviews".into())
    } else {
        fail(
            format!("may not {}", missing.join(", ")),
            format!(
                "apply `weft install`'s ClusterRole and ClusterRoleBinding {} again (`weft install ... | kubectl apply -f -`): without them discovery or ServiceAccount identity stops",
                names::cluster_role(ns)
            ),
        )
    };
    report.push(RBAC, user, outcome);
}

/// Reads certificates from a PEM string found in `what`.
fn pem_certs(what: &str, pem: &str) -> Result<Certs, Problem> {
    match certs(what, pem) {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err((
            Status::Fail,
            format!("{what} holds no certificate"),
            REAPPLY.into(),
        )),
        Err(e) => Err((Status::Fail, e, REAPPLY.into())),
    }
}

/// What to do about anything `weft install` made that is missing.
const REAPPLY: &str = "apply `weft install`'s output again";

/// An object `weft install` made, looked up by `installed`, and what to
/// say when it is not there.
struct Expect<'a> {
    name: &'a str,
    /// The failure's detail when it does not exist.
    missing: &'a str,
    hint: &'a str,
    /// The verb and resource, for a refusal's remedy.
    doing: &'a str,
    /// Only a warning when it cannot be read (a Secret the operator may
    /// not be allowed to see).
    soft: bool,
}

/// The object, or `None` once why not is in the report under `what`.
async fn installed<K>(
    report: &mut Report,
    section: &'static str,
    what: &str,
    api: Api<K>,
    e: Expect<'_>,
) -> Option<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let outcome = match api.get_opt(e.name).await {
        Ok(Some(o)) => return Some(o),
        Ok(None) => fail(e.missing, e.hint),
        Err(err) => match api_error(&err, e.doing) {
            Err((_, detail, hint)) if e.soft => warn(format!("cannot check: {detail}"), hint),
            other => other,
        },
    };
    report.push(section, what, outcome);
    None
}

/// The trust anchors in ConfigMap weft-trust-anchors, checked against the
/// identity Secret: the same anchors, an issuer they signed, all in date.
async fn trust_anchors(report: &mut Report, client: &kube::Client, ns: &str) -> Option<Certs> {
    let what = format!("ConfigMap {ns}/{}", names::TRUST_ANCHORS);
    let map = installed(
        report,
        IDENTITY,
        &what,
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        Expect {
            name: names::TRUST_ANCHORS,
            missing: "not found: injected proxies cannot verify anyone",
            hint: REAPPLY,
            doing: "get configmaps",
            soft: false,
        },
    )
    .await?;
    let pem = map
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .cloned()
        .unwrap_or_default();
    let anchors = match pem_certs(&format!("{what} key ca.crt"), &pem) {
        Ok(a) => a,
        Err(e) => {
            report.push(IDENTITY, &what, Err(e));
            return None;
        }
    };
    for (_, info) in &anchors {
        report.push(
            IDENTITY,
            format!("trust anchor {}", info.subject),
            validity(
                info,
                SystemTime::now(),
                ANCHOR_WARN,
                "make a new CA (`weft identity init`), install it beside the old one, and restart the meshed pods before the old one expires",
            ),
        );
    }
    let secret_what = format!("Secret {ns}/{}", names::IDENTITY);
    let Some(secret) = installed(
        report,
        IDENTITY,
        &secret_what,
        Api::<Secret>::namespaced(client.clone(), ns),
        Expect {
            name: names::IDENTITY,
            missing: "not found: weft-control cannot start without its issuer",
            hint: REAPPLY,
            doing: "get secrets",
            soft: true,
        },
    )
    .await
    else {
        return Some(anchors);
    };
    let key = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let served = match pem_certs(&format!("{secret_what} key ca.crt"), &key("ca.crt")) {
        Ok(c) => c,
        Err(e) => {
            report.push(IDENTITY, &secret_what, Err(e));
            return Some(anchors);
        }
    };
    report.push(
        IDENTITY,
        "anchors agree",
        if same(&served, &anchors) {
            Ok(format!("{secret_what} and {what} hold the same anchors"))
        } else {
            fail(
                format!(
                    "{secret_what} (what weft-control serves) and {what} (what injected proxies trust) differ"
                ),
                "install both from one `weft install` run, then `kubectl rollout restart` weft-control and the meshed workloads",
            )
        },
    );
    match pem_certs(&format!("{secret_what} key issuer.crt"), &key("issuer.crt")) {
        Ok(issuer) => {
            let (der, info) = &issuer[0];
            report.push(
                IDENTITY,
                format!("issuer {}", info.subject),
                validity(
                    info,
                    SystemTime::now(),
                    ISSUER_WARN,
                    "rotate it (`weft identity rotate-issuer`), then install again",
                ),
            );
            if !anchors
                .iter()
                .any(|(a, _)| verify_signed_by(der, a).is_ok())
            {
                report.push(
                    IDENTITY,
                    "issuer chain",
                    fail(
                        format!("the issuer in {secret_what} is not signed by any anchor in {what}: every certificate weft-control issues will be refused"),
                        "make the issuer from this CA (`weft identity rotate-issuer`) and install again",
                    ),
                );
            }
        }
        Err(e) => report.push(IDENTITY, "issuer", Err(e)),
    }
    Some(anchors)
}

fn same(a: &Certs, b: &Certs) -> bool {
    let set = |c: &Certs| c.iter().map(|(d, _)| d.clone()).collect::<BTreeSet<_>>();
    set(a) == set(b)
}

/// The MutatingWebhookConfiguration, the serving certificate it must
/// trust, and endpoints to reach.
async fn webhook(report: &mut Report, client: &kube::Client, ns: &str) {
    let name = names::webhook_configuration(ns);
    let what = format!("MutatingWebhookConfiguration {name}");
    let Some(config) = installed(
        report,
        WEBHOOK,
        &what,
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        Expect {
            name: &name,
            missing: "not found: pods are not injected automatically",
            hint: "apply `weft install`'s output again (or inject by hand with `weft inject`)",
            doing: "get mutatingwebhookconfigurations",
            soft: false,
        },
    )
    .await
    else {
        return;
    };
    let webhooks = config.webhooks.unwrap_or_default();
    let mut bundles = Vec::new();
    for hook in &webhooks {
        let client_config = &hook.client_config;
        let service = client_config.service.as_ref();
        let points_home =
            service.is_some_and(|s| s.name == names::WEBHOOK_SERVICE && s.namespace == ns);
        let outcome = if !points_home {
            fail(
                format!(
                    "calls {}, not Service {ns}/{}",
                    service.map_or_else(
                        || client_config.url.clone().unwrap_or_default(),
                        |s| format!("Service {}/{}", s.namespace, s.name)
                    ),
                    names::WEBHOOK_SERVICE
                ),
                REAPPLY,
            )
        } else {
            match client_config
                .ca_bundle
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            {
                None => fail(
                    "no caBundle: the API server cannot verify the webhook and will not call it",
                    REAPPLY,
                ),
                Some(pem) => {
                    match pem_certs(&format!("{what} webhook {} caBundle", hook.name), &pem) {
                        Ok(c) => {
                            bundles.push(c);
                            Ok(format!(
                                "calls Service {ns}/{}{}, failurePolicy {}",
                                names::WEBHOOK_SERVICE,
                                service.and_then(|s| s.path.clone()).unwrap_or_default(),
                                hook.failure_policy.as_deref().unwrap_or("Fail"),
                            ))
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        report.push(WEBHOOK, &hook.name, outcome);
    }
    if webhooks.is_empty() {
        report.push(
            WEBHOOK,
            what,
            fail("has no webhooks", "apply `weft install`'s output again"),
        );
        return;
    }
    webhook_certificate(report, client, ns, &bundles).await;
    // The API server calls the webhook through its Service: without a ready
    // endpoint, pods start unmeshed (failurePolicy Ignore).
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "kubernetes.io/service-name={}",
            names::WEBHOOK_SERVICE
        )))
        .await;
    let outcome = match slices {
        Ok(list) => {
            let ready = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            if ready > 0 {
                Ok(format!("{ready} ready endpoints"))
            } else {
                fail(
                    format!(
                        "Service {ns}/{} has no ready endpoint: new pods start without the proxy",
                        names::WEBHOOK_SERVICE
                    ),
                    "make the control-plane pods ready (below), then restart the pods created meanwhile",
                )
            }
        }
        Err(e) => api_error(&e, "list endpointslices"),
    };
    report.push(WEBHOOK, "endpoints", outcome);
}

async fn webhook_certificate(
    report: &mut Report,
    client: &kube::Client,
    ns: &str,
    bundles: &[Certs],
) {
    let what = format!("Secret {ns}/{}", names::WEBHOOK_TLS);
    let Some(secret) = installed(
        report,
        WEBHOOK,
        &what,
        Api::<Secret>::namespaced(client.clone(), ns),
        Expect {
            name: names::WEBHOOK_TLS,
            missing: "not found: weft-control cannot serve the webhook",
            hint: REAPPLY,
            doing: "get secrets",
            soft: true,
        },
    )
    .await
    else {
        return;
    };
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    let chain = match pem_certs(&format!("{what} key tls.crt"), &pem) {
        Ok(c) => c,
        Err(e) => {
            report.push(WEBHOOK, "serving certificate", Err(e));
            return;
        }
    };
    let (leaf_der, leaf) = &chain[0];
    let host = format!("{}.{ns}.svc", names::WEBHOOK_SERVICE);
    let renew = "install again (`weft install` signs a new webhook certificate) and `kubectl rollout restart` weft-control";
    let outcome = if !leaf.dns_names.contains(&host) {
        fail(
            format!(
                "{what} is for {:?}, not {host}: the API server will refuse it",
                leaf.dns_names
            ),
            renew,
        )
    } else {
        // The leaf must chain to every caBundle, through the intermediates
        // sent with it.
        let chains = |bundle: &Certs| {
            let mut child = leaf_der.as_slice();
            for _ in 0..chain.len() {
                if bundle
                    .iter()
                    .any(|(a, _)| verify_signed_by(child, a).is_ok())
                {
                    return true;
                }
                match chain
                    .iter()
                    .find(|(p, _)| verify_signed_by(child, p).is_ok())
                {
                    Some((p, _)) if p.as_slice() != child => child = p,
                    _ => return false,
                }
            }
            false
        };
        if bundles.iter().all(chains) {
            validity(leaf, SystemTime::now(), WEBHOOK_WARN, renew)
                .map(|valid| format!("{host}, chains to the caBundle, {valid}"))
        } else {
            fail(
                format!(
                    "{what} does not chain to the webhook's caBundle: the API server will refuse it"
                ),
                renew,
            )
        }
    };
    report.push(WEBHOOK, "serving certificate", outcome);
}

/// The Deployment's pods: each ready, or why not; and each serving the
/// trust anchors the ConfigMap gives proxies.
async fn control_pods(
    report: &mut Report,
    client: &kube::Client,
    ns: &str,
    anchors: Option<&Certs>,
) {
    let deployment = format!("Deployment {ns}/{}", names::CONTROL);
    let Some(d) = installed(
        report,
        CONTROL,
        &deployment,
        Api::<Deployment>::namespaced(client.clone(), ns),
        Expect {
            name: names::CONTROL,
            missing: "not found",
            hint: REAPPLY,
            doing: "get deployments",
            soft: false,
        },
    )
    .await
    else {
        return;
    };
    let want = d.spec.replicas.unwrap_or(1);
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let outcome = if ready >= want && want > 0 {
        Ok(format!("{ready}/{want} replicas ready"))
    } else if ready > 0 {
        warn(
            format!("{ready}/{want} replicas ready"),
            "the pods below say why the others are not",
        )
    } else {
        fail(
            format!("0/{want} replicas ready: no discovery, identity or injection"),
            "the pods below say why",
        )
    };
    report.push(CONTROL, deployment, outcome);

    let pods = match Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{}={}", names::NAME_LABEL, names::CONTROL)))
        .await
    {
        Ok(p) => p.items,
        Err(e) => {
            report.push(CONTROL, "pods", api_error(&e, "list pods"));
            return;
        }
    };
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let outcome = match pod_problem(pod) {
            Some(problem) => Err(problem),
            None => match anchors {
                Some(anchors) => served_anchors(client, ns, pod, anchors).await,
                None => Ok("ready".into()),
            },
        };
        report.push(CONTROL, format!("pod {name}"), outcome);
    }
}

/// Why a pod is not ready, with what to do, from its conditions and
/// container states.
fn pod_problem(pod: &Pod) -> Option<Problem> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready {
        return None;
    }
    let logs = format!(
        "`kubectl -n {} logs {name}` says why",
        pod.metadata.namespace.clone().unwrap_or_default()
    );
    let containers = status
        .and_then(|s| s.container_statuses.as_ref())
        .cloned()
        .unwrap_or_default();
    for c in &containers {
        if let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            let message = waiting.message.clone().unwrap_or_default();
            let hint = match reason.as_str() {
                "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => format!(
                    "image {} cannot be pulled: build and push it (docker/Dockerfile), or install with --registry/--version naming one that exists",
                    c.image
                ),
                "CrashLoopBackOff" => format!(
                    "it keeps exiting (restarted {} times): {logs}",
                    c.restart_count
                ),
                _ => logs.clone(),
            };
            return Some((
                Status::Fail,
                format!("container {} waiting: {reason} {message}", c.name)
                    .trim()
                    .to_string(),
                hint,
            ));
        }
        if !c.ready {
            return Some((
                Status::Fail,
                format!(
                    "container {} running but not ready (its /ready fails)",
                    c.name
                ),
                logs,
            ));
        }
    }
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    Some((
        Status::Fail,
        format!("not ready (phase {phase})"),
        format!(
            "`kubectl -n {} describe pod {name}` shows its events",
            pod.metadata.namespace.clone().unwrap_or_default()
        ),
    ))
}

/// The anchors a running weft-control serves (its admin `/identity`,
/// through the API server's pod proxy), against the ConfigMap's.
async fn served_anchors(client: &kube::Client, ns: &str, pod: &Pod, anchors: &Certs) -> Outcome {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("admin"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(ADMIN_PORT);
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/identity");
    let request = match http::Request::get(&path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return fail(format!("{path}: {e}"), "report this as a weft bug"),
    };
    let body = match client.request_text(request).await {
        Ok(b) => b,
        Err(e) => {
            return warn(
                format!("ready, but its trust anchors cannot be read through the API server: {e}"),
                format!(
                    "allow yourself get on pods/proxy in {ns}, or compare by hand: `kubectl get --raw {path}`"
                ),
            );
        }
    };
    let served = serde_json::from_str::<super::IdentityJson>(&body)
        .map_err(|e| e.to_string())
        .and_then(|j| certs("its /identity", &j.anchors_pem));
    match served {
        Ok(served) if same(&served, anchors) => {
            Ok("ready, serving the anchors in the ConfigMap".into())
        }
        Ok(_) => fail(
            format!(
                "serves trust anchors that differ from ConfigMap {ns}/{}: proxies trusting the ConfigMap will refuse the certificates it issues",
                names::TRUST_ANCHORS
            ),
            format!(
                "make Secret {ns}/{} and the ConfigMap agree (one `weft install`), then `kubectl -n {ns} rollout restart deployment {}`",
                names::IDENTITY,
                names::CONTROL
            ),
        ),
        Err(e) => fail(
            format!("its /identity: {e}"),
            "run the same version of weft-control as this CLI",
        ),
    }
}
