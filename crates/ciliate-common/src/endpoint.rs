//! The lxc map: local endpoint IP → where and who it is (Cilium's
//! `cilium_lxc`). The datapath uses it for local delivery: the destination's
//! host-side device, its MACs and its identity.

pub const MAP_NAME: &str = "ciliate_lxc";
pub const MAX_ENTRIES: u32 = 65536;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// An endpoint address. IPv4 uses the first 4 bytes of `ip`; the rest stays
/// zero (room for IPv6 without changing the layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub ip: [u8; 16],
    /// `FAMILY_*`.
    pub family: u8,
    /// Padding, zero (a byte and a half-word, not a `[u8; 3]`: the
    /// datapath builds keys on the stack, and a zeroed byte array there
    /// becomes a call to a byte-by-byte memset).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

/// An IPv4 address in the 16-byte address field of a key.
pub const fn v4_in_16(ip: [u8; 4]) -> [u8; 16] {
    // One 128-bit value, not a zeroed array written into: the datapath's
    // keys live at unaligned stack slots, where the BPF backend turns a
    // zero-fill into a call to a byte-by-byte memset.
    (u32::from_le_bytes(ip) as u128).to_le_bytes()
}

impl EndpointKey {
    pub const fn v4(ip: [u8; 4]) -> Self {
        Self { ip: v4_in_16(ip), family: FAMILY_IPV4, _pad: 0, _pad2: 0 }
    }
}

/// The endpoint is the host itself: traffic to it goes to the stack.
pub const ENDPOINT_F_HOST: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Index of the endpoint's host-side (`lxc…`) device.
    pub ifindex: u32,
    pub endpoint_id: u16,
    pub _pad0: u16,
    /// `ENDPOINT_F_*`.
    pub flags: u32,
    /// The endpoint's own MAC (the pod's `eth0`).
    pub mac: [u8; 6],
    /// The MAC of the host-side device: the source MAC of what we deliver.
    pub node_mac: [u8; 6],
    /// Security identity of the endpoint.
    pub identity: u32,
    pub _pad1: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
