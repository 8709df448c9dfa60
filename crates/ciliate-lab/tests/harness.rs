//! The lab harness itself: namespaces are removed by their guard even when a
//! test panics, commands and closures run inside the right namespace, veth
//! pairs carry traffic. Needs root; CI runs as root.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ciliate_lab::{
    Netns,
    names::token,
    netns::{self, exists, veth},
};

fn unique(tag: &str) -> String {
    format!("clt{}-{tag}", token())
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn the_guard_removes_the_namespace_and_its_processes_when_a_test_panics() {
    let name = unique("panic");
    let mut child_pid = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let ns = Netns::create(&name).unwrap();
        let child = ns.spawn(&["sleep", "300"]).unwrap();
        child_pid = child.id();
        assert!(exists(&name));
        panic!("a test failing half-way");
    }));
    assert!(result.is_err());
    assert!(!exists(&name), "namespace {name} leaked");
    assert!(!netns::list().contains(&name));
    // `ip netns exec` execs the command, so the child is the sleep itself.
    assert!(!alive(child_pid), "process {child_pid} survived its namespace");
}

#[test]
fn a_kept_namespace_outlives_its_guard_until_deleted() {
    let name = unique("keep");
    {
        let mut ns = Netns::create(&name).unwrap();
        ns.keep();
    }
    assert!(exists(&name));
    Netns::adopt(&name).delete().unwrap();
    assert!(!exists(&name));
}

#[test]
fn run_executes_inside_the_namespace() {
    let ns = Netns::create(&unique("run")).unwrap();
    ns.ip(&["link", "add", "cltdummy0", "type", "veth", "peer", "name", "cltdummy1"]).unwrap();
    let index = |dev: &str| {
        let c = std::ffi::CString::new(dev).unwrap();
        // SAFETY: if_nametoindex on a NUL-terminated name.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    assert_ne!(ns.run(|| index("cltdummy0")).unwrap(), 0, "device visible inside");
    assert_eq!(index("cltdummy0"), 0, "device not visible in the root namespace");
    let out = ns.exec(&["ip", "-o", "link", "show", "cltdummy0"]).unwrap();
    assert!(out.contains("cltdummy0"));
}

#[test]
fn a_veth_pair_between_namespaces_carries_traffic() {
    let a = Netns::create(&unique("a")).unwrap();
    let b = Netns::create(&unique("b")).unwrap();
    veth(&a, "va", &b, "vb").unwrap();
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "va"]).unwrap();
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", "vb"]).unwrap();
    a.exec(&["ping", "-c", "1", "-W", "2", "192.0.2.2"]).unwrap();
    // And a failing command reports its stderr.
    let err = a.exec(&["ip", "link", "show", "nosuchdev"]).unwrap_err().to_string();
    assert!(err.contains("nosuchdev") || err.contains("does not exist"), "{err}");
}

#[test]
fn bad_namespace_names_are_refused() {
    for bad in ["", "a/b"] {
        let e = Netns::create(bad).unwrap_err().to_string();
        assert!(e.contains("bad namespace name"), "{e}");
    }
}
