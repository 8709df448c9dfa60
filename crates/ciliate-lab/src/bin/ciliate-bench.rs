//! `ciliate-bench`: pod → pod cost of the Ciliate datapath, measured side
//! by side with two namespaces on a direct veth pair (the ratio anchor) and
//! two namespaces routed through a third by the kernel, with the flow
//! observer and one follower on and off, plus the latency of a CNI ADD. Every variant runs in namespaces this program makes and
//! removes (guards), with client and server pinned to one core (taskset),
//! several runs each, median reported.
//!
//! ```text
//! ciliate-bench [--runs N] [--seconds S] [--adds N]
//! ```

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ciliate_lab::{
    Netns, bench,
    bench::servers,
    names::token,
    netns::veth,
    node::{Binaries, NodeLab, NodeLabConfig},
};

struct Opts {
    runs: usize,
    seconds: u64,
    adds: usize,
    policy_endpoints: usize,
    /// Another build's binaries (ciliate-agent, ciliate-cni, ciliate-echo):
    /// pod -> pod through it too, in the same rounds.
    baseline: Option<std::path::PathBuf>,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { runs: 7, seconds: 2, adds: 30, policy_endpoints: 100, baseline: None };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => o.runs = bench::positive(&mut it, "--runs", 20)? as usize,
            "--seconds" => o.seconds = bench::positive(&mut it, "--seconds", 30)?,
            "--adds" => o.adds = bench::positive(&mut it, "--adds", 200)? as usize,
            "--baseline-bins" => {
                o.baseline = Some(it.next().ok_or("--baseline-bins takes a directory")?.into());
            }
            "--policy-endpoints" => {
                o.policy_endpoints = bench::positive(&mut it, "--policy-endpoints", 250)? as usize
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: ciliate-bench [--runs N] [--seconds S] [--adds N] [--policy-endpoints N] [--baseline-bins DIR]"
                ));
            }
        }
    }
    Ok(o)
}

/// One measured variant: client namespace, server address.
struct Variant<'a> {
    name: &'static str,
    client: &'a Netns,
    server_ip: String,
}

fn cni_add_latency(lab: &NodeLab, n: usize) -> Result<(f64, f64), String> {
    let conf = lab.cni_config(&[("app", "bench")]);
    let mut times = Vec::new();
    let mut nss = Vec::new();
    for i in 0..n {
        let ns = Netns::create(&format!("{}-pod{}", lab.config.lab, 100 + i))
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        let (out, ok) = lab
            .cni("ADD", ns.name(), &ns.path().display().to_string(), &conf)
            .map_err(|e| e.to_string())?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            return Err(format!("CNI ADD failed: {out}"));
        }
        nss.push(ns);
    }
    for ns in &nss {
        let _ = lab.cni("DEL", ns.name(), &ns.path().display().to_string(), &conf);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
    Ok((pct(0.5), pct(0.99)))
}

/// The agent's resident memory (MiB) and the time from a kill -9 to its
/// successor answering the API (ms, restore included).
fn agent_footprint(lab: &NodeLab) -> Result<(f64, f64), String> {
    let agent = *lab.agent_pids().first().ok_or("no agent process in the node")?;
    let status =
        std::fs::read_to_string(format!("/proc/{agent}/status")).map_err(|e| e.to_string())?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("no VmRSS")?;
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    while std::path::Path::new(&format!("/proc/{agent}/status")).exists()
        && std::fs::read_to_string(format!("/proc/{agent}/stat")).is_ok_and(|s| !s.contains(") Z"))
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    lab.start_agent().map_err(|e| e.to_string())?;
    Ok((kib / 1024.0, start.elapsed().as_secs_f64() * 1000.0))
}

/// Time from `PUT /v1/policy` to every endpoint's map written (the call
/// returns when they are), with `n` endpoints selected.
fn policy_import_latency(bins: &Binaries, n: usize) -> Result<(f64, usize), String> {
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cbn{}", token()), n, bins.clone()))
        .map_err(|e| e.to_string())?;
    let text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: all}\n\
                spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
                \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}, {port: \"8000\", endPort: 8100, protocol: TCP}]}]\n";
    let start = Instant::now();
    lab.client()
        .call::<serde_json::Value>(
            ciliate_api::client::method::PUT,
            "/v1/policy",
            Some(&ciliate_api::models::PolicyImport { text: text.into() }),
        )
        .map_err(|e| e.to_string())?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let entries = ciliate_datapath::maps::PolicyMap::from_pin_dir(&lab.pins_dir)
        .and_then(|m| m.dump())
        .map_err(|e| e.to_string())?
        .len();
    Ok((ms, entries))
}

