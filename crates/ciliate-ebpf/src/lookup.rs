//! "Who is this IP?": the ipcache (identity of any address) and the lxc map
//! (is it an endpoint of this node, and where does it live).

use aya_ebpf::maps::lpm_trie::Key;
use ciliate_common::{
    endpoint::{EndpointInfo, EndpointKey},
    identity,
    ipcache::{IpcacheEntry, IpcacheKey, STATIC_PREFIX},
};

use crate::maps::{CILIATE_IPCACHE, CILIATE_LXC};

/// The security identity of `ip`; `world` when no prefix covers it.
#[inline(always)]
pub fn identity_of(ip: [u8; 4]) -> u32 {
    let key = Key::new(STATIC_PREFIX + 32, IpcacheKey::v4(ip));
    match CILIATE_IPCACHE.get(&key) {
        Some(e) => e.identity,
        None => identity::WORLD,
    }
}

/// The ipcache entry of `ip` (identity and tunnel endpoint); `world`
/// with no tunnel endpoint when no prefix covers it.
#[inline(always)]
pub fn ipcache(ip: [u8; 4]) -> IpcacheEntry {
    let key = Key::new(STATIC_PREFIX + 32, IpcacheKey::v4(ip));
    match CILIATE_IPCACHE.get(&key) {
        Some(e) => *e,
        None => IpcacheEntry { identity: identity::WORLD, ..IpcacheEntry::default() },
    }
}

/// The local endpoint with address `ip`, if any.
#[inline(always)]
pub fn local_endpoint(ip: [u8; 4]) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out before anything can delete it.
    unsafe { CILIATE_LXC.get(EndpointKey::v4(ip)).copied() }
}
