//! Node-level setup in the calling thread's network namespace: the router
//! device pair `ciliate_host`/`ciliate_net` with from-host, and attaching
//! or detaching one endpoint (lxc map, ipcache, from-container). Used by
//! the agent (which runs inside its node's namespace) and by the lab.
//!
//! Every step is idempotent so a restarted agent can run it again over what
//! it set up before without disturbing traffic: devices and addresses that
//! exist are kept, map entries are overwritten with the same values, and a
//! program is re-attached by attaching the new one before the old pinned
//! link goes.

use std::net::Ipv4Addr;

use aya::programs::TcAttachType;
use ciliate_common::{
    config::{EndpointConfig, HOST_CONFIG_SYMBOL, HostConfig},
    endpoint::{ENDPOINT_F_HOST, EndpointInfo},
    identity,
    ipcache::IpcacheEntry,
    node::{
        NODE_F_DEBUG, NODE_F_MASQUERADE, NODE_F_XDP_NODEPORT, NodeConfig, ROUTING_TUNNEL,
        TUNNEL_DEV, VXLAN_PORT,
    },
};

use crate::{
    bpffs::NodePins,
    error::{DatapathError, Result},
    loader,
    maps::{IpcacheMap, LxcMap},
    netlink::{self, Netlink, Route, in_netns},
    nodemaps::{EndpointConfigMap, NodeConfigMap},
    objects::programs::{
        FROM_CONTAINER, FROM_HOST, FROM_NETDEV, FROM_OVERLAY, SK_MSG, SOCK, SOCKOPS, TO_NETDEV,
        XDP_ENTRY,
    },
};

pub const HOST_DEV: &str = "ciliate_host";
pub const NET_DEV: &str = "ciliate_net";
/// Link pin names, per device.
pub const FROM_HOST_PIN: &str = "from-host";
pub const FROM_CONTAINER_PIN: &str = "from-container";
pub const FROM_NETDEV_PIN: &str = "from-netdev";
pub const TO_NETDEV_PIN: &str = "to-netdev";
pub const FROM_OVERLAY_PIN: &str = "from-overlay";
pub const XDP_PIN: &str = "xdp";

/// How NodePort (and other external frontends') traffic reaches a backend
/// on another node: `--node-port-mode`, Cilium's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodePortMode {
    /// DNAT and SNAT to this node: the reply comes back through it.
    #[default]
    Snat,
    /// Direct server return (native routing): DNAT only, the frontend in
    /// an IPv4 option; the backend's node answers the client itself.
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl NodePortMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Dsr => "dsr",
            Self::Hybrid => "hybrid",
        }
    }

    /// Its `NODE_F_*` bits.
    pub const fn node_flags(self) -> u8 {
        use ciliate_common::node::{NODE_F_DSR, NODE_F_DSR_UDP};
        match self {
            Self::Snat => 0,
            Self::Dsr => NODE_F_DSR | NODE_F_DSR_UDP,
            Self::Hybrid => NODE_F_DSR,
        }
    }
}

impl std::str::FromStr for NodePortMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "snat" => Ok(Self::Snat),
            "dsr" => Ok(Self::Dsr),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!("node port mode {other:?}: \"snat\", \"dsr\" or \"hybrid\"")),
        }
    }
}

/// The node's addressing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSetup {
    pub pod_cidr: Ipv4Addr,
    pub pod_cidr_len: u8,
    /// The router IP: first address of the pod CIDR.
    pub router: Ipv4Addr,
    /// Monitor aggregation "none": trace every forwarded packet.
    pub trace_all: bool,
    /// Datapath debugging for the whole node (`NODE_F_DEBUG`).
    pub debug: bool,
    /// The native devices: from-netdev (NodePort and other external
    /// frontends, replies to masqueraded flows) and to-netdev
    /// (masquerading) are attached to each, and their addresses are the
    /// node's.
    pub devices: Vec<String>,
    /// `ciliate_common::node::ROUTING_*`: with `ROUTING_TUNNEL` the VXLAN
    /// device is created and from-overlay attached to it.
    pub routing: u8,
    pub masquerade: bool,
    /// NodePort acceleration at XDP (`NODE_F_XDP_NODEPORT`; the caller
    /// attaches XDP, see [`attach_xdp`]).
    pub xdp_nodeport: bool,
    /// How NodePort traffic reaches a backend on another node.
    pub node_port_mode: NodePortMode,
    /// Never masqueraded: the cluster's pod CIDR pool.
    pub cluster_cidr: (Ipv4Addr, u8),
    /// Never masqueraded either (`--non-masquerade-cidrs`).
    pub non_masquerade: Vec<(Ipv4Addr, u8)>,
}

