//! BPF_PROG_TEST_RUN tests of the pod ↔ pod and host ↔ pod paths
//! (ARCHITECTURE.md section 3, walks 1 and 3): conntrack in both views,
//! ipcache identities, local delivery by peer redirect with the L3 hop,
//! from-host with the host identity, and the drops on the way.
//! Needs root; CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{
    config::EndpointConfig,
    ct::{self, CtKey4},
    drop, identity, metrics, trace,
};
use ciliate_datapath::{
    events::Event,
    packet::{self, Eth, Ip4, L4, tcp_flags},
    testrun::{ScratchNode, verdict},
};
use common::*;

#[test]
fn a_syn_to_a_pod_on_the_node_is_redirected_into_it_with_the_l3_hop() {
    let mut n = Node::new("deliver");
    let syn = A.send(B.ip, &tcp(39276, 80, tcp_flags::SYN));
    let out = n.send_a(&syn);
    assert_eq!(out.verdict, verdict::REDIRECT);
    let p = packet::parse(&out.packet).unwrap();
    assert_eq!(p.eth, Eth { dst: B.mac, src: B.lxc_mac }, "MACs of B's veth");
    let ip = p.ipv4.unwrap();
    assert_eq!((ip.src, ip.dst, ip.ttl), (A.ip, B.ip, 63));
    assert!(ip.header_csum_ok, "header checksum updated with the TTL");
    assert!(p.l4.unwrap().csum_ok);

    let t = n.trace();
    assert_eq!(t.hdr.subtype, trace::TO_LXC);
    assert_eq!((t.dst_id, t.src_identity, t.dst_identity), (B.id, A.identity, B.identity));
    assert_eq!((t.ct_state, t.ifindex), (ct::CT_NEW, B.ifindex));

    // Both views of the connection exist: A's egress, B's ingress.
    for dir in [ct::DIR_EGRESS, ct::DIR_INGRESS] {
        let e = n.ct_entry(key(&A, B.ip, 39276, 80, 6, dir)).unwrap_or_else(|| panic!("dir {dir}"));
        assert_eq!((e.tx_packets, e.rx_packets, e.src_identity), (1, 0, A.identity));
        assert_eq!(e.tx_flags_seen, tcp_flags::SYN);
    }
    let ingress = n.node.metrics().unwrap().get(0, metrics::DIR_INGRESS).unwrap();
    assert_eq!(ingress.packets, 1, "delivery counted as forwarded ingress");
}

#[test]
fn the_reply_matches_conntrack_in_both_views_then_the_flow_is_established() {
    let mut n = Node::new("reply");
    n.send_a(&A.send(B.ip, &tcp(40000, 80, tcp_flags::SYN)));
    n.events.drain();

    let synack = B.send(A.ip, &tcp(80, 40000, tcp_flags::SYN | tcp_flags::ACK));
    let out = n.send_b(&synack);
    assert_eq!(out.verdict, verdict::REDIRECT);
    assert_eq!(packet::parse(&out.packet).unwrap().eth, Eth { dst: A.mac, src: A.lxc_mac });
    let t = n.trace();
    assert_eq!((t.dst_id, t.ct_state), (A.id, ct::CT_REPLY));
    for dir in [ct::DIR_EGRESS, ct::DIR_INGRESS] {
        let e = n.ct_entry(key(&A, B.ip, 40000, 80, 6, dir)).unwrap();
        assert_eq!((e.tx_packets, e.rx_packets), (1, 1), "dir {dir}");
        assert_eq!(e.rx_flags_seen, tcp_flags::SYN | tcp_flags::ACK);
    }
    // No entry was created for the reply's own tuple.
    assert_eq!(n.ct_entry(key(&B, A.ip, 80, 40000, 6, ct::DIR_EGRESS)), None);

    // The handshake's ACK carries nothing new: under monitor aggregation
    // "medium" it is counted, not traced.
    let before = n.node.metrics().unwrap().get(0, metrics::DIR_INGRESS).unwrap().packets;
    let out = n.send_a(&A.send(B.ip, &tcp(40000, 80, tcp_flags::ACK)));
    assert_eq!(out.verdict, verdict::REDIRECT);
    assert!(n.events.drain().is_empty(), "an established ACK is not traced");
    let after = n.node.metrics().unwrap().get(0, metrics::DIR_INGRESS).unwrap().packets;
    assert_eq!(after, before + 1, "but it is counted");
    let e = n.ct_entry(key(&A, B.ip, 40000, 80, 6, ct::DIR_EGRESS)).unwrap();
    assert_ne!(e.flags & ct::F_SEEN_NON_SYN, 0);
    assert_eq!(e.tx_packets, 2);

    // A FIN is new in that direction: traced, as established.
    n.send_a(&A.send(B.ip, &tcp(40000, 80, tcp_flags::ACK | tcp_flags::FIN)));
    assert_eq!(n.trace().ct_state, ct::CT_ESTABLISHED);
}

