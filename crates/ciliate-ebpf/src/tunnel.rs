//! The overlay: VXLAN through a collect-metadata device (`ciliate_vxlan`).
//! A packet for a pod of another node is given tunnel metadata (the remote
//! node from the ipcache, the sender's identity as the VNI) and redirected
//! to the device, which encapsulates it; on the receiving node the device's
//! ingress program reads the identity back from the VNI.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_ZERO_CSUM_TX, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use ciliate_common::drop::{INVALID_VNI, NO_TUNNEL_ENDPOINT};

use crate::{Drop, drop};

/// VNIs are 24 bits: identities above cannot travel (local CIDR
/// identities never do).
const VNI_MAX: u32 = (1 << 24) - 1;

/// Send the packet to node `remote` through the overlay device `ifindex`,
/// with `identity` (the sender's) as the VNI.
#[inline(always)]
pub fn encap(ctx: &TcContext, remote: [u8; 4], identity: u32, ifindex: u32) -> Result<i32, Drop> {
    if ifindex == 0 || identity > VNI_MAX {
        return Err(drop!(NO_TUNNEL_ENDPOINT));
    }
    // All-zero is "unset".
    let mut slot = core::mem::MaybeUninit::uninit();
    let key: &mut bpf_tunnel_key = crate::zeroed(&mut slot);
    key.tunnel_id = identity;
    // The helper takes the address in host order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = 64;
    // SAFETY: the helper reads `key`, whose size it is given.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.as_ptr().cast(),
            key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    if rc < 0 {
        return Err(drop!(NO_TUNNEL_ENDPOINT));
    }
    // SAFETY: plain helper call; the result is the tc verdict.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// The sender's identity (the VNI) and node of a packet that came out of
/// the overlay device. `INVALID_VNI` without tunnel metadata or with VNI 0.
#[inline(always)]
pub fn source(ctx: &TcContext) -> Result<(u32, [u8; 4]), Drop> {
    let mut slot = core::mem::MaybeUninit::uninit();
    let key: &mut bpf_tunnel_key = crate::zeroed(&mut slot);
    // SAFETY: the helper fills `key`, whose size it is given.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.as_ptr().cast(),
            key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc < 0 || key.tunnel_id == 0 {
        return Err(drop!(INVALID_VNI));
    }
    // SAFETY: the IPv4 member of the union was filled.
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    Ok((key.tunnel_id, remote))
}