/// Time of `PUT /v1/policy` for one policy naming `n` CIDRs (distinct /32s
/// outside the cluster, egress of one pod), for each `n` of `counts` from
/// none, then (last, as n = 0) of deleting the largest (its CIDR
/// identities and ipcache entries go).
fn cidr_import_latency(bins: &Binaries, counts: &[usize]) -> Result<Vec<(usize, f64)>, String> {
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cbc{}", token()), 1, bins.clone()))
        .map_err(|e| e.to_string())?;
    let call = |m: &str, target: &str, text: Option<String>| -> Result<f64, String> {
        let start = Instant::now();
        lab.client()
            .call::<serde_json::Value>(
                m,
                target,
                text.map(|text| ciliate_api::models::PolicyImport { text }).as_ref(),
            )
            .map_err(|e| e.to_string())?;
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    };
    let (mut out, mut del) = (Vec::new(), 0.0);
    for &n in counts {
        let cidrs: Vec<String> = (0..n)
            .map(|i| format!("\"{}/32\"", std::net::Ipv4Addr::from(0xac10_0000u32 + i as u32)))
            .collect();
        let text = format!(
            "{{\"apiVersion\": \"cilium.io/v2\", \"kind\": \"CiliumNetworkPolicy\", \
             \"metadata\": {{\"name\": \"cidrs\", \"namespace\": \"default\"}}, \
             \"spec\": {{\"endpointSelector\": {{\"matchLabels\": {{\"app\": \"pod1\"}}}}, \
             \"egress\": [{{\"toCIDR\": [{}]}}]}}}}",
            cidrs.join(", ")
        );
        out.push((n, call(ciliate_api::client::method::PUT, "/v1/policy", Some(text))?));
        del = call(ciliate_api::client::method::DELETE, "/v1/policy?all=true", None)?;
    }
    out.push((0, del));
    Ok(out)
}