fn trace_flags(trace_all: bool) -> u32 {
    if trace_all { ciliate_common::config::ENDPOINT_F_TRACE_ALL } else { 0 }
}

/// Write route `r` in the calling thread's namespace (routes to other
/// nodes' pod CIDRs).
pub fn replace_route(r: &Route) -> Result<()> {
    Netlink::here()?.replace_route(r)
}

/// Delete the route to `dst/len` in the calling thread's namespace (none is
/// fine).
pub fn del_route(dst: Ipv4Addr, len: u8) -> Result<()> {
    Netlink::here()?.del_route(dst, len)
}

/// Set a sysctl of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    netlink::sysctl(key, value)
}

/// MAC address and ifindex of `dev` in the calling thread's namespace.
pub fn link_info(dev: &str) -> Result<([u8; 6], u32)> {
    let l = Netlink::here()?.need(dev)?;
    Ok((l.mac, l.index))
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Does `dev` exist in the calling thread's namespace?
pub fn device_exists(dev: &str) -> bool {
    Netlink::here().and_then(|n| n.link(dev)).is_ok_and(|l| l.is_some())
}

/// The IPv4 addresses of `dev` in the calling thread's namespace.
pub fn device_addrs(dev: &str) -> Result<Vec<Ipv4Addr>> {
    let nl = Netlink::here()?;
    let l = nl.need(dev)?;
    Ok(nl.addresses(l.index)?.into_iter().map(|(a, _)| a).collect())
}

/// Create (or keep) the router devices and routes, load and attach
/// from-host (and from-netdev on each native device), and seed the maps
/// with the host endpoint and the ipcache's world and host entries.
/// Returns the node's addresses: those of the native devices.
pub fn setup_host(pins: &NodePins, s: &HostSetup) -> Result<Vec<Ipv4Addr>> {
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    let nl = Netlink::here()?;
    if nl.link(HOST_DEV)?.is_none() {
        nl.add_veth(HOST_DEV, NET_DEV, 1500, None)?;
    }
    let host_dev = nl.need(HOST_DEV)?;
    nl.set_up(host_dev.index, false)?;
    nl.set_up(nl.need(NET_DEV)?.index, false)?;
    nl.replace_address(host_dev.index, s.router, 32)?;
    nl.replace_route(&Route {
        dev: Some(host_dev.index),
        src: Some(s.router),
        ..Route::to(s.pod_cidr, s.pod_cidr_len)
    })?;
    let (mac, ifindex) = (host_dev.mac, host_dev.index);
    let cfg = HostConfig {
        ifindex,
        router_ip: s.router.octets(),
        mac,
        flags: trace_flags(s.trace_all) | ciliate_common::config::ENDPOINT_F_CONFIGURED,
        ..Default::default()
    };
    // Loaded and verified once per node (and binary): a restarted agent
    // finds the programs pinned and re-attaches only what is not attached.
    let host = loader::node_object(pins, "host", Some((HOST_CONFIG_SYMBOL, &cfg)))?;
    // The maps exist now (the load created or reused them): the host entries
    // go in before the program is attached.
    let host_ep =
        EndpointInfo { flags: ENDPOINT_F_HOST, identity: identity::HOST, ..Default::default() };
    LxcMap::from_pin_dir(&pins.dir)?.upsert(s.router, &host_ep)?;
    let mut ipc = IpcacheMap::from_pin_dir(&pins.dir)?;
    let entry = |identity| IpcacheEntry { identity, ..Default::default() };
    ipc.upsert(Ipv4Addr::UNSPECIFIED, 0, &entry(identity::WORLD))?;
    ipc.upsert(s.router, 32, &entry(identity::HOST))?;
    let mut node_ips = Vec::new();
    for dev in &s.devices {
        for a in device_addrs(dev)? {
            ipc.upsert(a, 32, &entry(identity::HOST))?;
            LxcMap::from_pin_dir(&pins.dir)?.upsert(a, &host_ep)?;
            node_ips.push(a);
        }
    }
    let mut tunnel_ifindex = 0;
    if s.routing == ROUTING_TUNNEL {
        if nl.link(TUNNEL_DEV)?.is_none() {
            nl.add_vxlan_external(TUNNEL_DEV, VXLAN_PORT)?;
        }
        tunnel_ifindex = nl.need(TUNNEL_DEV)?.index;
        nl.set_up(tunnel_ifindex, true)?;
        sysctl(&format!("net.ipv4.conf.{TUNNEL_DEV}.rp_filter"), "0")?;
    }
    let node_cfg = NodeConfig {
        node_ip: node_ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
        cluster_cidr: s.cluster_cidr.0.octets(),
        cluster_cidr_len: s.cluster_cidr.1,
        routing: s.routing,
        flags: if s.masquerade && !node_ips.is_empty() { NODE_F_MASQUERADE } else { 0 }
            | if s.debug { NODE_F_DEBUG } else { 0 }
            | if s.xdp_nodeport { NODE_F_XDP_NODEPORT } else { 0 }
            | s.node_port_mode.node_flags(),
        _pad: 0,
        tunnel_ifindex,
    };
    crate::nodemaps::NoMasqMap::from_pin_dir(&pins.dir)?.set(&s.non_masquerade)?;
    NodeConfigMap::from_pin_dir(&pins.dir)?.set(&node_cfg)?;
    let attach = |prog: &str, dev: &str, dir: TcAttachType, pin: &str| -> Result<()> {
        let mut p = host.classifier(prog)?;
        let pin = pins.link_path(dev, pin);
        if !loader::is_attached(&p, dev, dir, &pin) {
            loader::attach_tc(&mut p, prog, dev, dir, &pin)?;
        }
        Ok(())
    };
    attach(FROM_HOST, HOST_DEV, TcAttachType::Egress, FROM_HOST_PIN)?;
    for dev in &s.devices {
        sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        attach(FROM_NETDEV, dev, TcAttachType::Ingress, FROM_NETDEV_PIN)?;
        attach(TO_NETDEV, dev, TcAttachType::Egress, TO_NETDEV_PIN)?;
    }
    if s.routing == ROUTING_TUNNEL {
        attach(FROM_OVERLAY, TUNNEL_DEV, TcAttachType::Ingress, FROM_OVERLAY_PIN)?;
    }
    Ok(node_ips)
}

/// The node's from-container (one program for every endpoint), loaded and
/// verified once per node and binary; see [`loader::NodeObject`].
pub fn endpoint_program(pins: &NodePins) -> Result<EndpointProgram> {
    let obj = loader::node_object(pins, "lxc", None::<(&str, &HostConfig)>)?;
    let prog = obj.classifier(FROM_CONTAINER)?;
    Ok(EndpointProgram { prog, fresh: obj.fresh })
}

/// The node's from-container, ready to attach to endpoints' devices.
pub struct EndpointProgram {
    prog: aya::programs::SchedClassifier,
    /// Loaded and verified now (not found pinned from an earlier run).
    pub fresh: bool,
}

impl EndpointProgram {
    /// The kernel's id of the program.
    pub fn id(&self) -> Result<u32> {
        self.prog
            .info()
            .map(|i| i.id())
            .map_err(|e| DatapathError::program("reading the info of", FROM_CONTAINER, e))
    }
}

/// Attach the socket-LB programs to the cgroup v2 directory `cgroup` (its
/// whole subtree), pinning their links under the node's `links/` so they
/// outlive the agent. Re-attaching (a restarted agent) attaches the new
/// links before the old pins go.
pub fn attach_sock_lb(pins: &NodePins, cgroup: &std::path::Path) -> Result<()> {
    let sock = loader::node_object(pins, "sock", None::<(&str, &HostConfig)>)?;
    let dir = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io {
        what: "opening cgroup",
        path: cgroup.to_owned(),
        source,
    })?;
    let marker = CgroupMarker::new(pins, "sockcgroup_", cgroup);
    let all_pinned = SOCK.iter().all(|n| pins.link_path("cgroup", n).exists());
    if !sock.fresh && all_pinned && marker.exists() {
        return Ok(());
    }
    for name in SOCK {
        let link = attach_sock_prog(&sock, name, &dir, cgroup)?;
        let pin = pins.link_path("cgroup", name);
        loader::replace_pin(link, &pin, name)?;
    }
    marker.record()
}

