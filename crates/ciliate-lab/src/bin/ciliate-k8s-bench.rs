//! `ciliate-k8s-bench`: the agent driven by a Kubernetes API (the test API
//! server `ciliate-apiserver` in the node's namespace, CRD mode), in a lab
//! this program makes and removes:
//! - a pod created in the API → its endpoint ready with its policy (the
//!   CNI ADD a kubelet would make returned): p50/p99 over N pods;
//! - a Service with 100 endpoints: one endpoint replaced in its
//!   EndpointSlice → the new backend in the agent's service (maps
//!   written): p50/p99 over N changes;
//! - agent memory with 5,000 pods (on other nodes), their CiliumEndpoints
//!   and 500 identities, 1,000 Services with EndpointSlices and 500
//!   CiliumNetworkPolicies in the API (watch caches included), against
//!   its memory before them.
//!
//! ```text
//! ciliate-k8s-bench [--pods N] [--changes N] [--remote-pods N] [--services N] [--policies N]
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use ciliate_lab::{
    bench::pct,
    names::token,
    node::{Binaries, NodeLab, NodeLabConfig},
};
use serde_json::{Value, json};

const API: &str = "127.0.0.1:6443";

struct Opts {
    pods: usize,
    changes: usize,
    remote_pods: usize,
    services: usize,
    policies: usize,
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts { pods: 50, changes: 50, remote_pods: 5000, services: 1000, policies: 500 };
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
            "--pods" => o.pods = val("--pods", 200)?,
            "--changes" => o.changes = val("--changes", 1000)?,
            "--remote-pods" => o.remote_pods = val("--remote-pods", 50_000)?,
            "--services" => o.services = val("--services", 10_000)?,
            "--policies" => o.policies = val("--policies", 5_000)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// HTTP/1.1 with keep-alive to the API server, from inside the node's
/// namespace (the connection is made there, then used from here).
struct Http(BufReader<TcpStream>);

impl Http {
    fn call(
        &mut self,
        method: &str,
        path: &str,
        ct: &str,
        body: &Value,
    ) -> Result<(u16, Value), String> {
        let b = body.to_string();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        );
        self.0.get_mut().write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut status = String::new();
        self.0.read_line(&mut status).map_err(|e| e.to_string())?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("bad status line")?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.0.read_line(&mut h).map_err(|e| e.to_string())?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0; len];
        self.0.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok((code, serde_json::from_slice(&buf).unwrap_or(Value::Null)))
    }

    fn post(&mut self, path: &str, body: Value) -> Result<(), String> {
        match self.call("POST", path, "application/json", &body)? {
            (c, _) if (200..300).contains(&c) => Ok(()),
            (c, v) => Err(format!("POST {path}: {c} {v}")),
        }
    }

    fn patch(&mut self, path: &str, body: Value) -> Result<(), String> {
        match self.call("PATCH", path, "application/merge-patch+json", &body)? {
            (c, _) if (200..300).contains(&c) => Ok(()),
            (c, v) => Err(format!("PATCH {path}: {c} {v}")),
        }
    }
}

fn rss_mib(lab: &NodeLab) -> f64 {
    lab.agent_pids().first().map_or(0.0, |p| ciliate_lab::bench::rss_mib(*p))
}

fn slice(name: &str, ips: &[String]) -> Value {
    let eps: Vec<Value> =
        ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "endpoints": eps})
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
}

