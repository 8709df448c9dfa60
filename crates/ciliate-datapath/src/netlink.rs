//! Devices, addresses, routes and sysctls through netlink (rtnetlink), not
//! by spawning `ip` or `nsenter`: the agent, the CNI plugin and the labs
//! all go through here.
//!
//! The API is blocking: each [`Netlink`] drives its rtnetlink connection on
//! a small runtime of its own, so it can be used from plain threads and
//! from an async runtime's blocking pool alike. Work inside another network
//! namespace ([`in_netns`]) runs on a dedicated thread that has entered it:
//! the netlink socket and `/proc/sys/net` of that thread are the pod's.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
        route::{RouteAttribute, RouteMetric, RouteProtocol, RouteScope},
    },
};

use crate::error::{DatapathError, Result};

/// What netlink says of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    /// The id of the XDP program attached (0: none) and whether it runs in
    /// the driver (native XDP) rather than on skbs (generic).
    pub xdp_prog: u32,
    pub xdp_native: bool,
}

/// A route to write (`ip route replace`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Output device (ifindex).
    pub dev: Option<u32>,
    /// Preferred source address.
    pub src: Option<Ipv4Addr>,
    /// On-link (scope link), for the gateway route of a pod.
    pub scope_link: bool,
    pub mtu: Option<u32>,
}

impl Route {
    /// A route to `dst/len` with nothing else set.
    pub fn to(dst: Ipv4Addr, len: u8) -> Self {
        Self { dst, len, gateway: None, dev: None, src: None, scope_link: false, mtu: None }
    }
}

fn err(what: impl Into<String>, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Device { name: what.into(), reason: e.to_string() }
}

