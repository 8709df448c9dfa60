//! Configuration of the programs.
//!
//! Cilium compiles each endpoint's program with its addresses as constants.
//! Ciliate loads and verifies from-container once per node: each
//! endpoint's configuration is an entry of [`ENDPOINT_CONFIG_MAP`], keyed by
//! the ifindex of its host-side device (the device the program runs on),
//! written before the program is attached there. The node programs take
//! their [`HostConfig`] as a global set before load.

/// `ciliate_ep_config`: ifindex of an endpoint's host-side device →
/// [`EndpointConfig`].
pub const ENDPOINT_CONFIG_MAP: &str = "ciliate_ep_config";
/// Endpoints a node configures at most.
pub const ENDPOINT_CONFIG_MAX: u32 = 65536;

/// Identity of the endpoint a from-container program is attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Index of the host-side (`lxc…`) device.
    pub ifindex: u32,
    /// Security identity of the endpoint.
    pub identity: u32,
    /// The endpoint's IPv4 address, network byte order.
    pub ipv4: [u8; 4],
    /// 16-bit endpoint ID.
    pub endpoint_id: u16,
    /// MAC of the host-side device: the gateway MAC this pod sees.
    pub lxc_mac: [u8; 6],
    /// `ENDPOINT_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointConfig>() == 24);

/// Set on a config that was filled in by user space. A program that finds
/// none (or one without it) for its device drops with `NO_CONFIG`.
pub const ENDPOINT_F_CONFIGURED: u32 = 1 << 0;
/// Monitor aggregation "none": a trace event for every forwarded packet.
/// Without it ("medium", Cilium's default) only new connections, first
/// replies and TCP SYN/FIN/RST not seen before in a direction are traced;
/// every packet is still counted in the metrics map. Used by both the
/// endpoint and the host configuration.
pub const ENDPOINT_F_TRACE_ALL: u32 = 1 << 1;
/// Datapath debugging for this endpoint (`ciliate endpoint config ID
/// Debug=true`): its packets' decisions become debug events and capture
/// events (`ciliate_common::debug`). The node's `NODE_F_DEBUG` turns it on
/// for every endpoint.
pub const ENDPOINT_F_DEBUG: u32 = 1 << 2;

/// Name of the global in the host object that holds a [`HostConfig`].
pub const HOST_CONFIG_SYMBOL: &str = "HOST_CONFIG";

/// Configuration of the programs on `ciliate_host`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Index of `ciliate_host`.
    pub ifindex: u32,
    /// The router IP (first address of the node's pod CIDR), network order.
    pub router_ip: [u8; 4],
    /// MAC of `ciliate_host`.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// `ENDPOINT_F_CONFIGURED` once user space filled it in.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<HostConfig>() == 20);
