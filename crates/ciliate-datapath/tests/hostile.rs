//! Hostile and malformed frames through every tc program of a node, with
//! BPF_PROG_TEST_RUN: truncated headers, bogus IHL and TCP data offsets,
//! IP options, lengths that lie, wrong checksums, fragments, VLAN tags, a
//! wrong IP version, unknown protocols, runt and oversized frames. Each
//! program must answer with a defined verdict (pass, redirect or drop);
//! a drop carries a known reason in its event and is counted once in the
//! metrics under that reason; a pass or a redirect sends no drop event.
//! (A frame shorter than an Ethernet header cannot be test-run: the
//! kernel refuses it.) Needs root; CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{drop, node::NodeConfig};
use ciliate_datapath::{
    events::Event,
    objects::programs::{FROM_HOST, FROM_NETDEV, FROM_OVERLAY, TO_NETDEV},
    packet::{self, Eth, L4, tcp_flags},
    testrun::{self, verdict},
};
use common::*;

const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A valid TCP SYN from A to `dst` (Ethernet, IPv4, TCP).
fn syn(dst: Ipv4Addr) -> Vec<u8> {
    A.send(dst, &tcp(40000, 80, tcp_flags::SYN))
}

/// `f` with its IPv4 header bytes changed by `edit` and the header
/// checksum recomputed (unless `keep_csum`).
fn edited(mut f: Vec<u8>, keep_csum: bool, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut f);
    if !keep_csum && f.len() >= 34 && usize::from(f[14] & 0x0f) * 4 + 14 <= f.len() {
        packet::refresh_ipv4_checksum(&mut f);
    }
    f
}

/// Every hostile frame, named, from A to `dst`.
fn frames(dst: Ipv4Addr) -> Vec<(&'static str, Vec<u8>)> {
    let eth = Eth { dst: A.lxc_mac, src: A.mac };
    let base = syn(dst);
    // IHL 6: four bytes of options (NOP NOP NOP EOL) after the header.
    let with_options = edited(syn(dst), false, |f| {
        f.splice(34..34, [1, 1, 1, 0]);
        f[14] = 0x46;
        let len = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&len.to_be_bytes());
    });
    let big = A.send(dst, &L4::Udp { sport: 5353, dport: 53, payload: &[0x5a; 3000] });
    let mut vlan = base.clone();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    vec![
        ("runt: Ethernet header only", base[..14].to_vec()),
        ("IPv4 header cut at 10 bytes", base[..24].to_vec()),
        ("IHL 4 (shorter than a header)", edited(base.clone(), false, |f| f[14] = 0x44)),
        ("IHL 15 past the frame", edited(base.clone(), false, |f| f[14] = 0x4f)),
        ("IP version 6 in an IPv4 frame", edited(base.clone(), false, |f| f[14] = 0x65)),
        (
            "total length past the frame",
            edited(base.clone(), false, |f| f[16..18].copy_from_slice(&9000u16.to_be_bytes())),
        ),
        ("total length 0", edited(base.clone(), false, |f| f[16..18].copy_from_slice(&[0, 0]))),
        ("wrong IPv4 header checksum", edited(base.clone(), true, |f| f[24] ^= 0xff)),
        ("IP options", with_options),
        ("TCP header cut at 10 bytes", base[..44].to_vec()),
        ("TCP data offset 2", edited(base.clone(), false, |f| f[46] = 0x20)),
        ("TCP data offset 15 past the frame", edited(base.clone(), false, |f| f[46] = 0xf0)),
        ("wrong TCP checksum", edited(base.clone(), true, |f| f[50] ^= 0xff)),
        (
            "first fragment (more fragments)",
            edited(base.clone(), false, |f| f[20..22].copy_from_slice(&0x2000u16.to_be_bytes())),
        ),
        // Another datagram (IP ID) than the first fragment above: its
        // first fragment never came.
        (
            "later fragment",
            edited(base.clone(), false, |f| {
                f[18..20].copy_from_slice(&0x0bad_u16.to_be_bytes());
                f[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
            }),
        ),
        ("UDP length 0", {
            let mut f = A.send(dst, &L4::Udp { sport: 1, dport: 2, payload: b"x" });
            f[38..40].copy_from_slice(&[0, 0]);
            f
        }),
        ("UDP header cut at 4 bytes", A.send(dst, &L4::Raw { proto: 17, bytes: &[0, 1, 0, 2] })),
        ("ICMP cut at 1 byte", A.send(dst, &L4::Raw { proto: 1, bytes: &[8] })),
        ("GRE", A.send(dst, &L4::Raw { proto: 47, bytes: &[0; 24] })),
        ("VLAN-tagged", vlan),
        ("ARP cut short", packet::ether(&eth, packet::ETH_P_ARP, &[0, 1, 8, 0])),
        ("oversized UDP (3000 bytes)", big),
    ]
}

