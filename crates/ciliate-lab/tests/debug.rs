//! Datapath debugging on a live lab, through the `ciliate` binary: off,
//! `ciliate monitor --type debug` says how to turn it on; switched on for
//! one endpoint (`ciliate endpoint config ID Debug=true`), one UDP packet
//! from pod1 to pod2 on the same node produces the debug and capture
//! events of the golden file `tests/golden/debug-pod-to-pod.txt`, in order
//! (addresses, ports, identities, endpoint IDs and ifindexes normalised),
//! pod1's until the delivery and pod2's (its ingress stage) after; pod2,
//! not debugging, sends none of its own; `ciliate config Debug=true` switches
//! the whole node, and off again stops the events. Then, with the node
//! debugging, the golden file of one packet on each walk: pod -> ClusterIP
//! per packet, host -> pod, and on two nodes (tunnel and native) pod -> pod,
//! pod -> world masqueraded, the world -> a NodePort with a remote backend.
//! Needs root; CI runs as root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ciliate_lab::{
    names::token,
    node::{self, Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};
use serde_json::Value;

fn cli(bins: &Binaries) -> PathBuf {
    bins.agent.with_file_name("ciliate")
}

/// `ciliate ARGS --socket SOCK`: (success, stdout, stderr).
fn ciliate(bins: &Binaries, sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cli(bins)).args(args).arg("--socket").arg(sock).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(bins: &Binaries, sock: &Path, args: &[&str]) -> String {
    let (ok, out, err) = ciliate(bins, sock, args);
    assert!(ok, "ciliate {args:?}: {err}");
    out
}

/// The monitor's subscribers, as `status` counts them.
fn subscribers(bins: &Binaries, sock: &Path) -> u64 {
    let st: Value = serde_json::from_str(&run(bins, sock, &["status", "-o", "json"])).unwrap();
    st["monitor"]["subscribers"].as_u64().unwrap_or(0)
}

/// Every event `ciliate monitor -j` prints while `act` runs (and a moment
/// after).
fn events_during(bins: &Binaries, sock: &Path, act: impl FnOnce()) -> Vec<Value> {
    events_on(bins, &[sock], act).remove(0)
}