/// The cgroup a node's cgroup links are on, recorded beside them (an empty
/// directory `progs/<prefix><path>`): the same programs on the same cgroup
/// need nothing.
struct CgroupMarker {
    path: std::path::PathBuf,
    prefix: &'static str,
}

impl CgroupMarker {
    fn new(pins: &NodePins, prefix: &'static str, cgroup: &std::path::Path) -> Self {
        let name = cgroup.display().to_string().replace(['/', '.'], "_");
        Self { path: pins.dir.join("progs").join(format!("{prefix}{name}")), prefix }
    }

    fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Record this cgroup (and forget any other).
    fn record(&self) -> Result<()> {
        let progs = self.path.parent().unwrap_or(&self.path);
        for e in std::fs::read_dir(progs).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(self.prefix) && e.path() != self.path {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        std::fs::create_dir_all(&self.path).map_err(|source| DatapathError::Io {
            what: "recording the cgroup of a node's programs at",
            path: self.path.clone(),
            source,
        })
    }
}

/// Socket-layer acceleration (`--sockops-enable`): the sk_msg program on
/// the node's sockhash (the pinned map holds it: no link to pin) and the
/// sock_ops program on the cgroup v2 directory `cgroup` (its whole
/// subtree), its link pinned under the node's `links/` as socket LB's.
pub fn attach_sockops(pins: &NodePins, cgroup: &std::path::Path) -> Result<()> {
    use aya::programs::{CgroupAttachMode, SkMsg, SockOps, links::FdLink};
    use ciliate_common::sockops::MAP_NAME;
    let obj = loader::node_object(pins, "sockops", None::<(&str, &HostConfig)>)?;
    let map = crate::nodemaps::SockOpsMap::from_pin_dir(&pins.dir)?;
    let mut msg = SkMsg::from_pin(obj.path(SK_MSG))
        .map_err(|e| DatapathError::program("opening the pinned", SK_MSG, e))?;
    // Replaces what an earlier binary put there (atomically, in the kernel).
    let id = msg
        .attach(map.fd())
        .map_err(|e| DatapathError::program(format!("attaching to {MAP_NAME}"), SK_MSG, e))?;
    let link =
        msg.take_link(id).map_err(|e| DatapathError::program("taking the link of", SK_MSG, e))?;
    // Dropping the link would take the program off the map again: the map
    // keeps it for as long as the map is pinned.
    std::mem::forget(link);
    let marker = CgroupMarker::new(pins, "sockopscgroup_", cgroup);
    let pin = pins.link_path("cgroup", SOCKOPS);
    if !obj.fresh && pin.exists() && marker.exists() {
        return Ok(());
    }
    let dir = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io {
        what: "opening cgroup",
        path: cgroup.to_owned(),
        source,
    })?;
    let mut ops = SockOps::from_pin(obj.path(SOCKOPS))
        .map_err(|e| DatapathError::program("opening the pinned", SOCKOPS, e))?;
    let err = |e| DatapathError::program(format!("attaching to {}", cgroup.display()), SOCKOPS, e);
    let id = ops.attach(&dir, CgroupAttachMode::Single).map_err(err)?;
    let link: FdLink =
        ops.take_link(id).map_err(err)?.try_into().map_err(|e| DatapathError::Device {
            name: cgroup.display().to_string(),
            reason: format!("cgroup link of {SOCKOPS} is not an fd link: {e}"),
        })?;
    loader::replace_pin(link, &pin, SOCKOPS)?;
    marker.record()
}

