//! Masquerading (layout and conventions: `ciliate_common::nat`): SNAT of
//! pod traffic leaving the cluster to the node's address, with a port
//! allocated atomically (the reply-direction entry is inserted only if
//! absent, so two flows never share one), and the reverse translation of
//! the replies.

use ciliate_common::{
    ct::CtKey4,
    drop::{NAT_NO_MAPPING, NAT_UNSUPP_PROTO},
    nat::{DIR_IN, DIR_OUT, NatEntry, PORT_MAX, PORT_MIN, RETRIES},
};

use crate::{
    Drop,
    ct::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Tuple},
    drop,
    lb::{Side, set_addr, set_port},
    maps::CILIATE_SNAT4,
};

/// The reply tuple, as it will arrive, of `t` translated to `addr:port`.
#[inline(always)]
fn reply_key(t: &Tuple, addr: [u8; 4], port: u16) -> CtKey4 {
    let mut k = t.key.reverse(DIR_IN);
    k.daddr = addr;
    if t.key.proto == IPPROTO_ICMP {
        // An echo reply carries the identifier where a request has it.
        k.sport = t.key.dport;
        k.dport = 0;
    } else {
        k.dport = port;
    }
    k
}

/// SNAT the packet `t` to `node_ip`: the flow's existing mapping, or a new
/// one (the original port if free, else candidates from the ephemeral
/// range). `NAT_NO_MAPPING` when every candidate is taken.
#[inline(always)]
pub fn snat(
    ctx: &impl crate::packet::Pkt,
    t: &mut Tuple,
    node_ip: [u8; 4],
    rev_nat: u16,
) -> Result<(), Drop> {
    let proto = t.key.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Err(drop!(NAT_UNSUPP_PROTO));
    }
    let mut out = t.key;
    out.dir = DIR_OUT;
    // SAFETY: copied out at once.
    let port = match unsafe { CILIATE_SNAT4.get(out).copied() } {
        Some(e) => e.port,
        None => allocate(t, node_ip, &out, rev_nat)?,
    };
    set_addr(ctx, t, Side::Src, node_ip)?;
    if proto != IPPROTO_ICMP {
        set_port(ctx, t, Side::Src, port)?;
    }
    Ok(())
}

#[inline(always)]
fn allocate(t: &Tuple, node_ip: [u8; 4], out: &CtKey4, rev_nat: u16) -> Result<u16, Drop> {
    let back = NatEntry {
        addr: t.key.saddr,
        port: t.key.sport,
        rev_nat_index: rev_nat,
        created: crate::ct::now_secs(),
    };
    let range = u32::from(PORT_MAX - PORT_MIN) + 1;
    let h = ciliate_common::lb::flow_hash(
        t.key.saddr,
        t.key.daddr,
        t.key.sport,
        t.key.dport,
        t.key.proto,
    );
    let mut chosen = None;
    let mut port = t.key.sport;
    for i in 0..RETRIES {
        if i > 0 {
            port = (PORT_MIN + ((h.wrapping_add(i.wrapping_mul(7919))) % range) as u16).to_be();
        }
        // BPF_NOEXIST: claim the port only if no flow holds it.
        if CILIATE_SNAT4.insert(reply_key(t, node_ip, port), back, 1).is_ok() {
            chosen = Some(port);
            break;
        }
        if t.key.proto == IPPROTO_ICMP {
            break;
        }
    }
    let port = chosen.ok_or(drop!(NAT_NO_MAPPING))?;
    let there = NatEntry { addr: node_ip, port, rev_nat_index: rev_nat, created: back.created };
    CILIATE_SNAT4.insert(*out, there, 0).map_err(|_| drop!(NAT_NO_MAPPING))?;
    Ok(port)
}

/// Translate a reply of a SNATed flow back to its origin; `None` when `t`
/// is no such reply, else the frontend's reverse-NAT index of a NodePort
/// flow (0 for masquerading), which the caller applies as well.
#[inline(always)]
pub fn rev_snat(ctx: &impl crate::packet::Pkt, t: &mut Tuple) -> Result<Option<u16>, Drop> {
    let mut k = t.key;
    k.dir = DIR_IN;
    // SAFETY: copied out at once.
    let Some(e) = (unsafe { CILIATE_SNAT4.get(k).copied() }) else { return Ok(None) };
    set_addr(ctx, t, Side::Dst, e.addr)?;
    if t.key.proto != IPPROTO_ICMP {
        set_port(ctx, t, Side::Dst, e.port)?;
    }
    Ok(Some(e.rev_nat_index))
}
