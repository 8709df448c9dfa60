//! The policy truth table: pods in two namespaces, the host and the world
//! (the lab's external host), one set of policies covering allow by labels,
//! by namespace, by entity, port ranges, deny over allow, egress
//! enforcement, a Kubernetes NetworkPolicy, Cilium's world lockdown next to
//! an unrelated CIDR rule naming the world's network, `enableDefaultDeny`
//! off with a deny, and empty sections; for every (source, destination,
//! port, protocol) the verdict an independent oracle written from the
//! policy text expects is checked twice: by `policy trace` and by real
//! traffic. 336 cases. Needs root; CI runs as root.

use std::time::Duration;

use ciliate_api::{
    client::method,
    models::{PolicyChange, PolicyImport, TracePeer, TraceRequest},
};
use ciliate_lab::{
    Netns,
    names::token,
    node::{Binaries, EXTERNAL_IP, NodeLab, NodeLabConfig, Pod},
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
---
# open (dev): Cilium's lockdown, everything but the world.
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: open-lockdown}
spec:
  endpointSelector: {matchLabels: {app: open}}
  ingressDeny:
  - fromEntities: [world]
  ingress:
  - fromEntities: [all]
---
# db (shop) names the world's network (192.168.200.0/24, where the external
# host is) without going into default deny at egress, and never reaches
# tool (dev).
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-out, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  enableDefaultDeny: {egress: false}
  egress:
  - toCIDR: [192.168.200.0/24]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: tool, io.kubernetes.pod.namespace: dev}}]
---
# Empty sections are no rules: tool's ingress stays open.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tool-empty, namespace: dev}
spec:
  endpointSelector: {matchLabels: {app: tool}}
  ingress: []
---
# ... and so does web's (dev) egress.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-empty, namespace: dev}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress: []
"#;

const PORTS: [u16; 4] = [7, 80, 443, 8080];
const PROTOS: [&str; 2] = ["tcp", "udp"];

/// A pod of the table: (namespace, app) and its lab pod.
struct P<'a> {
    ns: &'static str,
    app: &'static str,
    pod: &'a Pod,
}

/// Who sends: the node itself, the world (the external host) or a pod.
#[derive(Clone, Copy)]
enum Src<'a> {
    Host,
    World,
    Pod(&'a P<'a>),
}

/// The oracle: what the policy text above says, written independently of
/// the implementation.
fn expected(src: Src<'_>, dst: &P<'_>, port: u16, proto: &str) -> bool {
    let tcp = proto == "tcp";
    // Egress of the source: tool only to web pods (and the host); db
    // anywhere but tool (its egress is not default deny).
    if let Src::Pod(s) = src {
        if (s.ns, s.app) == ("dev", "tool") && dst.app != "web" {
            return false;
        }
        if (s.ns, s.app) == ("shop", "db") && (dst.ns, dst.app) == ("dev", "tool") {
            return false;
        }
    }
    // Ingress of the destination; the host may always reach endpoints.
    let s = match src {
        Src::Host => return true,
        // Only tool takes anything from the world (no ingress rules: an
        // empty list is none); open's lockdown keeps it out although db's
        // policy gave its network a CIDR identity.
        Src::World => return (dst.ns, dst.app) == ("dev", "tool"),
        Src::Pod(s) => s,
    };
    match (dst.ns, dst.app) {
        ("shop", "db") => (s.ns, s.app) == ("shop", "api") && port == 80 && tcp,
        ("shop", "web") => s.ns == "shop" && tcp && (7..=100).contains(&port),
        ("shop", "api") => s.ns == "shop" && !(s.app == "web" && port == 80),
        ("dev", "web") => s.ns == "shop" && port == 8080 && tcp,
        ("dev", "open") => true, // everything but the world
        _ => true,               // dev/tool: no ingress rules
    }
}

#[test]
fn every_case_agrees_between_the_oracle_trace_and_traffic() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 0, bins)).unwrap();
    let specs = [
        ("shop", "web"),
        ("shop", "api"),
        ("shop", "db"),
        ("dev", "web"),
        ("dev", "tool"),
        ("dev", "open"),
    ];
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
    assert_eq!(change.rules, 9);
    // The world's identity as the datapath sees it: db's CIDR rule gave
    // the external host's network a CIDR identity.
    let ipc = ciliate_datapath::maps::IpcacheMap::from_pin_dir(&lab.pins_dir).unwrap();
    let world = ipc.lookup(EXTERNAL_IP).unwrap().unwrap().identity;
    assert_ne!(world & ciliate_common::identity::LOCAL_FLAG, 0, "{world}");

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
    let sources: Vec<Src<'_>> =
        [Src::Host, Src::World].into_iter().chain(table.iter().map(Src::Pod)).collect();
    for src in &sources {
        for dst in &table {
            if matches!(src, Src::Pod(s) if s.pod.state.name == dst.pod.state.name) {
                continue;
            }
            for port in PORTS {
                for proto in PROTOS {
                    cases += 1;
                    let want = expected(*src, dst, port, proto);
                    allowed += usize::from(want);
                    let (peer, from, name) = match src {
                        Src::Pod(s) => (
                            TracePeer {
                                endpoint: Some(s.pod.state.endpoint_id),
                                ..Default::default()
                            },
                            &s.pod.ns,
                            format!("{}/{}", s.ns, s.app),
                        ),
                        Src::Host => (
                            TracePeer { identity: Some(1), ..Default::default() },
                            &lab.node,
                            "host".into(),
                        ),
                        Src::World => (
                            TracePeer { identity: Some(world), ..Default::default() },
                            &lab.external,
                            "world".into(),
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
    assert_eq!(cases, 336);
    // Both verdicts are well represented (the table is not trivially open).
    assert!((110..=230).contains(&allowed), "{allowed} of {cases} allowed");
    assert!(wrong.is_empty(), "{} of {cases} cases disagree:\n{}", wrong.len(), wrong.join("\n"));
}
