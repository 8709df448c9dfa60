//! BPF_PROG_TEST_RUN tests of policy enforcement (egress in from-container,
//! ingress in the destination's stage): allow by identity and port,
//! wildcard identity, port ranges, deny over allow, replies allowed after a
//! deny-all ingress, what a policy change does to an established flow,
//! verdict events and per-rule counters. Needs root; CI runs as root.

mod common;

use ciliate_common::{
    drop,
    event::{VERDICT_ALLOWED, VERDICT_DENIED},
    policy::{self, ANY_IDENTITY, ANY_PROTO, DIR_EGRESS, DIR_INGRESS},
};
use ciliate_datapath::{
    events::Event,
    maps::{PolicyMap, PolicyRule},
    packet::tcp_flags,
    testrun::{TcRun, verdict},
};
use common::*;

const TCP: u8 = 6;

fn rule(ep: &Pod, dir: u8, identity: u32, proto: u8, ports: Option<(u16, u16)>) -> PolicyRule {
    PolicyRule { endpoint_id: ep.id, dir, identity, proto, ports, deny: false }
}

fn deny(r: PolicyRule) -> PolicyRule {
    PolicyRule { deny: true, ..r }
}

/// The run's verdict, and the policy verdict and drop events it sent.
struct Outcome {
    run: TcRun,
    verdicts: Vec<(u8, u8)>,
    drops: Vec<u8>,
    /// (source, destination) identity of each drop event.
    drop_ids: Vec<(u32, u32)>,
    /// (sending program's endpoint, destination endpoint) of each drop.
    drop_eps: Vec<(u16, u32)>,
}

fn send(n: &mut Node, from_a: bool, dport: u16, flags: u8) -> Outcome {
    let pkt = if from_a {
        A.send(B.ip, &tcp(40000 + dport % 1000, dport, flags))
    } else {
        B.send(A.ip, &tcp(dport, 40000 + dport % 1000, flags))
    };
    let run = if from_a { n.send_a(&pkt) } else { n.send_b(&pkt) };
    let mut verdicts = Vec::new();
    let mut drops = Vec::new();
    let mut drop_ids = Vec::new();
    let mut drop_eps = Vec::new();
    for e in n.events.drain() {
        match e {
            Event::PolicyVerdict(v) => verdicts.push((v.verdict, v.match_type)),
            Event::Drop(d) => {
                drops.push(d.hdr.subtype);
                drop_ids.push((d.src_identity, d.dst_identity));
                drop_eps.push((d.hdr.source, d.dst_id));
            }
            _ => {}
        }
    }
    Outcome { run, verdicts, drops, drop_ids, drop_eps }
}

fn policy(n: &Node) -> PolicyMap {
    n.node.policy().unwrap()
}

#[test]
fn egress_allows_what_a_rule_names_and_drops_the_rest_as_policy_denied() {
    let mut n = Node::new("pol-egress");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_EGRESS).unwrap();
    p.upsert(&rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80)))).unwrap();

    let ok = send(&mut n, true, 80, tcp_flags::SYN);
    assert_eq!(ok.run.verdict, verdict::REDIRECT);
    assert_eq!(ok.verdicts, [(VERDICT_ALLOWED, policy::MATCH_L3_L4)]);

    let no = send(&mut n, true, 81, tcp_flags::SYN);
    assert_eq!(no.run.verdict, verdict::SHOT);
    assert_eq!(no.verdicts, [(VERDICT_DENIED, policy::MATCH_NONE)]);
    assert_eq!(no.drops, [drop::POLICY]);
    assert_eq!(no.drop_ids, [(A.identity, B.identity)], "the drop names both sides");
    // A denied packet leaves no connection behind.
    let ct = n.node.ct().unwrap().dump().unwrap();
    assert!(ct.iter().all(|(k, _)| k.dport != 81u16.to_be()), "{ct:?}");

    // The rule counted what it decided.
    let dump = p.dump().unwrap();
    let (_, _, e) = dump.iter().find(|(k, _, _)| k.identity == B.identity).unwrap();
    assert_eq!(e.packets, 1);
}