/// [`events_during`] on several agents at once: each one's events.
fn events_on(bins: &Binaries, socks: &[&Path], act: impl FnOnce()) -> Vec<Vec<Value>> {
    let before: Vec<u64> = socks.iter().map(|s| subscribers(bins, s)).collect();
    let children: Vec<std::process::Child> = socks
        .iter()
        .map(|sock| {
            Command::new(cli(bins))
                .args(["monitor", "-j", "--duration", "4", "--socket"])
                .arg(sock)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    for (sock, b) in socks.iter().zip(before) {
        while subscribers(bins, sock) <= b {
            assert!(Instant::now() < deadline, "the monitor did not subscribe");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    act();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        })
        .collect()
}

/// The program runs among one agent's `events`: a run starts at a capture
/// "Packet at …" (a program's entry) and holds the debug and capture events
/// that follow it on the same CPU (a program runs on one CPU, without
/// preemption, so its events are contiguous there).
fn runs(events: &[Value]) -> Vec<Vec<&Value>> {
    let mut open: std::collections::BTreeMap<String, Vec<&Value>> = Default::default();
    let mut done = Vec::new();
    for e in events.iter().filter(|e| e["type"] == "debug" || e["type"] == "capture") {
        let cpu = e["cpu"].as_str().unwrap_or("").to_owned();
        let entry = e["type"] == "capture"
            && e["message"].as_str().is_some_and(|m| m.starts_with("Packet at "));
        if entry && let Some(run) = open.remove(&cpu) {
            done.push(run);
        }
        open.entry(cpu).or_default().push(e);
    }
    done.extend(open.into_values());
    done
}

/// A run as golden-file lines.
fn lines_of(run: &[&Value]) -> Vec<String> {
    run.iter()
        .map(|e| match e["type"].as_str() {
            Some("capture") => format!("capture: {}", e["message"].as_str().unwrap_or("")),
            _ => e["message"].as_str().unwrap_or("").to_owned(),
        })
        .collect()
}

/// What changes from run to run, named: addresses (the longest first),
/// the source port after `sport_of`, ifindexes in order of appearance,
/// then `numbers` (identities, endpoint IDs).
fn normalise(
    text: &str,
    addrs: &[(String, &str)],
    numbers: &[(u64, &str)],
    sport_of: &str,
) -> String {
    let mut text = text.to_owned();
    let mut addrs = addrs.to_vec();
    addrs.sort_by_key(|(a, _)| std::cmp::Reverse(a.len()));
    for (a, name) in addrs {
        text = text.replace(&a, name);
    }
    if let Some(sport) = text
        .split(&format!("{sport_of}:"))
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse::<u64>().ok())
    {
        text = replace_number(&text, sport, "SPORT");
    }
    // ifindex N / ifindex=N, named in order of appearance.
    let mut ifs: Vec<u64> = Vec::new();
    for sep in ["ifindex ", "ifindex="] {
        for w in text.split(sep).skip(1) {
            let n: String = w.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = n.parse::<u64>()
                && !ifs.contains(&n)
            {
                ifs.push(n);
            }
        }
    }
    for (i, n) in ifs.iter().enumerate() {
        for sep in ["ifindex ", "ifindex="] {
            text = replace_after(&text, sep, *n, &format!("IF{}", i + 1));
        }
    }
    for (n, name) in numbers {
        text = replace_number(&text, *n, name);
    }
    text
}

/// Replace number `n` where it directly follows `prefix` (and ends there).
fn replace_after(s: &str, prefix: &str, n: u64, name: &str) -> String {
    let pat = format!("{prefix}{n}");
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find(&pat) {
        let after = rest[at + pat.len()..].chars().next();
        out.push_str(&rest[..at + prefix.len()]);
        if after.is_some_and(|c| c.is_ascii_digit()) {
            out.push_str(&n.to_string());
        } else {
            out.push_str(name);
        }
        rest = &rest[at + pat.len()..];
    }
    out + rest
}

/// Replace each whole decimal number `n` in `s` (not part of a word, a
/// longer number or an address) by `name`.
fn replace_number(s: &str, n: u64, name: &str) -> String {
    let n = n.to_string();
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find(&n) {
        let before = rest[..at].chars().last();
        let after = rest[at + n.len()..].chars().next();
        let whole = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '.');
        out.push_str(&rest[..at]);
        out.push_str(if whole { name } else { &n });
        rest = &rest[at + n.len()..];
    }
    out + rest
}

