//! Per-packet load balancing (layout and conventions: `ciliate_common::lb`):
//! find the frontend a packet is addressed to, choose its backend (the
//! flow's pinned one, the client's affine one, or a new one at random or
//! through Maglev), and rewrite addresses and ports with their checksums:
//! DNAT on the way to the backend, reverse NAT on the reply, SNAT to the
//! hairpin loopback.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_get_prandom_u32,
    maps::lpm_trie::Key,
};
use ciliate_common::{
    drop::{NO_SERVICE, NOT_IN_SRC_RANGE, WRITE_ERROR},
    lb::{
        AffinityKey, AffinityValue, BACKEND_ACTIVE, LbBackend, LbKey, LbService, MAGLEV_CHUNK,
        MAGLEV_DEFAULT_SIZE, MaglevKey, SRC_RANGE_STATIC_PREFIX, SVC_F_AFFINITY, SVC_F_MAGLEV,
        SVC_F_SRC_RANGES, SrcRangeKey, flow_hash,
    },
};

use crate::{
    Drop,
    ct::{self, IPPROTO_TCP, IPPROTO_UDP, Tuple},
    drop,
    maps::{
        CILIATE_LB4_AFFINITY, CILIATE_LB4_BACKENDS, CILIATE_LB4_MAGLEV, CILIATE_LB4_REVNAT,
        CILIATE_LB4_SERVICES, CILIATE_LB4_SRC_RANGE,
    },
    packet::{ETH_HLEN, Pkt},
};

/// The master entry of the frontend `addr:port/proto` (TCP and UDP only).
#[inline(always)]
pub fn frontend_of(addr: [u8; 4], port: u16, proto: u8) -> Option<LbService> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let key = LbKey { addr, dport: port, slot: 0, proto, _pad: 0, _pad2: 0 };
    // SAFETY: copied out at once.
    unsafe { CILIATE_LB4_SERVICES.get(key).copied() }
}

/// The frontend the packet with tuple `t` is addressed to, if any.
#[inline(always)]
pub fn frontend(t: &Tuple) -> Option<LbService> {
    frontend_of(t.key.daddr, t.key.dport, t.key.proto)
}

/// The backend chosen for a flow.
#[derive(Clone, Copy)]
pub struct Selected {
    pub backend: LbBackend,
}

#[inline(always)]
pub fn backend(id: u32) -> Option<LbBackend> {
    // SAFETY: copied out at once.
    unsafe { CILIATE_LB4_BACKENDS.get(id).copied() }
}

/// A backend for a new flow of `svc`: through the frontend's Maglev table
/// (hash of the 5-tuple) or a random slot. 0 when there is none.
#[inline(always)]
pub fn choose(svc: &LbService, t: &Tuple, key: &LbKey) -> u32 {
    if svc.count == 0 {
        return 0;
    }
    if svc.flags & SVC_F_MAGLEV != 0 {
        let k = &t.key;
        let h = flow_hash(k.saddr, k.daddr, k.sport, k.dport, k.proto);
        return maglev_backend(svc.rev_nat_index, u64::from(h));
    }
    random_slot(svc, key)
}

/// The backend in a random slot of frontend `key` (slot 0: `svc`, with at
/// least one slot); 0 when the slot is gone.
#[inline(always)]
pub fn random_slot(svc: &LbService, key: &LbKey) -> u32 {
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % u32::from(svc.count)) as u16 + 1;
    let key = LbKey { slot, ..*key };
    // SAFETY: copied out at once.
    unsafe { CILIATE_LB4_SERVICES.get(key).map(|s| s.backend_id).unwrap_or(0) }
}

/// The node's Maglev table size (`ciliate_common::lb`), set by the loader.
#[unsafe(no_mangle)]
static CILIATE_MAGLEV_SIZE: u32 = MAGLEV_DEFAULT_SIZE;