/// Stop accelerating new connections (the sock_ops link goes) and let the
/// accelerated ones take the normal path (the sockhash is emptied).
pub fn detach_sockops(pins: &NodePins) {
    let _ = std::fs::remove_file(pins.link_path("cgroup", SOCKOPS));
    if let Ok(mut map) = crate::nodemaps::SockOpsMap::from_pin_dir(&pins.dir) {
        let _ = map.clear();
    }
}

/// Open the pinned cgroup program `$name` of `$sock` as `$ty` (attach type
/// `$kind`), attach it to the cgroup directory `$dir` (`$cgroup`) and
/// return its link as an fd link to pin. (A macro: the program types share
/// these calls but no trait.)
macro_rules! attach_cgroup {
    ($ty:ty, $kind:expr, $sock:expr, $name:expr, $dir:expr, $cgroup:expr) => {{
        let (name, cgroup) = ($name, $cgroup);
        let mut prog = <$ty>::from_pin($sock.path(name), $kind)
            .map_err(|e| DatapathError::program("opening the pinned", name, e))?;
        let id = prog.attach($dir, aya::programs::CgroupAttachMode::Single).map_err(|e| {
            DatapathError::program(format!("attaching to {}", cgroup.display()), name, e)
        })?;
        let link = prog
            .take_link(id)
            .map_err(|e| DatapathError::program("taking the cgroup link of", name, e))?;
        let link: aya::programs::links::FdLink =
            link.try_into().map_err(|e| DatapathError::Device {
                name: cgroup.display().to_string(),
                reason: format!("cgroup link of {name} is not an fd link: {e}"),
            })?;
        link
    }};
}

