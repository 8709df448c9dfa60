//! Programs on the host side of a pod's veth (`lxc…`).
//!
//! from-container (tc ingress of the lxc device: packets leaving the pod):
//! - ARP: answered with the lxc device's MAC (`arp`);
//! - IPv4: source check, services (a packet to a frontend is DNATed to a
//!   backend: `lb`), the destination's identity (lxc map or ipcache),
//!   conntrack (egress view) and egress policy, reverse NAT of a reply to
//!   a translated flow, then
//!   - to another endpoint of this node: its ingress stage and a redirect
//!     into its namespace (`deliver`),
//!   - a pod of another node in tunnel mode: the overlay (tail call
//!     `lxc_to_overlay`); a NodePort reply: out through the FIB (tail call
//!     `lxc_to_network`),
//!   - anywhere else (the host, the world, native routing): the stack;
//! - anything else: dropped with its reason.
//!
//! Every program here is built twice (`debug`): the normal build, and the
//! debug build its entry tail-calls while the endpoint's `ENDPOINT_F_DEBUG`
//! is set, which sends a debug event at each decision.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, map},
    maps::ProgramArray,
    programs::TcContext,
};
use ciliate_common::{
    config::{ENDPOINT_F_CONFIGURED, ENDPOINT_F_DEBUG, ENDPOINT_F_TRACE_ALL, EndpointConfig},
    ct::{CT_REPLY, DIR_EGRESS},
    debug as dbgs,
    drop::{INVALID_SIP, MISSED_TAIL_CALL, NO_CONFIG, UNKNOWN_L3},
    endpoint::ENDPOINT_F_HOST,
    event::FILE_LXC,
    lb::{HAIRPIN_LOOPBACK, REV_NAT_DSR},
    metrics::DIR_EGRESS as METRIC_EGRESS,
    node::ROUTING_TUNNEL,
    policy::DIR_EGRESS as POLICY_EGRESS,
    trace::{FROM_LXC, TO_NETWORK, TO_OVERLAY, TO_STACK},
};
use ciliate_ebpf::{
    Drop,
    arp::{self, ArpAction},
    ct,
    debug::{self, Dbg, addr},
    deliver::{self, Via},
    drop,
    drop::{DropCtx, send_drop_notify},
    dsr,
    lb::{self, Side},
    lookup,
    packet::{self, ETH_P_ARP, ETH_P_IP},
    policy,
    trace::{TraceCtx, trace_or_count},
    tunnel, verdict,
};

/// The configuration of the endpoint this packet comes from: the entry of
/// its device in `ciliate_ep_config` (see `ciliate_common::config`). One
/// program serves every endpoint of the node; a device the agent wrote no
/// entry for gets an empty configuration, which drops with `NO_CONFIG`.
#[inline(always)]
fn config(ctx: &TcContext) -> EndpointConfig {
    ciliate_ebpf::maps::endpoint_config(ctx).unwrap_or_default()
}

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    let cfg = config(&ctx);
    if cfg.flags & ENDPOINT_F_DEBUG != 0 {
        // SAFETY: the context of a tc program. Returns only when the debug
        // build is not there: the packet goes on without debugging.
        unsafe { CILIATE_LXC_DEBUG.tail_call(&ctx, DEBUG_FROM_CONTAINER) };
    }
    run(&ctx, &cfg, &debug::OFF)
}

/// from-container's debug build (see the module comment).
#[classifier]
pub fn from_container_debug(ctx: TcContext) -> i32 {
    let cfg = config(&ctx);
    run(&ctx, &cfg, &Dbg::<true> { source: cfg.endpoint_id })
}

#[inline(always)]
fn run<const D: bool>(ctx: &TcContext, cfg: &EndpointConfig, dbg: &Dbg<D>) -> i32 {
    dbg.capture(ctx, dbgs::CAPTURE_FROM, cfg.ifindex, u32::from(FROM_LXC));
    match try_from_container(ctx, cfg, dbg) {
        Ok(v) => v,
        Err(d) => send_drop_notify(ctx, &egress_drop(cfg), d),
    }
}

