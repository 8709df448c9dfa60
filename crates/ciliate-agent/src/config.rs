//! Agent configuration: flags, then environment variables, then an
//! optional JSON file (`--config`), then defaults.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::ipam::Cidr;

/// The Ciliate node agent: IPAM, identities, endpoints and the datapath of
/// one node, with its API on a unix socket for the CLI and the CNI plugin.
#[derive(Parser, Debug, Default)]
#[command(name = "ciliate-agent", version, about)]
pub struct Flags {
    /// Node name [default: the hostname]
    #[arg(long, env = "CILIATE_NODE")]
    pub node: Option<String>,
    /// The node's pod CIDR; the router IP is its first address [default: 10.200.0.0/24]
    #[arg(long, env = "CILIATE_POD_CIDR")]
    pub pod_cidr: Option<String>,
    /// Where IPAM, identities and endpoints are kept [default: /var/lib/ciliate/<node>]
    #[arg(long, env = "CILIATE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The API socket [default: /run/ciliate/<node>/agent.sock]
    #[arg(long, env = "CILIATE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Where bpffs is (mounted there if it is not) [default: /sys/fs/bpf]
    #[arg(long, env = "CILIATE_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Run the health endpoint (identity 4) in namespace <node>-health [default: true]
    #[arg(long, env = "CILIATE_ENABLE_HEALTH", num_args = 1)]
    pub enable_health: Option<bool>,
    /// Trace events: "medium" (new connections, first replies, new TCP
    /// SYN/FIN/RST; Cilium's default) or "none" (every packet) [default: medium]
    #[arg(long, env = "CILIATE_MONITOR_AGGREGATION")]
    pub monitor_aggregation: Option<String>,
    /// Datapath debugging for the whole node from the start: every decision of the
    /// programs becomes a debug event (`ciliate monitor -v`); switch at run time with
    /// `ciliate config Debug=true|false` [default: false]
    #[arg(long, env = "CILIATE_BPF_DEBUG", num_args = 0..=1, default_missing_value = "true")]
    pub bpf_debug: Option<bool>,
    /// Seconds between conntrack garbage collections [default: dynamic: from 30 s, closer
    /// when sweeps delete much or a table is near full, further when they delete little]
    #[arg(long, env = "CILIATE_CT_GC_INTERVAL")]
    pub ct_gc_interval: Option<u64>,
    /// Entries of the TCP conntrack table [default: 524288, or sized by
    /// --bpf-map-dynamic-size-ratio]
    #[arg(long, env = "CILIATE_BPF_CT_GLOBAL_TCP_MAX")]
    pub bpf_ct_global_tcp_max: Option<u32>,
    /// Entries of the non-TCP conntrack table [default: 262144, or sized by
    /// --bpf-map-dynamic-size-ratio]
    #[arg(long, env = "CILIATE_BPF_CT_GLOBAL_ANY_MAX")]
    pub bpf_ct_global_any_max: Option<u32>,
    /// Entries of the masquerading (NAT) table [default: 524288, or sized by
    /// --bpf-map-dynamic-size-ratio]
    #[arg(long, env = "CILIATE_BPF_NAT_GLOBAL_MAX")]
    pub bpf_nat_global_max: Option<u32>,
    /// Policy entries one endpoint may hold [default: 16384]
    #[arg(long, env = "CILIATE_BPF_POLICY_MAP_MAX")]
    pub bpf_policy_map_max: Option<u32>,
    /// Entries of each load-balancer map (services, backends, reverse NAT, affinity)
    /// [default: 65536]
    #[arg(long, env = "CILIATE_BPF_LB_MAP_MAX")]
    pub bpf_lb_map_max: Option<u32>,
    /// Entries of each Maglev lookup table, a prime: 251, 509, 1021, 2039, 4093, 8191,
    /// 16381, 32749, 65521 or 131071 (about 100 x the backends of the largest Maglev
    /// service keeps the spread even) [default: 16381]
    #[arg(long, env = "CILIATE_BPF_LB_MAGLEV_TABLE_SIZE")]
    pub bpf_lb_maglev_table_size: Option<u32>,
    /// Datagrams in flight whose fragments are tracked (first fragment's ports for the
    /// later ones) [default: 8192]
    #[arg(long, env = "CILIATE_BPF_FRAGMENTS_MAP_MAX")]
    pub bpf_fragments_map_max: Option<u32>,
    /// Share of the node's memory (0.0-1.0] that sizes the conntrack and NAT tables not
    /// given explicitly; 0 keeps the defaults [default: 0.0025]
    #[arg(long, env = "CILIATE_BPF_MAP_DYNAMIC_SIZE_RATIO")]
    pub bpf_map_dynamic_size_ratio: Option<f64>,
    /// How often unused identities are looked for (Cilium's duration syntax: 15m, 30s)
    /// [default: 15m]
    #[arg(long, env = "CILIATE_IDENTITY_GC_INTERVAL")]
    pub identity_gc_interval: Option<String>,
    /// How long an identity no endpoint of any live node has stays allocated before it
    /// is released (with its policy entries) [default: 30m]
    #[arg(long, env = "CILIATE_IDENTITY_HEARTBEAT_TIMEOUT")]
    pub identity_heartbeat_timeout: Option<String>,
    /// Native devices (comma-separated): from-netdev serves NodePort and other external
    /// frontends on them, and their addresses are the node's [default: none]
    #[arg(long, env = "CILIATE_DEVICES", value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Socket load balancing on cgroup v2 (connect/sendmsg/recvmsg/getpeername) [default: true]
    #[arg(long, env = "CILIATE_SOCKET_LB", num_args = 1)]
    pub socket_lb: Option<bool>,
    /// The XDP prefilter on --devices: packets from CIDRs of `ciliate prefilter update` are
    /// dropped before the stack sees them (native XDP where the driver has it) [default: false]
    #[arg(long, env = "CILIATE_ENABLE_XDP_PREFILTER", num_args = 0..=1, default_missing_value = "true")]
    pub enable_xdp_prefilter: Option<bool>,
    /// Socket-layer acceleration: TCP between two local pods goes socket to socket
    /// (sockmap), past TCP/IP and the veths, once the datapath let the connection in
    /// [default: false]
    #[arg(long, env = "CILIATE_SOCKOPS_ENABLE", num_args = 0..=1, default_missing_value = "true")]
    pub sockops_enable: Option<bool>,
    /// NodePort acceleration: "native" translates and forwards NodePort traffic to
    /// backends on other nodes at XDP on --devices (wrapped in VXLAN there in tunnel mode),
    /// or "disabled" [default: disabled]
    #[arg(long, env = "CILIATE_NODE_PORT_ACCELERATION")]
    pub node_port_acceleration: Option<String>,
    /// How NodePort traffic reaches a backend on another node: "snat" (through this node
    /// both ways), "dsr" (direct server return: the client's address kept, the backend's
    /// node answers it; native routing only) or "hybrid" (DSR for TCP, SNAT for UDP)
    /// [default: snat]
    #[arg(long, env = "CILIATE_NODE_PORT_MODE")]
    pub node_port_mode: Option<String>,
    /// The cgroup v2 directory socket LB attaches to [default: the cgroup v2 root]
    #[arg(long, env = "CILIATE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Backend selection for new flows: "random" or "maglev" [default: random]
    #[arg(long, env = "CILIATE_LB_ALGORITHM")]
    pub lb_algorithm: Option<String>,
    /// A YAML or JSON list of services (as `ciliate service update` takes them) applied at
    /// start
    #[arg(long, env = "CILIATE_SERVICES")]
    pub services: Option<PathBuf>,
    /// A kubeconfig for the Kubernetes API: pods' labels (and their namespaces')
    /// then come from the API, and a relabel moves the endpoint's identity. Inside a pod
    /// (KUBERNETES_SERVICE_HOST set) the in-cluster configuration is used without it
    /// [default: no Kubernetes]
    #[arg(long, alias = "k8s-kubeconfig", env = "CILIATE_K8S_KUBECONFIG_PATH")]
    pub k8s_kubeconfig_path: Option<PathBuf>,
    /// Where cluster identities, other nodes and their endpoints live: "crd"
    /// (CiliumIdentity, CiliumNode and CiliumEndpoint objects in the Kubernetes API) or
    /// "kvstore" [default: crd with Kubernetes, else kvstore]
    #[arg(long, env = "CILIATE_IDENTITY_ALLOCATION_MODE")]
    pub identity_allocation_mode: Option<String>,
    /// Where the node's pod CIDR comes from when --pod-cidr is not given: "cluster-pool"
    /// (with Kubernetes, the CIDR ciliate-operator writes into this node's CiliumNode; without,
    /// a claim on --cluster-pool in the kvstore) or "kubernetes" (the Node's spec.podCIDRs)
    /// [default: cluster-pool]
    #[arg(long, env = "CILIATE_IPAM")]
    pub ipam: Option<String>,
    /// The cluster's store: "local" (a file, shared by the nodes of one machine) or "etcd"
    /// [default: local]
    #[arg(long, env = "CILIATE_KVSTORE")]
    pub kvstore: Option<String>,
    /// The local store's file [default: <state dir>/kvstore.json]
    #[arg(long, env = "CILIATE_KVSTORE_PATH")]
    pub kvstore_path: Option<PathBuf>,
    /// etcd endpoints, host:port,... (with --kvstore etcd)
    #[arg(long, env = "CILIATE_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// etcd configuration file, as Cilium's (YAML: endpoints, trusted-ca-file,
    /// cert-file, key-file): TLS to etcd (with --kvstore etcd)
    #[arg(long, env = "CILIATE_ETCD_CONFIG")]
    pub etcd_config: Option<PathBuf>,
    /// Cluster-pool IPAM: the cluster's pod CIDR pool; this node claims a CIDR from it when
    /// --pod-cidr is not given [default: none]
    #[arg(long, env = "CILIATE_CLUSTER_POOL")]
    pub cluster_pool: Option<String>,
    /// Prefix length of each node's CIDR from the cluster pool [default: 24]
    #[arg(long, env = "CILIATE_CLUSTER_POOL_MASK")]
    pub cluster_pool_mask: Option<u8>,
    /// How pods of other nodes are reached: "tunnel" (VXLAN) or "native" (routes)
    /// [default: tunnel]
    #[arg(long, env = "CILIATE_ROUTING")]
    pub routing: Option<String>,
    /// Masquerade pod traffic that leaves the cluster (BPF SNAT on --devices) [default: true]
    #[arg(long, env = "CILIATE_MASQUERADE", num_args = 1)]
    pub masquerade: Option<bool>,
    /// The NodePort range, MIN-MAX [default: 30000-32767]
    #[arg(long, env = "CILIATE_NODE_PORT_RANGE")]
    pub node_port_range: Option<String>,
    /// Destinations never masqueraded besides the cluster pool: CIDR,... [default: none]
    #[arg(long, env = "CILIATE_NON_MASQUERADE_CIDRS", value_delimiter = ',')]
    pub non_masquerade_cidrs: Option<Vec<String>>,
    /// Log format: "text" or "json" (one JSON object a line) [default: text]
    #[arg(long, env = "CILIATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Debug logging (every API request, every datapath change)
    #[arg(long, env = "CILIATE_DEBUG")]
    pub debug: bool,
    /// Where Prometheus scrapes the agent's metrics (GET /metrics): [host]:port, or "" for
    /// none [default: :9962]
    #[arg(long, env = "CILIATE_PROMETHEUS_SERVE_ADDR")]
    pub prometheus_serve_addr: Option<String>,
    /// TCP port of the node's health responder (GET /hello), which other nodes probe; 0:
    /// none [default: 4240]
    #[arg(long, env = "CILIATE_CLUSTER_HEALTH_PORT")]
    pub cluster_health_port: Option<u16>,
    /// Run the Hubble-compatible flow observer (gRPC) [default: true]
    #[arg(long, env = "CILIATE_ENABLE_HUBBLE")]
    pub enable_hubble: Option<bool>,
    /// The observer's TCP address, [host]:port, or "" for none [default: :4244]
    #[arg(long, env = "CILIATE_HUBBLE_LISTEN_ADDRESS")]
    pub hubble_listen_address: Option<String>,
    /// The observer's unix socket [default: hubble.sock beside the API socket]
    #[arg(long, env = "CILIATE_HUBBLE_SOCKET_PATH")]
    pub hubble_socket_path: Option<PathBuf>,
    /// Flows the observer keeps [default: 4095]
    #[arg(long, env = "CILIATE_HUBBLE_EVENT_BUFFER_CAPACITY")]
    pub hubble_event_buffer_capacity: Option<usize>,
    /// Hubble's flow metrics on the Prometheus endpoint: drop, tcp, flow, port-distribution,
    /// policy (comma-separated) [default: none; hubble_lost_events_total always]
    #[arg(long, env = "CILIATE_HUBBLE_METRICS")]
    pub hubble_metrics: Option<String>,
    /// Write every flow as a JSON line to this file (rotated by size); GetFlows reads it
    /// back for a --since older than the ring [default: none]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_FILE_PATH")]
    pub hubble_export_file_path: Option<PathBuf>,
    /// Rotate the export file at this size [default: 10]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_FILE_MAX_SIZE_MB")]
    pub hubble_export_file_max_size_mb: Option<u64>,
    /// Rotated export files kept [default: 5]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_FILE_MAX_BACKUPS")]
    pub hubble_export_file_max_backups: Option<usize>,
    /// Export only flows that pass one of these JSON flow filters:
    /// '{"verdict":["DROPPED"]},{"source_pod":["kube-system/"]}' [default: all]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_ALLOWLIST")]
    pub hubble_export_allowlist: Option<String>,
    /// Do not export flows that pass one of these JSON flow filters [default: none]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_DENYLIST")]
    pub hubble_export_denylist: Option<String>,
    /// Export only these flow fields: time,verdict,source.pod_name,... [default: all]
    #[arg(long, env = "CILIATE_HUBBLE_EXPORT_FIELDMASK")]
    pub hubble_export_fieldmask: Option<String>,
    /// A JSON file with any of: node, pod_cidr, state_dir, socket, bpffs, enable_health,
    /// ct_gc_interval, identity_gc_interval, identity_heartbeat_timeout, bpf_ct_global_tcp_max,
    /// bpf_ct_global_any_max, bpf_nat_global_max, bpf_policy_map_max, bpf_lb_map_max,
    /// bpf_lb_maglev_table_size, bpf_fragments_map_max, bpf_map_dynamic_size_ratio, monitor_aggregation, bpf_debug, devices, socket_lb, enable_xdp_prefilter, sockops_enable, node_port_acceleration, node_port_mode, cgroup_root, lb_algorithm,
    /// services, k8s_kubeconfig_path, identity_allocation_mode, ipam, kvstore, kvstore_path, etcd_endpoints, etcd_config, cluster_pool, cluster_pool_mask,
    /// routing, masquerade, non_masquerade_cidrs, node_port_range, log_format,
    /// prometheus_serve_addr, cluster_health_port, enable_hubble, hubble_listen_address,
    /// hubble_socket_path, hubble_event_buffer_capacity, hubble_metrics,
    /// hubble_export_file_path, hubble_export_file_max_size_mb,
    /// hubble_export_file_max_backups, hubble_export_allowlist, hubble_export_denylist,
    /// hubble_export_fieldmask
    #[arg(long, env = "CILIATE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Map capacities (Cilium's options and defaults). Tables not given
/// explicitly are sized by a share of the node's memory when
/// `--bpf-map-dynamic-size-ratio` is above 0: half of it to the TCP
/// conntrack table, the other tables in proportion (non-TCP half of TCP,
/// NAT two thirds of both), within Cilium's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub ct_tcp: u32,
    pub ct_any: u32,
    pub nat: u32,
    /// Per endpoint; the shared policy map holds this many for every
    /// address of the node's pod CIDR.
    pub policy_per_endpoint: u32,
    pub policy_total: u32,
    pub lb: u32,
    pub fragments: u32,
    /// Entries of a Maglev table (a prime of `lb::MAGLEV_SIZES`).
    pub maglev_size: u32,
}

