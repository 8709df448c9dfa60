//! Malformed input against a live agent: more than 150 bad requests
//! (endpoint creates, service updates, policies, IPAM, traces, run-time
//! options, IDs in paths, bodies that are no JSON), then bad calls of the
//! CNI plugin (configurations, commands, arguments, a missing namespace). Each request is refused with a 4xx status and a
//! message naming what was wrong; afterwards the agent's state (endpoints,
//! identities, services, policy, IPAM) and every map that holds state (lxc,
//! ipcache, policy, services, backends, reverse NAT, endpoint
//! configuration) and the cluster's store are exactly as before, and the
//! agent still answers.
//! Needs root; CI runs as root.

use std::{path::Path, process::Command};

use ciliate_lab::{
    names::token,
    node::{Binaries, NodeLab, NodeLabConfig},
};
use serde_json::{Value, json};

/// One bad request: method, path, raw body, and a word its refusal must
/// contain.
struct Bad {
    method: &'static str,
    path: String,
    body: String,
    says: String,
}

fn bad(method: &'static str, path: &str, body: impl Into<String>, says: &str) -> Bad {
    Bad { method, path: path.into(), body: body.into(), says: says.into() }
}

/// `body` with `key` set to `v` (or removed when `v` is null).
fn with(body: &Value, key: &str, v: Value) -> String {
    let mut b = body.clone();
    if v.is_null() {
        b.as_object_mut().unwrap().remove(key);
    } else {
        b[key] = v;
    }
    b.to_string()
}

