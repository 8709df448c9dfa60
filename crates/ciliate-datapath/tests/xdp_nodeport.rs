//! BPF_PROG_TEST_RUN tests of NodePort acceleration at XDP (`xdp_entry`
//! with `NODE_F_XDP_NODEPORT`): a NodePort packet for a backend on another
//! node is DNAT'ed to the backend and SNAT'ed to the node at XDP, with
//! valid checksums, the neighbour's MAC, TTL - 1, and sent back out of the
//! device it came in by (`XDP_TX`); the flow keeps its backend and its
//! NAT port; from-netdev translates the backend's reply back with the
//! state XDP made. In tunnel mode the translated frame is wrapped in
//! VXLAN to the backend's node (outer headers as the overlay device
//! writes them). A local backend, a ClusterIP, a fragment, a backend
//! without a neighbour yet or without a tunnel endpoint, a frame the wrap
//! would take past the MTU and the switch off all pass to the stack
//! untouched. NodePort DSR (`NODE_F_DSR`), at XDP and at tc: DNAT only,
//! the frontend in an IPv4 option on a TCP flow's SYN and on every
//! datagram, no SNAT state; hybrid SNATs UDP. Needs root; CI runs as root.

use std::{net::Ipv4Addr, process::Command};

use ciliate_common::{
    config::HostConfig,
    endpoint::EndpointInfo,
    ipcache::IpcacheEntry,
    lb::{BACKEND_ACTIVE, LbService, SVC_F_CLUSTER_IP, SVC_F_NODE_PORT},
    metrics::{DIR_SERVICE, REASON_FORWARDED},
    node::{
        NODE_F_DSR, NODE_F_DSR_UDP, NODE_F_XDP_NODEPORT, NodeConfig, ROUTING_NATIVE, ROUTING_TUNNEL,
    },
};
use ciliate_datapath::{
    lbmaps::{Backend, Frontend},
    loader,
    objects::programs::{FROM_NETDEV, XDP_ENTRY},
    packet::{self, Eth, Ip4, L4, Parsed, tcp_flags},
    testrun::{
        ScratchNode, TcRun, own_netns_with_devices, run_tc, run_tc_on, run_xdp_on, verdict, xdp,
        xdp_entry,
    },
};

const IF: u32 = 31;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 5);
const NEXT_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const NEXT_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 3];
const NO_NEIGH: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 5);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 7);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x10];

fn ip(args: &str) {
    let st = Command::new("ip").args(args.split_whitespace()).status().unwrap();
    assert!(st.success(), "ip {args}");
}

fn node_cfg(routing: u8, flags: u8) -> NodeConfig {
    NodeConfig::new(NODE_IP.octets(), ([10, 200, 0, 0], 16), routing, flags, 0)
}

struct Nodeport {
    node: ScratchNode,
    prog: aya::programs::Xdp,
    mac: [u8; 6],
}

