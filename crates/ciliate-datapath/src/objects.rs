//! The eBPF objects, embedded at build time. Nothing is ever loaded from a
//! path under `target/`: the bytes travel inside the binary.

/// Programs on the host side of a pod's veth: from-container.
pub static LXC: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc"));

/// Programs on the node's router device `ciliate_host`: from-host.
pub static HOST: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host"));

/// Socket load balancing on cgroup v2: connect4, sendmsg4, recvmsg4,
/// getpeername4.
pub static SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock"));

/// XDP on the native devices: the prefilter.
pub static XDP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp"));

/// Socket-layer acceleration on cgroup v2: sock_ops and sk_msg.
pub static SOCKOPS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockops"));

/// An embedded object and its name (the eBPF crate's bin name).
#[derive(Clone, Copy, Debug)]
pub struct Object {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

/// Every object the eBPF crate builds. The verifier budget test loads each.
pub fn all() -> &'static [Object] {
    static ALL: &[Object] = &[
        Object { name: "lxc", bytes: LXC },
        Object { name: "host", bytes: HOST },
        Object { name: "sock", bytes: SOCK },
        Object { name: "xdp", bytes: XDP },
        Object { name: "sockops", bytes: SOCKOPS },
    ];
    ALL
}

/// The embedded object called `name`.
pub fn by_name(name: &str) -> Option<&'static Object> {
    all().iter().find(|o| o.name == name)
}

/// Program names (the `#[classifier]` function names) in each object.
pub mod programs {
    pub const FROM_CONTAINER: &str = "from_container";
    /// from-container's tail calls, in the order of their index in the
    /// object's `CILIATE_LXC_CALLS`.
    pub const LXC_CALLS: [&str; 2] = ["lxc_to_network", "lxc_to_overlay"];
    pub const LXC_CALLS_MAP: &str = "ciliate_calls";
    /// The debug builds of from-container and its tail calls, in the order
    /// of their index in `ciliate_calls_dbg` (from-container tail-calls the
    /// first while the endpoint debugs).
    pub const LXC_DEBUG: [&str; 3] =
        ["from_container_debug", "lxc_to_network_debug", "lxc_to_overlay_debug"];
    pub const LXC_DEBUG_MAP: &str = "ciliate_calls_dbg";
    pub const FROM_HOST: &str = "from_host";
    pub const FROM_NETDEV: &str = "from_netdev";
    pub const TO_NETDEV: &str = "to_netdev";
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// The host programs' debug builds, in the order of their index in
    /// `ciliate_host_dbg` (each normal build tail-calls its own while the
    /// node debugs).
    pub const HOST_DEBUG: [&str; 4] =
        ["from_host_debug", "from_netdev_debug", "to_netdev_debug", "from_overlay_debug"];
    pub const HOST_DEBUG_MAP: &str = "ciliate_host_dbg";
    /// The socket-LB programs (each knows its cgroup attach type).
    pub const SOCK: [&str; 5] =
        ["sock4_connect", "sock4_sendmsg", "sock4_recvmsg", "sock4_getpeername", "sock4_release"];
    /// The XDP program of the native devices.
    pub const XDP_ENTRY: &str = "xdp_entry";
    /// Socket-layer acceleration: the sock_ops program (on the cgroup) and
    /// the sk_msg program (on the sockhash).
    pub const SOCKOPS: &str = "ciliate_sockops";
    pub const SK_MSG: &str = "sk_msg_redir";
}
