//! Request and response bodies of the agent's API.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

/// An endpoint's labels as identity labels: `{"app": "web"}` →
/// `["k8s:app=web"]`, sorted; keys that already carry a source
/// (`reserved:host`, `k8s:…`) keep it.
pub fn label_set(labels: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let k = if k.contains(':') { k.clone() } else { format!("k8s:{k}") };
            if v.is_empty() { k } else { format!("{k}={v}") }
        })
        .collect();
    out.sort();
    out
}

/// Label sources only the agent gives: `reserved` (host, world, health…),
/// `cidr` and `fqdn` (the identities of addresses outside the cluster),
/// `cilium-generated`; and `any`, a selector's wildcard rather than a
/// source.
pub const AGENT_SOURCES: [&str; 5] = ["reserved", "cidr", "fqdn", "cilium-generated", "any"];

/// Check labels a pod asks for (CNI, API): keys are non-empty, and none
/// is of a source only the agent gives (a pod labelled `reserved:host`
/// would get the host's identity). The error names the label.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for k in labels.keys() {
        let (source, key) = k.split_once(':').unwrap_or(("k8s", k.as_str()));
        if key.is_empty() {
            return Err(format!("label {k:?}: the key is empty"));
        }
        if AGENT_SOURCES.contains(&source) {
            return Err(format!(
                "label {k:?}: the {source:?} source is the agent's own; a pod cannot carry it"
            ));
        }
    }
    Ok(())
}

/// A named port (IANA service name rules): 1-15 lowercase letters, digits
/// and '-', with a letter, no '-' at either end.
pub fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `{"message": ...}`: every error response.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct ApiError {
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub pod_cidr: String,
    pub router_ip: Ipv4Addr,
    pub endpoints: usize,
    pub identities: usize,
    pub ipam_used: usize,
    pub ipam_free: usize,
    pub pin_dir: String,
    /// Seconds since the agent started.
    pub uptime: u64,
    /// Endpoints restored from the state directory at start.
    pub restored_endpoints: usize,
    /// The cluster's store and its health, e.g. "etcd 192.168.200.1:2379: ok".
    #[serde(default)]
    pub kvstore: String,
    /// Nodes in the cluster (this one included), as last read from the store.
    #[serde(default)]
    pub cluster_nodes: usize,
    /// Endpoints of other nodes in this node's ipcache, as followed.
    #[serde(default)]
    pub remote_endpoints: usize,
    /// "tunnel" or "native".
    #[serde(default)]
    pub routing: String,
    /// "ok", or "restoring" while the agent restores its endpoints.
    #[serde(default)]
    pub state: String,
    /// The agent's event fan-out (`ciliate monitor`).
    #[serde(default)]
    pub monitor: MonitorStatus,
    /// Other nodes whose health responder did not answer the last probe.
    #[serde(default)]
    pub unreachable_nodes: Vec<String>,
    /// Which acceleration paths the node runs.
    #[serde(default)]
    pub acceleration: Acceleration,
}

/// The acceleration paths of a node (`ciliate-agent` flags).
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Acceleration {
    /// `--enable-xdp-prefilter`.
    pub xdp_prefilter: bool,
    /// `--node-port-acceleration`: "disabled" or "native".
    pub node_port: String,
    /// `--node-port-mode`: "snat", "dsr" or "hybrid".
    #[serde(default)]
    pub node_port_mode: String,
    /// `--sockops-enable`.
    pub sockops: bool,
}

/// Events read from the datapath and handed to subscribers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct MonitorStatus {
    /// Subscribers now (monitors, and the agent's own consumers).
    pub subscribers: usize,
    /// Events read from the ring buffer since the agent started.
    pub events: u64,
    /// Events the datapath had no ring room for (the agent read too slowly).
    pub lost_in_datapath: u64,
    /// Events subscribers missed because they read too slowly.
    pub lost_by_subscribers: u64,
}

/// `GET /v1/events`: one datapath event, a JSON object per line, in the
/// order the agent read them. `time` is when the agent read it (RFC 3339).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum MonitorEvent {
    Trace(TraceEvent),
    Drop(DropEvent),
    PolicyVerdict(PolicyVerdictEvent),
    /// A decision of the datapath, while debugging is on.
    Debug(DebugEvent),
    /// A packet at a point of a program, while debugging is on.
    Capture(CaptureEvent),
    /// Events that did not reach this subscriber.
    Lost(LostEvents),
}

