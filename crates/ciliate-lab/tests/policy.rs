//! Policy end to end on the lab: a CiliumNetworkPolicy imported through the
//! agent's API is enforced by the datapath on real traffic, a bad file is
//! refused without touching the policy in force, and deleting the policy
//! opens the traffic again. Needs root; CI runs as root.

use std::time::Duration;

use ciliate_api::{
    client::method,
    models::{Endpoint, PolicyChange, PolicyImport, TracePeer, TraceRequest},
};
use ciliate_lab::{
    Netns,
    names::token,
    node::{Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: pod2-from-pod1
  namespace: default
  labels: {test: e2e}
spec:
  endpointSelector:
    matchLabels: {app: pod2}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: pod1}
    toPorts:
    - ports: [{port: "7", protocol: TCP}]
"#;

fn reaches(lab: &NodeLab, from: &Netns, proto: &str, to: std::net::Ipv4Addr) -> bool {
    lab.reaches(from, proto, to, ECHO_PORT, None)
}

fn import(lab: &NodeLab, text: &str) -> Result<PolicyChange, String> {
    lab.client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: text.into() }))
        .map_err(|e| e.to_string())
}

#[test]
fn an_imported_policy_is_enforced_on_real_traffic() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 3, bins)).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    let (p1, p2, p3) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let ip2 = p2.state.ip;
    assert!(reaches(&lab, &p3.ns, "tcp", ip2), "open before any policy");

    let rev = import(&lab, POLICY).unwrap();
    assert_eq!((rev.revision, rev.rules), (1, 1));

    // `policy trace` and real traffic agree, case by case.
    let cases = [
        (p1, p2, "tcp", true),
        (p3, p2, "tcp", false),
        (p1, p2, "udp", false),
        (p2, p1, "tcp", true),
        (p2, p3, "udp", true),
    ];
    for (src, dst, proto, allowed) in cases {
        let req = TraceRequest {
            src: TracePeer { endpoint: Some(src.state.endpoint_id), ..Default::default() },
            dst: TracePeer { endpoint: Some(dst.state.endpoint_id), ..Default::default() },
            proto: proto.into(),
            dport: ECHO_PORT,
        };
        let t: serde_json::Value =
            lab.client().call(method::POST, "/v1/policy/trace", Some(&req)).unwrap();
        let what = format!("{} → {} {proto}", src.state.name, dst.state.name);
        assert_eq!(t["verdict"] == "ALLOWED", allowed, "trace of {what}: {t}");
        assert_eq!(reaches(&lab, &src.ns, proto, dst.state.ip), allowed, "traffic of {what}");
    }
    assert!(reaches(&lab, &lab.node, "tcp", ip2), "the host may always reach its endpoints");

    // The endpoint list shows the enforcement.
    let eps: Vec<Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    let e2 = eps.iter().find(|e| e.id == p2.state.endpoint_id).unwrap();
    assert_eq!(
        (e2.ingress_enforcement.as_str(), e2.egress_enforcement.as_str()),
        ("Enabled", "Disabled")
    );

    // A bad file is refused and changes nothing.
    let bad = POLICY.replace("protocol: TCP", "protocol: TCPX");
    let e = import(&lab, &bad).unwrap_err();
    assert!(e.contains("protocol TCPX"), "{e}");
    let p: serde_json::Value = lab.client().get("/v1/policy").unwrap();
    assert_eq!(p["revision"], 1);
    assert!(!reaches(&lab, &p3.ns, "tcp", ip2), "the policy in force is unchanged");

    // Deleting it by its labels opens the traffic again.
    let del: PolicyChange =
        lab.client().call(method::DELETE, "/v1/policy?labels=k8s:test%3De2e", None::<&()>).unwrap();
    assert_eq!((del.rules, del.revision), (1, 2));
    assert!(reaches(&lab, &p3.ns, "tcp", ip2), "open again");
}

#[test]
fn cidr_egress_rules_with_excepts_are_enforced_on_real_traffic() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 2, bins)).unwrap();
    // "Outside" addresses: local to the node namespace, outside the pod CIDR.
    for a in ["192.0.2.1/32", "192.0.2.200/32", "198.51.100.1/32"] {
        lab.node.ip(&["addr", "add", a, "dev", "lo"]).unwrap();
    }
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(lab.node.spawn_detached(&[&echo, "serve", &ECHO_PORT.to_string()]).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
    assert!(reaches(&lab, &p1.ns, "tcp", ip("198.51.100.1")), "open before any policy");

    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod1}}
  egress:
  - toCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
    toPorts: [{ports: [{port: "7", protocol: TCP}]}]
"#;
    import(&lab, policy).unwrap();
    assert!(reaches(&lab, &p1.ns, "tcp", ip("192.0.2.1")), "inside the CIDR");
    assert!(!reaches(&lab, &p1.ns, "tcp", ip("192.0.2.200")), "inside the except");
    assert!(!reaches(&lab, &p1.ns, "tcp", ip("198.51.100.1")), "outside the CIDR");
    assert!(!reaches(&lab, &p1.ns, "tcp", p2.state.ip), "pods are not CIDRs");
    assert!(reaches(&lab, &p2.ns, "tcp", ip("198.51.100.1")), "pod2 is not selected");

    // The CIDRs are in the ipcache with local identities; they go with the policy.
    let ipc = ciliate_datapath::maps::IpcacheMap::from_pin_dir(&lab.pins_dir).unwrap();
    let id = ipc.lookup(ip("192.0.2.1")).unwrap().unwrap().identity;
    assert_ne!(id & ciliate_common::identity::LOCAL_FLAG, 0, "a local CIDR identity");
    lab.client().call::<PolicyChange>(method::DELETE, "/v1/policy?all=true", None::<&()>).unwrap();
    let id = ipc.lookup(ip("192.0.2.1")).unwrap().unwrap().identity;
    assert_eq!(id, ciliate_common::identity::WORLD, "back to the world");
    assert!(reaches(&lab, &p1.ns, "tcp", ip("198.51.100.1")));
}

#[test]
fn a_named_port_means_the_port_the_pod_declared() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 1, bins)).unwrap();
    // pod2 declares its echo port by name through the CNI configuration.
    let ns = Netns::create(&format!("{}-pod2", lab.config.lab)).unwrap();
    let mut conf: serde_json::Value =
        serde_json::from_str(&lab.cni_config(&[("app", "server")])).unwrap();
    conf["args"]["namedPorts"] = serde_json::json!({"echo": ECHO_PORT});
    let (out, ok) =
        lab.cni("ADD", ns.name(), &ns.path().display().to_string(), &conf.to_string()).unwrap();
    assert!(ok, "{out}");
    let server_ip: std::net::Ipv4Addr = {
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        r["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").parse().unwrap()
    };
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(ns.spawn_detached(&[&echo, "serve", &ECHO_PORT.to_string()]).unwrap());
    drop(ns.spawn_detached(&[&echo, "serve", "8"]).unwrap());
    std::thread::sleep(Duration::from_millis(300));

    let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: named, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - toPorts: [{ports: [{port: echo, protocol: TCP}]}]
"#;
    import(&lab, policy).unwrap();
    let client = &lab.pods[0];
    assert!(reaches(&lab, &client.ns, "tcp", server_ip), "port 7 is \"echo\"");
    let other = client.ns.exec(&[&echo, "tcp", &format!("{server_ip}:8"), "x"]);
    assert!(other.is_err(), "port 8 has no name the policy allows");
}
