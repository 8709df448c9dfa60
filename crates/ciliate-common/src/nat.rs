//! Masquerading (BPF SNAT): pod → outside-the-cluster traffic leaves with
//! the node's address, on a port allocated here; replies are translated
//! back. One LRU map (Cilium's `cilium_snat_v4_external`) holds both
//! directions, keyed like conntrack (`ct::CtKey4`):
//! - `{original tuple, DIR_OUT}` → the node address and port it was given;
//! - `{reply tuple as it arrives, DIR_IN}` → the pod address and port;
//! - `{reply tuple as a DSR backend sends it, DIR_DSR}` → the frontend.
//!
//! For ICMP echo the identifier stands in for the port (not translated:
//! the node address alone tells the replies of different pods apart only
//! when their identifiers differ, as Cilium's).

pub const MAP_NAME: &str = "ciliate_snat_v4_external";
pub const MAX_ENTRIES: u32 = 131_072;

pub const DIR_OUT: u8 = 1;
pub const DIR_IN: u8 = 2;
/// NodePort DSR on a backend's node: `{reply tuple as the backend sends
/// it, DIR_DSR}` → the frontend (address, port) its replies leave from,
/// learnt from the option the frontend's node put on the flow's first
/// packet (Cilium keeps this in its SNAT map too).
pub const DIR_DSR: u8 = 3;

/// Ports handed out when the original one is taken (Linux's ephemeral
/// range), and how many candidates a packet tries before giving up with
/// `NAT_NO_MAPPING`.
pub const PORT_MIN: u16 = 32768;
pub const PORT_MAX: u16 = 60999;
pub const RETRIES: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: u16,
    /// For a NodePort flow to a backend on another node (SNATed to this
    /// node): the frontend's reverse-NAT index, so the reply is translated
    /// back to the frontend too. 0 for masquerading.
    pub rev_nat_index: u16,
    /// Monotonic seconds of creation (for listing; the LRU evicts).
    pub created: u32,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 12);
