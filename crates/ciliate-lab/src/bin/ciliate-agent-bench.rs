//! `ciliate-agent-bench`: the agent under the load a Kubernetes node gives
//! it, in labs this program makes and removes (guards):
//! - a Deployment scale-up: N concurrent CNI ADDs, the time until the last
//!   pod is ready, and `GET /v1/status` latency while they run;
//! - memory: RSS at start, after the scale-up and its scale-down, after M
//!   ADD/DEL cycles; then with 100 endpoints and 10,000 services;
//! - restart: `kill -9` with 100 endpoints and 10,000 services, the time
//!   until the new agent's API says ready, whether a TCP stream between two
//!   pods survives it, and whether anything was verified again;
//! - cross-node convergence with etcd: a pod added on node A → its ipcache
//!   entry on node B (polled every 0.2 ms), over N pods.
//!
//! ```text
//! ciliate-agent-bench [--concurrent N] [--cycles N] [--endpoints N] [--services N] [--converge N]
//! ```

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ciliate_api::{
    client::method,
    models::{BackendSpec, BackendState, Service, ServiceKind, ServiceSpec},
};
use ciliate_lab::{
    Netns,
    bench::{pct, rss_mib},
    cluster::{ClusterLab, ClusterLabConfig, Store},
    names::token,
    node::{Binaries, ECHO_PORT, NodeHandle, NodeLab, NodeLabConfig, wait_listening},
};

struct Opts {
    concurrent: usize,
    cycles: usize,
    endpoints: usize,
    services: usize,
    converge: usize,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o =
        Opts { concurrent: 50, cycles: 300, endpoints: 100, services: 10_000, converge: 50 };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str, max: usize| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| *v > 0 && *v <= max)
                .ok_or_else(|| format!("{name} takes a number from 1 to {max}"))
        };
        match a.as_str() {
            "--concurrent" => o.concurrent = val("--concurrent", 200)?,
            "--cycles" => o.cycles = val("--cycles", 5000)?,
            "--endpoints" => o.endpoints = val("--endpoints", 250)?,
            "--services" => o.services = val("--services", 60_000)?,
            "--converge" => o.converge = val("--converge", 200)?,
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: ciliate-agent-bench [--concurrent N] [--cycles N] \
                     [--endpoints N] [--services N] [--converge N]"
                ));
            }
        }
    }
    Ok(o)
}

fn e<T: std::fmt::Display>(x: T) -> String {
    x.to_string()
}

fn agent_rss(lab: &NodeLab) -> f64 {
    lab.agent_pids().first().map_or(0.0, |p| rss_mib(*p))
}

/// Namespaces for pods `from..from+n` of the lab (made, not added).
fn namespaces(lab: &str, from: usize, n: usize) -> Result<Vec<Netns>, String> {
    (from..from + n).map(|i| Netns::create(&format!("{lab}-pod{i}")).map_err(e)).collect()
}

fn cni(h: &NodeHandle<'_>, cmd: &str, ns: &Netns, conf: &str) -> Result<String, String> {
    let (out, ok) =
        h.cni_in(cmd, ns.name(), &ns.path().display().to_string(), conf, "default").map_err(e)?;
    if ok { Ok(out) } else { Err(format!("CNI {cmd} {}: {out}", ns.name())) }
}

/// N concurrent ADDs: (time until the last returned, per-ADD p50, p99,
/// status p50, p99, max) in ms.
fn scale_up(lab: &NodeLab, nss: &[Netns]) -> Result<[f64; 6], String> {
    let conf = lab.cni_config(&[("app", "scale")]);
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (client, stop) = (lab.client(), stop.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if client.get::<serde_json::Value>("/v1/status").is_ok() {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            lat
        })
    };
    let start = Instant::now();
    let times: Vec<Result<f64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .map(|ns| {
                let conf = &conf;
                s.spawn(move || {
                    let t = Instant::now();
                    cni(&lab.handle(), "ADD", ns, conf).map(|_| t.elapsed().as_secs_f64() * 1000.0)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("an ADD panicked".into())))
            .collect()
    });
    let total = start.elapsed().as_secs_f64() * 1000.0;
    stop.store(true, Ordering::Relaxed);
    let mut status = poller.join().map_err(|_| "the status poller panicked")?;
    let mut adds = times.into_iter().collect::<Result<Vec<f64>, String>>()?;
    if status.is_empty() {
        return Err("no status answer during the ADDs".into());
    }
    let max = status.iter().copied().fold(0.0, f64::max);
    Ok([
        total,
        pct(&mut adds, 0.5),
        pct(&mut adds, 0.99),
        pct(&mut status, 0.5),
        pct(&mut status, 0.99),
        max,
    ])
}

