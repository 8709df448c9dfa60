//! XDP on the native devices (Cilium's `bpf_xdp`): the prefilter, which
//! drops packets from denied source CIDRs before the stack allocates an
//! skb for them (`ciliate prefilter`; layouts in
//! `ciliate_common::prefilter`). Everything else passes on to the stack
//! and from-netdev.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use ciliate_common::prefilter::{MAX_ENTRIES, PrefilterKey, PrefilterStats};

/// Denied source prefixes → their counter slot.
#[map(name = "ciliate_cidr_v4_dyn")]
static CILIATE_PREFILTER: LpmTrie<PrefilterKey, u32> =
    LpmTrie::pinned(MAX_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Packets and bytes each denied CIDR dropped, by slot.
#[map(name = "ciliate_prefilter_stats")]
static CILIATE_PREFILTER_STATS: PerCpuArray<PrefilterStats> = PerCpuArray::pinned(MAX_ENTRIES, 0);

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 source address in the frame.
const SADDR: usize = ETH_LEN + 12;

#[xdp]
pub fn xdp_entry(ctx: XdpContext) -> u32 {
    if prefilter(&ctx) { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

/// Is the frame an IPv4 packet from a denied CIDR? Counts it when it is.
#[inline(always)]
fn prefilter(ctx: &XdpContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + SADDR + 4 > end {
        return false;
    }
    // SAFETY: both reads are inside [data, end), checked above.
    let (proto, saddr) = unsafe {
        (
            u16::from_be(core::ptr::read_unaligned((data + 12) as *const u16)),
            core::ptr::read_unaligned((data + SADDR) as *const [u8; 4]),
        )
    };
    if proto != ETH_P_IP {
        return false;
    }
    let Some(slot) = CILIATE_PREFILTER.get(Key::new(32, PrefilterKey { addr: saddr })) else {
        return false;
    };
    if let Some(s) = CILIATE_PREFILTER_STATS.get_ptr_mut(*slot) {
        // SAFETY: this CPU's slot; nothing else writes it while we run.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += (end - data) as u64;
        }
    }
    true
}

ciliate_ebpf::program_object!();
