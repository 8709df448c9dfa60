//! Services: the load-balancer maps (Cilium's `cilium_lb4_*`).
//!
//! - **services** ([`LbKey`] → [`LbService`]): a frontend (address, port,
//!   protocol) at slot 0 is the *master* entry: how many backend slots the
//!   frontend has, its reverse-NAT index, flags and affinity timeout. Slots
//!   `1..=count` hold one backend ID each. Only *active* backends get a
//!   slot; terminating ones keep their established flows through conntrack.
//! - **backends** (backend ID → [`LbBackend`]): address, port and state.
//! - **reverse NAT** (index → [`RevNat`]): the frontend a reply is
//!   translated back to. Every frontend has its own index.
//! - **affinity** ([`AffinityKey`] → [`AffinityValue`]): client IP and
//!   frontend → the backend it used last, for sessionAffinity ClientIP.
//! - **Maglev** ([`MaglevKey`] → [`MaglevChunk`]): the consistent-hash
//!   lookup table of a frontend that uses Maglev, of the node's table size
//!   M (`--bpf-lb-maglev-table-size`, a prime of [`MAGLEV_SIZES`]), in
//!   chunks of [`MAGLEV_CHUNK`] entries: entry `i` is entry `i %
//!   MAGLEV_CHUNK` of chunk `i / MAGLEV_CHUNK`. The programs learn M from
//!   their load-time global [`MAGLEV_SIZE_SYMBOL`].
//! - **source ranges** (LPM [`SrcRangeKey`]): loadBalancerSourceRanges.
//! - **socket reverse NAT** ([`SockRevNatKey`] → [`SockRevNatValue`]): what
//!   the socket hooks translated, so recvmsg/getpeername show the frontend.
//!
//! A flow is pinned to its backend by a conntrack entry of direction
//! `ct::DIR_SERVICE` under the tuple that names the frontend (see
//! `ciliate_common::ct`).

pub const SERVICES_MAP: &str = "ciliate_lb4_services";
pub const BACKENDS_MAP: &str = "ciliate_lb4_backends";
pub const REVNAT_MAP: &str = "ciliate_lb4_reverse_nat";
pub const AFFINITY_MAP: &str = "ciliate_lb4_affinity";
pub const MAGLEV_MAP: &str = "ciliate_lb4_maglev";
pub const SRC_RANGE_MAP: &str = "ciliate_lb4_source_range";
pub const SOCK_REVNAT_MAP: &str = "ciliate_lb4_reverse_sk";

pub const MAX_SERVICES: u32 = 65536;
pub const MAX_BACKENDS: u32 = 65536;
pub const MAX_REVNAT: u32 = 65536;
pub const MAX_AFFINITY: u32 = 65536;
pub const MAX_MAGLEV: u32 = 4096;
pub const MAX_SRC_RANGES: u32 = 16384;
pub const MAX_SOCK_REVNAT: u32 = 262_144;

/// Entries of a Maglev lookup table by default (Cilium's, 16381), and the
/// sizes one may choose (Cilium's: primes, each about twice the last).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16381;
pub const MAGLEV_SIZES: [u32; 10] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071];
/// Entries of one chunk of a table (a power of two: the datapath bounds
/// its index with a mask).
pub const MAGLEV_CHUNK: usize = 4096;
/// The load-time global that holds the node's table size.
pub const MAGLEV_SIZE_SYMBOL: &str = "CILIATE_MAGLEV_SIZE";

/// Chunks of a table of `size` entries.
pub const fn maglev_chunks(size: u32) -> u32 {
    (size as usize).div_ceil(MAGLEV_CHUNK) as u32
}

/// Backend states (Cilium's). Only `ACTIVE` backends are given slots.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
pub const BACKEND_QUARANTINED: u8 = 2;
pub const BACKEND_MAINTENANCE: u8 = 3;

/// The reverse-NAT index a DSR backend's ingress conntrack entry carries
/// (never allocated to a frontend): its replies take their source from the
/// flow's `DIR_DSR` record in the SNAT map (`crate::nat::DIR_DSR`), not
/// from the reverse-NAT map.
pub const REV_NAT_DSR: u16 = u16::MAX;

