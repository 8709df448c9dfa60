//! `ciliate-accel-bench`: what the acceleration paths buy, side by side
//! with a direct veth pair (the ratio anchor) in the same run.
//!
//! 1. Socket-layer acceleration: pod → pod 1-byte TCP request/response,
//!    connection rate and throughput through Ciliate with and without
//!    `--sockops-enable` (client and server in the node's cgroup, pinned to
//!    one core), runs interleaved with the anchor's.
//! 2. The XDP prefilter against a flood from one CIDR: the external host
//!    sends 18-byte UDP datagrams (64-byte frames) to the node as fast as
//!    one core can, for a bounded time and count, pinned to core 1; the
//!    veth's receive side runs in the sender's softirq on that core, so
//!    datagrams per second is what one core does sending *and* dropping.
//!    Variants: the stack (a closed port, no filter), an iptables raw-table
//!    DROP for the CIDR (the host-firewall way), the prefilter denying it,
//!    and the prefilter attached with the CIDR not denied (what XDP costs
//!    traffic it lets through). Reports datagrams/s, ns per datagram and
//!    the share of the core the drop itself takes at that rate.
//!
//! 3. NodePort to a backend on another node, from the external host, two
//!    nodes in native routing: SNAT or DSR (`--node-port-mode dsr`: the
//!    replies leave the backend's node straight to the client), each
//!    translated by from-netdev (tc) or at XDP
//!    (`--node-port-acceleration native`), all labs with XDP on the
//!    underlay's ports so that only the node's path differs. Connections
//!    per second (connect, 1-byte request/response, close) and a flood of
//!    18-byte UDP datagrams to a NodePort whose backend port has no
//!    listener (the pod's stack drops them; bounded in time and count, one
//!    core): sent per second, delivered into the backend pod per second,
//!    and the machine's busy CPU time (both cores: the sender, both nodes,
//!    the pod's drop) per datagram delivered: the
//!    sending core is the limit, but how much of the path runs on it
//!    depends on where each veth queue's softirq was scheduled, so the
//!    rates alone can mislead.
//!
//! Everything runs in namespaces this program makes and removes (guards).
//!
//! ```text
//! ciliate-accel-bench [--runs N] [--seconds S] [--only sockops|prefilter|nodeport]
//! ```

use std::{net::Ipv4Addr, path::Path};

use ciliate_api::{
    client::method,
    models::{Prefilter, PrefilterSpec},
};
use ciliate_lab::{
    Netns, bench,
    cluster::{ClusterLab, ClusterLabConfig, node_ip as cluster_node_ip},
    names::token,
    netns::veth,
    node::{Binaries, ECHO_PORT, EXTERNAL_IP, NODE_IP, NodeLab, NodeLabConfig},
};

struct Opts {
    runs: usize,
    seconds: u64,
    /// One part only: "sockops", "prefilter" or "nodeport".
    only: Option<String>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { runs: 5, seconds: 2, only: None };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => o.runs = bench::positive(&mut it, "--runs", 20)? as usize,
            "--seconds" => o.seconds = bench::positive(&mut it, "--seconds", 30)?,
            "--only" => match it.next().map(String::as_str) {
                Some(p @ ("sockops" | "prefilter" | "nodeport")) => o.only = Some(p.into()),
                _ => return Err("--only takes sockops, prefilter or nodeport".into()),
            },
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: ciliate-accel-bench [--runs N] [--seconds S] [--only sockops|prefilter|nodeport]"
                ));
            }
        }
    }
    Ok(o)
}

