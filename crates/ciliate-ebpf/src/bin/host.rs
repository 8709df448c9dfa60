//! Programs on `ciliate_host`, the node's router device.
//!
//! from-host (tc egress of `ciliate_host`: packets the node's stack routes
//! to the pod CIDR): the source's identity from the ipcache (the node's own
//! addresses are `host`, 1), then the destination endpoint's ingress stage
//! and a redirect out of its lxc device. Packets for addresses that are no
//! local endpoint continue on `ciliate_host` unchanged.
//!
//! from-netdev (tc ingress of the native devices): replies to masqueraded
//! flows, NodePort and other external frontends (see [`from_netdev`]);
//! to-netdev (tc egress of the native devices): masquerading;
//! from-overlay (tc ingress of `ciliate_vxlan`): pods of other nodes.
//!
//! Each program is built twice (`ciliate_ebpf::debug`): the normal build
//! tail-calls its debug build while the node debugs (`NODE_F_DEBUG`).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, map},
    maps::ProgramArray,
    programs::TcContext,
};
use ciliate_common::{
    config::{ENDPOINT_F_CONFIGURED, ENDPOINT_F_TRACE_ALL, HostConfig},
    debug as dbgs,
    drop::{NO_CONFIG, UNROUTABLE},
    endpoint::ENDPOINT_F_HOST,
    event::FILE_HOST,
    lb::{REV_NAT_DSR, SVC_F_EXTERNAL},
    metrics::DIR_INGRESS as METRIC_INGRESS,
    node::{NODE_F_DEBUG, NODE_F_DSR, NODE_F_MASQUERADE, ROUTING_TUNNEL, VXLAN_PORT},
    trace::{FROM_HOST, FROM_NETWORK, FROM_OVERLAY, TO_NETWORK, TO_OVERLAY},
};
use ciliate_ebpf::{
    Drop, ct,
    debug::{self, Dbg, addr},
    deliver::{self, Via},
    drop,
    drop::{DropCtx, send_drop_notify},
    dsr, lb, lookup, maps, nat, packet, tunnel, verdict,
};

/// Set by the loader; see `ciliate_common::config::HostConfig`.
#[unsafe(no_mangle)]
static HOST_CONFIG: HostConfig =
    HostConfig { ifindex: 0, router_ip: [0; 4], mac: [0; 6], _pad: [0; 2], flags: 0 };

/// The debug builds, by the index of the program they debug.
#[map(name = "ciliate_host_dbg")]
static CILIATE_HOST_DEBUG: ProgramArray = ProgramArray::pinned(4, 0);
const DEBUG_FROM_HOST: u32 = 0;
const DEBUG_FROM_NETDEV: u32 = 1;
const DEBUG_TO_NETDEV: u32 = 2;
const DEBUG_FROM_OVERLAY: u32 = 3;

/// While the node debugs, hand the packet to debug build `index`
/// (returns only when it is not there: the packet goes on undebugged).
#[inline(always)]
fn debug_build(ctx: &TcContext, node_flags: u8, index: u32) {
    if node_flags & NODE_F_DEBUG != 0 {
        // SAFETY: the context of a tc program.
        unsafe { CILIATE_HOST_DEBUG.tail_call(ctx, index) };
    }
}

/// The debug builds' switch: node programs speak for no endpoint.
const ON: Dbg<true> = Dbg { source: 0 };

#[inline(always)]
fn host_config() -> HostConfig {
    // SAFETY: a plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(&HOST_CONFIG) }
}

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    debug_build(&ctx, maps::node_config().flags, DEBUG_FROM_HOST);
    run_from_host(&ctx, &debug::OFF)
}

/// from_host's debug build.
#[classifier]
pub fn from_host_debug(ctx: TcContext) -> i32 {
    run_from_host(&ctx, &ON)
}

#[inline(always)]
fn run_from_host<const D: bool>(ctx: &TcContext, dbg: &Dbg<D>) -> i32 {
    let cfg = host_config();
    dbg.capture(ctx, dbgs::CAPTURE_FROM, cfg.ifindex, u32::from(FROM_HOST));
    try_from_host(ctx, &cfg, dbg)
        .unwrap_or_else(|d| drop_from(ctx, ciliate_common::identity::HOST, d))
}

