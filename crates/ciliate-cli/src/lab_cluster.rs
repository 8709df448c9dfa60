//! `ciliate lab up --nodes N`: the multi-node lab, its services and policy,
//! and the checks that show them working.

use anyhow::Context as _;
use ciliate_api::{client::method, models::PolicyImport};
use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig, EXTERNAL_IP, Store, node_ip},
    node::{self, Binaries, ECHO_PORT, wait_listening},
};

use crate::{
    lab::{CLUSTER_IP, NODE_PORT, echo_services, result, say},
    table::Table,
};

/// Only pod1 (node1) may reach pod3 (node2) on TCP 7: the receiving node
/// decides by the identity the packet carries.
const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: pod3-from-pod1, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: pod3}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: pod1}}]
    toPorts: [{ports: [{port: "7", protocol: TCP}]}]
"#;

/// The lab's echo Service, its EndpointSlice (backends `ips`) and, with
/// `policy`, the CiliumNetworkPolicy as objects of the lab's API server;
/// then wait until every agent serves and enforces them.
fn k8s_objects(lab: &ClusterLab, ips: &[std::net::Ipv4Addr], policy: bool) -> anyhow::Result<()> {
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": CLUSTER_IP, "selector": {"role": "echo"},
            "ports": [
                {"name": "tcp", "port": ECHO_PORT, "protocol": "TCP", "nodePort": NODE_PORT},
                {"name": "udp", "port": ECHO_PORT, "protocol": "UDP", "nodePort": NODE_PORT + 1}]},
    });
    lab.k8s_post("/api/v1/namespaces/default/services", &svc)?;
    let endpoints: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"},
                  {"name": "udp", "port": ECHO_PORT, "protocol": "UDP"}],
        "endpoints": endpoints,
    });
    lab.k8s_post("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", &slice)?;
    say(format!(
        "Service default/echo (ClusterIP {CLUSTER_IP}:{ECHO_PORT} TCP/UDP, NodePort {NODE_PORT}) \
         and its EndpointSlice ({} backends) created in the API",
        ips.len()
    ));
    if policy {
        let doc: serde_json::Value = serde_yaml_ng::from_str(POLICY)?;
        lab.k8s_post("/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies", &doc)?;
        say(
            "CiliumNetworkPolicy default/pod3-from-pod1 created in the API: only pod1 reaches pod3 (TCP 7)",
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for n in &lab.nodes {
        loop {
            let svcs: Vec<ciliate_api::models::Service> = n.client().get("/v1/service")?;
            let served = svcs.iter().filter(|s| s.spec.name == "default/echo").count() >= 4;
            let rules: serde_json::Value = n.client().get("/v1/policy")?;
            let enforced =
                !policy || rules.to_string().contains("CiliumNetworkPolicy/default/pod3-from-pod1");
            if served && enforced {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node {} did not take the Service and the policy from the API in 20 s",
                n.ns.name()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    say(format!(
        "every agent serves and enforces them; kubectl: ip netns exec {} kubectl --kubeconfig {} get pods,svc,cnp,cep",
        lab.underlay.name(),
        lab.kubeconfig().display()
    ));
    Ok(())
}

pub fn up(
    name: &str,
    nodes: usize,
    pods: usize,
    routing: &str,
    kvstore: &str,
    k8s: bool,
) -> anyhow::Result<()> {
    let removed = node::down(name)?;
    if !removed.is_empty() {
        say(format!("removed the previous lab {name} ({} namespaces)", removed.len()));
    }
    let store = match kvstore {
        "local" => Store::Local,
        "etcd" => Store::Etcd,
        other => anyhow::bail!("kvstore {other:?}: local or etcd"),
    };
    let bins = Binaries::beside_current_exe()?;
    let echo = bins.echo.to_string_lossy().into_owned();
    let mut cfg = ClusterLabConfig::new(name, nodes, pods, bins);
    cfg.routing = routing.into();
    cfg.store = store;
    cfg.k8s = k8s;
    say(format!(
        "creating {nodes} nodes on an underlay ({routing} routing, {kvstore} kvstore{}{}), \
         an external host, {pods} pods per node through ciliate-cni",
        if store == Store::Etcd { ", etcd in the underlay namespace" } else { "" },
        if k8s {
            ", a Kubernetes API server (ciliate-apiserver) in the underlay namespace"
        } else {
            ""
        }
    ));
    let lab = ClusterLab::up(cfg).with_context(|| format!("bringing up lab {name}"))?;
    for (i, n) in lab.nodes.iter().enumerate() {
        let st: ciliate_api::models::Status = n.client().get("/v1/status")?;
        say(format!(
            "node {} {}: pod CIDR {}, kvstore {}",
            n.ns.name(),
            node_ip(i + 1),
            st.pod_cidr,
            st.kvstore
        ));
    }
    for p in &lab.pods {
        let s = &p.pod.state;
        say(format!("pod {} ({}) on node{}: identity {}", s.name, s.ip, p.node + 1, s.identity));
        wait_listening(&p.pod.ns, ECHO_PORT)?;
    }
    // Services on every node (backends on all nodes), a policy on every
    // node, and the external host's "who are you" server.
    let policy = lab.pods.len() >= 3;
    // pod3, which the policy protects, is no backend of the echo service.
    let ips: Vec<_> = lab
        .pods
        .iter()
        .filter(|p| !policy || p.pod.state.name != "pod3")
        .map(|p| p.pod.state.ip)
        .collect();
    if k8s {
        k8s_objects(&lab, &ips, policy)?;
    } else {
        for n in &lab.nodes {
            echo_services(&n.client(), &ips)?;
        }
    }
    if policy && !k8s {
        for n in &lab.nodes {
            let _: serde_json::Value = n
                .client()
                .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: POLICY.into() }))
                .context("importing the lab's policy")?;
        }
        say("policy: only pod1 reaches pod3 (TCP 7), on every node");
    }
    drop(lab.external.spawn_detached(&[&echo, "serve", "9000", "@peer"])?);
    wait_listening(&lab.external, 9000)?;

    say(
        "checking: pods across nodes (ping, TCP, UDP), the ClusterIP, the world (masqueraded), the NodePort from outside, the policy",
    );
    let mut t = Table::new(&["FROM", "TO", "CHECK", "RESULT"]);
    let mut failed = 0;
    let mut row = |t: &mut Table, from: String, to: String, check: &str, ok: bool| {
        failed += usize::from(!ok);
        t.row(vec![from, to, check.into(), result(ok)]);
    };
    for (i, p) in lab.pods.iter().enumerate() {
        let next = &lab.pods[(i + 1) % lab.pods.len()];
        let (from, ip) = (p.pod.state.name.clone(), next.pod.state.ip);
        let to = format!("{} {ip} (node{})", next.pod.state.name, next.node + 1);
        // Each row says what it expects, and fails when the packet does
        // the other thing: pod3 takes only pod1 (TCP 7), so the others'
        // ping, TCP and UDP to it must be dropped.
        let denied = policy && next.pod.state.name == "pod3" && p.pod.state.name != "pod1";
        let expect = |kind: &str| {
            if denied { format!("{kind} (policy: denied)") } else { kind.to_owned() }
        };
        let ping = p.pod.ns.exec(&["ping", "-c", "1", "-W", "2", &ip.to_string()]).is_ok();
        row(&mut t, from.clone(), to.clone(), &expect("ping"), ping != denied);
        for proto in ["tcp", "udp"] {
            let mut cmd = lab.echo(&p.pod.ns, None);
            cmd.args([proto, &format!("{ip}:{ECHO_PORT}"), "x"]);
            if denied {
                cmd.env("CILIATE_ECHO_TIMEOUT_MS", "1500");
            }
            let answered = ciliate_lab::netns::run(&mut cmd).is_ok();
            row(&mut t, from.clone(), to.clone(), &expect(proto), answered != denied);
        }
        let cip = format!("{CLUSTER_IP}:{ECHO_PORT}");
        for proto in ["tcp", "udp"] {
            let ok = lab.run_echo(&p.pod.ns, Some(p.node), &[proto, &cip, "svc"]).is_ok();
            row(&mut t, from.clone(), format!("service {cip}"), proto, ok);
        }
        let seen = lab.run_echo(&p.pod.ns, None, &["names", &format!("{EXTERNAL_IP}:9000"), "1"]);
        let want = format!("{} 1", node_ip(p.node + 1));
        let ok = seen.as_ref().is_ok_and(|s| s.trim() == want);
        row(&mut t, from, format!("world {EXTERNAL_IP} (as {})", node_ip(p.node + 1)), "tcp", ok);
    }
    if policy {
        let (p1, p3) = (&lab.pods[0].pod, &lab.pods[2].pod);
        let to = format!("{} {}", p3.state.name, p3.state.ip);
        let ok = lab
            .run_echo(&p1.ns, None, &["tcp", &format!("{}:{ECHO_PORT}", p3.state.ip), "x"])
            .is_ok();
        row(&mut t, p1.state.name.clone(), to, "tcp (policy: allowed)", ok);
    }
    let np = format!("{}:{NODE_PORT}", node_ip(1));
    for _ in 0..3 {
        let ok = lab.run_echo(&lab.external, None, &["tcp", &np, "np"]).is_ok();
        row(&mut t, format!("external {EXTERNAL_IP}"), format!("NodePort {np}"), "tcp", ok);
    }
    print!("{}", t.render());
    let state = lab.keep()?;
    anyhow::ensure!(failed == 0, "{failed} checks failed; the lab is left up for inspection");
    say(format!(
        "lab {} is up: `ciliate node list`, `ciliate bpf tunnel list`, `ciliate bpf nat list`, \
         `ciliate kvstore list`, `ciliate service list` talk to node1 (--socket {} for another); \
         remove it with `ciliate lab down --name {}`",
        state.lab,
        state.nodes.last().map(|n| n.agent_socket.display().to_string()).unwrap_or_default(),
        state.lab
    ));
    Ok(())
}