/// Attach the pinned socket-LB program `name` of `sock` to `cgroup`
/// (sock_addr hooks, and sock_release).
fn attach_sock_prog(
    sock: &loader::NodeObject,
    name: &str,
    dir: &std::fs::File,
    cgroup: &std::path::Path,
) -> Result<aya::programs::links::FdLink> {
    use aya::programs::{
        CgroupSock, CgroupSockAddr, CgroupSockAttachType,
        cgroup_sock_addr::CgroupSockAddrAttachType as At,
    };
    let kind = match name {
        "sock4_release" => {
            let kind = CgroupSockAttachType::SockRelease;
            return Ok(attach_cgroup!(CgroupSock, kind, sock, name, dir, cgroup));
        }
        "sock4_connect" => At::Connect4,
        "sock4_sendmsg" => At::UDPSendMsg4,
        "sock4_recvmsg" => At::UDPRecvMsg4,
        _ => At::GetPeerName4,
    };
    Ok(attach_cgroup!(CgroupSockAddr, kind, sock, name, dir, cgroup))
}

/// Detach the socket-LB programs (their pinned links go).
pub fn detach_sock_lb(pins: &NodePins) {
    for name in SOCK {
        let _ = std::fs::remove_file(pins.link_path("cgroup", name));
    }
}

/// Attach the node's XDP program (the prefilter) to each of `devices`:
/// natively where the driver runs XDP (veth does), else generic (on skbs,
/// after the allocation the prefilter is there to spare: a warning's
/// worth, returned as `false` beside the device). Links are pinned
/// (`links/<dev>_xdp`), so XDP keeps filtering while no agent runs; a
/// restarted agent with the same binary changes nothing, and a new binary's
/// program replaces the old one inside the same link, atomically. A device
/// with an XDP program Ciliate did not attach is refused, not taken over.
pub fn attach_xdp(pins: &NodePins, devices: &[String]) -> Result<Vec<(String, bool)>> {
    use aya::programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    };
    let obj = loader::node_object(pins, "xdp", None::<(&str, &HostConfig)>)?;
    let nl = Netlink::here()?;
    let mut out = Vec::new();
    for dev in devices {
        let err = |e| DatapathError::program(format!("attaching to {dev}"), XDP_ENTRY, e);
        let mut prog =
            Xdp::from_pin(obj.path(XDP_ENTRY), aya_obj::programs::XdpAttachType::Interface)
                .map_err(|e| DatapathError::program("opening the pinned", XDP_ENTRY, e))?;
        let id = prog
            .info()
            .map_err(|e| DatapathError::program("reading the info of", XDP_ENTRY, e))?
            .id();
        let link = nl.need(dev)?;
        let pin = pins.link_path(dev, XDP_PIN);
        let pinned = PinnedLink::from_pin(&pin).ok().map(FdLink::from);
        match (link.xdp_prog, pinned) {
            (p, Some(_)) if p == id => {}
            // Ours, from another binary: the new program goes into the link.
            (p, Some(fd)) if p != 0 => {
                let l = XdpLink::try_from(fd).map_err(|e| DatapathError::Device {
                    name: dev.clone(),
                    reason: format!("the link pinned at {} is not an XDP link: {e}", pin.display()),
                })?;
                prog.attach_to_link(l).map_err(err)?;
            }
            (p, _) if p != 0 => {
                return Err(DatapathError::Device {
                    name: dev.clone(),
                    reason: format!(
                        "runs XDP program {p}, which Ciliate did not attach: detach it first"
                    ),
                });
            }
            // None attached (a stale pin of a device that went is replaced).
            _ => {
                let _ = std::fs::remove_file(&pin);
                let lid = match prog.attach(dev, XdpMode::Driver) {
                    Ok(l) => l,
                    Err(_) => prog.attach(dev, XdpMode::Skb).map_err(err)?,
                };
                let l: FdLink = prog.take_link(lid).map_err(err)?.try_into().map_err(|e| {
                    DatapathError::Device {
                        name: dev.clone(),
                        reason: format!("the XDP link is not an fd link: {e}"),
                    }
                })?;
                loader::replace_pin(l, &pin, XDP_ENTRY)?;
            }
        }
        out.push((dev.clone(), nl.need(dev)?.xdp_native));
    }
    Ok(out)
}