/// The golden file `name`; with CILIATE_BLESS=1, `got` is written as the
/// new golden file (read it before committing).
fn golden(name: &str, got: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("CILIATE_BLESS").is_some() {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, got).unwrap();
    }
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn one_packet_step_by_step_with_debugging_switched_per_endpoint_and_per_node() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cdb{}", token()), 2, bins)).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    let (bins, sock) = (&lab.config.bins, lab.socket.as_path());
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let echo = bins.echo.to_string_lossy().into_owned();
    let to = format!("{}:{ECHO_PORT}", p2.state.ip);
    let udp = || {
        let out = p1.ns.exec(&[&echo, "udp", &to, "hi"]).unwrap();
        assert_eq!(out.trim(), "hi", "UDP pod1 -> pod2");
    };

    // Off: no debug event, and the monitor says how to turn it on.
    let (ok, _, err) = ciliate(bins, sock, &["monitor", "--type", "debug", "--duration", "1"]);
    assert!(ok && err.contains("Datapath debugging is off"), "{err}");
    let events = events_during(bins, sock, udp);
    assert!(
        !events.iter().any(|e| e["type"] == "debug" || e["type"] == "capture"),
        "debugging off: {events:?}"
    );

    // On for pod1 only.
    let id1 = p1.state.endpoint_id.to_string();
    let out = run(bins, sock, &["endpoint", "config", &id1, "Debug=true"]);
    assert!(out.contains("Debug  Enabled"), "{out}");
    let (ok, _, err) = ciliate(bins, sock, &["endpoint", "config", &id1, "Colour=blue"]);
    assert!(!ok && err.contains("Colour"), "an unknown option is named: {err}");
    let events = events_during(bins, sock, udp);
    // The request's program run: every event with its capture's hash.
    let entry = events
        .iter()
        .find(|e| {
            e["type"] == "capture"
                && e["message"].as_str().is_some_and(|m| m.contains("from-endpoint"))
                && e["summary"].as_str().is_some_and(|s| s.contains(&to) && s.contains("udp"))
        })
        .unwrap_or_else(|| panic!("no capture of the request at from-endpoint: {events:?}"));
    let flow = entry["flow"].clone();
    let mut lines = Vec::new();
    for e in events.iter().filter(|e| e["flow"] == flow) {
        match e["type"].as_str() {
            Some("debug") => lines.push(e["message"].as_str().unwrap().to_owned()),
            Some("capture") => lines.push(format!("capture: {}", e["message"].as_str().unwrap())),
            _ => {}
        }
    }
    // pod1's events until the delivery, pod2's (its ingress stage) after.
    let sources: Vec<&Value> = events
        .iter()
        .filter(|e| e["flow"] == flow && (e["type"] == "debug" || e["type"] == "capture"))
        .map(|e| &e["source"])
        .collect();
    let at = lines.iter().position(|l| l.starts_with("Attempting local delivery")).unwrap();
    assert!(sources[..=at].iter().all(|s| **s == p1.state.endpoint_id), "{sources:?}");
    assert!(sources[at + 1..].iter().all(|s| **s == p2.state.endpoint_id), "{sources:?}");
    // pod2 does not debug: its own packets (the reply) send nothing.
    assert!(
        !events.iter().any(|e| e["type"] == "capture"
            && e["message"].as_str().is_some_and(|m| m.contains("from-endpoint"))
            && e["source"] == p2.state.endpoint_id),
        "pod2 does not debug"
    );
    // Normalised: the request's source port, then addresses, identities,
    // endpoints, and ifindexes in order of appearance.
    let text = normalise(
        &(lines.join("\n") + "\n"),
        &[(p1.state.ip.to_string(), "POD1"), (p2.state.ip.to_string(), "POD2")],
        &[
            (u64::from(p1.state.identity), "ID1"),
            (u64::from(p2.state.identity), "ID2"),
            (u64::from(p1.state.endpoint_id), "EP1"),
            (u64::from(p2.state.endpoint_id), "EP2"),
        ],
        "src=POD1",
    );
    assert_eq!(text, golden("debug-pod-to-pod.txt", &text), "pod1 -> pod2, one UDP packet");

    // The same events through Hubble's GetDebugEvents (grpcurl, with the
    // observer's reflection), named with Hubble's types.
    let grpcurl =
        PathBuf::from(std::env::var("CILIATE_PY_DIR").unwrap_or_else(|_| "/opt/ciliate/py".into()))
            .join("bin/grpcurl");
    let hubble = sock.parent().unwrap().join("hubble.sock");
    let out = Command::new(grpcurl)
        .args(["-plaintext", "-authority", "localhost", "-unix", "-max-time", "20", "-d"])
        .arg(r#"{"number": 200}"#)
        .arg(&hubble)
        .arg("observer.Observer/GetDebugEvents")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap();
    let lookup = got
        .iter()
        .map(|r| &r["debugEvent"])
        .find(|e| e["type"] == "DBG_CT_LOOKUP4_1")
        .unwrap_or_else(|| panic!("no conntrack lookup among {got:?}"));
    assert!(
        lookup["message"].as_str().unwrap().starts_with("Conntrack lookup 1/2: src="),
        "{lookup}"
    );
    assert_eq!(lookup["source"]["ID"], p1.state.endpoint_id, "{lookup}");

    // The whole node: pod2's reply debugs too; off again: nothing.
    let out = run(bins, sock, &["config", "Debug=true"]);
    assert!(out.contains("Enabled"), "{out}");
    run(bins, sock, &["endpoint", "config", &id1, "Debug=false"]);
    let events = events_during(bins, sock, udp);
    assert!(
        events.iter().any(|e| e["type"] == "debug" && e["source"] == p2.state.endpoint_id),
        "node debugging: pod2's packets debug too"
    );
    assert!(run(bins, sock, &["config"]).contains("Enabled"));
    run(bins, sock, &["config", "Debug=false"]);
    let events = events_during(bins, sock, udp);
    assert!(
        !events.iter().any(|e| e["type"] == "debug" || e["type"] == "capture"),
        "debugging off again: {events:?}"
    );
}