#[test]
fn with_trace_all_every_forwarded_packet_is_traced() {
    let node = ScratchNode::new("trace-all").unwrap();
    let cfg = EndpointConfig { flags: ciliate_common::config::ENDPOINT_F_TRACE_ALL, ..A.config() };
    let mut a = endpoints(&node, &[cfg]);
    let mut lxc = node.lxc().unwrap();
    lxc.upsert(B.ip, &B.info()).unwrap();
    let mut events = node.events().unwrap();
    for flags in [tcp_flags::SYN, tcp_flags::ACK, tcp_flags::ACK, tcp_flags::ACK] {
        let out = Node::from_container(&mut a, A.ifindex, &A.send(B.ip, &tcp(41000, 80, flags)));
        assert_eq!(out.verdict, verdict::REDIRECT);
    }
    let traces = events.drain().into_iter().filter(|e| matches!(e, Event::Trace(_))).count();
    assert_eq!(traces, 4);
}

#[test]
fn icmp_echo_and_udp_are_tracked_in_the_non_tcp_table() {
    let mut n = Node::new("icmp");
    let req = L4::IcmpEcho { request: true, id: 77, seq: 1, payload: b"ping" };
    assert_eq!(n.send_a(&A.send(B.ip, &req)).verdict, verdict::REDIRECT);
    assert_eq!(n.trace().ct_state, ct::CT_NEW);
    let rep = L4::IcmpEcho { request: false, id: 77, seq: 1, payload: b"ping" };
    assert_eq!(n.send_b(&B.send(A.ip, &rep)).verdict, verdict::REDIRECT);
    assert_eq!(n.trace().ct_state, ct::CT_REPLY);
    // The echo identifier stands in dport of the request's tuple.
    assert!(n.ct_entry(key(&A, B.ip, 0, 77, 1, ct::DIR_EGRESS)).is_some());

    let udp = L4::Udp { sport: 5000, dport: 53, payload: b"q" };
    assert_eq!(n.send_a(&A.send(B.ip, &udp)).verdict, verdict::REDIRECT);
    n.events.drain();
    let dump = n.node.ct().unwrap().dump().unwrap();
    assert!(dump.iter().any(|(k, _)| k.proto == 17 && k.dport == 53u16.to_be()), "{dump:?}");
}

