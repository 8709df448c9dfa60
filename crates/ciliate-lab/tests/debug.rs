//! Datapath debugging on a live lab, through the `ciliate` binary: off,
//! `ciliate monitor --type debug` says how to turn it on; switched on for
//! one endpoint (`ciliate endpoint config ID Debug=true`), one UDP packet
//! from pod1 to pod2 on the same node produces the debug and capture
//! events of the golden file `tests/golden/debug-pod-to-pod.txt`, in order
//! (addresses, ports, identities, endpoint IDs and ifindexes normalised);
//! pod2, not debugging, sends none; `ciliate config Debug=true` switches
//! the whole node, and off again stops the events. Needs root; CI runs as
//! root.

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
    let before = subscribers(bins, sock);
    let child = Command::new(cli(bins))
        .args(["monitor", "-j", "--duration", "4", "--socket"])
        .arg(sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers(bins, sock) <= before {
        assert!(Instant::now() < deadline, "the monitor did not subscribe");
        std::thread::sleep(Duration::from_millis(50));
    }
    act();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Replace each whole decimal number `n` in `s` by `name`.
fn replace_number(s: &str, n: u64, name: &str) -> String {
    let n = n.to_string();
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find(&n) {
        let before = rest[..at].chars().last();
        let after = rest[at + n.len()..].chars().next();
        let whole = !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit() || c == '.');
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
        if e["type"] == "debug" || e["type"] == "capture" {
            assert_eq!(e["source"], p1.state.endpoint_id, "pod1's events: {e}");
        }
    }
    assert!(
        !events.iter().any(|e| (e["type"] == "debug" || e["type"] == "capture")
            && e["source"] == p2.state.endpoint_id),
        "pod2 does not debug"
    );
    // Normalised: the request's source port, then addresses, identities,
    // endpoints, and ifindexes in order of appearance.
    let mut text = lines.join("\n") + "\n";
    let sport = text
        .split(&format!("src={}:", p1.state.ip))
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse::<u64>().ok())
        .expect("the request's source port");
    text = replace_number(&text, sport, "SPORT");
    text = text.replace(&p1.state.ip.to_string(), "POD1").replace(&p2.state.ip.to_string(), "POD2");
    for (n, name) in [
        (u64::from(p1.state.identity), "ID1"),
        (u64::from(p2.state.identity), "ID2"),
        (u64::from(p1.state.endpoint_id), "EP1"),
        (u64::from(p2.state.endpoint_id), "EP2"),
    ] {
        text = replace_number(&text, n, name);
    }
    let mut ifs: Vec<String> = Vec::new();
    for w in text.split("ifindex ").skip(1) {
        let n: String = w.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !n.is_empty() && !ifs.contains(&n) {
            ifs.push(n);
        }
    }
    for (i, n) in ifs.iter().enumerate() {
        text = text.replace(&format!("ifindex {n}"), &format!("ifindex IF{}", i + 1));
    }
    assert_eq!(text, golden("debug-pod-to-pod.txt", &text), "pod1 -> pod2, one UDP packet");

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