/// Report drop `d` of a packet from `src_identity` arriving at the node.
#[inline(always)]
fn drop_from(ctx: &TcContext, src_identity: u32, d: Drop) -> i32 {
    let who = DropCtx {
        src_identity,
        dst_identity: 0,
        dst_id: 0,
        source: 0,
        dir: METRIC_INGRESS,
        file: FILE_HOST,
    };
    send_drop_notify(ctx, &who, d)
}

#[inline(always)]
fn try_from_host<const D: bool>(
    ctx: &TcContext,
    cfg: &HostConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if cfg.flags & ENDPOINT_F_CONFIGURED == 0 {
        return Err(drop!(NO_CONFIG));
    }
    let Some(ip) = packet::ipv4_of(ctx, false)? else { return Ok(verdict::OK) };
    let Some(ep) = lookup::local_endpoint(ip.daddr) else {
        dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
        return Ok(verdict::OK);
    };
    if ep.flags & ENDPOINT_F_HOST != 0 {
        dbg.msg(ctx, dbgs::DBG_TO_HOST, 0, 0, 0);
        return Ok(verdict::OK);
    }
    deliver::check_ttl(ip.ttl)?;
    let mut t = ct::tuple(ctx, &ip)?;
    let src_identity = lookup::identity_of(ip.saddr);
    dbg.msg(ctx, dbgs::DBG_IP_ID_MAP_SUCCEED4, addr(ip.saddr), src_identity, 0);
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    deliver::to_endpoint(ctx, &ep, src_identity, &mut t, Via::Egress, trace_all, 0, dbg)
}

/// from-netdev (tc ingress of the node's native devices): a packet from
/// outside addressed to a NodePort, ExternalIP, LoadBalancer or HostPort
/// frontend is balanced here: backend chosen, DNAT, and delivered straight
/// into the backend's pod with the frontend's reverse-NAT index on its
/// conntrack entry, so the backend's replies are translated back in its
/// from-container (or, for a backend on another node, SNATed and sent
/// there). Replies to masqueraded flows are translated back; a packet for
/// a pod of this node goes straight into it. Everything else goes on to
/// the stack untouched.
#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    debug_build(&ctx, maps::node_config().flags, DEBUG_FROM_NETDEV);
    run_from_netdev(&ctx, &debug::OFF)
}

/// from_netdev's debug build.
#[classifier]
pub fn from_netdev_debug(ctx: TcContext) -> i32 {
    run_from_netdev(&ctx, &ON)
}

#[inline(always)]
fn run_from_netdev<const D: bool>(ctx: &TcContext, dbg: &Dbg<D>) -> i32 {
    let cfg = host_config();
    dbg.capture(ctx, dbgs::CAPTURE_FROM, ingress_ifindex(ctx), u32::from(FROM_NETWORK));
    try_from_netdev(ctx, &cfg, dbg)
        .unwrap_or_else(|d| drop_from(ctx, ciliate_common::identity::WORLD, d))
}

/// Reverse SNAT of a reply (said, when debugging).
#[inline(always)]
fn rev_snat<const D: bool>(
    ctx: &TcContext,
    t: &mut ct::Tuple,
    dbg: &Dbg<D>,
) -> Result<Option<u16>, Drop> {
    let r = nat::rev_snat(ctx, t)?;
    if r.is_some() {
        let port = u32::from(u16::from_be(t.key.dport));
        dbg.msg(ctx, dbgs::DBG_REV_SNAT, addr(t.key.daddr), 0, port);
    }
    Ok(r)
}

/// SNAT to the node's address (said, with captures before and after, when
/// debugging).
#[inline(always)]
fn snat<const D: bool>(
    ctx: &TcContext,
    t: &mut ct::Tuple,
    node_ip: [u8; 4],
    rev_nat: u16,
    dbg: &Dbg<D>,
) -> Result<(), Drop> {
    // The device the program runs on (to-netdev: the one it leaves by).
    // SAFETY: the context of a tc program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    dbg.capture(ctx, dbgs::CAPTURE_SNAT_PRE, ifindex, 0);
    let (from, from_port) = (t.key.saddr, u16::from_be(t.key.sport));
    nat::snat(ctx, t, node_ip, rev_nat)?;
    let ports = u32::from(from_port) << 16 | u32::from(u16::from_be(t.key.sport));
    dbg.msg(ctx, dbgs::DBG_SNAT, addr(from), addr(t.key.saddr), ports);
    dbg.capture(ctx, dbgs::CAPTURE_SNAT_POST, ifindex, 0);
    Ok(())
}

