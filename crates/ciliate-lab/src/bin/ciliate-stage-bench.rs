//! `ciliate-stage-bench`: nanoseconds per packet of each datapath path,
//! and of each stage as the difference between two paths that differ by
//! that stage alone, measured with BPF_PROG_TEST_RUN `repeat` on the
//! node's real programs (a scratch bpffs, devices in a namespace of this
//! program's own): ARP, conntrack and local delivery, policy, the services
//! stage (LB + DNAT), masquerading (SNAT), encapsulation.
//!
//! Every path is an established TCP flow (its first packet run once
//! before), so what is timed is the per-packet cost of a flow in steady
//! state; each path's verdict is checked. A path's figure is the mean of
//! `--repeat` test runs of one packet each (the kernel's time around the
//! program, which includes reading its clock: a constant that the stage
//! differences cancel), with the maps warm: lower bounds of the cost in
//! traffic.
//!
//! ```text
//! ciliate-stage-bench [--runs N] [--repeat N]
//! ```

use std::net::Ipv4Addr;

use ciliate_common::{
    config::{EndpointConfig, HostConfig},
    endpoint::{ENDPOINT_F_HOST, EndpointInfo},
    identity,
    ipcache::IpcacheEntry,
    lb::{BACKEND_ACTIVE, LbService, SVC_F_CLUSTER_IP},
    node::{NODE_F_MASQUERADE, NodeConfig, ROUTING_NATIVE, ROUTING_TUNNEL},
    policy::{DIR_EGRESS, DIR_INGRESS},
};
use ciliate_datapath::{
    DatapathError,
    lbmaps::{Backend, Frontend},
    loader,
    maps::PolicyRule,
    objects::programs::{FROM_CONTAINER, TO_NETDEV},
    packet::{self, Eth, Ip4, L4, tcp_flags},
    testrun::{ScratchNode, TcRun, own_netns_with_devices, skb_ctx, time_run, verdict},
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 5);
const A_IF: u32 = 12;
const B_IF: u32 = 13;
const A_ID: u16 = 101;
const B_ID: u16 = 102;
const A_IDENTITY: u32 = 1001;
const B_IDENTITY: u32 = 1002;
const A_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 2];
const A_LXC_MAC: [u8; 6] = [0x12, 0, 0, 0, 0, 2];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

struct Opts {
    runs: usize,
    repeat: u32,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { runs: 5, repeat: 20_000 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => o.runs = ciliate_lab::bench::positive(&mut it, "--runs", 50)? as usize,
            "--repeat" => {
                o.repeat = ciliate_lab::bench::positive(&mut it, "--repeat", 10_000_000)? as u32
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: ciliate-stage-bench [--runs N] [--repeat N]"
                ));
            }
        }
    }
    Ok(o)
}

fn e(e: DatapathError) -> String {
    e.to_string()
}

fn config(ip: Ipv4Addr, ifindex: u32, id: u16, identity: u32) -> EndpointConfig {
    EndpointConfig {
        ifindex,
        identity,
        ipv4: ip.octets(),
        endpoint_id: id,
        lxc_mac: [0x12, 0, 0, 0, 0, ip.octets()[3]],
        flags: 0,
    }
}

fn info(ip: Ipv4Addr, ifindex: u32, id: u16, identity: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        endpoint_id: id,
        mac: [0x0a, 0, 0, 0, 0, ip.octets()[3]],
        node_mac: [0x12, 0, 0, 0, 0, ip.octets()[3]],
        identity,
        ..Default::default()
    }
}

fn node_cfg(routing: u8, flags: u8) -> NodeConfig {
    NodeConfig::new(NODE_IP.octets(), ([10, 200, 0, 0], 16), routing, flags, 77)
}

/// A TCP segment pod A sends to `dst:dport`.
fn from_a(dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let l4 = L4::Tcp { sport: 40000, dport, seq: 1, ack: 1, flags, payload: b"x" };
    packet::ipv4_frame(&Eth { dst: A_LXC_MAC, src: A_MAC }, &Ip4::new(A, dst), &l4)
}

/// The same segment as the stack sends it out of the native device
/// (after from-container let it to the stack).
fn leaving(src: Ipv4Addr, dst: Ipv4Addr, flags: u8) -> Vec<u8> {
    let l4 = L4::Tcp { sport: 40000, dport: 443, seq: 1, ack: 1, flags, payload: b"x" };
    packet::ipv4_frame(&Eth { dst: [0x0e, 0, 0, 0, 0, 1], src: HOST_MAC }, &Ip4::new(src, dst), &l4)
}

/// One path: a name, the program, the packet, the device it comes from.
struct Path {
    name: &'static str,
    lxc: bool,
    packet: Vec<u8>,
    ifindex: Option<u32>,
    expect: i32,
}