/// Cilium's defaults and bounds.
pub const CT_TCP_DEFAULT: u32 = 524_288;
pub const CT_ANY_DEFAULT: u32 = 262_144;
pub const NAT_DEFAULT: u32 = 524_288;
pub const POLICY_DEFAULT: u32 = 16_384;
pub const LB_DEFAULT: u32 = 65_536;
pub const FRAGMENTS_DEFAULT: u32 = ciliate_common::frag::MAX_ENTRIES;
const FRAGMENTS_MIN: u32 = 256;
pub const DYNAMIC_RATIO_DEFAULT: f64 = 0.0025;
const TABLE_MIN: u32 = 1 << 12;
const TABLE_MAX: u32 = 1 << 24;
const CT_TCP_AUTO_MIN: u32 = 131_072;
const CT_ANY_AUTO_MIN: u32 = 65_536;
const NAT_AUTO_MIN: u32 = 131_072;

impl Capacities {
    /// Explicit values (TCP, non-TCP, NAT, policy per endpoint, LB,
    /// fragments, Maglev table size), the dynamic ratio, the node's memory
    /// (bytes) and its pod CIDR's length.
    pub fn resolve(
        given: [Option<u32>; 7],
        ratio: Option<f64>,
        memory: u64,
        pod_cidr_len: u8,
    ) -> anyhow::Result<Self> {
        let [tcp, any, nat, policy, lb, fragments, maglev] = given;
        let maglev_size = maglev.unwrap_or(ciliate_common::lb::MAGLEV_DEFAULT_SIZE);
        if !ciliate_common::lb::MAGLEV_SIZES.contains(&maglev_size) {
            anyhow::bail!(
                "bpf_lb_maglev_table_size {maglev_size}: one of the primes {:?}",
                ciliate_common::lb::MAGLEV_SIZES
            );
        }
        let names = [
            ("bpf_ct_global_tcp_max", TABLE_MIN),
            ("bpf_ct_global_any_max", TABLE_MIN),
            ("bpf_nat_global_max", TABLE_MIN),
            ("bpf_policy_map_max", TABLE_MIN),
            ("bpf_lb_map_max", TABLE_MIN),
            ("bpf_fragments_map_max", FRAGMENTS_MIN),
        ];
        for ((name, min), v) in names.iter().zip(given) {
            if let Some(v) = v
                && !(*min..=TABLE_MAX).contains(&v)
            {
                anyhow::bail!("{name} {v}: from {min} to {TABLE_MAX}");
            }
        }
        let ratio = ratio.unwrap_or(DYNAMIC_RATIO_DEFAULT);
        if !(0.0..=1.0).contains(&ratio) {
            anyhow::bail!("bpf_map_dynamic_size_ratio {ratio}: from 0 (off) to 1");
        }
        let (auto_tcp, auto_any, auto_nat) = if ratio > 0.0 {
            // One conntrack entry: a 16-byte key and a 56-byte value.
            let share = ratio * memory as f64 / 2.0 / 72.0;
            let bound =
                |v: f64, min: u32| (v as u64).clamp(u64::from(min), u64::from(TABLE_MAX)) as u32;
            let t = bound(share, CT_TCP_AUTO_MIN);
            let a = bound(share / 2.0, CT_ANY_AUTO_MIN);
            (t, a, bound(f64::from(t + a) * 2.0 / 3.0, NAT_AUTO_MIN))
        } else {
            (CT_TCP_DEFAULT, CT_ANY_DEFAULT, NAT_DEFAULT)
        };
        let policy_per_endpoint = policy.unwrap_or(POLICY_DEFAULT);
        let addresses = 1u64 << (32 - u32::from(pod_cidr_len.min(32)));
        let policy_total =
            (u64::from(policy_per_endpoint) * addresses.max(2)).min(u64::from(TABLE_MAX));
        Ok(Self {
            ct_tcp: tcp.unwrap_or(auto_tcp),
            ct_any: any.unwrap_or(auto_any),
            nat: nat.unwrap_or(auto_nat),
            policy_per_endpoint,
            policy_total: policy_total as u32,
            lb: lb.unwrap_or(LB_DEFAULT),
            fragments: fragments.unwrap_or(FRAGMENTS_DEFAULT),
            maglev_size,
        })
    }