#[test]
fn traffic_to_the_host_or_outside_goes_to_the_stack_with_its_identity() {
    let mut n = Node::new("stack");
    let out = n.send_a(&A.send(ROUTER, &tcp(1234, 22, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::OK);
    let t = n.trace();
    assert_eq!((t.hdr.subtype, t.dst_identity), (trace::TO_STACK, identity::HOST));

    let world = Ipv4Addr::new(192, 0, 2, 10);
    let out = n.send_a(&A.send(world, &tcp(1235, 443, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::OK);
    assert_eq!(n.trace().dst_identity, identity::WORLD);
}

#[test]
fn the_host_reaches_a_pod_with_the_host_identity_and_the_reply_is_tracked() {
    let mut n = Node::new("from-host");
    let syn = packet::ipv4_frame(
        &Eth { dst: HOST_MAC, src: HOST_MAC },
        &Ip4::new(ROUTER, B.ip),
        &tcp(50000, 8080, tcp_flags::SYN),
    );
    let out = n.send_host(&syn);
    assert_eq!(out.verdict, verdict::REDIRECT);
    let p = packet::parse(&out.packet).unwrap();
    assert_eq!(p.eth, Eth { dst: B.mac, src: B.lxc_mac });
    assert_eq!(p.ipv4.unwrap().ttl, 63);
    let t = n.trace();
    assert_eq!((t.src_identity, t.dst_id, t.ct_state), (identity::HOST, B.id, ct::CT_NEW));
    let e = n.ct_entry(CtKey4 {
        saddr: ROUTER.octets(),
        ..key(&B, B.ip, 50000, 8080, 6, ct::DIR_INGRESS)
    });
    assert_eq!(e.unwrap().src_identity, identity::HOST);

    // B's answer goes to the stack and is recognised as a reply.
    let out = n.send_b(&B.send(ROUTER, &tcp(8080, 50000, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(out.verdict, verdict::OK);
    let t = n.trace();
    assert_eq!((t.hdr.subtype, t.ct_state), (trace::TO_STACK, ct::CT_REPLY));
}

#[test]
fn from_host_leaves_packets_for_other_addresses_alone() {
    let mut n = Node::new("host-other");
    let eth = Eth { dst: HOST_MAC, src: HOST_MAC };
    let other =
        packet::ipv4_frame(&eth, &Ip4::new(ROUTER, Ipv4Addr::new(10, 200, 0, 99)), &tcp(1, 2, 2));
    let to_host = packet::ipv4_frame(&eth, &Ip4::new(A.ip, ROUTER), &tcp(1, 2, 2));
    let arp = packet::arp_request(HOST_MAC, ROUTER, A.ip);
    for pkt in [other, to_host, arp] {
        let out = n.send_host(&pkt);
        assert_eq!((out.verdict, &out.packet), (verdict::OK, &pkt));
    }
    assert!(n.events.drain().is_empty());
}

/// Runs `pkt` through A's from-container and expects a drop with `reason`.
fn expect_drop(n: &mut Node, pkt: &[u8], reason: u8) {
    let out = n.send_a(pkt);
    assert_eq!(out.verdict, verdict::SHOT, "expected {}", drop::reason_name(reason));
    let events = n.events.drain();
    let [Event::Drop(d)] = events.as_slice() else { panic!("one drop event, got {events:?}") };
    assert_eq!(d.hdr.subtype, reason, "got {}", drop::reason_name(d.hdr.subtype));
    assert_eq!((d.hdr.source, d.src_identity), (A.id, A.identity));
}

#[test]
fn bad_packets_on_the_pod_to_pod_path_are_dropped_with_their_reason() {
    let mut n = Node::new("drops");
    let ok = A.send(B.ip, &tcp(1000, 80, tcp_flags::SYN));

    let spoofed = packet::ipv4_frame(
        &Eth { dst: A.lxc_mac, src: A.mac },
        &Ip4::new(Ipv4Addr::new(10, 200, 0, 77), B.ip),
        &tcp(1000, 80, tcp_flags::SYN),
    );
    expect_drop(&mut n, &spoofed, drop::INVALID_SIP);

    let mut ttl1 = ok.clone();
    ttl1[22] = 1;
    packet::refresh_ipv4_checksum(&mut ttl1);
    expect_drop(&mut n, &ttl1, drop::INVALID);

    // A later fragment whose first fragment never came.
    let mut fragment = ok.clone();
    fragment[20..22].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128 bytes
    packet::refresh_ipv4_checksum(&mut fragment);
    expect_drop(&mut n, &fragment, drop::FRAG_NOT_FOUND);

    let short_tcp = A.send(B.ip, &L4::Raw { proto: 6, bytes: &[0; 10] });
    expect_drop(&mut n, &short_tcp, drop::CT_INVALID_HDR);

    let gre = A.send(B.ip, &L4::Raw { proto: 47, bytes: &[0; 24] });
    expect_drop(&mut n, &gre, drop::CT_UNKNOWN_PROTO);

    // None of them created a connection.
    assert!(n.node.ct().unwrap().dump().unwrap().is_empty());
}

#[test]
fn the_ipcache_wrapper_does_longest_prefix_match_and_refuses_bad_prefixes() {
    let n = Node::new("ipcache");
    let mut ipc = n.node.ipcache().unwrap();
    ipc.upsert(Ipv4Addr::new(10, 200, 0, 0), 24, &ipcache_entry(7000)).unwrap();
    assert_eq!(ipc.lookup(A.ip).unwrap().unwrap().identity, A.identity, "/32 beats /24");
    assert_eq!(ipc.lookup(Ipv4Addr::new(10, 200, 0, 50)).unwrap().unwrap().identity, 7000);
    assert_eq!(ipc.lookup(Ipv4Addr::new(8, 8, 8, 8)).unwrap().unwrap().identity, identity::WORLD);

    let before = ipc.dump().unwrap();
    let e = ipc.upsert(Ipv4Addr::new(10, 200, 0, 9), 24, &ipcache_entry(1)).unwrap_err();
    assert!(e.to_string().contains("10.200.0.9/24"), "{e}");
    assert_eq!(ipc.dump().unwrap(), before, "a refused update leaves the map as it was");

    ipc.remove(A.ip, 32).unwrap();
    ipc.remove(A.ip, 32).unwrap(); // removing twice is fine
    assert_eq!(ipc.lookup(A.ip).unwrap().unwrap().identity, 7000);
}

#[test]
fn conntrack_gc_removes_expired_connections_only() {
    let mut n = Node::new("ct-gc");
    // A UDP flow (60 s lifetime) and a TCP SYN (60 s until established).
    n.send_a(&A.send(B.ip, &L4::Udp { sport: 7000, dport: 53, payload: b"q" }));
    n.send_a(&A.send(B.ip, &tcp(7001, 80, tcp_flags::SYN)));
    let mut ct = n.node.ct().unwrap();
    let entries = ct.dump().unwrap().len();
    assert_eq!(entries, 4, "two flows, two views each");
    let now = ciliate_datapath::maps::monotonic_secs();
    assert!(ct.dump().unwrap().iter().all(|(_, e)| e.expires > now && e.expires <= now + 61));
    let first = ct.sweep(now).unwrap();
    assert_eq!(
        (first.removed(), first.tcp_alive, first.any_alive),
        (0, 2, 2),
        "nothing has expired yet"
    );
    let swept = ct.sweep(now + 120).unwrap();
    assert_eq!(
        (swept.removed(), swept.tcp_alive + swept.any_alive),
        (4, 0),
        "two minutes later all have"
    );
    assert!(ct.dump().unwrap().is_empty());
}

#[test]
fn map_fill_and_map_operations_are_counted_for_the_metrics() {
    let n = Node::new("fill");
    let fill = ciliate_datapath::maps::map_fill(&n.node.pins.dir);
    let lxc =
        fill.iter().find(|f| f.name == ciliate_common::endpoint::MAP_NAME).expect("the lxc map");
    assert_eq!(
        (lxc.entries, lxc.max_entries),
        (3, ciliate_common::endpoint::MAX_ENTRIES),
        "A, B and the router"
    );
    let ipc =
        fill.iter().find(|f| f.name == ciliate_common::ipcache::MAP_NAME).expect("the ipcache");
    assert_eq!(ipc.entries, 4, "world, A, B, the router: {ipc:?}");
    // The writes that made the node were counted by map, operation and
    // outcome (other tests of this binary write too: at least).
    let ops = ciliate_datapath::maps::map_ops();
    let lxc_updates: u64 = ops
        .iter()
        .filter(|(m, op, outcome, _)| {
            *m == ciliate_common::endpoint::MAP_NAME && *op == "update" && *outcome == "success"
        })
        .map(|o| o.3)
        .sum();
    assert!(lxc_updates >= 2, "{ops:?}");
}

#[test]
fn the_host_programs_debug_while_the_node_debugs_and_only_then() {
    let mut n = Node::new("host-debug");
    let syn = |sport| {
        packet::ipv4_frame(
            &Eth { dst: HOST_MAC, src: HOST_MAC },
            &Ip4::new(ROUTER, B.ip),
            &tcp(sport, 8080, tcp_flags::SYN),
        )
    };
    assert_eq!(n.send_host(&syn(50001)).verdict, verdict::REDIRECT);
    assert!(debug_lines(&n.events.drain()).is_empty(), "the node does not debug");

    let mut cfgs = n.node.node_config().unwrap();
    let mut c = cfgs.get().unwrap();
    c.flags |= ciliate_common::node::NODE_F_DEBUG;
    cfgs.set(&c).unwrap();
    let out = n.send_host(&syn(50002));
    assert_eq!(out.verdict, verdict::REDIRECT, "debugging changes nothing");
    let lines = debug_lines(&n.events.drain());
    let want = [
        "capture: Packet at from-host on ifindex 3".to_owned(),
        format!("Successfully mapped addr={ROUTER} to identity=1"),
        format!("Attempting local delivery for container id {} from seclabel 1", B.id),
        format!("Conntrack lookup 1/2: src={ROUTER}:50002 dst={}:8080", B.ip),
        "Conntrack lookup 2/2: nexthdr=6 flags=2".to_owned(),
        "CT verdict: New, revnat=0".to_owned(),
        format!(
            "Policy lookup: endpoint {} ingress, identity 1, proto 6 dport 8080: not enforced",
            B.id
        ),
        "Conntrack create: proxy-port=0 revnat=0 src-identity=1 lb=0.0.0.0".to_owned(),
        format!("capture: Delivery to ifindex {}", B.ifindex),
    ];
    assert_eq!(lines, want);
}