fn backends(lab: &NodeLab, name: &str) -> Vec<String> {
    let svcs: Vec<ciliate_api::models::Service> =
        lab.client().get("/v1/service").unwrap_or_default();
    svcs.iter()
        .find(|s| s.spec.name == name)
        .map(|s| s.spec.backends.iter().map(|b| b.ip.to_string()).collect())
        .unwrap_or_default()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-k8s-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = parse_opts()?;
    let bins = Binaries::beside_current_exe().map_err(|e| e.to_string())?;
    let apiserver = bins.agent.with_file_name("ciliate-apiserver");
    let name = format!("k8sb{}", token());
    let kubeconfig = std::env::temp_dir().join(format!("{name}.kubeconfig"));
    std::fs::write(&kubeconfig, ciliate_apiserver::kubeconfig(&format!("http://{API}")))
        .map_err(|e| e.to_string())?;
    let mut cfg = NodeLabConfig::new(&name, 0, bins);
    cfg.agent_args = vec!["--k8s-kubeconfig-path".into(), kubeconfig.clone().into()];
    let lab = NodeLab::up(cfg).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&kubeconfig);
    drop(
        lab.node
            .spawn_detached(&[&apiserver.to_string_lossy(), "--listen", API])
            .map_err(|e| e.to_string())?,
    );
    ciliate_lab::node::wait_listening(&lab.node, 6443).map_err(|e| e.to_string())?;
    let stream = lab
        .node
        .run(|| TcpStream::connect(API))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut api = Http(BufReader::new(stream));
    let node = lab.node.name().to_string();
    // The agent's watches are up once the pod store answers: the first pod
    // below is timed like the others.
    std::thread::sleep(Duration::from_secs(2));

    println!(
        "pod created in the API -> endpoint ready with its policy ({} pods, one at a time)",
        o.pods
    );
    api.post(
        "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies",
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "bench"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "bench"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}}),
    )?;
    let mut ready = Vec::new();
    let mut pods = Vec::new();
    for i in 0..o.pods {
        let pname = format!("p{i}");
        let t = Instant::now();
        api.post(
            "/api/v1/namespaces/default/pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-{pname}"), "labels": {"app": "bench", "i": i.to_string()}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}),
        )?;
        let pod = lab.add_pod_in(&pname, "default", &[]).map_err(|e| e.to_string())?;
        ready.push(t.elapsed().as_secs_f64() * 1e3);
        let ep: Vec<ciliate_api::models::Endpoint> =
            lab.client().get("/v1/endpoint").map_err(|e| e.to_string())?;
        let ep = ep.iter().find(|e| e.ip == pod.state.ip).ok_or("no endpoint")?;
        if ep.ingress_enforcement == "Disabled" {
            return Err(format!("pod {pname}: endpoint ready without its policy"));
        }
        pods.push(pod);
    }
    println!(
        "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (API write + CNI ADD; ingress policy enforced on every one)",
        pct(&mut ready.clone(), 0.5),
        pct(&mut ready.clone(), 0.99),
        pct(&mut ready, 1.0)
    );

    println!(
        "Service with 100 endpoints: one replaced in its EndpointSlice -> in the agent's service ({} changes)",
        o.changes
    );
    let mut ips: Vec<String> =
        (0..100).map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1)).collect();
    api.post("/api/v1/namespaces/default/services", service("big", "10.96.60.1"))?;
    api.post("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", slice("big", &ips))?;
    let t = Instant::now();
    while backends(&lab, "default/big").len() != 100 {
        if t.elapsed() > Duration::from_secs(20) {
            return Err("the Service's 100 backends never arrived".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut lat = Vec::new();
    for c in 0..o.changes {
        let new_ip = format!("10.2.{}.{}", c / 250, c % 250 + 1);
        ips[c % 100] = new_ip.clone();
        let t = Instant::now();
        let eps = slice("big", &ips)["endpoints"].clone();
        api.patch(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/big-1",
            json!({"endpoints": eps}),
        )?;
        while !backends(&lab, "default/big").contains(&new_ip) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("change {c} never reached the agent"));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (API write -> maps written, polled every 0.5 ms)",
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat.clone(), 0.99),
        pct(&mut lat, 1.0)
    );

    let before = rss_mib(&lab);
    println!(
        "agent memory: {} pods on other nodes with their CiliumEndpoints and {} identities, {} Services with EndpointSlices, {} CiliumNetworkPolicies",
        o.remote_pods,
        o.remote_pods.div_ceil(10),
        o.services,
        o.policies
    );
    let t = Instant::now();
    let ids = o.remote_pods.div_ceil(10);
    for i in 0..ids {
        api.post("/apis/cilium.io/v2/ciliumidentities", json!({"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
            "metadata": {"name": (100_000 + i).to_string()},
            "security-labels": {"k8s:app": format!("remote{i}"), "k8s:io.kubernetes.pod.namespace": "default"}}))?;
    }
    for i in 0..o.remote_pods {
        let (n, ip) = (i / 100, format!("10.3.{}.{}", i / 250, i % 250 + 1));
        let pname = format!("remote-{i}");
        api.post("/api/v1/namespaces/default/pods", json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pname, "labels": {"app": format!("remote{}", i % ids)}},
            "spec": {"nodeName": format!("other{n}"), "containers": [{"name": "c", "image": "x"}]}}))?;
        api.post("/apis/cilium.io/v2/namespaces/default/ciliumendpoints", json!({"apiVersion": "cilium.io/v2",
            "kind": "CiliumEndpoint", "metadata": {"name": pname, "labels": {"ciliate.io/node": format!("other{n}")}}}))?;
        api.patch(&format!("/apis/cilium.io/v2/namespaces/default/ciliumendpoints/{pname}/status"), json!({"status": {
            "id": i % 4000 + 1, "identity": {"id": 100_000 + i % ids},
            "networking": {"addressing": [{"ipv4": ip}], "node": format!("192.168.{}.{}", 100 + n / 250, n % 250 + 1)}}}))?;
    }
    for i in 0..o.services {
        let svc = format!("s{i}");
        api.post(
            "/api/v1/namespaces/default/services",
            service(&svc, &format!("10.97.{}.{}", i / 250, i % 250 + 1)),
        )?;
        let eps: Vec<String> = (0..3)
            .map(|k| format!("10.3.{}.{}", (i * 3 + k) % 20, (i * 3 + k) % 250 + 1))
            .collect();
        api.post("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", slice(&svc, &eps))?;
    }
    for i in 0..o.policies {
        api.post("/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies", json!({"apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy", "metadata": {"name": format!("pol{i}")},
            "spec": {"endpointSelector": {"matchLabels": {"app": format!("remote{}", i % ids)}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": format!("remote{}", (i + 1) % ids)}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}))?;
    }
    let written = t.elapsed();
    // Converged: every service, remote endpoint and policy in the agent.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st: ciliate_api::models::Status =
            lab.client().get("/v1/status").map_err(|e| e.to_string())?;
        let svcs: Vec<Value> = lab.client().get("/v1/service").map_err(|e| e.to_string())?;
        let pol: Value = lab.client().get("/v1/policy").map_err(|e| e.to_string())?;
        let rules = pol["rules"].as_array().map_or(0, Vec::len);
        if st.remote_endpoints >= o.remote_pods && svcs.len() > o.services && rules > o.policies {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not converged after 120 s: {} remote endpoints, {} services, {} rules",
                st.remote_endpoints,
                svcs.len(),
                rules
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let converged = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_mib(&lab);
    println!(
        "  written in {:.1} s, agent converged {:.1} s after the first write; RSS {before:.1} MiB before, {after:.1} MiB after (goal < 100 MiB)",
        written.as_secs_f64(),
        converged.as_secs_f64()
    );
    drop(pods);
    Ok(())
}
