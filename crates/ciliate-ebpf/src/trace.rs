//! Trace events: a forwarded packet seen at an observation point
//! (`ciliate_common::trace`). Counted as forwarded in the metrics map.

use aya_ebpf::programs::TcContext;
use ciliate_common::{
    event::{KIND_TRACE, TraceNotify},
    metrics::REASON_FORWARDED,
};

use crate::{
    drop::{capture, event_header},
    maps,
};

pub struct TraceCtx {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_id: u16,
    pub source: u16,
    pub ct_state: u8,
    pub dir: u8,
    /// See `TraceNotify::tunnel_endpoint`.
    pub tunnel: [u8; 4],
}

/// A forwarded packet: a trace event when `report` (see
/// `ct::Tracked::report`) or `trace_all`, otherwise only counted (monitor
/// aggregation).
#[inline(always)]
pub fn trace_or_count(
    ctx: &TcContext,
    point: u8,
    who: &TraceCtx,
    ifindex: u32,
    report: bool,
    trace_all: bool,
) {
    if report || trace_all {
        send_trace_notify(ctx, point, who, ifindex);
    } else {
        maps::count(REASON_FORWARDED, who.dir, ctx.len());
    }
}

#[inline(always)]
pub fn send_trace_notify(ctx: &TcContext, point: u8, who: &TraceCtx, ifindex: u32) {
    maps::count(REASON_FORWARDED, who.dir, ctx.len());
    // Zeroed in place (a literal's zero arrays would be memset calls:
    // `crate::zeroed`), then the fields that are not 0.
    let mut slot = core::mem::MaybeUninit::uninit();
    let ev: &mut TraceNotify = crate::zeroed(&mut slot);
    ev.hdr = event_header(ctx, KIND_TRACE, point, who.source);
    ev.src_identity = who.src_identity;
    ev.dst_identity = who.dst_identity;
    ev.dst_id = who.dst_id;
    ev.ct_state = who.ct_state;
    ev.ifindex = ifindex;
    ev.tunnel_endpoint = who.tunnel;
    ev.hdr.len_cap = capture(ctx, &mut ev.data);
    maps::emit(ev);
}