/// Send one request over the API socket with curl; (status, body).
fn send(sock: &Path, b: &Bad) -> (u16, String) {
    use std::io::Write as _;
    let mut child = Command::new("curl")
        .args(["-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", b.method, "-H", "Content-Type: application/json", "--data-binary", "@-"])
        .arg(format!("http://localhost{}", b.path))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running curl");
    child.stdin.take().unwrap().write_all(b.body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Everything a bad request must leave as it was.
fn snapshot(sock: &Path, pins_dir: &Path) -> Value {
    let api = |p: &str| -> Value {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(sock)
            .arg(format!("http://localhost{p}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("GET {p}: {e}"))
    };
    let mut endpoints = api("/v1/endpoint");
    for e in endpoints.as_array_mut().into_iter().flatten() {
        e.as_object_mut().unwrap().remove("state");
    }
    let status = api("/v1/status");
    // Every pinned map with its entries (bpftool), but those traffic or
    // time moves (conntrack, NAT, fragments, socket LB, affinity, counters).
    let mut maps = ciliate_lab::pins::maps(pins_dir);
    maps.retain(|name, _| {
        ![
            "ciliate_ct4_global",
            "ciliate_ct_any4_global",
            "ciliate_snat_v4_external",
            "ciliate_ipv4_frag_datagrams",
            "ciliate_lb4_reverse_sk",
            "ciliate_lb4_affinity",
            "ciliate_metrics",
            "ciliate_events_lost",
        ]
        .contains(&name.as_str())
    });
    assert!(
        maps.contains_key("ciliate_policy") && maps.contains_key("ciliate_lxc"),
        "{:?}",
        maps.keys()
    );
    json!({
        "endpoints": endpoints,
        "identities": api("/v1/identity"),
        "services": api("/v1/service"),
        "policy": api("/v1/policy"),
        "ipam_used": status["ipam_used"],
        // The cluster's store too: no identity allocated for a refused ADD.
        "kvstore": api("/v1/kvstore"),
        "maps": maps,
    })
}

/// The bad requests.
fn cases(pod_ip: &str, free_ip: &str) -> Vec<Bad> {
    let mut v = Vec::new();
    // Bodies that are no JSON, or not the right JSON, on every route that
    // takes one.
    for (m, p) in [
        ("PUT", "/v1/endpoint"),
        ("PUT", "/v1/service"),
        ("PUT", "/v1/policy"),
        ("POST", "/v1/ipam"),
        ("POST", "/v1/policy/trace"),
        ("PATCH", "/v1/config"),
        ("PATCH", "/v1/endpoint/1/config"),
    ] {
        for body in ["", "{", "not json", "[]", "42", "null", "{\"x\":", "\u{0}\u{1}\u{2}"] {
            let says = if body.starts_with('{') { "" } else { "a JSON object is expected" };
            v.push(bad(m, p, body, says));
        }
    }
    // Endpoint creates (the CNI's ADD).
    let ep = json!({
        "container_id": "malformed", "netns": "/run/netns/none", "ifname": "eth0",
        "host_ifname": "lxcmalformed", "ip": free_ip, "mac": "0a:00:00:00:00:09",
        "labels": {"app": "x"}, "pod_name": "default/x",
    });
    for k in ["container_id", "netns", "ifname", "host_ifname", "ip", "mac", "labels"] {
        v.push(bad("PUT", "/v1/endpoint", with(&ep, k, Value::Null), k));
        v.push(bad("PUT", "/v1/endpoint", with(&ep, k, json!(12345)), k));
    }
    for mac in ["nope", "0a:00:00:00:00", "0a:00:00:00:00:00:00", "zz:00:00:00:00:01", "", "0a-00"]
    {
        v.push(bad("PUT", "/v1/endpoint", with(&ep, "mac", json!(mac)), "MAC"));
    }
    for ip in ["x", "10.200.0.300", "::1", "1.2.3"] {
        v.push(bad("PUT", "/v1/endpoint", with(&ep, "ip", json!(ip)), "ip"));
    }
    v.push(bad("PUT", "/v1/endpoint", with(&ep, "ip", json!(pod_ip)), "allocated"));
    v.push(bad("PUT", "/v1/endpoint", with(&ep, "ip", json!("10.200.0.222")), "allocated"));
    for name in ["", "x".repeat(16).as_str(), "a/b", "lxc with space"] {
        v.push(bad("PUT", "/v1/endpoint", with(&ep, "host_ifname", json!(name)), "host_ifname"));
    }
    v.push(bad("PUT", "/v1/endpoint", with(&ep, "container_id", json!("")), "container_id"));
    for l in [
        "reserved:host",
        "reserved:world",
        "reserved:health",
        "cidr:10.0.0.0/8",
        "reserved:remote-node",
    ] {
        let says = l.split(':').next().unwrap_or_default();
        v.push(bad("PUT", "/v1/endpoint", with(&ep, "labels", json!({ l: "" })), says));
    }
    v.push(bad("PUT", "/v1/endpoint", with(&ep, "labels", json!(["app=x"])), "labels"));
    v.push(bad("PUT", "/v1/endpoint", with(&ep, "colour", json!("blue")), "colour"));
    // Service updates.
    let svc = json!({
        "id": 900, "name": "default/m", "frontend": {"ip": "10.96.9.9", "port": 80},
        "backends": [{"ip": pod_ip, "port": 7}],
    });
    for (k, val, says) in [
        ("id", json!(0), "id"),
        ("id", json!(70000), "id"),
        ("id", json!("nine"), "id"),
        ("frontend", json!({"ip": "x", "port": 80}), "frontend"),
        ("frontend", json!({"ip": "10.96.9.9", "port": 0}), "port"),
        ("frontend", json!({"ip": "10.96.9.9", "port": 70000}), "port"),
        ("frontend", json!({"ip": "10.96.9.9", "port": 80, "protocol": "SCTP"}), "SCTP"),
        ("frontend", json!("10.96.9.9:80"), "frontend"),
        ("frontend", Value::Null, "frontend"),
        ("backends", json!([{"ip": "x", "port": 7}]), "backends"),
        ("backends", json!([{"ip": pod_ip, "port": 0}]), "port"),
        ("backends", json!([{"ip": pod_ip, "port": 7, "state": "Sleeping"}]), "Sleeping"),
        ("backends", json!({"ip": pod_ip}), "backends"),
        ("kind", json!("Magic"), "Magic"),
        ("algorithm", json!("roundrobin"), "roundrobin"),
        ("affinity_timeout", json!(-1), "affinity_timeout"),
        ("traffic_policy_local", json!("yes"), "traffic_policy_local"),
        ("frontend", json!({"ip": pod_ip, "port": 80}), "pod"),
    ] {
        v.push(bad("PUT", "/v1/service", with(&svc, k, val), says));
    }
    let np = with(&svc, "kind", json!("NodePort"));
    let np: Value = serde_json::from_str(&np).unwrap();
    v.push(bad(
        "PUT",
        "/v1/service",
        with(&np, "frontend", json!({"ip": "0.0.0.0", "port": 80})),
        "30000",
    ));
    let np: Value =
        serde_json::from_str(&with(&np, "frontend", json!({"ip": "0.0.0.0", "port": 30999})))
            .unwrap();
    for r in ["10.0.0.0/33", "x", "300.1.1.1/8"] {
        v.push(bad("PUT", "/v1/service", with(&np, "source_ranges", json!([r])), r));
    }
    let ranged = with(&svc, "source_ranges", json!(["10.0.0.0/8"]));
    v.push(bad("PUT", "/v1/service", ranged, "source ranges"));
    // Policies: each refused whole, naming the field.
    let doc = |spec: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: m, namespace: default}}\nspec:\n{spec}"
        )
    };
    let policies = [
        ("apiVersion: v0\nkind: CiliumNetworkPolicy\nmetadata: {name: m}\nspec: {}\n".to_owned(), "apiVersion"),
        ("apiVersion: cilium.io/v2\nkind: Banana\nmetadata: {name: m}\nspec: {}\n".to_owned(), "Banana"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {}\n".to_owned(), "name"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: m, namespace: x}\nspec:\n  endpointSelector: {}\n".to_owned(), "namespace"),
        (doc("  endpointSelector: {matchExpressions: [{key: app, operator: Near}]}\n"), "Near"),
        (doc("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: \"99999\", protocol: TCP}]}]}]\n"), "99999"),
        (doc("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: \"80\", protocol: XTP}]}]}]\n"), "XTP"),
        (doc("  endpointSelector: {}\n  egress: [{toCIDR: [\"10.0.0.0/40\"]}]\n"), "10.0.0.0/40"),
        (doc("  endpointSelector: {}\n  egress: [{toEntities: [everywhere]}]\n"), "everywhere"),
        (doc("  endpointSelector: {}\n  ingress: [{icmps: [{fields: [{type: 300}]}]}]\n"), "300"),
        (doc("  endpointSelector: {}\n  ingress: [{icmps: [{fields: [{type: 8, family: IPv6}]}]}]\n"), "IPv6"),
        (doc("  endpointSelector: {}\n  ingress: [{fromEndpoints: [{matchLabels: {app: x}}], colour: blue}]\n"), "colour"),
        (doc("  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: \"80\", endPort: 70, protocol: TCP}]}]}]\n"), "endPort"),
        (doc("  endpointSelector: {}\n  egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]}]\n"), "11.0.0.0/16"),
        ("{{{ not yaml".to_owned(), ""),
        (doc("  ingress: []\n"), "endpointSelector"),
        (doc("  endpointSelector: {matchLabels: {\"reserved:host\": \"\"}}\n  ingress: [{}]\n").replace("spec:\n", "spec:\n  bogus: 1\n"), "bogus"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: m}\nspec:\n  podSelector: {}\n  policyTypes: [Sideways]\n".to_owned(), "Sideways"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: m}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: x}}]}]\n".to_owned(), "x"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: m}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n".to_owned(), "port"),
    ];
    for (text, says) in policies {
        v.push(bad("PUT", "/v1/policy", json!({ "text": text }).to_string(), says));
    }
    v.push(bad("PUT", "/v1/policy", json!({"text": 5}).to_string(), "text"));
    v.push(bad("DELETE", "/v1/policy", "", "labels"));
    v.push(bad("DELETE", "/v1/policy?labels=", "", "labels"));
    // IPAM, traces, options.
    v.push(bad("POST", "/v1/ipam", json!({}).to_string(), "owner"));
    v.push(bad("POST", "/v1/ipam", json!({"owner": ""}).to_string(), "owner"));
    v.push(bad("DELETE", "/v1/ipam/not-an-ip", "", "not-an-ip"));
    v.push(bad("DELETE", &format!("/v1/ipam/{pod_ip}"), "", "endpoint"));
    let trace =
        json!({"src": {"identity": 1}, "dst": {"identity": 1}, "proto": "tcp", "dport": 80});
    for (k, val, says) in [
        ("proto", json!("sctp"), "sctp"),
        ("dport", json!(-1), "dport"),
        ("src", json!({}), "src"),
        ("src", json!({"identity": 1, "labels": ["k8s:a=b"]}), "exactly one"),
        ("dst", json!({"endpoint": 4000}), "4000"),
        ("dst", json!({"identity": 99999}), "99999"),
    ] {
        v.push(bad("POST", "/v1/policy/trace", with(&trace, k, val), says));
    }
    for body in [json!({"debug": "yes"}), json!({"Debugging": true}), json!({"debug": 1})] {
        v.push(bad("PATCH", "/v1/config", body.to_string(), ""));
        v.push(bad("PATCH", "/v1/endpoint/1/config", body.to_string(), ""));
    }
    v.push(bad("PATCH", "/v1/endpoint/4000/config", json!({"debug": true}).to_string(), "4000"));
    v.push(bad("PATCH", "/v1/endpoint/abc/config", json!({"debug": true}).to_string(), "abc"));
    // IDs in paths.
    for p in [
        "/v1/endpoint/abc",
        "/v1/endpoint/-1",
        "/v1/endpoint/99999",
        "/v1/identity/abc",
        "/v1/identity/-5",
        "/v1/service/abc",
        "/v1/service/0x10",
        "/v1/service/70000",
    ] {
        v.push(bad("GET", p, "", ""));
        if p.starts_with("/v1/endpoint") || p.starts_with("/v1/service") {
            v.push(bad("DELETE", p, "", ""));
        }
    }
    v.push(bad("DELETE", "/v1/endpoint", "", "container-id"));
    v.push(bad("GET", "/v1/events?type=everything", "", "everything"));
    v.push(bad("GET", "/v1/events?related-to=me", "", "me"));
    v.push(bad("POST", "/v1/status", "", "method"));
    v.push(bad("GET", "/v1/nowhere", "", ""));
    v
}

