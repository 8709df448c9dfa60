//! Programs on the host side of a pod's veth (`lxc…`).
//!
//! from-container (tc ingress of the lxc device, i.e. packets leaving the
//! pod): ARP responder; IPv4 is validated and handed to the stack (the
//! conntrack / ipcache / policy / local-delivery stages plug in here, see
//! ARCHITECTURE.md section 3); anything else is dropped with its reason.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use ciliate_common::{
    config::{ENDPOINT_F_CONFIGURED, EndpointConfig},
    drop::{NO_CONFIG, UNKNOWN_L3},
    event::FILE_LXC,
    metrics::DIR_EGRESS,
    trace::TO_STACK,
};
use ciliate_ebpf::{
    Drop,
    arp::{self, ArpAction},
    drop,
    drop::{DropCtx, send_drop_notify},
    packet::{self, ETH_P_ARP, ETH_P_IP},
    trace::{TraceCtx, send_trace_notify},
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
                dir: DIR_EGRESS,
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
        ETH_P_IP => {
            packet::ipv4(ctx)?;
            let who = TraceCtx {
                src_identity: cfg.identity,
                dst_identity: 0,
                dst_id: 0,
                source: cfg.endpoint_id,
                ct_state: 0,
                dir: DIR_EGRESS,
            };
            send_trace_notify(ctx, TO_STACK, &who, cfg.ifindex);
            Ok(verdict::OK)
        }
        _ => Err(drop!(UNKNOWN_L3)),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
