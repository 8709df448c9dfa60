//! The relay on a two-node lab: `ciliate-relay` in node1's namespace finds
//! both nodes' observers through node1's peer service (and, another relay,
//! through the cluster's store), merges their flows
//! in time order, reports node2 unavailable while its observer port is
//! firewalled (and keeps serving node1's flows), and connects again when
//! the port opens. Checked with grpcurl on the relay's unix socket. Needs
//! root; CI runs as root.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use ciliate_lab::{
    cluster::{ClusterLab, ClusterLabConfig},
    names::token,
    node::{Binaries, ECHO_PORT, wait_listening},
};
use serde_json::Value;

/// Kills the relay when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpcurl(socket: &Path, data: Option<&str>, method: &str) -> Vec<Value> {
    let dir = std::env::var("CILIATE_PY_DIR").unwrap_or_else(|_| "/opt/ciliate/py".into());
    let mut c = Command::new(PathBuf::from(dir).join("bin/grpcurl"));
    c.args(["-plaintext", "-authority", "localhost", "-unix", "-max-time", "20"]);
    if let Some(d) = data {
        c.args(["-d", d]);
    }
    let out = c.arg(socket).arg(method).output().expect("running grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {method}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("grpcurl printed JSON")
}

/// GetNodes of the relay: (name, state) sorted.
fn nodes(sock: &Path) -> Vec<(String, String)> {
    let r = grpcurl(sock, None, "observer.Observer/GetNodes");
    let mut v: Vec<(String, String)> = r[0]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("").to_owned(),
                        n["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_relay_merges_both_nodes_and_survives_one_going_away() {
    let bins = Binaries::beside_current_exe().unwrap();
    let relay_bin = bins.agent.with_file_name("ciliate-relay");
    let lab =
        ClusterLab::up(ClusterLabConfig::new(&format!("crl{}", token()), 2, 1, bins)).unwrap();
    for p in &lab.pods {
        wait_listening(&p.pod.ns, ECHO_PORT).unwrap();
    }
    let (n1, n2) = (lab.nodes[0].ns.name().to_owned(), lab.nodes[1].ns.name().to_owned());
    let peer_service = lab.nodes[0].socket.with_file_name("hubble.sock");
    let sock = lab.work_dir.join("relay.sock");
    let mut cmd = lab.nodes[0].ns.command(&relay_bin.to_string_lossy());
    cmd.arg("--peer-service")
        .arg(format!("unix://{}", peer_service.display()))
        .args(["--listen-address", "", "--retry-interval", "1", "--listen-socket"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _relay = Kill(cmd.spawn().expect("starting ciliate-relay"));
    until("the relay listens", || sock.exists());
    let both = vec![(n1.clone(), "NODE_CONNECTED".into()), (n2.clone(), "NODE_CONNECTED".into())];
    until("both nodes connected", || nodes(&sock) == both);

    // A relay that finds the observers in the cluster's store instead.
    let sock_kv = lab.work_dir.join("relay-kv.sock");
    let mut cmd = lab.nodes[0].ns.command(&relay_bin.to_string_lossy());
    cmd.args(["--kvstore", "local", "--kvstore-path"])
        .arg(lab.work_dir.join("kvstore.json"))
        .args(["--listen-address", "", "--retry-interval", "1", "--listen-socket"])
        .arg(&sock_kv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let relay_kv = Kill(cmd.spawn().expect("starting ciliate-relay --kvstore"));
    until("the store's relay listens", || sock_kv.exists());
    until("the store's relay connects both nodes", || nodes(&sock_kv) == both);
    drop(relay_kv);

    // Pod on node1 → pod on node2: flows on both nodes, merged in order.
    let dst = lab.pods[1].pod.state.ip.to_string();
    lab.pods[0].pod.ns.exec(&["ping", "-c", "3", "-i", "0.2", "-W", "1", &dst]).unwrap();
    let merged = grpcurl(&sock, Some(r#"{"number": 200}"#), "observer.Observer/GetFlows");
    let flows: Vec<&Value> = merged.iter().filter_map(|m| m.get("flow")).collect();
    let from: std::collections::BTreeSet<&str> =
        flows.iter().filter_map(|f| f["nodeName"].as_str()).collect();
    assert!(
        from.contains(n1.as_str()) && from.contains(n2.as_str()),
        "flows of both nodes: {from:?}"
    );
    let times: Vec<&str> = flows.iter().filter_map(|f| f["time"].as_str()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "merged oldest to newest: {times:?}");
    // node2 names the pod of node1 that pinged (from the cluster's ipcache).
    let request_on_n2 = flows
        .iter()
        .find(|f| f["nodeName"] == n2.as_str() && f["l4"]["ICMPv4"]["type"] == 8)
        .unwrap_or_else(|| panic!("no echo request seen on node2: {flows:?}"));
    assert_eq!(
        request_on_n2["source"]["podName"],
        lab.pods[0].pod.ns.name(),
        "a remote pod by name: {request_on_n2}"
    );
    let status = grpcurl(&sock, None, "observer.Observer/ServerStatus");
    assert_eq!(status[0]["numConnectedNodes"], 2, "{status:?}");
    assert_eq!(status[0]["maxFlows"], "8190", "both rings: {status:?}");

    // A follower through the relay sees new flows of both nodes, also
    // after the relay's per-call timeout (3 s) has passed.
    let dir = std::env::var("CILIATE_PY_DIR").unwrap_or_else(|_| "/opt/ciliate/py".into());
    let follower = Command::new(PathBuf::from(dir).join("bin/grpcurl"))
        .args(["-plaintext", "-authority", "localhost", "-unix", "-max-time", "8", "-d"])
        .arg(r#"{"follow": true, "whitelist": [{"protocol": ["icmp"]}]}"#)
        .arg(&sock)
        .arg("observer.Observer/GetFlows")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    lab.pods[0].pod.ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", &dst]).unwrap();
    let out = follower.wait_with_output().unwrap();
    let followed: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap();
    let nodes_followed: std::collections::BTreeSet<&str> = followed
        .iter()
        .filter_map(|m| m.get("flow"))
        .filter_map(|f| f["nodeName"].as_str())
        .collect();
    assert!(
        nodes_followed.contains(n1.as_str()) && nodes_followed.contains(n2.as_str()),
        "followed flows of both nodes: {followed:?}"
    );
    assert!(
        !followed.iter().any(|m| m["nodeStatus"]["stateChange"] == "NODE_UNAVAILABLE"),
        "no node went away: {followed:?}"
    );

    // node2's observer port closes: it is unavailable, node1 still serves.
    let rule = ["INPUT", "-p", "tcp", "--dport", "4244", "-j", "DROP"];
    let iptables = |op: &str| {
        let mut args = vec!["iptables", op];
        args.extend_from_slice(&rule);
        lab.nodes[1].ns.exec(&args).unwrap();
    };
    iptables("-I");
    let one_down =
        vec![(n1.clone(), "NODE_CONNECTED".into()), (n2.clone(), "NODE_UNAVAILABLE".into())];
    until("node2 unavailable", || nodes(&sock) == one_down);
    let partial = grpcurl(&sock, Some(r#"{"number": 5}"#), "observer.Observer/GetFlows");
    assert!(
        partial.iter().any(|m| m["nodeStatus"]["stateChange"] == "NODE_UNAVAILABLE"
            && m["nodeStatus"]["nodeNames"][0] == n2.as_str()),
        "the stream says node2 is unavailable: {partial:?}"
    );
    assert!(
        partial.iter().filter_map(|m| m.get("flow")).any(|f| f["nodeName"] == n1.as_str()),
        "node1's flows still come: {partial:?}"
    );
    let status = grpcurl(&sock, None, "observer.Observer/ServerStatus");
    assert_eq!(status[0]["unavailableNodes"][0], n2.as_str(), "{status:?}");

    // The port opens again: the relay reconnects.
    iptables("-D");
    until("node2 connected again", || nodes(&sock) == both);
}
