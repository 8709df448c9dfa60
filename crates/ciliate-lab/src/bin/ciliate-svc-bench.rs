//! `ciliate-svc-bench`: the cost of reaching a service as the number of
//! services grows, side by side:
//! - Ciliate, socket LB (client in the lab's cgroup) and per-packet LB
//!   (client outside it), services created through the agent's API;
//! - kube-proxy-shaped iptables (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-*
//!   with DNAT, as kube-proxy writes them) in a router namespace;
//! - kube-proxy-shaped nftables (the `service-ips` verdict map, per-service
//!   and per-endpoint chains of kube-proxy's nftables mode);
//!
//! each with 10, 1,000 and 10,000 services present (the client reaches the
//! last one created), plus the time to add one more service. Every number
//! is also printed as a ratio to two namespaces on a direct veth pair
//! measured in the same run. Client and server are pinned to core 0;
//! several runs each, median reported. Everything runs in namespaces this
//! program makes and removes (guards); no rule is ever written outside them.
//!
//! ```text
//! ciliate-svc-bench [--runs N] [--seconds S] [--counts 10,1000,10000]
//! ```

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ciliate_api::{
    client::method,
    models::{BackendSpec, BackendState, Service, ServiceKind, ServiceSpec},
};
use ciliate_lab::{
    Netns,
    bench::rss_mib,
    names::token,
    netns::veth,
    node::{Binaries, NodeLab, NodeLabConfig, in_cgroup, wait_listening},
};

const PORT: u16 = 9000;
const SERVER: &str = "203.0.113.2";

struct Opts {
    runs: usize,
    seconds: u64,
    counts: Vec<usize>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { runs: 3, seconds: 2, counts: vec![10, 1000, 10000] };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let usage = "usage: ciliate-svc-bench [--runs N] [--seconds S] [--counts 10,1000,10000]";
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| format!("{a} needs a value; {usage}"))?;
        let num = |s: &str| s.parse::<u64>().ok().filter(|n| *n > 0);
        match a.as_str() {
            "--runs" => o.runs = num(v).ok_or("--runs: a positive number")?.min(20) as usize,
            "--seconds" => o.seconds = num(v).ok_or("--seconds: a positive number")?.min(30),
            "--counts" => {
                o.counts = v
                    .split(',')
                    .map(|c| num(c).map(|n| n.min(60000) as usize))
                    .collect::<Option<_>>()
                    .ok_or("--counts: positive numbers separated by commas")?
            }
            other => return Err(format!("unknown argument {other}; {usage}")),
        }
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn per_second(out: &str) -> f64 {
    out.trim().trim_end_matches("/s").parse().unwrap_or(0.0)
}

fn e<T: std::fmt::Display>(x: T) -> String {
    x.to_string()
}

/// The address of service `i` (0-based): 10.96.0.1, 10.96.0.2, ...
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Request/response and connection rates from `client` (a command maker)
/// to `target`: medians over the runs.
fn measure(
    o: &Opts,
    target: &str,
    client: &dyn Fn(&[&str]) -> Command,
) -> Result<(f64, f64), String> {
    let secs = o.seconds.to_string();
    let (mut rr, mut crr) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        for (mode, out) in [("rr", &mut rr), ("crr", &mut crr)] {
            let mut cmd = client(&[mode, target, &secs]);
            let r = cmd.stdin(Stdio::null()).output().map_err(e)?;
            if !r.status.success() {
                return Err(format!(
                    "{mode} to {target}: {}",
                    String::from_utf8_lossy(&r.stderr).trim()
                ));
            }
            out.push(per_second(&String::from_utf8_lossy(&r.stdout)));
        }
    }
    Ok((median(rr), median(crr)))
}

/// `taskset -c 0 ciliate-echo <args>` in `ns`.
fn echo_in(ns: &Netns, bins: &Binaries, args: &[&str]) -> Command {
    let mut c = ns.command("taskset");
    c.args(["-c", "0"]).arg(&bins.echo).args(args);
    c
}

fn echo_server(ns: &Netns, bins: &Binaries) -> Result<(), String> {
    let echo = bins.echo.to_string_lossy();
    drop(ns.spawn_detached(&["taskset", "-c", "0", &echo, "serve", &PORT.to_string()]).map_err(e)?);
    wait_listening(ns, PORT).map_err(e)
}