#[inline(always)]
fn try_from_container<const D: bool>(
    ctx: &TcContext,
    cfg: &EndpointConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    if cfg.flags & ENDPOINT_F_CONFIGURED == 0 {
        return Err(drop!(NO_CONFIG));
    }
    let eth = packet::eth(ctx)?;
    // SAFETY: bounds checked by packet::eth.
    let proto = u16::from_be(unsafe { (*eth).proto });
    match proto {
        ETH_P_ARP => Ok(match arp::respond(ctx, &cfg.lxc_mac, &cfg.ipv4) {
            ArpAction::Reply => {
                dbg.msg(ctx, dbgs::DBG_ARP_REPLY, 0, 0, 0);
                arp::redirect_back(cfg.ifindex)
            }
            ArpAction::Pass => verdict::OK,
        }),
        ETH_P_IP => handle_ipv4(ctx, cfg, dbg),
        _ => Err(drop!(UNKNOWN_L3)),
    }
}

#[inline(always)]
fn handle_ipv4<const D: bool>(
    ctx: &TcContext,
    cfg: &EndpointConfig,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    let ip = packet::ipv4(ctx)?;
    // SAFETY: validated by packet::ipv4; copied before any packet change.
    let ip = unsafe { *ip };
    if ip.saddr != cfg.ipv4 {
        dbg.msg(ctx, dbgs::DBG_SOURCE_CHECK, addr(ip.saddr), addr(cfg.ipv4), 0);
        return Err(drop!(INVALID_SIP));
    }
    let mut t = ct::tuple(ctx, &ip)?;
    // Services: a packet to a frontend goes to its backend (DNAT), and a
    // pod that is its own service's backend is reached from the hairpin
    // loopback (its own address would be a martian to it).
    // Pods' addresses (the cluster CIDR) are never frontends: their
    // packets skip the services lookup (pod-to-pod's fast path; an array
    // read instead of a hash lookup).
    let mut rev_nat = 0;
    let to_pod = ciliate_ebpf::maps::node_config().in_cluster(t.key.daddr);
    if !to_pod {
        let port = u32::from(u16::from_be(t.key.dport));
        dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_FRONTEND, addr(t.key.daddr), port, 0);
        match lb::frontend(&t) {
            Some(svc) => {
                dbg.capture(ctx, dbgs::CAPTURE_FROM_LB, cfg.ifindex, 0);
                let sel = lb::select(&t, &svc)?;
                lb::dnat(ctx, &mut t, &sel)?;
                let port = u32::from(u16::from_be(t.key.dport));
                dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_BACKEND_SLOT_SUCCESS, addr(t.key.daddr), port, 0);
                rev_nat = svc.rev_nat_index;
                if t.key.daddr == cfg.ipv4 {
                    lb::set_addr(ctx, &mut t, Side::Src, HAIRPIN_LOOPBACK)?;
                    let (from, to) = (addr(cfg.ipv4), addr(HAIRPIN_LOOPBACK));
                    dbg.msg(ctx, dbgs::DBG_LB4_LOOPBACK_SNAT, from, to, 0);
                }
            }
            None => dbg.msg(ctx, dbgs::DBG_LB4_LOOKUP_FRONTEND_FAIL, 0, 0, 0),
        }
    }
    // A reply to a hairpin flow goes back to this endpoint.
    let to = if t.key.daddr == HAIRPIN_LOOPBACK { cfg.ipv4 } else { t.key.daddr };
    let local = lookup::local_endpoint(to).filter(|ep| ep.flags & ENDPOINT_F_HOST == 0);
    if local.is_some() {
        deliver::check_ttl(ip.ttl)?;
    }
    // The destination's identity: a local endpoint's is in its lxc entry;
    // anything else asks the ipcache (one LPM lookup saved per local packet).
    let dst_identity = match &local {
        Some(ep) => ep.identity,
        None => lookup::identity_of(to),
    };
    dbg.msg(ctx, dbgs::DBG_IP_ID_MAP_SUCCEED4, addr(to), dst_identity, 0);
    let tracked = policy::track_and_enforce(
        ctx,
        &t,
        DIR_EGRESS,
        POLICY_EGRESS,
        cfg.endpoint_id,
        cfg.identity,
        dst_identity,
        rev_nat,
        dbg,
    )?;
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    // A backend's reply to a flow translated before it arrived here
    // (NodePort, from outside: never for a local endpoint): its source
    // becomes the frontend again, a node address the stack would take for
    // a martian, so it leaves through the FIB (tail call).
    // (NodePort DSR: the tail call translates it, from the flow's record.)
    if tracked.state == CT_REPLY && tracked.rev_nat_index != 0 {
        let dsr = tracked.rev_nat_index == REV_NAT_DSR;
        if !dsr {
            let rev = tracked.rev_nat_index;
            dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT_LOOKUP, u32::from(rev), 0, 0);
            lb::rev_nat(ctx, &mut t, rev)?;
            let port = u32::from(u16::from_be(t.key.sport));
            dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT, addr(t.key.saddr), port, 0);
        }
        let (state, report) = (tracked.state, tracked.report);
        let h = Handed { dst_identity, state, report, trace_all, dsr };
        hand_over(ctx, &h, CALL_TO_NETWORK, dbg);
        return Err(drop!(MISSED_TAIL_CALL));
    }
    if let Some(ep) = local {
        return deliver::to_endpoint(ctx, &ep, cfg.identity, &mut t, Via::Peer, trace_all, 0, dbg);
    }
    // A pod of another node in tunnel mode: the overlay (tail call; without
    // the program, the stack as in native routing).
    if ciliate_ebpf::maps::node_config().routing == ROUTING_TUNNEL {
        let (state, report) = (tracked.state, tracked.report);
        let h = Handed { dst_identity, state, report, trace_all, dsr: false };
        hand_over(ctx, &h, CALL_TO_OVERLAY, dbg);
    }
    let who = TraceCtx {
        src_identity: cfg.identity,
        dst_identity,
        dst_id: 0,
        source: cfg.endpoint_id,
        ct_state: tracked.state,
        dir: METRIC_EGRESS,
        tunnel: [0; 4],
    };
    trace_or_count(ctx, TO_STACK, &who, cfg.ifindex, tracked.report, trace_all);
    dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
    dbg.capture(ctx, dbgs::CAPTURE_TO, cfg.ifindex, u32::from(TO_STACK));
    Ok(verdict::OK)
}

