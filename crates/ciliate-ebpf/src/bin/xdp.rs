//! XDP on the native devices (Cilium's `bpf_xdp`):
//!
//! - the prefilter, which drops packets from denied source CIDRs before the
//!   stack allocates an skb for them (`ciliate prefilter`; layouts in
//!   `ciliate_common::prefilter`);
//! - NodePort acceleration (`NODE_F_XDP_NODEPORT`, native routing): a
//!   packet for an external frontend whose backend is on another node is
//!   balanced, DNAT'ed to the backend and SNAT'ed to this node exactly as
//!   from-netdev would (the same stages, the same maps: the reply comes
//!   back through from-netdev, which translates it), then sent out of the
//!   device the FIB names (`XDP_TX` when it is the one it came in by,
//!   `XDP_REDIRECT` otherwise), without an skb. Counted as forwarded
//!   under `SERVICE` in the metrics map.
//!
//! Everything else (a local backend, tunnel mode, fragments, a route the
//! FIB cannot finish, any doubt) passes untouched to the stack and
//! from-netdev, which decide and report.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use ciliate_common::{
    lb::SVC_F_EXTERNAL,
    metrics::{DIR_SERVICE, REASON_FORWARDED},
    node::{NODE_F_XDP_NODEPORT, NodeConfig, ROUTING_NATIVE},
    prefilter::{MAX_ENTRIES, PrefilterKey, PrefilterStats},
};
use ciliate_ebpf::{Drop, ct, deliver, lb, lookup, maps, nat, packet};

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
    if prefilter(&ctx) {
        return xdp_action::XDP_DROP;
    }
    let node = maps::node_config();
    if node.flags & NODE_F_XDP_NODEPORT != 0 {
        let len = (ctx.data_end() - ctx.data()) as u32;
        return match nodeport(&ctx, &node) {
            Ok(action) => action,
            // A rewrite that failed half-way (a NAT port table full): the
            // packet is no longer the one that came; from-netdev would
            // drop it for the same reason.
            Err(d) => {
                maps::count(d.reason, DIR_SERVICE, len);
                xdp_action::XDP_DROP
            }
        };
    }
    xdp_action::XDP_PASS
}

/// NodePort to a backend on another node, at XDP; see the module's text.
/// `Ok(XDP_PASS)` for everything left to the stack, untouched.
#[inline(always)]
fn nodeport(ctx: &XdpContext, node: &NodeConfig) -> Result<u32, Drop> {
    const PASS: Result<u32, Drop> = Ok(xdp_action::XDP_PASS);
    if node.routing != ROUTING_NATIVE || node.node_ip == [0; 4] {
        return PASS;
    }
    let Ok(Some(ip)) = packet::ipv4_of(ctx, true) else { return PASS };
    let fragment = u16::from_be(ip.frag_off) & 0x3fff != 0;
    if (ip.proto != ct::IPPROTO_TCP && ip.proto != ct::IPPROTO_UDP) || fragment || ip.ttl <= 1 {
        return PASS;
    }
    let Ok(mut t) = ct::tuple(ctx, &ip) else { return PASS };
    let Some(svc) = lb::frontend(&t) else { return PASS };
    if svc.flags & SVC_F_EXTERNAL == 0 {
        return PASS;
    }
    // The choice is pinned: from-netdev, if it gets the packet after all,
    // finds the same backend.
    let Ok(sel) = lb::select(&t, &svc) else { return PASS };
    if lookup::local_endpoint(sel.backend.addr).is_some() {
        return PASS;
    }
    // The route to the backend first: a packet the FIB cannot finish (no
    // neighbour yet) goes to the stack as it came.
    // SAFETY: a plain C struct; all-zero is its "unset" value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = t.key.proto;
    p.sport = t.key.sport;
    p.dport = sel.backend.port;
    p.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    // SAFETY: the context of an XDP program.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    p.ifindex = ingress;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node.node_ip);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(sel.backend.addr);
    // SAFETY: the helper reads and fills `p`, whose size it is given.
    let rc = unsafe {
        fib_lookup(ctx.as_ptr(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return PASS;
    }
    let len = (ctx.data_end() - ctx.data()) as u32;
    lb::dnat(ctx, &mut t, &sel)?;
    nat::snat(ctx, &mut t, node.node_ip, svc.rev_nat_index)?;
    deliver::l3_hop(ctx, &p.smac, &p.dmac)?;
    maps::count(REASON_FORWARDED, DIR_SERVICE, len);
    if p.ifindex == ingress {
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: plain helper call; its result is the XDP action.
    Ok(unsafe { bpf_redirect(p.ifindex, 0) } as u32)
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
