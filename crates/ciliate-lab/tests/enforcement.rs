//! Enforcement you can trust, end to end on a one-node lab with real
//! traffic: a world lockdown that holds when another policy names the
//! outside, reserved labels refused, a policy too big for the map changing
//! nothing, policy entries going with their pods, a retried ADD leaving a
//! working pod, no caller breaking another's pod, the node's own namespace
//! refused, a service too big for the maps refused, and CNI ADDs cut short
//! by `kill -9` leaving nothing behind. Needs root; CI runs as root.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use ciliate_api::{
    ClientError,
    client::method,
    models::{Endpoint, EndpointCreate, IpamAllocation, IpamRequest, PolicyChange, PolicyImport},
};
use ciliate_datapath::maps::{IpcacheMap, PolicyMap};
use ciliate_lab::{
    Netns,
    names::token,
    node::{Binaries, ECHO_PORT, EXTERNAL_IP, NodeLab, NodeLabConfig},
};
use serde_json::Value;

fn lab(pods: usize) -> NodeLab {
    let bins = Binaries::beside_current_exe().unwrap();
    NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), pods, bins)).unwrap()
}

fn import(lab: &NodeLab, text: &str) -> Result<PolicyChange, ClientError> {
    lab.client().call(method::PUT, "/v1/policy", Some(&PolicyImport { text: text.into() }))
}

fn status_of(e: ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => status,
        e => panic!("not an API error: {e}"),
    }
}

/// Does `from` get an echo answer from `to` over TCP within 800 ms?
fn tcp(lab: &NodeLab, from: &Netns, to: Ipv4Addr) -> bool {
    lab.reaches(from, "tcp", to, ECHO_PORT, Some(800))
}

/// Policy map entries, by endpoint ID.
fn policy_entries(lab: &NodeLab) -> Vec<u16> {
    let map = PolicyMap::from_pin_dir(&lab.pins_dir).unwrap();
    map.dump().unwrap().into_iter().map(|(k, _, _)| k.endpoint_id).collect()
}

fn endpoints(lab: &NodeLab) -> Vec<Endpoint> {
    lab.client().get("/v1/endpoint").unwrap()
}

/// An endpoint request of container `owner` (its address allocated here)
/// on device `lxc`, with `labels`.
fn endpoint_request(
    lab: &NodeLab,
    owner: &str,
    lxc: &str,
    labels: &[(&str, &str)],
) -> EndpointCreate {
    let alloc: IpamAllocation = lab
        .client()
        .call(method::POST, "/v1/ipam", Some(&IpamRequest { owner: owner.into() }))
        .unwrap();
    EndpointCreate {
        container_id: owner.into(),
        netns: "/run/netns/none".into(),
        ifname: "eth0".into(),
        host_ifname: lxc.into(),
        ip: alloc.ip,
        mac: "0a:00:00:00:00:01".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        pod_name: String::new(),
        named_ports: Default::default(),
    }
}

const LOCKDOWN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: external-lockdown, labels: {test: lockdown}}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEntities: [world]
  ingress:
  - fromEntities: [all]
"#;

/// Item 1: the CCNP of Cilium's docs keeps the world out, also once an
/// unrelated policy gives the external host's network a CIDR identity;
/// and an allow from the world still allows it.
#[test]
fn a_world_lockdown_holds_when_another_policy_names_the_outside() {
    let lab = lab(2);
    std::thread::sleep(Duration::from_millis(300));
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    assert!(tcp(&lab, &lab.external, p1.state.ip), "open before any policy");

    import(&lab, LOCKDOWN).unwrap();
    assert!(!tcp(&lab, &lab.external, p1.state.ip), "world: denied (lockdown)");
    assert!(tcp(&lab, &p2.ns, p1.state.ip), "pod2: allowed (all)");

    // An unrelated policy names the external host's network.
    let egress = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod2-to-outside, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod2}}
  egress:
  - toCIDR: [192.168.200.0/24]
  - toEndpoints: [{}]
"#;
    import(&lab, egress).unwrap();
    let ipc = IpcacheMap::from_pin_dir(&lab.pins_dir).unwrap();
    let ext = ipc.lookup(EXTERNAL_IP).unwrap().unwrap().identity;
    assert_ne!(ext & ciliate_common::identity::LOCAL_FLAG, 0, "a CIDR identity now");
    let id: Value = lab.client().get(&format!("/v1/identity/{ext}")).unwrap();
    assert!(id["labels"].as_array().unwrap().iter().any(|l| l == "reserved:world"), "{id}");
    assert!(!tcp(&lab, &lab.external, p1.state.ip), "world: still denied (lockdown)");
    assert!(!tcp(&lab, &lab.external, p2.state.ip), "world: still denied (lockdown)");
    assert!(tcp(&lab, &p2.ns, p1.state.ip), "pod2: still allowed");

    // Without the lockdown, an allow from the world allows the named
    // network too (and nothing else).
    lab.client()
        .call::<PolicyChange>(method::DELETE, "/v1/policy?labels=k8s:test%3Dlockdown", None::<&()>)
        .unwrap();
    let from_world = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod1-from-world, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod1}}
  ingress:
  - fromEntities: [world]
