//! Services end to end on the lab (agent API → LB maps → datapath, real
//! traffic): ClusterIP over TCP and UDP from pods with socket LB (inside the
//! lab's cgroup) and per packet (outside it, or with socket LB off), from
//! the host, NodePort from the external host, hairpin, ClientIP affinity,
//! the spread over three backends, and an established flow that outlives
//! the removal of its backend, a fragmented UDP datagram through services
//! and masquerading. Every pod runs `ciliate-echo serve 8080
//! <pod name>`, so an answer names the backend. Needs root; CI runs as root.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use ciliate_api::{
    client::method,
    models::{BackendSpec, BackendState, L4Addr, Service, ServiceKind, ServiceSpec},
};
use ciliate_common::ct::DIR_SERVICE;
use ciliate_datapath::{
    lbmaps::LbMaps,
    maps::CtMaps,
    nodemaps::{FragMap, NatMap},
};
use ciliate_lab::{
    Netns,
    names::token,
    netns,
    node::{Binaries, ECHO_PORT, EXTERNAL_IP, NODE_IP, NodeLab, NodeLabConfig, wait_listening},
};

const NAME_PORT: u16 = 8080;

fn up(pods: usize, socket_lb: bool) -> NodeLab {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = NodeLabConfig::new(&format!("clt{}", token()), pods, bins);
    cfg.socket_lb = socket_lb;
    let lab = NodeLab::up(cfg).unwrap();
    let echo = lab.config.bins.echo.to_string_lossy().into_owned();
    for p in &lab.pods {
        drop(
            p.ns.spawn_detached(&[&echo, "serve", &NAME_PORT.to_string(), &p.state.name]).unwrap(),
        );
    }
    for p in &lab.pods {
        for port in [ECHO_PORT, NAME_PORT] {
            wait_listening(&p.ns, port).unwrap();
        }
    }
    lab
}

fn spec(id: u16, frontend: &str, backends: &[(Ipv4Addr, u16)]) -> ServiceSpec {
    ServiceSpec {
        id,
        frontend: frontend.parse().unwrap(),
        kind: ServiceKind::ClusterIP,
        backends: backends
            .iter()
            .map(|(ip, port)| BackendSpec { ip: *ip, port: *port, state: BackendState::Active })
            .collect(),
        affinity_timeout: None,
        traffic_policy_local: false,
        source_ranges: vec![],
        algorithm: None,
        name: format!("default/svc{id}"),
        source: Default::default(),
    }
}

fn update(lab: &NodeLab, s: &ServiceSpec) -> Service {
    lab.client().call(method::PUT, "/v1/service", Some(s)).unwrap()
}

/// `ciliate-echo <args>` in `ns`; in the lab's cgroup (socket LB applies)
/// or not (only the per-packet path can translate).
fn echo(lab: &NodeLab, ns: &Netns, in_cgroup: bool, args: &[&str]) -> Result<String, String> {
    let r = if in_cgroup {
        lab.run_echo(ns, args)
    } else {
        let mut cmd = ns.command(&lab.config.bins.echo.to_string_lossy());
        netns::run(cmd.args(args).stdin(Stdio::null()))
    };
    r.map(|s| s.trim().to_owned()).map_err(|e| e.to_string())
}

/// How many of `n` TCP connections to `to` each backend answered.
fn names(lab: &NodeLab, ns: &Netns, in_cgroup: bool, to: &str, n: u32) -> BTreeMap<String, u32> {
    let out = echo(lab, ns, in_cgroup, &["names", to, &n.to_string()]).unwrap();
    out.lines()
        .map(|l| {
            let (name, count) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), count.parse().unwrap())
        })
        .collect()
}

/// Service-pinned (per-packet) flows from `client` in conntrack.
fn service_flows_from(lab: &NodeLab, client: Ipv4Addr) -> usize {
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    ct.iter().filter(|(k, _)| k.dir == DIR_SERVICE && Ipv4Addr::from(k.saddr) == client).count()
}

