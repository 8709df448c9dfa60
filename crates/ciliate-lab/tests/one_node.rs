//! End to end on the one-node lab (agent + CNI plugin + datapath): each
//! pod's ARP for its gateway is answered by from-container with the pod's
//! own lxc MAC, pods reach the gateway and each other (TCP and UDP through
//! conntrack, delivered straight into the destination pod), the host reaches
//! pods through from-host with the host identity, and everything is removed
//! afterwards. Needs root; CI runs as root.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ciliate_api::models::MonitorEvent;
use ciliate_common::{ct, identity, metrics};
use ciliate_datapath::maps::{CtMaps, MetricsMap};
use ciliate_lab::{
    Netns,
    events::Events,
    names::token,
    netns::{self, exists},
    node::{self, Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};

pub fn lab_name() -> String {
    format!("clt{}", token())
}

pub fn lab(pods: usize) -> NodeLab {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&lab_name(), pods, bins)).unwrap();
    // The echo servers were just started: wait until each listens.
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    lab
}

fn echo(lab: &NodeLab, from: &Netns, proto: &str, to: Ipv4Addr, msg: &str) -> String {
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    from.exec(&[&bin, proto, &format!("{to}:{ECHO_PORT}"), msg]).unwrap().trim().to_owned()
}

fn neighbour_mac(ns: &Netns, ip: &str) -> String {
    let out = ns.ip(&["-j", "neigh", "show", ip]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["lladdr"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn pods_get_their_own_gateway_mac_and_reach_the_gateway_and_each_other() {
    let lab = lab(2);
    let gw = lab.router_ip().to_string();
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);

    // Routes as Cilium sets them: the gateway on-link, default via it.
    let routes = p1.ns.ip(&["route", "show"]).unwrap();
    assert!(routes.contains(&format!("default via {gw} dev eth0")), "{routes}");
    assert!(routes.contains(&format!("{gw} dev eth0 scope link")), "{routes}");
    // IPv6 is off on the pod's interface (the datapath is IPv4 only: its
    // router solicitations would only be drops).
    let v6 = p1.ns.exec(&["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]).unwrap();
    assert_eq!(v6.trim(), "1");

    p1.ns.exec(&["ping", "-c", "2", "-W", "2", &gw]).unwrap();
    p2.ns.exec(&["ping", "-c", "1", "-W", "2", &gw]).unwrap();
    assert_eq!(neighbour_mac(&p1.ns, &gw), p1.state.lxc_mac);
    assert_eq!(neighbour_mac(&p2.ns, &gw), p2.state.lxc_mac);
    assert_ne!(p1.state.lxc_mac, p2.state.lxc_mac, "each pod sees its own gateway MAC");

    p1.ns.exec(&["ping", "-c", "2", "-W", "2", &p2.state.ip.to_string()]).unwrap();

    // The packets went through the datapath: to the stack (egress) for the
    // gateway, delivered into the pod (ingress) for pod to pod.
    let m = MetricsMap::from_pin_dir(&lab.pins_dir).unwrap();
    let egress = m.get(metrics::REASON_FORWARDED, metrics::DIR_EGRESS).unwrap();
    let ingress = m.get(metrics::REASON_FORWARDED, metrics::DIR_INGRESS).unwrap();
    assert!(egress.packets >= 3, "to the stack: {} packets", egress.packets);
    assert!(ingress.packets >= 4, "delivered to pods: {} packets", ingress.packets);
}

#[test]
fn pod_to_pod_tcp_and_udp_are_delivered_directly_and_tracked() {
    let lab = lab(2);
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    assert_ne!(p1.state.identity, p2.state.identity, "different labels, different identities");
    let mut events = Events::subscribe(&lab.client(), "type=trace").unwrap();
    assert_eq!(echo(&lab, &p1.ns, "tcp", p2.state.ip, "hello over tcp"), "hello over tcp");
    assert_eq!(echo(&lab, &p1.ns, "udp", p2.state.ip, "hello over udp"), "hello over udp");

    // The connection is in conntrack in both views, opened by pod1's identity.
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    for proto in [6u8, 17] {
        for dir in [ct::DIR_EGRESS, ct::DIR_INGRESS] {
            let found = ct.iter().find(|(k, _)| {
                k.saddr == p1.state.ip.octets()
                    && k.daddr == p2.state.ip.octets()
                    && k.dport == ECHO_PORT.to_be()
                    && k.proto == proto
                    && k.dir == dir
            });
            let (_, e) =
                found.unwrap_or_else(|| panic!("no entry proto {proto} dir {dir}: {ct:?}"));
            assert_eq!(e.src_identity, p1.state.identity);
            assert!(e.rx_packets >= 1, "the reply was seen: {e:?}");
        }
    }

    // Delivery into pod2 was traced at its endpoint, with both identities
    // (seen through the agent, the ring's one reader).
    let traced = events.wait_for(Duration::from_secs(5), |e| {
        matches!(e, MonitorEvent::Trace(t)
            if t.observation_point == "to-endpoint"
                && t.dst_endpoint == p2.state.endpoint_id
                && t.src_identity == p1.state.identity
                && t.dst_identity == p2.state.identity)
    });
    assert!(traced.is_ok(), "no to-endpoint trace for pod2 in {:?}", traced.err());
}

#[test]
fn the_node_has_a_host_and_a_health_endpoint_as_in_cilium() {
    let lab = lab(1);
    let eps: Vec<ciliate_api::models::Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    let host = eps.iter().find(|e| e.identity == identity::HOST).expect("host endpoint");
    assert_eq!(host.ip, lab.router_ip());
    let health = eps.iter().find(|e| e.identity == identity::HEALTH).expect("health endpoint");
    assert_eq!(health.labels.keys().collect::<Vec<_>>(), ["reserved:health"]);
    // The health endpoint is a real endpoint: pods reach it, it reaches them.
    let p1 = &lab.pods[0];
    p1.ns.exec(&["ping", "-c", "1", "-W", "2", &health.ip.to_string()]).unwrap();
    let health_ns = Netns::existing(&format!("{}-health", lab.node.name()));
    health_ns.exec(&["ping", "-c", "1", "-W", "2", &p1.state.ip.to_string()]).unwrap();
}

#[test]
fn the_host_reaches_pods_through_from_host_with_the_host_identity() {
    let lab = lab(1);
    let p1 = &lab.pods[0];
    assert_eq!(echo(&lab, &lab.node, "tcp", p1.state.ip, "from the host"), "from the host");
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    let (_, e) = ct
        .iter()
        .find(|(k, _)| {
            k.saddr == lab.router_ip().octets()
                && k.daddr == p1.state.ip.octets()
                && k.dir == ct::DIR_INGRESS
                && k.proto == 6
        })
        .unwrap_or_else(|| panic!("no host → pod entry in {ct:?}"));
    assert_eq!(e.src_identity, identity::HOST);
    // The pod's reply was recognised in the pod's own (egress) view.
    assert!(e.rx_packets >= 1, "{e:?}");
}

#[test]
fn without_the_program_the_gateway_is_not_answered() {
    // The lxc devices have arp_ignore 8, so only from-container answers ARP
    // there: detaching it (removing its tc filter) must leave the gateway
    // unresolved.
    let lab = lab(1);
    let p1 = &lab.pods[0];
    assert_eq!(lab.lxc_programs(&p1.state.lxc).unwrap(), ["from_container"]);
    lab.node.netlink(|_| ciliate_datapath::loader::detach_tc_filter(&p1.state.lxc)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.lxc_programs(&p1.state.lxc).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "program still attached after detaching");
        std::thread::sleep(Duration::from_millis(20));
    }
    let gw = lab.router_ip().to_string();
    assert!(p1.ns.exec(&["ping", "-c", "1", "-W", "1", &gw]).is_err());
}

#[test]
fn dropping_the_lab_removes_namespaces_agent_and_pins() {
    let (nss, pins, socket, cgroup) = {
        let lab = lab(2);
        let s = lab.state();
        let mut nss: Vec<String> = s.pods.iter().map(|p| p.ns.clone()).collect();
        nss.push(format!("{}-health", s.node_ns));
        assert!(exists(&nss[nss.len() - 1]), "the agent made its health namespace");
        nss.push(s.node_ns);
        nss.push(s.external_ns);
        assert!(s.cgroup.exists());
        (nss, s.pins_dir, s.agent_socket, s.cgroup)
    };
    assert!(!cgroup.exists(), "{} leaked", cgroup.display());
    for ns in &nss {
        assert!(!exists(ns), "{ns} leaked");
    }
    assert!(!pins.exists(), "{} leaked", pins.display());
    assert!(!socket.exists(), "{} leaked", socket.display());
}

#[test]
fn a_kept_lab_is_recorded_and_removed_by_down() {
    let name = lab_name();
    let bins = Binaries::beside_current_exe().unwrap();
    let state = NodeLab::up(NodeLabConfig::new(&name, 2, bins)).unwrap().keep().unwrap();
    assert_eq!(node::load_state(&name).unwrap().as_ref(), Some(&state));
    assert!(exists(&state.node_ns));
    assert!(state.pins_dir.join("links").exists());
    let removed = node::down(&name).unwrap();
    assert_eq!(removed.len(), 5, "two pods, the node, its health and external host: {removed:?}");
    assert!(!netns::list().iter().any(|n| n.starts_with(&format!("{name}-"))));
    assert!(!state.cgroup.exists(), "{} leaked", state.cgroup.display());
    assert!(!state.pins_dir.exists());
    assert_eq!(node::load_state(&name).unwrap(), None);
}
