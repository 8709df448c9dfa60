//! NodePort acceleration end to end (`ciliate-agent
//! --node-port-acceleration native`): two nodes in native routing, and in
//! tunnel mode; a NodePort on node1 whose only backend is a pod on node2
//! answers the external host over TCP and UDP, the requests forwarded at
//! XDP on node1 (its `SERVICE` forward counter grows by at least one per
//! request; in tunnel mode wrapped in VXLAN there) and the replies
//! translated back by from-netdev; a NodePort whose backend is on node1
//! itself still answers (the tc path delivers into the pod). NodePort DSR
//! (`--node-port-mode dsr`, native routing), at tc and at XDP: the
//! backend sees the client's own address, the replies come from the
//! frontend (the clients check) straight from node2, which holds the
//! flows' DSR records, and node1 keeps no SNAT state for them. Needs
//! root; CI runs as root.

use ciliate_api::client::method;
use ciliate_common::metrics::{DIR_SERVICE, REASON_FORWARDED};
use ciliate_datapath::{maps::MetricsMap, nodemaps::NatMap};
use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig, EXTERNAL_IP, node_ip},
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

#[test]
fn dsr_answers_the_client_from_the_backends_node_at_tc() {
    dsr_in(false);
}

#[test]
fn dsr_answers_the_client_from_the_backends_node_at_xdp() {
    dsr_in(true);
}

fn dsr_in(xdp: bool) {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = ClusterLabConfig::new(&format!("cds{}", token()), 2, 1, bins);
    cfg.routing = "native".into();
    cfg.agent_args = vec!["--node-port-mode".into(), "dsr".into()];
    if xdp {
        cfg.agent_args.extend(["--node-port-acceleration".into(), "native".into()]);
        cfg.xdp_underlay = true;
    }
    let lab = ClusterLab::up(cfg).unwrap();
    let how = if xdp { "DSR at XDP" } else { "DSR at tc" };
    for p in &lab.pods {
        wait_listening(&p.pod.ns, ECHO_PORT).unwrap();
    }
    assert_ne!(lab.pods[0].node, lab.pods[1].node);
    let status: serde_json::Value = lab.nodes[0].client().get("/v1/status").unwrap();
    assert_eq!(status["acceleration"]["node_port_mode"], "dsr", "{status}");
    nodeport(&lab, 1, 30080, 1);
    // pod2 also answers with the address it sees its client at.
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(lab.pods[1].pod.ns.spawn_detached(&[&bin, "serve", "9001", "@peer"]).unwrap());
    wait_listening(&lab.pods[1].pod.ns, 9001).unwrap();
    let ip = lab.pods[1].pod.state.ip;
    let peer = serde_json::json!({
        "id": 3, "frontend": {"ip": "0.0.0.0", "port": 30090}, "kind": "NodePort",
        "backends": [{"ip": ip, "port": 9001}],
    });
    let _: serde_json::Value =
        lab.nodes[0].client().call(method::PUT, "/v1/service", Some(&peer)).unwrap();

    let before = forwarded_at_xdp(&lab);
    // The clients fail unless the answer comes from node1:30080.
    let remote = format!("{}:30080", node_ip(1));
    for i in 0..3 {
        let msg = format!("dsr{i}");
        let got = lab.run_echo(&lab.external, None, &["tcp", &remote, &msg]).unwrap();
        assert_eq!(got.trim(), msg, "{how}: TCP through the NodePort to node2's pod");
        let got = lab.run_echo(&lab.external, None, &["udp", &remote, &msg]).unwrap();
        assert_eq!(got.trim(), msg, "{how}: UDP through the NodePort to node2's pod");
    }
    let names = format!("{}:30090", node_ip(1));
    let seen = lab.run_echo(&lab.external, None, &["names", &names, "1"]).unwrap();
    assert_eq!(seen.trim(), format!("{EXTERNAL_IP} 1"), "{how}: the backend sees the client");

    // node2 answered from the frontend by its records; node1 translated
    // nothing back (no SNAT state for the flows).
    let records = NatMap::from_pin_dir(&lab.nodes[1].pins_dir).unwrap().rows().unwrap();
    let dsr: Vec<_> = records.iter().filter(|r| r.direction == "DSR").collect();
    assert!(
        dsr.iter().any(
            |r| r.translated == remote && r.destination.starts_with(&format!("{EXTERNAL_IP}:"))
        ),
        "{how}: node2's DSR records: {records:?}"
    );
    let node1 = NatMap::from_pin_dir(&lab.nodes[0].pins_dir).unwrap().rows().unwrap();
    let backend = format!("{ip}:");
    assert!(
        !node1
            .iter()
            .any(|r| r.source.starts_with(&backend) || r.destination.starts_with(&backend)),
        "{how}: node1 SNATed a DSR flow: {node1:?}"
    );
    let at_xdp = forwarded_at_xdp(&lab) - before;
    if xdp {
        assert!(at_xdp >= 3 * 4, "only {at_xdp} packets forwarded at XDP");
    } else {
        assert_eq!(at_xdp, 0, "XDP is off");
    }
}
