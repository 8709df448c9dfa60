//! `ciliate-cluster-bench`: pod → pod across two nodes, side by side:
//! - two namespaces on a direct veth pair (the ratio anchor);
//! - plain routing: pods behind two router namespaces on an underlay
//!   bridge, each routing the other's pod subnet via the other (no BPF);
//! - plain VXLAN: the same with a VXLAN device between the routers (no
//!   BPF, pods' MTU 1450);
//! - Ciliate in tunnel mode and in native routing (the two-node lab).
//!
//! Request/response rate and connection rate (client and server pinned to
//! core 0) and iperf3 throughput, every variant up at once and the runs
//! interleaved; medians, and ratios paired by round (to the anchor, and
//! Ciliate to its plain counterpart).
//!
//! ```text
//! ciliate-cluster-bench [--runs N] [--seconds S]
//! ```

use ciliate_lab::{
    Netns,
    bench::{self, servers},
    cluster::{ClusterLab, ClusterLabConfig},
    names::token,
    netns::veth,
    node::Binaries,
};

fn e<T: std::fmt::Display>(x: T) -> String {
    x.to_string()
}

fn ip(ns: &Netns, args: &[&str]) -> Result<(), String> {
    ns.ip(args).map(drop).map_err(e)
}

/// Two pods behind two routers on an underlay bridge, without BPF; with
/// `vxlan` the routers reach each other's pods through a VXLAN device.
struct Plain {
    client: Netns,
    _server: Netns,
    _routers: [Netns; 2],
    _underlay: Netns,
}

fn plain(tag: &str, vxlan: bool, bins: &Binaries) -> Result<Plain, String> {
    let underlay = Netns::create(&format!("{tag}-u")).map_err(e)?;
    ip(&underlay, &["link", "add", "br0", "address", "02:00:00:00:00:01", "type", "bridge"])?;
    ip(&underlay, &["link", "set", "br0", "up"])?;
    let routers = [
        Netns::create(&format!("{tag}-r1")).map_err(e)?,
        Netns::create(&format!("{tag}-r2")).map_err(e)?,
    ];
    let pods = [
        Netns::create(&format!("{tag}-p1")).map_err(e)?,
        Netns::create(&format!("{tag}-p2")).map_err(e)?,
    ];
    let mtu = if vxlan { "1450" } else { "1500" };
    for i in 0..2 {
        let (r, p) = (&routers[i], &pods[i]);
        let n = i + 1;
        let other = 3 - n;
        veth(r, "eth0", &underlay, &format!("u{n}")).map_err(e)?;
        ip(&underlay, &["link", "set", &format!("u{n}"), "master", "br0"])?;
        ip(r, &["addr", "add", &format!("192.168.210.{n}/24"), "dev", "eth0"])?;
        r.sysctl("net.ipv4.ip_forward", "1").map_err(e)?;
        veth(p, "eth0", r, "pod").map_err(e)?;
        ip(p, &["link", "set", "eth0", "mtu", mtu])?;
        ip(r, &["addr", "add", &format!("10.201.{n}.1/24"), "dev", "pod"])?;
        ip(p, &["addr", "add", &format!("10.201.{n}.2/24"), "dev", "eth0"])?;
        ip(p, &["route", "add", "default", "via", &format!("10.201.{n}.1")])?;
        let remote = format!("10.201.{other}.0/24");
        if vxlan {
            let local = format!("192.168.210.{n}");
            let peer = format!("192.168.210.{other}");
            ip(
                r,
                &[
                    "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "8472", "local",
                    &local, "remote", &peer, "dev", "eth0",
                ],
            )?;
            ip(r, &["addr", "add", &format!("10.99.0.{n}/24"), "dev", "vx0"])?;
            ip(r, &["link", "set", "vx0", "up"])?;
            ip(r, &["route", "add", &remote, "via", &format!("10.99.0.{other}")])?;
        } else {
            ip(r, &["route", "add", &remote, "via", &format!("192.168.210.{other}")])?;
        }
    }
    let [client, server] = pods;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
    servers(&server, bins)?;
    Ok(Plain { client, _server: server, _routers: routers, _underlay: underlay })
}

