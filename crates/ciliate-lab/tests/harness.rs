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

#[test]
fn the_guard_removes_the_namespace_and_its_processes_when_a_test_panics() {
    let name = unique("panic");
    let mut child = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let ns = Netns::create(&name).unwrap();
        child = Some(ns.spawn(&["sleep", "300"]).unwrap());
        assert!(exists(&name));
        panic!("a test failing half-way");
    }));
    assert!(result.is_err());
    assert!(!exists(&name), "namespace {name} leaked");
    assert!(!netns::list().contains(&name));
    // `ip netns exec` execs the command, so the child is the sleep itself:
    // the guard must have killed it.
    let mut child = child.expect("child started");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "process survived its namespace");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
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
