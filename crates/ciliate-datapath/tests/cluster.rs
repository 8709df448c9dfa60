//! BPF_PROG_TEST_RUN tests of the multi-node datapath: to-overlay (tunnel
//! metadata from the ipcache, the sender's identity for the VNI; native
//! routing leaves it to the stack), from-overlay refusing a packet without
//! a VNI, masquerading (SNAT to the node's address, reverse SNAT of the
//! reply, a port collision resolved, ICMP echo, cluster traffic left
//! alone). Needs root; CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{
    drop,
    ipcache::IpcacheEntry,
    nat::{PORT_MAX, PORT_MIN},
    node::{NODE_F_MASQUERADE, NodeConfig, ROUTING_NATIVE, ROUTING_TUNNEL},
    trace,
};
use ciliate_datapath::{
    events::Event,
    objects::programs::{FROM_NETDEV, FROM_OVERLAY, TO_NETDEV},
    packet::{self, Eth, Ip4, L4, Parsed, tcp_flags},
    testrun::{TcRun, verdict},
};
use common::*;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 5);
const WORLD_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TUNNEL_IFINDEX: u32 = 77;

fn node_cfg(routing: u8, flags: u8) -> NodeConfig {
    NodeConfig::new(NODE_IP.octets(), ([10, 200, 0, 0], 16), routing, flags, TUNNEL_IFINDEX)
}

fn node(tag: &str, routing: u8, flags: u8) -> Node {
    let n = Node::new(tag);
    n.node.node_config().unwrap().set(&node_cfg(routing, flags)).unwrap();
    let remote = IpcacheEntry {
        identity: 3000,
        tunnel_endpoint: REMOTE_NODE.octets(),
        ..Default::default()
    };
    n.node.ipcache().unwrap().upsert(REMOTE_POD, 32, &remote).unwrap();
    n
}

fn parsed(run: &TcRun) -> Parsed {
    let p = packet::parse(&run.packet).unwrap();
    assert!(p.ipv4.as_ref().unwrap().header_csum_ok, "IP checksum broken");
    if let Some(l4) = &p.l4 {
        assert!(l4.csum_ok, "L4 checksum broken");
    }
    p
}

fn ends(p: &Parsed) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let (ip, l4) = (p.ipv4.as_ref().unwrap(), p.l4.as_ref().unwrap());
    ((ip.src, l4.sport), (ip.dst, l4.dport))
}

