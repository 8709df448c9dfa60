//! BPF_PROG_TEST_RUN tests of the lxc object (from-container).
//! Needs root (loads BPF programs); CI runs as root.

mod common;

use std::net::Ipv4Addr;

use ciliate_common::{config::EndpointConfig, drop, metrics, trace};
use ciliate_datapath::{
    events::Event,
    loader::Loaded,
    maps::{EventRing, MetricsMap},
    objects::programs::FROM_CONTAINER,
    packet::{self, ARPOP_REPLY, Eth, Ip4, L4, tcp_flags},
    testrun::{ScratchNode, TcRun, run_tc, run_tc_on, verdict},
};

const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x00, 0x00, 0x05];
const LXC_MAC: [u8; 6] = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc];
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 5);
const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);

fn cfg() -> EndpointConfig {
    EndpointConfig {
        ifindex: 42,
        identity: 43561,
        ipv4: POD_IP.octets(),
        endpoint_id: 1777,
        lxc_mac: LXC_MAC,
        flags: 0,
    }
}

struct Harness {
    _node: ScratchNode,
    loaded: Loaded,
    metrics: MetricsMap,
    events: EventRing,
}

impl Harness {
    /// The node's from-container with the endpoint of [`cfg`] configured
    /// for its device.
    fn new(tag: &str) -> Self {
        let node = ScratchNode::new(tag).expect("scratch pin dir (needs root)");
        let loaded = common::endpoints(&node, &[cfg()]);
        Self::with(node, loaded)
    }

    fn with(node: ScratchNode, mut loaded: Loaded) -> Self {
        loaded.classifier(FROM_CONTAINER).expect("load from_container");
        let metrics = MetricsMap::from_pin_dir(&node.pins.dir).expect("metrics map");
        let events = EventRing::from_pin_dir(&node.pins.dir).expect("event ring");
        Self { _node: node, loaded, metrics, events }
    }

    fn run(&mut self, pkt: &[u8]) -> TcRun {
        let prog = self.loaded.classifier(FROM_CONTAINER).unwrap();
        run_tc_on(prog, FROM_CONTAINER, pkt, cfg().ifindex).expect("test run")
    }
}

fn pod_eth() -> Eth {
    Eth { dst: LXC_MAC, src: POD_MAC }
}

#[test]
fn arp_request_for_the_gateway_is_answered_with_the_lxc_mac() {
    let mut h = Harness::new("arp");
    let out = h.run(&packet::arp_request(POD_MAC, POD_IP, GW_IP));
    assert_eq!(out.verdict, verdict::REDIRECT, "ARP reply goes back out of the lxc device");
    let p = packet::parse(&out.packet).unwrap();
    assert_eq!(p.eth, Eth { dst: POD_MAC, src: LXC_MAC });
    let arp = p.arp.unwrap();
    assert_eq!(arp.op, ARPOP_REPLY);
    assert_eq!((arp.sha, arp.spa), (LXC_MAC, GW_IP));
    assert_eq!((arp.tha, arp.tpa), (POD_MAC, POD_IP));
}

#[test]
fn arp_for_any_other_address_is_answered_too() {
    let mut h = Harness::new("arp-any");
    let out = h.run(&packet::arp_request(POD_MAC, POD_IP, OTHER_IP));
    assert_eq!(out.verdict, verdict::REDIRECT);
    assert_eq!(packet::parse(&out.packet).unwrap().arp.unwrap().spa, OTHER_IP);
}

#[test]
fn arp_for_the_pods_own_address_and_arp_replies_pass_unchanged() {
    let mut h = Harness::new("arp-pass");
    let own = packet::arp_request(POD_MAC, POD_IP, POD_IP);
    let dad = packet::arp_request(POD_MAC, Ipv4Addr::UNSPECIFIED, POD_IP);
    let reply = packet::ether(
        &pod_eth(),
        packet::ETH_P_ARP,
        &packet::arp_body(ARPOP_REPLY, POD_MAC, POD_IP, LXC_MAC, GW_IP),
    );
    for pkt in [own, dad, reply] {
        let out = h.run(&pkt);
        assert_eq!(out.verdict, verdict::OK);
        assert_eq!(out.packet, pkt, "passed frames are not modified");
    }
}

