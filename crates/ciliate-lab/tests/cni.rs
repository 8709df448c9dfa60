//! CNI conformance of `ciliate-cni` against a running agent: every spec
//! command, the result and error objects, idempotent DEL, and 50
//! concurrent ADDs then DELs with nothing left behind (no address, device,
//! map entry, link or endpoint). Needs root; CI runs as root.

use std::net::Ipv4Addr;

use ciliate_api::models::{Endpoint, Status};
use ciliate_datapath::maps::{IpcacheMap, LxcMap};
use ciliate_lab::{
    Netns,
    names::token,
    node::{Binaries, NodeLab, NodeLabConfig},
};
use serde_json::Value;

fn lab() -> NodeLab {
    let bins = Binaries::beside_current_exe().unwrap();
    NodeLab::up(NodeLabConfig::new(&format!("clt{}", token()), 0, bins)).unwrap()
}

fn netns(lab: &NodeLab, i: usize) -> Netns {
    Netns::create(&format!("{}-pod{}", lab.config.lab, i)).unwrap()
}

fn path(ns: &Netns) -> String {
    ns.path().display().to_string()
}

fn ok_json(out: (String, bool)) -> Value {
    assert!(out.1, "plugin failed: {}", out.0);
    if out.0.trim().is_empty() { Value::Null } else { serde_json::from_str(&out.0).unwrap() }
}

/// The error object of a failed call: its code.
fn err_code(out: (String, bool)) -> u64 {
    assert!(!out.1, "plugin succeeded where it should fail: {}", out.0);
    let v: Value = serde_json::from_str(&out.0).unwrap();
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["code"].as_u64().unwrap()
}

/// The pods' endpoints (not the node's own host and health endpoints).
fn endpoints(lab: &NodeLab) -> Vec<Endpoint> {
    let all: Vec<Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    all.into_iter().filter(|e| !e.container_id.starts_with("reserved:")).collect()
}

fn health(lab: &NodeLab) -> Endpoint {
    let all: Vec<Endpoint> = lab.client().get("/v1/endpoint").unwrap();
    all.into_iter().find(|e| e.container_id == "reserved:health").expect("a health endpoint")
}

/// The pods' host devices (not the health endpoint's).
fn lxc_devices(lab: &NodeLab) -> Vec<String> {
    let health = health(lab).host_ifname;
    lab.node
        .ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("lxc") && *n != health)
        .collect()
}

