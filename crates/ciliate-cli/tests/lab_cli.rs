//! The `ciliate` binary end to end: `lab up` brings up a lab whose pods
//! reach each other, `status` and the `bpf` lists report it, `down` removes
//! every namespace. Needs root; CI runs as root.

use std::process::Command;

use ciliate_lab::{names::token, netns};

fn ciliate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ciliate")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `s` with every run of blanks made one space (table columns move as
/// their widest cell changes).
fn squash(s: &str) -> String {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ciliate <args> --lab <lab>`, which must succeed: its output squashed.
fn on_lab(lab: &str, args: &[&str]) -> String {
    let mut full = args.to_vec();
    full.extend_from_slice(&["--lab", lab]);
    let (ok, out, err) = ciliate(&full);
    assert!(ok, "ciliate {args:?} failed: {err}");
    squash(&out)
}

/// Removes the lab even if an assertion fails half-way.
struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = ciliate(&["lab", "down", "--name", &self.0]);
    }
}

#[test]
fn lab_up_status_metrics_down() {
    let name = format!("clt{}", token());
    let _guard = Down(name.clone());
    let (ok, out, err) = ciliate(&["lab", "up", "--name", &name, "--pods", "2"]);
    assert!(ok, "lab up failed: {out}{err}");
    let sq = squash(&out);
    assert!(sq.contains("pod1 gateway 10.200.0.1 ping ok"), "{out}");
    // 10.200.0.2 is the health endpoint's; pods follow.
    assert!(sq.contains("pod1 pod2 10.200.0.4 tcp ok"), "{out}");
    assert!(sq.contains("host pod2 10.200.0.4 tcp ok"), "{out}");
    // The lab's echo service: from pods (TCP, UDP), the host, and the
    // external host through the NodePort.
    assert!(sq.contains("service 1 (ClusterIP) 10.96.0.10:7/TCP → 2 backends"), "{out}");
    assert!(sq.contains("pod2 service 10.96.0.10:7 udp ok"), "{out}");
    assert!(sq.contains("host service 10.96.0.10:7 tcp ok"), "{out}");
    assert!(sq.contains("external 192.168.200.100 NodePort 192.168.200.2:30007 tcp ok"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");

    // Idempotent: a second `up` replaces the first.
    let (ok, out, err) = ciliate(&["lab", "up", "--name", &name, "--pods", "2"]);
    assert!(ok && out.contains("removed the previous lab"), "{out}{err}");

    let (ok, out, _) = ciliate(&["lab", "status", "--name", &name, "-o", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["pods"].as_array().unwrap().len(), 2);
    assert_eq!(v[0]["node_ns"], format!("{name}-node1"));

    let (ok, out, err) = ciliate(&["bpf", "metrics", "list", "--lab", &name, "-o", "json"]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let forwarded = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == 0 && r["direction"] == "EGRESS")
        .expect("a forwarded counter");
    assert!(forwarded["packets"].as_u64().unwrap() >= 4, "{out}");

    // The endpoint and ipcache lists show the pods with their identities,
    // the conntrack list the connections the checks opened.
    let (ok, out, err) = ciliate(&["bpf", "endpoint", "list", "--lab", &name]);
    assert!(ok, "{err}");
    let sq = squash(&out);
    assert!(sq.contains("10.200.0.1:0 (localhost)"), "{out}");
    assert!(sq.contains("192.168.200.2:0 (localhost)"), "the node's address: {out}");
    assert!(sq.contains("10.200.0.2:0 id=2 sec_id=4"), "health: {out}");
    assert!(sq.contains("10.200.0.3:0 id=3 sec_id=256"), "{out}");
    let (ok, out, err) = ciliate(&["bpf", "ipcache", "list", "--lab", &name]);
    assert!(ok, "{err}");
    let sq = squash(&out);
    assert!(sq.contains("0.0.0.0/0 identity=2 (reserved:world)"), "{out}");
    assert!(sq.contains("10.200.0.4/32 identity=257"), "{out}");
    assert!(sq.contains("192.168.200.2/32 identity=1 (reserved:host)"), "{out}");
    let (ok, out, err) = ciliate(&["bpf", "ct", "list", "--lab", &name, "-o", "json"]);
    assert!(ok, "{err}");
    let ct: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tcp_out = ct.as_array().unwrap().iter().find(|e| {
        e["proto"] == "TCP" && e["direction"] == "OUT" && e["destination"] == "10.200.0.4:7"
    });
    assert_eq!(tcp_out.expect("pod1 → pod2 TCP in conntrack")["source_identity"], 256);

    let (ok, out, _) = ciliate(&["lab", "down", "--name", &name]);
    assert!(ok && out.contains("removed lab"), "{out}");
    assert!(!netns::list().iter().any(|n| n.starts_with(&format!("{name}-"))));
    let (_, out, _) = ciliate(&["lab", "status", "--name", &name]);
    assert!(out.contains("no labs"), "{out}");
}

#[test]
fn a_two_node_lab_with_its_cluster_commands() {
    let name = format!("clt{}", token());
    let _guard = Down(name.clone());
    let (ok, out, err) = ciliate(&["lab", "up", "--name", &name, "--nodes", "2", "--pods", "2"]);
    assert!(ok, "lab up failed: {out}{err}");
    let sq = squash(&out);
    assert!(!out.contains("FAILED"), "{out}");
    assert!(sq.contains("pod2 pod3 10.200.1.3 (node2) tcp (policy: denied) ok"), "{out}");
    assert!(sq.contains("pod1 pod3 10.200.1.3 tcp (policy: allowed) ok"), "{out}");
    assert!(sq.contains("pod4 pod1 10.200.0.3 (node1) tcp ok"), "{out}");
    assert!(sq.contains("world 192.168.200.100 (as 192.168.200.3) tcp ok"), "{out}");
    let run = |args: &[&str]| on_lab(&name, args);
    let nodes = run(&["node", "list"]);
    assert!(nodes.contains(&format!("{name}-node2 192.168.200.3 10.200.1.0/24 tunnel")), "{nodes}");
    let tunnel = run(&["bpf", "tunnel", "list"]);
    assert!(tunnel.contains("10.200.1.0/24 192.168.200.3:0"), "{tunnel}");
    let nat = run(&["bpf", "nat", "list"]);
    assert!(nat.contains("-> 192.168.200.100:9000 XLATE_SRC 192.168.200.2:"), "{nat}");
    let kv = run(&["kvstore", "list", "ciliate/state/nodes"]);
    assert!(kv.contains(&format!("ciliate/state/nodes/v1/{name}-node1")), "{kv}");
    let st = run(&["status"]);
    assert!(st.contains("Cluster: 2 nodes, routing tunnel"), "{st}");
    let (ok, out, _) = ciliate(&["lab", "down", "--name", &name]);
    assert!(ok && out.contains(&format!("{name}-ul1")), "{out}");
    assert!(!netns::list().iter().any(|n| n.starts_with(&format!("{name}-"))));
}

#[test]
fn a_two_node_lab_driven_by_the_kubernetes_api() {
    let name = format!("clt{}", token());
    let _guard = Down(name.clone());
    let args = ["lab", "up", "--name", &name, "--nodes", "2", "--pods", "2", "--k8s"];
    let (ok, out, err) = ciliate(&args);
    assert!(ok, "lab up --k8s failed: {out}{err}");
    let sq = squash(&out);
    assert!(!out.contains("FAILED"), "{out}");
    assert!(sq.contains("its EndpointSlice (3 backends) created in the API"), "{out}");
    assert!(sq.contains("every agent serves and enforces them"), "{out}");
    // The policy and the Service came from the API only (no agent was
    // given them): they decide.
    assert!(sq.contains("pod2 pod3 10.200.1.3 (node2) tcp (policy: denied) ok"), "{out}");
    assert!(sq.contains("pod1 pod3 10.200.1.3 tcp (policy: allowed) ok"), "{out}");
    assert!(sq.contains("pod3 service 10.96.0.10:7 udp ok"), "{out}");
    assert!(sq.contains("external 192.168.200.100 NodePort 192.168.200.2:30007 tcp ok"), "{out}");
    let (ok, svcs, err) = ciliate(&["service", "list", "--lab", &name, "-o", "json"]);
    assert!(ok, "{err}");
    let svcs: serde_json::Value = serde_json::from_str(&svcs).unwrap();
    assert!(
        svcs.as_array().unwrap().iter().all(|s| s["spec"]["source"] == "k8s"),
        "every service is the API's: {svcs}"
    );
    // CRD mode (the default with Kubernetes): the other node and its pods
    // come from CiliumNodes and CiliumEndpoints, identities are
    // CiliumIdentities; no kvstore holds them.
    let run = |args: &[&str]| on_lab(&name, args);
    let st = run(&["status"]);
    assert!(
        st.contains("KVStore: Kubernetes CRDs (CiliumNode, CiliumEndpoint, CiliumIdentity): ok"),
        "{st}"
    );
    assert!(st.contains("Cluster: 2 nodes"), "{st}");
    let nodes = run(&["node", "list"]);
    assert!(nodes.contains(&format!("{name}-node2 192.168.200.3 10.200.1.0/24 tunnel")), "{nodes}");
    let ipcache = run(&["bpf", "ipcache", "list"]);
    assert!(
        ipcache.contains("10.200.1.3/32") && ipcache.contains("tunnelendpoint=192.168.200.3"),
        "{ipcache}"
    );
    let kv = run(&["kvstore", "list", "ciliate/state/ip/v1/"]);
    assert!(!kv.contains("10.200."), "no endpoint went to the kvstore: {kv}");
    // The lab's operator leads (its Lease), and collects nothing in use.
    let kc = format!("/run/ciliate/labs/{name}/kubeconfig");
    let ul = format!("{name}-ul1");
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ul, "kubectl", "--kubeconfig", &kc])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let lease = ["get", "lease", "ciliate-operator", "-n", "kube-system"];
    let holder = kubectl(&[&lease[..], &["-o", "jsonpath={.spec.holderIdentity}"]].concat());
    assert_eq!(holder, "lab-operator");
    // Both CiliumNodes kept (their Nodes exist), each with the pod CIDR
    // the operator gave it from the pool (cluster-pool IPAM: no agent
    // claimed one in the kvstore).
    let cidrs = kubectl(&[
        "get",
        "ciliumnodes",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name}={.spec.ipam.podCIDRs[0]}{"\n"}{end}"#,
    ]);
    let mut cidrs: Vec<&str> = cidrs.lines().collect();
    cidrs.sort();
    assert_eq!(
        cidrs,
        [format!("{name}-node1=10.200.0.0/24"), format!("{name}-node2=10.200.1.0/24")],
        "one CIDR per node from the operator"
    );
    let kv = run(&["kvstore", "list", "ciliate/state/ipam/v1/cidrs/"]);
    assert!(!kv.contains("10.200."), "no pod CIDR claimed in the kvstore: {kv}");
    // Garbage collection by the operator: pod4 deleted in the API (its
    // kubelet gone: no CNI DEL) loses its CiliumEndpoint, then its
    // identity (app=pod4, no other user) its CiliumIdentity once unused
    // for the lab's 10 s; node2's Node deleted, its CiliumNode goes.
    let pod4 = format!("{name}-pod4");
    let id4 = kubectl(&["get", "cep", &pod4, "-o", "jsonpath={.status.identity.id}"]);
    assert!(id4.parse::<u32>().is_ok_and(|i| i >= 256), "pod4's identity: {id4:?}");
    kubectl(&["delete", "pod", &pod4, "--wait=false"]);
    kubectl(&["delete", "node", &format!("{name}-node2"), "--wait=false"]);
    let names = |kind: &str| kubectl(&["get", kind, "-o", "name"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let (ceps, ids, cns) =
            (names("ciliumendpoints"), names("ciliumidentities"), names("ciliumnodes"));
        let left = [
            ceps.contains(&pod4).then_some("pod4's CiliumEndpoint"),
            ids.lines().any(|l| l.ends_with(&format!("/{id4}"))).then_some("pod4's CiliumIdentity"),
            cns.contains(&format!("{name}-node2")).then_some("node2's CiliumNode"),
        ];
        if left.iter().all(Option::is_none) {
            assert!(cns.contains(&format!("{name}-node1")), "node1's CiliumNode stays: {cns}");
            assert!(ceps.contains(&format!("{name}-pod1")), "pod1's CiliumEndpoint stays: {ceps}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not collected after 40 s: {left:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // The agents and the operator ran as their service accounts: every
    // request each made is one its roles in deploy/ciliate.yaml allow.
    let log = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ul,
            "curl",
            "-sS",
            "http://192.168.200.1:6443/ciliate-test/requests",
        ])
        .output()
        .unwrap();
    let log: Vec<serde_json::Value> = serde_json::from_slice(&log.stdout).unwrap();
    check_rbac(&log);
    let (ok, out, _) = ciliate(&["lab", "up", "--name", &name, "--nodes", "1", "--k8s"]);
    assert!(!ok, "--k8s with one node is refused: {out}");
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let (ok, _, err) = ciliate(&["lab", "up", "--name", "no spaces allowed", "--pods", "1"]);
    assert!(!ok);
    assert!(err.contains("lab name"), "{err}");
    let (ok, _, err) = ciliate(&["bpf", "metrics", "list", "--lab", "nosuchlab-xyz"]);
    assert!(!ok);
    assert!(err.contains("no lab named nosuchlab-xyz"), "{err}");
}

#[test]
fn agent_commands_and_monitor_on_a_lab() {
    let name = format!("clt{}", token());
    let _guard = Down(name.clone());
    let (ok, out, err) = ciliate(&["lab", "up", "--name", &name, "--pods", "2"]);
    assert!(ok, "lab up failed: {out}{err}");
    let lab = ["--lab", name.as_str()];
    let run = |args: &[&str]| {
        let mut full = args.to_vec();
        full.extend_from_slice(&lab);
        let (ok, out, err) = ciliate(&full);
        assert!(ok, "ciliate {args:?} failed: {err}");
        out
    };

    let status = run(&["status"]);
    assert!(status.contains(&format!("Node:           {name}-node1")), "{status}");
    assert!(status.contains("IPv4: 3/253 allocated"), "pods and health: {status}");

    let eps = run(&["endpoint", "list"]);
    let header = eps.lines().next().unwrap();
    for col in [
        "ENDPOINT",
        "POLICY (ingress) ENFORCEMENT",
        "IDENTITY",
        "LABELS (source:key[=value])",
        "IPv4",
        "STATUS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(eps.contains("k8s:app=pod1"), "{eps}");
    assert!(eps.contains("k8s:io.kubernetes.pod.namespace=default"), "{eps}");
    assert!(eps.contains("reserved:host") && eps.contains("reserved:health"), "{eps}");
    let one: serde_json::Value = serde_json::from_str(&run(&["endpoint", "get", "3"])).unwrap();
    assert_eq!(one["ip"], "10.200.0.3");
    let (ok, _, err) = ciliate(&["endpoint", "get", "99", "--lab", &name]);
    assert!(!ok && err.contains("endpoint 99 not found"), "{err}");

    let ids: serde_json::Value =
        serde_json::from_str(&run(&["identity", "list", "-o", "json"])).unwrap();
    let ids = ids.as_array().unwrap();
    assert_eq!(ids[0]["labels"][0], "reserved:host");
    assert_eq!(ids.len(), 8 + 2, "reserved plus one per pod");
    assert!(run(&["identity", "get", "2"]).contains("reserved:world"));

    let maps = run(&["map", "list"]);
    let lxc_row = maps.lines().find(|l| l.starts_with("ciliate_lxc")).unwrap_or_default();
    assert_eq!(
        lxc_row.split_whitespace().nth(1),
        Some("5"),
        "host (router and node address), health, two pods: {maps}"
    );
    let (ok, _, err) = ciliate(&["map", "get", "nosuchmap", "--lab", &name]);
    assert!(!ok && err.contains("no map named nosuchmap"), "{err}");
    assert!(run(&["map", "get", "ciliate_ipcache"]).contains("reserved:world"));
    let got = run(&["bpf", "ipcache", "get", "10.200.0.4"]);
    assert!(got.contains("10.200.0.4/32") && got.contains("identity=257"), "{got}");
    let got = run(&["bpf", "ipcache", "get", "192.0.2.1"]);
    assert!(got.contains("0.0.0.0/0") && got.contains("reserved:world"), "{got}");

    // Policy through the CLI: import, see it in the endpoint list and the
    // policy map, delete it.
    let file = std::env::temp_dir().join(format!("{name}-policy.yaml"));
    std::fs::write(
        &file,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p1, namespace: default}\n\
         spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
         \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}]}]\n",
    )
    .unwrap();
    let out = run(&["policy", "import", file.to_str().unwrap()]);
    assert!(out.contains("Revision: 1 (1 rules imported)"), "{out}");
    let _ = std::fs::remove_file(&file);
    assert!(run(&["policy", "wait", "1"]).contains("revision 1"));
    let eps = run(&["endpoint", "list"]);
    let pod2 = eps.lines().find(|l| l.starts_with("4 ")).unwrap_or_default();
    assert!(pod2.contains("Enabled"), "{eps}");
    let pol = run(&["bpf", "policy", "get", "4"]);
    assert!(pol.contains("Allow    Ingress     k8s:app=pod1"), "{pol}");
    assert!(pol.contains("7/TCP"), "{pol}");
    let tr =
        run(&["policy", "trace", "--src-endpoint", "2", "--dst-endpoint", "4", "--dport", "7"]);
    assert!(tr.contains("Final verdict: DENIED") && tr.contains("default deny"), "{tr}");
    let tr = run(&[
        "policy",
        "trace",
        "--src",
        "k8s:app=pod1",
        "--src",
        "k8s:io.kubernetes.pod.namespace=default",
        "--dst-endpoint",
        "4",
        "--dport",
        "7",
    ]);
    assert!(
        tr.contains("Final verdict: ALLOWED") && tr.contains("by CiliumNetworkPolicy/default/p1"),
        "{tr}"
    );
    // Two monitors at once (the agent owns the ring and copies events to
    // each): both see the drop of a ping the policy denies.
    let monitors: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_ciliate"))
                .args([
                    "monitor",
                    "--type",
                    "drop",
                    "-j",
                    "--count",
                    "1",
                    "--duration",
                    "20",
                    "--lab",
                    &name,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_subscribers(&name, 2);
    let (ok, _, _) =
        exec_in(&format!("{name}-pod1"), &["ping", "-c", "1", "-W", "1", "10.200.0.4"]);
    assert!(!ok, "ping (policy: denied) got through");
    for m in monitors {
        let out = m.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let ev: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or("{}"))
            .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(
            (
                ev["type"].as_str(),
                ev["reason_text"].as_str(),
                ev["src_identity"].as_u64(),
                ev["dst_endpoint"].as_u64()
            ),
            (Some("drop"), Some("Policy denied"), Some(256), Some(4)),
            "each monitor sees the drop: {text}"
        );
    }
    let status = run(&["status"]);
    assert!(
        status.contains("Monitor:        0 subscribers"),
        "monitors that stopped unsubscribe: {status}"
    );
    // The same drop as a flow, through the observer (gRPC): JSON and the
    // compact line; filtered by pod and verdict.
    let flows = run(&[
        "observe",
        "--from-pod",
        &format!("default/{name}-pod1"),
        "--verdict",
        "DROPPED",
        "--type",
        "drop",
        "-o",
        "json",
    ]);
    let flow: serde_json::Value = serde_json::from_str(flows.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{e}: {flows}"));
    assert_eq!(flow["flow"]["drop_reason_desc"], "POLICY_DENIED", "{flows}");
    assert_eq!(flow["flow"]["source"]["pod_name"], format!("{name}-pod1"), "{flows}");
    assert_eq!(flow["flow"]["destination"]["pod_name"], format!("{name}-pod2"), "{flows}");
    let compact = run(&["observe", "--pod", &format!("{name}-pod2"), "--verdict", "dropped"]);
    assert!(
        compact.lines().any(|l| l.contains("Policy denied DROPPED (ICMPv4 EchoRequest)")
            && l.contains(&format!("default/{name}-pod1 (ID:256) -> default/{name}-pod2 (ID:"))),
        "{compact}"
    );
    let none = run(&["observe", "--pod", "nonexistent", "--last", "5"]);
    assert!(none.trim().is_empty(), "a pod no flow names: {none}");
    let (ok, _, err) = ciliate(&["observe", "--lab", &name, "--ip", "10.0.0.0/33"]);
    assert!(!ok && err.contains("source_ip"), "a bad CIDR is refused naming the field: {err}");
    let hs = run(&["hubble", "status"]);
    assert!(hs.contains("Current/Max Flows:") && hs.contains("/4095"), "{hs}");
    let hn = run(&["hubble", "list", "nodes"]);
    assert!(hn.contains(&format!("{name}-node1")) && hn.contains("Connected"), "{hn}");

    // The drop explained: at pod2's ingress, by default deny, with the
    // policy that would allow it; imported, that policy lets the ping by.
    let pod1 = format!("default/{name}-pod1");
    let drop_args = ["observe", "--from-pod", &pod1, "--verdict", "DROPPED", "--type", "drop"];
    let words = run(&[&drop_args[..], &["--explain", "--last", "1"]].concat());
    assert!(
        words.contains("Denied at ingress by default deny") && words.contains("Allow it with"),
        "{words}"
    );
    let json = run(&[&drop_args[..], &["--explain", "--last", "1", "-o", "json"]].concat());
    let v: serde_json::Value = serde_json::from_str(json.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(
        (v["explain"]["denied_at"].as_str(), v["explain"]["decided_by"].as_str()),
        (Some("ingress"), Some("default deny")),
        "{json}"
    );
    let yaml = v["explain"]["allow_with"].as_str().unwrap_or_else(|| panic!("{json}"));
    let file = std::env::temp_dir().join(format!("{name}-allow.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = run(&["policy", "import", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(out.contains("(1 rules imported)"), "{out}");
    let rev: String = out.split_whitespace().nth(1).unwrap_or("").to_owned();
    assert!(run(&["policy", "wait", &rev]).contains("revision"));
    let (ok, _, _) =
        exec_in(&format!("{name}-pod1"), &["ping", "-c", "1", "-W", "2", "10.200.0.4"]);
    assert!(ok, "ping (policy: allowed by the explained rule) did not get through: {yaml}");

    let sels = run(&["policy", "selectors"]);
    assert!(sels.contains("endpointSelector") && sels.contains("fromEndpoints"), "{sels}");
    assert!(
        sels.lines().any(|l| l.contains("fromEndpoints") && l.trim_end().ends_with("256")),
        "{sels}"
    );
    assert!(run(&["policy", "delete", "--all"]).contains("(2 rules deleted)"));
    let (ok, _, err) = ciliate(&["policy", "delete", "--lab", &name]);
    assert!(!ok && err.contains("--all"), "{err}");

    // Services: the lab's, then one made, listed, seen in the maps, deleted.
    let list = squash(&run(&["service", "list"]));
    assert!(list.contains("1 10.96.0.10:7/TCP ClusterIP 1 => 10.200.0.3:7/TCP (active)"), "{list}");
    assert!(list.contains("192.168.200.2:30007/TCP NodePort"), "{list}");
    let out = run(&[
        "service",
        "update",
        "--id",
        "9",
        "--frontend",
        "10.96.0.99:80",
        "--backends",
        "10.200.0.3:7,10.200.0.4:7",
        "--states",
        "active,terminating",
        "--lb-algorithm",
        "maglev",
    ]);
    assert!(out.contains("Updated service 9 with frontends 10.96.0.99:80/TCP"), "{out}");
    let got = squash(&run(&["service", "get", "9"]));
    assert!(got.contains("2 => 10.200.0.4:7/TCP (terminating)"), "{got}");
    let lb = squash(&run(&["bpf", "lb", "list"]));
    assert!(lb.contains("10.96.0.99:80/TCP 0.0.0.0:0 (4) (0) [ClusterIP, Maglev]"), "{lb}");
    assert!(lb.contains("10.200.0.3:7/TCP (4) (1)"), "{lb}");
    assert!(!lb.contains("(4) (2)"), "a terminating backend got a slot: {lb}");
    let mg = squash(&run(&["bpf", "lb", "maglev", "list"]));
    assert!(mg.contains("4 1: 16381"), "one active backend owns the whole table: {mg}");
    assert!(run(&["service", "delete", "9"]).contains("Deleted service 9"));
    for (args, needle) in [
        (vec!["service", "get", "999"], "service 999 not found"),
        (vec!["service", "update", "--id", "5", "--frontend", "10.96.0.5"], "expected IP:port"),
        (
            vec![
                "service",
                "update",
                "--id",
                "5",
                "--frontend",
                "10.96.0.5:80",
                "--backends",
                "10.0.0.1:80",
                "--states",
                "active,active",
            ],
            "2 states for 1 backends",
        ),
        (
            vec![
                "service",
                "update",
                "--id",
                "5",
                "--frontend",
                "10.96.0.10:7",
                "--backends",
                "10.0.0.1:80",
            ],
            "belongs to service 1",
        ),
    ] {
        let mut full = args.clone();
        full.extend_from_slice(&lab);
        let (ok, _, err) = ciliate(&full);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }

    // The monitor shows traffic as it happens, in Cilium's format.
    let mon = Command::new(env!("CARGO_BIN_EXE_ciliate"))
        .args([
            "monitor",
            "--type",
            "trace",
            "--related-to",
            "4",
            "--count",
            "3",
            "--duration",
            "20",
            "--lab",
            &name,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscribers(&name, 1);
    // Three pings, three flows: each is new, so each is traced under the
    // default aggregation.
    for _ in 0..3 {
        let (ok, _, err) =
            exec_in(&format!("{name}-pod1"), &["ping", "-c", "1", "-W", "1", "10.200.0.4"]);
        assert!(ok, "ping (no policy: allowed): {err}");
    }
    let out = mon.wait_with_output().unwrap();
    let mon = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = mon.lines().collect();
    assert_eq!(lines.len(), 3, "{mon}");
    // Endpoint 4 is pod2 (1 is the host, 2 health, 3 pod1).
    assert!(lines.iter().all(|l| l.contains("endpoint 4") || l.contains("-> stack")), "{mon}");
    assert!(lines.iter().any(|l| l.contains("state new")), "{mon}");
}

/// Run `args` in named namespace `ns`.
fn exec_in(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait (up to 10 s) until the lab's agent has `n` event subscribers.
fn wait_subscribers(lab: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (ok, out, err) = ciliate(&["status", "-o", "json", "--lab", lab]);
        assert!(ok, "{err}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        if st["monitor"]["subscribers"].as_u64() == Some(n as u64) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{n} monitors did not subscribe: {out}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// One RBAC rule of deploy/ciliate.yaml: the service account it is bound
/// to, its namespace (empty: a ClusterRole's), groups, resources, verbs.
struct Rule {
    account: String,
    namespace: String,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect()
}

fn manifest_rules() -> Vec<Rule> {
    use serde::Deserialize as _;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ciliate.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    let mut rules = Vec::new();
    for b in docs.iter().filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        let ns = b["metadata"]["namespace"].as_str().unwrap_or_default();
        let role = docs
            .iter()
            .find(|d| {
                d["kind"] == b["roleRef"]["kind"]
                    && d["metadata"]["name"] == b["roleRef"]["name"]
                    && d["metadata"]["namespace"].as_str().unwrap_or_default() == ns
            })
            .unwrap_or_else(|| panic!("{b}: no such role"));
        for subject in b["subjects"].as_array().unwrap() {
            for r in role["rules"].as_array().unwrap() {
                rules.push(Rule {
                    account: subject["name"].as_str().unwrap().into(),
                    namespace: ns.into(),
                    groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                });
            }
        }
    }
    rules
}

/// Requests the lab does not make, each a path other tests take:
/// (account, group, resource, verb).
const RARE: &[(&str, &str, &str, &str)] = &[
    // CNI ADD for a pod the watch has not seen yet (k8s lab tests).
    ("ciliate", "", "pods", "get"),
    // --ipam kubernetes (tests/operator.rs).
    ("ciliate", "", "nodes", "get"),
    // A refused policy's Warning event (k8s lab tests).
    ("ciliate", "", "events", "create"),
    // The lab has no CCNP (k8s lab tests have).
    ("ciliate", "cilium.io", "ciliumclusterwidenetworkpolicies/status", "patch"),
    // A pod's endpoint deleted (k8s lab tests).
    ("ciliate", "cilium.io", "ciliumendpoints", "delete"),
    // Racing allocations (tests/k8s_identity.rs).
    ("ciliate", "cilium.io", "ciliumidentities", "get"),
    ("ciliate", "cilium.io", "ciliumidentities", "delete"),
];

/// Every request in `log` (the API server's request log) by the agents
/// and the operator is allowed by their roles, and every verb the roles
/// grant was used here or is a [`RARE`] path: the RBAC is exactly what
/// the code does.
fn check_rbac(log: &[serde_json::Value]) {
    let rules = manifest_rules();
    let allows = |r: &Rule, account: &str, ns: &str, group: &str, res: &str, verb: &str| {
        r.account == account
            && (r.namespace.is_empty() || r.namespace == ns)
            && r.groups.iter().any(|g| g == group)
            && r.resources.iter().any(|x| x == res)
            && r.verbs.iter().any(|v| v == verb)
    };
    let mut used = std::collections::BTreeSet::new();
    for a in log {
        let f = |k: &str| a[k].as_str().unwrap_or_default().to_string();
        let (user, verb, group, res, ns) =
            (f("user"), f("verb"), f("group"), f("resource"), f("namespace"));
        if user == "admin" {
            continue; // the lab itself and kubectl
        }
        assert!(
            rules.iter().any(|r| allows(r, &user, &ns, &group, &res, &verb)),
            "deploy/ciliate.yaml does not let {user} {verb} {group}/{res} in {ns:?}"
        );
        used.insert((user, group, res, verb));
    }
    for &(account, group, res, verb) in RARE {
        assert!(
            rules.iter().any(|r| allows(r, account, "kube-system", group, res, verb)),
            "RARE names {account} {verb} {group}/{res}, which no role grants"
        );
    }
    for r in &rules {
        for g in &r.groups {
            for res in &r.resources {
                for v in &r.verbs {
                    let k = (r.account.clone(), g.clone(), res.clone(), v.clone());
                    let rare = RARE.iter().any(|&(a, gg, rr, vv)| {
                        (a, gg, rr, vv) == (k.0.as_str(), k.1.as_str(), k.2.as_str(), k.3.as_str())
                    });
                    assert!(
                        used.contains(&k) || rare,
                        "deploy/ciliate.yaml lets {} {v} {g}/{res}, which nothing did",
                        r.account
                    );
                }
            }
        }
    }
}