/// The runs among `events` whose entry capture's summary passes `pick`,
/// as lines, each prefixed with `label`.
fn picked(events: &[Value], label: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    runs(events)
        .into_iter()
        .filter(|r| r[0]["type"] == "capture" && r[0]["summary"].as_str().is_some_and(&pick))
        .flat_map(|r| lines_of(&r).into_iter().map(|l| format!("{label}: {l}")).collect::<Vec<_>>())
        .collect()
}

/// Compare `lines` (normalised) with golden file `name`.
fn check_walk(
    name: &str,
    lines: &[String],
    addrs: &[(String, &str)],
    numbers: &[(u64, &str)],
    sport_of: &str,
) {
    assert!(!lines.is_empty(), "{name}: no debug events of the packet");
    let text = normalise(&(lines.join("\n") + "\n"), addrs, numbers, sport_of);
    assert_eq!(text, golden(name, &text), "{name}");
}

#[test]
fn one_node_walks_clusterip_per_packet_and_host_to_pod_step_by_step() {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = NodeLabConfig::new(&format!("cdw{}", token()), 2, bins);
    cfg.socket_lb = false;
    let lab = NodeLab::up(cfg).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    let (bins, sock) = (&lab.config.bins, lab.socket.as_path());
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let echo = bins.echo.to_string_lossy().into_owned();
    let spec = serde_json::json!({
        "id": 1, "name": "default/echo", "frontend": {"ip": "10.96.0.10", "port": ECHO_PORT, "protocol": "UDP"},
        "backends": [{"ip": p2.state.ip, "port": ECHO_PORT}],
    });
    let _: Value =
        lab.client().call(ciliate_api::client::method::PUT, "/v1/service", Some(&spec)).unwrap();
    assert!(run(bins, sock, &["config", "Debug=true"]).contains("Enabled"));
    let router = lab.config.router_ip().to_string();
    let addrs = [
        (p1.state.ip.to_string(), "POD1"),
        (p2.state.ip.to_string(), "POD2"),
        (router.clone(), "ROUTER"),
    ];
    let numbers = [
        (u64::from(p1.state.identity), "ID1"),
        (u64::from(p2.state.identity), "ID2"),
        (u64::from(p1.state.endpoint_id), "EP1"),
        (u64::from(p2.state.endpoint_id), "EP2"),
    ];

    // pod1 -> ClusterIP, balanced per packet in from-container (socket LB off).
    let vip = format!("10.96.0.10:{ECHO_PORT}");
    let ev = events_during(bins, sock, || {
        let out = p1.ns.exec(&[&echo, "udp", &vip, "hi"]).unwrap();
        assert_eq!(out.trim(), "hi", "UDP pod1 -> ClusterIP");
    });
    let lines = picked(&ev, "node", |s| s.contains(&format!("-> {vip} udp")));
    check_walk("debug-walk-clusterip-tc-lb.txt", &lines, &addrs, &numbers, "src=POD1");

    // The node (its stack, from the router address) -> pod2: from-host.
    let to2 = format!("{}:{ECHO_PORT}", p2.state.ip);
    let ev = events_during(bins, sock, || {
        let out = lab.node.exec(&[&echo, "udp", &to2, "hi"]).unwrap();
        assert_eq!(out.trim(), "hi", "UDP node -> pod2");
    });
    let lines = picked(&ev, "node", |s| {
        s.contains(&format!("-> {to2} udp")) && !s.starts_with(&p1.state.ip.to_string())
    });
    check_walk("debug-walk-host-to-pod.txt", &lines, &addrs, &numbers, "src=ROUTER");
}