/// A node whose native device (ifindex IF, NODE_IP/24) routes the pod CIDR
/// 10.200.1.0/24 via the next node (a permanent neighbour), 10.200.2.0/24
/// via an address with no neighbour entry; NodePorts 30080 (TCP and UDP)
/// to BACKEND:8080 on the next node, 30081 to a pod of this node, 30082 to
/// a backend without a neighbour, and ClusterIP 10.96.0.10:80 to BACKEND.
fn setup(tag: &str) -> Nodeport {
    own_netns_with_devices(&[IF]).unwrap();
    let dev = format!("t{IF}");
    ip(&format!("link set {dev} up"));
    ip(&format!("link set p{IF} up"));
    ip(&format!("addr add {NODE_IP}/24 dev {dev}"));
    ip(&format!("neigh replace {NEXT_NODE} lladdr 0e:00:00:00:00:03 dev {dev} nud permanent"));
    ip(&format!("route add 10.200.1.0/24 via {NEXT_NODE} dev {dev}"));
    ip(&format!("route add 10.200.2.0/24 via 192.168.50.4 dev {dev}"));
    ciliate_datapath::node::sysctl("net.ipv4.ip_forward", "1").unwrap();
    let mac = ciliate_datapath::node::link_info(&dev).unwrap().0;
    let node = ScratchNode::new(tag).expect("scratch pin dir (needs root)");
    let prog = xdp_entry(&node.pins).unwrap();
    node.node_config().unwrap().set(&node_cfg(ROUTING_NATIVE, NODE_F_XDP_NODEPORT)).unwrap();
    let mut lb = node.lb().unwrap();
    let mut service = |index: u16, fe: Frontend, flags: u16, backend: Backend| {
        lb.upsert_backend(u32::from(index), &backend).unwrap();
        lb.upsert_revnat(index, &fe).unwrap();
        let master = LbService { rev_nat_index: index, flags, ..Default::default() };
        lb.write_frontend(&fe, &master, &[u32::from(index)]).unwrap();
    };
    let be = |addr, proto| Backend { addr, port: 8080, proto, state: BACKEND_ACTIVE };
    let fe = |addr, port, proto| Frontend { addr, port, proto };
    service(1, fe(NODE_IP, 30080, 6), SVC_F_NODE_PORT, be(BACKEND, 6));
    service(2, fe(NODE_IP, 30080, 17), SVC_F_NODE_PORT, be(BACKEND, 17));
    service(3, fe(NODE_IP, 30081, 6), SVC_F_NODE_PORT, be(LOCAL_POD, 6));
    service(4, fe(NODE_IP, 30082, 6), SVC_F_NODE_PORT, be(NO_NEIGH, 6));
    service(5, fe(Ipv4Addr::new(10, 96, 0, 10), 80, 6), SVC_F_CLUSTER_IP, be(BACKEND, 6));
    let pod = EndpointInfo { endpoint_id: 7, identity: 1007, ..Default::default() };
    node.lxc().unwrap().upsert(LOCAL_POD, &pod).unwrap();
    // In tunnel mode BACKEND is reached through the next node.
    let remote =
        IpcacheEntry { identity: 3000, tunnel_endpoint: NEXT_NODE.octets(), ..Default::default() };
    node.ipcache().unwrap().upsert(BACKEND, 32, &remote).unwrap();
    Nodeport { node, prog, mac }
}

fn from_client(dst: Ipv4Addr, l4: &L4<'_>, mac: [u8; 6]) -> Vec<u8> {
    packet::ipv4_frame(&Eth { dst: mac, src: CLIENT_MAC }, &Ip4::new(CLIENT, dst), l4)
}

fn tcp(sport: u16, dport: u16, flags: u8) -> L4<'static> {
    L4::Tcp { sport, dport, seq: 1, ack: 0, flags, payload: b"hello" }
}

impl Nodeport {
    fn run(&self, frame: &[u8]) -> TcRun {
        run_xdp_on(&self.prog, XDP_ENTRY, frame, IF).unwrap()
    }

    /// Run `frame`, expecting it passed to the stack as it came.
    fn passes(&self, frame: &[u8], what: &str) {
        let r = self.run(frame);
        assert_eq!(r.verdict, xdp::PASS, "{what}: not passed");
        assert_eq!(r.packet, frame, "{what}: a passed frame must be untouched");
    }

    fn forwarded(&self) -> u64 {
        let m = self.node.metrics().unwrap();
        m.get(REASON_FORWARDED, DIR_SERVICE).unwrap().packets
    }
}

/// The frame, checked: IP and L4 checksums valid.
fn parsed(r: &TcRun) -> Parsed {
    let p = packet::parse(&r.packet).unwrap();
    assert!(p.ipv4.as_ref().unwrap().header_csum_ok, "IP checksum broken at XDP");
    assert!(p.l4.as_ref().unwrap().csum_ok, "L4 checksum broken at XDP");
    p
}

