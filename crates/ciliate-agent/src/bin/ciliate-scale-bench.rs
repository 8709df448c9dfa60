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
//! First, one node's policy at scale (`--no-policy` skips it): 110 real
//! endpoints, 10,000 identities written to etcd, 1,000 policies imported
//! at once: how long the agent takes to learn the identities, to resolve
//! and write the policies (`policyCalculation` and `mapSync`, as Cilium's
//! regeneration scopes), how full the policy map and each endpoint's share
//! get, the time from a new identity in etcd until a packet from it is
//! allowed in the map of an endpoint a rule gives it to (20 one by one,
//! p50/p99: an identity one endpoint's rule names, then one a clusterwide
//! rule names), and the agent's RSS.
//!
//! ```text
//! ciliate-scale-bench [--nodes 100,1000] [--pods-per-node 100] [--new 100]
//!                     [--policy-endpoints 110] [--policy-identities 10000]
//!                     [--policy-rules 1000] [--no-policy]
//! ```
//! Needs root (a lab of network namespaces).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ciliate_agent::{
    cluster::{IpRecord, NodeRecord, Routing, identity_records},
    kvstore::{Etcd, EtcdConfig, IPS, KvStore, NODES, Op},
};
use ciliate_lab::{
    bench::{pct, rss_mib},
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
    /// Endpoints, identities and rules of the policy phase (endpoints 0:
    /// no policy phase).
    policy: (usize, usize, usize),
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { nodes: vec![100, 1000], pods: 100, new: 100, policy: (110, 10_000, 1000) };
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
            "--policy-endpoints" => {
                o.policy.0 = val()?.parse().map_err(|e| format!("--policy-endpoints: {e}"))?
            }
            "--policy-identities" => {
                o.policy.1 = val()?.parse().map_err(|e| format!("--policy-identities: {e}"))?
            }
            "--policy-rules" => {
                o.policy.2 = val()?.parse().map_err(|e| format!("--policy-rules: {e}"))?
            }
            "--no-policy" => o.policy.0 = 0,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.nodes.iter().any(|n| *n == 0 || *n > 4000) || o.pods == 0 || o.pods > 250 {
        return Err("--nodes 1..4000 each, --pods-per-node 1..250".into());
    }
    let (eps, ids, rules) = o.policy;
    if eps > 250 || !(1..=40_000).contains(&ids) || !(1..=10_000).contains(&rules) {
        return Err("--policy-endpoints 0..250, --policy-identities 1..40000, \
                    --policy-rules 1..10000"
            .into());
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
        kvs.extend(identity_records(id, &labels));
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

/// The first identity of the policy phase's simulated ones (above what
/// the lab's own pods are given).
const POLICY_ID_BASE: u32 = 20_000;
/// New identities timed one by one, per case.
const NEW_IDENTITIES: usize = 20;

/// Labels of simulated identity `i` of the policy phase: its own pod
/// template hash, an app shared by every thousandth, a tier by every
/// seventh, all in `default` (where the policies are).
fn policy_labels(i: usize) -> Vec<String> {
    let mut l = vec![
        format!("k8s:pod-template-hash=h{i}"),
        format!("k8s:app=a{}", i % 1000),
        format!("k8s:tier=t{}", i % 7),
        "k8s:io.kubernetes.pod.namespace=default".to_string(),
    ];
    l.sort();
    l
}

/// `rules` policies over the lab's pods: rule k gives pod k % pods (its
/// `app`) ingress from app a<k % 1000> (ten identities in 10,000) on TCP 80
/// and 8000-8100; and one clusterwide rule gives every pod tier t0 (one
/// identity in seven) on TCP 443.
fn policy_text(rules: usize, pods: usize) -> String {
    let mut text = String::new();
    for k in 0..rules {
        text.push_str(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: r{k}, namespace: default}}\n\
             spec:\n  endpointSelector: {{matchLabels: {{app: pod{}}}}}\n  ingress:\n  \
             - fromEndpoints: [{{matchLabels: {{app: a{}}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}, \
             {{port: \"8000\", endPort: 8100, protocol: TCP}}]}}]\n---\n",
            k % pods + 1,
            k % 1000
        ));
    }
    text.push_str(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: tier0}\n\
         spec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {tier: t0}}]\n    \
         toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n",
    );
    text
}

/// Sum of `cilium_endpoint_regeneration_time_stats_seconds_sum` of
/// `scope` (successes), in ms.
fn regeneration_ms(lab: &ClusterLab, scope: &str) -> f64 {
    let text = lab.nodes[0]
        .ns
        .exec(&["curl", "-sf", "--max-time", "10", "http://127.0.0.1:9962/metrics"])
        .unwrap_or_default();
    let series = format!(
        "cilium_endpoint_regeneration_time_stats_seconds_sum{{scope=\"{scope}\",status=\"success\"}} "
    );
    text.lines().find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        * 1000.0
}

/// The policy phase (see the module comment).
fn policy_at_scale(bins: &Binaries, pods: usize, ids: usize, rules: usize) -> Result<(), String> {
    println!(
        "[scale-bench] policy: {pods} endpoints on one node, {ids} identities in etcd, {rules} policies"
    );
    let mut cfg = ClusterLabConfig::new(&format!("csp{}", token()), 1, pods, bins.clone());
    cfg.store = Store::Etcd;
    let t = Instant::now();
    let lab = ClusterLab::up(cfg).map_err(e)?;
    println!("  {pods} endpoints up in {:.1} s", t.elapsed().as_secs_f64());
    let client = lab.nodes[0].client();
    let pid = *lab.agent_pids(0).first().ok_or("the agent is gone")?;
    let rss0 = rss_mib(pid);

    // The identities: written, then learned.
    let before: ciliate_api::models::Status = client.get("/v1/status").map_err(e)?;
    let mut kvs = Vec::with_capacity(2 * ids);
    for i in 0..ids {
        kvs.extend(identity_records(POLICY_ID_BASE + i as u32, &policy_labels(i)));
    }
    let t = Instant::now();
    with_etcd(&lab, async |kv| put_all(kv, &kvs).await)?;
    let written_s = t.elapsed().as_secs_f64();
    loop {
        let s: ciliate_api::models::Status = client.get("/v1/status").map_err(e)?;
        if s.identities >= before.identities + ids {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("{} of {ids} identities learned in 300 s", s.identities));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let learned_s = t.elapsed().as_secs_f64();
    println!(
        "  {ids} identities: written in {written_s:.1} s, learned {learned_s:.1} s after the first write"
    );

    // The policies, at once: the call returns when every map is written.
    let (calc0, sync0) =
        (regeneration_ms(&lab, "policyCalculation"), regeneration_ms(&lab, "mapSync"));
    let text = policy_text(rules, pods);
    let t = Instant::now();
    let _: serde_json::Value = client
        .call(
            ciliate_api::client::method::PUT,
            "/v1/policy",
            Some(&ciliate_api::models::PolicyImport { text }),
        )
        .map_err(e)?;
    let import_ms = t.elapsed().as_secs_f64() * 1000.0;
    let calc = regeneration_ms(&lab, "policyCalculation") - calc0;
    let sync = regeneration_ms(&lab, "mapSync") - sync0;
    println!(
        "  import of {} policies: {import_ms:.0} ms (resolving {calc:.0} ms, writing the maps {sync:.0} ms)",
        rules + 1
    );

    // How full the map is.
    let map = ciliate_datapath::maps::PolicyMap::from_pin_dir(&lab.nodes[0].pins_dir).map_err(e)?;
    let held = map.entries_by_endpoint().map_err(e)?;
    let total: usize = held.values().map(|v| v.len()).sum();
    let most = held.values().map(|v| v.len()).max().unwrap_or(0);
    let share = 16_384.0;
    println!(
        "  policy map: {total} entries for {} endpoints ({:.2}% of the map's {}); the fullest endpoint {most} ({:.1}% of its {share})",
        held.len(),
        total as f64 / f64::from(map.capacity().map_err(e)? as u32) * 100.0,
        map.capacity().map_err(e)?,
        most as f64 / share * 100.0
    );

    // New identities, one at a time: app a5 (rule 5 gives it to pod
    // 5 % pods + 1: one endpoint regenerates), then tier t0 (the
    // clusterwide rule gives it to every endpoint), each until a packet
    // from it to its endpoint's port is allowed in the map.
    let endpoint_of = |name: String| -> Result<u16, String> {
        let p = lab.pods.iter().find(|p| p.pod.state.name == name).ok_or("no such pod")?;
        Ok(p.pod.state.endpoint_id)
    };
    let cases = [
        ("one endpoint's rule names it", 5, endpoint_of(format!("pod{}", 5 % pods + 1))?, 80u16),
        ("the clusterwide rule names it (every endpoint)", 7, endpoint_of("pod1".into())?, 443),
    ];
    let mut next_id = POLICY_ID_BASE + ids as u32 + 1;
    for (what, like, target, port) in cases {
        let (mut times, calc0, sync0) = (
            Vec::new(),
            regeneration_ms(&lab, "policyCalculation"),
            regeneration_ms(&lab, "mapSync"),
        );
        for n in 0..NEW_IDENTITIES {
            let id = next_id;
            next_id += 1;
            let mut labels = policy_labels(like);
            labels.push(format!("k8s:bench=n{n}"));
            labels.retain(|l| !l.starts_with("k8s:pod-template-hash="));
            labels.sort();
            let recs = identity_records(id, &labels);
            // What a packet from it to the target's port finds.
            let key = ciliate_common::policy::PolicyKey {
                endpoint_id: target,
                dir: ciliate_common::policy::DIR_INGRESS,
                identity: id,
                proto: 6,
                dport: port.to_be(),
                ..Default::default()
            };
            let allowed = || -> Result<bool, String> {
                let found = map.matching(&key).map_err(e)?;
                Ok(found.is_some_and(|f| f.flags & ciliate_common::policy::F_MARKER == 0))
            };
            if allowed()? {
                return Err(format!("identity {id} allowed before it exists"));
            }
            // From just before the write (its round trip included).
            let written = with_etcd(&lab, async |kv| {
                let t = Instant::now();
                put_all(kv, &recs).await?;
                Ok(t)
            })?;
            while !allowed()? {
                if written.elapsed() > Duration::from_secs(60) {
                    return Err(format!("identity {id} not in endpoint {target}'s policy in 60 s"));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            times.push(written.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(200));
        let per = |v: f64| v / NEW_IDENTITIES as f64;
        let calc = per(regeneration_ms(&lab, "policyCalculation") - calc0);
        let sync = per(regeneration_ms(&lab, "mapSync") - sync0);
        println!(
            "  a new identity {what}: etcd to the endpoint's map p50 {:.1} ms, p99 {:.1} ms \
             (resolving {calc:.1} ms, writing {sync:.1} ms each)",
            pct(&mut times.clone(), 0.5),
            pct(&mut times, 0.99)
        );
    }
    println!("  agent RSS: {rss0:.1} MiB with the endpoints, {:.1} MiB now", rss_mib(pid));
    Ok(())
}

fn main() {
    let run = || -> Result<(), String> {
        let o = parse_opts()?;
        let bins = Binaries::beside_current_exe().map_err(e)?;
        if o.policy.0 > 0 {
            policy_at_scale(&bins, o.policy.0, o.policy.1, o.policy.2)?;
        }
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
