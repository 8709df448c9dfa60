//! Policy enforcement: one decision per packet of an endpoint in a
//! direction, read from the node's policy map (layout and reading rules:
//! `ciliate_common::policy`), with the policy verdict event of Cilium.
//!
//! What each conntrack state gets (documented choice for the policy issue):
//! - a new connection: the full decision; denied → dropped, nothing is
//!   created in conntrack; a verdict event either way;
//! - an established connection: only an explicit deny drops it, so a policy
//!   change that merely stops allowing a flow leaves it alone, while a new
//!   deny cuts it;
//! - a reply: allowed (it belongs to a connection policy allowed).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use ciliate_common::{
    drop::{POLICY, POLICY_DENY},
    event::{KIND_POLICY_VERDICT, PolicyVerdictNotify, VERDICT_ALLOWED, VERDICT_DENIED},
    policy::{
        ANY_IDENTITY, DIR_EGRESS, F_DENY, F_MARKER, MATCH_NONE, PREFIX_FULL, PolicyEntry, PolicyKey,
    },
};

use crate::{
    Drop,
    ct::Tuple,
    debug::{Dbg, addr},
    drop,
    drop::{capture, event_header},
    maps::CILIATE_POLICY,
};

/// The outcome of a lookup.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No policy selects the endpoint in this direction.
    NotEnforced,
    Allowed {
        match_type: u8,
    },
    /// No rule allows it (`POLICY`, 133).
    NotAllowed,
    /// A deny rule matched (`POLICY_DENY`, 181).
    Denied {
        match_type: u8,
    },
}

#[inline(always)]
fn get(endpoint_id: u16, dir: u8, identity: u32, t: &Tuple) -> Option<*mut PolicyEntry> {
    let key = Key::new(
        PREFIX_FULL,
        PolicyKey {
            endpoint_id,
            dir,
            _pad0: 0,
            identity,
            proto: t.key.proto,
            _pad1: 0,
            dport: t.policy_port,
        },
    );
    CILIATE_POLICY.get(&key).map(|e| e as *const PolicyEntry as *mut PolicyEntry)
}

/// Count a packet on the entry that decided it. Not atomic: the entry is
/// shared by all CPUs, so concurrent packets can lose an increment (core's
/// 64-bit atomics are not available on the BPF target; an xadd through an
/// intrinsic is the fix).
#[inline(always)]
fn count(e: *mut PolicyEntry, len: u32) {
    // SAFETY: a map value.
    unsafe {
        (*e).packets += 1;
        (*e).bytes += u64::from(len);
    }
}

/// Decide for the packet with tuple `t` of endpoint `endpoint_id` in
/// direction `dir` (`policy::DIR_*`), whose other side is `remote`.
#[inline(always)]
pub fn decide(endpoint_id: u16, dir: u8, remote: u32, t: &Tuple, len: u32) -> Decision {
    let Some(by_identity) = get(endpoint_id, dir, remote, t) else { return Decision::NotEnforced };
    let by_any = get(endpoint_id, dir, ANY_IDENTITY, t);
    let mut allowed: Option<*mut PolicyEntry> = None;
    for e in [Some(by_identity), by_any] {
        let Some(e) = e else { continue };
        // SAFETY: a map value.
        let flags = unsafe { (*e).flags };
        if flags & F_MARKER != 0 {
            continue;
        }
        if flags & F_DENY != 0 {
            count(e, len);
            // SAFETY: a map value.
            return Decision::Denied { match_type: unsafe { (*e).match_type } };
        }
        if allowed.is_none() {
            allowed = Some(e);
        }
    }
    match allowed {
        Some(e) => {
            count(e, len);
            // SAFETY: a map value.
            Decision::Allowed { match_type: unsafe { (*e).match_type } }
        }
        None => Decision::NotAllowed,
    }
}

/// Send a policy verdict event.
#[inline(always)]
pub fn send_verdict(ctx: &TcContext, source: u16, dir: u8, remote: u32, t: &Tuple, d: Decision) {
    let (verdict, match_type) = match d {
        Decision::Allowed { match_type } => (VERDICT_ALLOWED, match_type),
        Decision::Denied { match_type } => (VERDICT_DENIED, match_type),
        Decision::NotAllowed => (VERDICT_DENIED, MATCH_NONE),
        Decision::NotEnforced => return,
    };
    // Zeroed in place, then the fields (see `crate::zeroed`).
    let mut slot = core::mem::MaybeUninit::uninit();
    let ev: &mut PolicyVerdictNotify = crate::zeroed(&mut slot);
    ev.hdr = event_header(ctx, KIND_POLICY_VERDICT, 0, source);
    ev.remote_identity = remote;
    ev.dir = dir;
    ev.proto = t.key.proto;
    ev.dport = t.policy_port;
    ev.verdict = verdict;
    ev.match_type = match_type;
    ev.hdr.len_cap = capture(ctx, &mut ev.data);
    crate::maps::emit(ev);
}