#[test]
fn clusterip_from_pods_and_host_through_socket_lb_and_per_packet() {
    let lab = up(3, true);
    let (p1, p2, p3) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let backends = [(p2.state.ip, NAME_PORT), (p3.state.ip, NAME_PORT)];
    update(&lab, &spec(1, "10.96.0.10:80/TCP", &backends));
    update(&lab, &spec(2, "10.96.0.10:53/UDP", &backends));
    let valid = ["pod2", "pod3"];

    // Socket LB: connect() already goes to a backend, getpeername and
    // recvfrom still show the service, and no packet needed translating.
    let n = names(&lab, &p1.ns, true, "10.96.0.10:80", 10);
    assert_eq!(n.values().sum::<u32>(), 10);
    assert!(n.keys().all(|k| valid.contains(&k.as_str())), "{n:?}");
    for _ in 0..5 {
        let a = echo(&lab, &p1.ns, true, &["udp", "10.96.0.10:53", "q"]).unwrap();
        assert!(valid.contains(&a.as_str()), "{a}");
        // tcp fails if getpeername shows anything but the service.
        echo(&lab, &p1.ns, true, &["tcp", "10.96.0.10:80", "q"]).unwrap();
    }
    assert_eq!(service_flows_from(&lab, p1.state.ip), 0, "socket LB left work to tc");

    // The host (a process of the node in the lab's cgroup) reaches it too.
    let n = names(&lab, &lab.node, true, "10.96.0.10:80", 4);
    assert_eq!(n.values().sum::<u32>(), 4, "{n:?}");

    // Outside the cgroup no socket hook runs: from-container translates
    // each packet (TCP and UDP), and replies come back from the service.
    let n = names(&lab, &p1.ns, false, "10.96.0.10:80", 10);
    assert_eq!(n.values().sum::<u32>(), 10);
    let a = echo(&lab, &p1.ns, false, &["udp", "10.96.0.10:53", "q"]).unwrap();
    assert!(valid.contains(&a.as_str()), "{a}");
    assert!(service_flows_from(&lab, p1.state.ip) >= 11, "per-packet LB did not pin flows");

    // A frontend without backends: refused at connect (socket LB) and
    // dropped as "no service" per packet.
    update(&lab, &spec(3, "10.96.0.12:80/TCP", &[]));
    assert!(echo(&lab, &p1.ns, true, &["names", "10.96.0.12:80", "1"]).is_err());
    let mut cmd = p1.ns.command(&lab.config.bins.echo.to_string_lossy());
    cmd.env("CILIATE_ECHO_TIMEOUT_MS", "300").args(["names", "10.96.0.12:80", "1"]);
    assert!(netns::run(cmd.stdin(Stdio::null())).is_err());
}

