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
//!   - anywhere else (the host, the world): the node's stack;
//! - anything else: dropped with its reason.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use ciliate_common::{
    config::{ENDPOINT_F_CONFIGURED, ENDPOINT_F_TRACE_ALL, EndpointConfig},
    ct::{CT_REPLY, DIR_EGRESS},
    drop::{INVALID_SIP, NO_CONFIG, UNKNOWN_L3},
    endpoint::ENDPOINT_F_HOST,
    event::FILE_LXC,
    lb::HAIRPIN_LOOPBACK,
    metrics::DIR_EGRESS as METRIC_EGRESS,
    policy::DIR_EGRESS as POLICY_EGRESS,
    trace::{TO_NETWORK, TO_STACK},
};
use ciliate_ebpf::{
    Drop,
    arp::{self, ArpAction},
    ct,
    deliver::{self, Via},
    drop,
    drop::{DropCtx, send_drop_notify},
    lb::{self, Side},
    lookup,
    packet::{self, ETH_P_ARP, ETH_P_IP},
    policy,
    trace::{TraceCtx, trace_or_count},
    verdict,
};

/// This endpoint's configuration, set by the loader (see
/// `ciliate_common::config`). Read through `read_volatile` so the compiler
/// cannot fold the zero initialiser into the code.
#[unsafe(no_mangle)]
static ENDPOINT_CONFIG: EndpointConfig = EndpointConfig {
    ifindex: 0,
    identity: 0,
    ipv4: [0; 4],
    endpoint_id: 0,
    lxc_mac: [0; 6],
    flags: 0,
};

#[inline(always)]
fn config() -> EndpointConfig {
    // SAFETY: a plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(&ENDPOINT_CONFIG) }
}

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    let cfg = config();
    match try_from_container(&ctx, &cfg) {
        Ok(v) => v,
        Err(d) => {
            let who = DropCtx {
                src_identity: cfg.identity,
                dst_identity: 0,
                dst_id: 0,
                source: cfg.endpoint_id,
                dir: METRIC_EGRESS,
                file: FILE_LXC,
            };
            send_drop_notify(&ctx, &who, d)
        }
    }
}

#[inline(always)]
fn try_from_container(ctx: &TcContext, cfg: &EndpointConfig) -> Result<i32, Drop> {
    if cfg.flags & ENDPOINT_F_CONFIGURED == 0 {
        return Err(drop!(NO_CONFIG));
    }
    let eth = packet::eth(ctx)?;
    // SAFETY: bounds checked by packet::eth.
    let proto = u16::from_be(unsafe { (*eth).proto });
    match proto {
        ETH_P_ARP => Ok(match arp::respond(ctx, &cfg.lxc_mac, &cfg.ipv4) {
            ArpAction::Reply => arp::redirect_back(cfg.ifindex),
            ArpAction::Pass => verdict::OK,
        }),
        ETH_P_IP => handle_ipv4(ctx, cfg),
        _ => Err(drop!(UNKNOWN_L3)),
    }
}

#[inline(always)]
fn handle_ipv4(ctx: &TcContext, cfg: &EndpointConfig) -> Result<i32, Drop> {
    let ip = packet::ipv4(ctx)?;
    // SAFETY: validated by packet::ipv4; copied before any packet change.
    let ip = unsafe { *ip };
    if ip.saddr != cfg.ipv4 {
        return Err(drop!(INVALID_SIP));
    }
    let mut t = ct::tuple(ctx, &ip)?;
    // Services: a packet to a frontend goes to its backend (DNAT), and a
    // pod that is its own service's backend is reached from the hairpin
    // loopback (its own address would be a martian to it).
    let mut rev_nat = 0;
    if let Some(svc) = lb::frontend(&t) {
        let sel = lb::select(&t, &svc)?;
        lb::dnat(ctx, &mut t, &sel)?;
        rev_nat = svc.rev_nat_index;
        if t.key.daddr == cfg.ipv4 {
            lb::set_addr(ctx, &mut t, Side::Src, HAIRPIN_LOOPBACK)?;
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
    let tracked = policy::track_and_enforce(
        ctx,
        &t,
        DIR_EGRESS,
        POLICY_EGRESS,
        cfg.endpoint_id,
        dst_identity,
        cfg.identity,
        rev_nat,
    )?;
    // A backend's reply to a flow translated before it arrived here
    // (NodePort): its source becomes the frontend again, a node address the
    // stack would take for a martian, so it leaves through the FIB.
    let rev_nat = tracked.state == CT_REPLY && tracked.rev_nat_index != 0;
    if rev_nat {
        lb::rev_nat(ctx, &mut t, tracked.rev_nat_index)?;
    }
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    if let Some(ep) = local {
        return deliver::to_endpoint(ctx, &ep, cfg.identity, &mut t, Via::Peer, trace_all, 0);
    }
    let who = TraceCtx {
        src_identity: cfg.identity,
        dst_identity,
        dst_id: 0,
        source: cfg.endpoint_id,
        ct_state: tracked.state,
        dir: METRIC_EGRESS,
    };
    if rev_nat {
        deliver::check_ttl(ip.ttl)?;
        trace_or_count(ctx, TO_NETWORK, &who, cfg.ifindex, tracked.report, trace_all);
        return deliver::fib_redirect(ctx, &t, cfg.ifindex);
    }
    trace_or_count(ctx, TO_STACK, &who, cfg.ifindex, tracked.report, trace_all);
    Ok(verdict::OK)
}

ciliate_ebpf::program_object!();
