//! Churn: 1,000 CNI ADD/DEL cycles (`CILIATE_CHURN_CYCLES` to change it), 10
//! in parallel, each pod with a label set of its own (a new identity), with
//! a policy that selects every churned pod as a peer of pod2 and a service
//! in force; every tenth pod opens a connection through the service. After
//! the churn and one identity garbage collection (heartbeat timeout 2 s
//! here), nothing may have leaked: addresses, devices, endpoints,
//! identities (locally and in the store), entries of every pinned map (lxc,
//! policy, ipcache, conntrack, NAT, endpoint configuration…), pins; the
//! agent's RSS grew by less than 5 MiB. Connections of deleted pods are
//! gone at once (their addresses are handed out again). Prints the table.
//! Needs root; CI runs as root.

use std::{collections::BTreeMap, process::Command, time::Duration};

use ciliate_lab::{
    names::token,
    node::{NodeLab, NodeLabConfig},
    pins,
};
use serde_json::{Value, json};

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What must not leak, by name.
fn snapshot(lab: &NodeLab) -> BTreeMap<String, i64> {
    let c = lab.client();
    let mut m = BTreeMap::new();
    let status: Value = c.get("/v1/status").unwrap();
    m.insert("addresses allocated".into(), status["ipam_used"].as_i64().unwrap_or(-1));
    let eps: Vec<Value> = c.get("/v1/endpoint").unwrap();
    m.insert("endpoints".into(), eps.len() as i64);
    let ids: Vec<Value> = c.get("/v1/identity").unwrap();
    let cluster = ids.iter().filter(|i| {
        let id = i["id"].as_u64().unwrap_or(0);
        id >= 256 && id & (1 << 24) == 0
    });
    m.insert("identities (agent)".into(), cluster.count() as i64);
    for (what, prefix) in [
        ("identities (store)", "ciliate/state/identities/v1/id/"),
        ("identity users (store)", "ciliate/state/identities/v1/users/"),
        ("endpoint addresses (store)", "ciliate/state/ip/v1/"),
    ] {
        let kvs: Vec<Value> = c.get(&format!("/v1/kvstore?prefix={prefix}")).unwrap();
        m.insert(what.into(), kvs.len() as i64);
    }
    let links = lab.node.ip(&["-o", "link", "show"]).unwrap_or_default();
    m.insert("devices in the node".into(), links.lines().count() as i64);
    m.insert("pins".into(), pins::files(&lab.pins_dir).len() as i64);
    // Every map's entries but the counters' (a drop or forward reason
    // seen for the first time adds a key: that is counting, not leaking).
    for (name, entries) in pins::maps(&lab.pins_dir) {
        if name == "ciliate_metrics" || name == "ciliate_events_lost" {
            continue;
        }
        m.insert(format!("map {name}"), entries.as_array().map_or(-1, |a| a.len() as i64));
    }
    m
}

