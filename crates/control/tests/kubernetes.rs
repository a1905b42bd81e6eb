//! weft-control following a Kubernetes cluster: the API server is the
//! double in test-support (no real one runs here), speaking the list/watch
//! protocol the real one does; the objects are k8s-openapi types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ObjectReference, Pod, PodSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{GetDestination, Update, WeightedAddr, update};
use tonic::Streaming;
use weft_control::destination::apply_update;
use weft_test_support::control::Control;
use weft_test_support::kube_api::ApiServer;
use weft_test_support::mesh::MeshCa;
use weft_test_support::workspace_binary;

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("demo".into()),
        ..Default::default()
    }
}

fn service(name: &str, cluster_ip: &str) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod running `serviceaccount`, meshed (with weft's proxy) or not.
fn pod(name: &str, serviceaccount: &str, meshed: bool) -> Pod {
    let mut containers = vec![Container {
        name: "app".into(),
        ..Default::default()
    }];
    if meshed {
        containers.push(Container {
            name: "weft-proxy".into(),
            ..Default::default()
        });
    }
    Pod {
        metadata: meta(name),
        spec: Some(PodSpec {
            service_account_name: Some(serviceaccount.into()),
            containers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One endpoint: its pod, address and readiness (ready, serving).
struct Ep<'a>(&'a str, &'a str, bool, bool);

fn slice(name: &str, service: &str, endpoints: &[Ep<'_>]) -> EndpointSlice {
    let mut m = meta(name);
    m.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_string(),
        service.to_string(),
    )]));
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|Ep(pod, ip, ready, serving)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*serving),
                        terminating: Some(!*ready),
                    }),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(pod.to_string()),
                        namespace: Some("demo".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// A kubeconfig for the double, and weft-control started against it.
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new(api: &ApiServer) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        api.write_kubeconfig(&dir.path().join("kubeconfig"))?;
        Ok(Self { dir })
    }

    /// weft-control following the cluster, DNS off, with `extra` flags.
    async fn control(&self, ca: &MeshCa, extra: &[&str]) -> anyhow::Result<Control> {
        let kubeconfig = self.dir.path().join("kubeconfig");
        let kubeconfig = kubeconfig.to_string_lossy();
        let mut args = vec!["--kubeconfig", &kubeconfig, "--dns", "false"];
        args.extend_from_slice(extra);
        Control::start(&workspace_binary("weft-control")?, ca, &args).await
    }
}

fn get(path: &str) -> GetDestination {
    GetDestination {
        scheme: "k8s".into(),
        path: path.into(),
        ..Default::default()
    }
}