/// Entry `hash % M` of frontend `rev_nat_index`'s Maglev table (M: the
/// node's table size); 0 without a table.
#[inline(always)]
pub fn maglev_backend(rev_nat_index: u16, hash: u64) -> u32 {
    // SAFETY: a plain read of a global the loader initialised.
    let m = unsafe { core::ptr::read_volatile(&CILIATE_MAGLEV_SIZE) };
    if m == 0 {
        return 0;
    }
    let idx = (hash % u64::from(m)) as usize;
    let key = MaglevKey { rev_nat_index, chunk: (idx / MAGLEV_CHUNK) as u16 };
    let Some(chunk) = CILIATE_LB4_MAGLEV.get_ptr(key) else { return 0 };
    // SAFETY: a map value of MAGLEV_CHUNK entries; the mask keeps the
    // index below it (a power of two).
    unsafe { (*chunk)[idx & (MAGLEV_CHUNK - 1)] }
}

/// Is `client` allowed by the frontend's loadBalancerSourceRanges?
#[inline(always)]
fn in_source_ranges(svc: &LbService, client: [u8; 4]) -> bool {
    let key = Key::new(
        SRC_RANGE_STATIC_PREFIX + 32,
        SrcRangeKey { rev_nat_index: svc.rev_nat_index, _pad: 0, addr: client },
    );
    CILIATE_LB4_SRC_RANGE.get(&key).is_some()
}

/// The backend of the flow `t` to frontend `svc`: the one conntrack pinned
/// it to while that backend exists (terminating backends keep their
/// flows), else the client's affine backend when it is still active, else
/// a new choice. The choice is pinned (and remembered for affinity).
/// `NO_SERVICE` when the frontend has no backend for a new flow;
/// `NOT_IN_SRC_RANGE` for a client outside the source ranges.
// Nested `if`s on purpose: the let-chain clippy suggests compiles to code
// whose verification costs from-container ~80k more instructions.
#[allow(clippy::collapsible_if)]
#[inline(always)]
pub fn select(t: &Tuple, svc: &LbService) -> Result<Selected, Drop> {
    if svc.flags & SVC_F_SRC_RANGES != 0 && !in_source_ranges(svc, t.key.saddr) {
        return Err(drop!(NOT_IN_SRC_RANGE));
    }
    if let Some(id) = ct::service_backend(t) {
        if let Some(b) = backend(id) {
            return Ok(Selected { backend: b });
        }
    }
    let key = LbKey {
        addr: t.key.daddr,
        dport: t.key.dport,
        slot: 0,
        proto: t.key.proto,
        _pad: 0,
        _pad2: 0,
    };
    let now = crate::ct::now_secs();
    let aff_key = AffinityKey { client: t.key.saddr, rev_nat_index: svc.rev_nat_index, _pad: 0 };
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let mut id = 0;
    if affinity {
        // SAFETY: copied out at once.
        if let Some(a) = unsafe { CILIATE_LB4_AFFINITY.get(aff_key).copied() } {
            if now.wrapping_sub(a.last_used) <= svc.affinity_timeout
                && backend(a.backend_id).is_some_and(|b| b.state == BACKEND_ACTIVE)
            {
                id = a.backend_id;
            }
        }
    }
    if id == 0 {
        id = choose(svc, t, &key);
    }
    let b = backend(id).ok_or(drop!(NO_SERVICE))?;
    ct::service_pin(t, id, svc.rev_nat_index)?;
    if affinity {
        let v = AffinityValue { backend_id: id, last_used: now };
        // A full map only loses the affinity of this client.
        let _ = CILIATE_LB4_AFFINITY.insert(aff_key, v, 0);
    }
    Ok(Selected { backend: b })
}