#[test]
fn a_pod_of_another_node_is_reached_through_the_overlay_with_the_senders_identity() {
    let mut n = node("cl-encap", ROUTING_TUNNEL, 0);
    let out = n.send_a(&A.send(REMOTE_POD, &tcp(40000, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", n.events.drain());
    let t = n.trace();
    assert_eq!(t.hdr.subtype, trace::TO_OVERLAY);
    assert_eq!(Ipv4Addr::from(t.tunnel_endpoint), REMOTE_NODE, "tunnel endpoint from the ipcache");
    assert_eq!((t.src_identity, t.dst_identity), (A.identity, 3000));
    assert_eq!(t.ifindex, TUNNEL_IFINDEX);
    // The inner packet is not changed.
    assert_eq!(ends(&parsed(&out)), ((A.ip, 40000), (REMOTE_POD, 80)));

    // A destination without a tunnel endpoint (the world) goes to the stack.
    let out = n.send_a(&A.send(WORLD_HOST, &tcp(40001, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::OK);
    assert_eq!(n.trace().hdr.subtype, trace::TO_STACK);
}

#[test]
fn native_routing_leaves_remote_pods_to_the_stack() {
    let mut n = node("cl-native", ROUTING_NATIVE, 0);
    let out = n.send_a(&A.send(REMOTE_POD, &tcp(40000, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::OK);
    let t = n.trace();
    assert_eq!((t.hdr.subtype, t.dst_identity), (trace::TO_STACK, 3000));
}

#[test]
fn from_overlay_refuses_a_packet_without_a_vni() {
    let mut n = node("cl-decap", ROUTING_TUNNEL, 0);
    let eth = Eth { dst: HOST_MAC, src: [0x0e, 0, 0, 0, 0, 9] };
    let pkt =
        packet::ipv4_frame(&eth, &Ip4::new(REMOTE_POD, A.ip), &tcp(80, 40000, tcp_flags::SYN));
    let out = Node::run(&mut n.host, FROM_OVERLAY, &pkt);
    assert_eq!(out.verdict, verdict::SHOT);
    let drops: Vec<u8> = n
        .events
        .drain()
        .into_iter()
        .filter_map(|e| if let Event::Drop(d) = e { Some(d.hdr.subtype) } else { None })
        .collect();
    assert_eq!(drops, [drop::INVALID_VNI]);
}

fn leaving(src: &Pod, dst: Ipv4Addr, l4: &L4<'_>) -> Vec<u8> {
    // As the stack sends it out of the native device.
    packet::ipv4_frame(
        &Eth { dst: [0x0e, 0, 0, 0, 0, 1], src: HOST_MAC },
        &Ip4::new(src.ip, dst),
        l4,
    )
}

/// A packet of `pod` to the world as it really leaves: from-container
/// (conntrack in the pod's view), the stack, then to-netdev.
fn out_via(n: &mut Node, pod: &Pod, l4: &L4<'_>) -> TcRun {
    let from_pod = pod.send(WORLD_HOST, l4);
    let run = if pod.ip == A.ip { n.send_a(&from_pod) } else { n.send_b(&from_pod) };
    assert_eq!(run.verdict, verdict::OK, "to the stack");
    n.events.drain();
    Node::run(&mut n.host, TO_NETDEV, &leaving(pod, WORLD_HOST, l4))
}

fn arriving(src: Ipv4Addr, l4: &L4<'_>) -> Vec<u8> {
    packet::ipv4_frame(
        &Eth { dst: HOST_MAC, src: [0x0e, 0, 0, 0, 0, 1] },
        &Ip4::new(src, NODE_IP),
        l4,
    )
}

#[test]
fn pods_leaving_the_cluster_are_masqueraded_and_their_replies_come_back() {
    let mut n = node("cl-masq", ROUTING_TUNNEL, NODE_F_MASQUERADE);
    let out = out_via(&mut n, &A, &tcp(40000, 80, tcp_flags::SYN));
    assert_eq!(out.verdict, verdict::OK);
    assert_eq!(
        ends(&parsed(&out)),
        ((NODE_IP, 40000), (WORLD_HOST, 80)),
        "the original port is kept when free"
    );
    let back = Node::run(
        &mut n.host,
        FROM_NETDEV,
        &arriving(WORLD_HOST, &tcp(80, 40000, tcp_flags::SYN | tcp_flags::ACK)),
    );
    assert_eq!(back.verdict, verdict::REDIRECT, "straight into the pod");
    assert_eq!(ends(&parsed(&back)), ((WORLD_HOST, 80), (A.ip, 40000)));

    // B uses the same port towards the same server: a collision, resolved
    // with another port; each reply finds its own pod.
    let out = out_via(&mut n, &B, &tcp(40000, 80, tcp_flags::SYN));
    let ((src, port), _) = ends(&parsed(&out));
    assert_eq!(src, NODE_IP);
    assert_ne!(port, 40000);
    assert!((PORT_MIN..=PORT_MAX).contains(&port), "{port}");
    let back =
        Node::run(&mut n.host, FROM_NETDEV, &arriving(WORLD_HOST, &tcp(80, port, tcp_flags::ACK)));
    assert_eq!(ends(&parsed(&back)).1, (B.ip, 40000));
    // A's flow keeps its mapping.
    let again = out_via(&mut n, &A, &tcp(40000, 80, tcp_flags::ACK));
    assert_eq!(ends(&parsed(&again)).0, (NODE_IP, 40000));
    assert_eq!(n.node.nat().unwrap().dump().unwrap().len(), 4, "OUT and IN for each flow");

    // ICMP echo: the identifier identifies the flow.
    let ping = L4::IcmpEcho { request: true, id: 77, seq: 1, payload: b"ping" };
    let out = out_via(&mut n, &A, &ping);
    assert_eq!(parsed(&out).ipv4.unwrap().src, NODE_IP);
    let pong = L4::IcmpEcho { request: false, id: 77, seq: 1, payload: b"ping" };
    let back = Node::run(&mut n.host, FROM_NETDEV, &arriving(WORLD_HOST, &pong));
    assert_eq!(parsed(&back).ipv4.unwrap().dst, A.ip);
}

#[test]
fn traffic_inside_the_cluster_and_of_the_node_itself_is_not_masqueraded() {
    let mut n = node("cl-nomasq", ROUTING_TUNNEL, NODE_F_MASQUERADE);
    let out = Node::run(
        &mut n.host,
        TO_NETDEV,
        &leaving(&A, REMOTE_POD, &tcp(40000, 80, tcp_flags::SYN)),
    );
    assert_eq!(ends(&parsed(&out)).0, (A.ip, 40000), "the cluster CIDR is never masqueraded");
    let host = Pod { ip: NODE_IP, ..A };
    let out = Node::run(
        &mut n.host,
        TO_NETDEV,
        &leaving(&host, WORLD_HOST, &tcp(40000, 80, tcp_flags::SYN)),
    );
    assert_eq!(ends(&parsed(&out)).0, (NODE_IP, 40000));
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty());
    // A configured non-masquerade CIDR is left alone too.
    n.node.no_masq().unwrap().set(&[(Ipv4Addr::new(192, 0, 2, 0), 24)]).unwrap();
    let out = Node::run(
        &mut n.host,
        TO_NETDEV,
        &leaving(&A, WORLD_HOST, &tcp(40001, 80, tcp_flags::SYN)),
    );
    assert_eq!(ends(&parsed(&out)).0, (A.ip, 40001), "192.0.2.0/24 is not masqueraded");
    n.node.no_masq().unwrap().set(&[]).unwrap();
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty());
    // A reply of a connection opened from outside (delivered to A through
    // from-host) keeps A's address.
    let eth = Eth { dst: HOST_MAC, src: [0x0e, 0, 0, 0, 0, 1] };
    let inbound =
        packet::ipv4_frame(&eth, &Ip4::new(WORLD_HOST, A.ip), &tcp(50000, 80, tcp_flags::SYN));
    assert_eq!(n.send_host(&inbound).verdict, verdict::REDIRECT);
    let reply = leaving(&A, WORLD_HOST, &tcp(80, 50000, tcp_flags::SYN | tcp_flags::ACK));
    let out = Node::run(&mut n.host, TO_NETDEV, &reply);
    assert_eq!(ends(&parsed(&out)).0, (A.ip, 80), "a reply was masqueraded");
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty());
    // With masquerading off nothing is translated.
    n.node.node_config().unwrap().set(&node_cfg(ROUTING_TUNNEL, 0)).unwrap();
    let out = Node::run(
        &mut n.host,
        TO_NETDEV,
        &leaving(&A, WORLD_HOST, &tcp(40002, 80, tcp_flags::SYN)),
    );
    assert_eq!(ends(&parsed(&out)).0, (A.ip, 40002));
}

#[test]
fn nodeport_to_a_backend_on_another_node_is_snated_and_the_reply_translated_back() {
    use ciliate_common::lb::{BACKEND_ACTIVE, LbService, SVC_F_NODE_PORT};
    use ciliate_datapath::lbmaps::{Backend, Frontend};
    let mut n = node("cl-np-remote", ROUTING_TUNNEL, NODE_F_MASQUERADE);
    let mut lb = n.node.lb().unwrap();
    let fe = Frontend { addr: NODE_IP, port: 30080, proto: 6 };
    lb.upsert_backend(
        1,
        &Backend { addr: REMOTE_POD, port: 8080, proto: 6, state: BACKEND_ACTIVE },
    )
    .unwrap();
    lb.upsert_revnat(5, &fe).unwrap();
    let master = LbService { rev_nat_index: 5, flags: SVC_F_NODE_PORT, ..Default::default() };
    lb.write_frontend(&fe, &master, &[1]).unwrap();

    let syn = arriving(WORLD_HOST, &tcp(50000, 30080, tcp_flags::SYN));
    let out = Node::run(&mut n.host, FROM_NETDEV, &syn);
    assert_eq!(out.verdict, verdict::REDIRECT, "into the overlay: {:?}", n.events.drain());
    let ((src, sport), dst) = ends(&parsed(&out));
    assert_eq!((src, dst), (NODE_IP, (REMOTE_POD, 8080)), "SNAT to the node, DNAT to the backend");

    let reply = arriving(REMOTE_POD, &tcp(8080, sport, tcp_flags::SYN | tcp_flags::ACK));
    let back = Node::run(&mut n.host, FROM_NETDEV, &reply);
    assert_eq!(ends(&parsed(&back)), ((NODE_IP, 30080), (WORLD_HOST, 50000)));
    // Sent back out through the FIB (unroutable in a test run).
    assert_ne!(back.verdict, verdict::OK, "the reply went to the stack");
}
