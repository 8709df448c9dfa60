//! Connection tracking: two LRU maps (TCP, and everything else), as Cilium.
//!
//! A connection is stored under its *original* tuple as the tracking
//! endpoint saw it, with the direction it was opened in:
//! - a packet leaving an endpoint with tuple T looks up `{T, EGRESS}`
//!   (established) and then `{reverse(T), INGRESS}` (a reply to a
//!   connection the endpoint accepted); if neither exists it is new and
//!   `{T, EGRESS}` is created;
//! - a packet arriving at an endpoint does the same with the directions
//!   swapped.
//!
//! Both ends of a same-node connection therefore have an entry each.
//!
//! A connection to a service has one more entry, `{T, SERVICE}` with `T`
//! naming the frontend, that pins it to its backend; the connection is
//! tracked under the translated tuple, and the entry of the side that
//! translated carries the reverse-NAT index its replies need.
//!
//! Ports are stored in network byte order, as read from the packet. For ICMP
//! echo the identifier stands in `dport` of a request and in `sport` of a
//! reply, so that a reply's reverse tuple is its request's tuple.

pub const TCP_MAP_NAME: &str = "ciliate_ct4_global";
pub const ANY_MAP_NAME: &str = "ciliate_ct_any4_global";
pub const MAX_ENTRIES_TCP: u32 = 524_288;
pub const MAX_ENTRIES_ANY: u32 = 262_144;

pub const DIR_EGRESS: u8 = 1;
pub const DIR_INGRESS: u8 = 2;
/// A service flow as its client addressed it (destination: the frontend).
/// The entry pins the flow to `backend_id`; the connection itself is
/// tracked under the translated tuple in the usual directions.
pub const DIR_SERVICE: u8 = 3;

/// Lookup results; also the `ct_state` of trace events (Cilium's trace
/// reasons: 0 is "new").
pub const CT_NEW: u8 = 0;
pub const CT_ESTABLISHED: u8 = 1;
pub const CT_REPLY: u8 = 2;
pub const CT_RELATED: u8 = 3;

/// Lifetimes in seconds (Cilium's defaults).
pub const LIFETIME_TCP: u32 = 21600;
pub const LIFETIME_NONTCP: u32 = 60;
pub const LIFETIME_SYN: u32 = 60;
pub const LIFETIME_CLOSE: u32 = 10;

/// Entry flags.
pub const F_TX_CLOSING: u16 = 1 << 0;
pub const F_RX_CLOSING: u16 = 1 << 1;
pub const F_SEEN_NON_SYN: u16 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `DIR_*`: the direction the connection was opened in.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);

impl CtKey4 {
    /// The tuple of the other direction, with `dir` given.
    pub const fn reverse(&self, dir: u8) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Packets and bytes in the opening direction.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets and bytes in the reply direction.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Expiry, in seconds of the monotonic clock (`bpf_ktime_get_ns`,
    /// CLOCK_MONOTONIC in user space). GC removes entries past it.
    pub expires: u32,
    /// Identity of the side that opened the connection.
    pub src_identity: u32,
    /// Reverse-NAT index of a service connection, 0 if none.
    pub rev_nat_index: u16,
    /// `F_*`.
    pub flags: u16,
    /// TCP flags seen in each direction (OR of all packets).
    pub tx_flags_seen: u8,
    pub rx_flags_seen: u8,
    pub _pad: [u8; 2],
    /// The backend of a `DIR_SERVICE` entry, 0 otherwise.
    pub backend_id: u32,
    /// The node's policy generation (`crate::policy::GEN_MAP`) at which
    /// policy last let this connection's opening direction through; while
    /// the generation has not moved, its established packets skip the
    /// lookups. 0: never (always looked up).
    pub policy_gen: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);
