//! Agent restart: kill -9 the agent while a TCP stream runs between two
//! pods; the stream survives (the pinned programs and maps keep
//! forwarding), and the restarted agent restores its endpoints. SIGTERM
//! stops the agent cleanly with the datapath left in place.
//! Needs root; CI runs as root.

use std::time::Duration;

use ciliate_api::models::{Endpoint, Status};
use ciliate_lab::{
    names::token,
    node::{Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};

#[test]
fn a_stream_survives_kill_9_of_the_agent_and_endpoints_are_restored() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 2, bins)).unwrap();
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let before: Vec<Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening

    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    let target = format!("{}:{ECHO_PORT}", p2.state.ip);
    let stream = p1.ns.command(&echo).args(["stream", &target, "4"]).output();
    let stream = std::thread::spawn(move || stream);

    std::thread::sleep(Duration::from_millis(800));
    let pids = lab.agent_pids();
    assert_eq!(pids.len(), 1, "one agent runs in the node");
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(lab.agent_pids().is_empty(), "the agent is dead");
    lab.start_agent().unwrap();

    let out = stream.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "the stream broke: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let trips: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(trips > 100, "only {trips} round trips in 4 seconds");

    let status: Status = lab.client().get("/v1/status").unwrap();
    assert_eq!(status.restored_endpoints, 3, "two pods and the health endpoint");
    let after: Vec<Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    assert_eq!(after, before, "the same endpoints, IDs, addresses and identities");
    p1.ns.exec(&["ping", "-c", "1", "-W", "2", &p2.state.ip.to_string()]).unwrap();
}

#[test]
fn sigterm_stops_the_agent_cleanly_and_leaves_the_datapath_forwarding() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 2, bins)).unwrap();
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    std::thread::sleep(Duration::from_millis(300));
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    let target = format!("{}:{ECHO_PORT}", p2.state.ip);
    let stream = p1.ns.command(&echo).args(["stream", &target, "3"]).output();
    let stream = std::thread::spawn(move || stream);
    std::thread::sleep(Duration::from_millis(500));
    let pins_before = pins(&lab);
    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !lab.agent_pids().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the agent did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("SIGTERM: shutting down") && log.contains("stopped;"), "{log}");
    assert!(!lab.socket.exists(), "the API socket goes with the agent");
    // Nothing was taken down: maps, links and filters stay, traffic flows.
    assert_eq!(pins(&lab), pins_before);
    assert_eq!(lab.lxc_programs(&p1.state.lxc).unwrap(), ["from_container"]);
    let out = stream.join().unwrap().unwrap();
    assert!(out.status.success(), "the stream broke: {}", String::from_utf8_lossy(&out.stderr));
    p1.ns.exec(&["ping", "-c", "1", "-W", "2", &p2.state.ip.to_string()]).unwrap();
    // And a new agent takes over.
    lab.start_agent().unwrap();
    let status: Status = lab.client().get("/v1/status").unwrap();
    assert_eq!(status.restored_endpoints, 3);
}

/// Every pin of the lab's node (maps, links, programs), by path.
fn pins(lab: &NodeLab) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![lab.pins_dir.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_restart_with_other_map_capacities_remakes_the_maps_and_keeps_their_entries() {
    use ciliate_common::{ct, policy};
    use ciliate_datapath::migrate;
    let bins = Binaries::beside_current_exe().unwrap();
    let mut config = NodeLabConfig::new(&format!("clt{}", token()), 2, bins);
    let args = |tcp: &str| -> Vec<std::ffi::OsString> {
        ["--bpf-ct-global-tcp-max", tcp, "--bpf-policy-map-max", "4096"]
            .iter()
            .map(Into::into)
            .collect()
    };
    config.agent_args = args("262144");
    let mut lab = NodeLab::up(config).unwrap();
    let max =
        |lab: &NodeLab, name: &str| migrate::pinned(&lab.pins_dir.join(name)).unwrap().max_entries;
    assert_eq!(max(&lab, ct::TCP_MAP_NAME), 262_144, "--bpf-ct-global-tcp-max");
    assert_eq!(max(&lab, policy::MAP_NAME), 4096 * 256, "each endpoint's share for a /24");
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    std::thread::sleep(Duration::from_millis(300));
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    let target = format!("{}:{ECHO_PORT}", p2.state.ip);
    let stream = p1.ns.command(&echo).args(["disrupt", &target, "5"]).output();
    let stream = std::thread::spawn(move || stream);
    std::thread::sleep(Duration::from_millis(800));
    // The stream's connection, as tracked before the restart.
    let tracked = |lab: &NodeLab| {
        let ct = ciliate_datapath::maps::CtMaps::from_pin_dir(&lab.pins_dir).unwrap();
        ct.dump()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| {
                k.proto == 6 && k.daddr == p2.state.ip.octets() && k.dport == ECHO_PORT.to_be()
            })
            .count()
    };
    // (Its egress entry at pod1 and its ingress entry at pod2.)
    let entries = tracked(&lab);
    assert!(entries >= 1, "the stream is tracked");
    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    lab.config.agent_args = args("300000");
    lab.start_agent().unwrap();
    assert_eq!(max(&lab, ct::TCP_MAP_NAME), 300_000, "made anew with the new capacity");
    assert_eq!(tracked(&lab), entries, "the connection was carried into the new table");
    let out = stream.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("late 0 broken 0"), "the stream: {text}");
    let log = std::fs::read_to_string(lab.agent_log()).unwrap();
    assert!(log.contains("pinned map migrated"), "the agent says so: {log}");
}