fn service(i: usize, backend: Ipv4Addr) -> ServiceSpec {
    let vip = Ipv4Addr::from(0x0a60_0000u32 + 0x100 + i as u32);
    ServiceSpec {
        id: i as u16 + 100,
        frontend: format!("{vip}:80/TCP").parse().expect("valid"),
        kind: ServiceKind::ClusterIP,
        backends: vec![BackendSpec { ip: backend, port: ECHO_PORT, state: BackendState::Active }],
        affinity_timeout: None,
        traffic_policy_local: false,
        source_ranges: vec![],
        algorithm: None,
        name: format!("default/bench{i}"),
        source: Default::default(),
    }
}

fn node_bench(o: &Opts, bins: &Binaries) -> Result<(), String> {
    let tag = format!("cab{}", token());
    let lab = NodeLab::up(NodeLabConfig::new(&tag, 2, bins.clone())).map_err(e)?;
    for p in &lab.pods {
        wait_listening(&p.ns, ECHO_PORT).map_err(e)?;
    }
    let rss0 = agent_rss(&lab);

    println!("[agent-bench] {} concurrent CNI ADDs (a Deployment scale-up)", o.concurrent);
    let nss = namespaces(&tag, 100, o.concurrent)?;
    let [total, p50, p99, s50, s99, smax] = scale_up(&lab, &nss)?;
    let rss_up = agent_rss(&lab);
    println!(
        "  last pod ready after {total:.0} ms; per ADD p50 {p50:.1} ms, p99 {p99:.1} ms; \
         status while they ran: p50 {s50:.1} ms, p99 {s99:.1} ms, max {smax:.1} ms"
    );
    let conf = lab.cni_config(&[("app", "scale")]);
    for ns in &nss {
        cni(&lab.handle(), "DEL", ns, &conf)?;
    }
    drop(nss);
    let rss_down = agent_rss(&lab);

    println!("[agent-bench] {} ADD/DEL cycles", o.cycles);
    let ns = Netns::create(&format!("{tag}-pod99")).map_err(e)?;
    let t = Instant::now();
    for _ in 0..o.cycles {
        cni(&lab.handle(), "ADD", &ns, &conf)?;
        cni(&lab.handle(), "DEL", &ns, &conf)?;
    }
    let per_cycle = t.elapsed().as_secs_f64() * 1000.0 / o.cycles as f64;
    drop(ns);
    let rss_cycles = agent_rss(&lab);
    println!(
        "  {per_cycle:.1} ms per cycle; RSS: {rss0:.1} MiB at start, {rss_up:.1} after the scale-up, \
         {rss_down:.1} after its scale-down, {rss_cycles:.1} after the cycles ({:+.1} MiB from the start)",
        rss_cycles - rss0
    );

    let more = o.endpoints.saturating_sub(4);
    println!(
        "[agent-bench] {} endpoints (host, health, 2 pods and {more} more) and {} services",
        o.endpoints, o.services
    );
    let extra = namespaces(&tag, 200, more)?;
    for ns in &extra {
        cni(&lab.handle(), "ADD", ns, &conf)?;
    }
    let backend = lab.pods[1].state.ip;
    let t = Instant::now();
    for i in 0..o.services {
        lab.client()
            .call::<Service>(method::PUT, "/v1/service", Some(&service(i, backend)))
            .map_err(e)?;
    }
    let per_svc = t.elapsed().as_secs_f64() * 1000.0 / o.services as f64;
    let eps: Vec<serde_json::Value> = lab.client().get("/v1/endpoint").map_err(e)?;
    let rss_full = agent_rss(&lab);
    println!(
        "  {} endpoints, {} services ({per_svc:.2} ms each): agent RSS {rss_full:.1} MiB",
        eps.len(),
        o.services
    );

    println!(
        "[agent-bench] kill -9 and restart with {} endpoints and {} services, a TCP stream running",
        eps.len(),
        o.services
    );
    let to = format!("{}:{ECHO_PORT}", lab.pods[1].state.ip);
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    let stream = lab.pods[0].ns.command(&echo).args(["stream", &to, "6"]).output();
    let stream = std::thread::spawn(move || stream);
    std::thread::sleep(Duration::from_secs(1));
    let agent = *lab.agent_pids().first().ok_or("no agent")?;
    let log_before = std::fs::read_to_string(lab.agent_log()).unwrap_or_default().len();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    while std::fs::read_to_string(format!("/proc/{agent}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t = Instant::now();
    lab.start_agent().map_err(e)?;
    let ready = t.elapsed().as_secs_f64() * 1000.0;
    let out = stream.join().map_err(|_| "the stream thread panicked")?.map_err(e)?;
    let log = std::fs::read_to_string(lab.agent_log()).unwrap_or_default();
    let log = &log[log_before.min(log.len())..];
    let verified_again = log.contains("loaded and verified");
    println!(
        "  API ready (restored) {ready:.0} ms after start; stream {}; programs verified again: {}",
        if out.status.success() {
            format!("unbroken ({})", String::from_utf8_lossy(&out.stdout).trim())
        } else {
            format!("BROKEN: {}", String::from_utf8_lossy(&out.stderr).trim())
        },
        if verified_again { "yes" } else { "no" }
    );
    for ns in &extra {
        let _ = cni(&lab.handle(), "DEL", ns, &conf);
    }
    Ok(())
}

fn converge_bench(o: &Opts, bins: &Binaries) -> Result<(), String> {
    println!(
        "[agent-bench] cross-node convergence with etcd: pod on node1 -> ipcache entry on node2, {} pods",
        o.converge
    );
    let tag = format!("cac{}", token());
    let mut cfg = ClusterLabConfig::new(&tag, 2, 1, bins.clone());
    cfg.store = Store::Etcd;
    let lab = ClusterLab::up(cfg).map_err(e)?;
    let h = lab.handle(0);
    let conf = h.cni_config(&[("app", "converge")]);
    let ipc =
        ciliate_datapath::maps::IpcacheMap::from_pin_dir(&lab.nodes[1].pins_dir).map_err(e)?;
    let nss = namespaces(&tag, 100, o.converge)?;
    let mut times = Vec::new();
    for ns in &nss {
        let out = cni(&h, "ADD", ns, &conf)?;
        let added = Instant::now();
        let res: serde_json::Value = serde_json::from_str(&out).map_err(e)?;
        let ip: Ipv4Addr = res["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next()?.parse().ok())
            .ok_or_else(|| format!("no address in {out}"))?;
        let eps: Vec<ciliate_api::models::Endpoint> =
            h.client().get(&format!("/v1/endpoint?container-id={}", ns.name())).map_err(e)?;
        let identity = eps.first().ok_or("no endpoint after the ADD")?.identity;
        loop {
            if let Ok(Some(entry)) = ipc.lookup(ip)
                && entry.identity == identity
            {
                break;
            }
            if added.elapsed() > Duration::from_secs(10) {
                return Err(format!("{ip} did not reach node2's ipcache in 10 s"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(added.elapsed().as_secs_f64() * 1000.0);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "  after the ADD returned on node1: p50 {:.1} ms, p99 {:.1} ms, max {max:.1} ms",
        pct(&mut times, 0.5),
        pct(&mut times, 0.99)
    );
    for ns in &nss {
        let _ = cni(&h, "DEL", ns, &conf);
    }
    Ok(())
}

fn main() {
    let run = || -> Result<(), String> {
        let o = parse_opts()?;
        let bins = Binaries::beside_current_exe().map_err(e)?;
        node_bench(&o, &bins)?;
        converge_bench(&o, &bins)
    };
    if let Err(err) = run() {
        eprintln!("ciliate-agent-bench: {err}");
        std::process::exit(1);
    }
}