"#;
    import(&lab, from_world).unwrap();
    assert!(tcp(&lab, &lab.external, p1.state.ip), "world: allowed (fromEntities world)");
    assert!(!tcp(&lab, &p2.ns, p1.state.ip), "pod2: denied (not the world)");
}

/// Item 2: a CNI ADD cannot claim a reserved identity.
#[test]
fn a_pod_cannot_claim_a_reserved_identity() {
    let lab = lab(0);
    for label in ["reserved:host", "reserved:world", "reserved:health"] {
        let ns = Netns::create(&format!("{}-evil", lab.config.lab)).unwrap();
        let conf = lab.cni_config(&[(label, "")]);
        let (out, ok) = lab.cni("ADD", ns.name(), &ns.path().display().to_string(), &conf).unwrap();
        assert!(!ok, "{label}: ADD succeeded: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["code"], 7, "{out}");
        assert!(v["msg"].as_str().unwrap().contains(label), "{out}");
        let links = ns.ip(&["-o", "link", "show"]).unwrap();
        assert!(!links.contains("eth0"), "nothing was plumbed: {links}");
    }
    assert!(endpoints(&lab).iter().all(|e| e.container_id.starts_with("reserved:")));
    // The API refuses it too, naming the label.
    let req = endpoint_request(&lab, "evil", "lxcevil", &[("reserved:host", "")]);
    let e = lab.client().call::<Endpoint>(method::PUT, "/v1/endpoint", Some(&req)).unwrap_err();
    assert!(e.to_string().contains("reserved:host"), "{e}");
    assert_eq!(status_of(e), 400);
}

/// Item 3: a policy the map cannot hold is refused whole; the policy in
/// force, the map and new pods are as before; delete removes everything.
#[test]
fn a_policy_too_big_for_the_map_changes_nothing() {
    let lab = lab(2);
    std::thread::sleep(Duration::from_millis(300));
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let small = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: small, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod1}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: pod2}}]
"#;
    import(&lab, small).unwrap();
    let before = policy_entries(&lab);
    let policy_before: Value = lab.client().get("/v1/policy").unwrap();
    let ports: Vec<Value> = (1..=65535)
        .map(|p| serde_json::json!({"port": p.to_string(), "protocol": "TCP"}))
        .collect();
    let big = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "big", "namespace": "default"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "pod1"}},
            "ingress": [{"toPorts": [{"ports": ports}]}]
        }
    });
    let e = import(&lab, &big.to_string()).unwrap_err();
    assert!(e.to_string().contains("ciliate_policy"), "{e}");
    assert_eq!(status_of(e), 507);
    let policy_after: Value = lab.client().get("/v1/policy").unwrap();
    assert_eq!(policy_after, policy_before, "the policy in force is unchanged");
    assert_eq!(policy_entries(&lab), before, "the map is unchanged");
    assert!(tcp(&lab, &p2.ns, p1.state.ip), "pod2 → pod1 still allowed");
    // A new pod selected by the policy comes up.
    let p3 = lab.add_pod("pod3", &[("app", "pod1")]).unwrap();
    assert!(tcp(&lab, &p2.ns, p3.state.ip));
    // Deleting the policy leaves no entry of it.
    lab.client().call::<PolicyChange>(method::DELETE, "/v1/policy?all=true", None::<&()>).unwrap();
    assert!(policy_entries(&lab).is_empty(), "{:?}", policy_entries(&lab));
}

/// Item 4: ADD/DEL cycles of pods a policy selects leave no entries.
#[test]
fn policy_entries_go_with_their_pods() {
    let lab = lab(0);
    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: churn, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: churn}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: churn}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "8000", endPort: 8100}]}]
"#;
    import(&lab, policy).unwrap();
    let conf = lab.cni_config(&[("app", "churn")]);
    let ns = Netns::create(&format!("{}-churn", lab.config.lab)).unwrap();
    let path = ns.path().display().to_string();
    for i in 0..20 {
        let id = format!("churn-{i}");
        let (out, ok) = lab.cni("ADD", &id, &path, &conf).unwrap();
        assert!(ok, "{out}");
        assert!(!policy_entries(&lab).is_empty());
        let (out, ok) = lab.cni("DEL", &id, &path, &conf).unwrap();
        assert!(ok, "{out}");
    }
    let live: BTreeSet<u16> = endpoints(&lab).iter().map(|e| e.id).collect();
    let stale: Vec<u16> =
        policy_entries(&lab).into_iter().filter(|id| !live.contains(id)).collect();
    assert!(stale.is_empty(), "entries of deleted endpoints: {stale:?}");
}