/// A process killed when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ciliate observe -f` on `lab`'s observer, its output thrown away.
fn follow(lab: &NodeLab, bins: &Binaries) -> Result<Kill, String> {
    let sock = lab.socket.parent().ok_or("no socket directory")?.join("hubble.sock");
    let cli = bins.agent.with_file_name("ciliate");
    let child = std::process::Command::new(&cli)
        .args(["observe", "-f", "-o", "json", "--server", &format!("unix://{}", sock.display())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", cli.display()))?;
    Ok(Kill(child))
}

fn run() -> Result<(), String> {
    let o = parse_opts()?;
    let bins = Binaries::beside_current_exe().map_err(|e| e.to_string())?;
    let tag = format!("cbn{}", token());
    println!(
        "[bench] {} runs of {}s per variant, interleaved; median, and the median of each run's ratio to the anchor's run beside it; client and server on core 0",
        o.runs, o.seconds
    );

    // Direct veth: the anchor.
    let a = Netns::create(&format!("{tag}-a")).map_err(|e| e.to_string())?;
    let b = Netns::create(&format!("{tag}-b")).map_err(|e| e.to_string())?;
    veth(&a, "eth0", &b, "eth0").map_err(|e| e.to_string())?;
    a.add_address("eth0", Ipv4Addr::new(192, 0, 2, 1), 24).map_err(|e| e.to_string())?;
    b.add_address("eth0", Ipv4Addr::new(192, 0, 2, 2), 24).map_err(|e| e.to_string())?;
    servers(&b, &bins)?;

    // Routed through a third namespace by the kernel.
    let c = Netns::create(&format!("{tag}-c")).map_err(|e| e.to_string())?;
    let r = Netns::create(&format!("{tag}-r")).map_err(|e| e.to_string())?;
    let d = Netns::create(&format!("{tag}-d")).map_err(|e| e.to_string())?;
    veth(&c, "eth0", &r, "vc").map_err(|e| e.to_string())?;
    veth(&d, "eth0", &r, "vd").map_err(|e| e.to_string())?;
    r.sysctl("net.ipv4.ip_forward", "1").map_err(|e| e.to_string())?;
    r.add_address("vc", Ipv4Addr::new(198, 51, 100, 1), 24).map_err(|e| e.to_string())?;
    r.add_address("vd", Ipv4Addr::new(203, 0, 113, 1), 24).map_err(|e| e.to_string())?;
    c.add_address("eth0", Ipv4Addr::new(198, 51, 100, 2), 24).map_err(|e| e.to_string())?;
    c.add_route_via(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(198, 51, 100, 1))
        .map_err(|e| e.to_string())?;
    d.add_address("eth0", Ipv4Addr::new(203, 0, 113, 2), 24).map_err(|e| e.to_string())?;
    d.add_route_via(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(203, 0, 113, 1))
        .map_err(|e| e.to_string())?;
    servers(&d, &bins)?;

    // Ciliate: two pods of a one-node lab, whose flow observer has one
    // follower (`ciliate observe -f`, as a user watching); and the same
    // without the observer (--enable-hubble false): what observability costs.
    let lab = NodeLab::up(NodeLabConfig::new(&tag, 2, bins.clone())).map_err(|e| e.to_string())?;
    servers(&lab.pods[1].ns, &bins)?;
    let mut follower = follow(&lab, &bins)?;
    let mut off = NodeLabConfig::new(&format!("{tag}o"), 2, bins.clone());
    off.agent_args = vec!["--enable-hubble".into(), "false".into()];
    let lab_off = NodeLab::up(off).map_err(|e| e.to_string())?;
    servers(&lab_off.pods[1].ns, &bins)?;
    // Another build (--baseline-bins), observer off as well: what this
    // build's datapath changed.
    let lab_base = match &o.baseline {
        Some(dir) => {
            let base = Binaries::in_dir(dir).map_err(|e| e.to_string())?;
            let mut cfg = NodeLabConfig::new(&format!("{tag}b"), 2, base.clone());
            cfg.agent_args = vec!["--enable-hubble".into(), "false".into()];
            let l = NodeLab::up(cfg).map_err(|e| e.to_string())?;
            servers(&l.pods[1].ns, &base)?;
            Some(l)
        }
        None => None,
    };
    for ns in [&a, &c, &lab.pods[0].ns, &lab_off.pods[0].ns]
        .into_iter()
        .chain(lab_base.as_ref().map(|l| &l.pods[0].ns))
    {
        // Connection-rate runs open many connections: reuse TIME_WAIT ports
        // (a sysctl of the client's own namespace).
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1").map_err(|e| e.to_string())?;
    }

    let mut variants = vec![
        Variant { name: "direct veth (anchor)", client: &a, server_ip: "192.0.2.2".into() },
        Variant { name: "kernel routing", client: &c, server_ip: "203.0.113.2".into() },
        Variant {
            name: "ciliate pod->pod, Hubble+follower",
            client: &lab.pods[0].ns,
            server_ip: lab.pods[1].state.ip.to_string(),
        },
        Variant {
            name: "ciliate pod->pod, Hubble off",
            client: &lab_off.pods[0].ns,
            server_ip: lab_off.pods[1].state.ip.to_string(),
        },
    ];
    if let Some(l) = &lab_base {
        variants.push(Variant {
            name: "baseline build, Hubble off",
            client: &l.pods[0].ns,
            server_ip: l.pods[1].state.ip.to_string(),
        });
    }
    let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
    println!("[bench] measuring {}, their runs interleaved", names.join(", "));
    let targets: Vec<(&Netns, &str)> =
        variants.iter().map(|v| (v.client, v.server_ip.as_str())).collect();
    let measured = bench::measure_all(&targets, &bins, o.runs, o.seconds)?;
    println!();
    let rows: Vec<(String, bench::Runs)> =
        names.iter().map(|n| n.to_string()).zip(measured).collect();
    bench::print_paired(&rows);
    let [rr, conn, tput] = bench::paired_ratios(&rows[2].1, &rows[3].1);
    println!(
        "observability (Hubble + one follower vs off, paired rounds): RR {rr:.3}x, connections {conn:.3}x, stream {tput:.3}x"
    );
    if rows.len() > 4 {
        let [rr, conn, tput] = bench::paired_ratios(&rows[3].1, &rows[4].1);
        println!(
            "this build vs the baseline build (both Hubble off, paired rounds): RR {rr:.3}x, connections {conn:.3}x, stream {tput:.3}x"
        );
    }
    drop(lab_base);
    // The follower was there all along, and the observer made flows.
    let alive = matches!(follower.0.try_wait(), Ok(None));
    let sock = lab.socket.parent().ok_or("no socket directory")?.join("hubble.sock");
    let status = std::process::Command::new(bins.agent.with_file_name("ciliate"))
        .args(["hubble", "status", "--server", &format!("unix://{}", sock.display())])
        .output()
        .map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(&status.stdout);
    let rate = status.lines().find(|l| l.starts_with("Flows/s")).unwrap_or("Flows/s: ?");
    println!(
        "  (the observer since the lab came up: {rate}; the follower {})",
        if alive { "ran throughout" } else { "had stopped" }
    );
    drop(follower);
    drop(lab_off);
    let (p50, p99) = cni_add_latency(&lab, o.adds)?;
    println!();
    println!("CNI ADD latency over {} sequential ADDs: p50 {p50:.1} ms, p99 {p99:.1} ms", o.adds);
    drop(lab);
    let (ms, entries) = policy_import_latency(&bins, o.policy_endpoints)?;
    println!(
        "policy import to maps written on {} endpoints: {ms:.0} ms ({entries} policy map entries)",
        o.policy_endpoints
    );
    let cidr = cidr_import_latency(&bins, &[1000, 2000, 4000, 8000, 10000])?;
    let (del, grow) = cidr.split_last().ok_or("no CIDR measurement")?;
    let grow: Vec<String> = grow.iter().map(|(n, ms)| format!("{n}: {ms:.0} ms")).collect();
    println!(
        "policy import with N CIDRs (one pod's egress, /32s): {}; deleting it: {:.0} ms",
        grow.join(", "),
        del.1
    );
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cbm{}", token()), 2, bins.clone()))
        .map_err(|e| e.to_string())?;
    let (rss, restart) = agent_footprint(&lab)?;
    println!(
        "agent: RSS {:.1} MiB with {} pods; kill -9 and restart to API ready: {:.0} ms",
        rss,
        lab.pods.len(),
        restart
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-bench: {e}");
        std::process::exit(1);
    }
}
