//! Netlink and named namespaces against the kernel: a namespace made and
//! removed as `ip netns` does, a veth pair with its peer made straight in
//! another namespace, addresses, routes replaced and deleted (whatever
//! their protocol and scope), sysctls inside a namespace, and a process
//! started inside one. Needs root; CI runs as root.

use std::net::Ipv4Addr;

use ciliate_datapath::{
    netlink::{Route, in_netns},
    netns,
};

/// A named namespace removed when dropped.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!("cilnl-{tag}-{}", std::process::id());
        netns::create_named(&name).unwrap();
        Self(name)
    }
    fn path(&self) -> std::path::PathBuf {
        netns::path_of(&self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}

#[test]
fn devices_addresses_routes_and_sysctls_in_named_namespaces() {
    let (a, b) = (Ns::new("a"), Ns::new("b"));
    let b_path = b.path();
    in_netns(&a.path(), |nl| {
        nl.add_veth("va", "vb", 1400, Some(&b_path))?;
        let va = nl.need("va")?;
        assert_eq!(va.mtu, 1400);
        nl.replace_address(va.index, Ipv4Addr::new(192, 0, 2, 1), 24)?;
        nl.set_up(va.index, true)?;
        assert_eq!(nl.addresses(va.index)?, [(Ipv4Addr::new(192, 0, 2, 1), 24)]);
        let r = Route {
            gateway: Some(Ipv4Addr::new(192, 0, 2, 2)),
            ..Route::to(Ipv4Addr::new(198, 51, 100, 0), 24)
        };
        nl.replace_route(&r)?;
        nl.replace_route(&r)?; // replacing is idempotent
        nl.del_route(Ipv4Addr::new(198, 51, 100, 0), 24)?;
        nl.del_route(Ipv4Addr::new(198, 51, 100, 0), 24)?; // gone is fine
        ciliate_datapath::netlink::sysctl("net.ipv4.conf.va.rp_filter", "2")
    })
    .unwrap();
    // The peer was made in b, with the same MTU; the sysctl was a's.
    let vb = in_netns(&b_path, |nl| nl.need("vb")).unwrap();
    assert_eq!(vb.mtu, 1400);
    let rp = in_netns(&a.path(), |_| {
        Ok(std::fs::read_to_string("/proc/sys/net/ipv4/conf/va/rp_filter").unwrap_or_default())
    })
    .unwrap();
    assert_eq!(rp.trim(), "2");
    assert!(in_netns(&b_path, |nl| nl.link("va")).unwrap().is_none());
    // A process started inside a namespace is in it, and is found there.
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("5");
    netns::enter_on_spawn(&mut cmd, &a.path()).unwrap();
    let mut child = cmd.spawn().unwrap();
    assert_eq!(netns::pids_in(&a.path()), [child.id() as i32]);
    child.kill().unwrap();
    child.wait().unwrap();
    let path = a.path();
    drop(a);
    assert!(!path.exists(), "the namespace file goes");
}