/// Item 9: a repeated ADD leaves a working pod; CHECK sees a pod whose
/// datapath is gone, and ADD rebuilds it.
#[test]
fn a_retried_add_leaves_a_working_pod_and_check_verifies_the_datapath() {
    let lab = lab(1);
    let ns = Netns::create(&format!("{}-retry", lab.config.lab)).unwrap();
    let (id, path) = (ns.name().to_owned(), ns.path().display().to_string());
    let conf = lab.cni_config(&[("app", "retry")]);
    let first = lab.cni("ADD", &id, &path, &conf).unwrap();
    assert!(first.1, "{}", first.0);
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(ns.spawn_detached(&[&echo, "serve", &ECHO_PORT.to_string()]).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let ip: Ipv4Addr = {
        let r: Value = serde_json::from_str(&first.0).unwrap();
        r["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").parse().unwrap()
    };
    let client = &lab.pods[0].ns;
    assert!(tcp(&lab, client, ip));
    // The runtime retries: same answer, and the pod still works.
    let again = lab.cni("ADD", &id, &path, &conf).unwrap();
    assert!(again.1, "{}", again.0);
    let (a, b): (Value, Value) =
        (serde_json::from_str(&first.0).unwrap(), serde_json::from_str(&again.0).unwrap());
    assert_eq!(a, b, "the same result");
    assert!(tcp(&lab, client, ip), "still reachable after the retry");
    assert!(lab.cni("CHECK", &id, &path, &conf).unwrap().1);

    // The host side goes (and with it the pod's interface): CHECK fails,
    // the endpoint is not ready, and an ADD rebuilds it.
    let ep = endpoints(&lab).into_iter().find(|e| e.container_id == id).unwrap();
    lab.node.ip(&["link", "del", &ep.host_ifname]).unwrap();
    let (out, ok) = lab.cni("CHECK", &id, &path, &conf).unwrap();
    assert!(!ok, "CHECK passed a pod without a device: {out}");
    let ep = endpoints(&lab).into_iter().find(|e| e.container_id == id).unwrap();
    assert!(ep.state.starts_with("not-ready"), "{}", ep.state);
    let rebuilt = lab.cni("ADD", &id, &path, &conf).unwrap();
    assert!(rebuilt.1, "{}", rebuilt.0);
    assert!(tcp(&lab, client, ip), "reachable after the rebuild");
    assert!(lab.cni("CHECK", &id, &path, &conf).unwrap().1);
    assert_eq!(endpoints(&lab).into_iter().find(|e| e.container_id == id).unwrap().state, "ready");

    // The program alone detached: CHECK and the endpoint list say so.
    lab.node.netlink(|_| ciliate_datapath::loader::detach_tc_filter(&ep.host_ifname)).unwrap();
    let (out, ok) = lab.cni("CHECK", &id, &path, &conf).unwrap();
    assert!(!ok, "CHECK passed a pod without its program: {out}");
    assert!(out.contains("from-container"), "{out}");
}

/// Item 10: no API call breaks another caller's pod.
#[test]
fn no_caller_can_break_another_pod() {
    let lab = lab(2);
    std::thread::sleep(Duration::from_millis(300));
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    // Releasing an address a pod holds.
    let e = lab
        .client()
        .call::<Value>(method::DELETE, &format!("/v1/ipam/{}", p1.state.ip), None::<&()>)
        .unwrap_err();
    assert_eq!(status_of(e), 409);
    // An endpoint naming another pod's host device.
    let req = endpoint_request(&lab, "intruder", &p1.state.lxc, &[("app", "x")]);
    let e = lab.client().call::<Endpoint>(method::PUT, "/v1/endpoint", Some(&req)).unwrap_err();
    assert_eq!(status_of(e), 409);
    // An endpoint with an address that is not its own.
    let req = EndpointCreate { host_ifname: "lxcintruder".into(), ip: p2.state.ip, ..req };
    let e = lab.client().call::<Endpoint>(method::PUT, "/v1/endpoint", Some(&req)).unwrap_err();
    assert_eq!(status_of(e), 400);
    // Both pods are as they were.
    assert!(tcp(&lab, &p2.ns, p1.state.ip));
    assert!(tcp(&lab, &p1.ns, p2.state.ip));
    let eps = endpoints(&lab);
    assert!(eps.iter().all(|e| e.state == "ready"), "{eps:?}");
    assert!(!eps.iter().any(|e| e.container_id == "intruder"));
}

/// Item 11: CNI_NETNS naming the node's own namespace is refused, and the
/// node's routes stay as they were.
#[test]
fn the_nodes_own_namespace_is_not_a_pod() {
    let lab = lab(0);
    let routes = lab.node.ip(&["route", "show"]).unwrap();
    let conf = lab.cni_config(&[("app", "x")]);
    let node_ns = lab.node.path().display().to_string();
    let (out, ok) = lab.cni("ADD", "node-itself", &node_ns, &conf).unwrap();
    assert!(!ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], 4, "{out}");
    assert_eq!(lab.node.ip(&["route", "show"]).unwrap(), routes);
    assert!(!endpoints(&lab).iter().any(|e| e.container_id == "node-itself"));
}

