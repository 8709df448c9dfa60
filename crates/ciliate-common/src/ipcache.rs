//! The ipcache: prefix → identity and tunnel endpoint, an LPM trie (Cilium's
//! `cilium_ipcache`). The datapath asks it "who is this IP?".

pub const MAP_NAME: &str = "ciliate_ipcache";
pub const MAX_ENTRIES: u32 = 512_000;

/// Bits of [`IpcacheKey`] before the address: they always match, so a
/// prefix of N address bits is stored with prefix length `STATIC_PREFIX + N`.
pub const STATIC_PREFIX: u32 = 32;

/// The LPM data part of a key (aya's `lpm_trie::Key<IpcacheKey>` adds the
/// prefix length in front).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    /// `endpoint::FAMILY_*`.
    pub family: u8,
    /// Padding, zero (a byte and a half-word, not a `[u8; 3]`: the
    /// datapath builds keys on the stack, and a zeroed byte array there
    /// becomes a call to a byte-by-byte memset).
    pub _pad: u8,
    pub _pad2: u16,
    /// IPv4 in the first 4 bytes.
    pub ip: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);

impl IpcacheKey {
    pub const fn v4(ip: [u8; 4]) -> Self {
        Self {
            family: crate::endpoint::FAMILY_IPV4,
            _pad: 0,
            _pad2: 0,
            ip: crate::endpoint::v4_in_16(ip),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// IPv4 of the node hosting the prefix, zero when it is local.
    pub tunnel_endpoint: [u8; 4],
    /// `IPCACHE_F_*`.
    pub flags: u8,
    /// Encryption key index (unused, kept for Cilium parity).
    pub key: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 12);
