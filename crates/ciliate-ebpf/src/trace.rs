//! Trace events: a forwarded packet seen at an observation point
//! (`ciliate_common::trace`). Counted as forwarded in the metrics map.

use aya_ebpf::{helpers::bpf_get_hash_recalc, programs::TcContext};
use ciliate_common::{
    event::{CAPTURE_LEN, EVENT_VERSION, EventHeader, KIND_TRACE, TraceNotify},
    metrics::REASON_FORWARDED,
};

use crate::{drop::capture, maps};

pub struct TraceCtx {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_id: u16,
    pub source: u16,
    pub ct_state: u8,
    pub dir: u8,
}

#[inline(always)]
pub fn send_trace_notify(ctx: &TcContext, point: u8, who: &TraceCtx, ifindex: u32) {
    let len = ctx.len();
    maps::count(REASON_FORWARDED, who.dir, len);
    let mut ev = TraceNotify {
        hdr: EventHeader {
            kind: KIND_TRACE,
            subtype: point,
            source: who.source,
            // SAFETY: helper on the program's own context.
            hash: unsafe { bpf_get_hash_recalc(ctx.skb.skb) },
            len_orig: len,
            len_cap: 0,
            version: EVENT_VERSION,
        },
        src_identity: who.src_identity,
        dst_identity: who.dst_identity,
        dst_id: who.dst_id,
        ct_state: who.ct_state,
        _pad: 0,
        ifindex,
        orig_ip: [0; 16],
        data: [0; CAPTURE_LEN],
    };
    ev.hdr.len_cap = capture(ctx, &mut ev.data);
    let _ = maps::CILIATE_EVENTS.output::<TraceNotify>(&ev, 0);
}