/// `PATCH /v1/endpoint/{id}/config`: switch an endpoint's options.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfigChange {
    /// Datapath debugging for the endpoint's packets.
    #[serde(default)]
    pub debug: Option<bool>,
}

/// `GET /v1/config`: the agent's options that switch at run time.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AgentConfig {
    /// Datapath debugging for the whole node.
    pub debug: bool,
    /// "medium" or "none".
    pub monitor_aggregation: String,
}

/// `PATCH /v1/config`: switch the agent's run-time options.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigChange {
    #[serde(default)]
    pub debug: Option<bool>,
}

/// A decision the datapath took for a packet (Cilium's debug message).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct DebugEvent {
    pub time: String,
    /// "CPU 01", as Cilium's monitor prints it.
    pub cpu: String,
    /// The endpoint whose packet it is (0: a node program's).
    pub source: u16,
    pub flow: String,
    /// The decision's number (`ciliate_common::debug::DBG_*`, Cilium's where
    /// Cilium has it) and its message.
    pub subtype: u8,
    pub message: String,
}

/// The first bytes of a packet at a point of a program.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct CaptureEvent {
    pub time: String,
    pub cpu: String,
    pub source: u16,
    pub flow: String,
    pub subtype: u8,
    /// Where: "Delivery to ifindex 7", "Packet at from-endpoint on ifindex 7", …
    pub message: String,
    pub length: u32,
    pub summary: String,
}

/// A forwarded packet at an observation point.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct TraceEvent {
    pub time: String,
    /// "to-endpoint", "from-endpoint", "to-stack", "to-overlay", …
    pub observation_point: String,
    /// Endpoint ID of the program that saw it (0: a node program).
    pub source: u16,
    /// The packet's hash, as Cilium's monitor prints it ("0x1a2b3c4d").
    pub flow: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_endpoint: u16,
    /// Conntrack state: "new", "established", "reply", "related", "unknown".
    pub state: String,
    pub ifindex: u32,
    /// The device's name when the agent knows it, else the ifindex.
    pub interface: String,
    /// The source address before NAT.
    pub orig_ip: Ipv4Addr,
    /// The node a packet to the overlay went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub length: u32,
    /// "10.0.0.1:52000 -> 10.0.0.2:80 tcp SYN".
    pub summary: String,
}

/// A dropped packet.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct DropEvent {
    pub time: String,
    /// The drop reason's number (Cilium's numbering) and text.
    pub reason: u8,
    pub reason_text: String,
    pub source: u16,
    pub flow: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dst_endpoint: u32,
    pub ifindex: u32,
    pub interface: String,
    /// Source line of the drop in the datapath.
    pub line: u16,
    pub length: u32,
    pub summary: String,
}

/// A policy decision.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PolicyVerdictEvent {
    pub time: String,
    /// The endpoint whose policy decided.
    pub endpoint: u16,
    pub flow: String,
    pub remote_identity: u32,
    pub proto: u8,
    pub dport: u16,
    pub ingress: bool,
    /// "allow" or "deny".
    pub action: String,
    /// What matched: "L3-L4", "L3-Only", "L4-Only", "all", "none".
    #[serde(rename = "match")]
    pub matched: String,
    pub summary: String,
}

/// Events lost on the way to this subscriber.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct LostEvents {
    pub time: String,
    pub lost: u64,
    /// "ring buffer full" (the datapath had no room) or "subscriber too
    /// slow" (this stream fell behind).
    pub cause: String,
}

impl MonitorEvent {
    /// The endpoints it is about (for `--related-to`).
    pub fn related_to(&self, id: u16) -> bool {
        match self {
            MonitorEvent::Trace(t) => t.source == id || t.dst_endpoint == id,
            MonitorEvent::Drop(d) => d.source == id || d.dst_endpoint == u32::from(id),
            MonitorEvent::PolicyVerdict(v) => v.endpoint == id,
            MonitorEvent::Debug(d) => d.source == id,
            MonitorEvent::Capture(c) => c.source == id,
            MonitorEvent::Lost(_) => true,
        }
    }