#[test]
fn bad_input_is_refused_naming_the_problem_and_changes_nothing() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cmf{}", token()), 2, bins)).unwrap();
    let sock = lab.socket.as_path();
    // A policy and a service in force, so there is state to keep.
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: keep, namespace: default}\n\
                  spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: pod1}}]}]\n";
    let _: Value = lab
        .client()
        .call(ciliate_api::client::method::PUT, "/v1/policy", Some(&json!({ "text": policy })))
        .unwrap();
    let p2 = lab.pods[1].state.ip.to_string();
    let svc = json!({"id": 5, "name": "default/keep", "frontend": {"ip": "10.96.0.5", "port": 80},
                     "backends": [{"ip": p2, "port": 7}]});
    let _: Value =
        lab.client().call(ciliate_api::client::method::PUT, "/v1/service", Some(&svc)).unwrap();
    // An address allocated to container "malformed" (so creates get past
    // the address check to the field they break).
    let alloc: Value = lab
        .client()
        .call(ciliate_api::client::method::POST, "/v1/ipam", Some(&json!({"owner": "malformed"})))
        .unwrap();
    let free = alloc["ip"].as_str().unwrap().to_owned();

    let before = snapshot(sock, &lab.pins_dir);
    let cases = cases(&p2, &free);
    assert!(cases.len() >= 150, "{} bad inputs", cases.len());
    let mut failures = Vec::new();
    for b in &cases {
        let (status, body) = send(sock, b);
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let refused = (400..500).contains(&status);
        let named = b.says.is_empty() || message.to_lowercase().contains(&b.says.to_lowercase());
        if !refused || !named || message.is_empty() {
            failures.push(format!("{} {} {:?}: {status} {body}", b.method, b.path, b.body));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} not refused as they should be:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // The CNI plugin (as the runtime calls it): bad configurations,
    // commands and arguments get a CNI error (a spec code and a message
    // naming the problem) and change nothing either.
    let pod_ns = ciliate_lab::Netns::create(&format!("{}-mf", lab.config.lab)).unwrap();
    let netns = format!("/run/netns/{}", pod_ns.name());
    let good: Value = serde_json::from_str(&lab.cni_config(&[("app", "mf")])).unwrap();
    let mut cni_cases: Vec<(String, String, String, &str)> = Vec::new();
    for (k, v, says) in [
        ("cniVersion", Value::Null, "cniVersion"),
        ("cniVersion", json!("9.9.9"), "9.9.9"),
        ("cniVersion", json!(1), "cniVersion"),
        ("name", Value::Null, "name"),
        ("mtu", json!(10), "mtu"),
        ("mtu", json!(100000), "mtu"),
        ("mtu", json!("big"), "mtu"),
        ("agent_socket", json!(5), "agent_socket"),
        ("args", json!({"labels": ["app=x"]}), "labels"),
        ("args", json!({"labels": {"app": 5}}), "app"),
        ("args", json!({"labels": {"reserved:host": ""}}), "reserved"),
        ("args", json!({"namedPorts": []}), "namedPorts"),
    ] {
        cni_cases.push(("ADD".into(), "mf1".into(), with(&good, k, v), says));
    }
    for body in ["", "{oops", "[]", "null"] {
        cni_cases.push(("ADD".into(), "mf2".into(), body.into(), ""));
    }
    cni_cases.push(("EXPLODE".into(), "mf3".into(), good.to_string(), "EXPLODE"));
    cni_cases.push(("ADD".into(), String::new(), good.to_string(), "CNI_CONTAINERID"));
    let mut cni_failures = Vec::new();
    for (command, container, config, says) in &cni_cases {
        let (out, ok) = lab.cni(command, container, &netns, config).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let code = v["code"].as_u64().unwrap_or(0);
        let msg =
            format!("{} {}", v["msg"].as_str().unwrap_or(""), v["details"].as_str().unwrap_or(""));
        if ok || !(1..=999).contains(&code) || !msg.to_lowercase().contains(&says.to_lowercase()) {
            cni_failures.push(format!("{command} {container:?} {config}: {out}"));
        }
    }
    // A namespace that is not there.
    let (out, ok) = lab.cni("ADD", "mf4", "/run/netns/not-there", &good.to_string()).unwrap();
    if ok || !out.contains("\"code\"") {
        cni_failures.push(format!("ADD into a missing namespace: {out}"));
    }
    assert!(
        cni_failures.is_empty(),
        "CNI calls not refused as they should be:\n{}",
        cni_failures.join("\n")
    );

    let after = snapshot(sock, &lab.pins_dir);
    assert_eq!(before, after, "a bad request changed the agent's state or maps");
    println!(
        "malformed input: {} bad API requests and {} bad CNI calls, all refused naming the problem; \
         state, {} maps and the store unchanged",
        cases.len(),
        cni_cases.len() + 1,
        before["maps"].as_object().map_or(0, |m| m.len())
    );
    let health: Value = lab.client().get("/v1/healthz").unwrap();
    assert_eq!(health["status"], "ok");
}
