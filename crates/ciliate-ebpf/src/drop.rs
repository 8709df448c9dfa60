//! The one drop helper. Every path that drops a packet comes here: the drop
//! is counted in the metrics map under its reason and direction, and a drop
//! event with the reason and the first bytes of the packet goes to the ring
//! buffer. It returns the verdict the program must return (`TC_ACT_SHOT`).

use aya_ebpf::{helpers::bpf_get_hash_recalc, programs::TcContext};
use ciliate_common::event::{CAPTURE_LEN, DropNotify, EVENT_VERSION, EventHeader, KIND_DROP};

use crate::{Drop, maps, verdict};

/// Who was involved in a dropped packet, as far as the program knew.
pub struct DropCtx {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_id: u32,
    /// Endpoint ID of the program (0 for node programs).
    pub source: u16,
    /// `ciliate_common::metrics::DIR_*`.
    pub dir: u8,
    /// `ciliate_common::event::FILE_*`.
    pub file: u8,
}

#[inline(always)]
pub fn send_drop_notify(ctx: &TcContext, who: &DropCtx, d: Drop) -> i32 {
    let len = ctx.len();
    let dir = if d.dir != 0 { d.dir } else { who.dir };
    maps::count(d.reason, dir, len);
    // Zeroed in place, then the fields (see `crate::zeroed`).
    let mut slot = core::mem::MaybeUninit::uninit();
    let ev: &mut DropNotify = crate::zeroed(&mut slot);
    ev.hdr = event_header(ctx, KIND_DROP, d.reason, who.source);
    ev.src_identity = if d.src_identity != 0 { d.src_identity } else { who.src_identity };
    ev.dst_identity = if d.dst_identity != 0 { d.dst_identity } else { who.dst_identity };
    ev.dst_id = if d.dst_id != 0 { d.dst_id as u32 } else { who.dst_id };
    // SAFETY: reading a field of the context the kernel handed us.
    ev.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    ev.line = d.line;
    ev.file = who.file;
    ev.ext_error = d.ext_error;
    ev.dir = dir;
    ev.hdr.len_cap = capture(ctx, &mut ev.data);
    // A full ring buffer loses the event (counted); the metrics still
    // count the drop.
    maps::emit(ev);
    verdict::SHOT
}

/// The common header of an event about the packet in `ctx`; `len_cap` is
/// filled in by [`capture`].
#[inline(always)]
pub fn event_header(ctx: &TcContext, kind: u8, subtype: u8, source: u16) -> EventHeader {
    EventHeader {
        kind,
        subtype,
        source,
        // SAFETY: helper on the program's own context.
        hash: unsafe { bpf_get_hash_recalc(ctx.skb.skb) },
        len_orig: ctx.len(),
        len_cap: 0,
        version: EVENT_VERSION,
    }
}

/// Copy the first bytes of the packet into `buf`; returns how many.
#[inline(always)]
pub fn capture(ctx: &TcContext, buf: &mut [u8; CAPTURE_LEN]) -> u16 {
    let len = ctx.len() as usize;
    let n = if len < CAPTURE_LEN { len } else { CAPTURE_LEN };
    if n == 0 {
        return 0;
    }
    // SAFETY: n is in 1..=CAPTURE_LEN and buf holds CAPTURE_LEN bytes.
    let r = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            buf.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if r < 0 { 0 } else { n as u16 }
}
