//! Packet parsing: header layouts and bounds-checked direct packet access.
//! Everything the verifier needs to see ("is this byte inside the packet?")
//! happens in [`ptr_at`]; the other modules never touch raw offsets.

use aya_ebpf::programs::TcContext;

use crate::{Drop, drop};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<ArpHdr>() == 28);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20);

impl Ipv4Hdr {
    #[inline(always)]
    pub fn ihl_bytes(&self) -> usize {
        usize::from(self.vihl & 0x0f) * 4
    }
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vihl >> 4
    }
}

/// A pointer to a `T` at `offset` in the packet, or `None` when the packet is
/// too short. The check is the one the verifier wants to see.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    let len = core::mem::size_of::<T>();
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The Ethernet header, or `UNSUPPORTED_L2` for a runt frame.
#[inline(always)]
pub fn eth(ctx: &TcContext) -> Result<*mut EthHdr, Drop> {
    ptr_at::<EthHdr>(ctx, 0).ok_or(drop!(ciliate_common::drop::UNSUPPORTED_L2))
}

/// The IPv4 header after Ethernet, validated: version 4, header length at
/// least 20 bytes and inside the packet. `INVALID` otherwise.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<*mut Ipv4Hdr, Drop> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(drop!(ciliate_common::drop::INVALID))?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*ip };
    let ihl = hdr.ihl_bytes();
    if hdr.version() != 4 || ihl < 20 || ctx.data() + ETH_HLEN + ihl > ctx.data_end() {
        return Err(drop!(ciliate_common::drop::INVALID));
    }
    Ok(ip)
}

/// The IPv4 header of an IPv4 frame, copied; `None` for any other
/// ethertype (left to the stack). A runt frame is `UNSUPPORTED_L2`; a
/// broken IPv4 header is `INVALID`, or `None` with `lenient` (traffic from
/// outside that is not ours to judge).
#[inline(always)]
pub fn ipv4_of(ctx: &TcContext, lenient: bool) -> Result<Option<Ipv4Hdr>, Drop> {
    let eth = eth(ctx)?;
    // SAFETY: bounds checked by eth.
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return Ok(None);
    }
    match ipv4(ctx) {
        // SAFETY: validated by ipv4; copied before any packet change.
        Ok(ip) => Ok(Some(unsafe { *ip })),
        Err(_) if lenient => Ok(None),
        Err(d) => Err(d),
    }
}
