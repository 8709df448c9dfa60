//! XDP on the native devices (Cilium's `bpf_xdp`):
//!
//! - the prefilter, which drops packets from denied source CIDRs before the
//!   stack allocates an skb for them (`ciliate prefilter`; layouts in
//!   `ciliate_common::prefilter`);
//! - NodePort acceleration (`NODE_F_XDP_NODEPORT`): a packet for an
//!   external frontend whose backend is on another node is balanced,
//!   DNAT'ed to the backend and SNAT'ed to this node exactly as
//!   from-netdev would (the same stages, the same maps: the reply comes
//!   back through from-netdev, which translates it); in tunnel mode it is
//!   then wrapped in VXLAN here (outer IPv4/UDP 8472/VXLAN with the
//!   remote-node identity as the VNI, to the backend's node from the
//!   ipcache, as the overlay device would); then it is sent out of the
//!   device the FIB names for the (outer) destination (`XDP_TX` when it is
//!   the one it came in by, `XDP_REDIRECT` otherwise), without an skb.
//!   Counted as forwarded under `SERVICE` in the metrics map. With
//!   NodePort DSR (`NODE_F_DSR`, native routing) the packet is only
//!   DNAT'ed, and the flow's first packet carries the frontend in an IPv4
//!   option (`ciliate_ebpf::dsr`); the backend's node answers the client.
//!
//! Everything else (a local backend, fragments, a route the FIB cannot
//! finish, a tunnel packet past the device's MTU, any doubt) passes
//! untouched to the stack and from-netdev, which decide and report.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use ciliate_common::{
    lb::SVC_F_EXTERNAL,
    metrics::{DIR_SERVICE, REASON_FORWARDED},
    node::{NODE_F_XDP_NODEPORT, NodeConfig, ROUTING_NATIVE, ROUTING_TUNNEL, VXLAN_PORT},
    prefilter::{MAX_ENTRIES, PrefilterKey, PrefilterStats},
};
use ciliate_ebpf::{Drop, ct, deliver, dsr, lb, lookup, maps, nat, packet};

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
    let tunnel = node.routing == ROUTING_TUNNEL;
    if (!tunnel && node.routing != ROUTING_NATIVE) || node.node_ip == [0; 4] {
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
    // In tunnel mode the packet goes to the backend's node.
    let next = if tunnel {
        let remote = lookup::ipcache(sel.backend.addr).tunnel_endpoint;
        if remote == [0; 4] {
            return PASS;
        }
        remote
    } else {
        sel.backend.addr
    };
    // The route first: a packet the FIB cannot finish (no neighbour yet)
    // goes to the stack as it came.
    // All-zero is its "unset".
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut bpf_fib_lookup = ciliate_ebpf::zeroed(&mut slot);
    p.family = 2; // AF_INET
    p.l4_protocol = t.key.proto;
    p.sport = t.key.sport;
    p.dport = sel.backend.port;
    p.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    // SAFETY: the context of an XDP program.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    p.ifindex = ingress;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(node.node_ip);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(next);
    // SAFETY: the helper reads and fills `p`, whose size it is given.
    let rc =
        unsafe { fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return PASS;
    }
    let len = (ctx.data_end() - ctx.data()) as u32;
    // The device's MTU (the FIB's answer): a frame wrapped past it would
    // not leave; the stack's path says so to the sender.
    // SAFETY: the union's output member, filled by the helper.
    let mtu = u32::from(unsafe { p.__bindgen_anon_1.mtu_result });
    if tunnel && u32::from(u16::from_be(ip.tot_len)) + VXLAN_OVERHEAD > mtu {
        return PASS;
    }
    if !tunnel && dsr::enabled_for(node.flags, &t) {
        // DSR: the client's address stays; the flow's first packet (every
        // datagram) carries the frontend to the backend's node.
        let (frontend, port) = (t.key.daddr, t.key.dport);
        let option = dsr::needs_option(&t);
        if option && u32::from(u16::from_be(ip.tot_len)) + DSR_OVERHEAD > mtu {
            return PASS;
        }
        lb::dnat(ctx, &mut t, &sel)?;
        if option {
            dsr::add_option(ctx, frontend, port)?;
        }
    } else {
        lb::dnat(ctx, &mut t, &sel)?;
        nat::snat(ctx, &mut t, node.node_ip, svc.rev_nat_index)?;
    }
    if tunnel {
        encap(ctx, &t, node.node_ip, next, &p.smac, &p.dmac)?;
    } else {
        deliver::l3_hop(ctx, &p.smac, &p.dmac)?;
    }
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

/// Outer Ethernet, IPv4, UDP and VXLAN headers.
const VXLAN_HEADERS: usize = 14 + 20 + 8 + 8;
/// What the wrap adds to the IP packet's length on the wire.
const VXLAN_OVERHEAD: u32 = VXLAN_HEADERS as u32;
/// What the DSR option adds.
const DSR_OVERHEAD: u32 = ciliate_common::lb::DSR_OPT_LEN as u32;

/// The headers the wrap puts before the inner frame (Ethernet and IPv4 as
/// the parser reads them).
#[repr(C)]
struct Outer {
    eth: packet::EthHdr,
    ip: packet::Ipv4Hdr,
    sport: u16,
    dport: u16,
    udp_len: u16,
    udp_check: u16,
    /// Flags (0x08: a VNI is present), 3 reserved bytes, the 24-bit VNI,
    /// a reserved byte.
    vxlan: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<Outer>() == VXLAN_HEADERS);

/// Wrap the (translated) frame of `t` in VXLAN from `src` to node `dst`,
/// as the overlay device would: the inner frame whole, UDP from a port
/// chosen by the flow (as the device's, within its range) to 8472 without
/// a checksum, the remote-node identity as the VNI; outer MACs from the
/// FIB.
#[inline(always)]
fn encap(
    ctx: &XdpContext,
    t: &ct::Tuple,
    src: [u8; 4],
    dst: [u8; 4],
    smac: &[u8; 6],
    dmac: &[u8; 6],
) -> Result<(), Drop> {
    let inner = (ctx.data_end() - ctx.data()) as u16;
    // SAFETY: plain helper call on this program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VXLAN_HEADERS as i32)) } != 0 {
        return Err(ciliate_ebpf::drop!(ciliate_common::drop::WRITE_ERROR));
    }
    let o = packet::ptr_at::<Outer>(ctx, 0)
        .ok_or(ciliate_ebpf::drop!(ciliate_common::drop::WRITE_ERROR))?;
    let k = &t.key;
    let h = ciliate_common::lb::flow_hash(k.saddr, k.daddr, k.sport, k.dport, k.proto);
    // The device's source port range: 32768-60999 (the ephemeral ports).
    let sport = 32768 + (h % (61000 - 32768)) as u16;
    let ip_len = inner + (VXLAN_HEADERS - 14) as u16;
    // Zeroed in place, then the fields that are not 0 (a literal's zero
    // runs would become a memset call: `ciliate_ebpf::zeroed`).
    let mut slot = core::mem::MaybeUninit::uninit();
    let out: &mut Outer = ciliate_ebpf::zeroed(&mut slot);
    out.eth = packet::EthHdr { dst: *dmac, src: *smac, proto: packet::ETH_P_IP.to_be() };
    out.ip.vihl = 0x45;
    out.ip.tot_len = ip_len.to_be();
    out.ip.ttl = 64;
    out.ip.proto = ct::IPPROTO_UDP;
    out.ip.saddr = src;
    out.ip.daddr = dst;
    out.sport = sport.to_be();
    out.dport = VXLAN_PORT.to_be();
    out.udp_len = (ip_len - 20).to_be();
    let vni = ciliate_common::identity::REMOTE_NODE.to_be_bytes();
    out.vxlan[0] = 0x08;
    out.vxlan[4] = vni[1];
    out.vxlan[5] = vni[2];
    out.vxlan[6] = vni[3];
    out.ip.check = ipv4_checksum(&out.ip);
    // SAFETY: bounds checked by ptr_at.
    unsafe { core::ptr::write_unaligned(o, core::ptr::read(out)) };
    Ok(())
}

/// The checksum of IPv4 header `ip` (RFC 791).
#[inline(always)]
fn ipv4_checksum(ip: &packet::Ipv4Hdr) -> u16 {
    // SAFETY: the header is 20 bytes: ten 16-bit words.
    unsafe { packet::csum_at::<10>(core::ptr::from_ref(ip).cast()) }
}

ciliate_ebpf::program_object!();