    /// Map name → capacity, as the loader applies them.
    pub fn by_map(&self) -> std::collections::BTreeMap<String, u32> {
        use ciliate_common::{ct, frag, lb, nat, policy};
        [
            (ct::TCP_MAP_NAME, self.ct_tcp),
            (ct::ANY_MAP_NAME, self.ct_any),
            (nat::MAP_NAME, self.nat),
            (policy::MAP_NAME, self.policy_total),
            (lb::SERVICES_MAP, self.lb),
            (lb::BACKENDS_MAP, self.lb),
            (lb::REVNAT_MAP, self.lb),
            (lb::AFFINITY_MAP, self.lb),
            (frag::MAP_NAME, self.fragments),
            (lb::MAGLEV_MAP, lb::MAX_MAGLEV * lb::maglev_chunks(self.maglev_size)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect()
    }
}

/// The node's memory in bytes (`MemTotal` of /proc/meminfo; 0 when unknown).
fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// A positive duration option (`15m`, `30s`, `1m30s`), or `default`.
fn duration(
    name: &str,
    given: Option<String>,
    default: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    let Some(text) = given else { return Ok(default) };
    match humantime::parse_duration(&text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => anyhow::bail!("{name} {text:?}: must be more than 0"),
        Err(e) => anyhow::bail!("{name} {text:?} is not a duration like 30s or 15m: {e}"),
    }
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node: Option<String>,
    pod_cidr: Option<String>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    enable_health: Option<bool>,
    ct_gc_interval: Option<u64>,
    identity_gc_interval: Option<String>,
    identity_heartbeat_timeout: Option<String>,
    bpf_ct_global_tcp_max: Option<u32>,
    bpf_ct_global_any_max: Option<u32>,
    bpf_nat_global_max: Option<u32>,
    bpf_policy_map_max: Option<u32>,
    bpf_lb_map_max: Option<u32>,
    bpf_fragments_map_max: Option<u32>,
    bpf_lb_maglev_table_size: Option<u32>,
    bpf_map_dynamic_size_ratio: Option<f64>,
    monitor_aggregation: Option<String>,
    bpf_debug: Option<bool>,
    devices: Option<Vec<String>>,
    socket_lb: Option<bool>,
    enable_xdp_prefilter: Option<bool>,
    sockops_enable: Option<bool>,
    node_port_acceleration: Option<String>,
    node_port_mode: Option<String>,
    cgroup_root: Option<PathBuf>,
    lb_algorithm: Option<String>,
    services: Option<PathBuf>,
    k8s_kubeconfig_path: Option<PathBuf>,
    identity_allocation_mode: Option<String>,
    ipam: Option<String>,
    kvstore: Option<String>,
    kvstore_path: Option<PathBuf>,
    etcd_endpoints: Option<String>,
    etcd_config: Option<PathBuf>,
    cluster_pool: Option<String>,
    cluster_pool_mask: Option<u8>,
    routing: Option<String>,
    masquerade: Option<bool>,
    non_masquerade_cidrs: Option<Vec<String>>,
    node_port_range: Option<String>,
    log_format: Option<String>,
    prometheus_serve_addr: Option<String>,
    cluster_health_port: Option<u16>,
    enable_hubble: Option<bool>,
    hubble_listen_address: Option<String>,
    hubble_socket_path: Option<PathBuf>,
    hubble_event_buffer_capacity: Option<usize>,
    hubble_metrics: Option<String>,
    hubble_export_file_path: Option<PathBuf>,
    hubble_export_file_max_size_mb: Option<u64>,
    hubble_export_file_max_backups: Option<usize>,
    hubble_export_allowlist: Option<String>,
    hubble_export_denylist: Option<String>,
    hubble_export_fieldmask: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Logs as JSON lines (else text).
    pub log_json: bool,
    pub debug: bool,
    pub node: String,
    pub pod_cidr: Cidr,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub enable_health: bool,
    /// `None`: the dynamic interval (`crate::ctgc`).
    pub ct_gc_interval: Option<u64>,
    pub identity_gc_interval: std::time::Duration,
    pub identity_heartbeat_timeout: std::time::Duration,
    /// Map capacities.
    pub capacities: Capacities,
    /// Monitor aggregation "none": trace every forwarded packet.
    pub trace_all: bool,
    /// `--bpf-debug`: datapath debugging for the whole node from the start.
    pub bpf_debug: bool,
    pub devices: Vec<String>,
    pub socket_lb: bool,
    /// `--enable-xdp-prefilter`: XDP on every native device.
    pub xdp_prefilter: bool,
    /// `--sockops-enable`: socket-layer acceleration between local pods.
    pub sockops: bool,
    /// `--node-port-acceleration native`: NodePort at XDP on every native
    /// device.
    pub xdp_nodeport: bool,
    /// `--node-port-mode`.
    pub node_port_mode: ciliate_datapath::node::NodePortMode,
    /// None: the cgroup v2 root the agent finds or mounts.
    pub cgroup_root: Option<PathBuf>,
    pub lb_algorithm: ciliate_api::models::LbAlgorithm,
    pub services: Option<PathBuf>,
    /// Where the Kubernetes API is (`None`: standalone).
    pub k8s: Option<crate::k8s::K8sSource>,
    /// `--identity-allocation-mode crd`: identities, nodes and remote
    /// endpoints from the Kubernetes API's CRDs, not the kvstore.
    pub crd_mode: bool,
    /// Where the pod CIDR comes from without --pod-cidr.
    pub ipam: crate::k8s::ipam::IpamMode,
    pub kvstore: KvConfig,
    /// With a cluster pool and no --pod-cidr, the pod CIDR is claimed at
    /// start (`pod_cidr` is then only the default).
    pub cluster_pool: Option<(Cidr, u8)>,
    pub pod_cidr_given: bool,
    pub routing: crate::cluster::Routing,
    pub masquerade: bool,
    pub non_masquerade: Vec<Cidr>,
    pub node_port_range: (u16, u16),
    /// `None`: no metrics endpoint.
    pub prometheus_serve_addr: Option<std::net::SocketAddr>,
    /// 0: no health responder.
    pub cluster_health_port: u16,
    /// `None`: no flow observer.
    pub hubble: Option<HubbleConfig>,
}

/// The flow observer's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubbleConfig {
    /// `None`: the unix socket only.
    pub listen: Option<std::net::SocketAddr>,
    pub socket: PathBuf,
    pub capacity: usize,
    /// `--hubble-metrics` groups.
    pub metrics: Vec<String>,
    /// `None`: flows are not exported.
    pub export: Option<crate::hubble_export::ExportConfig>,
}

/// Which store, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvConfig {
    Local(PathBuf),
    Etcd(crate::kvstore::EtcdConfig),
}