#[test]
fn with_socket_lb_off_every_client_goes_through_the_per_packet_path() {
    let lab = up(2, false);
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    update(&lab, &spec(1, "10.96.0.10:80/TCP", &[(p2.state.ip, NAME_PORT)]));
    update(&lab, &spec(2, "10.96.0.10:53/UDP", &[(p2.state.ip, NAME_PORT)]));
    assert_eq!(names(&lab, &p1.ns, true, "10.96.0.10:80", 3)["pod2"], 3);
    assert_eq!(echo(&lab, &p1.ns, true, &["udp", "10.96.0.10:53", "q"]).unwrap(), "pod2");
    assert_eq!(service_flows_from(&lab, p1.state.ip), 4);
    // The replies reach pod1 from the frontend (reverse NAT): their flows
    // name the service, as Hubble's do, and `--service` finds them.
    let sock = lab.socket.parent().unwrap().join("hubble.sock");
    let out = Command::new(lab.config.bins.agent.with_file_name("ciliate"))
        .args(["observe", "--server", &format!("unix://{}", sock.display())])
        .args(["--service", "default/svc1", "--all", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"].clone())
        .collect();
    let svc1 = serde_json::json!({"name": "svc1", "namespace": "default"});
    assert!(
        flows.iter().any(|f| f["source_service"] == svc1 && f["IP"]["source"] == "10.96.0.10"),
        "a reply from the frontend names the service: {flows:?}"
    );
    for f in &flows {
        assert!(f["source_service"] == svc1 || f["destination_service"] == svc1, "{f}");
    }
    // No socket-LB link is pinned.
    let links: Vec<String> = std::fs::read_dir(lab.pins_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!links.iter().any(|l| l.starts_with("cgroup_")), "{links:?}");
}

#[test]
fn nodeport_from_the_external_host_and_hairpin() {
    let lab = up(2, true);
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let mut np = spec(1, "0.0.0.0:30080/TCP", &[(p2.state.ip, NAME_PORT)]);
    np.kind = ServiceKind::NodePort;
    let svc = update(&lab, &np);
    assert_eq!(svc.frontends[0].address, format!("{NODE_IP}:30080/TCP").parse::<L4Addr>().unwrap());
    let to = format!("{NODE_IP}:30080");
    assert_eq!(names(&lab, &lab.external, false, &to, 5)["pod2"], 5);
    // The backend saw the external host's own address (no SNAT for a local
    // backend), and its reply went back translated to the node's address
    // (the client checks getpeername; conntrack holds the flow).
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    assert!(ct.iter().any(|(k, e)| Ipv4Addr::from(k.saddr) == EXTERNAL_IP
        && Ipv4Addr::from(k.daddr) == p2.state.ip
        && e.rev_nat_index == svc.frontends[0].rev_nat_index));
    // UDP NodePort too.
    let mut np_udp = spec(2, "0.0.0.0:30053/UDP", &[(p2.state.ip, NAME_PORT)]);
    np_udp.kind = ServiceKind::NodePort;
    update(&lab, &np_udp);
    let to = format!("{NODE_IP}:30053");
    assert_eq!(echo(&lab, &lab.external, false, &["udp", &to, "q"]).unwrap(), "pod2");

    // Hairpin: pod1 reaches a service whose only backend is itself, per
    // packet (through the hairpin loopback) and through socket LB.
    update(&lab, &spec(3, "10.96.0.20:80/TCP", &[(p1.state.ip, NAME_PORT)]));
    assert_eq!(names(&lab, &p1.ns, false, "10.96.0.20:80", 3)["pod1"], 3);
    assert_eq!(names(&lab, &p1.ns, true, "10.96.0.20:80", 3)["pod1"], 3);
}

#[test]
fn affinity_spread_and_an_established_flow_that_outlives_its_backend() {
    let lab = up(4, true);
    let client = &lab.pods[3];
    let backends: Vec<(Ipv4Addr, u16)> =
        lab.pods[..3].iter().map(|p| (p.state.ip, NAME_PORT)).collect();

    // Random selection over 3 backends: 3,000 connections, each backend
    // within ±10% of 1,000. A binomial's sd is 26, so a fair selection
    // misses that margin once in ~7,000 samples (seen once in CI): a miss
    // is measured again, and only two misses in a row (~1 in 50 million
    // for a fair selection) fail.
    update(&lab, &spec(1, "10.96.0.10:80/TCP", &backends));
    let fair =
        |n: &BTreeMap<String, u32>| n.len() == 3 && n.values().all(|c| (900..=1100).contains(c));
    let first = names(&lab, &client.ns, true, "10.96.0.10:80", 3000);
    if !fair(&first) {
        let second = names(&lab, &client.ns, true, "10.96.0.10:80", 3000);
        assert!(fair(&second), "spread outside ±10% twice: {first:?}, then {second:?}");
    }

    // ClientIP affinity: every connection of the client to one backend
    // (decided per packet, where the client's address is known).
    let mut aff = spec(2, "10.96.0.11:80/TCP", &backends);
    aff.affinity_timeout = Some(60);
    update(&lab, &aff);
    for in_cgroup in [true, false] {
        let n = names(&lab, &client.ns, in_cgroup, "10.96.0.11:80", 30);
        assert_eq!(n.len(), 1, "affinity broken: {n:?}");
    }

    // An established flow keeps its backend when the service loses it;
    // new flows go to the new backend; the old one is released once the
    // flow is gone.
    let (b1, b2) = (lab.pods[0].state.ip, lab.pods[1].state.ip);
    update(&lab, &spec(3, "10.96.0.12:7/TCP", &[(b1, ECHO_PORT)]));
    let echo_bin = lab.config.bins.echo.to_string_lossy().into_owned();
    let mut cmd = client.ns.command(&echo_bin);
    cmd.args(["stream", "10.96.0.12:7", "3"]).stdin(Stdio::null());
    let stream = std::thread::spawn(move || cmd.output().unwrap());
    std::thread::sleep(Duration::from_millis(800));
    update(&lab, &spec(3, "10.96.0.12:7/TCP", &[(b2, ECHO_PORT)]));
    echo(&lab, &client.ns, false, &["tcp", "10.96.0.12:7", "hello"]).unwrap();
    let out = stream.join().unwrap();
    assert!(
        out.status.success(),
        "the established flow broke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ct = CtMaps::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    let to = |ip: Ipv4Addr| {
        ct.iter().any(|(k, _)| {
            k.dir == 1
                && Ipv4Addr::from(k.daddr) == ip
                && u16::from_be(k.dport) == ECHO_PORT
                && Ipv4Addr::from(k.saddr) == client.state.ip
        })
    };
    assert!(to(b1) && to(b2), "the stream on b1 and the new flow on b2");
    let maps = LbMaps::from_pin_dir(&lab.pins_dir).unwrap();
    assert!(
        maps.backends().unwrap().values().any(|b| b.addr == b1 && b.port == ECHO_PORT),
        "the removed backend left the map while a flow was pinned to it"
    );
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn services_come_from_a_file_and_the_state_dir_and_survive_a_restart() {
    // The file names the first pod's address: IPAM gives the health
    // endpoint 10.200.0.2 at start and the first pod 10.200.0.3.
    let file = TempFile(std::env::temp_dir().join(format!("ciliate-svc-{}.yaml", token())));
    std::fs::write(
        &file.0,
        "- id: 1\n  frontend: {ip: 10.96.0.10, port: 80, protocol: TCP}\n  \
         backends: [{ip: 10.200.0.3, port: 8080}]\n  name: default/from-file\n",
    )
    .unwrap();
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = NodeLabConfig::new(&format!("clt{}", token()), 2, bins);
    cfg.services = Some(file.0.clone());
    let lab = NodeLab::up(cfg).unwrap();
    let echo_bin = lab.config.bins.echo.to_string_lossy().into_owned();
    for p in &lab.pods {
        drop(
            p.ns.spawn_detached(&[&echo_bin, "serve", &NAME_PORT.to_string(), &p.state.name])
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lab.pods[0].state.ip, Ipv4Addr::new(10, 200, 0, 3), "IPAM order changed");
    assert_eq!(names(&lab, &lab.node, true, "10.96.0.10:80", 2)["pod1"], 2);
    update(&lab, &spec(2, "10.96.0.11:80/TCP", &[(lab.pods[1].state.ip, NAME_PORT)]));

    // kill -9: the pinned maps and links keep serving; the restarted agent
    // has both services (the file's again, the API's from its state).
    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.agent_pids().is_empty());
    assert_eq!(names(&lab, &lab.pods[0].ns, false, "10.96.0.11:80", 2)["pod2"], 2);
    lab.start_agent().unwrap();
    let svcs: Vec<Service> = lab.client().get("/v1/service").unwrap();
    let ids: Vec<u16> = svcs.iter().map(|s| s.spec.id).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(names(&lab, &lab.node, true, "10.96.0.11:80", 2)["pod2"], 2);
    // A bad update is refused and changes nothing.
    let bad = spec(2, "10.96.0.11:0/TCP", &[]);
    let e = lab.client().call::<Service>(method::PUT, "/v1/service", Some(&bad)).unwrap_err();
    assert!(e.to_string().contains("port 0"), "{e}");
    assert_eq!(names(&lab, &lab.node, true, "10.96.0.11:80", 1)["pod2"], 1);
}

/// Services and masquerading carry a 4,000-byte UDP datagram, which the
/// 1500-byte MTU cuts into three fragments each way: the datapath takes
/// the later fragments' ports from the first one (fragment tracking).
#[test]
fn a_fragmented_udp_datagram_crosses_services_and_masquerading() {
    let lab = up(2, true);
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    let echo_port = ECHO_PORT.to_string();
    let whole = "4000 bytes echoed";
    // Pod to pod, then ClusterIP per packet (outside the lab's cgroup) and
    // through socket LB: every echo comes back whole, from the address
    // the client sent to.
    let direct = format!("{}:{echo_port}", p2.state.ip);
    assert_eq!(echo(&lab, &p1.ns, false, &["udp-big", &direct, "4000"]).unwrap(), whole);
    update(&lab, &spec(1, &format!("10.96.0.30:{echo_port}/UDP"), &[(p2.state.ip, ECHO_PORT)]));
    let vip = format!("10.96.0.30:{echo_port}");
    assert_eq!(echo(&lab, &p1.ns, false, &["udp-big", &vip, "4000"]).unwrap(), whole);
    assert_eq!(echo(&lab, &p1.ns, true, &["udp-big", &vip, "4000"]).unwrap(), whole);
    assert!(service_flows_from(&lab, p1.state.ip) >= 1, "the per-packet path translated it");

    // NodePort from the external host, to the pod behind it.
    let mut np = spec(2, "0.0.0.0:30007/UDP", &[(p2.state.ip, ECHO_PORT)]);
    np.kind = ServiceKind::NodePort;
    update(&lab, &np);
    let to = format!("{NODE_IP}:30007");
    assert_eq!(echo(&lab, &lab.external, false, &["udp-big", &to, "4000"]).unwrap(), whole);

    // To the world, masqueraded behind the node, and the answer back.
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    drop(lab.external.spawn_detached(&[&bin, "serve", "9007"]).unwrap());
    wait_listening(&lab.external, 9007).unwrap();
    let world = format!("{EXTERNAL_IP}:9007");
    assert_eq!(echo(&lab, &p1.ns, false, &["udp-big", &world, "4000"]).unwrap(), whole);
    let nat = NatMap::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    assert!(
        nat.iter().any(|(k, _)| Ipv4Addr::from(k.saddr) == p1.state.ip
            && Ipv4Addr::from(k.daddr) == EXTERNAL_IP
            && u16::from_be(k.dport) == 9007),
        "the datagram was masqueraded: {nat:?}"
    );
    // The first fragments were seen (and remembered) by the datapath.
    let frags = FragMap::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    assert!(frags.iter().any(|(k, _)| Ipv4Addr::from(k.saddr) == p1.state.ip), "{frags:?}");
}

/// The Maglev table of frontend `index` in the node's map: its size and
/// how many entries each backend has (sorted).
fn maglev_shape(lab: &NodeLab, index: u16) -> (usize, Vec<usize>) {
    let t = LbMaps::from_pin_dir(&lab.pins_dir).unwrap().maglev(index).unwrap().expect("a table");
    let mut per = BTreeMap::new();
    for id in &t {
        *per.entry(*id).or_insert(0usize) += 1;
    }
    let mut counts: Vec<usize> = per.into_values().collect();
    counts.sort();
    (t.len(), counts)
}

/// `--bpf-lb-maglev-table-size`: the agent writes tables of that size and
/// the datapath indexes them with it (a wrong size would miss chunks and
/// drop as "no service"); a restart with another size loads the programs
/// anew and rewrites the tables.
#[test]
fn maglev_tables_take_the_size_the_agent_is_given_across_a_restart() {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut cfg = NodeLabConfig::new(&format!("clt{}", token()), 4, bins);
    cfg.agent_args = vec!["--bpf-lb-maglev-table-size".into(), "251".into()];
    let mut lab = NodeLab::up(cfg).unwrap();
    let echo_bin = lab.config.bins.echo.to_string_lossy().into_owned();
    for p in &lab.pods {
        drop(
            p.ns.spawn_detached(&[&echo_bin, "serve", &NAME_PORT.to_string(), &p.state.name])
                .unwrap(),
        );
    }
    for p in &lab.pods {
        wait_listening(&p.ns, NAME_PORT).unwrap();
    }
    let backends: Vec<(Ipv4Addr, u16)> =
        lab.pods[1..].iter().map(|p| (p.state.ip, NAME_PORT)).collect();
    let mut s = spec(1, "10.96.0.40:80/TCP", &backends);
    s.algorithm = Some(ciliate_api::models::LbAlgorithm::Maglev);
    let index = update(&lab, &s).frontends[0].rev_nat_index;
    let valid = ["pod2", "pod3", "pod4"];
    let reached = |lab: &NodeLab| {
        let client = &lab.pods[0].ns;
        for in_cgroup in [false, true] {
            let n = names(lab, client, in_cgroup, "10.96.0.40:80", 20);
            assert_eq!(n.values().sum::<u32>(), 20, "every connection answered: {n:?}");
            assert!(n.keys().all(|k| valid.contains(&k.as_str())), "{n:?}");
            assert!(n.len() >= 2, "20 connections all on one backend: {n:?}");
        }
    };
    // Maglev fills the table evenly: 251 / 3 backends.
    assert_eq!(maglev_shape(&lab, index), (251, vec![83, 84, 84]));
    reached(&lab);

    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    for _ in 0..50 {
        if lab.agent_pids().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.config.agent_args = vec!["--bpf-lb-maglev-table-size".into(), "509".into()];
    lab.start_agent().unwrap();
    assert_eq!(maglev_shape(&lab, index), (509, vec![169, 170, 170]));
    reached(&lab);
}