    /// "trace", "drop", "policy-verdict", "debug", "capture", "lost".
    pub fn kind(&self) -> &'static str {
        match self {
            MonitorEvent::Trace(_) => "trace",
            MonitorEvent::Drop(_) => "drop",
            MonitorEvent::PolicyVerdict(_) => "policy-verdict",
            MonitorEvent::Debug(_) => "debug",
            MonitorEvent::Capture(_) => "capture",
            MonitorEvent::Lost(_) => "lost",
        }
    }
}

/// `GET /v1/kvstore`: a key and its value (as text).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: String,
}

/// `POST /v1/ipam`: allocate one address for `owner` (a container ID).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct IpamRequest {
    pub owner: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct IpamAllocation {
    pub ip: Ipv4Addr,
    /// The pod's gateway: the node's router IP.
    pub gateway: Ipv4Addr,
    pub owner: String,
}

/// `PUT /v1/endpoint`: the CNI plugin made the veth pair and configured the
/// pod side; the agent takes it from here.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    pub container_id: String,
    /// The pod's network namespace (a path).
    pub netns: String,
    /// Interface name inside the pod (`eth0`).
    pub ifname: String,
    /// The host-side device (`lxc…`).
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    /// MAC of the pod's interface.
    pub mac: String,
    pub labels: BTreeMap<String, String>,
    /// `namespace/name` of the pod, when the runtime told (display only:
    /// not part of the identity).
    #[serde(default)]
    pub pod_name: String,
    /// The pod's named ports (`http` → 80/TCP), for policies that name ports.
    #[serde(default)]
    pub named_ports: BTreeMap<String, NamedPort>,
}

/// A named container port.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct NamedPort {
    pub port: u16,
    /// "TCP" or "UDP".
    pub protocol: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Endpoint {
    pub id: u16,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub named_ports: BTreeMap<String, NamedPort>,
    pub identity: u32,
    /// "ready", or what went wrong.
    pub state: String,
    /// Policy enforcement per direction: "Disabled" until the policy issue.
    pub ingress_enforcement: String,
    pub egress_enforcement: String,
    /// Datapath debugging for this endpoint (`ciliate endpoint config ID
    /// Debug=true`): its packets' decisions become debug events.
    #[serde(default)]
    pub debug: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
    /// `source:key=value`, sorted.
    pub labels: Vec<String>,
    pub reserved: bool,
}

/// `POST /v1/gc`: remove every endpoint whose container is not listed.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct GcRequest {
    pub valid_container_ids: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct GcResult {
    pub removed: Vec<u16>,
}

/// `PUT /v1/policy`: policy documents (YAML or JSON) to import.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PolicyImport {
    pub text: String,
}

/// The answer to a policy change: the new revision.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PolicyChange {
    pub revision: u64,
    /// Rules imported or removed.
    pub rules: usize,
}

/// One side of a `POST /v1/policy/trace`: an endpoint ID, an identity, or
/// labels (`k8s:app=web`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct TracePeer {
    #[serde(default)]
    pub endpoint: Option<u16>,
    #[serde(default)]
    pub identity: Option<u32>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

/// `POST /v1/policy/trace`: would `src` reach `dst` on `proto`/`dport`?
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct TraceRequest {
    pub src: TracePeer,
    pub dst: TracePeer,
    /// "tcp", "udp" or "icmp".
    pub proto: String,
    /// Destination port (ICMP: the ICMP type).
    pub dport: u16,
}

/// How a service is reached (Cilium's service types).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
)]
pub enum ServiceKind {
    #[default]
    ClusterIP,
    NodePort,
    ExternalIPs,
    LoadBalancer,
    HostPort,
}

impl ServiceKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIPs => "ExternalIPs",
            Self::LoadBalancer => "LoadBalancer",
            Self::HostPort => "HostPort",
        }
    }
}

/// A backend's state (Cilium's): only active backends get new flows;
/// terminating ones keep their established flows.
#[derive(
    Clone, Copy, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    Terminating,
    Quarantined,
    Maintenance,
}

impl BackendState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Terminating => "terminating",
            Self::Quarantined => "quarantined",
            Self::Maintenance => "maintenance",
        }
    }
}

/// Backend selection for new flows.
#[derive(
    Clone, Copy, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    #[default]
    Random,
    Maglev,
}

/// An address, port and protocol: `10.96.0.10:80/TCP`.
#[derive(
    Clone,
    Copy,
    Debug,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub struct L4Addr {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// "TCP" or "UDP".
    #[serde(default = "tcp")]
    pub protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::TCP
}

