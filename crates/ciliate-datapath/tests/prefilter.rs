//! BPF_PROG_TEST_RUN tests of the XDP prefilter (`xdp_entry`,
//! `ciliate_common::prefilter`): a frame from a denied CIDR is dropped and
//! counted in its CIDR's slot (the longest prefix's), anything else passes
//! uncounted and untouched (other sources, non-IPv4 frames, frames too
//! short for an IPv4 header); a CIDR removed no longer drops. Needs root;
//! CI runs as root.

use std::net::Ipv4Addr;

use aya::programs::Xdp;
use ciliate_datapath::{
    nodemaps::PrefilterMaps,
    objects::programs::XDP_ENTRY,
    packet::{self, Eth, Ip4, L4},
    testrun::{ScratchNode, run_xdp, xdp, xdp_entry},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const ETH: Eth = Eth { dst: [2, 0, 0, 0, 0, 1], src: [2, 0, 0, 0, 0, 2] };

fn udp_from(src: Ipv4Addr) -> Vec<u8> {
    packet::ipv4_frame(
        &ETH,
        &Ip4::new(src, NODE_IP),
        &L4::Udp { sport: 40000, dport: 30080, payload: b"flood" },
    )
}

struct Prefilter {
    _node: ScratchNode,
    prog: Xdp,
    maps: PrefilterMaps,
}

impl Prefilter {
    fn new(tag: &str) -> Self {
        let node = ScratchNode::new(tag).expect("scratch pin dir (needs root)");
        let prog = xdp_entry(&node.pins).unwrap();
        let maps = PrefilterMaps::from_pin_dir(&node.pins.dir).unwrap();
        Self { _node: node, prog, maps }
    }

    /// The verdict on `frame`, after checking a passed frame is untouched.
    fn run(&self, frame: &[u8]) -> i32 {
        let r = run_xdp(&self.prog, XDP_ENTRY, frame).unwrap();
        if r.verdict == xdp::PASS {
            assert_eq!(r.packet, frame, "a passed frame must be left as it came");
        }
        r.verdict
    }
}

#[test]
fn denied_cidr_dropped_and_counted_per_cidr() {
    let mut p = Prefilter::new("prefilter-hit");
    let (wide, narrow) = (Ipv4Addr::new(10, 9, 0, 0), Ipv4Addr::new(10, 9, 1, 0));
    p.maps.zero(3).unwrap();
    p.maps.zero(4).unwrap();
    p.maps.insert(wide, 16, 3).unwrap();
    p.maps.insert(narrow, 24, 4).unwrap();

    let hit = udp_from(Ipv4Addr::new(10, 9, 5, 5));
    assert_eq!(p.run(&hit), xdp::DROP, "10.9.5.5 (denied: 10.9.0.0/16)");
    assert_eq!(p.run(&hit), xdp::DROP, "10.9.5.5 again");
    assert_eq!(p.maps.stats(3).unwrap(), (2, 2 * hit.len() as u64));
    assert_eq!(p.maps.stats(4).unwrap(), (0, 0));

    // The longest prefix's slot counts.
    let inner = udp_from(Ipv4Addr::new(10, 9, 1, 7));
    assert_eq!(p.run(&inner), xdp::DROP, "10.9.1.7 (denied: 10.9.1.0/24)");
    assert_eq!(p.maps.stats(4).unwrap(), (1, inner.len() as u64));
    assert_eq!(p.maps.stats(3).unwrap().0, 2);

    // Misses pass, uncounted.
    assert_eq!(p.run(&udp_from(Ipv4Addr::new(10, 8, 255, 255))), xdp::PASS, "10.8.255.255");
    assert_eq!(p.run(&udp_from(Ipv4Addr::new(10, 10, 0, 0))), xdp::PASS, "10.10.0.0");
    let arp = packet::arp_request(ETH.src, Ipv4Addr::new(10, 9, 5, 5), NODE_IP);
    assert_eq!(p.run(&arp), xdp::PASS, "ARP from a denied address (not IPv4)");
    assert_eq!(p.run(&hit[..29]), xdp::PASS, "a frame cut inside the source address");
    assert_eq!(p.maps.stats(3).unwrap().0, 2);
    assert_eq!(p.maps.stats(4).unwrap().0, 1);

    // Removing the narrow CIDR leaves its addresses to the wide one.
    p.maps.remove(narrow, 24).unwrap();
    assert_eq!(p.run(&inner), xdp::DROP);
    assert_eq!(p.maps.stats(3).unwrap().0, 3);
    p.maps.remove(wide, 16).unwrap();
    assert_eq!(p.run(&hit), xdp::PASS, "10.9.5.5 after the CIDR went");
    assert_eq!(p.run(&inner), xdp::PASS, "10.9.1.7 after both went");
    let mut listed = p.maps.list().unwrap();
    listed.sort();
    assert_eq!(listed, vec![]);

    // A slot starts again from zero for the next CIDR.
    p.maps.zero(3).unwrap();
    assert_eq!(p.maps.stats(3).unwrap(), (0, 0));
}

#[test]
fn empty_prefilter_passes_everything() {
    let p = Prefilter::new("prefilter-empty");
    for src in [Ipv4Addr::new(10, 9, 5, 5), Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST] {
        assert_eq!(p.run(&udp_from(src)), xdp::PASS, "{src} with nothing denied");
    }
}

#[test]
fn deny_all_drops_every_ipv4_source() {
    let mut p = Prefilter::new("prefilter-all");
    p.maps.zero(0).unwrap();
    p.maps.insert(Ipv4Addr::UNSPECIFIED, 0, 0).unwrap();
    assert_eq!(p.maps.list().unwrap(), vec![(Ipv4Addr::UNSPECIFIED, 0, 0)]);
    for src in [Ipv4Addr::new(10, 9, 5, 5), Ipv4Addr::new(203, 0, 113, 9)] {
        assert_eq!(p.run(&udp_from(src)), xdp::DROP, "{src} under 0.0.0.0/0");
    }
    let arp = packet::arp_request(ETH.src, Ipv4Addr::new(10, 9, 5, 5), NODE_IP);
    assert_eq!(p.run(&arp), xdp::PASS, "ARP is not filtered");
    assert_eq!(p.maps.stats(0).unwrap().0, 2);
}
