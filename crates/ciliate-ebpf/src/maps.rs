//! Maps shared by every program of a node. They are pinned by name in the
//! node's bpffs directory, so all objects of a node (and a restarted agent)
//! use the same instances. Layouts: `ciliate_common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use ciliate_common::{
    config::EndpointConfig,
    ct::{CtEntry, CtKey4, MAX_ENTRIES_ANY, MAX_ENTRIES_TCP},
    endpoint::{self, EndpointInfo, EndpointKey},
    frag::{FragKey, FragPorts},
    ipcache::{self, IpcacheEntry, IpcacheKey},
    lb::{
        self, AffinityKey, AffinityValue, LbBackend, LbKey, LbService, MaglevChunk, MaglevKey,
        RevNat, SockRevNatKey, SockRevNatValue, SrcRangeKey,
    },
    metrics::{MAX_ENTRIES, MetricsKey, MetricsValue},
    nat::NatEntry,
    node::NodeConfig,
    policy::{self, PolicyEntry, PolicyKey},
};

/// Packets and bytes per (reason, direction). See `ciliate_common::metrics`.
#[map(name = "ciliate_metrics")]
pub static CILIATE_METRICS: PerCpuHashMap<MetricsKey, MetricsValue> =
    PerCpuHashMap::pinned(MAX_ENTRIES, 0);

/// Drop and trace events. See `ciliate_common::event`.
#[map(name = "ciliate_events")]
pub static CILIATE_EVENTS: RingBuf = RingBuf::pinned(ciliate_common::event::RINGBUF_BYTES, 0);

/// Events the ring had no room for (per CPU, one slot): the agent shows
/// them as lost.
#[map(name = "ciliate_events_lost")]
pub static CILIATE_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Send event `ev` to user space; a full ring counts it as lost.
#[inline(always)]
pub fn emit<T>(ev: &T) {
    if CILIATE_EVENTS.output::<T>(ev, 0).is_err()
        && let Some(n) = CILIATE_EVENTS_LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *n += 1 };
    }
}

/// Local endpoints by IP. See `ciliate_common::endpoint`.
#[map(name = "ciliate_lxc")]
pub static CILIATE_LXC: HashMap<EndpointKey, EndpointInfo> =
    HashMap::pinned(endpoint::MAX_ENTRIES, 0);

/// Prefix → identity. See `ciliate_common::ipcache`.
#[map(name = "ciliate_ipcache")]
pub static CILIATE_IPCACHE: LpmTrie<IpcacheKey, IpcacheEntry> =
    LpmTrie::pinned(ipcache::MAX_ENTRIES, 0);

/// TCP connections. See `ciliate_common::ct`.
#[map(name = "ciliate_ct4_global")]
pub static CILIATE_CT4_TCP: LruHashMap<CtKey4, CtEntry> = LruHashMap::pinned(MAX_ENTRIES_TCP, 0);

/// UDP, ICMP and other connections. See `ciliate_common::ct`.
#[map(name = "ciliate_ct_any4_global")]
pub static CILIATE_CT4_ANY: LruHashMap<CtKey4, CtEntry> = LruHashMap::pinned(MAX_ENTRIES_ANY, 0);

/// The first fragment's ports of IPv4 datagrams in flight. See
/// `ciliate_common::frag`.
#[map(name = "ciliate_ipv4_frag_datagrams")]
pub static CILIATE_IPV4_FRAG: LruHashMap<FragKey, FragPorts> =
    LruHashMap::pinned(ciliate_common::frag::MAX_ENTRIES, 0);

/// Policy of every endpoint of the node. See `ciliate_common::policy`.
#[map(name = "ciliate_policy")]
pub static CILIATE_POLICY: LpmTrie<PolicyKey, PolicyEntry> =
    LpmTrie::pinned(policy::MAX_ENTRIES, 0);

/// The node's policy generation. See `ciliate_common::policy::GEN_MAP`.
#[map(name = "ciliate_policy_gen")]
pub static CILIATE_POLICY_GEN: Array<u32> = Array::pinned(1, 0);

/// The node's policy generation (0 before the agent moved it).
#[inline(always)]
pub fn policy_gen() -> u32 {
    CILIATE_POLICY_GEN.get(0).copied().unwrap_or(0)
}

/// Frontends and their backend slots. See `ciliate_common::lb`.
#[map(name = "ciliate_lb4_services")]
pub static CILIATE_LB4_SERVICES: HashMap<LbKey, LbService> = HashMap::pinned(lb::MAX_SERVICES, 0);