#[derive(
    Clone,
    Copy,
    Debug,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub enum Protocol {
    TCP,
    UDP,
}

impl Protocol {
    pub fn number(&self) -> u8 {
        match self {
            Self::TCP => 6,
            Self::UDP => 17,
        }
    }
}

impl std::fmt::Display for L4Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{:?}", self.ip, self.port, self.protocol)
    }
}

impl std::str::FromStr for L4Addr {
    type Err = String;
    /// `IP:port` or `IP:port/TCP|UDP` (TCP when not given).
    fn from_str(s: &str) -> Result<Self, String> {
        let (hp, proto) = match s.split_once('/') {
            Some((hp, p)) => (hp, p),
            None => (s, "TCP"),
        };
        let protocol = match proto.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::TCP,
            "UDP" => Protocol::UDP,
            other => return Err(format!("{s:?}: protocol {other:?} is not TCP or UDP")),
        };
        let (ip, port) =
            hp.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected IP:port[/TCP|UDP]"))?;
        let ip = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        Ok(Self { ip, port, protocol })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct BackendSpec {
    pub ip: Ipv4Addr,
    pub port: u16,
    #[serde(default)]
    pub state: BackendState,
}

/// `PUT /v1/service`: create or replace service `id`. One service is one
/// frontend (as `cilium service update`); a NodePort or HostPort frontend
/// with address 0.0.0.0 stands for every address of the node's devices.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub id: u16,
    pub frontend: L4Addr,
    #[serde(default)]
    pub kind: ServiceKind,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// sessionAffinity ClientIP with this timeout in seconds.
    #[serde(default)]
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy (NodePort, LoadBalancer, ExternalIPs) or
    /// internalTrafficPolicy (ClusterIP) Local: only this node's backends.
    #[serde(default)]
    pub traffic_policy_local: bool,
    /// loadBalancerSourceRanges, as CIDRs.
    #[serde(default)]
    pub source_ranges: Vec<String>,
    /// The agent's default (`--lb-algorithm`) when not given.
    #[serde(default)]
    pub algorithm: Option<LbAlgorithm>,
    /// `namespace/name`, for display.
    #[serde(default)]
    pub name: String,
    /// Who manages it: empty for the API and the CLI, "k8s" for a service
    /// the agent derives from the Kubernetes API (which the API then does
    /// not let anyone else replace or delete).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// A frontend the agent wrote for a service (NodePort: one per node
/// address), with its reverse-NAT index.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct FrontendStatus {
    pub address: L4Addr,
    pub rev_nat_index: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct BackendStatus {
    pub id: u32,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
    /// Given a slot (active, and local when the traffic policy says so).
    pub selectable: bool,
}

/// `GET /v1/service[/<id>]`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Service {
    pub spec: ServiceSpec,
    pub frontends: Vec<FrontendStatus>,
    pub backends: Vec<BackendStatus>,
    pub algorithm: LbAlgorithm,
}

/// The XDP prefilter's deny list (Cilium's `PrefilterSpec`): `PATCH
/// /v1/prefilter` adds these CIDRs, `DELETE /v1/prefilter` removes them.
/// A revision other than 0 must be the current one (the change is refused
/// with 409 otherwise); every change that lands makes a new revision.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrefilterSpec {
    #[serde(default)]
    pub revision: u64,
    /// Source CIDRs (`10.9.0.0/16`; an address alone is a /32).
    pub deny: Vec<String>,
}

/// `GET /v1/prefilter`: the deny list, where it runs, what it dropped.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Prefilter {
    pub spec: PrefilterSpec,
    pub status: PrefilterStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PrefilterStatus {
    /// What the datapath holds (the kernel's map, read back).
    pub realized: PrefilterSpec,
    /// The devices XDP runs on and how ("native" in the driver, or
    /// "generic" on skbs where the driver has no XDP).
    pub devices: Vec<PrefilterDevice>,
    /// Per CIDR: packets and bytes dropped, since the CIDR went in.
    pub counters: Vec<PrefilterCounter>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PrefilterDevice {
    pub name: String,
    pub mode: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct PrefilterCounter {
    pub cidr: String,
    pub packets: u64,
    pub bytes: u64,
}