fn sockops(o: &Opts, bins: &Binaries, tag: &str) -> Result<(), String> {
    let a = Netns::create(&format!("{tag}-a")).map_err(|e| e.to_string())?;
    let b = Netns::create(&format!("{tag}-b")).map_err(|e| e.to_string())?;
    veth(&a, "eth0", &b, "eth0").map_err(|e| e.to_string())?;
    a.add_address("eth0", Ipv4Addr::new(192, 0, 2, 1), 24).map_err(|e| e.to_string())?;
    b.add_address("eth0", Ipv4Addr::new(192, 0, 2, 2), 24).map_err(|e| e.to_string())?;
    bench::servers(&b, bins)?;
    let lab_for = |suffix: &str, args: &[&str]| -> Result<NodeLab, String> {
        let mut cfg = NodeLabConfig::new(&format!("{tag}{suffix}"), 2, bins.clone());
        cfg.agent_args = ["--enable-hubble", "false"].iter().chain(args).map(Into::into).collect();
        let lab = NodeLab::up(cfg).map_err(|e| e.to_string())?;
        bench::servers_in(&lab.pods[1].ns, bins, Some(&lab.cgroup))?;
        Ok(lab)
    };
    let plain = lab_for("p", &[])?;
    let accel = lab_for("s", &["--sockops-enable"])?;
    for ns in [&a, &plain.pods[0].ns, &accel.pods[0].ns] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(|e| e.to_string())?;
    }
    let ip = |l: &NodeLab| l.pods[1].state.ip.to_string();
    let (plain_ip, accel_ip) = (ip(&plain), ip(&accel));
    let variants: Vec<(&Netns, &str, Option<&Path>)> = vec![
        (&a, "192.0.2.2", None),
        (&plain.pods[0].ns, &plain_ip, Some(&plain.cgroup)),
        (&accel.pods[0].ns, &accel_ip, Some(&accel.cgroup)),
    ];
    println!(
        "[bench] pod -> pod TCP: {} runs of {}s per variant, interleaved; client and server on core 0",
        o.runs, o.seconds
    );
    let runs = bench::measure_all_in(&variants, bins, o.runs, o.seconds)?;
    let names = ["direct veth (anchor)", "ciliate pod->pod", "ciliate pod->pod, sockops"];
    let rows: Vec<(String, bench::Runs)> = names.iter().map(|n| n.to_string()).zip(runs).collect();
    bench::print_paired(&rows);
    let [rr, conn, tput] = bench::paired_ratios(&rows[2].1, &rows[1].1);
    println!(
        "sockops vs without (paired rounds): RR {rr:.3}x, connections {conn:.3}x, stream {tput:.3}x"
    );
    Ok(())
}

/// One flood from the external host: datagrams per second.
fn flood(lab: &NodeLab, bins: &Binaries, seconds: u64) -> Result<f64, String> {
    let echo = bins.echo.to_string_lossy();
    let to = format!("{NODE_IP}:9");
    let out = lab
        .external
        .exec(&["taskset", "-c", "1", &echo, "flood", &to, &seconds.to_string(), "100000000"])
        .map_err(|e| e.to_string())?;
    out.trim()
        .rsplit(' ')
        .next()
        .and_then(|r| r.trim_end_matches("/s").parse().ok())
        .ok_or_else(|| format!("flood output {out:?}"))
}

fn prefilter(lab: &NodeLab, add: bool, cidr: &str) -> Result<Prefilter, String> {
    let spec = PrefilterSpec { revision: 0, deny: vec![cidr.into()] };
    let m = if add { method::PATCH } else { method::DELETE };
    lab.client().call(m, "/v1/prefilter", Some(&spec)).map_err(|e| e.to_string())
}

fn dropped(p: &Prefilter, cidr: &str) -> u64 {
    p.status.counters.iter().find(|c| c.cidr == cidr).map_or(0, |c| c.packets)
}