#[inline(always)]
fn try_from_netdev<const D: bool>(
    ctx: &TcContext,
    cfg: &HostConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if cfg.flags & ENDPOINT_F_CONFIGURED == 0 {
        return Ok(verdict::OK);
    }
    let Some(ip) = packet::ipv4_of(ctx, true)? else { return Ok(verdict::OK) };
    let node = maps::node_config();
    if ip.daddr == node.node_ip && ip.proto == ct::IPPROTO_ICMP {
        // An echo reply to a masqueraded ping: back to its pod (the stack
        // routes it to the pod CIDR and from-host delivers it).
        let mut t = ct::tuple(ctx, &ip)?;
        rev_snat(ctx, &mut t, dbg)?;
        dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
        return Ok(verdict::OK);
    }
    if ip.proto != ct::IPPROTO_TCP && ip.proto != ct::IPPROTO_UDP {
        return Ok(verdict::OK);
    }
    let mut t = ct::tuple(ctx, &ip)?;
    if ip.daddr == node.node_ip {
        // Overlay traffic goes to the VXLAN socket (and from-overlay).
        if ip.proto == ct::IPPROTO_UDP && t.key.dport == VXLAN_PORT.to_be() {
            return Ok(verdict::OK);
        }
        match rev_snat(ctx, &mut t, dbg)? {
            // A reply to a masqueraded pod: delivered below.
            Some(0) => {}
            // A backend's reply to a NodePort flow this node SNATed to it:
            // back to the client from the frontend, through the FIB (the
            // stack would take the node's own address for a martian).
            Some(rev) => {
                dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT_LOOKUP, u32::from(rev), 0, 0);
                lb::rev_nat(ctx, &mut t, rev)?;
                let port = u32::from(u16::from_be(t.key.sport));
                dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT, addr(t.key.saddr), port, 0);
                deliver::check_ttl(ip.ttl)?;
                return deliver::fib_redirect(ctx, &t, ingress_ifindex(ctx), dbg);
            }
            None => {}
        }
    }
    // External frontends (a ClusterIP is not reachable from outside).
    let mut rev_nat = 0;
    let port = u32::from(u16::from_be(t.key.dport));
    dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_FRONTEND, addr(t.key.daddr), port, 0);
    if let Some(svc) = lb::frontend(&t)
        && svc.flags & SVC_F_EXTERNAL != 0
    {
        dbg.capture(ctx, dbgs::CAPTURE_FROM_LB, ingress_ifindex(ctx), 0);
        let sel = lb::select(&t, &svc)?;
        let (backend, port) = (addr(sel.backend.addr), u32::from(u16::from_be(sel.backend.port)));
        dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_BACKEND_SLOT_SUCCESS, backend, port, 0);
        match lookup::local_endpoint(sel.backend.addr) {
            None => {
                return to_remote_backend(ctx, &mut t, &sel, svc.rev_nat_index, &node, ip.ttl, dbg);
            }
            Some(ep) if ep.flags & ENDPOINT_F_HOST != 0 => return Err(drop!(UNROUTABLE)),
            Some(_) => {}
        }
        deliver::check_ttl(ip.ttl)?;
        lb::dnat(ctx, &mut t, &sel)?;
        rev_nat = svc.rev_nat_index;
    } else {
        dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_FRONTEND_FAIL, 0, 0, 0);
    }
    // A pod of this node (a service's backend, a pod of another node in
    // native routing, a reply to a masqueraded flow, the world): straight
    // into it, without the stack.
    let Some(ep) = lookup::local_endpoint(t.key.daddr) else {
        dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
        return Ok(verdict::OK);
    };
    if ep.flags & ENDPOINT_F_HOST != 0 {
        dbg.msg(ctx, dbgs::DBG_TO_HOST, 0, 0, 0);
        return Ok(verdict::OK);
    }
    deliver::check_ttl(ip.ttl)?;
    // NodePort DSR: the frontend's node sent the flow's first packet here
    // with the frontend in an option; the pod's replies will leave from it.
    // (Not for a flow balanced here: its replies take its own frontend.)
    if rev_nat == 0 && node.flags & NODE_F_DSR != 0 && ip.vihl != 0x45 && dsr::learn(ctx, &ip, &t) {
        // dbg.msg(ctx, dbgs::DBG_DSR_LEARN, addr(t.key.saddr), 0, 0);
        rev_nat = REV_NAT_DSR;
    }
    let src_identity = lookup::identity_of(t.key.saddr);
    dbg.msg(ctx, dbgs::DBG_IP_ID_MAP_SUCCEED4, addr(t.key.saddr), src_identity, 0);
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    deliver::to_endpoint(ctx, &ep, src_identity, &mut t, Via::Peer, trace_all, rev_nat, dbg)
}