/// Where an address or port sits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Where the L4 checksum of `t`'s packet is, and the flags its update
/// needs; `None` without one (ICMP; a later fragment: the first one's
/// checksum covers the datagram and took the change).
#[inline(always)]
fn l4_csum(ctx: &impl Pkt, t: &Tuple) -> Option<(usize, u64)> {
    if ct::later_fragment(ctx) {
        return None;
    }
    match t.key.proto {
        IPPROTO_TCP => Some((t.l4_off as usize + 16, 0)),
        IPPROTO_UDP => Some((t.l4_off as usize + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    }
}

/// Rewrite the source or destination address of the packet (and `t`),
/// with the IP and pseudo-header checksums.
#[inline(always)]
pub fn set_addr(ctx: &impl Pkt, t: &mut Tuple, side: Side, new: [u8; 4]) -> Result<(), Drop> {
    let (old, off) = match side {
        Side::Src => (t.key.saddr, ETH_HLEN + 12),
        Side::Dst => (t.key.daddr, ETH_HLEN + 16),
    };
    if old == new {
        return Ok(());
    }
    let (from, to) = (u64::from(u32::from_ne_bytes(old)), u64::from(u32::from_ne_bytes(new)));
    if let Some((csum, extra)) = l4_csum(ctx, t) {
        ctx.l4_csum_replace(csum, from, to, u64::from(BPF_F_PSEUDO_HDR) | extra | 4)
            .map_err(|_| drop!(WRITE_ERROR))?;
    }
    ctx.l3_csum_replace(ETH_HLEN + 10, from, to, 4).map_err(|_| drop!(WRITE_ERROR))?;
    ctx.store(off, &new).map_err(|_| drop!(WRITE_ERROR))?;
    match side {
        Side::Src => t.key.saddr = new,
        Side::Dst => t.key.daddr = new,
    }
    Ok(())
}

/// Rewrite the source or destination port (network order) of a TCP or UDP
/// packet (and `t`), with the L4 checksum. A later fragment has no ports
/// to rewrite: only `t` changes (its first fragment's were rewritten).
#[inline(always)]
pub fn set_port(ctx: &impl Pkt, t: &mut Tuple, side: Side, new: u16) -> Result<(), Drop> {
    let (old, off) = match side {
        Side::Src => (t.key.sport, t.l4_off as usize),
        Side::Dst => (t.key.dport, t.l4_off as usize + 2),
    };
    if old == new {
        return Ok(());
    }
    match l4_csum(ctx, t) {
        Some((csum, extra)) => {
            ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), extra | 2)
                .map_err(|_| drop!(WRITE_ERROR))?;
            ctx.store(off, &new).map_err(|_| drop!(WRITE_ERROR))?;
        }
        // ICMP: no ports.
        None if t.key.proto != IPPROTO_TCP && t.key.proto != IPPROTO_UDP => return Ok(()),
        // A later fragment: nothing in the packet to rewrite.
        None => {}
    }
    match side {
        Side::Src => t.key.sport = new,
        Side::Dst => {
            t.key.dport = new;
            t.policy_port = new;
        }
    }
    Ok(())
}

/// DNAT the packet to the selected backend.
#[inline(always)]
pub fn dnat(ctx: &impl Pkt, t: &mut Tuple, sel: &Selected) -> Result<(), Drop> {
    set_addr(ctx, t, Side::Dst, sel.backend.addr)?;
    set_port(ctx, t, Side::Dst, sel.backend.port)
}

/// Translate a reply of frontend `rev_nat_index` back: its source becomes
/// the frontend. A hairpin reply (destination `HAIRPIN_LOOPBACK`) goes back
/// to its own sender, the client. `NO_SERVICE` if the index is unknown.
#[inline(always)]
pub fn rev_nat(ctx: &impl Pkt, t: &mut Tuple, rev_nat_index: u16) -> Result<(), Drop> {
    // SAFETY: copied out at once.
    let fe = unsafe { CILIATE_LB4_REVNAT.get(rev_nat_index).copied() };
    let fe = fe.ok_or(drop!(NO_SERVICE))?;
    if t.key.daddr == ciliate_common::lb::HAIRPIN_LOOPBACK {
        let me = t.key.saddr;
        set_addr(ctx, t, Side::Dst, me)?;
    }
    set_addr(ctx, t, Side::Src, fe.addr)?;
    set_port(ctx, t, Side::Src, fe.port)
}