/// Follows `stream` until `want` holds of the endpoints (address →
/// identity), or fails after 10 s.
async fn until(
    stream: &mut Streaming<Update>,
    state: &mut BTreeMap<SocketAddr, WeightedAddr>,
    want: impl Fn(&BTreeMap<SocketAddr, Option<String>>) -> bool,
) -> anyhow::Result<BTreeMap<SocketAddr, Option<String>>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view: BTreeMap<SocketAddr, Option<String>> = state
            .iter()
            .map(|(a, w)| {
                let id = w
                    .tls_identity
                    .as_ref()
                    .and_then(|t| t.server_name.as_ref())
                    .map(|n| n.name.clone());
                (*a, id)
            })
            .collect();
        if want(&view) {
            return Ok(view);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("not converged; last {view:?}"))??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        if let Some(update::Update::NoEndpoints(_)) = &update.update {
            state.clear();
        }
        apply_update(state, &update);
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoint_slices_are_served_with_serviceaccount_identities()
-> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    api.apply(&service("web", "10.96.0.10"))?;
    api.apply(&pod("web-1", "web", true))?;
    api.apply(&pod("web-2", "web", true))?;
    api.apply(&pod("legacy-1", "default", false))?;
    api.apply(&slice(
        "web-abc",
        "web",
        &[
            Ep("web-1", "10.0.0.1", true, true),
            Ep("web-2", "10.0.0.2", true, true),
            Ep("legacy-1", "10.0.0.3", true, true),
        ],
    ))?;
    let ca = MeshCa::new()?;
    let cluster = Cluster::new(&api)?;
    let control = cluster.control(&ca, &[]).await?;
    let mut client = DestinationClient::new(control.channel().await?);

    let id = "web.demo.serviceaccount.identity.weft.local";
    let mut state = BTreeMap::new();
    let mut web = client
        .get(get("web.demo.svc.cluster.local:80"))
        .await?
        .into_inner();
    let view = until(&mut web, &mut state, |v| v.len() == 3).await?;
    assert_eq!(view[&addr("10.0.0.1:8080")].as_deref(), Some(id));
    assert_eq!(view[&addr("10.0.0.2:8080")].as_deref(), Some(id));
    // Not running weft's proxy: plaintext, no identity.
    assert_eq!(view[&addr("10.0.0.3:8080")], None);

    // The short forms a pod would use, and the cluster IP, are the same
    // Service; a pod IP is its endpoint.
    for name in ["web.demo.svc:80", "web.demo:80", "10.96.0.10:80"] {
        let mut s = BTreeMap::new();
        let mut stream = client.get(get(name)).await?.into_inner();
        until(&mut stream, &mut s, |v| v.len() == 3).await?;
    }
    // Listed: a name the cluster does not have is unknown (not pending).
    let mut nowhere = client
        .get(get("nowhere.demo.svc.cluster.local:80"))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), nowhere.message())
        .await??
        .and_then(|u| u.update);
    assert!(
        matches!(first, Some(update::Update::NoEndpoints(ref n)) if !n.exists),
        "{first:?}"
    );
    let mut one = BTreeMap::new();
    let mut pod_ip = client.get(get("10.0.0.2:8080")).await?.into_inner();
    let v = until(&mut pod_ip, &mut one, |v| v.len() == 1).await?;
    assert_eq!(v[&addr("10.0.0.2:8080")].as_deref(), Some(id));

    // An endpoint that stops being ready leaves; one terminating but
    // still serving is used only while nothing is ready.
    api.apply(&slice(
        "web-abc",
        "web",
        &[
            Ep("web-1", "10.0.0.1", true, true),
            Ep("web-2", "10.0.0.2", false, true),
            Ep("legacy-1", "10.0.0.3", false, false),
        ],
    ))?;
    until(&mut web, &mut state, |v| {
        v.keys().copied().collect::<Vec<_>>() == [addr("10.0.0.1:8080")]
    })
    .await?;
    api.apply(&slice(
        "web-abc",
        "web",
        &[
            Ep("web-1", "10.0.0.1", false, false),
            Ep("web-2", "10.0.0.2", false, true),
        ],
    ))?;
    until(&mut web, &mut state, |v| {
        v.keys().copied().collect::<Vec<_>>() == [addr("10.0.0.2:8080")]
    })
    .await?;

    // A thousand updates in a burst (a rollout of a big service): the
    // stream converges on the last.
    let started = Instant::now();
    for i in 0..1000u32 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        api.apply(&slice("web-abc", "web", &[Ep("web-1", &ip, true, true)]))?;
    }
    let last = addr("10.1.3.250:8080");
    until(&mut web, &mut state, |v| {
        v.keys().copied().collect::<Vec<_>>() == [last]
    })
    .await?;
    println!(
        "1000 EndpointSlice updates converged in {:?}",
        started.elapsed()
    );

    // After a compaction the backend lists again and nothing is lost.
    api.compact();
    api.apply(&slice(
        "web-abc",
        "web",
        &[Ep("web-2", "10.0.0.2", true, true)],
    ))?;
    until(&mut web, &mut state, |v| {
        v.keys().copied().collect::<Vec<_>>() == [addr("10.0.0.2:8080")]
    })
    .await?;

    // The Service goes: the name is no longer known.
    api.delete::<Service>("demo", "web")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, web.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        if let Some(update::Update::NoEndpoints(n)) = update.update {
            assert!(!n.exists, "the Service is gone");
            break;
        }
    }
    Ok(())
}

/// One discovery scope: a Kubernetes Service and hosts outside the cluster
/// listed under the same name are one service when asked to merge, and the
/// first backend in the order answers alone otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_and_host_endpoints_merge_or_shadow_as_configured() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    api.apply(&service("web", "10.96.0.10"))?;
    api.apply(&pod("web-1", "web", true))?;
    api.apply(&slice(
        "web-abc",
        "web",
        &[Ep("web-1", "10.0.0.1", true, true)],
    ))?;
    let cluster = Cluster::new(&api)?;
    // A host (a VM, say) serving the same service outside the cluster.
    let file = weft_test_support::DestinationsFile::from_yaml(
        "destinations:\n  \"web.demo.svc.cluster.local:80\":\n    endpoints: [{addr: \"192.168.1.5:8080\", identity: web.hosts.weft.local}]\n",
    )?;
    let path = file.path_str();
    let ca = MeshCa::new()?;
    for (extra, want) in [
        (
            ["--discovery-overlap", "merge"],
            vec!["10.0.0.1:8080", "192.168.1.5:8080"],
        ),
        (
            ["--discovery-order", "kubernetes,file"],
            vec!["10.0.0.1:8080"],
        ),
        (
            ["--discovery-order", "file,kubernetes"],
            vec!["192.168.1.5:8080"],
        ),
    ] {
        let mut args = vec!["--destinations", path.as_str()];
        args.extend(extra);
        let control = cluster.control(&ca, &args).await?;
        let mut client = DestinationClient::new(control.channel().await?);
        let mut state = BTreeMap::new();
        let mut web = client
            .get(get("web.demo.svc.cluster.local:80"))
            .await?
            .into_inner();
        let want: Vec<SocketAddr> = want.into_iter().map(addr).collect();
        until(&mut web, &mut state, |v| {
            v.keys().copied().collect::<Vec<_>>() == want
        })
        .await
        .map_err(|e| anyhow::anyhow!("{extra:?}: {e}"))?;
    }
    Ok(())
}

