//! Local delivery: the ingress stage of a destination endpoint on this node
//! (conntrack in its view and its ingress policy), then the L3 hop (MACs of
//! the destination's veth, TTL - 1) and the redirect.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use ciliate_common::{
    ct::{CT_REPLY, DIR_INGRESS},
    drop::{INVALID, UNROUTABLE},
    endpoint::EndpointInfo,
    metrics::DIR_INGRESS as METRIC_INGRESS,
    policy::DIR_INGRESS as POLICY_INGRESS,
    trace::TO_LXC,
};

use crate::{
    Drop, ct,
    debug::{Dbg, addr},
    drop, lb,
    packet::{ETH_HLEN, EthHdr, Ipv4Hdr, ptr_at},
    policy,
    trace::{TraceCtx, trace_or_count},
};

/// How the packet reaches the destination's device.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// From a tc ingress hook: straight into the pod's namespace
    /// (`bpf_redirect_peer` to the peer of the destination's lxc device).
    Peer,
    /// From a tc egress hook: out of the destination's lxc device.
    Egress,
}

/// Deliver the IPv4 packet in `ctx` (tuple `t`, sent by `src_identity`) to
/// local endpoint `ep`. The caller has checked its TTL ([`check_ttl`]).
/// `rev_nat` is the reverse-NAT index of a flow the caller translated
/// (NodePort: the backend's replies are translated back on their way out);
/// a reply that finds one in the endpoint's view is translated here.
#[allow(clippy::too_many_arguments, reason = "one call per hook, all by name")]
#[inline(always)]
pub fn to_endpoint<const D: bool>(
    ctx: &TcContext,
    ep: &EndpointInfo,
    src_identity: u32,
    t: &mut ct::Tuple,
    via: Via,
    trace_all: bool,
    rev_nat: u16,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    use ciliate_common::debug as dbgs;
    dbg.msg(ctx, dbgs::DBG_LOCAL_DELIVERY, u32::from(ep.endpoint_id), src_identity, 0);
    // From here on the destination's ingress stage: its events are the
    // destination endpoint's (as Cilium's to-container), so `monitor
    // --related-to` finds them by either endpoint.
    let dbg = &Dbg::<D> { source: ep.endpoint_id };
    // Whatever drops it here drops it at the destination, on ingress.
    let at_dst = |d: Drop| {
        d.with_identities(src_identity, ep.identity).at_endpoint(ep.endpoint_id, METRIC_INGRESS)
    };
    let tracked = policy::track_and_enforce(
        ctx,
        t,
        DIR_INGRESS,
        POLICY_INGRESS,
        ep.endpoint_id,
        ep.identity,
        src_identity,
        rev_nat,
        dbg,
    )
    .map_err(at_dst)?;
    if tracked.state == CT_REPLY && tracked.rev_nat_index != 0 {
        dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT_LOOKUP, u32::from(tracked.rev_nat_index), 0, 0);
        lb::rev_nat(ctx, t, tracked.rev_nat_index).map_err(at_dst)?;
        let port = u32::from(u16::from_be(t.key.sport));
        dbg.msg(ctx, dbgs::DBG_LB4_REVERSE_NAT, addr(t.key.saddr), port, 0);
    }
    l3_hop(ctx, &ep.node_mac, &ep.mac).map_err(at_dst)?;
    let who = TraceCtx {
        src_identity,
        dst_identity: ep.identity,
        dst_id: ep.endpoint_id,
        source: ep.endpoint_id,
        ct_state: tracked.state,
        dir: METRIC_INGRESS,
        tunnel: [0; 4],
    };
    trace_or_count(ctx, TO_LXC, &who, ep.ifindex, tracked.report, trace_all);
    dbg.capture(ctx, dbgs::CAPTURE_DELIVERY, ep.ifindex, 0);
    // SAFETY: plain helper calls; the result is the tc verdict.
    Ok(unsafe {
        match via {
            Via::Peer => bpf_redirect_peer(ep.ifindex, 0),
            Via::Egress => bpf_redirect(ep.ifindex, 0),
        }
    } as i32)
}

/// Send the IPv4 packet with tuple `t`, which arrived on `ifindex`, out of
/// the device the node's FIB routes it to, as the stack would (MACs from
/// the neighbour table, TTL - 1) but without entering the stack: a reply
/// translated back to a node address (NodePort) would be a martian there.
/// The caller checked the TTL. Without a route: `UNROUTABLE`.
#[inline(always)]
pub fn fib_redirect<const D: bool>(
    ctx: &TcContext,
    t: &ct::Tuple,
    ifindex: u32,
    dbg: &Dbg<D>,
) -> Result<i32, Drop> {
    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
        helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    };
    // All-zero is its "unset".
    let mut slot = core::mem::MaybeUninit::uninit();
    let p: &mut bpf_fib_lookup = crate::zeroed(&mut slot);
    p.family = 2; // AF_INET
    p.l4_protocol = t.key.proto;
    p.sport = t.key.sport;
    p.dport = t.key.dport;
    p.__bindgen_anon_1.tot_len = (ctx.len() as u16).saturating_sub(ETH_HLEN as u16);
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(t.key.saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(t.key.daddr);
    // SAFETY: the helper reads and fills `p`, whose size it is given.
    let rc =
        unsafe { fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    let out = p.ifindex;
    dbg.msg(ctx, ciliate_common::debug::DBG_FIB_LOOKUP, rc as u32, out, 0);
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        l3_hop(ctx, &p.smac, &p.dmac)?;
        // SAFETY: plain helper call; the result is the tc verdict.
        return Ok(unsafe { bpf_redirect(out, 0) } as i32);
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        l3_hop(ctx, &p.smac, &p.dmac)?;
        // SAFETY: as above; the kernel resolves the neighbour.
        return Ok(unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Err(drop!(UNROUTABLE))
}

/// A packet we would forward with a TTL reaching 0 is dropped as `INVALID`
/// (as Cilium; no ICMP time-exceeded is sent). Callers of [`to_endpoint`]
/// check it with the header they parsed, before conntrack, so such a packet
/// leaves no connection behind.
#[inline(always)]
pub fn check_ttl(ttl: u8) -> Result<(), Drop> {
    if ttl <= 1 {
        return Err(drop!(INVALID));
    }
    Ok(())
}

/// Rewrite the MACs and decrement the TTL (with an incremental header
/// checksum update, RFC 1624), on a packet whose TTL was checked.
#[inline(always)]
pub fn l3_hop(
    ctx: &impl crate::packet::Pkt,
    src_mac: &[u8; 6],
    dst_mac: &[u8; 6],
) -> Result<(), Drop> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(drop!(INVALID))?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(drop!(INVALID))?;
    // SAFETY: bounds checked by ptr_at.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    eth.src = *src_mac;
    eth.dst = *dst_mac;
    let old = (u16::from(ip.ttl) << 8) | u16::from(ip.proto);
    // Callers checked the TTL (check_ttl): this cannot wrap.
    ip.ttl = ip.ttl.wrapping_sub(1);
    let new = old - 0x0100;
    let mut sum = u32::from(!u16::from_be(ip.check)) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip.check = (!(sum as u16)).to_be();
    Ok(())
}