/// The errno of a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// A netlink connection in one network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Netlink in the calling thread's network namespace.
    pub fn here() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| err("netlink runtime", e))?;
        let (conn, handle, _) = {
            let _in = rt.enter();
            rtnetlink::new_connection().map_err(|e| err("netlink socket", e))?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// The device called `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_name(name.to_owned()).execute();
        match self.run(async { req.try_collect::<Vec<LinkMessage>>().await }) {
            Ok(msgs) => Ok(msgs.first().map(link_of)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(err(name, e)),
        }
    }

    /// Every device.
    pub fn links(&self) -> Result<Vec<Link>> {
        let req = self.handle.link().get().execute();
        let msgs = self
            .run(async { req.try_collect::<Vec<LinkMessage>>().await })
            .map_err(|e| err("listing devices", e))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// The device called `name`, which must exist.
    pub fn need(&self, name: &str) -> Result<Link> {
        self.link(name)?.ok_or_else(|| err(name, "no such device"))
    }

    /// Create a veth pair `name` ↔ `peer` with `mtu`; the peer goes into
    /// the namespace at `peer_netns` when given (created there directly).
    pub fn add_veth(
        &self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_netns: Option<&Path>,
    ) -> Result<()> {
        let ns = peer_netns.map(File::open).transpose().map_err(|e| err(peer, e))?;
        let mut p = LinkUnspec::new_with_name(peer).mtu(mtu);
        if let Some(f) = &ns {
            p = p.setns_by_fd(f.as_raw_fd());
        }
        let msg = LinkVeth::new(name, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(p.build())))
            .build();
        let req = self.handle.link().add(msg).execute();
        self.run(req).map_err(|e| err(name, format!("creating veth (peer {peer}): {e}")))
    }

    /// Create a veth pair `name` ↔ `peer` with the given ifindexes (for
    /// test runs, which name a packet's device by its ifindex).
    pub fn add_veth_indexed(
        &self,
        name: &str,
        index: u32,
        peer: &str,
        peer_index: u32,
    ) -> Result<()> {
        let p = LinkUnspec::new_with_name(peer).index(peer_index).build();
        let msg = LinkVeth::new(name, peer)
            .index(index)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(p)))
            .build();
        let req = self.handle.link().add(msg).execute();
        self.run(req).map_err(|e| err(name, format!("creating veth (index {index}): {e}")))
    }

    /// Create collect-metadata (external) VXLAN device `name` on UDP `port`.
    pub fn add_vxlan_external(&self, name: &str, port: u16) -> Result<()> {
        use rtnetlink::packet_route::link::InfoVxlan;
        let msg = LinkVxlan::new(name, 0)
            .append_info_data(InfoVxlan::CollectMetadata(true))
            .port(port)
            .build();
        let req = self.handle.link().add(msg).execute();
        self.run(req).map_err(|e| err(name, format!("creating vxlan: {e}")))
    }

    /// Create bridge `name` with MAC `mac` (a bridge otherwise takes the
    /// lowest MAC of its ports, which changes as ports join).
    pub fn add_bridge(&self, name: &str, mac: [u8; 6]) -> Result<()> {
        let msg = rtnetlink::LinkBridge::new(name).address(mac.to_vec()).build();
        let req = self.handle.link().add(msg).execute();
        self.run(req).map_err(|e| err(name, format!("creating bridge: {e}")))
    }

    /// Make device `index` a port of `master`.
    pub fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        let req = self.handle.link().set(msg).execute();
        self.run(req).map_err(|e| err(format!("ifindex {index}"), format!("enslaving: {e}")))
    }

    /// Set device `index` up (and ARP off when `arp` is false).
    pub fn set_up(&self, index: u32, arp: bool) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().arp(arp).build();
        let req = self.handle.link().set(msg).execute();
        self.run(req).map_err(|e| err(format!("ifindex {index}"), format!("setting up: {e}")))
    }

    /// Delete device `index`; one that is gone already is fine.
    pub fn del_link(&self, index: u32) -> Result<()> {
        let req = self.handle.link().del(index).execute();
        match self.run(req) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(err(format!("ifindex {index}"), format!("deleting: {e}"))),
        }
    }

    /// The IPv4 addresses (with prefix lengths) of device `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let req = self.handle.address().get().set_link_index_filter(index).execute();
        let msgs = self
            .run(async { req.try_collect::<Vec<_>>().await })
            .map_err(|e| err(format!("ifindex {index}"), format!("listing addresses: {e}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip))
                    | AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Add (or keep) address `ip/len` on device `index`.
    pub fn replace_address(&self, index: u32, ip: Ipv4Addr, len: u8) -> Result<()> {
        let req = self.handle.address().add(index, IpAddr::V4(ip), len).replace().execute();
        self.run(req)
            .map_err(|e| err(format!("ifindex {index}"), format!("adding {ip}/{len}: {e}")))
    }

    /// Write route `r` (replacing one to the same destination).
    pub fn replace_route(&self, r: &Route) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(r.dst, r.len);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw);
        }
        if let Some(dev) = r.dev {
            b = b.output_interface(dev);
        }
        if let Some(src) = r.src {
            b = b.pref_source(src);
        }
        if r.scope_link {
            b = b.scope(RouteScope::Link);
        }
        // As `ip route` writes them (rtnetlink's default is "static").
        b = b.protocol(RouteProtocol::Boot);
        let mut msg = b.build();
        if let Some(mtu) = r.mtu {
            msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        let req = self.handle.route().add(msg).replace().execute();
        self.run(req).map_err(|e| err(format!("route {}/{}", r.dst, r.len), e))
    }

    /// The BPF programs attached as tc filters (cls_bpf) at device
    /// `index`'s ingress: (program id, program name).
    pub fn ingress_bpf_filters(&self, index: u32) -> Result<Vec<(u32, String)>> {
        use rtnetlink::{
            packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage},
            packet_route::{
                RouteNetlinkMessage,
                tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
            },
        };
        let mut msg = TcMessage::default();
        msg.header.index = index as i32;
        msg.header.parent = TcHandle { major: 0xffff, minor: TcHandle::MIN_INGRESS };
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut handle = self.handle.clone();
        let what = || format!("ifindex {index}");
        let mut resp = handle.request(req).map_err(|e| err(what(), e))?;
        let mut out = Vec::new();
        self.run(async {
            use futures::StreamExt;
            while let Some(m) = resp.next().await {
                match m.payload {
                    rtnetlink::packet_core::NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewTrafficFilter(f),
                    ) => {
                        let opts = f.attributes.iter().find_map(|a| match a {
                            TcAttribute::Options(o) => Some(o),
                            _ => None,
                        });
                        let (mut id, mut name) = (None, String::new());
                        for o in opts.into_iter().flatten() {
                            match o {
                                TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
                                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = n.clone(),
                                _ => {}
                            }
                        }
                        if let Some(id) = id {
                            out.push((id, name));
                        }
                    }
                    // No clsact qdisc (EINVAL, ENOENT): no filters.
                    rtnetlink::packet_core::NetlinkPayload::Error(e)
                        if e.code.is_some()
                            && -e.raw_code() != libc::EINVAL
                            && -e.raw_code() != libc::ENOENT =>
                    {
                        return Err(err(what(), e.to_io()));
                    }
                    _ => {}
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Delete the route to `dst/len`; none is fine.
    pub fn del_route(&self, dst: Ipv4Addr, len: u8) -> Result<()> {
        // Any protocol and scope, as `ip route del` asks (the kernel only
        // matches what the request sets).
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, len)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        let req = self.handle.route().del(msg).execute();
        match self.run(req) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(err(format!("route {dst}/{len}"), format!("deleting: {e}"))),
        }
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        xdp_prog: 0,
        xdp_native: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(b) if b.len() == 6 => l.mac.copy_from_slice(b),
            LinkAttribute::Mtu(m) => l.mtu = *m,
            LinkAttribute::Xdp(x) => {
                use rtnetlink::packet_route::link::{LinkXdp, XdpAttached};
                for x in x {
                    match x {
                        LinkXdp::ProgId(id) => l.xdp_prog = *id,
                        LinkXdp::Attached(a) => l.xdp_native = *a == XdpAttached::Driver,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// Set sysctl `key` (`net.ipv4.conf.eth0.rp_filter`) of the calling
/// thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|source| DatapathError::Io {
        what: "writing sysctl",
        path: path.into(),
        source,
    })
}

/// Run `f` on a thread of its own inside the network namespace at `netns`
/// (a path such as `/run/netns/pod1`), with a netlink connection there.
/// Sysctls `f` writes are that namespace's.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce(&Netlink) -> Result<T> + Send) -> Result<T> {
    let file = File::open(netns).map_err(|source| DatapathError::Io {
        what: "opening network namespace",
        path: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) of this thread only, to a namespace fd we opened.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(err(
                    netns.display().to_string(),
                    format!("entering: {}", std::io::Error::last_os_error()),
                ));
            }
            f(&Netlink::here()?)
        })
        .join()
        .unwrap_or_else(|_| Err(err(netns.display().to_string(), "netlink thread panicked")))
    })
}
