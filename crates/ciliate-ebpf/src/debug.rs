//! Debug and capture events (`ciliate_common::debug`): what a program
//! decided for a packet, step by step, while debugging is on for the
//! endpoint or the node.
//!
//! The switch costs nothing while it is off: every program that can debug
//! is built twice from the same code, with `Dbg<false>` (every call below
//! compiles to nothing) and with `Dbg<true>`; the normal build's entry
//! reads the switch from the configuration it already has and, when on,
//! tail-calls the debug build. The normal build verifies as before.

use aya_ebpf::{helpers::bpf_get_smp_processor_id, programs::TcContext};
use ciliate_common::event::{CaptureNotify, DebugNotify, KIND_CAPTURE, KIND_DEBUG};

use crate::{
    drop::{capture as copy_packet, event_header as header},
    maps,
};

/// The debug switch of a build (`ON`) and the endpoint the events are
/// about (`source`, 0 for node programs).
#[derive(Clone, Copy)]
pub struct Dbg<const ON: bool> {
    pub source: u16,
}

/// The normal build's.
pub const OFF: Dbg<false> = Dbg { source: 0 };

impl<const ON: bool> Dbg<ON> {
    /// A debug message: decision `subtype` (`debug::DBG_*`) with its
    /// arguments.
    #[inline(always)]
    pub fn msg(&self, ctx: &TcContext, subtype: u8, arg1: u32, arg2: u32, arg3: u32) {
        if ON {
            let ev = DebugNotify {
                hdr: header(ctx, KIND_DEBUG, subtype, self.source),
                arg1,
                arg2,
                arg3,
                // SAFETY: plain helper call.
                cpu: unsafe { bpf_get_smp_processor_id() },
            };
            maps::emit(&ev);
        }
    }

    /// The packet's first bytes at capture point `subtype`
    /// (`debug::CAPTURE_*`).
    #[inline(always)]
    pub fn capture(&self, ctx: &TcContext, subtype: u8, arg1: u32, arg2: u32) {
        if ON {
            // Zeroed in place, then the fields (see `crate::zeroed`).
            let mut slot = core::mem::MaybeUninit::uninit();
            let ev: &mut CaptureNotify = crate::zeroed(&mut slot);
            ev.hdr = header(ctx, KIND_CAPTURE, subtype, self.source);
            ev.arg1 = arg1;
            ev.arg2 = arg2;
            // SAFETY: plain helper call.
            ev.cpu = unsafe { bpf_get_smp_processor_id() };
            ev.hdr.len_cap = copy_packet(ctx, &mut ev.data);
            maps::emit(ev);
        }
    }

    /// Is this the debug build?
    #[inline(always)]
    pub const fn on(&self) -> bool {
        ON
    }
}

/// An address as debug arguments carry it.
#[inline(always)]
pub fn addr(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}