/// Detach the node's XDP program from `devices` (their pinned links go).
pub fn detach_xdp(pins: &NodePins, devices: &[String]) {
    for dev in devices {
        let _ = std::fs::remove_file(pins.link_path(dev, XDP_PIN));
    }
}

/// One endpoint as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    /// Host-side device.
    pub lxc: String,
    /// The pod's own MAC.
    pub mac: [u8; 6],
    pub endpoint_id: u16,
    pub identity: u32,
    /// Monitor aggregation "none": trace every forwarded packet.
    pub trace_all: bool,
    /// Datapath debugging (`ENDPOINT_F_DEBUG`): the endpoint's own switch
    /// or the node's.
    pub debug: bool,
}

/// What attaching found out about the host-side device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    pub lxc_mac: [u8; 6],
    pub ifindex: u32,
}

/// Write endpoint `ep`'s configuration entry, by its device's ifindex:
/// what from-container reads for each of its packets (switching its
/// debugging, say, is this and nothing else). Returns the device's MAC and
/// ifindex.
pub fn configure_endpoint(pins: &NodePins, ep: &EndpointSpec) -> Result<([u8; 6], u32)> {
    let (lxc_mac, ifindex) = link_info(&ep.lxc)?;
    let debug = if ep.debug { ciliate_common::config::ENDPOINT_F_DEBUG } else { 0 };
    let cfg = EndpointConfig {
        ifindex,
        identity: ep.identity,
        ipv4: ep.ip.octets(),
        endpoint_id: ep.endpoint_id,
        lxc_mac,
        flags: trace_flags(ep.trace_all) | debug,
    };
    EndpointConfigMap::from_pin_dir(&pins.dir)?.set(&cfg)?;
    Ok((lxc_mac, ifindex))
}

/// Switch the node's datapath debugging (`NODE_F_DEBUG` in the node
/// configuration the node programs read per packet).
pub fn set_node_debug(pins: &NodePins, on: bool) -> Result<()> {
    let mut m = NodeConfigMap::from_pin_dir(&pins.dir)?;
    let mut cfg = m.get()?;
    cfg.flags = if on { cfg.flags | NODE_F_DEBUG } else { cfg.flags & !NODE_F_DEBUG };
    m.set(&cfg)
}