/// Run `program args` in `ns` with `input` on stdin; the time it took.
fn feed(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let mut cmd = ns.command(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(e)?;
    child.stdin.take().ok_or("no stdin")?.write_all(input.as_bytes()).map_err(e)?;
    let out = child.wait_with_output().map_err(e)?;
    if !out.status.success() {
        return Err(format!(
            "{program} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(start.elapsed())
}

/// Client, router (where the rules live) and server namespaces: the
/// client's default route goes through the router to the server.
struct Routed {
    client: Netns,
    router: Netns,
    _server: Netns,
}

fn routed(tag: &str, bins: &Binaries) -> Result<Routed, String> {
    let client = Netns::create(&format!("{tag}-c")).map_err(e)?;
    let router = Netns::create(&format!("{tag}-r")).map_err(e)?;
    let server = Netns::create(&format!("{tag}-d")).map_err(e)?;
    veth(&client, "eth0", &router, "vc").map_err(e)?;
    veth(&server, "eth0", &router, "vd").map_err(e)?;
    router.sysctl("net.ipv4.ip_forward", "1").map_err(e)?;
    for (ns, args) in [
        (&router, vec!["addr", "add", "198.51.100.1/24", "dev", "vc"]),
        (&router, vec!["addr", "add", "203.0.113.1/24", "dev", "vd"]),
        (&client, vec!["addr", "add", "198.51.100.2/24", "dev", "eth0"]),
        (&client, vec!["route", "add", "default", "via", "198.51.100.1"]),
        (&server, vec!["addr", "add", "203.0.113.2/24", "dev", "eth0"]),
        (&server, vec!["route", "add", "default", "via", "203.0.113.1"]),
    ] {
        ns.ip(&args).map_err(e)?;
    }
    client.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
    echo_server(&server, bins)?;
    Ok(Routed { client, router, _server: server })
}

/// kube-proxy's chain-name hash, shortened: 16 hex digits of the service.
fn chain_id(i: usize) -> String {
    let h = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{:016X}", h)
}

fn iptables_service_rule(i: usize) -> String {
    format!(
        "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/svc{i}:http cluster IP\" \
         -m tcp --dport 80 -j KUBE-SVC-{}\n",
        vip(i),
        chain_id(i)
    )
}

fn iptables_service_chains(i: usize) -> (String, String) {
    let id = chain_id(i);
    let decl = format!(":KUBE-SVC-{id} - [0:0]\n:KUBE-SEP-{id} - [0:0]\n");
    let rules = format!(
        "-A KUBE-SVC-{id} -m comment --comment \"default/svc{i}:http -> {SERVER}:{PORT}\" -j KUBE-SEP-{id}\n\
         -A KUBE-SEP-{id} -s {SERVER}/32 -m comment --comment \"default/svc{i}:http\" -j KUBE-MARK-MASQ\n\
         -A KUBE-SEP-{id} -p tcp -m comment --comment \"default/svc{i}:http\" -m tcp -j DNAT --to-destination {SERVER}:{PORT}\n"
    );
    (decl, rules)
}

/// The nat table kube-proxy (iptables mode) writes for `n` services.
fn iptables_ruleset(n: usize) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::new();
    for i in 0..n {
        let (decl, r) = iptables_service_chains(i);
        s.push_str(&decl);
        rules.push_str(&r);
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    for i in 0..n {
        s.push_str(&iptables_service_rule(i));
    }
    s.push_str(&rules);
    s.push_str("COMMIT\n");
    s
}

/// What kube-proxy restores to add service `n` to `n` existing ones: the
/// whole KUBE-SERVICES chain again plus the new service's chains.
fn iptables_add_one(n: usize) -> String {
    let (decl, rules) = iptables_service_chains(n);
    let mut s = format!("*nat\n:KUBE-SERVICES - [0:0]\n{decl}");
    for i in 0..=n {
        s.push_str(&iptables_service_rule(i));
    }
    s.push_str(&rules);
    s.push_str("COMMIT\n");
    s
}

fn nft_service(i: usize) -> (String, String) {
    let id = chain_id(i);
    let chains = format!(
        "  chain service-{id} {{\n    numgen random mod 1 vmap {{ 0 : goto endpoint-{id} }}\n  }}\n\
         \x20 chain endpoint-{id} {{\n    ip saddr {SERVER} jump mark-for-masquerade\n    \
         meta l4proto tcp dnat to {SERVER}:{PORT}\n  }}\n"
    );
    let element = format!("{} . tcp . 80 : goto service-{id}", vip(i));
    (chains, element)
}

/// The table kube-proxy (nftables mode) writes for `n` services.
fn nft_ruleset(n: usize) -> String {
    let mut s = String::from(
        "table ip kube-proxy {\n\
         \x20 chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n",
    );
    let mut elements = Vec::new();
    for i in 0..n {
        let (c, el) = nft_service(i);
        s.push_str(&c);
        elements.push(el);
    }
    let _ = write!(
        s,
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {} }}\n  }}\n\
         \x20 chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
         \x20 chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
         }}\n",
        elements.join(", ")
    );
    s
}

