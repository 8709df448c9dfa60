//! Events the datapath sends to user space through the one ring buffer.
//!
//! Every event starts with [`EventHeader`]; `kind` says which struct follows
//! (Cilium's monitor message types). Each event carries the first
//! [`CAPTURE_LEN`] bytes of the packet so the monitor can decode it.

/// Name of the ring buffer map in every eBPF object.
pub const RINGBUF_NAME: &str = "ciliate_events";
/// Name of the per-CPU counter of events the ring had no room for.
pub const LOST_NAME: &str = "ciliate_events_lost";
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const RINGBUF_BYTES: u32 = 256 * 1024;

pub const KIND_DROP: u8 = 1;
pub const KIND_DEBUG: u8 = 2;
pub const KIND_CAPTURE: u8 = 3;
pub const KIND_TRACE: u8 = 4;
pub const KIND_POLICY_VERDICT: u8 = 5;

/// Bytes of packet copied into each event.
pub const CAPTURE_LEN: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `KIND_*`.
    pub kind: u8,
    /// Drop reason for drops, observation point for traces.
    pub subtype: u8,
    /// Endpoint ID of the program that sent it (0 for node-level programs).
    pub source: u16,
    /// Packet hash (`bpf_get_hash_recalc`): the monitor's "flow" value.
    pub hash: u32,
    /// Length of the packet on the wire.
    pub len_orig: u32,
    /// Bytes of `data` that hold packet bytes.
    pub len_cap: u16,
    pub version: u16,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);

/// Current event layout version.
pub const EVENT_VERSION: u16 = 1;

/// A dropped packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropNotify {
    pub hdr: EventHeader,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Destination endpoint ID, 0 if unknown.
    pub dst_id: u32,
    /// Index of the device the packet was seen on.
    pub ifindex: u32,
    /// Source line of the drop (for "datapath BUG" hunting).
    pub line: u16,
    /// Source file number of the drop (see [`FILE_*`](self)).
    pub file: u8,
    /// Extended error (a helper's negative return), 0 if none.
    pub ext_error: i8,
    /// The direction the drop is counted in (`metrics::DIR_*`): ingress
    /// when the destination endpoint's ingress stage dropped it.
    pub dir: u8,
    pub _pad: [u8; 3],
    pub data: [u8; CAPTURE_LEN],
}
const _: () = assert!(core::mem::size_of::<DropNotify>() == 40 + CAPTURE_LEN);

/// A forwarded packet at an observation point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceNotify {
    pub hdr: EventHeader,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Destination endpoint ID, 0 if unknown.
    pub dst_id: u16,
    /// Conntrack state of the packet (`CT_*` result), 0 if not looked up.
    pub ct_state: u8,
    pub _pad: u8,
    pub ifindex: u32,
    /// Original (pre-NAT) source address, IPv4 in the first 4 bytes.
    pub orig_ip: [u8; 16],
    /// The node a packet to the overlay is sent to (`TO_OVERLAY`); zero
    /// otherwise.
    pub tunnel_endpoint: [u8; 4],
    pub _pad2: [u8; 4],
    pub data: [u8; CAPTURE_LEN],
}
const _: () = assert!(core::mem::size_of::<TraceNotify>() == 56 + CAPTURE_LEN);

/// A policy decision on a new connection (and on every denied packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyVerdictNotify {
    /// `subtype`: 0.
    pub hdr: EventHeader,
    /// The identity on the other side of the endpoint (`hdr.source`).
    pub remote_identity: u32,
    /// `policy::DIR_*`.
    pub dir: u8,
    pub proto: u8,
    /// Destination port (or ICMP type), network order.
    pub dport: u16,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `policy::MATCH_*`.
    pub match_type: u8,
    pub _pad: [u8; 2],
    pub _pad2: u32,
    pub data: [u8; CAPTURE_LEN],
}
const _: () = assert!(core::mem::size_of::<PolicyVerdictNotify>() == 32 + CAPTURE_LEN);

pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;

/// Source file numbers carried in drop events.
pub const FILE_LXC: u8 = 1;
pub const FILE_HOST: u8 = 2;

/// The program a `FILE_*` number stands for (as Cilium's bpf_lxc.c /
/// bpf_host.c in Hubble's `file` field).
pub fn file_name(file: u8) -> &'static str {
    match file {
        FILE_LXC => "lxc.rs",
        FILE_HOST => "host.rs",
        _ => "unknown",
    }
}

/// A decision the datapath took for a packet (Cilium's `DBG_MSG`), sent
/// only while debugging is on for the endpoint or the node. `hdr.subtype`
/// is a `debug::DBG_*` number; what the arguments hold is that subtype's
/// (user space renders the message). `len_orig` is the packet's length,
/// nothing is captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugNotify {
    pub hdr: EventHeader,
    pub arg1: u32,
    pub arg2: u32,
    pub arg3: u32,
    /// The CPU the program ran on.
    pub cpu: u32,
}
const _: () = assert!(core::mem::size_of::<DebugNotify>() == 32);

/// The first bytes of a packet at a point of a program (Cilium's
/// `DBG_CAPTURE`), while debugging is on. `hdr.subtype` is a
/// `debug::CAPTURE_*` number.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureNotify {
    pub hdr: EventHeader,
    pub arg1: u32,
    pub arg2: u32,
    pub cpu: u32,
    pub _pad: u32,
    pub data: [u8; CAPTURE_LEN],
}
const _: () = assert!(core::mem::size_of::<CaptureNotify>() == 32 + CAPTURE_LEN);