#[test]
fn nodeport_to_a_remote_backend_is_translated_and_sent_back_out_at_xdp() {
    let n = setup("xdp-np");
    let syn = from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::SYN), n.mac);
    let r = n.run(&syn);
    assert_eq!(r.verdict, xdp::TX, "out of the device it came in by");
    let p = parsed(&r);
    let (ip4, l4) = (p.ipv4.clone().unwrap(), p.l4.clone().unwrap());
    assert_eq!((ip4.src, ip4.dst, l4.dport), (NODE_IP, BACKEND, 8080), "SNAT + DNAT");
    assert_eq!(ip4.ttl, 63, "TTL - 1");
    assert_eq!(p.eth, Eth { dst: NEXT_MAC, src: n.mac }, "MACs of the next hop");
    assert_eq!(l4.payload, b"hello");
    let nat_port = l4.sport;
    assert_eq!(n.forwarded(), 1, "counted as forwarded (SERVICE)");

    // The flow's next packet: the same backend and NAT port.
    let ack = from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::ACK), n.mac);
    let l4 = parsed(&n.run(&ack)).l4.unwrap();
    assert_eq!((l4.sport, l4.dport), (nat_port, 8080));

    // The backend's reply, at from-netdev (tc), finds what XDP made.
    let cfg = HostConfig { ifindex: IF, router_ip: [10, 200, 0, 1], ..Default::default() };
    let mut host = loader::load_host(&n.node.pins, &cfg).unwrap();
    let reply = packet::ipv4_frame(
        &Eth { dst: n.mac, src: NEXT_MAC },
        &Ip4::new(BACKEND, NODE_IP),
        &tcp(8080, nat_port, tcp_flags::SYN | tcp_flags::ACK),
    );
    let back = run_tc(host.classifier(FROM_NETDEV).unwrap(), FROM_NETDEV, &reply).unwrap();
    let p = packet::parse(&back.packet).unwrap();
    let (ip4, l4) = (p.ipv4.unwrap(), p.l4.unwrap());
    assert_eq!(
        ((ip4.src, l4.sport), (ip4.dst, l4.dport)),
        ((NODE_IP, 30080), (CLIENT, 40000)),
        "the reply translated back to frontend -> client"
    );
    assert!(ip4.header_csum_ok && l4.csum_ok);

    // UDP too, with its checksum.
    let udp = L4::Udp { sport: 40001, dport: 30080, payload: b"ping" };
    let r = n.run(&from_client(NODE_IP, &udp, n.mac));
    assert_eq!(r.verdict, xdp::TX);
    let p = parsed(&r);
    assert_eq!((p.ipv4.unwrap().dst, p.l4.unwrap().dport), (BACKEND, 8080));
    assert_eq!(n.forwarded(), 3);
}

#[test]
fn what_xdp_does_not_forward_passes_untouched() {
    let n = setup("xdp-np-pass");
    let mac = n.mac;
    n.passes(&from_client(NODE_IP, &tcp(40000, 30081, tcp_flags::SYN), mac), "a local backend");
    n.passes(
        &from_client(Ipv4Addr::new(10, 96, 0, 10), &tcp(40000, 80, tcp_flags::SYN), mac),
        "a ClusterIP from outside",
    );
    n.passes(&from_client(NODE_IP, &tcp(40000, 30099, tcp_flags::SYN), mac), "no frontend");
    n.passes(
        &from_client(NODE_IP, &tcp(40000, 30082, tcp_flags::SYN), mac),
        "a backend whose next hop has no neighbour entry yet",
    );
    let frame = from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::SYN), mac);
    let mut fragment = frame.clone();
    fragment[20] = 0x20; // more fragments
    packet::refresh_ipv4_checksum(&mut fragment);
    n.passes(&fragment, "a first fragment");
    let mut ttl1 = frame.clone();
    ttl1[22] = 1;
    packet::refresh_ipv4_checksum(&mut ttl1);
    n.passes(&ttl1, "TTL 1 (from-netdev drops it, counted)");
    let mut cfg = n.node.node_config().unwrap();
    cfg.set(&node_cfg(ROUTING_TUNNEL, NODE_F_XDP_NODEPORT)).unwrap();
    let no_tunnel = from_client(NODE_IP, &tcp(40000, 30082, tcp_flags::SYN), mac);
    n.passes(&no_tunnel, "tunnel mode, a backend the ipcache has no node for");
    cfg.set(&node_cfg(ROUTING_NATIVE, 0)).unwrap();
    n.passes(&frame, "acceleration off");
    assert_eq!(n.forwarded(), 0);
    // On again: forwarded.
    cfg.set(&node_cfg(ROUTING_NATIVE, NODE_F_XDP_NODEPORT)).unwrap();
    assert_eq!(n.run(&frame).verdict, xdp::TX);
}

