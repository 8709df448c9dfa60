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
        cluster_pool: Some(("10.8.0.0/22".parse().unwrap(), 24)),
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

/// A node's pod CIDR as its agent waits for it (cluster-pool mode).
async fn wait_cidr(client: &Client, node: &str, secs: u64) -> Result<String, String> {
    use ciliate_agent::k8s::ipam::{IpamMode, pod_cidr};
    pod_cidr(client, node, IpamMode::ClusterPool, Duration::from_secs(secs))
        .await
        .map(|c| c.to_string())
        .map_err(|e| e.to_string())
}

fn operator(client: &Client, id: &str) -> tokio::sync::watch::Sender<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(ciliate_agent::operator::run(client.clone(), cfg(id, Duration::ZERO), rx));
    tx
}

#[tokio::test]
async fn cluster_pool_ipam_gives_each_node_its_own_cidr_and_a_new_leader_keeps_them() {
    let client = server().await;
    let nodes = api(&client, "Node", "nodes", None);
    for n in ["n0", "n1", "n2", "n3", "n4", "n5"] {
        create(&nodes, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}})).await;
    }
    // One CIDR of the pool (10.8.0.0/22 in /24s) taken by hand: kept.
    let cns = api(&client, "CiliumNode", "ciliumnodes", None);
    create(
        &cns,
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "n0"},
        "spec": {"ipam": {"podCIDRs": ["10.8.1.0/24"]}}}),
    )
    .await;
    // Three agents wait at once (each creates its CiliumNode), then the
    // operator starts.
    let waits: Vec<_> = ["n1", "n2", "n3"]
        .into_iter()
        .map(|n| {
            let c = client.clone();
            tokio::spawn(async move { wait_cidr(&c, n, 20).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop_a = operator(&client, "op-a");
    let mut got = Vec::new();
    for w in waits {
        got.push(w.await.unwrap().expect("a pod CIDR from the operator"));
    }
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, ["10.8.0.0/24", "10.8.2.0/24", "10.8.3.0/24"], "distinct, beside n0's");
    // An agent asking again (a restart) gets the same one.
    assert_eq!(wait_cidr(&client, "n1", 5).await.unwrap(), got[0]);
    // The pool is full: a fourth node waits in vain, and says why.
    let e = wait_cidr(&client, "n4", 1).await.unwrap_err();
    assert!(e.contains("no pod CIDR for node n4") && e.contains("ciliate-operator"), "{e}");
    // The leader stops; a new one (after the lease runs out) reads the
    // assignments back from the CiliumNodes: n2's, freed by its deletion,
    // goes to n4, and nobody else's changes.
    let _ = stop_a.send(true);
    let freed = got[1].clone();
    cns.delete("n2", &Default::default()).await.unwrap();
    let _stop_b = operator(&client, "op-b");
    assert_eq!(wait_cidr(&client, "n4", 20).await.unwrap(), freed);
    assert_eq!(wait_cidr(&client, "n1", 1).await.unwrap(), got[0]);
    assert_eq!(wait_cidr(&client, "n3", 1).await.unwrap(), got[2]);
    assert_eq!(wait_cidr(&client, "n0", 1).await.unwrap(), "10.8.1.0/24");
    let lease = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE).get(LEASE).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("op-b"));
}

#[tokio::test]
async fn kubernetes_ipam_takes_the_nodes_pod_cidrs() {
    use ciliate_agent::k8s::ipam::{IpamMode, pod_cidr};
    let client = server().await;
    let nodes = api(&client, "Node", "nodes", None);
    create(
        &nodes,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "k1"},
        "spec": {"podCIDR": "10.9.1.0/24", "podCIDRs": ["10.9.1.0/24"]}}),
    )
    .await;
    create(
        &nodes,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "k2"}, "spec": {}}),
    )
    .await;
    let got = pod_cidr(&client, "k1", IpamMode::Kubernetes, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.to_string(), "10.9.1.0/24");
    // None yet: waited for, with a message naming the field.
    let e = pod_cidr(&client, "k2", IpamMode::Kubernetes, Duration::from_millis(500))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Node k2 has no spec.podCIDRs"), "{e}");
    let c = client.clone();
    let wait = tokio::spawn(async move {
        pod_cidr(&c, "k2", IpamMode::Kubernetes, Duration::from_secs(10)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes
        .patch(
            "k2",
            &Default::default(),
            &kube::api::Patch::Merge(&json!({"spec": {"podCIDRs": ["10.9.2.0/24"]}})),
        )
        .await
        .unwrap();
    assert_eq!(wait.await.unwrap().unwrap().to_string(), "10.9.2.0/24");
}

#[test]
fn an_operator_waiting_for_an_absent_api_does_not_spin() {
    // A kubeconfig naming a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let kc = std::env::temp_dir().join(format!(
        "dead-{}-{}.kubeconfig",
        std::process::id(),
        dead.port()
    ));
    std::fs::write(&kc, ciliate_apiserver::kubeconfig(&format!("http://{dead}"))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ciliate-operator"))
        .arg("--k8s-kubeconfig-path")
        .arg(&kc)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&kc);
    // utime + stime, in clock ticks (100 a second): a watch retried
    // without backoff spun a whole core (~300 in 3 s); backed off, ~3.
    let f: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    assert!(ticks < 100, "{ticks} ticks of CPU in 3 s with no API to talk to");
}
