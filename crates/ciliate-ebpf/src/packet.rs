//! Packet parsing: header layouts and bounds-checked direct packet access.
//! Everything the verifier needs to see ("is this byte inside the packet?")
//! happens in [`ptr_at`]; the other modules never touch raw offsets.

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::{Drop, drop};

/// What parsing and rewriting need of a program's packet: tc's skb
/// (rewritten through the kernel's helpers) or XDP's buffer (rewritten
/// here, with the same incremental checksum updates, RFC 1624). The stages
/// written against it serve both hooks; each is compiled once per hook.
pub trait Pkt {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Write `v` at `offset`. Errors are the helpers' (negative errno).
    fn store<T>(&self, offset: usize, v: &T) -> Result<(), i64>;
    /// Replace `from` by `to` (`size` 2 or 4 bytes, as the packet holds
    /// them) under the IPv4 header checksum at `offset`.
    fn l3_csum_replace(&self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), i64>;
    /// The same under the L4 checksum at `offset`; `flags` as the helper's
    /// (size in the low bits, `BPF_F_PSEUDO_HDR`, `BPF_F_MARK_MANGLED_0`).
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64>;
    /// Make `len` bytes of room right after the 20-byte IPv4 header (for an
    /// IP option), the Ethernet and IPv4 headers unchanged before it. The
    /// caller fixes the IPv4 header; packet pointers taken before are stale.
    fn room_after_ipv4(&self, len: usize) -> Result<(), i64>;
}

impl Pkt for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn store<T>(&self, offset: usize, v: &T) -> Result<(), i64> {
        TcContext::store(self, offset, v, 0)
    }
    #[inline(always)]
    fn l3_csum_replace(&self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), i64> {
        TcContext::l3_csum_replace(self, offset, from, to, size)
    }
    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
        TcContext::l4_csum_replace(self, offset, from, to, flags)
    }
    #[inline(always)]
    fn room_after_ipv4(&self, len: usize) -> Result<(), i64> {
        // BPF_ADJ_ROOM_NET: the room goes after the base network header.
        self.adjust_room(len as i32, aya_ebpf::bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, 0)
    }
}

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 means "none" and stays 0; a
/// computed 0 is written as 0xffff.
const MARK_MANGLED_0: u64 = 0x20;

/// One's-complement replace of `from` by `to` (16-bit words as they sit in
/// memory) in checksum `csum` (as it sits in memory): RFC 1624's
/// HC' = ~(~HC + ~m + m'). Byte order does not matter to the sum.
#[inline(always)]
fn csum_replace(csum: u16, from: u64, to: u64, size: u64) -> u16 {
    let mut sum = u32::from(!csum);
    let words = if size == 4 { 2 } else { 1 };
    let mut i = 0;
    while i < words {
        let shift = 16 * i;
        sum += u32::from(!((from >> shift) as u16)) + u32::from((to >> shift) as u16);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

impl Pkt for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn store<T>(&self, offset: usize, v: &T) -> Result<(), i64> {
        let p = ptr_at::<T>(self, offset).ok_or(-1)?;
        // SAFETY: bounds checked by ptr_at; unaligned: packet offsets are.
        unsafe { core::ptr::write_unaligned(p, core::ptr::read(v)) };
        Ok(())
    }
    #[inline(always)]
    fn l3_csum_replace(&self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), i64> {
        let p = ptr_at::<u16>(self, offset).ok_or(-1)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let c = core::ptr::read_unaligned(p);
            core::ptr::write_unaligned(p, csum_replace(c, from, to, size));
        }
        Ok(())
    }
    #[inline(always)]
    fn l4_csum_replace(&self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
        let p = ptr_at::<u16>(self, offset).ok_or(-1)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let c = core::ptr::read_unaligned(p);
            if flags & MARK_MANGLED_0 != 0 && c == 0 {
                return Ok(());
            }
            let mut n = csum_replace(c, from, to, flags & 0xf);
            if flags & MARK_MANGLED_0 != 0 && n == 0 {
                n = 0xffff;
            }
            core::ptr::write_unaligned(p, n);
        }
        Ok(())
    }
    #[inline(always)]
    fn room_after_ipv4(&self, len: usize) -> Result<(), i64> {
        /// What moves to the new front.
        #[repr(C)]
        struct Headers {
            eth: EthHdr,
            ip: Ipv4Hdr,
        }
        // SAFETY: plain helper call on this program's context.
        let rc = unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(self.ctx, -(len as i32)) };
        if rc != 0 {
            return Err(rc);
        }
        let from = ptr_at::<Headers>(self, len).ok_or(-1)?;
        let to = ptr_at::<Headers>(self, 0).ok_or(-1)?;
        // SAFETY: both inside the packet (ptr_at); read whole before the
        // overlapping write.
        unsafe { core::ptr::write_unaligned(to, core::ptr::read_unaligned(from)) };
        Ok(())
    }
}

/// The Internet checksum (RFC 1071) of the `N` 16-bit words at `p`, as
/// they sit in memory (the result too: byte order does not matter to the
/// sum).
///
/// # Safety
/// `p` points to `N` readable 16-bit words (in the packet: bounds checked
/// by the caller).
#[inline(always)]
pub unsafe fn csum_at<const N: usize>(p: *const u16) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        // SAFETY: inside the N words the caller vouches for.
        sum += u32::from(unsafe { core::ptr::read_unaligned(p.add(i)) });
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

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
pub fn ptr_at<T>(ctx: &impl Pkt, offset: usize) -> Option<*mut T> {
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
pub fn eth<C: Pkt>(ctx: &C) -> Result<*mut EthHdr, Drop> {
    ptr_at::<EthHdr>(ctx, 0).ok_or(drop!(ciliate_common::drop::UNSUPPORTED_L2))
}

/// The IPv4 header after Ethernet, validated: version 4, header length at
/// least 20 bytes and inside the packet. `INVALID` otherwise.
#[inline(always)]
pub fn ipv4<C: Pkt>(ctx: &C) -> Result<*mut Ipv4Hdr, Drop> {
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
pub fn ipv4_of<C: Pkt>(ctx: &C, lenient: bool) -> Result<Option<Ipv4Hdr>, Drop> {
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