fn prefilter_flood(o: &Opts, bins: &Binaries, tag: &str) -> Result<(), String> {
    let cidr = "192.168.200.96/28"; // holds the external host
    let plain = NodeLab::up(NodeLabConfig::new(&format!("{tag}n"), 0, bins.clone()))
        .map_err(|e| e.to_string())?;
    let mut cfg = NodeLabConfig::new(&format!("{tag}x"), 0, bins.clone());
    cfg.agent_args = vec!["--enable-xdp-prefilter".into()];
    let xdp = NodeLab::up(cfg).map_err(|e| e.to_string())?;
    println!();
    println!(
        "[bench] a flood from one CIDR ({EXTERNAL_IP} in {cidr}) to the node: 64-byte frames, \
         {} runs of {}s per variant, interleaved; sender and receive path on core 1",
        o.runs, o.seconds
    );
    let iptables = |add: bool| {
        let op = if add { "-I" } else { "-D" };
        plain
            .node
            .exec(&["iptables", "-t", "raw", op, "PREROUTING", "-s", cidr, "-j", "DROP"])
            .map_err(|e| e.to_string())
    };
    let names = [
        "stack, closed port (anchor)",
        "iptables raw DROP",
        "XDP prefilter DROP",
        "XDP prefilter, not denied",
    ];
    let mut pps: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut counted = 0u64;
    let mut sent_to_xdp = 0f64;
    for _ in 0..o.runs {
        pps[0].push(flood(&plain, bins, o.seconds)?);
        iptables(true)?;
        let r = flood(&plain, bins, o.seconds);
        iptables(false)?;
        pps[1].push(r?);
        let before = dropped(&prefilter(&xdp, true, cidr)?, cidr);
        let r = flood(&xdp, bins, o.seconds)?;
        let after = dropped(&xdp.client().get("/v1/prefilter").map_err(|e| e.to_string())?, cidr);
        prefilter(&xdp, false, cidr)?;
        counted += after.saturating_sub(before);
        sent_to_xdp += r * o.seconds as f64;
        pps[2].push(r);
        pps[3].push(flood(&xdp, bins, o.seconds)?);
    }
    println!("{:<30} {:>12} {:>7} {:>10}", "VARIANT", "datagrams/s", "ratio", "ns/dgram");
    let anchor = bench::median(pps[0].clone());
    for (name, runs) in names.iter().zip(&pps) {
        let m = bench::median(runs.clone());
        println!("{name:<30} {m:>12.0} {:>7.3} {:>10.0}", m / anchor, 1e9 / m);
    }
    let rate = bench::median(pps[2].clone());
    println!(
        "the prefilter counted {counted} drops of ~{sent_to_xdp:.0} datagrams sent while denied \
         ({:.1}%); per datagram, sending and dropping at XDP cost {:.0} ns of one core, the \
         stack {:.0} ns, iptables {:.0} ns",
        100.0 * counted as f64 / sent_to_xdp.max(1.0),
        1e9 / rate,
        1e9 / anchor,
        1e9 / bench::median(pps[1].clone())
    );
    let (hit, miss) = xdp_program_ns()?;
    println!(
        "xdp_entry alone (BPF_PROG_TEST_RUN, repeat 1,000,000): {hit:.1} ns a denied frame, \
         {miss:.1} ns a passed one; at the flood's {rate:.0}/s the program takes {:.1}% of a core",
        100.0 * hit * rate / 1e9
    );
    Ok(())
}

/// ns per run of the prefilter program on a frame from a denied CIDR and
/// on one it passes (1,000 denied CIDRs in the map), on a scratch node.
fn xdp_program_ns() -> Result<(f64, f64), String> {
    use ciliate_datapath::{
        nodemaps::PrefilterMaps,
        objects::programs::XDP_ENTRY,
        packet::{self, Eth, Ip4, L4},
        testrun::{ScratchNode, time_repeat, xdp_entry},
    };
    let e = |e: ciliate_datapath::DatapathError| e.to_string();
    let node = ScratchNode::new("accel-bench").map_err(e)?;
    let prog = xdp_entry(&node.pins).map_err(e)?;
    let mut maps = PrefilterMaps::from_pin_dir(&node.pins.dir).map_err(e)?;
    for i in 0..1000u32 {
        maps.insert(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24, i).map_err(e)?;
    }
    let frame = |src| {
        let eth = Eth { dst: [2, 0, 0, 0, 0, 1], src: [2, 0, 0, 0, 0, 2] };
        let l4 = L4::Udp { sport: 4000, dport: 9, payload: &[0x5a; 18] };
        packet::ipv4_frame(&eth, &Ip4::new(src, NODE_IP), &l4)
    };
    let time = |src| time_repeat(&prog, XDP_ENTRY, &frame(src), 1_000_000).map_err(e);
    let (hit, miss) = (time(Ipv4Addr::new(10, 0, 7, 9))?, time(EXTERNAL_IP)?);
    if (hit.0.verdict, miss.0.verdict) != (1, 2) {
        return Err(format!("xdp_entry: {} / {}, not drop / pass", hit.0.verdict, miss.0.verdict));
    }
    Ok((hit.1, miss.1))
}