#[test]
fn in_tunnel_mode_nodeport_is_wrapped_in_vxlan_to_the_backends_node_at_xdp() {
    let n = setup("xdp-np-vx");
    n.node.node_config().unwrap().set(&node_cfg(ROUTING_TUNNEL, NODE_F_XDP_NODEPORT)).unwrap();
    let syn = from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::SYN), n.mac);
    let r = n.run(&syn);
    assert_eq!(r.verdict, xdp::TX, "out of the device it came in by");
    let outer = packet::parse(&r.packet).unwrap();
    assert_eq!(outer.eth, Eth { dst: NEXT_MAC, src: n.mac }, "MACs of the next node");
    let ip4 = outer.ipv4.unwrap();
    assert!(ip4.header_csum_ok, "outer IP checksum");
    assert_eq!((ip4.src, ip4.dst, ip4.proto, ip4.ttl), (NODE_IP, NEXT_NODE, 17, 64));
    let ip_len = usize::from(u16::from_be_bytes([r.packet[16], r.packet[17]]));
    assert_eq!(ip_len, r.packet.len() - 14, "outer IP length");
    let udp = outer.l4.unwrap();
    assert_eq!(udp.dport, 8472, "the VXLAN port");
    assert!((32768..61000).contains(&udp.sport), "a source port of the device's range");
    assert_eq!(&r.packet[40..42], &[0, 0], "no outer UDP checksum, as the device sends");
    assert_eq!(&r.packet[42..50], &[0x08, 0, 0, 0, 0, 0, 6, 0], "VNI 6: remote-node");
    // The inner frame: as the native path translates it, TTL untouched.
    let inner = TcRun { verdict: r.verdict, packet: r.packet[50..].to_vec() };
    let p = parsed(&inner);
    let (ip4, l4) = (p.ipv4.unwrap(), p.l4.unwrap());
    assert_eq!((ip4.src, ip4.dst, l4.dport, ip4.ttl), (NODE_IP, BACKEND, 8080, 64));
    assert_eq!(l4.payload, b"hello");
    assert_eq!(n.forwarded(), 1);

    // A frame the wrap would take past the device's MTU: the stack's path.
    let full =
        L4::Tcp { sport: 40000, dport: 30080, seq: 2, ack: 1, flags: 0x10, payload: &[7; 1460] };
    n.passes(&from_client(NODE_IP, &full, n.mac), "1500 bytes + VXLAN past a 1500 MTU");
}

/// A DSR packet as it must leave: DNAT'ed to BACKEND:8080, the client's
/// source kept, TTL - 1, the next node's MAC; the option as `option` says.
fn assert_dsr(r: &TcRun, n: &Nodeport, sport: u16, option: bool, what: &str) {
    let p = parsed(r);
    let (ip4, l4) = (p.ipv4.unwrap(), p.l4.unwrap());
    assert_eq!(
        ((ip4.src, l4.sport), (ip4.dst, l4.dport)),
        ((CLIENT, sport), (BACKEND, 8080)),
        "{what}: DNAT only, the client's address kept"
    );
    assert_eq!(ip4.ttl, 63, "{what}: TTL - 1");
    assert_eq!(p.eth, Eth { dst: NEXT_MAC, src: n.mac }, "{what}: MACs of the next hop");
    let want = if option { packet::dsr_option(NODE_IP, 30080) } else { Vec::new() };
    assert_eq!(ip4.options, want, "{what}: the frontend in the option");
}

