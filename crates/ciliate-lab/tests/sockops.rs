//! Socket-layer acceleration (`ciliate-agent --sockops-enable`) in a
//! one-node lab: a TCP connection between two pods goes socket to socket
//! once established (both sockets in `ciliate_sock_ops`; the echoed bytes
//! intact; the datapath's conntrack entry counts the handshake and the
//! close, not the messages), and a policy change that denies it takes it
//! out of the map so the next message meets the datapath and is dropped.
//! Needs root; CI runs as root.

use std::{
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::Duration,
};

use ciliate_api::{client::method, models::PolicyImport};
use ciliate_common::{ct::DIR_EGRESS, sockops::SockKey};
use ciliate_datapath::{maps::CtMaps, nodemaps::SockOpsMap};
use ciliate_lab::{
    names::token,
    node::{self, Binaries, NodeLab, NodeLabConfig},
};

const PORT: u16 = 9000;

/// Kills the echo server it holds when dropped.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A lab of two pods with socket-layer acceleration, and an echo server on
/// PORT in pod2 inside the node's cgroup (where the sock_ops program is).
fn lab(tag: &str) -> (NodeLab, Server) {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut config = NodeLabConfig::new(&format!("{tag}{}", token()), 2, bins);
    config.agent_args = vec!["--sockops-enable".into()];
    let lab = NodeLab::up(config).unwrap();
    let server = lab
        .echo(&lab.pods[1].ns)
        .args(["serve", &PORT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    node::wait_listening(&lab.pods[1].ns, PORT).unwrap();
    (lab, Server(server))
}

/// `disrupt` from pod1 to pod2's server for `secs` seconds, in a thread.
fn disrupt(lab: &NodeLab, secs: u64) -> std::thread::JoinHandle<String> {
    let to = format!("{}:{PORT}", lab.pods[1].state.ip);
    let mut cmd = lab.echo(&lab.pods[0].ns);
    cmd.args(["disrupt", &to, &secs.to_string()]);
    std::thread::spawn(move || {
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// The `name N` figures of a disrupt line.
fn figure(line: &str, name: &str) -> u64 {
    let mut w = line.split_whitespace();
    while let Some(x) = w.next() {
        if x == name {
            return w.next().and_then(|n| n.parse().ok()).unwrap();
        }
    }
    panic!("no {name} in {line:?}")
}

fn accelerated(lab: &NodeLab) -> Vec<SockKey> {
    SockOpsMap::from_pin_dir(&lab.pins_dir).unwrap().keys().unwrap()
}

/// The pod1 → pod2:PORT connection's egress conntrack entry.
fn ct_entry(lab: &NodeLab) -> Option<ciliate_common::ct::CtEntry> {
    let (p1, p2) = (lab.pods[0].state.ip, lab.pods[1].state.ip);
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap();
    ct.dump().unwrap().into_iter().find_map(|(k, e)| {
        let hit = k.dir == DIR_EGRESS
            && Ipv4Addr::from(k.saddr) == p1
            && Ipv4Addr::from(k.daddr) == p2
            && u16::from_be(k.dport) == PORT;
        hit.then_some(e)
    })
}

#[test]
fn pod_to_pod_tcp_goes_socket_to_socket_bytes_intact() {
    let (lab, _server) = lab("cso");
    let run = disrupt(&lab, 3);
    std::thread::sleep(Duration::from_millis(1000));
    let keys = accelerated(&lab);
    let (p1, p2) = (lab.pods[0].state.ip.octets(), lab.pods[1].state.ip.octets());
    assert_eq!(keys.len(), 2, "both sockets of the connection in the sockhash: {keys:?}");
    let client = keys.iter().find(|k| k.sip == p1).expect("the client's socket");
    assert_eq!((client.dip, u16::from_be(client.dport)), (p2, PORT));
    assert!(keys.contains(&client.peer()), "the server's socket: {keys:?}");
    let line = run.join().unwrap();
    // Every message echoed back as sent (a wrong byte breaks the run).
    assert_eq!(figure(&line, "broken"), 0, "{line}");
    let answered = figure(&line, "answered");
    assert!(answered >= 25, "{line}");
    // The messages went socket to socket: the datapath saw the handshake,
    // the close and ACKs, not one packet per message.
    std::thread::sleep(Duration::from_millis(300));
    let e = ct_entry(&lab).expect("the connection's conntrack entry");
    assert!(
        e.tx_packets < answered / 2,
        "{} packets through the datapath for {answered} messages: not accelerated",
        e.tx_packets
    );
    // The close crossed the datapath (monitor and flows see it), and the
    // closed sockets left the map.
    assert!(e.tx_flags_seen & 0x01 != 0, "FIN seen by the datapath: {:#x}", e.tx_flags_seen);
    assert_eq!(accelerated(&lab), vec![], "closed sockets leave the sockhash");
}

#[test]
fn a_policy_that_denies_it_cuts_an_accelerated_connection() {
    let (lab, _server) = lab("csp");
    let run = disrupt(&lab, 4);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(accelerated(&lab).len(), 2, "accelerated before the policy change");
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: cut, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: pod2}}}}\n  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: pod1}}}}]\n\
         \x20   toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]\n"
    );
    let _: serde_json::Value =
        lab.client().call(method::PUT, "/v1/policy", Some(&PolicyImport { text: policy })).unwrap();
    assert_eq!(accelerated(&lab), vec![], "the denied connection left the sockhash");
    let line = run.join().unwrap();
    assert_eq!(figure(&line, "broken"), 1, "the connection went on past the deny: {line}");
    let answered = figure(&line, "answered");
    assert!((5..=25).contains(&answered), "answered before the deny only: {line}");
    let m = ciliate_datapath::maps::MetricsMap::from_pin_dir(&lab.pins_dir).unwrap();
    let denied = m.get(ciliate_common::drop::POLICY_DENY, ciliate_common::metrics::DIR_INGRESS);
    assert!(denied.unwrap().packets >= 1, "the next message was dropped by the deny");
}