/// NodePort DSR's IPv4 option (Cilium's, so a capture reads the same):
/// type 0x9a (copied, class 0, number 26), length 8, then the frontend's
/// port and address in network byte order. It follows the 20-byte header
/// of the flow's first packet (every datagram's for UDP).
pub const DSR_OPT_TYPE: u8 = 0x9a;
pub const DSR_OPT_LEN: u8 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsrOpt {
    pub kind: u8,
    pub len: u8,
    /// Network byte order.
    pub port: u16,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<DsrOpt>() == DSR_OPT_LEN as usize);

/// Frontend kinds and options ([`LbService::flags`]).
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
pub const SVC_F_HOST_PORT: u16 = 1 << 4;
/// Frontends reachable from outside the cluster (a ClusterIP is not).
pub const SVC_F_EXTERNAL: u16 =
    SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER | SVC_F_HOST_PORT;
/// sessionAffinity ClientIP: see [`LbService::affinity_timeout`].
pub const SVC_F_AFFINITY: u16 = 1 << 5;
/// loadBalancerSourceRanges: only clients in the source-range map.
pub const SVC_F_SRC_RANGES: u16 = 1 << 6;
/// Backends are chosen through the frontend's Maglev table, not at random.
pub const SVC_F_MAGLEV: u16 = 1 << 7;
/// externalTrafficPolicy or internalTrafficPolicy Local: the slots hold only
/// this node's backends (the agent filters them).
pub const SVC_F_LOCAL: u16 = 1 << 8;

/// A frontend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey {
    pub addr: [u8; 4],
    /// Network byte order.
    pub dport: u16,
    /// 0: the master entry; 1..=count: backend slots.
    pub slot: u16,
    pub proto: u8,
    /// Padding, zero (a byte and a half-word, not a `[u8; 3]`: the
    /// datapath builds keys on the stack, and a zeroed byte array there
    /// becomes a call to a byte-by-byte memset).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<LbKey>() == 12);

/// A master entry (slot 0) or a backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    /// The backend of a slot; 0 in the master entry.
    pub backend_id: u32,
    /// Master entry: the number of backend slots (0: no backends, drop
    /// with `NO_SERVICE`).
    pub count: u16,
    pub rev_nat_index: u16,
    /// `SVC_F_*`.
    pub flags: u16,
    pub _pad: u16,
    /// Seconds a client keeps its backend under ClientIP affinity.
    pub affinity_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<LbService>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbBackend {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*`.
    pub state: u8,
}
const _: () = assert!(core::mem::size_of::<LbBackend>() == 8);

/// What a reply is translated back to: the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u8; 4],
    pub rev_nat_index: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Monotonic seconds of the last use.
    pub last_used: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 8);

/// One chunk of a frontend's Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub rev_nat_index: u16,
    pub chunk: u16,
}
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 4);

/// Entries `chunk * MAGLEV_CHUNK ..` of a Maglev table: entry
/// `hash(tuple) % M` of the whole table is the backend ID (0 past M).
pub type MaglevChunk = [u32; MAGLEV_CHUNK];

/// Bits of [`SrcRangeKey`] before the address: the prefix length of an
/// entry is this plus the range's length.
pub const SRC_RANGE_STATIC_PREFIX: u32 = 32;

/// An allowed client range of a frontend (LPM key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrcRangeKey {
    pub rev_nat_index: u16,
    pub _pad: u16,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SrcRangeKey>() == 8);

/// A socket the socket hooks translated: its cookie and the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    pub rev_nat_index: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);

/// Cilium's IPv4 loopback for hairpin flows: a pod that reaches its own
/// service and is chosen as the backend sees the connection come from this
/// address (a packet from its own address would be a martian).
pub const HAIRPIN_LOOPBACK: [u8; 4] = [169, 254, 42, 1];

/// The flow hash Maglev indexes with (the datapath and the agent's tests
/// compute it alike): a multiplicative mix of the 5-tuple.
pub const fn flow_hash(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    h = mix(h, u32::from_ne_bytes(saddr));
    h = mix(h, u32::from_ne_bytes(daddr));
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    // Final avalanche (murmur3 fmix32).
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const fn mix(h: u32, v: u32) -> u32 {
    let k = v.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}
