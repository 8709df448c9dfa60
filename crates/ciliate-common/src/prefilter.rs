//! The XDP prefilter (Cilium's `cilium prefilter`): packets whose source is
//! in a denied CIDR are dropped on the native devices before the stack
//! allocates anything for them.
//!
//! [`MAP_NAME`] is an LPM trie of source prefixes ([`PrefilterKey`]) → the
//! CIDR's counter slot; [`STATS_MAP`] is a per-CPU array of
//! [`PrefilterStats`] by slot (exact counts without atomics: each CPU adds
//! to its own). The agent gives each CIDR a free slot and zeroes it before
//! the CIDR goes in, so a slot's counts are always its CIDR's.

pub const MAP_NAME: &str = "ciliate_cidr_v4_dyn";
pub const STATS_MAP: &str = "ciliate_prefilter_stats";
/// Denied CIDRs a node holds (Cilium's `CIDR4_LMAP_ELEMS`).
pub const MAX_ENTRIES: u32 = 16384;

/// The LPM data part of a denied prefix: the source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterKey {
    pub addr: [u8; 4],
}

/// Packets and bytes one CIDR dropped (on one CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PrefilterStats>() == 16);