/// to-netdev (tc egress of the native devices): masquerading. A packet of
/// a local pod leaving the cluster (destination outside the cluster CIDR
/// and the non-masquerade CIDRs)
/// leaves with the node's address (`nat`); a reply of a connection opened
/// towards the pod from outside does not. Anything else is untouched.
#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    let node = maps::node_config();
    debug_build(&ctx, node.flags, DEBUG_TO_NETDEV);
    try_to_netdev(&ctx, &node, &debug::OFF)
        .unwrap_or_else(|d| drop_from(&ctx, ciliate_common::identity::HOST, d))
}

/// to_netdev's debug build.
#[classifier]
pub fn to_netdev_debug(ctx: TcContext) -> i32 {
    let node = maps::node_config();
    // SAFETY: the context of a tc program.
    let out = unsafe { (*ctx.skb.skb).ifindex };
    // Its entry, as every program's: "Packet at to-network".
    ON.capture(&ctx, dbgs::CAPTURE_FROM, out, u32::from(TO_NETWORK));
    try_to_netdev(&ctx, &node, &ON)
        .unwrap_or_else(|d| drop_from(&ctx, ciliate_common::identity::HOST, d))
}

#[inline(always)]
fn try_to_netdev<const D: bool>(
    ctx: &TcContext,
    node: &ciliate_common::node::NodeConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if node.flags & NODE_F_MASQUERADE == 0 {
        return Ok(verdict::OK);
    }
    let Some(ip) = packet::ipv4_of(ctx, true)? else { return Ok(verdict::OK) };
    if node.in_cluster(ip.daddr) || !node.in_cluster(ip.saddr) || maps::no_masquerade(ip.daddr) {
        return Ok(verdict::OK);
    }
    let Some(ep) = lookup::local_endpoint(ip.saddr) else { return Ok(verdict::OK) };
    if ep.flags & ENDPOINT_F_HOST != 0 {
        return Ok(verdict::OK);
    }
    let Ok(mut t) = ct::tuple(ctx, &ip) else { return Ok(verdict::OK) };
    // Replies to connections opened from outside keep the pod's address.
    if ct::is_reply_to_inbound(&t) {
        return Ok(verdict::OK);
    }
    snat(ctx, &mut t, node.node_ip, 0, dbg)?;
    Ok(verdict::OK)
}

/// from-overlay (tc ingress of `ciliate_vxlan`): a packet from a pod of
/// another node, whose identity is the VNI, goes through the destination
/// endpoint's ingress stage (policy by that identity) into its pod; what
/// is for no local endpoint goes on to the stack.
#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    debug_build(&ctx, maps::node_config().flags, DEBUG_FROM_OVERLAY);
    run_from_overlay(&ctx, &debug::OFF)
}

/// from_overlay's debug build.
#[classifier]
pub fn from_overlay_debug(ctx: TcContext) -> i32 {
    run_from_overlay(&ctx, &ON)
}

#[inline(always)]
fn run_from_overlay<const D: bool>(ctx: &TcContext, dbg: &Dbg<D>) -> i32 {
    let cfg = host_config();
    dbg.capture(ctx, dbgs::CAPTURE_FROM, ingress_ifindex(ctx), u32::from(FROM_OVERLAY));
    try_from_overlay(ctx, &cfg, dbg)
        .unwrap_or_else(|d| drop_from(ctx, ciliate_common::identity::WORLD, d))
}

