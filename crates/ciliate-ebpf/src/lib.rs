//! Ciliate's datapath library: one module per concern. The hook programs in
//! `src/bin/` only wire these together (ARCHITECTURE.md sections 2 and 3).
#![no_std]

pub mod arp;
pub mod ct;
pub mod debug;
pub mod deliver;
pub mod drop;
pub mod dsr;
pub mod lb;
pub mod lookup;
pub mod maps;
pub mod nat;
pub mod packet;
pub mod policy;
pub mod trace;
pub mod tunnel;

/// Zero `slot` in place and hand it back as a `T` (a C struct a helper
/// reads, whose all-zero value is its "unset"), with 32-bit volatile
/// stores: a plain zero-fill (`mem::zeroed`, zero stores LLVM merges, or a
/// copy of a zeroed value) becomes a call to a byte-by-byte `memset` on
/// this target (bpf-linker expands memcpy in order, which turns memset
/// expansion off): ~5 instructions a byte on every packet, and a verifier
/// walk of the loop on every path that reaches it. `T` must be 2-aligned
/// and a multiple of 2 bytes (32-bit stores when it allows them).
#[inline(always)]
pub fn zeroed<T>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
    const { assert!(align_of::<T>() >= 2 && size_of::<T>().is_multiple_of(2)) };
    if align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4) {
        let words = slot.as_mut_ptr().cast::<u32>();
        let mut i = 0;
        while i < size_of::<T>() / 4 {
            // SAFETY: inside `slot` (size checked), 4-aligned.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
    } else {
        let halves = slot.as_mut_ptr().cast::<u16>();
        let mut i = 0;
        while i < size_of::<T>() / 2 {
            // SAFETY: inside `slot` (size asserted), 2-aligned.
            unsafe { core::ptr::write_volatile(halves.add(i), 0) };
            i += 1;
        }
    }
    // SAFETY: every byte written; all-zero is a valid `T` for the callers.
    unsafe { slot.assume_init_mut() }
}

/// tc verdicts (`TC_ACT_*`).
pub mod verdict {
    pub const OK: i32 = 0;
    pub const SHOT: i32 = 2;
    pub const REDIRECT: i32 = 7;
}

/// A drop: the reason code from `ciliate_common::drop` plus where it came
/// from. Every error path of a program returns one of these, and the program
/// entry hands it to [`drop::send_drop_notify`], the one drop helper.
/// Where the stage that dropped knew better than the program entry who was
/// involved (a policy drop knows both sides; a packet from the overlay
/// carries its sender's identity), it says so in `src_identity` /
/// `dst_identity`; 0 leaves it to the entry's [`drop::DropCtx`]. The same
/// for the endpoint and direction: a drop in a local destination's ingress
/// stage is that endpoint's, on ingress, whichever program ran it.
#[derive(Clone, Copy)]
pub struct Drop {
    pub reason: u8,
    pub ext_error: i8,
    pub line: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_id: u16,
    /// `ciliate_common::metrics::DIR_*`; 0: the entry's.
    pub dir: u8,
}

impl Drop {
    #[inline(always)]
    pub const fn new(reason: u8, line: u32) -> Self {
        Self {
            reason,
            ext_error: 0,
            line: line as u16,
            src_identity: 0,
            dst_identity: 0,
            dst_id: 0,
            dir: 0,
        }
    }

    /// The same drop, in the ingress stage of local endpoint `id`.
    #[inline(always)]
    pub const fn at_endpoint(mut self, id: u16, dir: u8) -> Self {
        self.dst_id = id;
        self.dir = dir;
        self
    }

    /// The same drop, with the identities not yet known filled in.
    #[inline(always)]
    pub const fn with_identities(mut self, src: u32, dst: u32) -> Self {
        if self.src_identity == 0 {
            self.src_identity = src;
        }
        if self.dst_identity == 0 {
            self.dst_identity = dst;
        }
        self
    }
}

/// `drop!(REASON)`: a [`Drop`] with the current source line.
#[macro_export]
macro_rules! drop {
    ($reason:expr) => {
        $crate::Drop::new($reason, line!())
    };
}

/// What every program object (one per `src/bin` file) needs besides its
/// programs: a panic handler (never reached: the verifier proves it) and a
/// GPL-compatible license.
#[macro_export]
macro_rules! program_object {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