/// Tail calls of from-container (their index in `CILIATE_LXC_CALLS`).
const CALL_TO_NETWORK: u32 = 0;
const CALL_TO_OVERLAY: u32 = 1;

/// The tail-call targets of the node's from-container, filled by the
/// loader; pinned, so they stay while no agent runs.
#[map(name = "ciliate_calls")]
static CILIATE_LXC_CALLS: ProgramArray = ProgramArray::pinned(2, 0);

/// The debug builds: from-container's at `DEBUG_FROM_CONTAINER`, then its
/// tail calls' at their index + 1.
const DEBUG_FROM_CONTAINER: u32 = 0;

#[map(name = "ciliate_calls_dbg")]
static CILIATE_LXC_DEBUG: ProgramArray = ProgramArray::pinned(3, 0);

/// What from-container tells its tail calls.
struct Handed {
    dst_identity: u32,
    state: u8,
    report: bool,
    trace_all: bool,
    /// A NodePort DSR reply, to translate from the flow's record.
    dsr: bool,
}

/// Tail-call `index` (the debug build's in the debug build), leaving in
/// `cb` what the callee reports with. Returns only when the call failed.
#[inline(always)]
fn hand_over<const D: bool>(ctx: &TcContext, h: &Handed, index: u32, dbg: &Dbg<D>) {
    let flags = u32::from(h.report) | u32::from(h.trace_all) << 1 | u32::from(h.dsr) << 2;
    dbg.msg(ctx, dbgs::DBG_TAIL_CALL, index, 0, 0);
    // SAFETY: the context of a tc program; cb is free for programs.
    unsafe {
        let skb = ctx.skb.skb;
        (*skb).cb[0] = h.dst_identity;
        (*skb).cb[1] = u32::from(h.state) | flags << 8;
        if D {
            CILIATE_LXC_DEBUG.tail_call(ctx, index + 1)
        } else {
            CILIATE_LXC_CALLS.tail_call(ctx, index)
        }
    }
}

/// What from-container left in `cb` for its tail calls: the destination
/// identity, the conntrack state, and the "report" / "trace all" bits
/// (the DSR bit: [`handed_dsr`]).
#[inline(always)]
fn handed_over(ctx: &TcContext, cfg: &EndpointConfig) -> (TraceCtx, bool, bool) {
    // SAFETY: the context of a tc program.
    let (dst_identity, state) = unsafe { ((*ctx.skb.skb).cb[0], (*ctx.skb.skb).cb[1]) };
    let who = TraceCtx {
        src_identity: cfg.identity,
        dst_identity,
        dst_id: 0,
        source: cfg.endpoint_id,
        ct_state: state as u8,
        dir: METRIC_EGRESS,
        tunnel: [0; 4],
    };
    (who, state & 1 << 8 != 0, state & 1 << 9 != 0)
}

