//! NodePort acceleration end to end (`ciliate-agent
//! --node-port-acceleration native`): two nodes in native routing, and in
//! tunnel mode; a NodePort on node1 whose only backend is a pod on node2
//! answers the external host over TCP and UDP, the requests forwarded at
//! XDP on node1 (its `SERVICE` forward counter grows by at least one per
//! request; in tunnel mode wrapped in VXLAN there) and the replies
//! translated back by from-netdev; a NodePort whose backend is on node1
//! itself still answers (the tc path delivers into the pod). Needs root;
//! CI runs as root.

use ciliate_api::client::method;
use ciliate_common::metrics::{DIR_SERVICE, REASON_FORWARDED};
use ciliate_datapath::maps::MetricsMap;
use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig, node_ip},
    names::token,
    node::{Binaries, ECHO_PORT, wait_listening},
};

fn forwarded_at_xdp(lab: &ClusterLab) -> u64 {
    let m = MetricsMap::from_pin_dir(&lab.nodes[0].pins_dir).unwrap();
    m.get(REASON_FORWARDED, DIR_SERVICE).unwrap().packets
}

fn nodeport(lab: &ClusterLab, id: u32, port: u16, backend: usize) {
    let ip = lab.pods[backend].pod.state.ip;
    let spec = serde_json::json!({
        "id": id, "frontend": {"ip": "0.0.0.0", "port": port}, "kind": "NodePort",
        "backends": [{"ip": ip, "port": ECHO_PORT}],
    });
    let _: serde_json::Value =
        lab.nodes[0].client().call(method::PUT, "/v1/service", Some(&spec)).unwrap();
    let udp = serde_json::json!({
        "id": id + 100, "frontend": {"ip": "0.0.0.0", "port": port, "protocol": "UDP"},
        "kind": "NodePort", "backends": [{"ip": ip, "port": ECHO_PORT, "protocol": "UDP"}],
    });
    let _: serde_json::Value =
        lab.nodes[0].client().call(method::PUT, "/v1/service", Some(&udp)).unwrap();
}

#[test]
fn nodeport_to_another_node_is_forwarded_at_xdp() {
    forwarded_at_xdp_in("native");
}

#[test]
fn nodeport_to_another_node_is_wrapped_and_forwarded_at_xdp_in_tunnel_mode() {
    forwarded_at_xdp_in("tunnel");
}

fn forwarded_at_xdp_in(routing: &str) {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = ClusterLabConfig::new(&format!("cxn{}", token()), 2, 1, bins);
    cfg.routing = routing.into();
    cfg.agent_args = vec!["--node-port-acceleration".into(), "native".into()];
    cfg.xdp_underlay = true;
    let lab = ClusterLab::up(cfg).unwrap();
    for p in &lab.pods {
        wait_listening(&p.pod.ns, ECHO_PORT).unwrap();
    }
    // pod1 is on node1, pod2 on node2.
    assert_ne!(lab.pods[0].node, lab.pods[1].node);
    nodeport(&lab, 1, 30080, 1);
    nodeport(&lab, 2, 30081, 0);

    let remote = format!("{}:30080", node_ip(1));
    let before = forwarded_at_xdp(&lab);
    for i in 0..5 {
        let msg = format!("xdp{i}");
        let got = lab.run_echo(&lab.external, None, &["tcp", &remote, &msg]).unwrap();
        assert_eq!(got.trim(), msg, "TCP through the NodePort to node2's pod ({routing})");
        let got = lab.run_echo(&lab.external, None, &["udp", &remote, &msg]).unwrap();
        assert_eq!(got.trim(), msg, "UDP through the NodePort to node2's pod ({routing})");
    }
    let at_xdp = forwarded_at_xdp(&lab) - before;
    // Per TCP exchange at least SYN, data, FIN; one datagram per UDP one.
    assert!(at_xdp >= 5 * 4, "{routing}: only {at_xdp} packets forwarded at XDP for 10 exchanges");

    // A backend on node1 itself: the tc path, unchanged.
    let local = format!("{}:30081", node_ip(1));
    let got = lab.run_echo(&lab.external, None, &["tcp", &local, "here"]).unwrap();
    assert_eq!(got.trim(), "here");
}