#[inline(always)]
fn try_from_overlay<const D: bool>(
    ctx: &TcContext,
    cfg: &HostConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if cfg.flags & ENDPOINT_F_CONFIGURED == 0 {
        return Err(drop!(NO_CONFIG));
    }
    let Some(ip) = packet::ipv4_of(ctx, false)? else { return Ok(verdict::OK) };
    // The sending node is not needed here; reading only the VNI makes the
    // verifier's work three times larger (measured), so both are read.
    let (identity, _node) = tunnel::source(ctx)?;
    dbg.msg(ctx, dbgs::DBG_DECAP, identity, 0, 0);
    let Some(ep) = lookup::local_endpoint(ip.daddr) else {
        dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
        return Ok(verdict::OK);
    };
    if ep.flags & ENDPOINT_F_HOST != 0 {
        dbg.msg(ctx, dbgs::DBG_TO_HOST, 0, 0, 0);
        return Ok(verdict::OK);
    }
    // Whatever drops it from here, the sender is the identity in the VNI.
    let sent = |d: Drop| d.with_identities(identity, ep.identity);
    deliver::check_ttl(ip.ttl).map_err(sent)?;
    let mut t = ct::tuple(ctx, &ip).map_err(sent)?;
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    deliver::to_endpoint(ctx, &ep, identity, &mut t, Via::Peer, trace_all, 0, dbg)
}

/// The device a packet came in on.
#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context of a tc program.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// A NodePort (or other external frontend) flow whose backend is on
/// another node: DNAT to the backend and SNAT to this node (so the reply
/// comes back here to be translated), then through the overlay to the
/// backend's node (tunnel mode; the VNI says remote-node, which the SNATed
/// source is) or out through the FIB (native routing).
#[allow(clippy::too_many_arguments, reason = "one call, all by name")]
#[inline(always)]
fn to_remote_backend<const D: bool>(
    ctx: &TcContext,
    t: &mut ct::Tuple,
    sel: &lb::Selected,
    rev_nat: u16,
    node: &ciliate_common::node::NodeConfig,
    ttl: u8,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if node.node_ip == [0; 4] {
        return Err(drop!(UNROUTABLE));
    }
    deliver::check_ttl(ttl)?;
    if node.routing != ROUTING_TUNNEL && dsr::enabled_for(node.flags, t) {
        return dsr_to_remote_backend(ctx, t, sel, dbg);
    }
    lb::dnat(ctx, t, sel)?;
    snat(ctx, t, node.node_ip, rev_nat, dbg)?;
    if node.routing == ROUTING_TUNNEL {
        let remote = lookup::ipcache(t.key.daddr).tunnel_endpoint;
        if remote != [0; 4] {
            let id = ciliate_common::identity::REMOTE_NODE;
            dbg.msg(ctx, dbgs::DBG_ENCAP, addr(remote), id, 0);
            dbg.capture(ctx, dbgs::CAPTURE_TO, node.tunnel_ifindex, u32::from(TO_OVERLAY));
            return tunnel::encap(ctx, remote, id, node.tunnel_ifindex);
        }
    }
    deliver::fib_redirect(ctx, t, ingress_ifindex(ctx), dbg)
}

/// NodePort DSR (`--node-port-mode dsr`, native routing): DNAT only, the
/// frontend in the IPv4 option where the flow needs it (`dsr`), and out
/// through the FIB to the backend's node, which answers the client itself.
#[inline(always)]
fn dsr_to_remote_backend<const D: bool>(
    ctx: &TcContext,
    t: &mut ct::Tuple,
    sel: &lb::Selected,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    let (frontend, port) = (t.key.daddr, t.key.dport);
    let option = dsr::needs_option(t);
    if option && t.key.proto == ct::IPPROTO_UDP {
        dsr::check_mtu(ctx)?;
    }
    lb::dnat(ctx, t, sel)?;
    if option {
        dsr::add_option(ctx, frontend, port)?;
        // dbg.msg(ctx, dbgs::DBG_DSR_OPT, addr(frontend), u32::from(u16::from_be(port)), 0);
    }
    deliver::fib_redirect(ctx, t, ingress_ifindex(ctx), dbg)
}

ciliate_ebpf::program_object!();
