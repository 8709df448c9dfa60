//! The policy map: one LPM trie for all endpoints of a node, keyed by
//! (endpoint, direction, remote identity, protocol, port prefix), as
//! Cilium's per-endpoint policy maps but in one map.
//!
//! How the datapath reads it, per packet of an endpoint in a direction:
//! 1. Look up the full key with the remote identity. No match at all means
//!    the direction is not enforced: allow. (An enforced direction always
//!    has its *marker*: an entry of prefix [`PREFIX_ENFORCED`] that covers
//!    every key of that endpoint and direction.)
//! 2. Look up the same key with identity 0 (any identity).
//! 3. A deny from either lookup drops the packet (`POLICY_DENY`, 181); else
//!    an allow from either passes it; else (only markers matched) the
//!    packet is dropped as `POLICY` (133).
//!
//! Deny wins over allow in the datapath only across the two lookups: within
//! one lookup the longest prefix wins, so the agent must write any allow
//! key that a deny covers as a deny.
//!
//! Prefix lengths count bits of [`PolicyKey`] in order:
//! `PREFIX_ENFORCED` (endpoint, direction, padding), `PREFIX_L3` (+
//! identity: any protocol, any port), `PREFIX_PROTO` (+ protocol and
//! padding: any port), and `PREFIX_PROTO + n` for a port prefix of n bits
//! (`PREFIX_FULL`: one port). A port range is written as its covering
//! prefixes.

pub const MAP_NAME: &str = "ciliate_policy";
pub const MAX_ENTRIES: u32 = 65536;

pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// Identity 0 in a key: any identity.
pub const ANY_IDENTITY: u32 = 0;
/// Protocol 0 in a key (with `PREFIX_L3`): any protocol.
pub const ANY_PROTO: u8 = 0;

pub const PREFIX_ENFORCED: u32 = 32;
pub const PREFIX_L3: u32 = 64;
pub const PREFIX_PROTO: u32 = 80;
pub const PREFIX_FULL: u32 = 96;

/// The LPM data part of a key (aya's `lpm_trie::Key<PolicyKey>` adds the
/// prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u16,
    /// `DIR_*`.
    pub dir: u8,
    pub _pad0: u8,
    /// Remote identity; [`ANY_IDENTITY`] for rules that select any.
    pub identity: u32,
    pub proto: u8,
    pub _pad1: u8,
    /// Destination port (or ICMP type), network byte order.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// The node's policy generation (an array of one `u32`): the agent moves
/// it after every change that can change a decision (policy entries, the
/// identities of addresses). An established connection's packets are
/// looked up again only when it moved since their connection was last
/// decided (`ct::CtEntry::policy_gen`); 0 (no agent yet) looks up always.
pub const GEN_MAP: &str = "ciliate_policy_gen";

/// The entry is a deny.
pub const F_DENY: u8 = 1 << 0;
/// The entry is the enforcement marker of an endpoint and direction.
pub const F_MARKER: u8 = 1 << 1;

/// Cilium's policy match types (policy verdict events).
pub const MATCH_NONE: u8 = 0;
pub const MATCH_L3_ONLY: u8 = 1;
pub const MATCH_L3_L4: u8 = 2;
pub const MATCH_L4_ONLY: u8 = 3;
pub const MATCH_ALL: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    /// `F_*`.
    pub flags: u8,
    /// `MATCH_*`, for policy verdict events.
    pub match_type: u8,
    /// L7 proxy port, network order; 0 for none.
    pub proxy_port: u16,
    pub _pad: u32,
    /// Packets and bytes that matched this entry (all CPUs).
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 24);

/// Name of a match type, as `ciliate monitor` prints it.
pub fn match_name(m: u8) -> &'static str {
    match m {
        MATCH_L3_ONLY => "L3-Only",
        MATCH_L3_L4 => "L3-L4",
        MATCH_L4_ONLY => "L4-Only",
        MATCH_ALL => "all",
        _ => "none",
    }
}
