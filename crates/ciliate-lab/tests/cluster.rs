//! Many nodes end to end: two nodes on an underlay, pods on each, in both
//! routing modes and with both stores. Cross-node pod ↔ pod TCP/UDP/ICMP,
//! the same identities on every node, ingress policy on the receiving node
//! decided by the identity the VNI carries, pods reaching the external host
//! masqueraded behind their node, an etcd outage that breaks no flow and
//! converges, and a node that leaves. Needs root; CI runs as root.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ciliate_api::{
    client::method,
    models::{Endpoint, PolicyImport, Status},
};
use ciliate_common::identity;
use ciliate_datapath::maps::IpcacheMap;
use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig, EXTERNAL_IP, Store, node_ip},
    names::token,
    node::{Binaries, ECHO_PORT, wait_listening},
};

fn up(nodes: usize, pods: usize, routing: &str, store: Store) -> ClusterLab {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = ClusterLabConfig::new(&format!("clc{}", token()), nodes, pods, bins);
    cfg.routing = routing.into();
    cfg.store = store;
    let lab = ClusterLab::up(cfg).unwrap();
    for p in &lab.pods {
        wait_listening(&p.pod.ns, ECHO_PORT).unwrap();
    }
    lab
}

fn echo(lab: &ClusterLab, from: usize, args: &[&str]) -> Result<String, String> {
    lab.run_echo(&lab.pods[from].pod.ns, None, args)
        .map(|s| s.trim().to_owned())
        .map_err(|e| e.to_string())
}

fn to(lab: &ClusterLab, pod: usize) -> String {
    format!("{}:{ECHO_PORT}", lab.pods[pod].pod.state.ip)
}

/// What the external host sees as the source of `pod`'s connections.
fn seen_from_outside(lab: &ClusterLab, pod: usize) -> String {
    echo(lab, pod, &["names", &format!("{EXTERNAL_IP}:9000"), "1"]).unwrap()
}

fn external_peer_server(lab: &ClusterLab) {
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(lab.external.spawn_detached(&[&bin, "serve", "9000", "@peer"]).unwrap());
    wait_listening(&lab.external, 9000).unwrap();
}

/// A NodePort on node1 whose only backend is pod2, on node2, reached from
/// the external host.
fn nodeport_to_the_other_node(lab: &ClusterLab) {
    let backend = lab.pods[1].pod.state.ip;
    let spec = serde_json::json!({
        "id": 1, "frontend": {"ip": "0.0.0.0", "port": 30080}, "kind": "NodePort",
        "backends": [{"ip": backend, "port": ECHO_PORT}],
    });
    let _: serde_json::Value =
        lab.nodes[0].client().call(method::PUT, "/v1/service", Some(&spec)).unwrap();
    let to = format!("{}:30080", node_ip(1));
    let got = lab.run_echo(&lab.external, None, &["tcp", &to, "np"]).unwrap();
    assert_eq!(got.trim(), "np");
    let got = lab.run_echo(&lab.external, None, &["udp", &to, "np"]);
    assert!(got.is_err(), "a TCP service answered UDP");
}

fn cross_node_traffic_works(lab: &ClusterLab) {
    // pod1 is on node1, pod2 on node2 (one pod per node).
    assert_ne!(lab.pods[0].node, lab.pods[1].node);
    assert_eq!(echo(lab, 0, &["tcp", &to(lab, 1), "hello"]).unwrap(), "hello");
    assert_eq!(echo(lab, 1, &["tcp", &to(lab, 0), "back"]).unwrap(), "back");
    assert_eq!(echo(lab, 0, &["udp", &to(lab, 1), "dgram"]).unwrap(), "dgram");
    // A datagram past the MTU crosses in fragments, both ways.
    let big = echo(lab, 0, &["udp-big", &to(lab, 1), "4000"]);
    assert_eq!(big.unwrap(), "4000 bytes echoed");
    let ip2 = lab.pods[1].pod.state.ip.to_string();
    lab.pods[0].pod.ns.exec(&["ping", "-c", "1", "-W", "2", &ip2]).unwrap();
}