fn cluster(tag: &str, routing: &str, bins: &Binaries) -> Result<ClusterLab, String> {
    let mut cfg = ClusterLabConfig::new(tag, 2, 1, bins.clone());
    cfg.routing = routing.into();
    let lab = ClusterLab::up(cfg).map_err(e)?;
    lab.pods[0].pod.ns.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
    servers(&lab.pods[1].pod.ns, bins)?;
    Ok(lab)
}

fn run() -> Result<(), String> {
    let (mut runs, mut seconds) = (3usize, 2u64);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().and_then(|v| v.parse::<u64>().ok()).filter(|v| *v > 0);
        match (a.as_str(), v) {
            ("--runs", Some(v)) => runs = v.min(20) as usize,
            ("--seconds", Some(v)) => seconds = v.min(30),
            _ => return Err("usage: ciliate-cluster-bench [--runs N] [--seconds S]".into()),
        }
    }
    let bins = Binaries::beside_current_exe().map_err(e)?;
    let tag = format!("ccb{}", token());
    println!(
        "[cluster-bench] {runs} runs of {seconds}s per variant, interleaved, medians; RR and connections pinned to core 0"
    );
    // Everything up at once, runs interleaved (run 1 of each variant, then
    // run 2 ...), ratios paired with the anchor's run of the same round.
    let a = Netns::create(&format!("{tag}-a")).map_err(e)?;
    let b = Netns::create(&format!("{tag}-b")).map_err(e)?;
    veth(&a, "eth0", &b, "eth0").map_err(e)?;
    ip(&a, &["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
    ip(&b, &["addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
    a.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
    servers(&b, &bins)?;
    let routed = plain(&format!("{tag}r"), false, &bins)?;
    let vxlan = plain(&format!("{tag}x"), true, &bins)?;
    let native = cluster(&format!("{tag}n"), "native", &bins)?;
    let tunnel = cluster(&format!("{tag}t"), "tunnel", &bins)?;
    let (native_ip, tunnel_ip) =
        (native.pods[1].pod.state.ip.to_string(), tunnel.pods[1].pod.state.ip.to_string());
    let variants: [(&str, &Netns, &str); 5] = [
        ("direct veth (anchor)", &a, "192.0.2.2"),
        ("plain routing", &routed.client, "10.201.2.2"),
        ("plain VXLAN", &vxlan.client, "10.201.2.2"),
        ("ciliate native", &native.pods[0].pod.ns, &native_ip),
        ("ciliate tunnel", &tunnel.pods[0].pod.ns, &tunnel_ip),
    ];
    println!("[cluster-bench] measuring, interleaved: {}", variants.map(|v| v.0).join(", "));
    let pairs: Vec<(&Netns, &str)> = variants.iter().map(|(_, c, s)| (*c, *s)).collect();
    let runs = bench::measure_all(&pairs, &bins, runs, seconds)?;
    let rows: Vec<(String, bench::Runs)> =
        variants.iter().map(|v| v.0.to_owned()).zip(runs).collect();
    println!();
    bench::print_paired(&rows);
    let ratio = |x: usize, base: usize| bench::paired_ratios(&rows[x].1, &rows[base].1);
    let [n, t] = [ratio(3, 1), ratio(4, 2)];
    println!();
    println!(
        "ciliate native / plain routing: RR {:.3}, conn {:.3}, Gbit {:.3}; \
         ciliate tunnel / plain VXLAN: RR {:.3}, conn {:.3}, Gbit {:.3} (paired by round)",
        n[0], n[1], n[2], t[0], t[1], t[2]
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-cluster-bench: {e}");
        std::process::exit(1);
    }
}