/// A pod proves its ServiceAccount with a projected token (audience
/// `weft`), checked by TokenReview; it gets exactly that ServiceAccount's
/// identity, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serviceaccount_tokens_certify_exactly_their_serviceaccount() -> anyhow::Result<()> {
    use linkerd2_proxy_api::identity::CertifyRequest;
    use linkerd2_proxy_api::identity::identity_client::IdentityClient;

    let api = ApiServer::start().await?;
    api.accept_token("sa-token-web", "system:serviceaccount:demo:web", &["weft"]);
    api.accept_token(
        "sa-token-other-audience",
        "system:serviceaccount:demo:web",
        &["vault"],
    );
    let ca = MeshCa::new()?;
    let cluster = Cluster::new(&api)?;
    let control = cluster.control(&ca, &[]).await?;
    let mut client = IdentityClient::new(control.channel().await?);
    let web = "web.demo.serviceaccount.identity.weft.local";
    let request = |identity: &str, token: &str| -> anyhow::Result<CertifyRequest> {
        let (_key, csr) = weft_identity::new_csr(&identity.parse()?)?;
        Ok(CertifyRequest {
            identity: identity.into(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
    };

    let rsp = client
        .certify(request(web, "sa-token-web")?)
        .await?
        .into_inner();
    let leaf = weft_identity::CertInfo::parse(&rsp.leaf_certificate).map_err(anyhow::Error::msg)?;
    assert_eq!(leaf.dns_names, [web]);

    for (identity, token, reason) in [
        (
            "api.demo.serviceaccount.identity.weft.local",
            "sa-token-web",
            "not api.demo",
        ),
        (web, "forged", "not valid"),
        (web, "sa-token-other-audience", "not valid"),
    ] {
        let err = client
            .certify(request(identity, token)?)
            .await
            .expect_err(token);
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains(reason), "{token}: {}", err.message());
    }
    // weft's own bootstrap tokens keep working for hosts.
    let host = "db.hosts.weft.local";
    let token = ca.token(host, Duration::from_secs(600))?;
    client.certify(request(host, &token)?).await?;
    Ok(())
}

/// A proxy in a pod names its workload as Linkerd's do (`ns:pod`, or
/// JSON): weft-control answers with the policy of the identity the pod
/// serves as, its ServiceAccount's.
#[tokio::test]
async fn inbound_policy_for_pods_is_their_serviceaccounts() -> anyhow::Result<()> {
    use linkerd2_proxy_api::inbound::PortSpec;
    use linkerd2_proxy_api::inbound::inbound_server_policies_client::InboundServerPoliciesClient;

    let api = ApiServer::start().await?;
    api.apply(&pod("web-1", "web", false))?;
    let file = weft_test_support::DestinationsFile::from_yaml(
        "destinations: {}\nservers:\n  \"web.demo.serviceaccount.identity.weft.local\":\n    ports:\n      \"8080\": {default: allow-authenticated}\n",
    )?;
    let ca = MeshCa::new()?;
    let cluster = Cluster::new(&api)?;
    let control = cluster
        .control(&ca, &["--destinations", &file.path_str()])
        .await?;
    let mut client = InboundServerPoliciesClient::new(control.channel().await?);
    let ask = |workload: &str| PortSpec {
        workload: workload.into(),
        port: 8080,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for workload in ["demo:web-1", r#"{"ns":"demo","pod":"web-1"}"#] {
        let server = loop {
            match client.get_port(ask(workload)).await {
                Ok(s) => break s.into_inner(),
                // Until the pods are listed.
                Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => anyhow::bail!("{workload}: {s}"),
            }
        };
        assert_eq!(
            server.labels["name"],
            "web.demo.serviceaccount.identity.weft.local:8080"
        );
    }
    let missing = client.get_port(ask("demo:nobody")).await.err();
    assert_eq!(missing.map(|s| s.code()), Some(tonic::Code::NotFound));
    Ok(())
}