#[test]
fn dsr_carries_the_frontend_to_the_backends_node_at_xdp_and_at_tc() {
    let n = setup("np-dsr");
    let mut cfg = n.node.node_config().unwrap();
    let dsr = NODE_F_DSR | NODE_F_DSR_UDP;
    cfg.set(&node_cfg(ROUTING_NATIVE, NODE_F_XDP_NODEPORT | dsr)).unwrap();
    let r = n.run(&from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::SYN), n.mac));
    assert_eq!(r.verdict, xdp::TX, "out of the device it came in by");
    assert_dsr(&r, &n, 40000, true, "XDP, SYN");
    assert_eq!(parsed(&r).l4.unwrap().payload, b"hello");
    // The flow's next packets: the same backend, no option.
    let r = n.run(&from_client(NODE_IP, &tcp(40000, 30080, tcp_flags::ACK), n.mac));
    assert_dsr(&r, &n, 40000, false, "XDP, ACK");
    // Every UDP datagram carries it.
    let udp = L4::Udp { sport: 40001, dport: 30080, payload: b"ping" };
    for i in 0..2 {
        let r = n.run(&from_client(NODE_IP, &udp, n.mac));
        assert_dsr(&r, &n, 40001, true, &format!("XDP, datagram {i}"));
    }
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty(), "DSR leaves no SNAT state");
    assert_eq!(n.forwarded(), 4);
    // A datagram the option would take past the MTU: to the stack.
    let full = L4::Udp { sport: 40001, dport: 30080, payload: &[7; 1472] };
    let full = from_client(NODE_IP, &full, n.mac);
    n.passes(&full, "1500 bytes + the option past a 1500 MTU");

    // The same at tc (from-netdev), XDP off.
    cfg.set(&node_cfg(ROUTING_NATIVE, dsr)).unwrap();
    let hc = HostConfig { ifindex: IF, router_ip: [10, 200, 0, 1], ..Default::default() };
    let mut host = loader::load_host(&n.node.pins, &hc).unwrap();
    let mut tc = |frame: &[u8]| {
        run_tc_on(host.classifier(FROM_NETDEV).unwrap(), FROM_NETDEV, frame, IF).unwrap()
    };
    let r = tc(&from_client(NODE_IP, &tcp(40002, 30080, tcp_flags::SYN), n.mac));
    let reasons = |n: &Nodeport| -> Vec<u8> {
        let mut ring = n.node.events().unwrap();
        let ev = ring.drain();
        ev.into_iter()
            .filter_map(|e| match e {
                ciliate_datapath::events::Event::Drop(d) => Some(d.hdr.subtype),
                _ => None,
            })
            .collect()
    };
    assert_eq!(r.verdict, verdict::REDIRECT, "out by the FIB: {:?}", reasons(&n));
    assert_dsr(&r, &n, 40002, true, "tc, SYN");
    let r = tc(&from_client(NODE_IP, &tcp(40002, 30080, tcp_flags::ACK), n.mac));
    assert_dsr(&r, &n, 40002, false, "tc, ACK");
    let r = tc(&from_client(NODE_IP, &udp, n.mac));
    assert_dsr(&r, &n, 40001, true, "tc, datagram");
    assert_eq!(tc(&full).verdict, verdict::SHOT, "past the MTU");
    assert_eq!(reasons(&n), [ciliate_common::drop::FRAG_NOSUPPORT], "fragmentation needed");
    assert!(n.node.nat().unwrap().dump().unwrap().is_empty(), "DSR leaves no SNAT state");

    // Hybrid: DSR for TCP, SNAT for UDP.
    cfg.set(&node_cfg(ROUTING_NATIVE, NODE_F_DSR)).unwrap();
    let r = tc(&from_client(NODE_IP, &tcp(40003, 30080, tcp_flags::SYN), n.mac));
    assert_dsr(&r, &n, 40003, true, "hybrid, TCP");
    let udp = L4::Udp { sport: 40004, dport: 30080, payload: b"ping" };
    let p = parsed(&tc(&from_client(NODE_IP, &udp, n.mac)));
    assert_eq!(
        (p.ipv4.as_ref().unwrap().src, p.l4.unwrap().dport),
        (NODE_IP, 8080),
        "hybrid, UDP: SNAT"
    );
    assert!(p.ipv4.unwrap().options.is_empty());
}
