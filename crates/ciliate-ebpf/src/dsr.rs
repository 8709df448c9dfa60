//! NodePort DSR (direct server return; layouts in `ciliate_common::lb` and
//! `ciliate_common::nat`):
//! - on the frontend's node, a flow to a backend on another node is only
//!   DNAT'ed (the client's address stays), and the frontend rides to the
//!   backend's node in an IPv4 option ([`add_option`]) on the flow's first
//!   packet (every datagram's for UDP);
//! - on the backend's node, from-netdev reads it ([`learn`]) into a
//!   `DIR_DSR` record keyed by the reply tuple, and marks the backend's
//!   conntrack entry with `REV_NAT_DSR`;
//! - the backend's replies take the frontend as their source again
//!   ([`reply`]) and leave that node straight to the client.

use ciliate_common::{
    drop::{FRAG_NOSUPPORT, NAT_NO_MAPPING, WRITE_ERROR},
    lb::{DSR_OPT_LEN, DSR_OPT_TYPE, DsrOpt},
    nat::{DIR_DSR, NatEntry},
    node::{NODE_F_DSR, NODE_F_DSR_UDP},
};

use crate::{
    Drop,
    ct::{IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, Tuple},
    drop,
    lb::{Side, set_addr, set_port},
    maps::CILIATE_SNAT4,
    packet::{ETH_HLEN, Ipv4Hdr, Pkt, csum_at, ptr_at},
};

/// The IPv4 header with the option after it.
#[repr(C)]
struct WithOpt {
    ip: Ipv4Hdr,
    opt: DsrOpt,
}
const WITH_OPT: usize = core::mem::size_of::<WithOpt>();

/// Does the node (`flags`: `NODE_F_*`) send flow `t` to a remote backend
/// by DSR? TCP with `NODE_F_DSR`, UDP with `NODE_F_DSR_UDP` as well.
#[inline(always)]
pub fn enabled_for(flags: u8, t: &Tuple) -> bool {
    match t.key.proto {
        IPPROTO_TCP => flags & NODE_F_DSR != 0,
        IPPROTO_UDP => flags & NODE_F_DSR_UDP != 0,
        _ => false,
    }
}

/// Does packet `t` of a DSR flow carry the frontend? A TCP flow's SYN, and
/// every UDP datagram (a backend's node may have lost its record).
#[inline(always)]
pub fn needs_option(t: &Tuple) -> bool {
    match t.key.proto {
        IPPROTO_TCP => t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        IPPROTO_UDP => true,
        _ => false,
    }
}

/// Put the frontend `(addr, port)` of the (DNAT'ed) packet in `ctx` into
/// the DSR option after its IPv4 header; the header's length, total length
/// and checksum follow (the L4 checksum does not cover IP options). A
/// header with options of its own cannot take it: `WRITE_ERROR`.
#[inline(always)]
pub fn add_option(ctx: &impl Pkt, addr: [u8; 4], port: u16) -> Result<(), Drop> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(drop!(WRITE_ERROR))?;
    // SAFETY: bounds checked by ptr_at; read before the packet changes.
    let (vihl, tot_len) = unsafe { ((*ip).vihl, u16::from_be((*ip).tot_len)) };
    if vihl != 0x45 {
        return Err(drop!(WRITE_ERROR));
    }
    ctx.room_after_ipv4(usize::from(DSR_OPT_LEN)).map_err(|_| drop!(WRITE_ERROR))?;
    let h = ptr_at::<WithOpt>(ctx, ETH_HLEN).ok_or(drop!(WRITE_ERROR))?;
    // SAFETY: bounds checked by ptr_at; written in place (the stack of
    // from-netdev's debug build has no room for copies).
    unsafe {
        (*h).ip.vihl = 0x47;
        (*h).ip.tot_len = (tot_len + u16::from(DSR_OPT_LEN)).to_be();
        (*h).ip.check = 0;
        (*h).opt = DsrOpt { kind: DSR_OPT_TYPE, len: DSR_OPT_LEN, port, addr };
        (*h).ip.check = csum_at::<{ WITH_OPT / 2 }>(h.cast());
    }
    Ok(())
}

/// Would the DSR option take a UDP datagram past the device's MTU? (tc:
/// the device it came in by, as Cilium checks.) Such a datagram is dropped
/// as `FRAG_NOSUPPORT` ("Fragmentation needed").
#[inline(always)]
pub fn check_mtu(ctx: &aya_ebpf::programs::TcContext) -> Result<(), Drop> {
    use aya_ebpf::bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS;
    let mut mtu = 0u32;
    // SAFETY: plain helper call; ifindex 0 is the skb's device.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_check_mtu(ctx.skb.skb.cast(), 0, &mut mtu, i32::from(DSR_OPT_LEN), 0)
    };
    if rc != i64::from(BPF_MTU_CHK_RET_SUCCESS) {
        return Err(drop!(FRAG_NOSUPPORT));
    }
    Ok(())
}

/// On a backend's node: if packet `t` (header `ip`) carries the DSR option,
/// record its frontend for the flow's replies and say so (the caller marks
/// the conntrack entry with `REV_NAT_DSR`).
#[inline(never)]
pub fn learn(ctx: &impl Pkt, ip: &Ipv4Hdr, t: &Tuple) -> bool {
    if ip.vihl != 0x47 || !needs_option(t) {
        return false;
    }
    let Some(h) = ptr_at::<WithOpt>(ctx, ETH_HLEN) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let opt = unsafe { (*h).opt };
    if opt.kind != DSR_OPT_TYPE || opt.len != DSR_OPT_LEN {
        return false;
    }
    let key = t.key.reverse(DIR_DSR);
    // Every datagram of a UDP flow carries the option: write the record
    // only when it is new or names another frontend (an LRU update costs
    // several times a lookup).
    // SAFETY: read at once.
    if let Some(e) = unsafe { CILIATE_SNAT4.get(key) }
        && e.addr == opt.addr
        && e.port == opt.port
    {
        return true;
    }
    let e = NatEntry {
        addr: opt.addr,
        port: opt.port,
        rev_nat_index: 0,
        created: crate::ct::now_secs(),
    };
    // A full LRU evicts; a failed write leaves the flow to answer from
    // the pod (the client resets it).
    CILIATE_SNAT4.insert(key, e, 0).is_ok()
}

/// On a backend's node: the reply `t` of a DSR flow leaves from its
/// frontend. `NAT_NO_MAPPING` when the record is gone (the client would
/// not know the pod's address).
#[inline(always)]
pub fn reply(ctx: &impl Pkt, t: &mut Tuple) -> Result<(), Drop> {
    let mut k = t.key;
    k.dir = DIR_DSR;
    // SAFETY: copied out at once.
    let e = unsafe { CILIATE_SNAT4.get(k).copied() }.ok_or(drop!(NAT_NO_MAPPING))?;
    set_addr(ctx, t, Side::Src, e.addr)?;
    set_port(ctx, t, Side::Src, e.port)
}