#[test]
fn ipv4_goes_to_the_stack_with_a_trace_event() {
    let mut h = Harness::new("ipv4");
    let syn =
        L4::Tcp { sport: 39276, dport: 22, seq: 1, ack: 0, flags: tcp_flags::SYN, payload: b"" };
    let pkt = packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, OTHER_IP), &syn);
    let out = h.run(&pkt);
    assert_eq!(out.verdict, verdict::OK);
    assert_eq!(out.packet, pkt);
    let fwd = h.metrics.get(metrics::REASON_FORWARDED, metrics::DIR_EGRESS).unwrap();
    assert_eq!((fwd.packets, fwd.bytes), (1, pkt.len() as u64));
    let events = h.events.drain();
    let [Event::Trace(t)] = events.as_slice() else { panic!("one trace event, got {events:?}") };
    assert_eq!(t.hdr.subtype, trace::TO_STACK);
    assert_eq!((t.hdr.source, t.src_identity, t.ifindex), (1777, 43561, 42));
    assert_eq!(Event::Trace(*t).captured(), &pkt[..]);
}

/// Runs `pkt`, expects a drop with `reason`, checks metrics and the event.
fn expect_drop(h: &mut Harness, pkt: &[u8], reason: u8) {
    let before = h.metrics.get(reason, metrics::DIR_EGRESS).unwrap().packets;
    let out = h.run(pkt);
    assert_eq!(out.verdict, verdict::SHOT, "reason {reason} ({})", drop::reason_name(reason));
    let after = h.metrics.get(reason, metrics::DIR_EGRESS).unwrap().packets;
    assert_eq!(after, before + 1, "drop counted under reason {reason}");
    let events = h.events.drain();
    let [ev @ Event::Drop(d)] = events.as_slice() else { panic!("one drop event, got {events:?}") };
    assert_eq!(d.hdr.subtype, reason);
    assert_eq!(d.hdr.len_orig as usize, pkt.len());
    assert_eq!(ev.captured(), &pkt[..pkt.len().min(128)]);
    assert_ne!(d.line, 0, "drop carries its source line");
}

#[test]
fn malformed_ipv4_is_dropped_as_invalid() {
    let mut h = Harness::new("bad-ip");
    let udp = L4::Udp { sport: 1, dport: 2, payload: b"x" };
    let good = packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, OTHER_IP), &udp);
    // (A frame cut inside the first 20 bytes of IPv4 cannot be tested here:
    // BPF_PROG_TEST_RUN itself refuses such input with EINVAL.)
    // Header length below 20 bytes.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    expect_drop(&mut h, &bad_ihl, drop::INVALID);
    // Version 6 in an IPv4 ethertype.
    let mut bad_ver = good.clone();
    bad_ver[14] = 0x65;
    expect_drop(&mut h, &bad_ver, drop::INVALID);
    // IHL pointing past the end of the packet.
    let mut long_ihl = good[..14 + 24].to_vec();
    long_ihl[14] = 0x4f;
    expect_drop(&mut h, &long_ihl, drop::INVALID);
}

#[test]
fn unknown_l3_is_dropped_with_its_reason() {
    let mut h = Harness::new("l3");
    let lldp = packet::ether(&pod_eth(), 0x88cc, &[0u8; 46]);
    expect_drop(&mut h, &lldp, drop::UNKNOWN_L3);
    let v6 = packet::ether(&pod_eth(), packet::ETH_P_IPV6, &[0x60; 60]);
    expect_drop(&mut h, &v6, drop::UNKNOWN_L3);
}

#[test]
fn a_device_without_configuration_drops_everything() {
    let mut h = Harness::new("nocfg");
    // The program runs on a device the agent wrote no configuration for.
    h._node.endpoint_config().unwrap().remove(cfg().ifindex).unwrap();
    expect_drop(&mut h, &packet::arp_request(POD_MAC, POD_IP, GW_IP), drop::NO_CONFIG);
    // Without ctx (the loopback device) it is the same.
    let prog = h.loaded.classifier(FROM_CONTAINER).unwrap();
    let arp = packet::arp_request(POD_MAC, POD_IP, GW_IP);
    assert_eq!(run_tc(prog, FROM_CONTAINER, &arp).unwrap().verdict, verdict::SHOT);
}

