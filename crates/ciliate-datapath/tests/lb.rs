//! BPF_PROG_TEST_RUN tests of per-packet load balancing: DNAT in
//! from-container and reverse NAT on the reply (with valid checksums),
//! flows pinned to their backend through conntrack (also when the backend
//! is terminating or replaced), the no-backend drop, ClientIP affinity,
//! Maglev selection, hairpin, source ranges and NodePort in from-netdev,
//! and a NodePort DSR backend's side (the option read, the reply sent
//! from the frontend).
//! Needs root; CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{
    ct::{CtKey4, DIR_SERVICE},
    drop,
    lb::{
        BACKEND_ACTIVE, BACKEND_TERMINATING, HAIRPIN_LOOPBACK, LbService, MAGLEV_DEFAULT_SIZE,
        MAGLEV_MAP, MAX_MAGLEV, REV_NAT_DSR, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_MAGLEV,
        SVC_F_NODE_PORT, SVC_F_SRC_RANGES, flow_hash, maglev_chunks,
    },
    nat::DIR_DSR,
    node::{NODE_F_DSR, NODE_F_DSR_UDP, NodeConfig, ROUTING_NATIVE},
};
use ciliate_datapath::{
    events::Event,
    lbmaps::{Backend, Frontend, LbMaps},
    objects::programs::FROM_NETDEV,
    packet::{self, Eth, Ip4, L4, Parsed, tcp_flags},
    testrun::{TcRun, verdict},
};
use common::*;

const TCP: u8 = 6;
const UDP: u8 = 17;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);

fn fe(addr: Ipv4Addr, port: u16, proto: u8) -> Frontend {
    Frontend { addr, port, proto }
}

fn backend(addr: Ipv4Addr, port: u16, proto: u8) -> Backend {
    Backend { addr, port, proto, state: BACKEND_ACTIVE }
}

/// Write frontend `f` (reverse-NAT index `index`, `flags`) with `ids` in
/// its slots, backends as given.
fn service(lb: &mut LbMaps, f: &Frontend, index: u16, flags: u16, ids: &[(u32, Backend)]) {
    for (id, b) in ids {
        lb.upsert_backend(*id, b).unwrap();
    }
    lb.upsert_revnat(index, f).unwrap();
    let master =
        LbService { rev_nat_index: index, flags, affinity_timeout: 60, ..Default::default() };
    let slots: Vec<u32> = ids.iter().map(|(id, _)| *id).collect();
    lb.write_frontend(f, &master, &slots).unwrap();
}

fn parsed(run: &TcRun) -> Parsed {
    let p = packet::parse(&run.packet).unwrap();
    let ip = p.ipv4.as_ref().unwrap();
    assert!(ip.header_csum_ok, "IP checksum broken by the rewrite");
    assert!(p.l4.as_ref().unwrap().csum_ok, "L4 checksum broken by the rewrite");
    p
}

fn ends(p: &Parsed) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let (ip, l4) = (p.ipv4.as_ref().unwrap(), p.l4.as_ref().unwrap());
    ((ip.src, l4.sport), (ip.dst, l4.dport))
}

fn drops(n: &mut Node) -> Vec<u8> {
    n.events
        .drain()
        .into_iter()
        .filter_map(|e| if let Event::Drop(d) = e { Some(d.hdr.subtype) } else { None })
        .collect()
}