#[test]
fn an_ingress_denial_at_local_delivery_is_the_destinations_drop_on_ingress() {
    use ciliate_common::metrics;
    let mut n = Node::new("pol-ingress-drop");
    policy(&n).enforce(B.id, DIR_INGRESS).unwrap();
    let no = send(&mut n, true, 80, tcp_flags::SYN);
    assert_eq!(no.run.verdict, verdict::SHOT);
    assert_eq!(no.drops, [drop::POLICY]);
    assert_eq!(no.drop_ids, [(A.identity, B.identity)]);
    // A's program ran B's ingress stage: "to endpoint B", as Cilium says.
    assert_eq!(no.drop_eps, [(A.id, u32::from(B.id))]);
    let m = ciliate_datapath::maps::MetricsMap::from_pin_dir(&n.node.pins.dir).unwrap();
    assert_eq!(m.get(drop::POLICY, metrics::DIR_INGRESS).unwrap().packets, 1, "counted on ingress");
    assert_eq!(m.get(drop::POLICY, metrics::DIR_EGRESS).unwrap().packets, 0);
}

#[test]
fn an_ingress_rule_for_any_identity_and_a_protocol_matches_every_port_of_it() {
    let mut n = Node::new("pol-any");
    let mut p = policy(&n);
    p.enforce(B.id, DIR_INGRESS).unwrap();
    p.upsert(&rule(&B, DIR_INGRESS, ANY_IDENTITY, TCP, None)).unwrap();
    for port in [22, 443, 65000] {
        let o = send(&mut n, true, port, tcp_flags::SYN);
        assert_eq!(o.run.verdict, verdict::REDIRECT, "port {port}");
        assert_eq!(o.verdicts, [(VERDICT_ALLOWED, policy::MATCH_L4_ONLY)]);
    }
    let udp =
        A.send(B.ip, &ciliate_datapath::packet::L4::Udp { sport: 1, dport: 53, payload: b"" });
    assert_eq!(n.send_a(&udp).verdict, verdict::SHOT, "UDP is not TCP");
}

#[test]
fn port_ranges_allow_exactly_their_ports() {
    let mut n = Node::new("pol-range");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_EGRESS).unwrap();
    p.upsert(&rule(&A, DIR_EGRESS, B.identity, TCP, Some((8000, 8100)))).unwrap();
    for (port, allowed) in
        [(7999, false), (8000, true), (8063, true), (8064, true), (8100, true), (8101, false)]
    {
        let o = send(&mut n, true, port, tcp_flags::SYN);
        let want = if allowed { verdict::REDIRECT } else { verdict::SHOT };
        assert_eq!(o.run.verdict, want, "port {port}");
    }
}

#[test]
fn deny_wins_over_allow_whichever_is_more_specific() {
    let mut n = Node::new("pol-deny");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_EGRESS).unwrap();
    // Allow everything to B, deny B:80.
    p.upsert(&rule(&A, DIR_EGRESS, B.identity, ANY_PROTO, None)).unwrap();
    p.upsert(&deny(rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80))))).unwrap();
    let o = send(&mut n, true, 80, tcp_flags::SYN);
    assert_eq!((o.run.verdict, o.drops.as_slice()), (verdict::SHOT, &[drop::POLICY_DENY][..]));
    assert_eq!(o.verdicts, [(VERDICT_DENIED, policy::MATCH_L3_L4)]);
    assert_eq!(send(&mut n, true, 81, tcp_flags::SYN).run.verdict, verdict::REDIRECT);

    // A deny for any identity beats an allow for B's identity.
    p.upsert(&deny(rule(&A, DIR_EGRESS, ANY_IDENTITY, TCP, Some((443, 443))))).unwrap();
    let o = send(&mut n, true, 443, tcp_flags::SYN);
    assert_eq!(o.drops, [drop::POLICY_DENY]);
}

#[test]
fn replies_pass_a_deny_all_ingress_and_new_connections_do_not() {
    let mut n = Node::new("pol-reply");
    // A opens a connection to B while nothing is enforced.
    assert_eq!(send(&mut n, true, 80, tcp_flags::SYN).run.verdict, verdict::REDIRECT);
    // Now A's ingress is enforced with no rule at all: deny all.
    policy(&n).enforce(A.id, DIR_INGRESS).unwrap();
    let reply = send(&mut n, false, 80, tcp_flags::SYN | tcp_flags::ACK);
    assert_eq!(reply.run.verdict, verdict::REDIRECT, "the reply of A's connection");
    assert!(reply.verdicts.is_empty(), "replies are not policy decisions");
    // B opening its own connection to A is new: dropped.
    let b_new = B.send(A.ip, &tcp(5555, 22, tcp_flags::SYN));
    assert_eq!(n.send_b(&b_new).verdict, verdict::SHOT);
    // An ingress policy drop names the sender and the receiver.
    let ids: Vec<(u32, u32)> = n
        .events
        .drain()
        .into_iter()
        .filter_map(|e| match e {
            Event::Drop(d) => Some((d.src_identity, d.dst_identity)),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [(B.identity, A.identity)]);
}

#[test]
fn a_policy_change_leaves_an_established_flow_unless_a_deny_covers_it() {
    let mut n = Node::new("pol-estab");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_EGRESS).unwrap();
    let allow = rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80)));
    p.upsert(&allow).unwrap();
    assert_eq!(send(&mut n, true, 80, tcp_flags::SYN).run.verdict, verdict::REDIRECT);
    assert_eq!(
        send(&mut n, false, 80, tcp_flags::SYN | tcp_flags::ACK).run.verdict,
        verdict::REDIRECT
    );

    // The allow goes away: the established flow goes on, a new one does not.
    p.remove(&allow).unwrap();
    assert_eq!(send(&mut n, true, 80, tcp_flags::ACK).run.verdict, verdict::REDIRECT);
    let other = A.send(B.ip, &tcp(40999, 80, tcp_flags::SYN));
    assert_eq!(n.send_a(&other).verdict, verdict::SHOT);
    n.events.drain();

    // A deny now covers it: the established flow is cut.
    p.upsert(&deny(rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80))))).unwrap();
    let cut = send(&mut n, true, 80, tcp_flags::ACK);
    assert_eq!((cut.run.verdict, cut.drops.as_slice()), (verdict::SHOT, &[drop::POLICY_DENY][..]));
}

