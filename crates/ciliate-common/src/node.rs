//! The node's runtime configuration for the datapath (`CILIATE_NODE`, an
//! array of one): how it reaches other nodes and whether it masquerades.
//! Unlike the per-endpoint load-time block it can change without reloading
//! programs (a node joining the cluster, the tunnel device recreated).

pub const MAP_NAME: &str = "ciliate_node_config";

/// Other nodes' pods are reached through the VXLAN device (`tunnel_ifindex`).
pub const ROUTING_TUNNEL: u8 = 1;
/// Other nodes' pods are reached through the stack's routes to their pod
/// CIDRs (auto-direct-node-routes).
pub const ROUTING_NATIVE: u8 = 2;

/// Masquerade pod traffic that leaves the cluster (BPF SNAT to `node_ip`
/// on the native devices).
pub const NODE_F_MASQUERADE: u8 = 1 << 0;
/// Datapath debugging for the whole node (`ciliate-agent --bpf-debug`, or
/// `ciliate config Debug=true` at run time): every program's decisions
/// become debug events (`ciliate_common::debug`).
pub const NODE_F_DEBUG: u8 = 1 << 1;
/// NodePort acceleration (`--node-port-acceleration native`): XDP on the
/// native devices translates and forwards NodePort traffic to backends on
/// other nodes (native routing), before the stack.
pub const NODE_F_XDP_NODEPORT: u8 = 1 << 2;
/// NodePort DSR for TCP (`--node-port-mode dsr` or `hybrid`): a flow to a
/// backend on another node keeps the client's address; the frontend
/// travels to the backend's node in an IPv4 option on the SYN
/// ([`crate::lb::DSR_OPT_TYPE`]), and the backend's node sends the replies
/// straight to the client from the frontend. Also what makes a node read
/// that option at all (no other sender can make its pods answer from
/// another address).
pub const NODE_F_DSR: u8 = 1 << 3;
/// NodePort DSR for UDP as well (`--node-port-mode dsr`; `hybrid` SNATs
/// UDP): the option on every datagram.
pub const NODE_F_DSR_UDP: u8 = 1 << 4;

/// Destinations never masqueraded besides the cluster CIDR (LPM of
/// [`NoMasqKey`] → 1): `--non-masquerade-cidrs`.
pub const NOMASQ_MAP: &str = "ciliate_ipmasq_v4";
pub const NOMASQ_MAX: u32 = 1024;

/// The LPM data part of a non-masquerade key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoMasqKey {
    pub addr: [u8; 4],
}

/// The VXLAN port (Cilium's, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// The overlay device.
pub const TUNNEL_DEV: &str = "ciliate_vxlan";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's address on its native device: the masquerade address
    /// and the underlay source of tunnel packets.
    pub node_ip: [u8; 4],
    /// Never masqueraded (the cluster's pod CIDR pool).
    pub cluster_cidr: [u8; 4],
    pub cluster_cidr_len: u8,
    /// `ROUTING_*`; 0 before the agent configured it (no tunnel).
    pub routing: u8,
    /// `NODE_F_*`.
    pub flags: u8,
    pub _pad: u8,
    pub tunnel_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);

impl NodeConfig {
    /// A node at `node_ip` of the cluster CIDR `cluster` (prefix, length),
    /// with `routing` (`ROUTING_*`), `flags` (`NODE_F_*`) and the overlay
    /// device `tunnel_ifindex` (0: none).
    pub const fn new(
        node_ip: [u8; 4],
        cluster: ([u8; 4], u8),
        routing: u8,
        flags: u8,
        tunnel_ifindex: u32,
    ) -> Self {
        Self {
            node_ip,
            cluster_cidr: cluster.0,
            cluster_cidr_len: cluster.1,
            routing,
            flags,
            _pad: 0,
            tunnel_ifindex,
        }
    }

    /// Is `ip` inside the cluster CIDR?
    pub const fn in_cluster(&self, ip: [u8; 4]) -> bool {
        let len = self.cluster_cidr_len as u32;
        if len == 0 {
            return false;
        }
        let mask = if len >= 32 { u32::MAX } else { !(u32::MAX >> len) };
        (u32::from_be_bytes(ip) & mask) == (u32::from_be_bytes(self.cluster_cidr) & mask)
    }
}