fn run() -> Result<(), String> {
    let o = parse_opts()?;
    own_netns_with_devices(&[A_IF, B_IF]).map_err(e)?;
    let node = ScratchNode::new("stage-bench").map_err(e)?;
    let mut lxc = loader::load_lxc(&node.pins).map_err(e)?;
    let host_cfg =
        HostConfig { ifindex: 3, router_ip: ROUTER.octets(), mac: HOST_MAC, ..Default::default() };
    let mut host = loader::load_host(&node.pins, &host_cfg).map_err(e)?;
    let mut cfg = node.endpoint_config().map_err(e)?;
    cfg.set(&config(A, A_IF, A_ID, A_IDENTITY)).map_err(e)?;
    cfg.set(&config(B, B_IF, B_ID, B_IDENTITY)).map_err(e)?;
    let mut lxc_map = node.lxc().map_err(e)?;
    lxc_map.upsert(A, &info(A, A_IF, A_ID, A_IDENTITY)).map_err(e)?;
    lxc_map.upsert(B, &info(B, B_IF, B_ID, B_IDENTITY)).map_err(e)?;
    let host_ep =
        EndpointInfo { flags: ENDPOINT_F_HOST, identity: identity::HOST, ..Default::default() };
    lxc_map.upsert(ROUTER, &host_ep).map_err(e)?;
    let mut ipc = node.ipcache().map_err(e)?;
    let entry = |identity| IpcacheEntry { identity, ..Default::default() };
    ipc.upsert(Ipv4Addr::UNSPECIFIED, 0, &entry(identity::WORLD)).map_err(e)?;
    ipc.upsert(A, 32, &entry(A_IDENTITY)).map_err(e)?;
    ipc.upsert(B, 32, &entry(B_IDENTITY)).map_err(e)?;
    ipc.upsert(ROUTER, 32, &entry(identity::HOST)).map_err(e)?;
    let remote = IpcacheEntry {
        identity: 3000,
        tunnel_endpoint: REMOTE_NODE.octets(),
        ..Default::default()
    };
    ipc.upsert(REMOTE_POD, 32, &remote).map_err(e)?;
    let mut node_map = node.node_config().map_err(e)?;
    node_map.set(&node_cfg(ROUTING_TUNNEL, NODE_F_MASQUERADE)).map_err(e)?;
    // A ClusterIP service VIP:80 → B:8080.
    let mut lb = node.lb().map_err(e)?;
    let fe = Frontend { addr: VIP, port: 80, proto: 6 };
    lb.upsert_backend(1, &Backend { addr: B, port: 8080, proto: 6, state: BACKEND_ACTIVE })
        .map_err(e)?;
    lb.upsert_revnat(1, &fe).map_err(e)?;
    let master = LbService { rev_nat_index: 1, flags: SVC_F_CLUSTER_IP, ..Default::default() };
    lb.write_frontend(&fe, &master, &[1]).map_err(e)?;

    let arp = packet::arp_request(A_MAC, A, ROUTER);
    let ack = tcp_flags::ACK;
    let mut paths = vec![
        Path { name: "ARP reply", lxc: true, packet: arp, ifindex: Some(A_IF), expect: 7 },
        Path {
            name: "pod->pod (conntrack x2, delivery)",
            lxc: true,
            packet: from_a(B, 7, ack),
            ifindex: Some(A_IF),
            expect: verdict::REDIRECT,
        },
        Path {
            name: "pod->pod, policy both ways",
            lxc: true,
            packet: from_a(B, 7, ack),
            ifindex: Some(A_IF),
            expect: verdict::REDIRECT,
        },
        Path {
            name: "pod->ClusterIP (+LB, DNAT)",
            lxc: true,
            packet: from_a(VIP, 80, ack),
            ifindex: Some(A_IF),
            expect: verdict::REDIRECT,
        },
        Path {
            name: "pod->world (ipcache, to stack)",
            lxc: true,
            packet: from_a(WORLD, 443, ack),
            ifindex: Some(A_IF),
            expect: verdict::OK,
        },
        Path {
            name: "to-netdev, node's own",
            lxc: false,
            packet: leaving(NODE_IP, WORLD, ack),
            ifindex: None,
            expect: verdict::OK,
        },
        Path {
            name: "to-netdev, masqueraded (SNAT)",
            lxc: false,
            packet: leaving(A, WORLD, ack),
            ifindex: None,
            expect: verdict::OK,
        },
        Path {
            name: "pod->remote pod, native",
            lxc: true,
            packet: from_a(REMOTE_POD, 7, ack),
            ifindex: Some(A_IF),
            expect: verdict::OK,
        },
        Path {
            name: "pod->remote pod, tunnel (encap)",
            lxc: true,
            packet: from_a(REMOTE_POD, 7, ack),
            ifindex: Some(A_IF),
            expect: verdict::REDIRECT,
        },
    ];
    // The policy path: A's egress and B's ingress enforced, each with an
    // allow for the other's identity, written only while it is timed
    // (enforcement is per endpoint: the other paths run without).
    let mut pol = node.policy().map_err(e)?;
    let rules = [(A_ID, DIR_EGRESS, B_IDENTITY), (B_ID, DIR_INGRESS, A_IDENTITY)].map(
        |(endpoint_id, dir, identity)| PolicyRule {
            endpoint_id,
            dir,
            identity,
            proto: 6,
            ports: Some((1, 65535)),
            deny: false,
        },
    );
    let mut policy = |on: bool| -> Result<(), String> {
        for r in &rules {
            if on {
                pol.enforce(r.endpoint_id, r.dir).map_err(e)?;
                pol.upsert(r).map_err(e)?;
            } else {
                pol.unenforce(r.endpoint_id, r.dir).map_err(e)?;
                pol.remove(r).map_err(e)?;
            }
        }
        Ok(())
    };
    // Open every flow (its SYN), so the timed packets are established.
    for p in &mut paths {
        let tc = if p.lxc { lxc.classifier(FROM_CONTAINER) } else { host.classifier(TO_NETDEV) }
            .map_err(e)?;
        let mut syn = p.packet.clone();
        if syn.len() > 47 && syn[12..14] == [8, 0] && syn[23] == 6 {
            syn[47] = tcp_flags::SYN;
            // (the TCP checksum does not matter to the datapath)
        }
        let name = if p.lxc { FROM_CONTAINER } else { TO_NETDEV };
        let ctx = p.ifindex.map(skb_ctx);
        let _ = time_run(tc, name, &syn, ctx.as_ref().map(|c| &c[..]), 1).map_err(e)?;
        if p.name.starts_with("to-netdev, masq") {
            // The SNAT entry is made by to-netdev; the flow's conntrack
            // entry by from-container before it.
            let c = lxc.classifier(FROM_CONTAINER).map_err(e)?;
            let syn = from_a(WORLD, 443, tcp_flags::SYN);
            let _ = time_run(c, FROM_CONTAINER, &syn, Some(&skb_ctx(A_IF)), 1).map_err(e)?;
        }
    }
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..o.runs {
        for (p, out) in paths.iter().zip(&mut ns) {
            let routing = if p.name.contains("native") { ROUTING_NATIVE } else { ROUTING_TUNNEL };
            node_map.set(&node_cfg(routing, NODE_F_MASQUERADE)).map_err(e)?;
            let with_policy = p.name.contains("policy");
            let ctx = p.ifindex.map(skb_ctx);
            policy(with_policy)?;
            let (prog, name) = if p.lxc {
                (lxc.classifier(FROM_CONTAINER).map_err(e)?, FROM_CONTAINER)
            } else {
                (host.classifier(TO_NETDEV).map_err(e)?, TO_NETDEV)
            };
            let (r, t): (TcRun, f64) =
                time_run(prog, name, &p.packet, ctx.as_ref().map(|c| &c[..]), o.repeat)
                    .map_err(e)?;
            policy(false)?;
            if r.verdict != p.expect {
                return Err(format!("{}: verdict {}, expected {}", p.name, r.verdict, p.expect));
            }
            out.push(t);
        }
    }
    let med: Vec<f64> = ns.into_iter().map(ciliate_lab::bench::median).collect();
    println!(
        "[bench] ns per packet, BPF_PROG_TEST_RUN: median of {1} rounds of the mean of {0} runs, established TCP flows",
        o.repeat, o.runs
    );
    println!("{:<36} {:>8}", "PATH", "ns/pkt");
    for (p, t) in paths.iter().zip(&med) {
        println!("{:<36} {t:>8.1}", p.name);
    }
    let stage = |name: &str, with: usize, without: usize| {
        println!("{name:<36} {:>8.1}", med[with] - med[without]);
    };
    println!();
    println!("{:<36} {:>8}", "STAGE (difference of two paths)", "ns/pkt");
    println!("{:<36} {:>8.1}", "ARP responder (whole program)", med[0]);
    println!("{:<36} {:>8.1}", "conntrack x2 + local delivery", med[1]);
    stage("policy (egress + ingress lookups)", 2, 1);
    stage("services (LB lookup, DNAT)", 3, 1);
    stage("SNAT (masquerading)", 6, 5);
    stage("encapsulation (tail call, tunnel key)", 8, 7);
    Ok(())
}

fn main() {
    // The bench's own network namespace and bpffs: on a thread of its own,
    // so the process's main thread never leaves the root namespace.
    let r = std::thread::spawn(run).join().unwrap_or_else(|_| Err("the bench panicked".into()));
    if let Err(err) = r {
        eprintln!("ciliate-stage-bench: {err}");
        std::process::exit(1);
    }
}