fn nft_add_one(n: usize) -> String {
    let (c, el) = nft_service(n);
    format!("table ip kube-proxy {{\n{c}}}\nadd element ip kube-proxy service-ips {{ {el} }}\n")
}

struct Row {
    variant: String,
    services: usize,
    rr: f64,
    crr: f64,
    add_ms: f64,
}

fn spec(i: usize, backend: Ipv4Addr) -> ServiceSpec {
    ServiceSpec {
        id: i as u16 + 1,
        frontend: format!("{}:80/TCP", vip(i)).parse().expect("valid"),
        kind: ServiceKind::ClusterIP,
        backends: vec![BackendSpec { ip: backend, port: PORT, state: BackendState::Active }],
        affinity_timeout: None,
        traffic_policy_local: false,
        source_ranges: vec![],
        algorithm: None,
        name: format!("default/svc{i}"),
        source: Default::default(),
    }
}

fn run() -> Result<(), String> {
    let o = parse_opts()?;
    let bins = Binaries::beside_current_exe().map_err(e)?;
    let tag = format!("csb{}", token());
    println!(
        "[svc-bench] {} runs of {}s per variant, median; client and server on core 0; services: {:?}",
        o.runs, o.seconds, o.counts
    );

    // The anchor: two namespaces on a direct veth pair.
    let a = Netns::create(&format!("{tag}-a")).map_err(e)?;
    let b = Netns::create(&format!("{tag}-b")).map_err(e)?;
    veth(&a, "eth0", &b, "eth0").map_err(e)?;
    a.add_address("eth0", Ipv4Addr::new(192, 0, 2, 1), 24).map_err(e)?;
    b.add_address("eth0", Ipv4Addr::new(192, 0, 2, 2), 24).map_err(e)?;
    a.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
    echo_server(&b, &bins)?;
    println!("[svc-bench] measuring the anchor (direct veth)");
    let anchor = measure(&o, &format!("192.0.2.2:{PORT}"), &|args| echo_in(&a, &bins, args))?;

    let mut rows = Vec::new();
    for &n in &o.counts {
        // Fresh namespaces, maps and kernel conntrack for every count, so
        // what earlier runs left behind does not weigh on later ones.
        let t = format!("{tag}{n}");
        let target = format!("{}:80", vip(n - 1));

        // Ciliate: n services created through the API.
        println!("[svc-bench] {n} services: Ciliate (creating them through the API)");
        let lab = NodeLab::up(NodeLabConfig::new(&t, 2, bins.clone())).map_err(e)?;
        let (client, server) = (&lab.pods[0], &lab.pods[1]);
        client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(e)?;
        echo_server(&server.ns, &bins)?;
        let put = |i: usize| {
            lab.client()
                .call::<Service>(method::PUT, "/v1/service", Some(&spec(i, server.state.ip)))
                .map_err(e)
        };
        let start = Instant::now();
        for i in 0..n {
            put(i)?;
        }
        let per = start.elapsed().as_secs_f64() * 1000.0 / n as f64;
        // Adding one more: median of 5 (add, then delete again).
        let mut adds = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            put(n)?;
            adds.push(t0.elapsed().as_secs_f64() * 1000.0);
            lab.client()
                .call::<Service>(method::DELETE, &format!("/v1/service/{}", n + 1), None::<&()>)
                .map_err(e)?;
        }
        let add_ms = median(adds);
        let rss = lab.agent_pids().first().map(|p| rss_mib(*p)).unwrap_or(0.0);
        println!("[svc-bench]   {per:.2} ms per service created; agent RSS {rss:.1} MiB");
        let sock = |args: &[&str]| {
            let mut c = echo_in(&client.ns, &bins, args);
            in_cgroup(&mut c, &lab.cgroup);
            c
        };
        let (rr, crr) = measure(&o, &target, &sock)?;
        rows.push(Row { variant: "ciliate socket LB".into(), services: n, rr, crr, add_ms });
        let tc = |args: &[&str]| echo_in(&client.ns, &bins, args);
        let (rr, crr) = measure(&o, &target, &tc)?;
        rows.push(Row { variant: "ciliate tc LB".into(), services: n, rr, crr, add_ms });
        drop(lab);

        // iptables, as kube-proxy writes it.
        println!("[svc-bench] {n} services: kube-proxy iptables");
        let ipt = routed(&format!("{t}i"), &bins)?;
        let load = feed(&ipt.router, "iptables-restore", &[], &iptables_ruleset(n))?;
        let add = feed(&ipt.router, "iptables-restore", &["--noflush"], &iptables_add_one(n))?;
        println!("[svc-bench]   full restore {:.0} ms", load.as_secs_f64() * 1000.0);
        let (rr, crr) = measure(&o, &target, &|args| echo_in(&ipt.client, &bins, args))?;
        let add_ms = add.as_secs_f64() * 1000.0;
        rows.push(Row { variant: "kube-proxy iptables".into(), services: n, rr, crr, add_ms });
        drop(ipt);

        // nftables, as kube-proxy's nftables mode writes it.
        println!("[svc-bench] {n} services: kube-proxy nftables");
        let nft = routed(&format!("{t}n"), &bins)?;
        let load = feed(&nft.router, "nft", &["-f", "-"], &nft_ruleset(n))?;
        let add = feed(&nft.router, "nft", &["-f", "-"], &nft_add_one(n))?;
        println!("[svc-bench]   full load {:.0} ms", load.as_secs_f64() * 1000.0);
        let (rr, crr) = measure(&o, &target, &|args| echo_in(&nft.client, &bins, args))?;
        let add_ms = add.as_secs_f64() * 1000.0;
        rows.push(Row { variant: "kube-proxy nftables".into(), services: n, rr, crr, add_ms });
    }

    println!();
    println!(
        "{:<22} {:>9} {:>10} {:>7} {:>10} {:>7} {:>14}",
        "VARIANT", "SERVICES", "RR/s", "ratio", "CONN/s", "ratio", "ADD ONE (ms)"
    );
    println!(
        "{:<22} {:>9} {:>10.0} {:>7.3} {:>10.0} {:>7.3} {:>14}",
        "direct veth (anchor)", "-", anchor.0, 1.0, anchor.1, 1.0, "-"
    );
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|x, y| x.variant.cmp(&y.variant).then(x.services.cmp(&y.services)));
    for r in sorted {
        println!(
            "{:<22} {:>9} {:>10.0} {:>7.3} {:>10.0} {:>7.3} {:>14.2}",
            r.variant,
            r.services,
            r.rr,
            r.rr / anchor.0,
            r.crr,
            r.crr / anchor.1,
            r.add_ms
        );
    }
    println!();
    println!(
        "Cost vs number of services (connection rate at the largest count / at the smallest):"
    );
    for v in ["ciliate socket LB", "ciliate tc LB", "kube-proxy iptables", "kube-proxy nftables"] {
        let of = |n: usize| rows.iter().find(|r| r.variant == v && r.services == n).map(|r| r.crr);
        let (lo, hi) = (o.counts.iter().min(), o.counts.iter().max());
        if let (Some(lo), Some(hi)) = (lo.and_then(|n| of(*n)), hi.and_then(|n| of(*n))) {
            println!("  {v:<22} {:.3}", hi / lo);
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-svc-bench: {e}");
        std::process::exit(1);
    }
}
