//! ciliate-operator's leader election and garbage collection against the
//! test API server.

use std::time::Duration;

use ciliate_agent::operator::{Gc, LEASE, LEASE_NAMESPACE, OperatorConfig, try_lead};
use ciliate_apiserver::server::{Options, new_state, serve};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::ConfigMap};
use kube::{
    Api, Client,
    api::PostParams,
    core::{DynamicObject, GroupVersionKind},
    discovery::ApiResource,
};
use serde_json::{Value, json};

async fn server() -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { serve(listener, new_state(Options::default())).await.unwrap() });
    Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn cfg(id: &str, grace: Duration) -> OperatorConfig {
    OperatorConfig {
        id: id.into(),
        lease_duration: Duration::from_secs(2),
        renew_interval: Duration::from_millis(200),
        gc_interval: Duration::from_secs(3600),
        identity_grace: grace,
    }
}

#[tokio::test]
async fn one_operator_leads_and_another_takes_over_when_it_stops_renewing() {
    let client = server().await;
    let (a, b) = (cfg("op-a", Duration::ZERO), cfg("op-b", Duration::ZERO));
    assert!(try_lead(&client, &a).await.unwrap(), "a takes the free lease");
    assert!(!try_lead(&client, &b).await.unwrap(), "b does not while a holds it");
    assert!(try_lead(&client, &a).await.unwrap(), "a renews");
    assert!(!try_lead(&client, &b).await.unwrap());
    // a stops renewing: after the lease's duration b takes it, and a no
    // longer leads.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(try_lead(&client, &b).await.unwrap(), "b takes the expired lease");
    assert!(!try_lead(&client, &a).await.unwrap(), "a lost it");
    let lease = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE).get(LEASE).await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("op-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

fn api(client: &Client, kind: &str, plural: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(
        if kind == "Pod" || kind == "Node" { "" } else { "cilium.io" },
        if kind == "Pod" || kind == "Node" { "v1" } else { "v2" },
        kind,
    );
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn create(a: &Api<DynamicObject>, v: Value) {
    a.create(&PostParams::default(), &serde_json::from_value(v).unwrap()).await.unwrap();
}

async fn names(a: &Api<DynamicObject>) -> Vec<String> {
    let mut n: Vec<String> = a
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn garbage_is_what_nothing_uses_after_its_grace() {
    let client = server().await;
    let pods = api(&client, "Pod", "pods", Some("default"));
    create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": []}})).await;
    let ceps = api(&client, "CiliumEndpoint", "ciliumendpoints", Some("default"));
    for (name, id) in [("a", 300), ("gone", 301)] {
        create(&ceps, json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint", "metadata": {"name": name}})).await;
        ceps.patch_status(
            name,
            &Default::default(),
            &kube::api::Patch::Merge(&json!({"status": {"identity": {"id": id}}})),
        )
        .await
        .unwrap();
    }
    let ids = api(&client, "CiliumIdentity", "ciliumidentities", None);
    let claims = Api::<ConfigMap>::namespaced(client.clone(), "kube-system");
    for id in [300, 301, 302] {
        create(&ids, json!({"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": id.to_string()},
            "security-labels": {"k8s:app": format!("a{id}")}}))
        .await;
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("claim-{id}"),
            "labels": {"ciliate.io/identity": id.to_string()}}, "data": {"id": id.to_string()}}))
            .unwrap();
        claims.create(&PostParams::default(), &cm).await.unwrap();
    }
    let nodes = api(&client, "Node", "nodes", None);
    create(&nodes, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})).await;
    let cns = api(&client, "CiliumNode", "ciliumnodes", None);
    for n in ["n1", "n2"] {
        create(&cns, json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": n}, "spec": {}})).await;
    }

    // With a grace period: the first pass deletes the CiliumEndpoint of the
    // gone pod and the CiliumNode of the gone node, and only notes the
    // unused identities.
    let c = cfg("op", Duration::from_millis(500));
    let mut gc = Gc::default();
    let first = gc.pass(&client, &c).await.unwrap();
    assert_eq!(first.endpoints, ["default/gone"]);
    assert_eq!(first.nodes, ["n2"]);
    assert!(first.identities.is_empty(), "unused, but not for the grace period yet: {first:?}");
    assert_eq!(names(&ids).await, ["300", "301", "302"]);
    // After it: the unused ones go with their claims; the used one stays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = gc.pass(&client, &c).await.unwrap();
    assert_eq!(second.identities, ["301", "302"]);
    assert_eq!(names(&ids).await, ["300"]);
    let left: Vec<String> = claims
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(left, ["claim-300"]);
    assert_eq!(names(&ceps).await, ["a"]);
    assert_eq!(names(&cns).await, ["n1"]);
    // Nothing more to do.
    assert_eq!(gc.pass(&client, &c).await.unwrap(), Default::default());
}
