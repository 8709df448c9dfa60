//! End to end on the one-node lab: the from-container program answers each
//! pod's ARP for its gateway with the pod's own lxc MAC, pods reach the
//! gateway and each other, and everything is removed afterwards.
//! Needs root; CI runs as root.

use ciliate_common::metrics;
use ciliate_datapath::maps::MetricsMap;
use ciliate_lab::{
    names::token,
    netns::{self, exists},
    node::{self, NodeLab, NodeLabConfig},
};

fn lab_name() -> String {
    format!("clt{}", token())
}

fn neighbour_mac(ns: &ciliate_lab::Netns, ip: &str) -> String {
    let out = ns.ip(&["-j", "neigh", "show", ip]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["lladdr"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn pods_get_their_own_gateway_mac_and_reach_the_gateway_and_each_other() {
    let lab = NodeLab::up(NodeLabConfig::new(&lab_name(), 2)).unwrap();
    let gw = lab.router_ip().to_string();
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);

    // Routes as Cilium sets them: the gateway on-link, default via it.
    let routes = p1.ns.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains(&format!("default via {gw} dev eth0")),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("{gw} dev eth0 scope link")),
        "{routes}"
    );

    p1.ns.exec(&["ping", "-c", "2", "-W", "2", &gw]).unwrap();
    p2.ns.exec(&["ping", "-c", "1", "-W", "2", &gw]).unwrap();
    assert_eq!(neighbour_mac(&p1.ns, &gw), p1.state.lxc_mac);
    assert_eq!(neighbour_mac(&p2.ns, &gw), p2.state.lxc_mac);
    assert_ne!(
        p1.state.lxc_mac, p2.state.lxc_mac,
        "each pod sees its own gateway MAC"
    );

    p1.ns
        .exec(&["ping", "-c", "2", "-W", "2", &p2.state.ip.to_string()])
        .unwrap();

    // The packets went through from-container: it counted them.
    let m = MetricsMap::from_pin_dir(&lab.pins.dir).unwrap();
    let fwd = m
        .get(metrics::REASON_FORWARDED, metrics::DIR_EGRESS)
        .unwrap();
    assert!(
        fwd.packets >= 5,
        "from-container forwarded {} packets",
        fwd.packets
    );
}

#[test]
fn without_the_program_the_gateway_is_not_answered() {
    // The lab sets arp_ignore 8 on lxc devices, so only from-container
    // answers ARP there: detaching it (removing the pinned link, which is
    // what holds the tcx attachment) must leave the gateway unresolved.
    let lab = NodeLab::up(NodeLabConfig::new(&lab_name(), 1)).unwrap();
    let p1 = &lab.pods[0];
    let link = lab.pins.link_path(&p1.state.lxc, "from-container");
    assert_eq!(lab.lxc_programs(&p1.state.lxc).unwrap(), ["from_container"]);
    std::fs::remove_file(&link).unwrap();
    // The kernel releases an unpinned link after an RCU grace period.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lab.lxc_programs(&p1.state.lxc).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "program still attached after unpinning"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let gw = lab.router_ip().to_string();
    assert!(p1.ns.exec(&["ping", "-c", "1", "-W", "1", &gw]).is_err());
}

#[test]
fn dropping_the_lab_removes_namespaces_and_pins() {
    let name = lab_name();
    let (nss, pins) = {
        let lab = NodeLab::up(NodeLabConfig::new(&name, 2)).unwrap();
        let s = lab.state();
        let mut nss: Vec<String> = s.pods.iter().map(|p| p.ns.clone()).collect();
        nss.push(s.node_ns);
        (nss, s.pins_dir)
    };
    for ns in &nss {
        assert!(!exists(ns), "{ns} leaked");
    }
    assert!(!pins.exists(), "{} leaked", pins.display());
}

#[test]
fn a_kept_lab_is_recorded_and_removed_by_down() {
    let name = lab_name();
    let state = NodeLab::up(NodeLabConfig::new(&name, 2))
        .unwrap()
        .keep()
        .unwrap();
    assert_eq!(node::load_state(&name).unwrap().as_ref(), Some(&state));
    assert!(exists(&state.node_ns));
    assert!(state.pins_dir.join("links").exists());
    let removed = node::down(&name, std::path::Path::new("/sys/fs/bpf")).unwrap();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(
        !netns::list()
            .iter()
            .any(|n| n.starts_with(&format!("{name}-")))
    );
    assert!(!state.pins_dir.exists());
    assert_eq!(node::load_state(&name).unwrap(), None);
}