impl KvConfig {
    /// `--kvstore KIND` with its options: a local store's file (`path`),
    /// or etcd's `--etcd-endpoints` / `--etcd-config` (the file wins).
    pub fn from_options(
        kind: &str,
        path: Option<PathBuf>,
        endpoints: Option<String>,
        etcd_config: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            "local" => KvConfig::Local(
                path.ok_or_else(|| anyhow::anyhow!("kvstore local needs --kvstore-path FILE"))?,
            ),
            "etcd" => KvConfig::Etcd(match (endpoints, etcd_config) {
                (_, Some(f)) => {
                    crate::kvstore::EtcdConfig::read(&f).map_err(|e| anyhow::anyhow!(e))?
                }
                (Some(eps), None) => crate::kvstore::EtcdConfig::plain(&eps)
                    .map_err(|e| anyhow::anyhow!("--etcd-endpoints: {e}"))?,
                (None, None) => anyhow::bail!(
                    "kvstore etcd needs --etcd-endpoints host:port[,...] or --etcd-config FILE"
                ),
            }),
            other => anyhow::bail!("kvstore {other:?}: \"local\" or \"etcd\""),
        })
    }

    /// Open (connect to) the store.
    pub async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn crate::kvstore::KvStore>> {
        use crate::kvstore::{Etcd, LocalStore};
        Ok(match self {
            KvConfig::Local(path) => std::sync::Arc::new(
                LocalStore::open(Some(path.clone())).map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            KvConfig::Etcd(c) => {
                std::sync::Arc::new(Etcd::connect(c).await.map_err(|e| anyhow::anyhow!("{e}"))?)
            }
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

impl Flags {
    pub fn resolve(self) -> anyhow::Result<Config> {
        match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading config {}: {e}", p.display()))?;
                let name = p.display().to_string();
                self.resolve_text(&text).map_err(|e| anyhow::anyhow!("config {name}: {e}"))
            }
            None => self.resolve_with(FileConfig::default()),
        }
    }

    /// [`Flags::resolve`] with `text` as the config file's content.
    pub fn resolve_text(self, text: &str) -> anyhow::Result<Config> {
        let file: FileConfig = serde_json::from_str(text)?;
        self.resolve_with(file)
    }

    fn resolve_with(self, file: FileConfig) -> anyhow::Result<Config> {
        let node = self.node.or(file.node).unwrap_or_else(hostname);
        if node.is_empty() || node.contains('/') || node.len() > 64 {
            anyhow::bail!("node name {node:?}: 1-64 characters, no '/'");
        }
        let given = self.pod_cidr.or(file.pod_cidr);
        let pod_cidr_given = given.is_some();
        let cidr = given.unwrap_or_else(|| "10.200.0.0/24".into());
        let pod_cidr: Cidr = cidr.parse()?;
        let state_dir = self
            .state_dir
            .clone()
            .or(file.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/ciliate/{node}")));
        let kvstore = KvConfig::from_options(
            self.kvstore.or(file.kvstore).as_deref().unwrap_or("local"),
            Some(
                self.kvstore_path
                    .or(file.kvstore_path)
                    .unwrap_or_else(|| state_dir.join("kvstore.json")),
            ),
            self.etcd_endpoints.or(file.etcd_endpoints),
            self.etcd_config.or(file.etcd_config),
        )?;
        let mask = self.cluster_pool_mask.or(file.cluster_pool_mask).unwrap_or(24);
        let cluster_pool = match self.cluster_pool.or(file.cluster_pool) {
            Some(p) => {
                let pool: Cidr = p.parse()?;
                if mask < pool.len || mask > 30 {
                    anyhow::bail!("cluster pool mask /{mask} does not fit in {pool}");
                }
                Some((pool, mask))
            }
            None => None,
        };
        let routing = self
            .routing
            .or(file.routing)
            .as_deref()
            .unwrap_or("tunnel")
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        let masquerade = self.masquerade.or(file.masquerade).unwrap_or(true);
        let non_masquerade = self
            .non_masquerade_cidrs
            .or(file.non_masquerade_cidrs)
            .unwrap_or_default()
            .iter()
            .map(|c| {
                c.parse::<Cidr>().map_err(|e| anyhow::anyhow!("non-masquerade CIDR {c:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let log_json = match self.log_format.or(file.log_format).as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => anyhow::bail!("log format {other:?}: \"text\" or \"json\""),
        };
        let xdp_prefilter =
            self.enable_xdp_prefilter.or(file.enable_xdp_prefilter).unwrap_or(false);
        let no_devices = self.devices.as_ref().or(file.devices.as_ref()).is_none_or(Vec::is_empty);
        if xdp_prefilter && no_devices {
            anyhow::bail!("--enable-xdp-prefilter needs --devices: XDP runs on the native devices");
        }
        let xdp_nodeport = match self
            .node_port_acceleration
            .clone()
            .or(file.node_port_acceleration.clone())
            .as_deref()
        {
            None | Some("disabled") => false,
            Some("native") if no_devices => anyhow::bail!(
                "--node-port-acceleration native needs --devices: XDP runs on the native devices"
            ),
            Some("native") => true,
            Some(other) => anyhow::bail!(
                "node port acceleration {other:?}: \"native\" or \"disabled\" (generic XDP runs after the skb is made: nothing to gain)"
            ),
        };
        let node_port_mode: ciliate_datapath::node::NodePortMode = self
            .node_port_mode
            .or(file.node_port_mode)
            .as_deref()
            .unwrap_or("snat")
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        if node_port_mode != ciliate_datapath::node::NodePortMode::Snat
            && routing == crate::cluster::Routing::Tunnel
        {
            anyhow::bail!(
                "--node-port-mode {} needs --routing native: in tunnel mode the frontend would travel in a Geneve option (Cilium's dispatch), and there is no Geneve here",
                node_port_mode.as_str()
            );
        }
        let prometheus_serve_addr = crate::metrics::parse_addr(
            self.prometheus_serve_addr.or(file.prometheus_serve_addr).as_deref().unwrap_or(":9962"),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let api_socket =
            self.socket.or(file.socket).unwrap_or_else(|| ciliate_api::default_socket(&node));
        let hubble = if self.enable_hubble.or(file.enable_hubble).unwrap_or(true) {
            let listen = crate::metrics::parse_addr(
                self.hubble_listen_address
                    .or(file.hubble_listen_address)
                    .as_deref()
                    .unwrap_or(":4244"),
            )
            .map_err(|e| anyhow::anyhow!("hubble listen address: {e}"))?;
            let capacity = self
                .hubble_event_buffer_capacity
                .or(file.hubble_event_buffer_capacity)
                .unwrap_or(crate::hubble::DEFAULT_CAPACITY);
            if capacity == 0 || capacity > 1 << 20 {
                anyhow::bail!("hubble event buffer capacity {capacity}: 1 to 1048576 flows");
            }
            let socket = self.hubble_socket_path.or(file.hubble_socket_path).unwrap_or_else(|| {
                api_socket
                    .parent()
                    .unwrap_or(std::path::Path::new("/run/ciliate"))
                    .join("hubble.sock")
            });
            let metrics = crate::hubble_metrics::parse(
                self.hubble_metrics.or(file.hubble_metrics).as_deref().unwrap_or(""),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            let export = match self.hubble_export_file_path.or(file.hubble_export_file_path) {
                None => None,
                Some(path) => {
                    use crate::hubble_export as x;
                    let mb = self
                        .hubble_export_file_max_size_mb
                        .or(file.hubble_export_file_max_size_mb)
                        .unwrap_or(x::DEFAULT_MAX_SIZE_MB);
                    if mb == 0 {
                        anyhow::bail!("hubble export file max size: at least 1 MB");
                    }
                    let allow = self
                        .hubble_export_allowlist
                        .or(file.hubble_export_allowlist)
                        .unwrap_or_default();
                    let deny = self
                        .hubble_export_denylist
                        .or(file.hubble_export_denylist)
                        .unwrap_or_default();
                    x::parse_filters(&allow)
                        .map_err(|e| anyhow::anyhow!("hubble export allowlist: {e}"))?;
                    x::parse_filters(&deny)
                        .map_err(|e| anyhow::anyhow!("hubble export denylist: {e}"))?;
                    let field_mask = x::parse_field_mask(
                        &self
                            .hubble_export_fieldmask
                            .or(file.hubble_export_fieldmask)
                            .unwrap_or_default(),
                    )
                    .map_err(|e| anyhow::anyhow!("hubble export fieldmask: {e}"))?;
                    Some(x::ExportConfig {
                        path,
                        max_size: mb.saturating_mul(1 << 20),
                        max_backups: self
                            .hubble_export_file_max_backups
                            .or(file.hubble_export_file_max_backups)
                            .unwrap_or(x::DEFAULT_MAX_BACKUPS),
                        allow,
                        deny,
                        field_mask,
                    })
                }
            };
            Some(HubbleConfig { listen, socket, capacity, metrics, export })
        } else {
            None
        };
        let k8s = match self.k8s_kubeconfig_path.or(file.k8s_kubeconfig_path) {
            Some(p) => Some(crate::k8s::K8sSource::Kubeconfig(p)),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                Some(crate::k8s::K8sSource::InCluster)
            }
            None => None,
        };
        Ok(Config {
            log_json,
            debug: self.debug,
            prometheus_serve_addr,
            hubble,
            cluster_health_port: self
                .cluster_health_port
                .or(file.cluster_health_port)
                .unwrap_or(4240),
            state_dir,
            kvstore,
            cluster_pool,
            pod_cidr_given,
            routing,
            masquerade,
            non_masquerade,
            node_port_range: match self.node_port_range.or(file.node_port_range) {
                None => crate::services::NODE_PORT_RANGE,
                Some(r) => {
                    let bad = || anyhow::anyhow!("node port range {r:?}: MIN-MAX, 1 <= MIN <= MAX");
                    let (a, b) = r.split_once('-').ok_or_else(bad)?;
                    let (a, b): (u16, u16) = (
                        a.trim().parse().map_err(|_| bad())?,
                        b.trim().parse().map_err(|_| bad())?,
                    );
                    if a == 0 || a > b {
                        return Err(bad());
                    }
                    (a, b)
                }
            },
            socket: api_socket,
            bpffs: self.bpffs.or(file.bpffs).unwrap_or_else(|| PathBuf::from("/sys/fs/bpf")),
            enable_health: self.enable_health.or(file.enable_health).unwrap_or(true),
            bpf_debug: self.bpf_debug.or(file.bpf_debug).unwrap_or(false),
            trace_all: match self
                .monitor_aggregation
                .or(file.monitor_aggregation)
                .as_deref()
                .unwrap_or("medium")
            {
                "none" => true,
                "medium" => false,
                other => anyhow::bail!("monitor aggregation {other:?}: \"none\" or \"medium\""),
            },
            ct_gc_interval: match self.ct_gc_interval.or(file.ct_gc_interval) {
                Some(0) => anyhow::bail!("ct_gc_interval must be at least 1 second"),
                n => n,
            },
            identity_gc_interval: duration(
                "identity_gc_interval",
                self.identity_gc_interval.or(file.identity_gc_interval),
                crate::cluster::IDENTITY_GC_INTERVAL,
            )?,
            identity_heartbeat_timeout: duration(
                "identity_heartbeat_timeout",
                self.identity_heartbeat_timeout.or(file.identity_heartbeat_timeout),
                crate::cluster::IDENTITY_HEARTBEAT_TIMEOUT,
            )?,
            capacities: Capacities::resolve(
                [
                    self.bpf_ct_global_tcp_max.or(file.bpf_ct_global_tcp_max),
                    self.bpf_ct_global_any_max.or(file.bpf_ct_global_any_max),
                    self.bpf_nat_global_max.or(file.bpf_nat_global_max),
                    self.bpf_policy_map_max.or(file.bpf_policy_map_max),
                    self.bpf_lb_map_max.or(file.bpf_lb_map_max),
                    self.bpf_fragments_map_max.or(file.bpf_fragments_map_max),
                    self.bpf_lb_maglev_table_size.or(file.bpf_lb_maglev_table_size),
                ],
                self.bpf_map_dynamic_size_ratio.or(file.bpf_map_dynamic_size_ratio),
                total_memory(),
                pod_cidr.len,
            )?,
            devices: self.devices.or(file.devices).unwrap_or_default(),
            socket_lb: self.socket_lb.or(file.socket_lb).unwrap_or(true),
            xdp_prefilter,
            sockops: self.sockops_enable.or(file.sockops_enable).unwrap_or(false),
            xdp_nodeport,
            node_port_mode,
            cgroup_root: self.cgroup_root.or(file.cgroup_root),
            lb_algorithm: match self
                .lb_algorithm
                .or(file.lb_algorithm)
                .as_deref()
                .unwrap_or("random")
            {
                "random" => ciliate_api::models::LbAlgorithm::Random,
                "maglev" => ciliate_api::models::LbAlgorithm::Maglev,
                other => anyhow::bail!("lb algorithm {other:?}: \"random\" or \"maglev\""),
            },
            services: self.services.or(file.services),
            crd_mode: match (
                self.identity_allocation_mode.or(file.identity_allocation_mode).as_deref(),
                k8s.is_some(),
            ) {
                (None | Some("crd"), true) => true,
                (None | Some("kvstore"), _) => false,
                (Some("crd"), false) => anyhow::bail!(
                    "identity allocation mode crd needs the Kubernetes API (--k8s-kubeconfig-path)"
                ),
                (Some(other), _) => {
                    anyhow::bail!("identity allocation mode {other:?}: \"crd\" or \"kvstore\"")
                }
            },
            ipam: match self.ipam.or(file.ipam).as_deref().unwrap_or("cluster-pool").parse() {
                Ok(crate::k8s::ipam::IpamMode::Kubernetes) if k8s.is_none() => anyhow::bail!(
                    "ipam mode kubernetes needs the Kubernetes API (--k8s-kubeconfig-path)"
                ),
                Ok(m) => m,
                Err(e) => anyhow::bail!(e),
            },
            k8s,
            node,
            pod_cidr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("ciliate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.json");
        std::fs::write(&file, r#"{"node": "from-file", "pod_cidr": "10.5.0.0/16"}"#).unwrap();
        let c = Flags {
            config: Some(file.clone()),
            pod_cidr: Some("10.6.0.0/24".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.node, "from-file");
        assert_eq!(c.pod_cidr.to_string(), "10.6.0.0/24");
        assert_eq!(c.socket, PathBuf::from("/run/ciliate/from-file/agent.sock"));

        std::fs::write(&file, r#"{"nodename": "typo"}"#).unwrap();
        let e = Flags { config: Some(file), ..Default::default() }.resolve().unwrap_err();
        assert!(e.to_string().contains("unknown field `nodename`"), "{e}");
        let e = Flags { pod_cidr: Some("10.0.0.1/8".into()), ..Default::default() }
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("host bits"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cluster_settings_are_checked_and_named() {
        let bad = |f: Flags, needle: &str| {
            let e = f.resolve().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        bad(Flags { kvstore: Some("zookeeper".into()), ..Default::default() }, "zookeeper");
        bad(Flags { kvstore: Some("etcd".into()), ..Default::default() }, "--etcd-endpoints");
        bad(Flags { routing: Some("overlay".into()), ..Default::default() }, "tunnel");
        bad(Flags { node_port_range: Some("9-2".into()), ..Default::default() }, "MIN-MAX");
        // Identities in CRDs need the Kubernetes API; with it they are the
        // default.
        let ids = |mode: Option<&str>, k8s: bool| Flags {
            identity_allocation_mode: mode.map(Into::into),
            k8s_kubeconfig_path: k8s.then(|| "/nonexistent/kubeconfig".into()),
            ..Default::default()
        };
        bad(ids(Some("crd"), false), "needs the Kubernetes API");
        bad(ids(Some("etcd"), true), "\"crd\" or \"kvstore\"");
        assert!(ids(None, true).resolve().unwrap().crd_mode);
        assert!(!ids(Some("kvstore"), true).resolve().unwrap().crd_mode);
        assert!(!ids(None, false).resolve().unwrap().crd_mode);
        // Node.spec.podCIDRs need the API too.
        let ipam = |mode: &str, k8s: bool| Flags { ipam: Some(mode.into()), ..ids(None, k8s) };
        bad(ipam("kubernetes", false), "needs the Kubernetes API");
        bad(ipam("crd", true), "\"cluster-pool\" or \"kubernetes\"");
        use crate::k8s::ipam::IpamMode;
        assert_eq!(ipam("kubernetes", true).resolve().unwrap().ipam, IpamMode::Kubernetes);
        assert_eq!(ids(None, true).resolve().unwrap().ipam, IpamMode::ClusterPool);
        // XDP needs native devices, and a mode that gains something.
        bad(Flags { enable_xdp_prefilter: Some(true), ..Default::default() }, "needs --devices");
        let np = |mode: &str, devices: bool| Flags {
            node_port_acceleration: Some(mode.into()),
            devices: devices.then(|| vec!["eth0".into()]),
            ..Default::default()
        };
        bad(np("native", false), "needs --devices");
        bad(np("generic", true), "\"native\" or \"disabled\"");
        assert!(np("native", true).resolve().unwrap().xdp_nodeport);
        assert!(!np("disabled", true).resolve().unwrap().xdp_nodeport);
        // DSR: Cilium's modes, native routing only.
        let mode = |m: &str, routing: &str| Flags {
            node_port_mode: Some(m.into()),
            routing: Some(routing.into()),
            ..Default::default()
        };
        bad(mode("direct", "native"), "\"snat\", \"dsr\" or \"hybrid\"");
        bad(mode("dsr", "tunnel"), "needs --routing native");
        bad(mode("hybrid", "tunnel"), "needs --routing native");
        use ciliate_datapath::node::NodePortMode;
        assert_eq!(mode("dsr", "native").resolve().unwrap().node_port_mode, NodePortMode::Dsr);
        assert_eq!(
            mode("hybrid", "native").resolve().unwrap().node_port_mode,
            NodePortMode::Hybrid
        );
        assert_eq!(mode("snat", "tunnel").resolve().unwrap().node_port_mode, NodePortMode::Snat);
        bad(
            Flags {
                cluster_pool: Some("10.0.0.0/16".into()),
                cluster_pool_mask: Some(8),
                ..Default::default()
            },
            "does not fit",
        );
        let c = Flags {
            node_port_range: Some("31000-31010".into()),
            non_masquerade_cidrs: Some(vec!["192.0.2.0/24".into()]),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.node_port_range, (31000, 31010));
        assert_eq!(c.non_masquerade[0].to_string(), "192.0.2.0/24");
        assert_eq!(c.routing, crate::cluster::Routing::Tunnel);
        assert_eq!(c.identity_gc_interval, crate::cluster::IDENTITY_GC_INTERVAL);
        bad(Flags { identity_gc_interval: Some("0s".into()), ..Default::default() }, "more than 0");
        bad(
            Flags { identity_heartbeat_timeout: Some("soon".into()), ..Default::default() },
            "identity_heartbeat_timeout \"soon\"",
        );
        let c = Flags {
            identity_gc_interval: Some("1m30s".into()),
            identity_heartbeat_timeout: Some("15m0s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.identity_gc_interval, std::time::Duration::from_secs(90));
        assert_eq!(c.identity_heartbeat_timeout, std::time::Duration::from_secs(900));
    }

    #[test]
    fn map_capacities_follow_cilium_options_and_the_nodes_memory() {
        let none = [None; 7];
        // Off: Cilium's defaults; the policy map has each endpoint's share
        // for every address of a /24.
        let c = Capacities::resolve(none, Some(0.0), 0, 24).unwrap();
        assert_eq!((c.ct_tcp, c.ct_any, c.nat, c.lb), (524_288, 262_144, 524_288, 65_536));
        assert_eq!((c.fragments, c.maglev_size), (8192, 16381));
        assert_eq!((c.policy_per_endpoint, c.policy_total), (16_384, 16_384 * 256));
        // 0.0025 of 24 GiB: about 64 MB, half of it for TCP conntrack.
        let gib = 1u64 << 30;
        let c = Capacities::resolve(none, None, 24 * gib, 24).unwrap();
        assert_eq!(c.ct_tcp, (0.0025 * (24 * gib) as f64 / 2.0 / 72.0) as u32);
        assert_eq!(c.ct_any, c.ct_tcp / 2);
        assert_eq!(c.nat, ((c.ct_tcp + c.ct_any) as f64 * 2.0 / 3.0) as u32);
        // A small node gets the floors; explicit values win.
        let c = Capacities::resolve(none, None, gib, 24).unwrap();
        assert_eq!((c.ct_tcp, c.ct_any, c.nat), (131_072, 65_536, 131_072));
        let given =
            [Some(1 << 20), None, Some(8192), Some(4096), Some(8192), Some(512), Some(65521)];
        let c = Capacities::resolve(given, None, gib, 24).unwrap();
        assert_eq!((c.ct_tcp, c.nat, c.policy_per_endpoint, c.lb), (1 << 20, 8192, 4096, 8192));
        assert_eq!(c.by_map()["ciliate_lb4_backends"], 8192);
        assert_eq!(c.by_map()["ciliate_ipv4_frag_datagrams"], 512);
        // 65521 entries: 16 chunks of 4096 per Maglev frontend.
        assert_eq!((c.maglev_size, c.by_map()["ciliate_lb4_maglev"]), (65521, 4096 * 16));
        // Out of bounds: named.
        let e = Capacities::resolve([None, None, Some(10), None, None, None, None], None, gib, 24)
            .unwrap_err();
        assert!(e.to_string().contains("bpf_nat_global_max 10"), "{e}");
        let e = Capacities::resolve([None, None, None, None, None, Some(100), None], None, gib, 24)
            .unwrap_err();
        assert!(e.to_string().contains("bpf_fragments_map_max 100: from 256"), "{e}");
        let e =
            Capacities::resolve([None, None, None, None, None, None, Some(16384)], None, gib, 24)
                .unwrap_err();
        assert!(e.to_string().contains("bpf_lb_maglev_table_size 16384: one of the primes"), "{e}");
        let e = Capacities::resolve(none, Some(1.5), gib, 24).unwrap_err();
        assert!(e.to_string().contains("bpf_map_dynamic_size_ratio"), "{e}");
    }
}