#[test]
fn one_program_serves_every_endpoint_by_its_device() {
    let node = ScratchNode::new("shared").unwrap();
    let other = EndpointConfig {
        ifindex: 43,
        endpoint_id: 2,
        identity: 777,
        ipv4: OTHER_IP.octets(),
        ..cfg()
    };
    let mut lxc = common::endpoints(&node, &[cfg(), other]);
    let mut events = EventRing::from_pin_dir(&node.pins.dir).unwrap();
    let lldp = packet::ether(&pod_eth(), 0x88cc, &[0u8; 46]);
    for ifindex in [cfg().ifindex, other.ifindex] {
        let prog = lxc.classifier(FROM_CONTAINER).unwrap();
        assert_eq!(run_tc_on(prog, FROM_CONTAINER, &lldp, ifindex).unwrap().verdict, verdict::SHOT);
    }
    let m = MetricsMap::from_pin_dir(&node.pins.dir).unwrap();
    assert_eq!(m.get(drop::UNKNOWN_L3, metrics::DIR_EGRESS).unwrap().packets, 2);
    // Each drop is its own endpoint's: source endpoint and identity.
    let who: Vec<(u16, u32)> = events
        .drain()
        .into_iter()
        .filter_map(|e| match e {
            Event::Drop(d) => Some((d.hdr.source, d.src_identity)),
            _ => None,
        })
        .collect();
    assert_eq!(who, [(cfg().endpoint_id, cfg().identity), (2, 777)]);
    // A packet from the second device with the first pod's address is a
    // spoof there.
    let syn = L4::Tcp { sport: 1, dport: 22, seq: 1, ack: 0, flags: tcp_flags::SYN, payload: b"" };
    let spoof = packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, GW_IP), &syn);
    let prog = lxc.classifier(FROM_CONTAINER).unwrap();
    assert_eq!(
        run_tc_on(prog, FROM_CONTAINER, &spoof, other.ifindex).unwrap().verdict,
        verdict::SHOT
    );
    assert!(
        matches!(events.drain().as_slice(), [Event::Drop(d)] if d.hdr.subtype == drop::INVALID_SIP)
    );
}

#[test]
fn events_the_ring_has_no_room_for_are_counted_as_lost() {
    let mut h = Harness::new("lost");
    let lost = ciliate_datapath::maps::EventsLost::from_pin_dir(&h._node.pins.dir).unwrap();
    assert_eq!(lost.total().unwrap(), 0);
    // Drop events of ~200 bytes into a 256 KiB ring nobody reads: it
    // fills, and every event after that is counted.
    let lldp = packet::ether(&pod_eth(), 0x88cc, &[0u8; 46]);
    let sent = 2000u64;
    for _ in 0..sent {
        assert_eq!(h.run(&lldp).verdict, verdict::SHOT);
    }
    let delivered = h.events.drain().len() as u64;
    let lost_now = lost.total().unwrap();
    assert!(delivered > 0 && lost_now > 0, "delivered {delivered}, lost {lost_now}");
    assert_eq!(delivered + lost_now, sent, "every event is delivered or counted");
    // With room again, events flow and nothing more is lost.
    assert_eq!(h.run(&lldp).verdict, verdict::SHOT);
    assert_eq!(h.events.drain().len(), 1);
    assert_eq!(lost.total().unwrap(), lost_now);
}