#[test]
fn an_established_flow_is_looked_up_again_only_when_the_policy_generation_moves() {
    use ciliate_datapath::maps::{PolicyWriter as _, policy_entries};
    let mut n = Node::new("pol-gen");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_EGRESS).unwrap();
    p.upsert(&rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80)))).unwrap();
    assert_eq!(send(&mut n, true, 80, tcp_flags::SYN).run.verdict, verdict::REDIRECT);
    let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
    assert_eq!(send(&mut n, false, 80, syn_ack).run.verdict, verdict::REDIRECT);
    assert_eq!(send(&mut n, true, 80, tcp_flags::ACK).run.verdict, verdict::REDIRECT);

    // A deny written without moving the generation (the raw entries, as
    // no writer of the agent does): the established flow, decided at this
    // generation, is not looked up again; a new connection meets it.
    let d = deny(rule(&A, DIR_EGRESS, B.identity, TCP, Some((80, 80))));
    for (k, v) in policy_entries(A.id, &[(DIR_EGRESS, true)], &[d]).unwrap() {
        p.insert_entry(&k, v).unwrap();
    }
    assert_eq!(send(&mut n, true, 80, tcp_flags::ACK).run.verdict, verdict::REDIRECT);
    let other = A.send(B.ip, &tcp(40998, 80, tcp_flags::SYN));
    assert_eq!(n.send_a(&other).verdict, verdict::SHOT);
    n.events.drain();

    // The generation moves (every writer of the policy map, the ipcache and
    // the lxc map moves it after its change): looked up again, cut.
    p.changed().unwrap();
    let cut = send(&mut n, true, 80, tcp_flags::ACK);
    assert_eq!((cut.run.verdict, cut.drops.as_slice()), (verdict::SHOT, &[drop::POLICY_DENY][..]));
}

#[test]
fn unenforced_directions_need_no_rules() {
    let mut n = Node::new("pol-off");
    let mut p = policy(&n);
    p.enforce(A.id, DIR_INGRESS).unwrap(); // only ingress
    let o = send(&mut n, true, 80, tcp_flags::SYN);
    assert_eq!(o.run.verdict, verdict::REDIRECT, "A's egress and B's ingress are open");
    assert!(o.verdicts.is_empty(), "no verdict where nothing is enforced");
    p.unenforce(A.id, DIR_INGRESS).unwrap();
    p.unenforce(A.id, DIR_INGRESS).unwrap();
}

#[test]
fn icmp_rules_match_the_icmp_type() {
    let mut n = Node::new("pol-icmp");
    let mut p = policy(&n);
    p.enforce(B.id, DIR_INGRESS).unwrap();
    // Echo requests (type 8) from anyone.
    p.upsert(&rule(&B, DIR_INGRESS, ANY_IDENTITY, 1, Some((8, 8)))).unwrap();
    let echo =
        ciliate_datapath::packet::L4::IcmpEcho { request: true, id: 3, seq: 1, payload: b"" };
    assert_eq!(n.send_a(&A.send(B.ip, &echo)).verdict, verdict::REDIRECT);
    // A timestamp request (type 13) is not allowed.
    let ts = ciliate_datapath::packet::L4::Raw { proto: 1, bytes: &[13, 0, 0, 0, 0, 1, 0, 1] };
    assert_eq!(n.send_a(&A.send(B.ip, &ts)).verdict, verdict::SHOT);
}