#[test]
fn clusterip_is_dnated_to_the_backend_and_the_reply_translated_back() {
    let mut n = Node::new("lb-dnat");
    let mut lb = n.node.lb().unwrap();
    let f = fe(VIP, 80, TCP);
    service(&mut lb, &f, 7, SVC_F_CLUSTER_IP, &[(1, backend(B.ip, 8080, TCP))]);

    let out = n.send_a(&A.send(VIP, &tcp(40001, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    assert_eq!(ends(&parsed(&out)), ((A.ip, 40001), (B.ip, 8080)));
    // The flow is pinned to backend 1, and the connection's entry carries
    // the reverse-NAT index.
    let pin = n.ct_entry(key(&A, VIP, 40001, 80, TCP, DIR_SERVICE)).expect("service entry");
    assert_eq!(pin.backend_id, 1);
    let conn = n.ct_entry(key(&A, B.ip, 40001, 8080, TCP, 1)).expect("connection entry");
    assert_eq!(conn.rev_nat_index, 7);

    let reply = n.send_b(&B.send(A.ip, &tcp(8080, 40001, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(reply.verdict, verdict::REDIRECT);
    assert_eq!(ends(&parsed(&reply)), ((VIP, 80), (A.ip, 40001)));
}

#[test]
fn udp_is_translated_both_ways() {
    let mut n = Node::new("lb-udp");
    let mut lb = n.node.lb().unwrap();
    service(&mut lb, &fe(VIP, 53, UDP), 8, SVC_F_CLUSTER_IP, &[(2, backend(B.ip, 5353, UDP))]);
    let q = L4::Udp { sport: 41000, dport: 53, payload: b"query" };
    let out = n.send_a(&A.send(VIP, &q));
    assert_eq!(out.verdict, verdict::REDIRECT);
    assert_eq!(ends(&parsed(&out)), ((A.ip, 41000), (B.ip, 5353)));
    let r = L4::Udp { sport: 5353, dport: 41000, payload: b"answer" };
    let back = n.send_b(&B.send(A.ip, &r));
    assert_eq!(ends(&parsed(&back)), ((VIP, 53), (A.ip, 41000)));
}

#[test]
fn a_frontend_without_backends_drops_with_no_service() {
    let mut n = Node::new("lb-empty");
    let mut lb = n.node.lb().unwrap();
    service(&mut lb, &fe(VIP, 80, TCP), 9, SVC_F_CLUSTER_IP, &[]);
    let out = n.send_a(&A.send(VIP, &tcp(40002, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::SHOT);
    assert_eq!(drops(&mut n), [drop::NO_SERVICE]);
}

#[test]
fn an_established_flow_keeps_its_backend_when_it_terminates_or_is_replaced() {
    let mut n = Node::new("lb-pinned");
    let mut lb = n.node.lb().unwrap();
    let f = fe(VIP, 80, TCP);
    service(&mut lb, &f, 10, SVC_F_CLUSTER_IP, &[(1, backend(B.ip, 8080, TCP))]);
    let syn = n.send_a(&A.send(VIP, &tcp(40003, 80, tcp_flags::SYN)));
    assert_eq!(ends(&parsed(&syn)).1, (B.ip, 8080));

    // B terminates: it leaves the slots (the agent keeps it in the
    // backends map); OTHER takes over for new flows.
    lb.upsert_backend(1, &Backend { state: BACKEND_TERMINATING, ..backend(B.ip, 8080, TCP) })
        .unwrap();
    service(&mut lb, &f, 10, SVC_F_CLUSTER_IP, &[(2, backend(OTHER, 8080, TCP))]);
    let ack = n.send_a(&A.send(VIP, &tcp(40003, 80, tcp_flags::ACK)));
    assert_eq!(ends(&parsed(&ack)).1, (B.ip, 8080), "established flow moved");
    let new = n.send_a(&A.send(VIP, &tcp(40004, 80, tcp_flags::SYN)));
    assert_eq!(ends(&parsed(&new)).1, (OTHER, 8080), "a new flow went to a terminating backend");

    // Once the backend is gone entirely, its flows choose again.
    lb.remove_backend(1).unwrap();
    let again = n.send_a(&A.send(VIP, &tcp(40003, 80, tcp_flags::ACK)));
    assert_eq!(ends(&parsed(&again)).1, (OTHER, 8080));
}

#[test]
fn client_ip_affinity_sends_every_new_flow_of_a_client_to_one_backend() {
    let mut n = Node::new("lb-affinity");
    let mut lb = n.node.lb().unwrap();
    let f = fe(VIP, 80, TCP);
    let ids: Vec<(u32, Backend)> =
        (1..=4).map(|i| (i, backend(Ipv4Addr::new(10, 200, 1, i as u8), 8080, TCP))).collect();
    service(&mut lb, &f, 11, SVC_F_CLUSTER_IP | SVC_F_AFFINITY, &ids);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 42000..42020 {
        let out = n.send_a(&A.send(VIP, &tcp(sport, 80, tcp_flags::SYN)));
        seen.insert(ends(&parsed(&out)).1);
    }
    assert_eq!(seen.len(), 1, "affinity broken: {seen:?}");
    let a = lb.affinity(A.ip, 11).unwrap().expect("affinity entry");
    assert_eq!(Some(ids[a.backend_id as usize - 1].1.addr), seen.first().map(|s| s.0));

    // Without affinity the same 20 flows spread (random over 4 backends:
    // all on one has probability 4^-19).
    service(&mut lb, &f, 11, SVC_F_CLUSTER_IP, &ids);
    let mut spread = std::collections::BTreeSet::new();
    for sport in 43000..43020 {
        let out = n.send_a(&A.send(VIP, &tcp(sport, 80, tcp_flags::SYN)));
        spread.insert(ends(&parsed(&out)).1);
    }
    assert!(spread.len() > 1, "random selection always chose {spread:?}");
}

#[test]
fn maglev_frontends_use_the_table_entry_of_the_flow_hash_at_every_table_size() {
    // The smallest size, the default and the largest (32 chunks).
    for m in [251, MAGLEV_DEFAULT_SIZE, 131_071] {
        let mut n = Node::with_pins(&format!("lb-maglev-{m}"), |p| {
            p.maglev_size = m;
            p.capacities.insert(MAGLEV_MAP.into(), MAX_MAGLEV * maglev_chunks(m));
        });
        let mut lb = n.node.lb().unwrap();
        let f = fe(VIP, 80, TCP);
        let ids: Vec<(u32, Backend)> =
            (1..=3).map(|i| (i, backend(Ipv4Addr::new(10, 200, 2, i as u8), 8080, TCP))).collect();
        service(&mut lb, &f, 12, SVC_F_CLUSTER_IP | SVC_F_MAGLEV, &ids);
        // A table that is not round robin, so a wrong index (or a wrong
        // size) shows.
        let table: Vec<u32> = (0..m as usize).map(|i| (i * 7 % 3) as u32 + 1).collect();
        lb.set_maglev(12, &table).unwrap();
        for sport in 44000..44040u16 {
            let out = n.send_a(&A.send(VIP, &tcp(sport, 80, tcp_flags::SYN)));
            let h = flow_hash(A.ip.octets(), VIP.octets(), sport.to_be(), 80u16.to_be(), TCP);
            let want = table[h as usize % m as usize];
            let got = ends(&parsed(&out)).1.0;
            assert_eq!(got, ids[want as usize - 1].1.addr, "table size {m}, sport {sport}");
        }
        // A table of a size no node can have is refused without touching
        // the one in place.
        assert!(lb.set_maglev(12, &table[..100]).is_err());
        assert_eq!(lb.maglev(12).unwrap().unwrap(), table);
        // A smaller table leaves no chunk of the larger one behind, and
        // removing the table removes every chunk.
        lb.set_maglev(12, &table[..251]).unwrap();
        assert_eq!(lb.maglev(12).unwrap().unwrap(), table[..251]);
        lb.remove_maglev(12).unwrap();
        assert_eq!((lb.maglev(12).unwrap(), lb.maglev_indexes().unwrap()), (None, vec![]));
    }
}

#[test]
fn a_pod_that_is_its_own_backend_is_reached_from_the_hairpin_loopback() {
    let mut n = Node::new("lb-hairpin");
    let mut lb = n.node.lb().unwrap();
    service(&mut lb, &fe(VIP, 80, TCP), 13, SVC_F_CLUSTER_IP, &[(1, backend(A.ip, 8080, TCP))]);
    let out = n.send_a(&A.send(VIP, &tcp(40005, 80, tcp_flags::SYN)));
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    let loopback = Ipv4Addr::from(HAIRPIN_LOOPBACK);
    assert_eq!(ends(&parsed(&out)), ((loopback, 40005), (A.ip, 8080)));
    // A answers the loopback; the reply comes back to A from the frontend.
    let reply = n.send_a(&A.send(loopback, &tcp(8080, 40005, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(reply.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    assert_eq!(ends(&parsed(&reply)), ((VIP, 80), (A.ip, 40005)));
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);

fn from_outside(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let eth = Eth { dst: HOST_MAC, src: [0x0e, 0, 0, 0, 0, 0x64] };
    packet::ipv4_frame(&eth, &Ip4::new(CLIENT, dst), &tcp(sport, dport, flags))
}

#[test]
fn nodeport_from_outside_reaches_a_local_backend_and_the_reply_leaves_as_the_node() {
    let mut n = Node::new("lb-nodeport");
    let mut lb = n.node.lb().unwrap();
    service(
        &mut lb,
        &fe(NODE_IP, 30080, TCP),
        14,
        SVC_F_NODE_PORT,
        &[(1, backend(B.ip, 8080, TCP))],
    );
    // A ClusterIP is not reachable from outside: left to the stack.
    service(&mut lb, &fe(VIP, 80, TCP), 15, SVC_F_CLUSTER_IP, &[(1, backend(B.ip, 8080, TCP))]);

    let out =
        Node::run(&mut n.host, FROM_NETDEV, &from_outside(NODE_IP, 50000, 30080, tcp_flags::SYN));
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    assert_eq!(ends(&parsed(&out)), ((CLIENT, 50000), (B.ip, 8080)));
    let reply = n.send_b(&B.send(CLIENT, &tcp(8080, 50000, tcp_flags::SYN | tcp_flags::ACK)));
    // Translated back, and not handed to the stack (which would see its
    // own address as the source): redirected by a FIB lookup, which in a
    // test run (no such device here) ends as unroutable. The lab test
    // covers the real forwarding.
    assert_eq!(ends(&parsed(&reply)), ((NODE_IP, 30080), (CLIENT, 50000)));
    assert_ne!(reply.verdict, verdict::OK, "a NodePort reply went to the stack");
    if reply.verdict == verdict::SHOT {
        assert_eq!(drops(&mut n), [drop::UNROUTABLE]);
    }

    let cip = Node::run(&mut n.host, FROM_NETDEV, &from_outside(VIP, 50001, 80, tcp_flags::SYN));
    assert_eq!(cip.verdict, verdict::OK);
    assert_eq!(ends(&parsed(&cip)).1, (VIP, 80), "untouched");
    // Anything that is not a frontend passes untouched too.
    let other =
        Node::run(&mut n.host, FROM_NETDEV, &from_outside(NODE_IP, 50002, 22, tcp_flags::SYN));
    assert_eq!(other.verdict, verdict::OK);
}

/// Another node's address: the frontend a DSR flow arrives from.
const FRONTEND_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);

fn set_node_flags(n: &Node, flags: u8) {
    let cfg = NodeConfig::new(NODE_IP.octets(), ([10, 200, 0, 0], 16), ROUTING_NATIVE, flags, 0);
    n.node.node_config().unwrap().set(&cfg).unwrap();
}

#[test]
fn a_dsr_backend_answers_the_client_from_the_frontend_the_option_names() {
    let mut n = Node::new("lb-dsr-backend");
    set_node_flags(&n, NODE_F_DSR | NODE_F_DSR_UDP);
    // The frontend's node sent the SYN here, DNAT'ed, with the option.
    let syn = from_outside(B.ip, 50000, 8080, tcp_flags::SYN);
    let syn = packet::with_ipv4_options(&syn, &packet::dsr_option(FRONTEND_NODE, 30080));
    let out = Node::run(&mut n.host, FROM_NETDEV, &syn);
    assert_eq!(out.verdict, verdict::REDIRECT, "into the pod: {:?}", drops(&mut n));
    assert_eq!(ends(&parsed(&out)), ((CLIENT, 50000), (B.ip, 8080)), "the client's address kept");
    // The flow's record, and the pod's conntrack entry marked for it.
    let rec = CtKey4 {
        saddr: B.ip.octets(),
        daddr: CLIENT.octets(),
        sport: 8080u16.to_be(),
        dport: 50000u16.to_be(),
        proto: TCP,
        dir: DIR_DSR,
        _pad: [0; 2],
    };
    let e = n.node.nat().unwrap().get(&rec).unwrap().expect("the DSR record");
    assert_eq!((e.addr, u16::from_be(e.port)), (FRONTEND_NODE.octets(), 30080));
    let mut inbound = rec.reverse(ciliate_common::ct::DIR_INGRESS);
    inbound.dir = ciliate_common::ct::DIR_INGRESS;
    let conn = n.ct_entry(inbound).expect("the pod's ingress entry");
    assert_eq!(conn.rev_nat_index, REV_NAT_DSR);
    // The ACK carries no option: the flow goes on by its entry.
    let ack = Node::run(&mut n.host, FROM_NETDEV, &from_outside(B.ip, 50000, 8080, tcp_flags::ACK));
    assert_eq!(ack.verdict, verdict::REDIRECT);

    // The pod's reply leaves from the frontend, by the FIB (a test run
    // has no route: unroutable, or redirected), never to the stack.
    let reply = n.send_b(&B.send(CLIENT, &tcp(8080, 50000, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(ends(&parsed(&reply)), ((FRONTEND_NODE, 30080), (CLIENT, 50000)));
    assert_ne!(reply.verdict, verdict::OK, "a DSR reply went to the stack");
    if reply.verdict == verdict::SHOT {
        assert_eq!(drops(&mut n), [drop::UNROUTABLE]);
    }

    // The record gone (LRU): the reply is dropped, not sent from the pod.
    assert_eq!(n.node.nat().unwrap().scrub(CLIENT).unwrap(), 1);
    let lost = n.send_b(&B.send(CLIENT, &tcp(8080, 50000, tcp_flags::ACK)));
    assert_eq!(lost.verdict, verdict::SHOT);
    assert_eq!(drops(&mut n), [drop::NAT_NO_MAPPING]);
}

#[test]
fn a_flow_balanced_here_keeps_its_frontend_whatever_option_it_carries() {
    let mut n = Node::new("lb-dsr-local");
    set_node_flags(&n, NODE_F_DSR | NODE_F_DSR_UDP);
    let mut lb = n.node.lb().unwrap();
    service(
        &mut lb,
        &fe(NODE_IP, 30080, TCP),
        21,
        SVC_F_NODE_PORT,
        &[(1, backend(B.ip, 8080, TCP))],
    );
    // A client's SYN to this node's NodePort, with an option naming
    // another address: balanced here, so the option is not read.
    let syn = from_outside(NODE_IP, 50002, 30080, tcp_flags::SYN);
    let syn = packet::with_ipv4_options(&syn, &packet::dsr_option(FRONTEND_NODE, 31000));
    let out = Node::run(&mut n.host, FROM_NETDEV, &syn);
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty(), "no DSR record");
    let reply = n.send_b(&B.send(CLIENT, &tcp(8080, 50002, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(ends(&parsed(&reply)), ((NODE_IP, 30080), (CLIENT, 50002)), "its own frontend");
}

#[test]
fn a_node_not_in_dsr_mode_ignores_the_option() {
    let mut n = Node::new("lb-dsr-off");
    set_node_flags(&n, 0);
    let syn = from_outside(B.ip, 50001, 8080, tcp_flags::SYN);
    let syn = packet::with_ipv4_options(&syn, &packet::dsr_option(FRONTEND_NODE, 30080));
    let out = Node::run(&mut n.host, FROM_NETDEV, &syn);
    assert_eq!(out.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
    assert!(
        n.node.nat().unwrap().dump().unwrap().is_empty(),
        "no record: no pod answers from another address"
    );
    // Its reply is the pod's own, to the stack.
    let reply = n.send_b(&B.send(CLIENT, &tcp(8080, 50001, tcp_flags::SYN | tcp_flags::ACK)));
    assert_eq!(reply.verdict, verdict::OK);
    assert_eq!(ends(&parsed(&reply)), ((B.ip, 8080), (CLIENT, 50001)));
}

#[test]
fn source_ranges_admit_only_the_listed_clients() {
    let mut n = Node::new("lb-ranges");
    let mut lb = n.node.lb().unwrap();
    let flags = SVC_F_NODE_PORT | SVC_F_SRC_RANGES;
    service(&mut lb, &fe(NODE_IP, 30081, TCP), 16, flags, &[(1, backend(B.ip, 8080, TCP))]);
    lb.set_src_ranges(16, &[(Ipv4Addr::new(10, 0, 0, 0), 8)]).unwrap();
    let out =
        Node::run(&mut n.host, FROM_NETDEV, &from_outside(NODE_IP, 50003, 30081, tcp_flags::SYN));
    assert_eq!(out.verdict, verdict::SHOT);
    assert_eq!(drops(&mut n), [drop::NOT_IN_SRC_RANGE]);
    lb.set_src_ranges(16, &[(Ipv4Addr::new(192, 168, 50, 0), 24)]).unwrap();
    let ok =
        Node::run(&mut n.host, FROM_NETDEV, &from_outside(NODE_IP, 50003, 30081, tcp_flags::SYN));
    assert_eq!(ok.verdict, verdict::REDIRECT, "{:?}", drops(&mut n));
}
