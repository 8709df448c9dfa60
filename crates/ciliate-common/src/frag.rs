//! IPv4 fragment tracking (Cilium's `cilium_ipv4_frag_datagrams`): only the
//! first fragment of a datagram carries its L4 header, so the datapath
//! remembers that header's ports under the datagram's (addresses,
//! protocol, IP ID) when it sees the first fragment, and later fragments
//! take them from here for conntrack, policy, services and NAT. A later
//! fragment whose first one was not seen (lost, or overtaken) is dropped
//! with `FRAG_NOT_FOUND`. Entries are never deleted (later fragments can
//! arrive out of order); the LRU evicts them.
//!
//! A program that rewrites addresses or ports sees the datagram again at
//! the next hook under the rewritten addresses: the first fragment records
//! its translated ports there, so each hook's view stays consistent.

pub const MAP_NAME: &str = "ciliate_ipv4_frag_datagrams";
/// Cilium's `--bpf-fragments-map-max` default.
pub const MAX_ENTRIES: u32 = 8192;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub daddr: [u8; 4],
    pub saddr: [u8; 4],
    /// The IP identification field (network byte order).
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// What the first fragment's L4 header said: the ports as conntrack keys
/// them (network order; for ICMP echo the identifier, see `ct`), and the
/// "port" policy matches (the destination port, or the ICMP type).
/// `tcp_flags` is always 0 (a later fragment carries no TCP flags).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    pub policy_port: u16,
    pub tcp_flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 8);