/// The debug walks of a two-node lab in `routing` mode.
fn cluster_walks(routing: &str) {
    use ciliate_lab::cluster::{ClusterLab, ClusterLabConfig, node_ip};
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = ClusterLabConfig::new(&format!("cdc{}", token()), 2, 1, bins);
    cfg.routing = routing.into();
    let lab = ClusterLab::up(cfg).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.pod.ns, ECHO_PORT).unwrap();
    }
    let bins = &lab.config.bins;
    let socks: Vec<&Path> = lab.nodes.iter().map(|n| n.socket.as_path()).collect();
    for s in &socks {
        assert!(run(bins, s, &["config", "Debug=true"]).contains("Enabled"));
    }
    let (p1, p2) = (&lab.pods[0].pod.state, &lab.pods[1].pod.state);
    let echo = bins.echo.to_string_lossy().into_owned();
    let addrs = [
        (p1.ip.to_string(), "POD1"),
        (p2.ip.to_string(), "POD2"),
        (node_ip(1).to_string(), "NODE1"),
        (node_ip(2).to_string(), "NODE2"),
        (node::EXTERNAL_IP.to_string(), "EXTERNAL"),
    ];
    // Each node numbers its endpoints: pods of two nodes may share an ID.
    let (ep1, ep2) = if p1.endpoint_id == p2.endpoint_id { ("EP", "EP") } else { ("EP1", "EP2") };
    let numbers = [
        (u64::from(p1.identity), "ID1"),
        (u64::from(p2.identity), "ID2"),
        (u64::from(p1.endpoint_id), ep1),
        (u64::from(p2.endpoint_id), ep2),
    ];
    let both = |ev: &[Vec<Value>], pick: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut l = picked(&ev[0], "node1", pick);
        l.extend(picked(&ev[1], "node2", pick));
        l
    };

    // pod1 (node1) -> pod2 (node2).
    let to2 = format!("{}:{ECHO_PORT}", p2.ip);
    let ev = events_on(bins, &socks, || {
        let out = lab.pods[0].pod.ns.exec(&[&echo, "udp", &to2, "hi"]).unwrap();
        assert_eq!(out.trim(), "hi", "UDP pod1 -> pod2 across nodes");
    });
    let pick =
        |s: &str| s.starts_with(&format!("{}:", p1.ip)) && s.contains(&format!("-> {to2} udp"));
    let lines = both(&ev, &pick);
    check_walk(
        &format!("debug-walk-{routing}-pod-to-pod.txt"),
        &lines,
        &addrs,
        &numbers,
        "src=POD1",
    );
    if routing != "tunnel" {
        return;
    }

    // pod1 -> the world, masqueraded behind node1.
    let bin = echo.clone();
    drop(lab.external.spawn_detached(&[&bin, "serve", "9000", "@peer"]).unwrap());
    node::wait_listening(&lab.external, 9000).unwrap();
    let world = format!("{}:9000", node::EXTERNAL_IP);
    let ev = events_on(bins, &socks, || {
        let out = lab.pods[0].pod.ns.exec(&[&echo, "udp", &world, "hi"]).unwrap();
        assert!(out.contains(&node_ip(1).to_string()), "masqueraded: {out}");
    });
    let pick = |s: &str| s.contains(&format!("-> {world} udp"));
    check_walk(
        "debug-walk-tunnel-pod-to-world.txt",
        &both(&ev, &pick),
        &addrs,
        &numbers,
        "src=POD1",
    );

    // The world -> a NodePort of node1 whose backend is pod2, on node2.
    let spec = serde_json::json!({
        "id": 7, "name": "default/np", "kind": "NodePort",
        "frontend": {"ip": "0.0.0.0", "port": 30081, "protocol": "UDP"},
        "backends": [{"ip": p2.ip, "port": ECHO_PORT}],
    });
    let _: Value = lab.nodes[0]
        .client()
        .call(ciliate_api::client::method::PUT, "/v1/service", Some(&spec))
        .unwrap();
    let np = format!("{}:30081", node_ip(1));
    let ev = events_on(bins, &socks, || {
        let out = lab.run_echo(&lab.external, None, &["udp", &np, "np"]).unwrap();
        assert_eq!(out.trim(), "np", "UDP NodePort -> remote backend");
    });
    let pick = |s: &str| {
        s.starts_with(&format!("{}:", node::EXTERNAL_IP)) && s.contains(&format!("-> {np} udp"))
            || s.starts_with(&format!("{}:", node_ip(1))) && s.contains(&format!("-> {to2} udp"))
    };
    check_walk(
        "debug-walk-tunnel-nodeport-remote.txt",
        &both(&ev, &pick),
        &addrs,
        &numbers,
        "from=EXTERNAL",
    );
}

#[test]
fn tunnel_walks_step_by_step() {
    cluster_walks("tunnel");
}

#[test]
fn native_walk_step_by_step() {
    cluster_walks("native");
}