#[test]
fn debugging_off_sends_no_debug_event_and_on_tells_each_decision_in_order() {
    let syn =
        L4::Tcp { sport: 39276, dport: 22, seq: 1, ack: 0, flags: tcp_flags::SYN, payload: b"" };
    let pkt = packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, OTHER_IP), &syn);

    // Off: the trace event, nothing else.
    let mut h = Harness::new("dbg-off");
    assert_eq!(h.run(&pkt).verdict, verdict::OK);
    let events = h.events.drain();
    assert!(matches!(events.as_slice(), [Event::Trace(_)]), "debugging off: {events:?}");

    // On for this endpoint: the same verdict and packet, and every decision.
    let node = ScratchNode::new("dbg-on").expect("scratch pin dir (needs root)");
    let on = EndpointConfig { flags: ciliate_common::config::ENDPOINT_F_DEBUG, ..cfg() };
    let loaded = common::endpoints(&node, &[on]);
    let mut h = Harness::with(node, loaded);
    let out = h.run(&pkt);
    assert_eq!((out.verdict, &out.packet), (verdict::OK, &pkt), "debugging changes nothing");
    let events = h.events.drain();
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Trace(_))).count(),
        1,
        "the trace event as before: {events:?}"
    );
    let lines = common::debug_lines(&events);
    assert_eq!(
        lines,
        [
            "capture: Packet at from-endpoint on ifindex 42",
            "Frontend service lookup, addr=10.200.0.9 key.dport=22",
            "Frontend service lookup failed",
            "Successfully mapped addr=10.200.0.9 to identity=2",
            "Conntrack lookup 1/2: src=10.200.0.5:39276 dst=10.200.0.9:22",
            "Conntrack lookup 2/2: nexthdr=6 flags=1",
            "CT verdict: New, revnat=0",
            "Policy lookup: endpoint 1777 egress, identity 2, proto 6 dport 22: not enforced",
            "Conntrack create: proxy-port=0 revnat=0 src-identity=43561 lb=0.0.0.0",
            "Going to the stack, policy-skip=0",
            "capture: Packet to-stack on ifindex 42",
        ],
        "in order"
    );
    for e in &events {
        if let Event::Debug(d) = e {
            assert_eq!(d.hdr.source, 1777, "each debug event names the endpoint");
        }
    }
    // The second packet of the connection: established, no create.
    let ack =
        L4::Tcp { sport: 39276, dport: 22, seq: 2, ack: 1, flags: tcp_flags::ACK, payload: b"" };
    let pkt = packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, OTHER_IP), &ack);
    h.run(&pkt);
    let lines = common::debug_lines(&h.events.drain());
    assert!(lines.iter().any(|l| l == "CT verdict: Established, revnat=0"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("Conntrack create")), "{lines:?}");
}

#[test]
fn a_flood_of_new_connections_that_overfills_conntrack_keeps_an_established_one() {
    use ciliate_common::ct;
    let mut h = Harness::new("ct-flood");
    let frame = |dst: Ipv4Addr, sport: u16, dport: u16, flags: u8| {
        let l4 = L4::Tcp { sport, dport, seq: 1, ack: 1, flags, payload: b"" };
        packet::ipv4_frame(&pod_eth(), &Ip4::new(POD_IP, dst), &l4)
    };
    // The established connection.
    let ack = frame(OTHER_IP, 40000, 443, tcp_flags::ACK);
    assert_eq!(h.run(&frame(OTHER_IP, 40000, 443, tcp_flags::SYN)).verdict, verdict::OK);
    assert_eq!(h.run(&ack).verdict, verdict::OK);
    let key = ciliate_common::ct::CtKey4 {
        saddr: POD_IP.octets(),
        daddr: OTHER_IP.octets(),
        sport: 40000u16.to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        dir: ct::DIR_EGRESS,
        _pad: [0; 2],
    };
    let ct_maps = h._node.ct().unwrap();
    let before = ct_maps.get(&key).unwrap().expect("the connection is tracked");
    // 20% more new connections than the table holds, the established one
    // sending every 1,000 of them (as a live connection would).
    let flood = ct::MAX_ENTRIES_TCP as usize * 6 / 5;
    for i in 0..flood {
        // A new 4-tuple each time: destination 198.18.x.y, source port.
        let (dst, sport) =
            (Ipv4Addr::from(0xc612_0000u32 | (i as u32 >> 8)), 1024 + (i & 0xff) as u16);
        let syn = frame(dst, sport, 80, tcp_flags::SYN);
        assert_eq!(h.run(&syn).verdict, verdict::OK, "new connection {i}");
        if i % 1000 == 0 {
            assert_eq!(h.run(&ack).verdict, verdict::OK);
        }
    }
    let (tcp, _) = ct_maps.counts();
    assert!(tcp <= ct::MAX_ENTRIES_TCP as usize, "{tcp} entries");
    assert!(tcp > ct::MAX_ENTRIES_TCP as usize / 2, "the flood filled the table: {tcp}");
    let after = ct_maps.get(&key).unwrap().expect("the established connection was evicted");
    assert!(after.tx_packets > before.tx_packets + (flood / 1000) as u64 - 1, "{after:?}");
    // The oldest of the flood made room.
    let first = ciliate_common::ct::CtKey4 {
        daddr: Ipv4Addr::new(198, 18, 0, 0).octets(),
        sport: 1024u16.to_be(),
        dport: 80u16.to_be(),
        ..key
    };
    assert!(ct_maps.get(&first).unwrap().is_none(), "the flood's first entry is still there");
}