/// Backend ID → address, port, state.
#[map(name = "ciliate_lb4_backends")]
pub static CILIATE_LB4_BACKENDS: HashMap<u32, LbBackend> = HashMap::pinned(lb::MAX_BACKENDS, 0);

/// Reverse-NAT index → frontend.
#[map(name = "ciliate_lb4_reverse_nat")]
pub static CILIATE_LB4_REVNAT: HashMap<u16, RevNat> = HashMap::pinned(lb::MAX_REVNAT, 0);

/// sessionAffinity ClientIP: (client, frontend) → backend.
#[map(name = "ciliate_lb4_affinity")]
pub static CILIATE_LB4_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(lb::MAX_AFFINITY, 0);

/// (Reverse-NAT index, chunk) → a chunk of the frontend's Maglev table
/// (not preallocated: a chunk is 16 KiB and only Maglev frontends have
/// any). The loader sizes it for the node's table size.
#[map(name = "ciliate_lb4_maglev")]
pub static CILIATE_LB4_MAGLEV: HashMap<MaglevKey, MaglevChunk> = HashMap::pinned(
    lb::MAX_MAGLEV * lb::maglev_chunks(lb::MAGLEV_DEFAULT_SIZE),
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// loadBalancerSourceRanges: (frontend, client prefix) → allowed.
#[map(name = "ciliate_lb4_source_range")]
pub static CILIATE_LB4_SRC_RANGE: LpmTrie<SrcRangeKey, u8> = LpmTrie::pinned(lb::MAX_SRC_RANGES, 0);

/// Sockets the socket hooks translated: (cookie, backend) → frontend.
#[map(name = "ciliate_lb4_reverse_sk")]
pub static CILIATE_LB4_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(lb::MAX_SOCK_REVNAT, 0);

/// Each endpoint's configuration by the ifindex of its host-side device.
/// See `ciliate_common::config`.
#[map(name = "ciliate_ep_config")]
pub static CILIATE_EP_CONFIG: HashMap<u32, EndpointConfig> =
    HashMap::pinned(ciliate_common::config::ENDPOINT_CONFIG_MAX, 0);

/// The configuration of the endpoint whose host-side device the packet in
/// `ctx` is on (a copy; `None` when the agent wrote none).
#[inline(always)]
pub fn endpoint_config(ctx: &aya_ebpf::programs::TcContext) -> Option<EndpointConfig> {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a map value, copied out.
    unsafe { CILIATE_EP_CONFIG.get(ifindex).copied() }
}

/// The node's runtime configuration. See `ciliate_common::node`.
#[map(name = "ciliate_node_config")]
pub static CILIATE_NODE: Array<NodeConfig> = Array::pinned(1, 0);

/// Masquerading. See `ciliate_common::nat`.
#[map(name = "ciliate_snat_v4_external")]
pub static CILIATE_SNAT4: LruHashMap<CtKey4, NatEntry> =
    LruHashMap::pinned(ciliate_common::nat::MAX_ENTRIES, 0);

/// Destinations never masqueraded. See `ciliate_common::node`.
#[map(name = "ciliate_ipmasq_v4")]
pub static CILIATE_NOMASQ: LpmTrie<ciliate_common::node::NoMasqKey, u8> =
    LpmTrie::pinned(ciliate_common::node::NOMASQ_MAX, 0);

/// Is `ip` in one of the non-masquerade CIDRs?
#[inline(always)]
pub fn no_masquerade(ip: [u8; 4]) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key::new(32, ciliate_common::node::NoMasqKey { addr: ip });
    CILIATE_NOMASQ.get(&key).is_some()
}

/// The node configuration (all zero before the agent wrote it).
#[inline(always)]
pub fn node_config() -> NodeConfig {
    CILIATE_NODE.get(0).copied().unwrap_or_default()
}

/// Add one packet of `len` bytes to the (reason, dir) counter.
#[inline(always)]
pub fn count(reason: u8, dir: u8, len: u32) {
    let key = MetricsKey::new(reason, dir);
    match CILIATE_METRICS.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: per-CPU value, no other writer on this CPU while we run.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += u64::from(len);
            }
        }
        None => {
            let v = MetricsValue { packets: 1, bytes: u64::from(len) };
            // A full map loses this sample; there is nothing better to do.
            let _ = CILIATE_METRICS.insert(key, v, 0);
        }
    }
}
