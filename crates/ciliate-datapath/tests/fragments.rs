//! BPF_PROG_TEST_RUN tests of IPv4 fragment tracking
//! (`ciliate_common::frag`): a datagram's later fragments take its first
//! fragment's ports, so they pass or fail policy with it, follow its
//! service translation and its masquerading; a later fragment whose first
//! one was not seen is dropped with `FRAG_NOT_FOUND`; fragments after the
//! first may come in any order. Every rewritten fragment keeps a valid IP
//! header checksum, and the reassembled datagram a valid UDP checksum.
//! Needs root; CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{
    ct::{DIR_EGRESS, DIR_INGRESS},
    drop,
    lb::{BACKEND_ACTIVE, LbService, SVC_F_CLUSTER_IP},
    node::{NODE_F_MASQUERADE, NodeConfig},
    policy,
};
use ciliate_datapath::{
    events::Event,
    lbmaps::{Backend, Frontend},
    maps::PolicyRule,
    objects::programs::{FROM_NETDEV, TO_NETDEV},
    packet::{self, Eth, Ip4, L4},
    testrun::{TcRun, verdict},
};
use common::*;

const UDP: u8 = 17;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A 4,000-byte UDP datagram from `src` as fragments of a 1500-byte MTU
/// (three: 1480, 1480 and 1048 bytes of IP payload).
fn datagram(src: &Pod, dst: Ipv4Addr, sport: u16, dport: u16, id: u16) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
    let frame = src.send(dst, &L4::Udp { sport, dport, payload: &payload });
    let frags = packet::fragments(&frame, 1500, id);
    assert_eq!(frags.len(), 3);
    frags
}

/// The (verdict, drop reasons) of one run.
fn outcome(n: &mut Node, run: &TcRun) -> (i32, Vec<u8>) {
    let drops = n
        .events
        .drain()
        .into_iter()
        .filter_map(|e| if let Event::Drop(d) = e { Some(d.hdr.subtype) } else { None })
        .collect();
    (run.verdict, drops)
}

/// Source and destination of a fragment, after checking its IP header
/// checksum.
fn addrs(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    assert_eq!(packet::checksum(&frame[14..34]), 0, "IP header checksum broken by the rewrite");
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    (ip(26), ip(30))
}

/// The datagram the fragments `out` carry: its ends and its payload, after
/// checking its UDP checksum.
fn whole(out: &[Vec<u8>]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16), Vec<u8>) {
    let p = packet::parse(&packet::reassemble(out).unwrap()).unwrap();
    let (ip, l4) = (p.ipv4.unwrap(), p.l4.unwrap());
    assert!(l4.csum_ok, "UDP checksum of the datagram broken by the rewrite");
    ((ip.src, l4.sport), (ip.dst, l4.dport), l4.payload)
}

#[test]
fn later_fragments_take_the_first_ones_ports_in_any_order_after_it() {
    let mut n = Node::new("frag-order");
    let f = datagram(&A, B.ip, 41000, 53, 0x1234);
    // The second fragment before the first: nothing to take ports from.
    let early = n.send_a(&f[1]);
    assert_eq!(outcome(&mut n, &early), (verdict::SHOT, vec![drop::FRAG_NOT_FOUND]));
    // The first, then the last before the middle one: all delivered to B.
    let mut out = Vec::new();
    for i in [0, 2, 1] {
        let run = n.send_a(&f[i]);
        assert_eq!(outcome(&mut n, &run), (verdict::REDIRECT, vec![]), "fragment {i}");
        out.push(run.packet);
    }
    let (from, to, payload) = whole(&out);
    assert_eq!((from, to), ((A.ip, 41000), (B.ip, 53)));
    assert_eq!(payload.len(), 4000);
    // One connection, keyed by the ports, in both endpoints' views.
    assert!(n.ct_entry(key(&A, B.ip, 41000, 53, UDP, DIR_EGRESS)).is_some());
    assert!(n.ct_entry(key(&A, B.ip, 41000, 53, UDP, DIR_INGRESS)).is_some());
    // A datagram with another IP ID is another datagram.
    let other = datagram(&A, B.ip, 41000, 53, 0x1235);
    let run = n.send_a(&other[2]);
    assert_eq!(outcome(&mut n, &run), (verdict::SHOT, vec![drop::FRAG_NOT_FOUND]));
    // The map holds the two first fragments seen (IDs 0x1234 and, not
    // yet, 0x1235): one entry, keyed as the first fragment was.
    let frags = n.node.fragments().unwrap().dump().unwrap();
    assert_eq!(frags.len(), 1, "{frags:?}");
    let (k, v) = frags[0];
    assert_eq!((k.id, k.proto, Ipv4Addr::from(k.saddr)), (0x1234u16.to_be(), UDP, A.ip));
    assert_eq!((u16::from_be(v.sport), u16::from_be(v.dport)), (41000, 53));
}

