//! Reserved security identities: Cilium's numbering.

pub const UNKNOWN: u32 = 0;
pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const INIT: u32 = 5;
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
pub const INGRESS: u32 = 8;
/// First identity allocated for a set of labels in the cluster.
pub const MIN_CLUSTER: u32 = 256;
/// Bit set on identities derived from CIDRs (node-local).
pub const LOCAL_FLAG: u32 = 1 << 24;

/// Is `id` an identity the cluster allocates for a label set (not a
/// reserved one, not a node-local CIDR one)?
pub const fn is_cluster(id: u32) -> bool {
    id >= MIN_CLUSTER && id & LOCAL_FLAG == 0
}

/// The name of a reserved identity (`reserved:host` and so on).
pub fn reserved_name(id: u32) -> Option<&'static str> {
    Some(match id {
        HOST => "host",
        WORLD => "world",
        UNMANAGED => "unmanaged",
        HEALTH => "health",
        INIT => "init",
        REMOTE_NODE => "remote-node",
        KUBE_APISERVER => "kube-apiserver",
        INGRESS => "ingress",
        _ => return None,
    })
}
