//! The Kubernetes API server double, driven by the real client (kube-rs):
//! lists, watches that resume, relists after compaction (410 Gone), 403
//! for a forbidden resource, TokenReviews, and SubjectAccessReviews by RBAC.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher::{self, Event, watcher};
use weft_test_support::kube_api::{ApiServer, Resource};

fn service(name: &str, ip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("demo".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn client(api: &ApiServer) -> anyhow::Result<kube::Client> {
    let config = kube::Config::new(api.url().parse()?);
    Ok(kube::Client::try_from(config)?)
}

/// A watcher event reduced to what the tests compare.
fn describe(e: &Event<Service>) -> String {
    let name = |s: &Service| s.metadata.name.clone().unwrap_or_default();
    let ip = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .unwrap_or_default()
    };
    match e {
        Event::Init => "init".into(),
        Event::InitApply(s) => format!("init-apply {} {}", name(s), ip(s)),
        Event::InitDone => "init-done".into(),
        Event::Apply(s) => format!("apply {} {}", name(s), ip(s)),
        Event::Delete(s) => format!("delete {}", name(s)),
    }
}

async fn next<S>(events: &mut S) -> anyhow::Result<String>
where
    S: futures_util::Stream<Item = Result<Event<Service>, watcher::Error>> + Unpin,
{
    let e = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
    Ok(describe(&e))
}

#[tokio::test]
async fn kube_rs_lists_and_watches_the_double_as_it_would_a_cluster() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    api.apply(&service("web", "10.96.0.10"))?;
    let client = client(&api)?;
    let services: Api<Service> = Api::all(client.clone());

    let list = services.list(&ListParams::default()).await?;
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        list.metadata.resource_version,
        Some(api.resource_version().to_string())
    );

    let mut events = watcher(services.clone(), watcher::Config::default()).boxed();
    for want in ["init", "init-apply web 10.96.0.10", "init-done"] {
        assert_eq!(next(&mut events).await?, want);
    }
    // An idle watch carries BOOKMARKs (every 500 ms), which the client
    // takes in silently.
    let idle = tokio::time::timeout(Duration::from_millis(1200), events.next()).await;
    assert!(
        idle.is_err(),
        "nothing changed, yet {:?}",
        idle.ok().flatten().map(|e| e.map(|e| describe(&e)))
    );
    assert!(api.bookmarks_sent() >= 1);
    api.apply(&service("api", "10.96.0.11"))?;
    assert_eq!(next(&mut events).await?, "apply api 10.96.0.11");
    api.apply(&service("web", "10.96.0.12"))?;
    assert_eq!(next(&mut events).await?, "apply web 10.96.0.12");
    api.delete::<Service>("demo", "web")?;
    assert_eq!(next(&mut events).await?, "delete web");

    // A watch that ends is resumed from the last version: nothing repeats.
    api.end_watches();
    api.apply(&service("db", "10.96.0.13"))?;
    assert_eq!(next(&mut events).await?, "apply db 10.96.0.13");

    // After compaction the client's version is gone: kube-rs reports the
    // 410, then lists again.
    api.compact();
    let gone = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))?
        .expect_err("410 Gone");
    assert!(format!("{gone:?}").contains("410"), "{gone:?}");
    for want in [
        "init",
        "init-apply api 10.96.0.11",
        "init-apply db 10.96.0.13",
        "init-done",
    ] {
        assert_eq!(next(&mut events).await?, want);
    }

    // RBAC refusing the resource reaches the client as a 403.
    api.forbid(Resource::Services);
    let err = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))?
        .expect_err("forbidden");
    assert!(
        err.to_string().contains("403") || format!("{err:?}").contains("403"),
        "{err:?}"
    );
    let err = services
        .list(&ListParams::default())
        .await
        .expect_err("forbidden");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn token_reviews_authenticate_only_known_tokens_for_their_audience() -> anyhow::Result<()> {
    let api = ApiServer::start().await?;
    api.accept_token("tok-web", "system:serviceaccount:demo:web", &["weft"]);
    let reviews: Api<TokenReview> = Api::all(client(&api)?);
    let review = |token: &str, audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: token.into(),
            audiences: Some(vec![audience.into()]),
        },
        ..Default::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("tok-web", "weft"))
        .await?;
    let status = ok.status.expect("a status");
    assert_eq!(status.authenticated, Some(true));
    assert_eq!(
        status.user.and_then(|u| u.username).as_deref(),
        Some("system:serviceaccount:demo:web")
    );
    for (token, audience) in [("tok-web", "other"), ("forged", "weft")] {
        let no = reviews
            .create(&PostParams::default(), &review(token, audience))
            .await?;
        assert_eq!(
            no.status.and_then(|s| s.authenticated),
            Some(false),
            "{token} {audience}"
        );
    }
    Ok(())
}

/// SubjectAccessReviews are answered from the RBAC objects the double
/// holds, as the API server's RBAC authorizer would: cluster-wide grants by
/// ClusterRoleBinding, namespaced ones by RoleBinding (to a Role or a
/// ClusterRole), resourceNames narrowing a rule, nothing else allowed.
#[tokio::test]
async fn access_reviews_follow_rbac_objects() -> anyhow::Result<()> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    use serde_json::json;
    let api = ApiServer::start().await?;
    for doc in [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "reader"},
               "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "reader"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "a", "namespace": "one"}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "cm", "namespace": "two"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["only"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "cm", "namespace": "two"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm"},
               "subjects": [{"kind": "Group", "name": "devs"}]}),
    ] {
        api.apply_value(doc)?;
    }
    let reviews: Api<SubjectAccessReview> = Api::all(client(&api)?);
    let ask = |user: &str, group: &str, verb: &str, resource: &str, ns: &str, name: &str| {
        SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.into()),
                groups: Some(vec![group.into()]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    resource: Some(resource.into()),
                    group: Some(String::new()),
                    namespace: (!ns.is_empty()).then(|| ns.into()),
                    name: (!name.is_empty()).then(|| name.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    };
    let sa = "system:serviceaccount:one:a";
    for (review, want) in [
        (ask(sa, "", "list", "pods", "", ""), true),
        (ask(sa, "", "get", "pods", "any", ""), true),
        (ask(sa, "", "watch", "pods", "", ""), false),
        (ask(sa, "", "get", "services", "", ""), false),
        (
            ask("system:serviceaccount:two:a", "", "get", "pods", "", ""),
            false,
        ),
        (ask("bob", "devs", "get", "configmaps", "two", "only"), true),
        (
            ask("bob", "devs", "get", "configmaps", "two", "other"),
            false,
        ),
        (
            ask("bob", "devs", "get", "configmaps", "three", "only"),
            false,
        ),
        (ask("bob", "ops", "get", "configmaps", "two", "only"), false),
    ] {
        let attrs = format!("{:?}", review.spec);
        let answer = reviews.create(&PostParams::default(), &review).await?;
        let allowed = answer.status.map(|s| s.allowed);
        assert_eq!(allowed, Some(want), "{attrs}");
    }
    Ok(())
}
