//! `ciliate-scale-bench`: a cluster past one machine, simulated against a
//! real etcd and one real agent. For each size, a load generator writes N
//! node registrations, N × P endpoints and their identities to the lab's
//! etcd (in transactions of 128 puts, bounded), then node1's agent starts
//! and joins. Printed per size: the time until its status shows every node
//! and endpoint (from the agent's start), its RSS and CPU share at steady
//! state, its ipcache entries, the store operations it makes per second at
//! steady state, and the time for one new remote endpoint written to etcd
//! to reach its ipcache (p50/p99 over 100). Then where the curve bends.
//!
//! ```text
//! ciliate-scale-bench [--nodes 100,1000] [--pods-per-node 100] [--new 100]
//! ```
//! Needs root (a lab of network namespaces).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ciliate_agent::{
    cluster::{IpRecord, NodeRecord, Routing},
    kvstore::{Etcd, EtcdConfig, IDENTITY_IDS, IDENTITY_VALUES, IPS, KvStore, NODES, Op},
};
use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig, ETCD_PORT, Store, UNDERLAY_IP},
    names::token,
    node::Binaries,
};

/// Puts per transaction (etcd's default `--max-txn-ops`).
const TXN_OPS: usize = 128;
/// Identities the simulated endpoints share.
const IDENTITIES: u32 = 500;