/// Did from-container hand over a NodePort DSR reply?
#[inline(always)]
fn handed_dsr(ctx: &TcContext) -> bool {
    // SAFETY: the context of a tc program.
    unsafe { (*ctx.skb.skb).cb[1] & 1 << 10 != 0 }
}

/// The IPv4 tuple of the packet in `ctx` and its TTL, re-read by a tail
/// call (from-container checked it already).
#[inline(always)]
fn reparse(ctx: &TcContext) -> Result<(ct::Tuple, u8), Drop> {
    let ip = packet::ipv4(ctx)?;
    // SAFETY: validated by packet::ipv4; copied before any packet change.
    let ip = unsafe { *ip };
    Ok((ct::tuple(ctx, &ip)?, ip.ttl))
}

/// Tail call of from-container: a backend's reply to a NodePort flow,
/// translated back to the frontend (a node address the stack would take
/// for a martian; for DSR, here, from the flow's record: another node's),
/// leaves through the FIB.
#[classifier]
pub fn lxc_to_network(ctx: TcContext) -> i32 {
    to_network(&ctx, &debug::OFF)
}

/// lxc_to_network's debug build.
#[classifier]
pub fn lxc_to_network_debug(ctx: TcContext) -> i32 {
    let source = config(&ctx).endpoint_id;
    to_network(&ctx, &Dbg::<true> { source })
}

#[inline(always)]
fn to_network<const D: bool>(ctx: &TcContext, dbg: &Dbg<D>) -> i32 {
    let cfg = config(ctx);
    let r = reparse(ctx).and_then(|(mut t, ttl)| {
        deliver::check_ttl(ttl)?;
        if handed_dsr(ctx) {
            dsr::reply(ctx, &mut t)?;
            let port = u32::from(u16::from_be(t.key.sport));
            dbg.msg(ctx, dbgs::DBG_DSR_REPLY, addr(t.key.saddr), port, 0);
        }
        let (who, report, trace_all) = handed_over(ctx, &cfg);
        trace_or_count(ctx, TO_NETWORK, &who, cfg.ifindex, report, trace_all);
        deliver::fib_redirect(ctx, &t, cfg.ifindex, dbg)
    });
    r.unwrap_or_else(|d| send_drop_notify(ctx, &egress_drop(&cfg), d))
}

/// Tail call of from-container in tunnel mode: a packet for a pod of
/// another node (its ipcache entry names the node) goes through the
/// overlay with this endpoint's identity as the VNI; anything else goes to
/// the stack.
#[classifier]
pub fn lxc_to_overlay(ctx: TcContext) -> i32 {
    to_overlay(&ctx, &debug::OFF)
}

/// lxc_to_overlay's debug build.
#[classifier]
pub fn lxc_to_overlay_debug(ctx: TcContext) -> i32 {
    let source = config(&ctx).endpoint_id;
    to_overlay(&ctx, &Dbg::<true> { source })
}

#[inline(always)]
fn to_overlay<const D: bool>(ctx: &TcContext, dbg: &Dbg<D>) -> i32 {
    let cfg = config(ctx);
    let r = reparse(ctx).and_then(|(t, _)| {
        let (who, report, trace_all) = handed_over(ctx, &cfg);
        let remote = lookup::ipcache(t.key.daddr).tunnel_endpoint;
        if remote == [0; 4] {
            trace_or_count(ctx, TO_STACK, &who, cfg.ifindex, report, trace_all);
            dbg.msg(ctx, dbgs::DBG_TO_STACK, 0, 0, 0);
            return Ok(verdict::OK);
        }
        let node = ciliate_ebpf::maps::node_config();
        let who = TraceCtx { tunnel: remote, ..who };
        trace_or_count(ctx, TO_OVERLAY, &who, node.tunnel_ifindex, report, trace_all);
        dbg.msg(ctx, dbgs::DBG_ENCAP, addr(remote), cfg.identity, 0);
        dbg.capture(ctx, dbgs::CAPTURE_TO, node.tunnel_ifindex, u32::from(TO_OVERLAY));
        tunnel::encap(ctx, remote, cfg.identity, node.tunnel_ifindex)
    });
    r.unwrap_or_else(|d| send_drop_notify(ctx, &egress_drop(&cfg), d))
}

fn egress_drop(cfg: &EndpointConfig) -> DropCtx {
    DropCtx {
        src_identity: cfg.identity,
        dst_identity: 0,
        dst_id: 0,
        source: cfg.endpoint_id,
        dir: METRIC_EGRESS,
        file: FILE_LXC,
    }
}

ciliate_ebpf::program_object!();