#[test]
fn tunnel_mode_carries_identities_and_masquerades_to_the_world() {
    let lab = up(2, 1, "tunnel", Store::Local);
    cross_node_traffic_works(&lab);
    // (Before the policy below: the backend sees the SNATed flow as
    // remote-node, which that policy does not allow.)
    nodeport_to_the_other_node(&lab);

    // Each node got its own pod CIDR from the cluster pool, and both nodes
    // know pod1's identity; node2 reaches it through node1.
    let (p1, p2) = (&lab.pods[0].pod.state, &lab.pods[1].pod.state);
    assert_ne!(p1.ip.octets()[2], p2.ip.octets()[2], "{} and {}", p1.ip, p2.ip);
    let ipc2 = IpcacheMap::from_pin_dir(&lab.nodes[1].pins_dir).unwrap();
    let e = ipc2.lookup(p1.ip).unwrap().unwrap();
    assert_eq!((e.identity, Ipv4Addr::from(e.tunnel_endpoint)), (p1.identity, node_ip(1)));
    let n1 = ipc2.lookup(node_ip(1)).unwrap().unwrap();
    assert_eq!(n1.identity, identity::REMOTE_NODE);
    assert_ne!(p1.identity, p2.identity, "different labels, different identities");

    // Ingress policy on node2 by the sender's identity: pod1 may reach
    // pod2 on TCP 7, a pod3 on node1 (app=pod3) may not.
    let pod3 = lab.handle(0).add_pod_in("pod3", "default", &[("app", "pod3")]).unwrap();
    wait_listening(&pod3.ns, ECHO_PORT).unwrap();
    std::thread::sleep(Duration::from_millis(1500)); // pod3's identity reaches node2
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n\
                  spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
                  \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}]}]\n";
    let _: serde_json::Value = lab.nodes[1]
        .client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: policy.into() }))
        .unwrap();
    assert!(echo(&lab, 0, &["tcp", &to(&lab, 1), "ok"]).is_ok(), "pod1 is allowed");
    let mut drops =
        ciliate_lab::events::Events::subscribe(&lab.nodes[1].client(), "type=drop").unwrap();
    let denied = lab.run_echo(&pod3.ns, None, &["tcp", &to(&lab, 1), "no"]);
    assert!(denied.is_err(), "pod3 on another node got through");
    // The drop on node2 names the sender by the identity its packet carried
    // in the VNI, as the verdict did (not "world").
    let seen = drops.wait_for(Duration::from_secs(5), |e| {
        matches!(e, ciliate_api::models::MonitorEvent::Drop(d)
            if d.reason_text == "Policy denied" && d.src_identity == pod3.state.identity)
    });
    assert!(seen.is_ok(), "no drop from pod3's identity {}: {:?}", pod3.state.identity, seen.err());

    // The identity travels in the VNI: with pod1's ipcache entry on node2
    // overwritten as "world", its packets are still allowed by identity.
    let mut ipc2 = IpcacheMap::from_pin_dir(&lab.nodes[1].pins_dir).unwrap();
    let world = ciliate_common::ipcache::IpcacheEntry { identity: identity::WORLD, ..e };
    ipc2.upsert(p1.ip, 32, &world).unwrap();
    assert!(echo(&lab, 0, &["tcp", &to(&lab, 1), "vni"]).is_ok(), "the VNI's identity decides");

    // Pods reach the world masqueraded behind their node.
    external_peer_server(&lab);
    assert_eq!(seen_from_outside(&lab, 0), format!("{} 1", node_ip(1)));
    assert_eq!(seen_from_outside(&lab, 1), format!("{} 1", node_ip(2)));

    node_health_follows_the_health_responders(&lab);
}

/// Status of node `n`'s agent.
fn status(lab: &ClusterLab, n: usize) -> ciliate_api::models::Status {
    lab.nodes[n].client().get("/v1/status").unwrap()
}