/// Write the endpoint's configuration (by its device's ifindex), its lxc
/// entry and its ipcache entry, then attach the node's from-container to its
/// device (unless it is attached there already: a restarted agent). No
/// program is loaded or verified here.
pub fn attach_endpoint(
    pins: &NodePins,
    prog: &mut EndpointProgram,
    ep: &EndpointSpec,
) -> Result<Attached> {
    // Only the datapath answers ARP on a pod's device (arp_ignore 8): a
    // missing program then shows as an unreachable gateway, not as a pod
    // silently routed by the stack.
    sysctl(&format!("net.ipv4.conf.{}.arp_ignore", ep.lxc), "8")?;
    let (lxc_mac, ifindex) = configure_endpoint(pins, ep)?;
    let info = EndpointInfo {
        ifindex,
        endpoint_id: ep.endpoint_id,
        mac: ep.mac,
        node_mac: lxc_mac,
        identity: ep.identity,
        ..Default::default()
    };
    LxcMap::from_pin_dir(&pins.dir)?.upsert(ep.ip, &info)?;
    IpcacheMap::from_pin_dir(&pins.dir)?.upsert(
        ep.ip,
        32,
        &IpcacheEntry { identity: ep.identity, ..Default::default() },
    )?;
    // A tc filter (cls_bpf), not a tcx link: see loader::attach_tc_filter.
    let ours = prog.id()?;
    let filters = Netlink::here()?.ingress_bpf_filters(ifindex)?;
    if !filters.iter().any(|(id, _)| *id == ours) {
        let replace = !filters.is_empty();
        loader::attach_tc_filter(&mut prog.prog, FROM_CONTAINER, &ep.lxc, replace)?;
    }
    // An older layout's link pin on the device goes.
    let _ = std::fs::remove_file(pins.link_path(&ep.lxc, FROM_CONTAINER_PIN));
    Ok(Attached { lxc_mac, ifindex })
}

/// Is the node's from-container (`prog`) what runs at `lxc`'s ingress?
pub fn endpoint_attached(prog: &EndpointProgram, lxc: &str) -> Result<bool> {
    let nl = Netlink::here()?;
    let Some(dev) = nl.link(lxc)? else { return Ok(false) };
    let ours = prog.id()?;
    Ok(nl.ingress_bpf_filters(dev.index)?.iter().any(|(id, _)| *id == ours))
}

/// Where an older layout pinned an endpoint's own tail-call map (one object
/// per endpoint); removed wherever found.
fn calls_path(pins: &NodePins, lxc: &str) -> std::path::PathBuf {
    pins.dir.join("calls").join(lxc)
}

/// Remove the endpoint from the maps and detach its program (by removing
/// its pinned link). Missing pieces are fine: detaching twice is a no-op.
pub fn detach_endpoint(pins: &NodePins, ip: Ipv4Addr, lxc: &str) -> Result<()> {
    loader::detach_tc_filter(lxc)?;
    unpin_endpoint(pins, lxc);
    let mut lxc_map = LxcMap::from_pin_dir(&pins.dir)?;
    if let Some(info) = lxc_map.get(ip)? {
        EndpointConfigMap::from_pin_dir(&pins.dir)?.remove(info.ifindex)?;
    }
    lxc_map.remove(ip)?;
    IpcacheMap::from_pin_dir(&pins.dir)?.remove(ip, 32)?;
    // Its connections and translations go with it (Cilium scrubs them
    // too): the next pod given the address starts with none.
    crate::maps::CtMaps::from_pin_dir(&pins.dir)?.scrub(ip)?;
    crate::nodemaps::NatMap::from_pin_dir(&pins.dir)?.scrub(ip)?;
    Ok(())
}

/// Remove what older layouts pinned for the endpoint on `lxc` (a tcx link,
/// a tail-call map), whatever is there.
pub fn unpin_endpoint(pins: &NodePins, lxc: &str) {
    let _ = std::fs::remove_file(pins.link_path(lxc, FROM_CONTAINER_PIN));
    let _ = std::fs::remove_file(calls_path(pins, lxc));
}

/// Detach from-container from `lxc` and remove its older pins (a device
/// no endpoint has any more).
pub fn clear_device(pins: &NodePins, lxc: &str) -> Result<()> {
    loader::detach_tc_filter(lxc)?;
    unpin_endpoint(pins, lxc);
    Ok(())
}

/// Devices (in the calling thread's namespace) that run from-container at
/// their ingress, or that older layouts pinned endpoint pieces for.
pub fn endpoint_devices(pins_dir: &std::path::Path) -> Result<Vec<String>> {
    let names = |dir: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    };
    let suffix = format!("_{FROM_CONTAINER_PIN}");
    let nl = Netlink::here()?;
    let mut out: Vec<String> = Vec::new();
    for l in nl.links()? {
        if nl.ingress_bpf_filters(l.index)?.iter().any(|(_, n)| n == FROM_CONTAINER) {
            out.push(l.name);
        }
    }
    out.extend(
        names(pins_dir.join("links"))
            .into_iter()
            .filter_map(|n| n.strip_suffix(&suffix).map(str::to_owned))
            .chain(names(pins_dir.join("calls"))),
    );
    out.sort();
    out.dedup();
    Ok(out)
}