#[test]
fn add_check_del_follow_the_spec() {
    let lab = lab();
    let conf = lab.cni_config(&[("app", "web")]);
    let ns = netns(&lab, 1);
    let id = ns.name().to_owned();

    let res = ok_json(lab.cni("ADD", &id, &path(&ns), &conf).unwrap());
    assert_eq!(res["cniVersion"], "1.1.0");
    let ifs = res["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2);
    assert!(ifs[0]["name"].as_str().unwrap().starts_with("lxc"));
    assert_eq!(
        (ifs[1]["name"].as_str(), ifs[1]["sandbox"].as_str()),
        (Some("eth0"), Some(path(&ns).as_str()))
    );
    // 10.200.0.2 is the health endpoint's.
    assert_eq!(health(&lab).ip, Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(health(&lab).identity, 4);
    assert_eq!(res["ips"][0]["address"], "10.200.0.3/32");
    assert_eq!(res["ips"][0]["gateway"], "10.200.0.1");
    assert_eq!(res["ips"][0]["interface"], 1);
    assert_eq!(res["routes"][0]["dst"], "0.0.0.0/0");
    // The pod's side is as the result says.
    let addr = ns.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("inet 10.200.0.3/32"), "{addr}");
    ns.exec(&["ping", "-c", "1", "-W", "2", "10.200.0.1"]).unwrap();
    let ep = &endpoints(&lab)[0];
    assert_eq!(ep.labels.get("io.kubernetes.pod.namespace").map(String::as_str), Some("default"));
    assert_eq!(ep.pod_name, format!("default/{id}"));

    // A repeated ADD gives the same address.
    let again = ok_json(lab.cni("ADD", &id, &path(&ns), &conf).unwrap());
    assert_eq!(again["ips"][0]["address"], "10.200.0.3/32");
    assert_eq!(endpoints(&lab).len(), 1);

    ok_json(lab.cni("CHECK", &id, &path(&ns), &conf).unwrap());
    ns.ip(&["addr", "del", "10.200.0.3/32", "dev", "eth0"]).unwrap();
    assert_eq!(err_code(lab.cni("CHECK", &id, &path(&ns), &conf).unwrap()), 100);
    assert_eq!(err_code(lab.cni("CHECK", "unknown-container", &path(&ns), &conf).unwrap()), 3);

    // DEL after the namespace is gone, then DEL again: both succeed.
    drop(ns);
    ok_json(lab.cni("DEL", &id, "", &conf).unwrap());
    ok_json(lab.cni("DEL", &id, "", &conf).unwrap());
    assert!(endpoints(&lab).is_empty());
    assert!(lxc_devices(&lab).is_empty());
}

#[test]
fn older_versions_get_their_result_format_and_errors_carry_spec_codes() {
    let lab = lab();
    let ns = netns(&lab, 1);
    let old = lab.cni_config(&[]).replace("\"1.1.0\"", "\"0.3.1\"");
    let res = ok_json(lab.cni("ADD", ns.name(), &path(&ns), &old).unwrap());
    assert_eq!(
        (res["cniVersion"].as_str(), res["ips"][0]["version"].as_str()),
        (Some("0.3.1"), Some("4"))
    );

    // A 1.0.0 configuration gets a 1.0.0 result (not the plugin's newest).
    let ns2 = netns(&lab, 2);
    let v100 = lab.cni_config(&[]).replace("\"1.1.0\"", "\"1.0.0\"");
    let res = ok_json(lab.cni("ADD", ns2.name(), &path(&ns2), &v100).unwrap());
    assert_eq!(res["cniVersion"], "1.0.0");

    let bad_version = lab.cni_config(&[]).replace("\"1.1.0\"", "\"2.0.0\"");
    assert_eq!(err_code(lab.cni("ADD", "x", &path(&ns), &bad_version).unwrap()), 1);
    assert_eq!(err_code(lab.cni("ADD", "x", &path(&ns), "{oops").unwrap()), 6);
    assert_eq!(
        err_code(lab.cni("ADD", "x", "/run/netns/does-not-exist", &lab.cni_config(&[])).unwrap()),
        3
    );
    let v = ok_json(lab.cni("VERSION", "", "", "").unwrap());
    assert!(v["supportedVersions"].as_array().unwrap().iter().any(|s| s == "1.1.0"));
}

#[test]
fn status_gc_and_an_agent_that_is_down() {
    let lab = lab();
    let conf = lab.cni_config(&[]);
    ok_json(lab.cni("STATUS", "", "", &conf).unwrap());
    let (a, b) = (netns(&lab, 1), netns(&lab, 2));
    ok_json(lab.cni("ADD", a.name(), &path(&a), &conf).unwrap());
    ok_json(lab.cni("ADD", b.name(), &path(&b), &conf).unwrap());

    // GC keeps only the attachments it is told are valid.
    let gc_conf: Value = serde_json::from_str(&conf).unwrap();
    let mut gc_conf = gc_conf.as_object().unwrap().clone();
    gc_conf.insert(
        "cni.dev/valid-attachments".into(),
        serde_json::json!([{"containerID": a.name(), "ifname": "eth0"}]),
    );
    ok_json(lab.cni("GC", "", "", &Value::Object(gc_conf).to_string()).unwrap());
    let eps = endpoints(&lab);
    assert_eq!(eps.iter().map(|e| e.container_id.as_str()).collect::<Vec<_>>(), [a.name()]);

    // With the agent gone: STATUS says 50, ADD says try again (11).
    for pid in lab.node.pids() {
        // SAFETY: kill(2) on a pid of the lab's own node namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(err_code(lab.cni("STATUS", "", "", &conf).unwrap()), 50);
    let c = netns(&lab, 3);
    assert_eq!(err_code(lab.cni("ADD", c.name(), &path(&c), &conf).unwrap()), 11);
}

#[test]
fn fifty_concurrent_adds_then_dels_leave_nothing_behind() {
    const N: usize = 50;
    let lab = lab();
    let conf = lab.cni_config(&[("app", "many")]);
    let nss: Vec<Netns> = (0..N).map(|i| netns(&lab, i + 1)).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = nss
            .iter()
            .map(|ns| {
                let (lab, conf) = (&lab, &conf);
                s.spawn(move || ok_json(lab.cni("ADD", ns.name(), &path(ns), conf).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> =
        results.iter().map(|r| r["ips"][0]["address"].as_str().unwrap().to_owned()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N, "every pod got its own address");
    assert_eq!(endpoints(&lab).len(), N);
    assert_eq!(lxc_devices(&lab).len(), N);
    // Plus the host (its router IP and its address on eth0) and the
    // health endpoint.
    assert_eq!(LxcMap::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap().len(), N + 3);
    // One identity for all: the same labels.
    let ids: std::collections::BTreeSet<u32> = endpoints(&lab).iter().map(|e| e.identity).collect();
    assert_eq!(ids.len(), 1);
    // A few of them really work.
    for ns in nss.iter().step_by(17) {
        ns.exec(&["ping", "-c", "1", "-W", "2", "10.200.0.1"]).unwrap();
    }

    std::thread::scope(|s| {
        for ns in &nss {
            let (lab, conf) = (&lab, &conf);
            s.spawn(move || ok_json(lab.cni("DEL", ns.name(), &path(ns), conf).unwrap()));
        }
    });
    assert!(endpoints(&lab).is_empty());
    assert!(lxc_devices(&lab).is_empty(), "{:?}", lxc_devices(&lab));
    let status: Status = lab.client().get("/v1/status").unwrap();
    // What remains is the node's own: host and health endpoints.
    assert_eq!((status.endpoints, status.ipam_used), (2, 1));
    let lxc = LxcMap::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    let health_ip = health(&lab).ip;
    assert_eq!(
        lxc.iter().map(|(ip, _)| *ip).collect::<Vec<_>>(),
        [Ipv4Addr::new(10, 200, 0, 1), health_ip, ciliate_lab::node::NODE_IP]
    );
    let ipc = IpcacheMap::from_pin_dir(&lab.pins_dir).unwrap().dump().unwrap();
    assert_eq!(ipc.len(), 4, "only world, host (router, node address) and health remain: {ipc:?}");
    let links: Vec<_> = std::fs::read_dir(lab.pins_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    // from-host, from-netdev, to-netdev, from-overlay and the five
    // socket-LB links (endpoints run from-container as a tc filter of their
    // device: nothing pinned).
    assert_eq!(links.len(), 9, "only the node's stay: {links:?}");
}