struct Opts {
    nodes: Vec<usize>,
    pods: usize,
    new: usize,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { nodes: vec![100, 1000], pods: 100, new: 100 };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} takes a value"));
        match a.as_str() {
            "--nodes" => {
                o.nodes = val()?
                    .split(',')
                    .map(|n| n.parse().map_err(|e| format!("--nodes {n}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--pods-per-node" => {
                o.pods = val()?.parse().map_err(|e| format!("--pods-per-node: {e}"))?
            }
            "--new" => o.new = val()?.parse().map_err(|e| format!("--new: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.nodes.iter().any(|n| *n == 0 || *n > 4000) || o.pods == 0 || o.pods > 250 {
        return Err("--nodes 1..4000 each, --pods-per-node 1..250".into());
    }
    Ok(o)
}

fn e<T: std::fmt::Display>(x: T) -> String {
    x.to_string()
}

/// Simulated node `i`: its record (tunnel routing, a pod CIDR of its own
/// outside the lab's cluster pool) and its endpoint `j`'s address.
fn sim_node(i: usize) -> NodeRecord {
    NodeRecord {
        name: format!("sim{i}"),
        ip: Ipv4Addr::new(172, 16 + (i / 62_500) as u8, (i / 250 % 250) as u8, (i % 250 + 1) as u8),
        pod_cidr: format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
        routing: Routing::Tunnel,
        health_ip: None,
    }
}

fn sim_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (100 + i / 256) as u8, (i % 256) as u8, (j + 1) as u8)
}

fn ip_record(i: usize, j: usize) -> (String, Vec<u8>) {
    let n = sim_node(i);
    let r = IpRecord {
        ip: sim_ip(i, j),
        identity: 1000 + ((i * 7 + j) as u32 % IDENTITIES),
        node: n.name,
        host_ip: n.ip,
        pod: format!("sim/p{i}-{j}"),
    };
    (format!("{IPS}{}", r.ip), serde_json::to_vec(&r).unwrap_or_default())
}

/// Run `f` with a client of the lab's etcd, from inside the underlay
/// namespace (where etcd listens).
fn with_etcd<R: Send>(
    lab: &ClusterLab,
    f: impl AsyncFnOnce(&Etcd) -> Result<R, String> + Send,
) -> Result<R, String> {
    lab.underlay
        .run(|| {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(e)?;
            rt.block_on(async {
                let cfg = EtcdConfig::plain(&format!("{UNDERLAY_IP}:{ETCD_PORT}"))?;
                let kv = Etcd::connect(&cfg).await.map_err(e)?;
                f(&kv).await
            })
        })
        .map_err(e)?
}

/// Write `kvs` in transactions of [`TXN_OPS`] puts.
async fn put_all(kv: &Etcd, kvs: &[(String, Vec<u8>)]) -> Result<(), String> {
    for chunk in kvs.chunks(TXN_OPS) {
        let ops: Vec<Op<'_>> = chunk.iter().map(|(k, v)| Op::Put(k, v, None)).collect();
        kv.txn(&[], &ops).await.map_err(e)?;
    }
    Ok(())
}

fn rss_mib(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU time (user + system) of `pid`, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th,
    // stime the 13th.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// Store operations the agent counted so far
/// (`cilium_kvstore_operations_duration_seconds_count`, summed).
fn kv_ops(lab: &ClusterLab) -> f64 {
    let text = lab.nodes[0]
        .ns
        .exec(&["curl", "-sf", "--max-time", "10", "http://127.0.0.1:9962/metrics"])
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cilium_kvstore_operations_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0)
}

struct Row {
    nodes: usize,
    endpoints: usize,
    load_s: f64,
    converge_s: f64,
    rss: f64,
    cpu: f64,
    ipcache: usize,
    ops: f64,
    new_p50: f64,
    new_p99: f64,
}

fn one_size(bins: &Binaries, nodes: usize, pods: usize, new: usize) -> Result<Row, String> {
    let tag = format!("csb{}", token());
    let mut cfg = ClusterLabConfig::new(&tag, 1, 1, bins.clone());
    cfg.store = Store::Etcd;
    let lab = ClusterLab::up(cfg).map_err(e)?;
    // The agent joins after the cluster is written.
    for pid in lab.agent_pids(0) {
        // SAFETY: kill(2) on the lab's own agent.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let gone = Instant::now();
    while !lab.agent_pids(0).is_empty() {
        if gone.elapsed() > Duration::from_secs(10) {
            return Err("the lab's first agent did not die".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::with_capacity(nodes * (pods + 1) + 1000);
    for id in 1000..1000 + IDENTITIES {
        let labels = vec![format!("k8s:app=sim{id}"), "k8s:io.kubernetes.pod.namespace=sim".into()];
        kvs.push((format!("{IDENTITY_IDS}{id}"), serde_json::to_vec(&labels).map_err(e)?));
        kvs.push((format!("{IDENTITY_VALUES}{}", labels.join(";")), id.to_string().into_bytes()));
    }
    for i in 0..nodes {
        kvs.push((format!("{NODES}sim{i}"), serde_json::to_vec(&sim_node(i)).map_err(e)?));
        for j in 0..pods {
            kvs.push(ip_record(i, j));
        }
    }
    with_etcd(&lab, async |kv| put_all(kv, &kvs).await)?;
    let load_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    lab.start_agent(0).map_err(e)?;
    let client = lab.nodes[0].client();
    let want = nodes * pods;
    loop {
        let s: ciliate_api::models::Status = client.get("/v1/status").map_err(e)?;
        if s.cluster_nodes == nodes + 1 && s.remote_endpoints == want {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "not converged in 300 s: {} nodes, {} remote endpoints",
                s.cluster_nodes, s.remote_endpoints
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let converge_s = t.elapsed().as_secs_f64();
    let pid = *lab.agent_pids(0).first().ok_or("the agent is gone")?;
    let ipc =
        ciliate_datapath::maps::IpcacheMap::from_pin_dir(&lab.nodes[0].pins_dir).map_err(e)?;
    let ipcache = ipc.dump().map_err(e)?.len();
    // Steady state: 10 s of nothing happening.
    let (cpu0, ops0, t0) = (cpu_secs(pid), kv_ops(&lab), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_secs(pid) - cpu0) / secs * 100.0;
    let ops = (kv_ops(&lab) - ops0) / secs;
    let rss = rss_mib(pid);
    // One new remote endpoint at a time: written to etcd → in the ipcache.
    let mut times = Vec::with_capacity(new);
    for k in 0..new {
        let (key, value) = ip_record(k % nodes, pods + 1 + k / nodes);
        let ip = sim_ip(k % nodes, pods + 1 + k / nodes);
        // From just before the write (its round trip included).
        let written = with_etcd(&lab, async |kv| {
            let t = Instant::now();
            kv.put(&key, &value, None).await.map_err(e)?;
            Ok(t)
        })?;
        while ipc.lookup(ip).map_err(e)?.is_none() {
            if written.elapsed() > Duration::from_secs(10) {
                return Err(format!("{ip} did not reach the ipcache in 10 s"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(written.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Row {
        nodes,
        endpoints: want,
        load_s,
        converge_s,
        rss,
        cpu,
        ipcache,
        ops,
        new_p50: pct(&mut times, 0.5),
        new_p99: pct(&mut times, 0.99),
    })
}

fn main() {
    let run = || -> Result<(), String> {
        let o = parse_opts()?;
        let bins = Binaries::beside_current_exe().map_err(e)?;
        let mut rows = Vec::new();
        for &n in &o.nodes {
            println!(
                "[scale-bench] {n} nodes x {} endpoints: writing etcd, then the agent joins",
                o.pods
            );
            rows.push(one_size(&bins, n, o.pods, o.new)?);
        }
        println!(
            "{:>6} {:>9} {:>8} {:>11} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "nodes",
            "endpoints",
            "write s",
            "converge s",
            "RSS MiB",
            "CPU %",
            "ipcache",
            "kv ops/s",
            "new p50",
            "new p99"
        );
        for r in &rows {
            println!(
                "{:>6} {:>9} {:>8.1} {:>11.2} {:>9.1} {:>7.1} {:>9} {:>9.1} {:>7.1}ms {:>7.1}ms",
                r.nodes,
                r.endpoints,
                r.load_s,
                r.converge_s,
                r.rss,
                r.cpu,
                r.ipcache,
                r.ops,
                r.new_p50,
                r.new_p99
            );
        }
        // Where the curve bends: convergence time per endpoint, first to last.
        if let (Some(a), Some(b)) = (rows.first(), rows.last())
            && b.endpoints > a.endpoints
        {
            let per = |r: &Row| r.converge_s / r.endpoints as f64 * 1e6;
            let mem = (b.rss - a.rss) / (b.endpoints - a.endpoints) as f64 * 1024.0;
            println!(
                "convergence: {:.1} µs per endpoint at {} nodes, {:.1} µs at {} ({}); memory: {mem:.2} KiB per remote endpoint",
                per(a),
                a.nodes,
                per(b),
                b.nodes,
                if per(b) > per(a) * 1.5 { "super-linear: it bends" } else { "linear" }
            );
        }
        Ok(())
    };
    if let Err(err) = run() {
        eprintln!("ciliate-scale-bench: {err}");
        std::process::exit(1);
    }
}
