//! Programs on the host side of a pod's veth (`lxc…`).
//!
//! from-container (tc ingress of the lxc device: packets leaving the pod):
//! - ARP: answered with the lxc device's MAC (`arp`);
//! - IPv4: source check, the destination's identity (lxc map or ipcache),
//!   conntrack (egress view) and egress policy, then
//!   - to another endpoint of this node: its ingress stage and a redirect
//!     into its namespace (`deliver`),
//!   - anywhere else (the host, the world): the node's stack;
//! - anything else: dropped with its reason.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use ciliate_common::{
    config::{ENDPOINT_F_CONFIGURED, ENDPOINT_F_TRACE_ALL, EndpointConfig},
    ct::DIR_EGRESS,
    drop::{INVALID_SIP, NO_CONFIG, UNKNOWN_L3},
    endpoint::ENDPOINT_F_HOST,
    event::FILE_LXC,
    metrics::DIR_EGRESS as METRIC_EGRESS,
    policy::DIR_EGRESS as POLICY_EGRESS,
    trace::TO_STACK,
};
use ciliate_ebpf::{
    Drop,
    arp::{self, ArpAction},
    ct,
    deliver::{self, Via},
    drop,
    drop::{DropCtx, send_drop_notify},
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
    let t = ct::tuple(ctx, &ip)?;
    let local = lookup::local_endpoint(ip.daddr).filter(|ep| ep.flags & ENDPOINT_F_HOST == 0);
    if local.is_some() {
        deliver::check_ttl(ip.ttl)?;
    }
    // The destination's identity: a local endpoint's is in its lxc entry;
    // anything else asks the ipcache (one LPM lookup saved per local packet).
    let dst_identity = match &local {
        Some(ep) => ep.identity,
        None => lookup::identity_of(ip.daddr),
    };
    let tracked = policy::track_and_enforce(
        ctx,
        &t,
        DIR_EGRESS,
        POLICY_EGRESS,
        cfg.endpoint_id,
        dst_identity,
        cfg.identity,
    )?;
    let trace_all = cfg.flags & ENDPOINT_F_TRACE_ALL != 0;
    if let Some(ep) = local {
        return deliver::to_endpoint(ctx, &ep, cfg.identity, &t, Via::Peer, trace_all);
    }
    let who = TraceCtx {
        src_identity: cfg.identity,
        dst_identity,
        dst_id: 0,
        source: cfg.endpoint_id,
        ct_state: tracked.state,
        dir: METRIC_EGRESS,
    };
    trace_or_count(ctx, TO_STACK, &who, cfg.ifindex, tracked.report, trace_all);
    Ok(verdict::OK)
}

ciliate_ebpf::program_object!();