#[test]
fn a_thousand_pods_come_and_go_and_leave_nothing_behind() {
    let cycles: usize =
        std::env::var("CILIATE_CHURN_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    const PARALLEL: usize = 10;
    let bins = ciliate_lab::node::Binaries::beside_current_exe().unwrap();
    let mut config = NodeLabConfig::new(&format!("chn{}", token()), 2, bins);
    // A conntrack sweep every second: a late packet of a closed
    // connection (the server's FIN racing the DEL) makes a closing entry
    // that lives 10 s; the settling below outwaits it.
    config.agent_args = [
        "--identity-gc-interval",
        "1s",
        "--identity-heartbeat-timeout",
        "2s",
        "--ct-gc-interval",
        "1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let lab = NodeLab::up(config).unwrap();
    let c = lab.client();
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: churn, namespace: default}\n\
                  spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: churn}}, {matchLabels: {app: pod1}}]}]\n";
    let _: Value = c
        .call(ciliate_api::client::method::PUT, "/v1/policy", Some(&json!({ "text": policy })))
        .unwrap();
    let p2 = lab.pods[1].state.ip.to_string();
    let svc = json!({"id": 7, "name": "default/churn", "frontend": {"ip": "10.96.0.7", "port": 80},
                     "backends": [{"ip": p2, "port": 7}]});
    let _: Value = c.call(ciliate_api::client::method::PUT, "/v1/service", Some(&svc)).unwrap();

    // `alone`: no other cycle runs meanwhile, so a DEL can be checked to
    // take the pod's connections along (in parallel, the address may
    // already be another pod's).
    let cycle = |i: usize, alone: bool| -> Result<(), String> {
        let run = i.to_string();
        let pod = lab
            .add_pod(&format!("c{i}"), &[("app", "churn"), ("run", &run)])
            .map_err(|e| format!("ADD {i}: {e}"))?;
        if i.is_multiple_of(10) || alone {
            let out = lab
                .run_echo(&pod.ns, &["tcp", "10.96.0.7:80", "churn"])
                .map_err(|e| format!("pod {i} through the service: {e}"))?;
            if !out.contains("churn") {
                return Err(format!("pod {i} through the service got {out:?}"));
            }
            // The connection's close handshake ends before the DEL (a
            // runtime deletes a pod after its processes are gone).
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let netns = pod.ns.path().display().to_string();
        let config = lab.cni_config(&[("app", "churn"), ("run", &run)]);
        let (out, ok) =
            lab.cni("DEL", &pod.state.container_id, &netns, &config).map_err(|e| e.to_string())?;
        if !ok {
            return Err(format!("DEL {i}: {out}"));
        }
        if !alone {
            return Ok(());
        }
        // A deleted pod's connections went with it.
        let ip = pod.state.ip.to_string();
        let ct = Command::new(lab.config.bins.agent.with_file_name("ciliate"))
            .args(["bpf", "ct", "list", "global", "-o", "json", "--socket"])
            .arg(&lab.socket)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&ct.stdout);
        let rows: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
        if rows.iter().any(|r| r.to_string().contains(&format!("\"{ip}:"))) {
            return Err(format!("conntrack still holds {ip} after its DEL"));
        }
        Ok(())
    };
    let parallel = |range: std::ops::Range<usize>| -> Vec<String> {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..PARALLEL)
                .map(|w| {
                    let (cycle, range) = (&cycle, range.clone());
                    s.spawn(move || {
                        (range.start + w..range.end)
                            .step_by(PARALLEL)
                            .filter_map(|i| cycle(i, false).err())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    };
    // Warm up: alone (each DEL checked to take its connections along),
    // then 200 in parallel, so what fills once and stays (the flow ring,
    // allocator pools) is in the baseline; then let the collection settle.
    for i in 0..PARALLEL {
        cycle(100_000 + i, true).unwrap();
    }
    let errors = parallel(200_000..200_200);
    assert!(errors.is_empty(), "warm-up: {errors:?}");
    let settle = |what: &str, before: Option<&BTreeMap<String, i64>>| -> BTreeMap<String, i64> {
        // Identities go after the heartbeat timeout; wait (bounded) until
        // the snapshot stops changing or matches `before`.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = snapshot(&lab);
        loop {
            std::thread::sleep(Duration::from_secs(3));
            let now = snapshot(&lab);
            let done = match before {
                Some(b) => now == *b,
                None => now == last,
            };
            if done || std::time::Instant::now() > deadline {
                eprintln!("{what}: settled");
                return now;
            }
            last = now;
        }
    };
    let before = settle("before", None);
    let pid = *lab.agent_pids().first().expect("the agent runs");
    let rss_before = rss_kib(pid);

    let t = std::time::Instant::now();
    let mut errors = parallel(0..cycles / 2);
    let rss_mid = rss_kib(pid);
    errors.extend(parallel(cycles / 2..cycles));
    let took = t.elapsed();
    assert!(
        errors.is_empty(),
        "{} of {cycles} cycles failed:\n{}",
        errors.len(),
        errors.join("\n")
    );
    let peak: Vec<Value> = c.get("/v1/identity").unwrap();
    let after = settle("after", Some(&before));
    let rss_after = rss_kib(pid);

    println!(
        "churn: {cycles} ADD/DEL cycles, {PARALLEL} in parallel, in {:.1} s ({:.1} cycles/s); identities right after: {}",
        took.as_secs_f64(),
        cycles as f64 / took.as_secs_f64(),
        peak.len()
    );
    println!("{:<44} {:>8} {:>8} {:>8}", "what", "before", "after", "leaked");
    let mut leaks = Vec::new();
    for (k, b) in &before {
        let a = after.get(k).copied().unwrap_or(-1);
        println!("{k:<44} {b:>8} {a:>8} {:>8}", a - b);
        if a != *b {
            leaks.push(format!("{k}: {b} -> {a}"));
        }
    }
    let grew = rss_after as i64 - rss_before as i64;
    println!("{:<44} {:>8} {:>8} {:>8}", "agent RSS (KiB)", rss_before, rss_after, grew);
    println!("agent RSS half way: {rss_mid} KiB");
    assert!(leaks.is_empty(), "leaked after {cycles} cycles: {leaks:?}");
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    assert!(grew < 5 * 1024, "agent RSS grew by {grew} KiB");
}