/// The NodePort variants: name, agent flags.
const NODEPORT_VARIANTS: [(&str, &[&str]); 4] = [
    ("SNAT, tc (from-netdev)", &[]),
    ("SNAT, XDP (native)", &["--node-port-acceleration", "native"]),
    ("DSR, tc", &["--node-port-mode", "dsr"]),
    ("DSR, XDP", &["--node-port-mode", "dsr", "--node-port-acceleration", "native"]),
];

/// A port nothing listens on in the lab's pods.
const SINK_PORT: u16 = 9999;

/// A two-node lab in native routing with agent flags `args`, NodePort
/// 30080 (TCP and UDP) on node1 to the echo server of the pod on node2,
/// 30081 (UDP) to a port of that pod nothing listens on.
fn nodeport_lab(bins: &Binaries, name: &str, args: &[&str]) -> Result<ClusterLab, String> {
    let mut cfg = ClusterLabConfig::new(name, 2, 1, bins.clone());
    cfg.routing = "native".into();
    cfg.xdp_underlay = true;
    cfg.agent_args = args.iter().map(Into::into).collect();
    let lab = ClusterLab::up(cfg).map_err(|e| e.to_string())?;
    let backend = lab.pods[1].pod.state.ip;
    // 30081: UDP to a port nothing listens on, for the flood (the pod's
    // stack drops each datagram: what is measured is the way there, not
    // an echo server's work, which would depend on its queue).
    for (id, proto, port, to) in
        [(1, "TCP", 30080, ECHO_PORT), (2, "UDP", 30080, ECHO_PORT), (3, "UDP", 30081, SINK_PORT)]
    {
        let spec = serde_json::json!({
            "id": id, "frontend": {"ip": "0.0.0.0", "port": port, "protocol": proto},
            "kind": "NodePort", "backends": [{"ip": backend, "port": to, "protocol": proto}],
        });
        let _: serde_json::Value = lab.nodes[0]
            .client()
            .call(method::PUT, "/v1/service", Some(&spec))
            .map_err(|e| e.to_string())?;
    }
    ciliate_lab::node::wait_listening(&lab.pods[1].pod.ns, ECHO_PORT).map_err(|e| e.to_string())?;
    lab.external.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(|e| e.to_string())?;
    Ok(lab)
}

/// The drop counters (reason, direction: packets) of both nodes of `lab`,
/// to say why a run failed.
fn drops(lab: &ClusterLab) -> String {
    let mut out = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let Ok(m) = ciliate_datapath::maps::MetricsMap::from_pin_dir(&n.pins_dir) else { continue };
        for (k, v) in m.dump().unwrap_or_default() {
            if k.reason != ciliate_common::metrics::REASON_FORWARDED {
                out.push(format!("node{} reason {} dir {}: {}", i + 1, k.reason, k.dir, v.packets));
            }
        }
    }
    // What the kernel counted that Ciliate does not: veth XDP errors on
    // the nodes' devices, and the external host's TCP trouble.
    for (i, n) in lab.nodes.iter().enumerate() {
        if let Ok(st) = n.ns.exec(&["ethtool", "-S", "eth0"]) {
            for l in st.lines().map(str::trim) {
                if (l.contains("err") || l.contains("drop")) && !l.ends_with(": 0") {
                    out.push(format!("node{} eth0 {l}", i + 1));
                }
            }
        }
    }
    if let Ok(st) = lab.external.exec(&["nstat", "-az"]) {
        for l in st.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let interesting = ["Err", "Drop", "PAWS", "Retrans", "TW", "Challenge", "Reset"];
            if f.len() >= 2 && f[1] != "0" && interesting.iter().any(|k| f[0].contains(k)) {
                out.push(format!("external {} {}", f[0], f[1]));
            }
        }
    }
    out.join(", ")
}

/// Packets node `n` of `lab` forwarded into its pods so far.
fn delivered(lab: &ClusterLab, n: usize) -> Result<u64, String> {
    let m = ciliate_datapath::maps::MetricsMap::from_pin_dir(&lab.nodes[n].pins_dir)
        .map_err(|e| e.to_string())?;
    let v = m.get(0, ciliate_common::metrics::DIR_INGRESS).map_err(|e| e.to_string())?;
    Ok(v.packets)
}

