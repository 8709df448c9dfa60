//! Agent restart: kill -9 the agent while a TCP stream runs between two
//! pods; the stream survives (the pinned programs and maps keep
//! forwarding), and the restarted agent restores its endpoints.
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
