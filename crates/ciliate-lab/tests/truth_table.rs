//! The policy truth table: pods in two namespaces, one set of policies
//! covering allow by labels, by namespace, by entity, port ranges, deny over
//! allow, egress enforcement and a Kubernetes NetworkPolicy; for every
//! (source, destination, port, protocol) the verdict an independent oracle
//! written from the policy text expects is checked twice: by `policy trace`
//! and by real traffic. 200 cases. Needs root; CI runs as root.

use std::time::Duration;

use ciliate_api::{
    client::method,
    models::{PolicyChange, PolicyImport, TracePeer, TraceRequest},
};
use ciliate_lab::{
    Netns,
    names::token,
    node::{Binaries, NodeLab, NodeLabConfig, Pod},
};

const POLICIES: &str = r#"
# db (shop) takes TCP 80 from api (shop) only.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
# web (shop) takes TCP 7-100 from its own namespace.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-shop, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "7", endPort: 100, protocol: TCP}]}]
---
# api (shop) takes everything from its namespace, but not port 80 from web.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: ANY}]}]
---
# tool (dev) may only talk to web pods of any namespace, and to the host.
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: tool-egress}
spec:
  endpointSelector:
    matchLabels: {app: tool, io.kubernetes.pod.namespace: dev}
  egress:
  - toEndpoints:
    - matchExpressions: [{key: app, operator: In, values: [web]}]
  - toEntities: [host]
---
# web (dev) takes TCP 8080 from namespace shop.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dev-web, namespace: dev}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}}]
    ports: [{port: 8080}]
"#;

const PORTS: [u16; 4] = [7, 80, 443, 8080];
const PROTOS: [&str; 2] = ["tcp", "udp"];

/// A pod of the table: (namespace, app) and its lab pod.
struct P<'a> {
    ns: &'static str,
    app: &'static str,
    pod: &'a Pod,
}

/// The oracle: what the policy text above says, written independently of
/// the implementation. `None` as source is the host.
fn expected(src: Option<&P<'_>>, dst: &P<'_>, port: u16, proto: &str) -> bool {
    let tcp = proto == "tcp";
    // Egress of the source.
    if let Some(s) = src
        && (s.ns, s.app) == ("dev", "tool")
        && dst.app != "web"
    {
        return false;
    }
    // Ingress of the destination; the host may always reach endpoints.
    let Some(s) = src else { return true };
    match (dst.ns, dst.app) {
        ("shop", "db") => (s.ns, s.app) == ("shop", "api") && port == 80 && tcp,
        ("shop", "web") => s.ns == "shop" && tcp && (7..=100).contains(&port),
        ("shop", "api") => s.ns == "shop" && !(s.app == "web" && port == 80),
        ("dev", "web") => s.ns == "shop" && port == 8080 && tcp,
        _ => true, // dev/tool: no ingress policy
    }
}

#[test]
fn two_hundred_cases_agree_between_the_oracle_trace_and_traffic() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 0, bins)).unwrap();
    let specs = [("shop", "web"), ("shop", "api"), ("shop", "db"), ("dev", "web"), ("dev", "tool")];
    let pods: Vec<Pod> = specs
        .iter()
        .enumerate()
        .map(|(i, (ns, app))| {
            lab.add_pod_in(&format!("pod{}", i + 1), ns, &[("app", app)]).unwrap()
        })
        .collect();
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    for p in &pods {
        for port in PORTS.iter().filter(|p| **p != 7) {
            drop(p.ns.spawn_detached(&[&echo, "serve", &port.to_string()]).unwrap());
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let table: Vec<P<'_>> =
        specs.iter().zip(&pods).map(|((ns, app), pod)| P { ns, app, pod }).collect();

    let change: PolicyChange = lab
        .client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: POLICIES.into() }))
        .unwrap();
    assert_eq!(change.rules, 5);

    let reaches = |from: &Netns, proto: &str, to: std::net::Ipv4Addr, port: u16| {
        lab.reaches(from, proto, to, port, Some(400))
    };
    let trace = |src: TracePeer, dst: &P<'_>, proto: &str, port: u16| {
        let req = TraceRequest {
            src,
            dst: TracePeer { endpoint: Some(dst.pod.state.endpoint_id), ..Default::default() },
            proto: proto.into(),
            dport: port,
        };
        let t: serde_json::Value =
            lab.client().call(method::POST, "/v1/policy/trace", Some(&req)).unwrap();
        t["verdict"] == "ALLOWED"
    };

    let mut cases = 0;
    let mut allowed = 0;
    let mut wrong = Vec::new();
    let sources: Vec<Option<&P<'_>>> =
        std::iter::once(None).chain(table.iter().map(Some)).collect();
    for src in &sources {
        for dst in &table {
            if src.is_some_and(|s| s.pod.state.name == dst.pod.state.name) {
                continue;
            }
            for port in PORTS {
                for proto in PROTOS {
                    cases += 1;
                    let want = expected(*src, dst, port, proto);
                    allowed += usize::from(want);
                    let (peer, from, name) = match src {
                        Some(s) => (
                            TracePeer {
                                endpoint: Some(s.pod.state.endpoint_id),
                                ..Default::default()
                            },
                            &s.pod.ns,
                            format!("{}/{}", s.ns, s.app),
                        ),
                        None => (
                            TracePeer { identity: Some(1), ..Default::default() },
                            &lab.node,
                            "host".into(),
                        ),
                    };
                    let traced = trace(peer, dst, proto, port);
                    let real = reaches(from, proto, dst.pod.state.ip, port);
                    if traced != want || real != want {
                        wrong.push(format!(
                            "{name} -> {}/{} {port}/{proto}: expected {want}, trace {traced}, traffic {real}",
                            dst.ns, dst.app
                        ));
                    }
                }
            }
        }
    }
    assert_eq!(cases, 200);
    // Both verdicts are well represented (the table is not trivially open).
    assert!((60..=140).contains(&allowed), "{allowed} of {cases} allowed");
    assert!(wrong.is_empty(), "{} of {cases} cases disagree:\n{}", wrong.len(), wrong.join("\n"));
}