#[test]
fn later_fragments_meet_the_policy_of_their_datagrams_port() {
    let mut n = Node::new("frag-policy");
    let mut p = n.node.policy().unwrap();
    p.enforce(B.id, policy::DIR_INGRESS).unwrap();
    let allow = PolicyRule {
        endpoint_id: B.id,
        dir: policy::DIR_INGRESS,
        identity: A.identity,
        proto: UDP,
        ports: Some((53, 53)),
        deny: false,
    };
    p.upsert(&allow).unwrap();
    for (dport, id, want) in [(53, 7, verdict::REDIRECT), (5000, 8, verdict::SHOT)] {
        for (i, frag) in datagram(&A, B.ip, 42000, dport, id).iter().enumerate() {
            let run = n.send_a(frag);
            let (v, drops) = outcome(&mut n, &run);
            assert_eq!(v, want, "port {dport}, fragment {i}: {drops:?}");
            if want == verdict::SHOT {
                assert_eq!(drops, [drop::POLICY], "port {dport}, fragment {i}: policy, not ports");
            }
        }
    }
}

#[test]
fn later_fragments_follow_their_datagrams_service_translation() {
    let mut n = Node::new("frag-lb");
    let mut lb = n.node.lb().unwrap();
    let fe = Frontend { addr: VIP, port: 53, proto: UDP };
    lb.upsert_backend(3, &Backend { addr: B.ip, port: 5353, proto: UDP, state: BACKEND_ACTIVE })
        .unwrap();
    lb.upsert_revnat(9, &fe).unwrap();
    let svc = LbService { rev_nat_index: 9, flags: SVC_F_CLUSTER_IP, ..Default::default() };
    lb.write_frontend(&fe, &svc, &[3]).unwrap();

    let mut out = Vec::new();
    for (i, frag) in datagram(&A, VIP, 43000, 53, 0x0777).iter().enumerate() {
        let run = n.send_a(frag);
        assert_eq!(outcome(&mut n, &run), (verdict::REDIRECT, vec![]), "fragment {i}");
        assert_eq!(addrs(&run.packet), (A.ip, B.ip), "fragment {i} DNATed");
        out.push(run.packet);
    }
    let (from, to, payload) = whole(&out);
    assert_eq!((from, to), ((A.ip, 43000), (B.ip, 5353)));
    assert_eq!(payload.len(), 4000);

    // The backend's fragmented answer comes back from the frontend.
    let mut back = Vec::new();
    for (i, frag) in datagram(&B, A.ip, 5353, 43000, 0x0888).iter().enumerate() {
        let run = n.send_b(frag);
        assert_eq!(outcome(&mut n, &run), (verdict::REDIRECT, vec![]), "answer fragment {i}");
        assert_eq!(addrs(&run.packet), (VIP, A.ip), "answer fragment {i} reverse-NATed");
        back.push(run.packet);
    }
    assert_eq!(whole(&back).0, (VIP, 53));
}

#[test]
fn later_fragments_are_masqueraded_with_their_datagram_and_so_are_the_answers() {
    let mut n = Node::new("frag-masq");
    let cfg = NodeConfig {
        node_ip: NODE_IP.octets(),
        cluster_cidr: [10, 200, 0, 0],
        cluster_cidr_len: 16,
        flags: NODE_F_MASQUERADE,
        ..Default::default()
    };
    n.node.node_config().unwrap().set(&cfg).unwrap();
    let mut out = Vec::new();
    for (i, frag) in datagram(&A, WORLD, 44000, 9000, 0x0999).iter().enumerate() {
        // From the pod (its conntrack view), then out of the native device
        // as the stack sends it.
        let run = n.send_a(frag);
        assert_eq!(outcome(&mut n, &run), (verdict::OK, vec![]), "fragment {i} to the stack");
        let mut leaving = frag.clone();
        leaving[..12].copy_from_slice(&[[0x0e, 0, 0, 0, 0, 1], HOST_MAC].concat());
        let run = Node::run(&mut n.host, TO_NETDEV, &leaving);
        assert_eq!(outcome(&mut n, &run), (verdict::OK, vec![]), "fragment {i} leaving");
        assert_eq!(addrs(&run.packet), (NODE_IP, WORLD), "fragment {i} masqueraded");
        out.push(run.packet);
    }
    let (from, _, _) = whole(&out);
    assert_eq!(from.0, NODE_IP);
    let port = from.1;

    // The world's fragmented answer to the node's address and port reaches
    // the pod.
    let answer: Vec<u8> = vec![0x42; 3000];
    let frame = packet::ipv4_frame(
        &Eth { dst: HOST_MAC, src: [0x0e, 0, 0, 0, 0, 1] },
        &Ip4::new(WORLD, NODE_IP),
        &L4::Udp { sport: 9000, dport: port, payload: &answer },
    );
    let mut back = Vec::new();
    for (i, frag) in packet::fragments(&frame, 1500, 0x0aaa).iter().enumerate() {
        let run = Node::run(&mut n.host, FROM_NETDEV, frag);
        assert_eq!(outcome(&mut n, &run), (verdict::REDIRECT, vec![]), "answer fragment {i}");
        assert_eq!(addrs(&run.packet), (WORLD, A.ip), "answer fragment {i} translated back");
        back.push(run.packet);
    }
    let (_, to, payload) = whole(&back);
    assert_eq!((to, payload), ((A.ip, 44000), answer));
}