/// `lxc` + 11 hex digits of a stable hash of an attachment (container ID
/// and interface name): the host-side device of an endpoint.
pub fn lxc_name(container: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:011x}", h & 0xfff_ffff_ffff)
}

/// Delete `dev` if it exists. A device that vanishes meanwhile (its pod's
/// namespace is being torn down, which takes the veth pair with it) is
/// what we wanted.
pub fn delete_device(dev: &str) -> Result<()> {
    let nl = Netlink::here()?;
    match nl.link(dev)? {
        Some(l) => nl.del_link(l.index),
        None => Ok(()),
    }
}

/// How a pod's side of an endpoint is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLink<'a> {
    /// The pod's network namespace (a path).
    pub netns: &'a str,
    /// Interface name inside the pod.
    pub ifname: &'a str,
    /// Host-side device.
    pub lxc: &'a str,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Create the veth pair of an endpoint (replacing a leftover one), its pod
/// side made directly in the pod's namespace, and give the pod its /32, an
/// on-link route to the gateway and a default route via it, as Cilium
/// does; IPv6 is off on the pod's interface (the datapath is IPv4 only, so
/// its router solicitations would only be drops). All through netlink.
/// Returns the MAC of the pod's interface.
pub fn create_pod_link(l: &PodLink<'_>) -> Result<String> {
    let netns = std::path::Path::new(l.netns);
    // A leftover pod side (a retried ADD rebuilding) goes first.
    in_netns(netns, |nl| match nl.link(l.ifname)? {
        Some(old) => nl.del_link(old.index),
        None => Ok(()),
    })?;
    let nl = Netlink::here()?;
    if let Some(old) = nl.link(l.lxc)? {
        nl.del_link(old.index)?;
    }
    nl.add_veth(l.lxc, l.ifname, l.mtu, Some(netns))?;
    let mac = in_netns(netns, |nl| {
        let dev = nl.need(l.ifname)?;
        let _ = netlink::sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", l.ifname), "1");
        nl.replace_address(dev.index, l.ip, 32)?;
        nl.set_up(dev.index, true)?;
        let gw = Route { dev: Some(dev.index), scope_link: true, ..Route::to(l.gateway, 32) };
        nl.replace_route(&gw)?;
        nl.replace_route(&Route {
            gateway: Some(l.gateway),
            dev: Some(dev.index),
            mtu: Some(l.mtu),
            ..Route::to(Ipv4Addr::UNSPECIFIED, 0)
        })?;
        Ok(format_mac(&dev.mac))
    })?;
    nl.set_up(nl.need(l.lxc)?.index, true)?;
    Ok(mac)
}

/// The MAC address of `ifname` in the namespace at `netns`.
pub fn mac_in(netns: &str, ifname: &str) -> Result<String> {
    in_netns(std::path::Path::new(netns), |nl| Ok(format_mac(&nl.need(ifname)?.mac)))
}

/// The IPv4 addresses of `ifname` in the namespace at `netns`.
pub fn addresses_in(netns: &str, ifname: &str) -> Result<Vec<(Ipv4Addr, u8)>> {
    in_netns(std::path::Path::new(netns), |nl| {
        let dev = nl.need(ifname)?;
        nl.addresses(dev.index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_device_names_are_stable_and_distinct() {
        assert_eq!(lxc_name("abc", "eth0"), lxc_name("abc", "eth0"));
        assert_ne!(lxc_name("abc", "eth0"), lxc_name("abc", "eth1"));
        assert_ne!(lxc_name("ab", "ceth0"), lxc_name("abc", "eth0"));
        assert_eq!(lxc_name("x", "y").len(), 14);
    }

    #[test]
    fn macs_parse_and_format() {
        let m = parse_mac("0a:1B:ff:00:01:02").unwrap();
        assert_eq!(m, [0x0a, 0x1b, 0xff, 0, 1, 2]);
        assert_eq!(format_mac(&m), "0a:1b:ff:00:01:02");
        assert_eq!(parse_mac("0a:1b"), None);
        assert_eq!(parse_mac("0a:1b:ff:00:01:02:03"), None);
        assert_eq!(parse_mac("zz:1b:ff:00:01:02"), None);
    }
}