#[test]
fn every_program_gives_every_hostile_frame_a_defined_verdict_and_counts_its_drops() {
    let mut n = Node::new("hostile");
    // Masquerading on, so to-netdev reads what it gets.
    let cfg = NodeConfig {
        node_ip: [192, 168, 50, 2],
        cluster_cidr: [10, 200, 0, 0],
        cluster_cidr_len: 16,
        flags: ciliate_common::node::NODE_F_MASQUERADE,
        ..Default::default()
    };
    n.node.node_config().unwrap().set(&cfg).unwrap();
    let metrics = n.node.metrics().unwrap();
    let drops_of = |reason: u8| -> u64 {
        metrics
            .dump()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.reason == reason)
            .map(|(_, v)| v.packets)
            .sum()
    };
    let mut seen = Vec::new();
    // To the world (the stack's business after us) and to pod B (every
    // stage: conntrack, policy, delivery).
    let all = frames(WORLD).into_iter().map(|(n, f)| (format!("{n}, to the world"), f));
    let all = all.chain(frames(B.ip).into_iter().map(|(n, f)| (format!("{n}, to a pod"), f)));
    for (name, frame) in all {
        for prog in ["from_container", FROM_HOST, FROM_NETDEV, TO_NETDEV, FROM_OVERLAY] {
            let before: Vec<(u8, u64)> =
                (1..=255u8).map(|r| (r, drops_of(r))).filter(|(_, c)| *c > 0).collect();
            let run = if prog == "from_container" {
                let p = n.lxc.classifier(prog).unwrap();
                testrun::run_tc_on(p, prog, &frame, A.ifindex)
            } else {
                testrun::run_tc(n.host.classifier(prog).unwrap(), prog, &frame)
            };
            // The kernel's test run refuses some frames before any program
            // sees them (too short for what it sets up).
            let Ok(out) = run else {
                seen.push(format!("{prog}: {name}: refused by the test run ({})", frame.len()));
                continue;
            };
            let events = n.events.drain();
            let dropped: Vec<u8> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Drop(d) => Some(d.hdr.subtype),
                    _ => None,
                })
                .collect();
            match out.verdict {
                verdict::SHOT => {
                    let [reason] = dropped.as_slice() else {
                        panic!(
                            "{prog}, {name}: dropped with {} drop events: {events:?}",
                            dropped.len()
                        )
                    };
                    assert_ne!(
                        drop::reason_name(*reason),
                        "unknown",
                        "{prog}, {name}: reason {reason}"
                    );
                    let was =
                        before.iter().find(|(r, _)| r == reason).map(|(_, c)| *c).unwrap_or(0);
                    assert_eq!(drops_of(*reason), was + 1, "{prog}, {name}: counted once");
                    seen.push(format!("{prog}: {name}: drop ({})", drop::reason_name(*reason)));
                }
                verdict::OK | verdict::REDIRECT => {
                    assert!(
                        dropped.is_empty(),
                        "{prog}, {name}: passed with a drop event {events:?}"
                    );
                    seen.push(format!(
                        "{prog}: {name}: {}",
                        if out.verdict == verdict::OK { "pass" } else { "redirect" }
                    ));
                }
                v => panic!("{prog}, {name}: verdict {v}"),
            }
        }
    }
    // Some answers are the point: what no program may let through unread.
    for must in [
        "from_container: IHL 4 (shorter than a header), to a pod: drop (Invalid packet)",
        "from_container: IHL 15 past the frame, to a pod: drop (Invalid packet)",
        "from_container: later fragment, to a pod: drop (First logical datagram fragment not found)",
        "from_host: later fragment, to a pod: drop (First logical datagram fragment not found)",
        "from_container: first fragment (more fragments), to a pod: redirect",
        "from_container: UDP header cut at 4 bytes, to a pod: drop (CT: Invalid header)",
        "from_container: UDP header cut at 4 bytes, to the world: drop (CT: Invalid header)",
        "from_container: GRE, to a pod: drop (CT: Unknown L4 protocol)",
        "from_host: TCP header cut at 10 bytes, to a pod: drop (CT: Invalid header)",
        "from_container: IP options, to a pod: redirect",
        "from_container: oversized UDP (3000 bytes), to a pod: redirect",
    ] {
        assert!(seen.iter().any(|s| s.starts_with(must)), "{must}:\n{}", seen.join("\n"));
    }
    println!("{}", seen.join("\n"));
}
