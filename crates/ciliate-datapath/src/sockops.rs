//! Socket-layer acceleration from user space: after a policy change, the
//! connections in the sockhash that the policy in force would not let in
//! any more are taken out (both sockets), so their next send takes the
//! normal path through the veths, where the datapath decides (an explicit
//! deny drops it; see `ciliate_ebpf::policy` for established flows).

use std::{net::Ipv4Addr, path::Path};

use ciliate_common::{
    ct::{self, CtKey4},
    policy::{self, ANY_IDENTITY, F_DENY, F_MARKER, PolicyKey},
    sockops::SockKey,
};

use crate::{
    error::Result,
    maps::{CtMaps, LxcMap, PolicyMap},
    nodemaps::SockOpsMap,
};

const IPPROTO_TCP: u8 = 6;

/// Would the policy map let a new TCP connection of endpoint `endpoint_id`
/// in direction `dir` (`policy::DIR_*`) with identity `remote` on port
/// `dport` (network order) through? The datapath's decision, read from
/// user space: a deny of the identity or of any wins, then an allow, and
/// an endpoint the direction is not enforced for lets everything through.
pub fn policy_allows(
    map: &PolicyMap,
    endpoint_id: u16,
    dir: u8,
    remote: u32,
    dport: u16,
) -> Result<bool> {
    let key = |identity| PolicyKey {
        endpoint_id,
        dir,
        identity,
        proto: IPPROTO_TCP,
        dport,
        ..Default::default()
    };
    let Some(by_identity) = map.matching(&key(remote))? else { return Ok(true) };
    let by_any = map.matching(&key(ANY_IDENTITY))?;
    let mut allowed = false;
    for e in [Some(by_identity), by_any].into_iter().flatten() {
        if e.flags & F_MARKER != 0 {
            continue;
        }
        if e.flags & F_DENY != 0 {
            return Ok(false);
        }
        allowed = true;
    }
    Ok(allowed)
}

/// Would the policy in force let the connection of socket `key` in: its
/// client's egress and its server's ingress? (The client is the side with
/// the egress conntrack entry; a connection conntrack no longer knows is
/// not kept accelerated.)
fn still_allowed(key: &SockKey, lxc: &LxcMap, pol: &PolicyMap, ct: &CtMaps) -> Result<bool> {
    let opened = |k: &SockKey| CtKey4 {
        saddr: k.sip,
        daddr: k.dip,
        sport: k.sport,
        dport: k.dport,
        proto: IPPROTO_TCP,
        dir: ct::DIR_EGRESS,
        _pad: [0; 2],
    };
    let (client, server, dport) = if ct.get(&opened(key))?.is_some() {
        (key.sip, key.dip, key.dport)
    } else if ct.get(&opened(&key.peer()))?.is_some() {
        (key.dip, key.sip, key.sport)
    } else {
        return Ok(false);
    };
    let (Some(c), Some(s)) = (lxc.get(Ipv4Addr::from(client))?, lxc.get(Ipv4Addr::from(server))?)
    else {
        return Ok(false);
    };
    Ok(policy_allows(pol, c.endpoint_id, policy::DIR_EGRESS, s.identity, dport)?
        && policy_allows(pol, s.endpoint_id, policy::DIR_INGRESS, c.identity, dport)?)
}

/// Take out of the node's sockhash (pinned in `dir`) every connection the
/// policy in force would not let in; returns how many. A node without
/// socket-layer acceleration has nothing to do.
pub fn revoke_denied(dir: &Path) -> Result<usize> {
    let Ok(mut socks) = SockOpsMap::from_pin_dir(dir) else { return Ok(0) };
    let keys = socks.keys()?;
    if keys.is_empty() {
        return Ok(0);
    }
    let (lxc, pol, ct) =
        (LxcMap::from_pin_dir(dir)?, PolicyMap::from_pin_dir(dir)?, CtMaps::from_pin_dir(dir)?);
    let mut revoked = std::collections::BTreeSet::new();
    for key in &keys {
        if !revoked.contains(key) && !still_allowed(key, &lxc, &pol, &ct)? {
            socks.remove(key)?;
            socks.remove(&key.peer())?;
            revoked.insert(key.peer());
            revoked.insert(*key);
        }
    }
    Ok(revoked.len() / 2)
}