/// The policy stage of a packet: `Ok(())` to go on, or the drop, which
/// names both sides (`local`: the endpoint's identity, `remote`: its
/// peer's). `new` is whether conntrack found no connection for it.
#[allow(clippy::too_many_arguments, reason = "one call per conntrack state, all by name")]
#[inline(always)]
pub fn enforce<const D: bool>(
    ctx: &TcContext,
    endpoint_id: u16,
    dir: u8,
    local: u32,
    remote: u32,
    t: &Tuple,
    new: bool,
    dbg: &Dbg<D>,
) -> Result<(), Drop> {
    let d = decide(endpoint_id, dir, remote, t, ctx.len());
    if new {
        send_verdict(ctx, endpoint_id, dir, remote, t, d);
    }
    let (src, dst) = if dir == DIR_EGRESS { (local, remote) } else { (remote, local) };
    if dbg.on() {
        use ciliate_common::debug as dbgs;
        let (verdict, match_type) = match d {
            Decision::NotEnforced => (dbgs::POLICY_NOT_ENFORCED, 0),
            Decision::Allowed { match_type } => (dbgs::POLICY_ALLOWED, match_type),
            Decision::Denied { match_type } => (dbgs::POLICY_DENIED, match_type),
            Decision::NotAllowed => (dbgs::POLICY_NOT_ALLOWED, MATCH_NONE),
        };
        let a1 = u32::from(endpoint_id) << 16 | u32::from(dir) << 8 | u32::from(t.key.proto);
        let a3 =
            u32::from(u16::from_be(t.policy_port)) << 16 | verdict << 8 | u32::from(match_type);
        dbg.msg(ctx, dbgs::DBG_POLICY_LOOKUP, a1, remote, a3);
        if matches!(d, Decision::Denied { .. }) || matches!(d, Decision::NotAllowed) && new {
            dbg.msg(ctx, dbgs::DBG_POLICY_DENIED, src, dst, 0);
        }
    }
    match d {
        Decision::Denied { .. } => Err(drop!(POLICY_DENY).with_identities(src, dst)),
        Decision::NotAllowed if new => Err(drop!(POLICY).with_identities(src, dst)),
        _ => Ok(()),
    }
}

/// Conntrack and policy for one packet of endpoint `endpoint_id` (whose
/// identity is `local`): look the connection up in `ct_dir` (`ct::DIR_*`),
/// apply the endpoint's policy for `policy_dir` against `remote` by
/// conntrack state (see the module comment), and create the connection of
/// an allowed new packet, opened by the packet's source (`local` for
/// egress, `remote` for ingress), with `rev_nat` as the reverse-NAT index
/// its replies need (0: none).
#[allow(clippy::too_many_arguments, reason = "one call per hook, all by name")]
#[inline(always)]
pub fn track_and_enforce<const D: bool>(
    ctx: &TcContext,
    t: &Tuple,
    ct_dir: u8,
    policy_dir: u8,
    endpoint_id: u16,
    local: u32,
    remote: u32,
    rev_nat: u16,
    dbg: &Dbg<D>,
) -> Result<crate::ct::Tracked, Drop> {
    use ciliate_common::{ct::CT_NEW, debug as dbgs};
    let len = ctx.len();
    if dbg.on() {
        let ports =
            u32::from(u16::from_be(t.key.dport)) << 16 | u32::from(u16::from_be(t.key.sport));
        dbg.msg(ctx, dbgs::DBG_CT_LOOKUP4_1, addr(t.key.saddr), addr(t.key.daddr), ports);
        dbg.msg(ctx, dbgs::DBG_CT_LOOKUP4_2, u32::from(t.key.proto) << 8 | u32::from(ct_dir), 0, 0);
    }
    match crate::ct::lookup(t, ct_dir, len) {
        Some(tracked) => {
            let state = u32::from(tracked.state);
            dbg.msg(ctx, dbgs::DBG_CT_VERDICT, state, u32::from(tracked.rev_nat_index), 0);
            // Decided at this generation already: nothing that could cut
            // it has changed since.
            if tracked.recheck {
                enforce(ctx, endpoint_id, policy_dir, local, remote, t, false, dbg)?;
                crate::ct::stamp_policy(t, ct_dir, tracked.generation);
            }
            Ok(tracked)
        }
        None => {
            dbg.msg(ctx, dbgs::DBG_CT_VERDICT, u32::from(CT_NEW), 0, 0);
            enforce(ctx, endpoint_id, policy_dir, local, remote, t, true, dbg)?;
            let opener = if policy_dir == DIR_EGRESS { local } else { remote };
            let created = crate::ct::create(t, ct_dir, len, opener, rev_nat)?;
            dbg.msg(ctx, dbgs::DBG_CT_CREATED4, u32::from(rev_nat), opener, 0);
            Ok(created)
        }
    }
}