/// Wait (up to 20 s: probes run every 5 s) until `cond` holds of node1's
/// status.
fn until_status(lab: &ClusterLab, what: &str, cond: impl Fn(&ciliate_api::models::Status) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(lab, 0);
        if cond(&st) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each agent probes the other's health responder (TCP 4240): a node whose
/// responder does not answer is unreachable (status and
/// `cilium_unreachable_nodes`) until it answers again.
fn node_health_follows_the_health_responders(lab: &ClusterLab) {
    let node2 = lab.nodes[1].ns.name().to_owned();
    until_status(lab, "both nodes reachable", |s| {
        s.cluster_nodes == 2 && s.unreachable_nodes.is_empty()
    });
    let rule = ["INPUT", "-p", "tcp", "--dport", "4240", "-j", "DROP"];
    let iptables = |op: &str| {
        let mut args = vec!["iptables", op];
        args.extend_from_slice(&rule);
        lab.nodes[1].ns.exec(&args).unwrap();
    };
    iptables("-I");
    until_status(lab, "node2 unreachable", |s| s.unreachable_nodes == [node2.clone()]);
    let scrape = lab.nodes[0].ns.exec(&["curl", "-sf", "http://127.0.0.1:9962/metrics"]).unwrap();
    assert!(scrape.lines().any(|l| l == "cilium_unreachable_nodes 1"), "{scrape}");
    iptables("-D");
    until_status(lab, "node2 reachable again", |s| s.unreachable_nodes.is_empty());
}

#[test]
fn native_routing_with_etcd_survives_an_outage_and_a_node_leaving() {
    let lab = up(2, 1, "native", Store::Etcd);
    cross_node_traffic_works(&lab);
    let st: Status = lab.nodes[0].client().get("/v1/status").unwrap();
    assert!(st.kvstore.starts_with("etcd 192.168.200.1:2379: ok"), "{}", st.kvstore);
    assert_eq!((st.cluster_nodes, st.routing.as_str()), (2, "native"));
    external_peer_server(&lab);
    assert_eq!(seen_from_outside(&lab, 0), format!("{} 1", node_ip(1)));
    nodeport_to_the_other_node(&lab);

    // etcd goes away for 10 s: an established flow keeps going, status
    // says so, and after etcd returns a new pod is known cluster-wide.
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    let mut stream = lab.pods[0].pod.ns.command(&bin);
    stream.args(["stream", &to(&lab, 1), "14"]).stdin(std::process::Stdio::null());
    let stream = std::thread::spawn(move || stream.output().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_etcd();
    std::thread::sleep(Duration::from_secs(4));
    let st: Status = lab.nodes[0].client().get("/v1/status").unwrap();
    assert!(st.kvstore.contains("failing"), "{}", st.kvstore);
    assert_eq!(echo(&lab, 1, &["udp", &to(&lab, 0), "still"]).unwrap(), "still");
    std::thread::sleep(Duration::from_secs(6));
    lab.restart_etcd().unwrap();
    let out = stream.join().unwrap();
    assert!(out.status.success(), "the flow broke: {}", String::from_utf8_lossy(&out.stderr));
    let pod3 = lab.handle(1).add_pod_in("pod3", "default", &[("app", "pod3")]).unwrap();
    let ip3 = pod3.state.ip;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ipc1 = IpcacheMap::from_pin_dir(&lab.nodes[0].pins_dir).unwrap();
    while ipc1.lookup(ip3).unwrap().is_none_or(|e| e.identity != pod3.state.identity) {
        assert!(Instant::now() < deadline, "node1 never learned pod3 after etcd came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let st: Status = lab.nodes[0].client().get("/v1/status").unwrap();
    assert!(st.kvstore.ends_with(": ok"), "{}", st.kvstore);
    wait_listening(&pod3.ns, ECHO_PORT).unwrap();
    assert_eq!(echo(&lab, 0, &["tcp", &format!("{ip3}:{ECHO_PORT}"), "new"]).unwrap(), "new");

    // node2 leaves (its agent stops; its lease expires): node1 removes its
    // node and endpoints and the route to its pods.
    let eps2: Vec<Endpoint> = lab.nodes[1].client().get("/v1/endpoint").unwrap();
    for pid in lab.agent_pids(1) {
        // SAFETY: kill(2) on the lab's own agent.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let st: Status = lab.nodes[0].client().get("/v1/status").unwrap();
        let left =
            ipc1.lookup(node_ip(2)).unwrap().is_none_or(|e| e.identity != identity::REMOTE_NODE)
                && eps2.iter().all(|e| {
                    ipc1.lookup(e.ip).unwrap().is_none_or(|x| x.identity == identity::WORLD)
                });
        if st.cluster_nodes == 1 && left {
            break;
        }
        assert!(Instant::now() < deadline, "node2 is still known to node1: {st:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let routes = lab.nodes[0].ns.ip(&["route"]).unwrap();
    assert!(!routes.contains(&format!("via {}", node_ip(2))), "{routes}");
}
