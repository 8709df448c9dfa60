//! The metrics map: packets and bytes per (reason, direction), per CPU.
//! Reason 0 counts forwarded packets; any other reason is a drop reason
//! from [`crate::drop`]. Same shape as Cilium's `cilium_metrics`.

/// Name of the map in every eBPF object.
pub const MAP_NAME: &str = "ciliate_metrics";
pub const MAX_ENTRIES: u32 = 1024;

pub const DIR_UNKNOWN: u8 = 0;
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;
pub const DIR_SERVICE: u8 = 3;

/// The reason value that counts forwarded packets.
pub const REASON_FORWARDED: u8 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricsKey {
    pub reason: u8,
    pub dir: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<MetricsKey>() == 8);

impl MetricsKey {
    pub const fn new(reason: u8, dir: u8) -> Self {
        Self { reason, dir, _pad: [0; 6] }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricsValue>() == 16);

/// Name of a metrics direction, as `ciliate bpf metrics list` prints it.
pub fn dir_name(dir: u8) -> &'static str {
    match dir {
        DIR_INGRESS => "INGRESS",
        DIR_EGRESS => "EGRESS",
        DIR_SERVICE => "SERVICE",
        _ => "UNKNOWN",
    }
}