/// Item 12: a service the maps cannot hold is refused before anything is
/// written; later services still go in.
#[test]
fn a_service_too_big_for_the_maps_is_refused_whole() {
    let lab = lab(1);
    let backends: Vec<Value> = (0..70_000u32)
        .map(|i| serde_json::json!({"ip": Ipv4Addr::from(0x0a64_0000 + i).to_string(), "port": 80}))
        .collect();
    let spec = serde_json::json!({
        "id": 42, "frontend": {"ip": "10.96.5.5", "port": 80}, "kind": "ClusterIP",
        "backends": backends
    });
    let e = lab.client().call::<Value>(method::PUT, "/v1/service", Some(&spec)).unwrap_err();
    assert!(e.to_string().contains("ciliate_lb4_backends"), "{e}");
    assert_eq!(status_of(e), 507);
    let maps = ciliate_datapath::lbmaps::LbMaps::from_pin_dir(&lab.pins_dir).unwrap();
    let backends = maps.backends().unwrap();
    assert!(backends.is_empty(), "orphan backends: {}", backends.len());
    assert!(lab.client().get::<Vec<Value>>("/v1/service").unwrap().is_empty());
    let small = serde_json::json!({
        "id": 43, "frontend": {"ip": "10.96.5.6", "port": 7}, "kind": "ClusterIP",
        "backends": [{"ip": lab.pods[0].state.ip.to_string(), "port": 7}]
    });
    lab.client().call::<Value>(method::PUT, "/v1/service", Some(&small)).unwrap();
    assert_eq!(maps.backends().unwrap().len(), 1);
    assert!(lab.client().get::<Value>("/v1/service/42").is_err());
}

/// Item 13: ADDs in flight when the agent is killed fail with "try again"
/// (11), and DELs after it returns leave no endpoint datapath behind.
#[test]
fn adds_cut_short_by_kill_9_are_retryable_and_leave_nothing() {
    const N: usize = 20;
    let lab = lab(0);
    let conf = lab.cni_config(&[("app", "killed")]);
    let nss: Vec<Netns> =
        (0..N).map(|i| Netns::create(&format!("{}-k{i}", lab.config.lab)).unwrap()).collect();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let codes: Vec<Option<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .map(|ns| {
                let (lab, conf, done) = (&lab, &conf, done_tx.clone());
                s.spawn(move || {
                    let (out, ok) =
                        lab.cni("ADD", ns.name(), &ns.path().display().to_string(), conf).unwrap();
                    let _ = done.send(());
                    if ok {
                        None
                    } else {
                        serde_json::from_str::<Value>(&out).unwrap()["code"].as_u64()
                    }
                })
            })
            .collect();
        // Killed once the first ADD is through: the others are in flight.
        done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        for pid in lab.agent_pids() {
            // SAFETY: kill(2) on the lab's own agent.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<u64> = codes.iter().flatten().copied().collect();
    assert!(!failed.is_empty(), "the kill came after every ADD: {codes:?}");
    assert!(failed.iter().all(|c| *c == 11), "failed ADDs must say try again: {codes:?}");
    lab.start_agent().unwrap();
    for ns in &nss {
        let (out, ok) = lab.cni("DEL", ns.name(), &ns.path().display().to_string(), &conf).unwrap();
        assert!(ok, "{out}");
    }
    let left =
        lab.node.netlink(|_| ciliate_datapath::node::endpoint_devices(&lab.pins_dir)).unwrap();
    let health = endpoints(&lab)
        .into_iter()
        .find(|e| e.container_id == "reserved:health")
        .unwrap()
        .host_ifname;
    assert_eq!(left, vec![health], "only the health endpoint's device runs from-container");
    assert!(endpoints(&lab).iter().all(|e| e.container_id.starts_with("reserved:")));
}