fn nodeport(o: &Opts, bins: &Binaries, tag: &str) -> Result<(), String> {
    let labs = NODEPORT_VARIANTS
        .iter()
        .enumerate()
        .map(|(i, (_, args))| nodeport_lab(bins, &format!("{tag}n{i}"), args))
        .collect::<Result<Vec<_>, _>>()?;
    println!();
    println!(
        "[bench] NodePort from the external host to a backend on the other node (native routing): \
         {} runs of {}s per variant, interleaved",
        o.runs, o.seconds
    );
    let echo = bins.echo.to_string_lossy().into_owned();
    let to = format!("{}:30080", cluster_node_ip(1));
    let sink = format!("{}:30081", cluster_node_ip(1));
    let secs = o.seconds.to_string();
    let mut rows = vec![[Vec::new(), Vec::new(), Vec::new(), Vec::new()]; labs.len()];
    for _ in 0..o.runs {
        for ((lab, row), (name, _)) in labs.iter().zip(&mut rows).zip(NODEPORT_VARIANTS) {
            let out = lab
                .external
                .exec(&["taskset", "-c", "1", &echo, "crr", &to, &secs])
                .map_err(|e| format!("{name}: {e}; drops: {}", drops(lab)))?;
            row[0].push(out.trim().trim_end_matches("/s").parse().unwrap_or(0.0));
            let before = delivered(lab, 1)?;
            let cpu = bench::busy_cpu_seconds()?;
            let out = lab
                .external
                .exec(&["taskset", "-c", "1", &echo, "flood", &sink, &secs, "100000000"])
                .map_err(|e| format!("{name}: {e}"))?;
            // The backend's node finishes what is in flight.
            std::thread::sleep(std::time::Duration::from_millis(200));
            let cpu = bench::busy_cpu_seconds()? - cpu;
            let got = delivered(lab, 1)?.saturating_sub(before) as f64 / o.seconds as f64;
            let sent: f64 = out
                .trim()
                .rsplit(' ')
                .next()
                .and_then(|r| r.trim_end_matches("/s").parse().ok())
                .unwrap_or(0.0);
            row[1].push(sent);
            row[2].push(got);
            // Both cores' busy time (sender, both nodes, the pod, the
            // replies) per datagram delivered, in ns.
            row[3].push(cpu * 1e9 / (got * o.seconds as f64).max(1.0));
        }
    }
    println!(
        "{:<28} {:>8} {:>7} {:>13} {:>7} {:>13} {:>7} {:>10} {:>7}",
        "VARIANT",
        "CONN/s",
        "ratio",
        "sent dgram/s",
        "ratio",
        "delivered/s",
        "ratio",
        "CPU ns/dg",
        "ratio"
    );
    let anchor: Vec<f64> = rows[0].iter().map(|v| bench::median(v.clone())).collect();
    for ((name, _), row) in NODEPORT_VARIANTS.iter().zip(&rows) {
        let m: Vec<f64> = row.iter().map(|v| bench::median(v.clone())).collect();
        println!(
            "{name:<28} {:>8.0} {:>7.3} {:>13.0} {:>7.3} {:>13.0} {:>7.3} {:>10.0} {:>7.3}",
            m[0],
            m[0] / anchor[0],
            m[1],
            m[1] / anchor[1],
            m[2],
            m[2] / anchor[2],
            m[3],
            m[3] / anchor[3]
        );
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let o = parse_opts()?;
    let bins = Binaries::beside_current_exe().map_err(|e| e.to_string())?;
    let tag = format!("cab{}", token());
    let part = |p: &str| o.only.as_deref().is_none_or(|only| only == p);
    if part("sockops") {
        sockops(&o, &bins, &tag)?;
    }
    if part("prefilter") {
        prefilter_flood(&o, &bins, &tag)?;
    }
    if part("nodeport") {
        nodeport(&o, &bins, &tag)?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-accel-bench: {e}");
        std::process::exit(1);
    }
}
