//! The XDP prefilter end to end (`ciliate-agent --enable-xdp-prefilter`,
//! `ciliate prefilter`): in a one-node lab, pings from the external host
//! to the node pass until a CIDR holding the external host is denied, are
//! then dropped at XDP on the node's eth0 (and counted for that CIDR),
//! still while no agent runs, and pass again once the CIDR is deleted. Bad
//! input is refused by name and changes nothing. Needs root; CI runs as
//! root.

use std::process::Command;

use ciliate_lab::{
    names::token,
    netns::Netns,
    node::{Binaries, NODE_IP, NodeLab, NodeLabConfig},
};

fn ciliate(socket: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ciliate"))
        .args(["--socket", socket])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pings(from: &Netns) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "1", &NODE_IP.to_string()]).is_ok()
}

/// The id of the XDP program on the node's eth0 (`ip -d link`).
fn xdp_prog(lab: &NodeLab) -> Option<String> {
    let link = lab.node.exec(&["ip", "-d", "link", "show", "eth0"]).unwrap();
    let at = link.find("prog/xdp id ")? + "prog/xdp id ".len();
    Some(link[at..].split_whitespace().next()?.to_owned())
}

/// Packets the prefilter counted for `cidr`.
fn dropped(socket: &str, cidr: &str) -> u64 {
    let (ok, out, err) = ciliate(socket, &["prefilter", "list", "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = v["status"]["counters"].as_array().unwrap().iter().find(|c| c["cidr"] == cidr);
    c.unwrap_or_else(|| panic!("no counter for {cidr}: {out}"))["packets"].as_u64().unwrap()
}

#[test]
fn denied_source_dropped_at_xdp_counted_and_kept_across_restarts() {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut config = NodeLabConfig::new(&format!("cpf{}", token()), 1, bins);
    config.agent_args = vec!["--enable-xdp-prefilter".into()];
    let mut lab = NodeLab::up(config).unwrap();
    let socket = lab.socket.to_str().unwrap().to_owned();
    let prog = xdp_prog(&lab).expect("an XDP program on the node's eth0");
    let (ok, out, err) = ciliate(&socket, &["prefilter", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("Revision: 0") && out.contains("eth0 (native)"), "{out}");
    let (_, out, _) = ciliate(&socket, &["status"]);
    assert!(
        out.contains("XDP prefilter Enabled, NodePort disabled (mode snat), socket-layer"),
        "{out}"
    );
    assert!(pings(&lab.external), "ping external → node (prefilter: nothing denied)");

    // A CIDR beside the external host's changes nothing for it.
    let (ok, out, err) = ciliate(&socket, &["prefilter", "update", "--cidr", "192.168.201.0/24"]);
    assert!(ok && out.contains("Revision: 1"), "{out}{err}");
    assert!(pings(&lab.external), "ping external → node (prefilter: another CIDR denied)");

    let denied = "192.168.200.96/28"; // holds the external host, .100
    let (ok, out, err) = ciliate(&socket, &["prefilter", "update", "--cidr", denied]);
    assert!(ok && out.contains("Revision: 2"), "{out}{err}");
    for _ in 0..3 {
        assert!(!pings(&lab.external), "ping external → node (prefilter: denied) got through");
    }
    assert!(dropped(&socket, denied) >= 3, "each denied ping is counted");
    assert_eq!(dropped(&socket, "192.168.201.0/24"), 0);

    // Bad input: refused by name, the list as it was.
    for (args, needle) in [
        (vec!["update", "--cidr", "192.168.200.100/16"], "host bits"),
        (vec!["update", "--cidr", "10.1.0.0/16", "--revision", "1"], "revision 1"),
        (vec!["delete", "--cidr", "10.0.0.0/8"], "10.0.0.0/8 is not in the deny list"),
    ] {
        let mut a = vec!["prefilter"];
        a.extend(args.iter());
        let (ok, out, err) = ciliate(&socket, &a);
        assert!(!ok && err.contains(needle), "{args:?}: {out}{err}");
    }
    let (_, out, _) = ciliate(&socket, &["prefilter", "list"]);
    assert!(out.contains("Revision: 2"), "{out}");

    // No agent: XDP still drops (the link is pinned).
    kill_agent(&lab);
    assert!(!pings(&lab.external), "ping (prefilter: denied, no agent) got through");

    // A restarted agent finds the list, the counts and the same program.
    lab.start_agent().unwrap();
    assert_eq!(xdp_prog(&lab).as_deref(), Some(prog.as_str()), "XDP replaced on restart");
    let (_, out, _) = ciliate(&socket, &["prefilter", "list"]);
    assert!(out.contains("Revision: 2") && out.contains(denied), "{out}");
    assert!(dropped(&socket, denied) >= 4, "counts survive the restart");

    let (ok, out, err) = ciliate(&socket, &["prefilter", "delete", "--cidr", denied]);
    assert!(ok && out.contains("Revision: 3"), "{out}{err}");
    assert!(pings(&lab.external), "ping external → node (prefilter: CIDR deleted)");

    // Denied again, then an agent with XDP for NodePort only: the deny
    // list it cannot show is not applied.
    let (ok, _, err) = ciliate(&socket, &["prefilter", "update", "--cidr", denied]);
    assert!(ok, "{err}");
    assert!(!pings(&lab.external), "ping (prefilter: denied) got through");
    kill_agent(&lab);
    lab.config.agent_args = vec!["--node-port-acceleration".into(), "native".into()];
    lab.start_agent().unwrap();
    assert!(xdp_prog(&lab).is_some(), "XDP stays for NodePort");
    let (_, out, _) = ciliate(&socket, &["status"]);
    assert!(out.contains("XDP prefilter Disabled, NodePort native (mode snat)"), "{out}");
    assert!(pings(&lab.external), "ping (prefilter off) dropped by a list no API shows");
    let (ok, _, err) = ciliate(&socket, &["prefilter", "list"]);
    assert!(!ok && err.contains("--enable-xdp-prefilter"), "{err}");
}

fn kill_agent(lab: &NodeLab) {
    let pids = lab.agent_pids();
    assert_eq!(pids.len(), 1, "one agent runs in the node");
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lab.agent_pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(lab.agent_pids().is_empty(), "the agent is dead");
}

#[test]
fn prefilter_off_says_how_to_turn_it_on() {
    let bins = Binaries::beside_current_exe().unwrap();
    let lab = NodeLab::up(NodeLabConfig::new(&format!("cpo{}", token()), 0, bins)).unwrap();
    assert_eq!(xdp_prog(&lab), None, "no XDP without --enable-xdp-prefilter");
    let (ok, out, err) =
        ciliate(lab.socket.to_str().unwrap(), &["prefilter", "update", "--cidr", "10.0.0.0/8"]);
    assert!(!ok && err.contains("--enable-xdp-prefilter"), "{out}{err}");
}
