//! The flow observer, Hubble-compatible: the agent turns the datapath's
//! events (one subscriber of the [`EventHub`]) into `flow.Flow` records
//! with endpoints, identities and labels, keeps the last
//! `--hubble-event-buffer-capacity` of them in a ring, and serves Hubble's
//! `observer.Observer` and `peer.Peer` over gRPC (tonic) on a unix socket
//! and a TCP address, with server reflection and the gRPC health service.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ciliate_api::models::Endpoint as ApiEndpoint;
use ciliate_common::{ct, drop, event, metrics, policy, trace};
use ciliate_datapath::events::Event;
use ciliate_hubble::{
    filter::FlowFilters,
    flow::{
        self, CiliumEventType, DropReason, Endpoint, Flow, FlowType, Ip, IpVersion, Layer4,
        LostEvent, LostEventSource, NetworkInterface, TcpFlags, TraceObservationPoint,
        TrafficDirection, Verdict, layer4::Protocol,
    },
    observer::{
        self, GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
        observer_server::Observer as ObserverApi,
    },
    peer::{self, peer_server::Peer as PeerApi},
};
use futures::Stream;
use pbjson_types::{BoolValue, Timestamp};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status};

use crate::{
    endpoint::EndpointsView,
    events::{EventHub, IfNames, LostCause, Record},
    kvstore::KvStore,
};

/// Hubble's default ring size.
pub const DEFAULT_CAPACITY: usize = 4095;
/// Hubble's observer port.
pub const DEFAULT_PORT: u16 = 4244;
/// The version the server reports (ServerStatus, GetNodes, the
/// `hubble-server-version` header).
pub const VERSION: &str = concat!("ciliate-", env!("CARGO_PKG_VERSION"));

/// Cilium's monitor message types (`flow.CiliumEventType.type`).
pub const MSG_DROP: i32 = 1;
pub const MSG_TRACE: i32 = 4;
pub const MSG_POLICY_VERDICT: i32 = 9;

/// What the converter knows about endpoints and identities: the endpoint
/// manager's published view.
pub type View = watch::Receiver<Arc<EndpointsView>>;

/// A record the ring keeps or a follower is told.
#[derive(Clone, Debug)]
pub enum Item {
    Flow(Arc<Flow>),
    Lost(LostEvent),
}

struct Ring {
    flows: VecDeque<Arc<Flow>>,
    capacity: usize,
    /// Namespace → when a flow last named it (GetNamespaces: the last hour).
    namespaces: BTreeMap<String, Instant>,
}

/// A debug event with when it was read.
pub type Debugged = (Timestamp, Arc<flow::DebugEvent>);

/// The last debug events and their followers (`GetDebugEvents`).
struct DebugRing {
    events: VecDeque<Debugged>,
    capacity: usize,
}

/// The node's observer: its ring, its followers, its counters.
pub struct Observer {
    ring: Mutex<Ring>,
    debug: Mutex<DebugRing>,
    debug_tx: broadcast::Sender<Debugged>,
    tx: broadcast::Sender<Item>,
    seen: AtomicU64,
    lost: AtomicU64,
    node: String,
    started: Instant,
    /// `host:port` other nodes and relays reach this observer at.
    pub address: Mutex<String>,
    /// Hubble's metrics, once registered with the Prometheus endpoint.
    pub metrics: std::sync::OnceLock<crate::hubble_metrics::HubbleMetrics>,
}

impl Observer {
    pub fn new(node: &str, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::new(Ring {
                flows: VecDeque::with_capacity(capacity.min(1 << 16)),
                capacity: capacity.max(1),
                namespaces: BTreeMap::new(),
            }),
            tx: broadcast::channel(1024).0,
            debug: Mutex::new(DebugRing { events: VecDeque::new(), capacity: capacity.max(1) }),
            debug_tx: broadcast::channel(1024).0,
            seen: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            node: node.to_owned(),
            started: Instant::now(),
            address: Mutex::new(String::new()),
            metrics: std::sync::OnceLock::new(),
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `f` and tell the followers.
    pub fn push(&self, f: Flow) {
        if let Some(m) = self.metrics.get() {
            m.observe(&f);
        }
        let f = Arc::new(f);
        let mut r = self.ring();
        if r.flows.len() >= r.capacity {
            r.flows.pop_front();
        }
        for ep in [&f.source, &f.destination].into_iter().flatten() {
            if !ep.namespace.is_empty() {
                r.namespaces.insert(ep.namespace.clone(), Instant::now());
            }
        }
        r.flows.push_back(f.clone());
        self.seen.fetch_add(1, Ordering::Relaxed);
        // Sent under the lock: a request that snapshots the ring and
        // subscribes under it sees each flow exactly once.
        let _ = self.tx.send(Item::Flow(f));
    }

    /// Keep debug event `e` (read at `time`) and tell the followers.
    pub fn push_debug(&self, time: Timestamp, e: flow::DebugEvent) {
        let item = (time, Arc::new(e));
        let mut r = self.debug.lock().unwrap_or_else(|e| e.into_inner());
        if r.events.len() >= r.capacity {
            r.events.pop_front();
        }
        r.events.push_back(item.clone());
        // Under the lock, as for flows: each event once per request.
        let _ = self.debug_tx.send(item);
    }

    /// The debug ring and a subscription to what comes after it.
    fn debug_snapshot(&self) -> (Vec<Debugged>, broadcast::Receiver<Debugged>) {
        let r = self.debug.lock().unwrap_or_else(|e| e.into_inner());
        (r.events.iter().cloned().collect(), self.debug_tx.subscribe())
    }

    /// Tell the followers that `n` events were lost at `source`.
    pub fn lost(&self, source: LostEventSource, n: u64) {
        self.lost.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.lost(source, n);
        }
        let _ = self.tx.send(Item::Lost(LostEvent {
            source: source as i32,
            num_events_lost: n,
            cpu: None,
        }));
    }

    /// Every record from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Item> {
        self.tx.subscribe()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The ring's flows and a subscription to the ones after them.
    fn snapshot(&self) -> (Vec<Arc<Flow>>, broadcast::Receiver<Item>) {
        let r = self.ring();
        (r.flows.iter().cloned().collect(), self.tx.subscribe())
    }

    /// (flows in the ring, capacity, seen since start, lost).
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let r = self.ring();
        (
            r.flows.len() as u64,
            r.capacity as u64,
            self.seen.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }

    fn namespaces(&self) -> Vec<String> {
        let mut r = self.ring();
        r.namespaces.retain(|_, t| t.elapsed() < Duration::from_secs(3600));
        r.namespaces.keys().cloned().collect()
    }

    fn uptime_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

/// The services' published view.
pub type ServicesView = watch::Receiver<Arc<imbl::OrdMap<u16, ciliate_api::models::Service>>>;

/// What the parser follows: endpoints, identities and policy; services;
/// other nodes' pods.
pub struct Sources {
    pub endpoints: View,
    pub services: Option<ServicesView>,
    pub remote_pods: Option<crate::cluster::RemotePods>,
}

impl Sources {
    /// Bring `k` up to date with what changed (`all`: everything), each
    /// part made again only when its own view changed.
    fn refresh(&mut self, k: &mut Known, all: bool) {
        if self.endpoints.has_changed().unwrap_or(false) {
            k.set_view(self.endpoints.borrow_and_update().clone());
        }
        if let Some(s) = self.services.as_mut()
            && (all || s.has_changed().unwrap_or(false))
        {
            k.set_services(&s.borrow_and_update());
        }
        if let Some(r) = self.remote_pods.as_mut()
            && (all || r.has_changed().unwrap_or(false))
        {
            k.remote_pods = r.borrow_and_update().clone();
        }
    }
}

/// (direction, endpoint identity, peer identity, protocol, port).
type VerdictKey = (u8, u32, u32, u8, u16);

/// What the parser knows: the endpoint manager's view with its endpoints
/// indexed by address, the services' frontends, other nodes' pods (made
/// again only when a view changes, not per event), and which policies
/// decided each kind of verdict seen since.
pub struct Known {
    view: Arc<EndpointsView>,
    by_ip: HashMap<Ipv4Addr, u16>,
    /// (address, port, protocol) → service.
    services: HashMap<(Ipv4Addr, u16, u8), flow::Service>,
    remote_pods: imbl::OrdMap<Ipv4Addr, String>,
    deciding: Mutex<HashMap<VerdictKey, Vec<flow::Policy>>>,
}

impl Known {
    pub fn new(view: Arc<EndpointsView>) -> Self {
        let mut k = Self {
            view: view.clone(),
            by_ip: HashMap::new(),
            services: HashMap::new(),
            remote_pods: imbl::OrdMap::new(),
            deciding: Mutex::default(),
        };
        k.set_view(view);
        k
    }

    /// A new endpoints view: its address index, and no verdict is known
    /// to have been decided by its policy yet.
    fn set_view(&mut self, view: Arc<EndpointsView>) {
        self.by_ip = view.endpoints.values().map(|e| (e.ip, e.id)).collect();
        self.view = view;
        self.deciding = Mutex::default();
    }

    fn set_services(&mut self, svcs: &imbl::OrdMap<u16, ciliate_api::models::Service>) {
        self.services.clear();
        for s in svcs.values() {
            let (namespace, name) = s.spec.name.split_once('/').unwrap_or(("", &s.spec.name));
            if name.is_empty() {
                continue;
            }
            let svc = flow::Service { name: name.to_owned(), namespace: namespace.to_owned() };
            for f in &s.frontends {
                let a = &f.address;
                self.services.insert((a.ip, a.port, a.protocol.number()), svc.clone());
            }
        }
    }

    /// The policies that decided a verdict of endpoint identity `me` in
    /// `dir` for `peer` on `proto`/`port` (as `policy trace` finds them).
    fn deciding(&self, key: VerdictKey) -> Vec<flow::Policy> {
        let mut cache = self.deciding.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let (dir, me, peer, proto, port) = key;
        let v = &self.view;
        let labels = v.identities.get(me).cloned().unwrap_or_default();
        let t = crate::policy::trace_direction(
            &v.policy.rules,
            dir,
            &labels,
            peer,
            proto,
            port,
            &v.identities,
            &Default::default(),
        );
        let found: Vec<flow::Policy> = t
            .rules
            .iter()
            .filter_map(|src| {
                let mut parts = src.splitn(3, '/');
                let (kind, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
                let rule = v.policy.rules.iter().find(|r| &r.source == src);
                Some(flow::Policy {
                    name: name.to_owned(),
                    namespace: if ns == "-" { String::new() } else { ns.to_owned() },
                    labels: rule.map(|r| r.labels.clone()).unwrap_or_default(),
                    revision: v.policy.revision,
                    kind: kind.to_owned(),
                })
            })
            .collect();
        cache.insert(key, found.clone());
        found
    }
}

/// Turn the hub's records into flows until the hub closes.
pub async fn run_parser(
    obs: Arc<Observer>,
    hub: EventHub,
    mut src: Sources,
    ifnames: Arc<IfNames>,
) {
    let mut sub = hub.subscribe_internal();
    let mut known = Known::new(src.endpoints.borrow_and_update().clone());
    src.refresh(&mut known, true);
    while let Some(rec) = sub.next().await {
        match &*rec {
            Record::Event { time, event } => {
                src.refresh(&mut known, false);
                if let Event::Debug(d) = event {
                    obs.push_debug(ts(*time), to_debug_event(d, &known));
                } else if let Some(mut f) = to_flow(&obs.node, *time, event, &known) {
                    if let Some(i) = f.interface.as_mut() {
                        i.name = ifnames.name(i.index).await;
                    }
                    obs.push(f);
                }
            }
            Record::Lost { count, cause, .. } => obs.lost(
                match cause {
                    LostCause::RingFull => LostEventSource::PerfEventRingBuffer,
                    LostCause::TooSlow => LostEventSource::ObserverEventsQueue,
                },
                *count,
            ),
        }
    }
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// What a captured frame says: addresses, L4, TCP flags.
struct Packet {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: Option<Protocol>,
    eth: Option<(String, String)>,
}

fn mac(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_packet(frame: &[u8]) -> Option<Packet> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4b = ip.get(ihl..).unwrap_or(&[]);
    let port = |at: usize| u32::from(u16::from_be_bytes([l4b[at], l4b[at + 1]]));
    let l4 = match ip[9] {
        6 if l4b.len() >= 14 => {
            let fl = l4b[13];
            Some(Protocol::Tcp(flow::Tcp {
                source_port: port(0),
                destination_port: port(2),
                flags: Some(TcpFlags {
                    fin: fl & 0x01 != 0,
                    syn: fl & 0x02 != 0,
                    rst: fl & 0x04 != 0,
                    psh: fl & 0x08 != 0,
                    ack: fl & 0x10 != 0,
                    urg: fl & 0x20 != 0,
                    ece: fl & 0x40 != 0,
                    cwr: fl & 0x80 != 0,
                    ns: l4b[12] & 0x01 != 0,
                }),
            }))
        }
        17 if l4b.len() >= 4 => {
            Some(Protocol::Udp(flow::Udp { source_port: port(0), destination_port: port(2) }))
        }
        1 if l4b.len() >= 2 => Some(Protocol::IcmPv4(flow::IcmPv4 {
            r#type: u32::from(l4b[0]),
            code: u32::from(l4b[1]),
        })),
        _ => None,
    };
    Some(Packet { src, dst, l4, eth: Some((mac(&frame[6..12]), mac(&frame[0..6]))) })
}

/// The flow endpoint for `ip` with `identity`: a local endpoint's ID, pod
/// and labels, or the identity's labels.
fn endpoint(k: &Known, ip: Option<Ipv4Addr>, id_hint: u16, identity: u32) -> Endpoint {
    let v = &k.view;
    let local: Option<&ApiEndpoint> = v
        .endpoints
        .get(&id_hint)
        .filter(|_| id_hint != 0)
        .or_else(|| ip.and_then(|ip| v.endpoints.get(k.by_ip.get(&ip)?)));
    let identity = match (identity, local) {
        (0, Some(e)) => e.identity,
        (i, _) => i,
    };
    let labels: Vec<String> = v.identities.get(identity).cloned().unwrap_or_default();
    let namespace = crate::policy::label_value(&labels, crate::policy::NAMESPACE_LABEL)
        .unwrap_or_default()
        .to_owned();
    // The CNI call names a pod `namespace/name`; Hubble keeps the name. A
    // pod of another node is named by the cluster's ipcache.
    let pod = match local {
        Some(e) => Some(e.pod_name.as_str()),
        None => ip.and_then(|ip| k.remote_pods.get(&ip)).map(String::as_str),
    };
    Endpoint {
        id: local.map(|e| u32::from(e.id)).unwrap_or(0),
        identity,
        namespace,
        labels,
        pod_name: pod
            .map(|p| p.rsplit('/').next().unwrap_or_default().to_owned())
            .unwrap_or_default(),
        ..Default::default()
    }
}

fn flip(d: TrafficDirection) -> TrafficDirection {
    match d {
        TrafficDirection::Ingress => TrafficDirection::Egress,
        TrafficDirection::Egress => TrafficDirection::Ingress,
        d => d,
    }
}

/// A datapath debug event as Hubble's `flow.DebugEvent`: its type (Cilium's
/// number), the endpoint it is about, the packet hash, the arguments, the
/// message as `ciliate monitor -v` prints it, the CPU.
pub fn to_debug_event(d: &ciliate_common::event::DebugNotify, v: &Known) -> flow::DebugEvent {
    use pbjson_types::{Int32Value, UInt32Value};
    let source = (d.hdr.source != 0).then(|| endpoint(v, None, d.hdr.source, 0));
    flow::DebugEvent {
        r#type: i32::from(d.hdr.subtype),
        source,
        hash: Some(UInt32Value { value: d.hdr.hash }),
        arg1: Some(UInt32Value { value: d.arg1 }),
        arg2: Some(UInt32Value { value: d.arg2 }),
        arg3: Some(UInt32Value { value: d.arg3 }),
        message: ciliate_datapath::events::debug_message(d),
        cpu: Some(Int32Value { value: d.cpu as i32 }),
    }
}

/// One event as a flow (`None` for kinds the observer does not show).
pub fn to_flow(node: &str, time: SystemTime, ev: &Event, v: &Known) -> Option<Flow> {
    let pkt = parse_packet(ev.captured());
    let (src_ip, dst_ip) = (pkt.as_ref().map(|p| p.src), pkt.as_ref().map(|p| p.dst));
    let mut f = Flow {
        time: Some(ts(time)),
        uuid: uuid::Uuid::new_v4().to_string(),
        node_name: node.to_owned(),
        r#type: FlowType::L3L4 as i32,
        summary: ciliate_datapath::events::summary(ev.captured()),
        ..Default::default()
    };
    if let Some(p) = &pkt {
        f.ip = Some(Ip {
            source: p.src.to_string(),
            destination: p.dst.to_string(),
            ip_version: IpVersion::IPv4 as i32,
            ..Default::default()
        });
        f.l4 = p.l4.map(|p| Layer4 { protocol: Some(p) });
        // As Hubble: a service is named when an address and port of the
        // packet are its frontend's (socket LB never shows the frontend).
        let (sp, dp, proto) = match p.l4 {
            Some(Protocol::Tcp(t)) => (t.source_port, t.destination_port, 6),
            Some(Protocol::Udp(u)) => (u.source_port, u.destination_port, 17),
            _ => (0, 0, 0),
        };
        if proto != 0 {
            f.source_service = v.services.get(&(p.src, sp as u16, proto)).cloned().map(Box::new);
            f.destination_service =
                v.services.get(&(p.dst, dp as u16, proto)).cloned().map(Box::new);
        }
        f.ethernet = p.eth.clone().map(|(s, d)| flow::Ethernet { source: s, destination: d });
    }
    match ev {
        Event::Trace(t) => {
            let point = t.hdr.subtype;
            f.verdict = Verdict::Forwarded as i32;
            f.event_type = Some(CiliumEventType { r#type: MSG_TRACE, sub_type: i32::from(point) });
            f.trace_observation_point = if point == trace::TO_LXC {
                TraceObservationPoint::ToEndpoint as i32
            } else {
                i32::from(point)
            };
            let reply = t.ct_state == ct::CT_REPLY;
            f.is_reply = Some(BoolValue { value: reply });
            f.reply = reply;
            f.trace_reason = match t.ct_state {
                ct::CT_NEW => flow::TraceReason::New,
                ct::CT_ESTABLISHED => flow::TraceReason::Established,
                ct::CT_REPLY => flow::TraceReason::Reply,
                ct::CT_RELATED => flow::TraceReason::Related,
                _ => flow::TraceReason::Unknown,
            } as i32;
            let dir = if point == trace::TO_LXC {
                TrafficDirection::Ingress
            } else if t.hdr.source != 0 {
                TrafficDirection::Egress
            } else {
                TrafficDirection::Unknown
            };
            f.traffic_direction = if reply { flip(dir) } else { dir } as i32;
            let src_hint = if point == trace::TO_LXC { 0 } else { t.hdr.source };
            f.source = Some(endpoint(v, src_ip, src_hint, t.src_identity));
            f.destination = Some(endpoint(v, dst_ip, t.dst_id, t.dst_identity));
            f.interface = Some(NetworkInterface { index: t.ifindex, name: String::new() });
        }
        Event::Drop(d) => {
            let reason = d.hdr.subtype;
            f.verdict = Verdict::Dropped as i32;
            f.drop_reason = u32::from(reason);
            f.drop_reason_desc = DropReason::try_from(i32::from(reason))
                .map(|r| r as i32)
                .unwrap_or(DropReason::Unknown as i32);
            f.event_type = Some(CiliumEventType { r#type: MSG_DROP, sub_type: i32::from(reason) });
            let at_destination = d.dir == metrics::DIR_INGRESS;
            f.traffic_direction = match d.dir {
                metrics::DIR_INGRESS => TrafficDirection::Ingress,
                metrics::DIR_EGRESS => TrafficDirection::Egress,
                _ => TrafficDirection::Unknown,
            } as i32;
            let src_hint = if at_destination { 0 } else { d.hdr.source };
            f.source = Some(endpoint(v, src_ip, src_hint, d.src_identity));
            f.destination = Some(endpoint(v, dst_ip, d.dst_id as u16, d.dst_identity));
            f.interface = Some(NetworkInterface { index: d.ifindex, name: String::new() });
            f.file = Some(Box::new(flow::FileInfo {
                name: event::file_name(d.file).to_owned(),
                line: u32::from(d.line),
            }));
            f.summary = format!("{} ({})", drop::reason_name(reason), f.summary);
        }
        Event::PolicyVerdict(p) => {
            let allowed = p.verdict == event::VERDICT_ALLOWED;
            f.verdict = if allowed { Verdict::Forwarded } else { Verdict::Dropped } as i32;
            if !allowed {
                f.drop_reason = u32::from(drop::POLICY);
                f.drop_reason_desc = DropReason::PolicyDenied as i32;
            }
            f.event_type = Some(CiliumEventType { r#type: MSG_POLICY_VERDICT, sub_type: 0 });
            f.policy_match_type = u32::from(p.match_type);
            f.is_reply = Some(BoolValue { value: false });
            let me = p.hdr.source;
            let my_identity = v.view.endpoints.get(&me).map(|e| e.identity).unwrap_or(0);
            let (proto, port) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(Protocol::Tcp(t)) => (6, t.destination_port as u16),
                Some(Protocol::Udp(u)) => (17, u.destination_port as u16),
                Some(Protocol::IcmPv4(i)) => (1, i.r#type as u16),
                _ => (0, 0),
            };
            let by = v.deciding((p.dir, my_identity, p.remote_identity, proto, port));
            match (p.dir == policy::DIR_INGRESS, allowed) {
                (true, true) => f.ingress_allowed_by = by,
                (true, false) => f.ingress_denied_by = by,
                (false, true) => f.egress_allowed_by = by,
                (false, false) => f.egress_denied_by = by,
            }
            if p.dir == policy::DIR_INGRESS {
                f.traffic_direction = TrafficDirection::Ingress as i32;
                f.source = Some(endpoint(v, src_ip, 0, p.remote_identity));
                f.destination = Some(endpoint(v, dst_ip, me, 0));
            } else {
                f.traffic_direction = TrafficDirection::Egress as i32;
                f.source = Some(endpoint(v, src_ip, me, 0));
                f.destination = Some(endpoint(v, dst_ip, 0, p.remote_identity));
            }
        }
        Event::Debug(_) | Event::Capture(_) | Event::Unknown { .. } => return None,
    }
    Some(f)
}

/// Keep only the fields `paths` name (`source.pod_name`, `verdict`, …) —
/// a top-level field whole, or some fields of an endpoint or of `IP`.
pub fn mask(f: &Flow, paths: &[String]) -> Result<Flow, Status> {
    let mut out = Flow::default();
    let bad = |p: &str| Status::invalid_argument(format!("field_mask: unknown path {p:?}"));
    for p in paths {
        let (top, sub) = match p.split_once('.') {
            Some((t, s)) => (t, Some(s)),
            None => (p.as_str(), None),
        };
        macro_rules! whole {
            ($($name:literal => $field:ident),* $(,)?) => {
                match top {
                    $($name if sub.is_none() => { out.$field = f.$field.clone(); continue; })*
                    _ => {}
                }
            };
        }
        whole!(
            "time" => time, "uuid" => uuid, "verdict" => verdict, "drop_reason" => drop_reason,
            "ethernet" => ethernet, "IP" => ip, "l4" => l4, "source" => source,
            "destination" => destination, "Type" => r#type, "node_name" => node_name,
            "l7" => l7, "reply" => reply, "event_type" => event_type,
            "source_service" => source_service, "destination_service" => destination_service,
            "traffic_direction" => traffic_direction, "policy_match_type" => policy_match_type,
            "trace_observation_point" => trace_observation_point, "trace_reason" => trace_reason,
            "drop_reason_desc" => drop_reason_desc, "is_reply" => is_reply,
            "interface" => interface, "file" => file, "Summary" => summary,
            "egress_allowed_by" => egress_allowed_by, "ingress_allowed_by" => ingress_allowed_by,
            "egress_denied_by" => egress_denied_by, "ingress_denied_by" => ingress_denied_by,
        );
        match (top, sub) {
            ("source" | "destination", Some(field)) => {
                let from = if top == "source" { &f.source } else { &f.destination };
                let to = if top == "source" { &mut out.source } else { &mut out.destination };
                let (from, to) = (from.clone().unwrap_or_default(), to.get_or_insert_default());
                match field {
                    "ID" => to.id = from.id,
                    "identity" => to.identity = from.identity,
                    "namespace" => to.namespace = from.namespace,
                    "labels" => to.labels = from.labels,
                    "pod_name" => to.pod_name = from.pod_name,
                    "cluster_name" => to.cluster_name = from.cluster_name,
                    "workloads" => to.workloads = from.workloads,
                    _ => return Err(bad(p)),
                }
            }
            ("IP", Some(field)) => {
                let (from, to) = (f.ip.clone().unwrap_or_default(), out.ip.get_or_insert_default());
                match field {
                    "source" => to.source = from.source,
                    "destination" => to.destination = from.destination,
                    "ipVersion" => to.ip_version = from.ip_version,
                    _ => return Err(bad(p)),
                }
            }
            _ => return Err(bad(p)),
        }
    }
    Ok(out)
}

pub fn response(node: &str, item: &Item) -> GetFlowsResponse {
    match item {
        Item::Flow(f) => GetFlowsResponse {
            time: f.time,
            node_name: node.to_owned(),
            response_types: Some(ResponseTypes::Flow((**f).clone())),
        },
        Item::Lost(l) => GetFlowsResponse {
            time: Some(ts(SystemTime::now())),
            node_name: node.to_owned(),
            response_types: Some(ResponseTypes::LostEvents(*l)),
        },
    }
}

fn ts_time(t: &Timestamp) -> (i64, i32) {
    (t.seconds, t.nanos)
}

/// Whether flow time `t` is within [since, until].
fn in_window(t: Option<&Timestamp>, since: Option<&Timestamp>, until: Option<&Timestamp>) -> bool {
    let t = t.map(ts_time).unwrap_or_default();
    since.is_none_or(|s| t >= ts_time(s)) && until.is_none_or(|u| t <= ts_time(u))
}

/// Which of the held records (oldest first) a request gets before any it
/// follows: `since` wins over `number` (the first or last N); without
/// either, a follower starts with what comes next and a one-shot request
/// gets them all.
fn select_past<T>(past: &mut Vec<T>, since: bool, number: u64, first: bool, follow: bool) {
    if since {
        return;
    }
    let n = number as usize;
    if n > 0 {
        if first {
            past.truncate(n);
        } else if past.len() > n {
            past.drain(..past.len() - n);
        }
    } else if follow {
        past.clear();
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;
/// The observer API's other streams (the relay serves them too).
pub type AgentEventsStream =
    Pin<Box<dyn Stream<Item = Result<observer::GetAgentEventsResponse, Status>> + Send>>;
pub type DebugEventsStream =
    Pin<Box<dyn Stream<Item = Result<observer::GetDebugEventsResponse, Status>> + Send>>;

/// The gRPC services of one node.
#[derive(Clone)]
pub struct Service {
    pub observer: Arc<Observer>,
    pub kv: Arc<dyn KvStore>,
    pub port: u16,
    /// The flow export file, read back for a `since` older than the ring.
    pub export: Option<std::path::PathBuf>,
}

fn with_version<T>(mut r: Response<T>) -> Response<T> {
    if let Ok(v) = VERSION.parse() {
        r.metadata_mut().insert("hubble-server-version", v);
    }
    r
}

#[tonic::async_trait]
impl ObserverApi for Service {
    type GetFlowsStream = FlowStream;
    type GetAgentEventsStream = AgentEventsStream;
    type GetDebugEventsStream = DebugEventsStream;

    async fn get_flows(
        &self,
        req: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let r = req.into_inner();
        if r.first && r.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        let filters = Arc::new(
            FlowFilters::new(&r.whitelist, &r.blacklist)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        );
        let paths = r.field_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        if !paths.is_empty() {
            mask(&Flow::default(), &paths)?;
        }
        let (since, until) = (r.since, r.until);
        let (flows, mut live) = self.observer.snapshot();
        // A `since` older than the ring's oldest flow: the exported flows
        // before it first (the ring may have lost them, or the agent
        // restarted since).
        let oldest = flows.first().and_then(|f| f.time);
        let older = match (&since, &oldest) {
            (Some(s), Some(o)) => ts_time(s) < ts_time(o),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let mut past: Vec<Arc<Flow>> = match (&self.export, older) {
            (Some(path), true) => {
                let (path, filters) = (path.clone(), filters.clone());
                tokio::task::spawn_blocking(move || {
                    crate::hubble_export::read_back(
                        &path,
                        since.as_ref(),
                        until.as_ref(),
                        oldest.as_ref(),
                        &filters,
                    )
                })
                .await
                .map_err(|e| Status::internal(format!("reading exported flows: {e}")))?
            }
            _ => vec![],
        };
        past.extend(
            flows
                .into_iter()
                .filter(|f| in_window(f.time.as_ref(), since.as_ref(), until.as_ref()))
                .filter(|f| filters.passes(f)),
        );
        select_past(&mut past, since.is_some(), r.number, r.first, r.follow);
        let node = self.observer.node.clone();
        let (tx, rx) = mpsc::channel::<Result<GetFlowsResponse, Status>>(256);
        let follow = r.follow;
        tokio::spawn(async move {
            let send = |item: &Item| -> Result<GetFlowsResponse, Status> {
                let mut resp = response(&node, item);
                if let (false, Some(ResponseTypes::Flow(f))) =
                    (paths.is_empty(), resp.response_types.as_ref())
                {
                    resp.response_types = Some(ResponseTypes::Flow(mask(f, &paths)?));
                }
                Ok(resp)
            };
            for f in past {
                if tx.send(send(&Item::Flow(f))).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let item = match live.recv().await {
                    Ok(i) => i,
                    Err(broadcast::error::RecvError::Lagged(n)) => Item::Lost(LostEvent {
                        source: LostEventSource::HubbleRingBuffer as i32,
                        num_events_lost: n,
                        cpu: None,
                    }),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if let Item::Flow(f) = &item {
                    if until.as_ref().is_some_and(|u| !in_window(f.time.as_ref(), None, Some(u))) {
                        return;
                    }
                    if !filters.passes(f) {
                        continue;
                    }
                }
                if tx.send(send(&item)).await.is_err() {
                    return;
                }
            }
        });
        Ok(with_version(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))))
    }

    async fn get_agent_events(
        &self,
        _: Request<observer::GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Ok(with_version(Response::new(Box::pin(futures::stream::empty()))))
    }

    /// The datapath's debug events (while debugging is on for an endpoint
    /// or the node), with the same number, first, follow, since and until
    /// as GetFlows.
    async fn get_debug_events(
        &self,
        req: Request<observer::GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        let r = req.into_inner();
        if r.first && r.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        let (since, until) = (r.since, r.until);
        let (ring, mut live) = self.observer.debug_snapshot();
        let mut past: Vec<Debugged> = ring
            .into_iter()
            .filter(|(t, _)| in_window(Some(t), since.as_ref(), until.as_ref()))
            .collect();
        select_past(&mut past, since.is_some(), r.number, r.first, r.follow);
        let node = self.observer.node.clone();
        let (tx, rx) = mpsc::channel(256);
        let follow = r.follow;
        tokio::spawn(async move {
            let answer = |(t, e): &Debugged| {
                Ok(observer::GetDebugEventsResponse {
                    debug_event: Some((**e).clone()),
                    node_name: node.clone(),
                    time: Some(*t),
                })
            };
            for d in &past {
                if tx.send(answer(d)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let d = match live.recv().await {
                    Ok(d) => d,
                    // A follower that fell behind goes on with what comes.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if until.as_ref().is_some_and(|u| !in_window(Some(&d.0), None, Some(u))) {
                    return;
                }
                if tx.send(answer(&d)).await.is_err() {
                    return;
                }
            }
        });
        Ok(with_version(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))))
    }

    async fn get_nodes(
        &self,
        _: Request<observer::GetNodesRequest>,
    ) -> Result<Response<observer::GetNodesResponse>, Status> {
        let (num, max, seen, _) = self.observer.counts();
        let node = observer::Node {
            name: self.observer.node.clone(),
            version: VERSION.into(),
            address: self.observer.address.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            state: ciliate_hubble::relay::NodeState::NodeConnected as i32,
            tls: Some(observer::Tls { enabled: false, server_name: String::new() }),
            uptime_ns: self.observer.uptime_ns(),
            num_flows: num,
            max_flows: max,
            seen_flows: seen,
        };
        Ok(with_version(Response::new(observer::GetNodesResponse { nodes: vec![node] })))
    }

    async fn get_namespaces(
        &self,
        _: Request<observer::GetNamespacesRequest>,
    ) -> Result<Response<observer::GetNamespacesResponse>, Status> {
        let namespaces = self
            .observer
            .namespaces()
            .into_iter()
            .map(|namespace| observer::Namespace { cluster: String::new(), namespace })
            .collect();
        Ok(with_version(Response::new(observer::GetNamespacesResponse { namespaces })))
    }

    async fn server_status(
        &self,
        _: Request<observer::ServerStatusRequest>,
    ) -> Result<Response<observer::ServerStatusResponse>, Status> {
        let (num, max, seen, _) = self.observer.counts();
        let rate = seen as f64 / self.observer.started.elapsed().as_secs_f64().max(1.0);
        Ok(with_version(Response::new(observer::ServerStatusResponse {
            num_flows: num,
            max_flows: max,
            seen_flows: seen,
            uptime_ns: self.observer.uptime_ns(),
            num_connected_nodes: Some(pbjson_types::UInt32Value { value: 1 }),
            num_unavailable_nodes: Some(pbjson_types::UInt32Value { value: 0 }),
            unavailable_nodes: vec![],
            version: VERSION.into(),
            flows_rate: rate,
        })))
    }
}

/// A node record of the store as a peer: (name, observer address).
fn peer_of(value: &[u8], port: u16) -> Option<(String, String)> {
    let n = serde_json::from_slice::<crate::cluster::NodeRecord>(value).ok()?;
    Some((n.name, format!("{}:{port}", IpAddr::V4(n.ip))))
}

fn note(
    (name, address): &(String, String),
    t: peer::ChangeNotificationType,
) -> peer::ChangeNotification {
    peer::ChangeNotification {
        name: name.clone(),
        address: address.clone(),
        r#type: t as i32,
        tls: None,
    }
}

type Peers = BTreeMap<String, (String, String)>;
type Notes = Vec<peer::ChangeNotification>;

/// Store key `k` now holds node record `v`: a peer added or updated.
fn put_peer(known: &mut Peers, notes: &mut Notes, k: String, v: &[u8], port: u16) {
    use peer::ChangeNotificationType::{PeerAdded, PeerUpdated};
    let Some(p) = peer_of(v, port) else { return };
    match known.insert(k, p.clone()) {
        None => notes.push(note(&p, PeerAdded)),
        Some(old) if old != p => notes.push(note(&p, PeerUpdated)),
        _ => {}
    }
}

/// The cluster's observers as the store's node records tell them (each at
/// its node's address and `port`): every node as PEER_ADDED, then each
/// change, as the store's watch of the nodes tells it, until the receiver
/// is dropped or the watch ends. The peer service and the relay's store
/// discovery both follow it.
pub async fn peer_notes(
    kv: Arc<dyn KvStore>,
    port: u16,
) -> Result<mpsc::Receiver<peer::ChangeNotification>, crate::kvstore::KvError> {
    use crate::kvstore::WatchEvent;
    use peer::ChangeNotificationType::PeerDeleted;
    let mut watch = kv.watch(crate::kvstore::NODES).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // Store key → peer.
        let mut known = Peers::new();
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = watch.recv() => match ev { Some(ev) => ev, None => return },
            };
            let mut notes = Vec::new();
            match ev {
                WatchEvent::Put(k, v) => put_peer(&mut known, &mut notes, k, &v, port),
                WatchEvent::Delete(k) => {
                    if let Some(p) = known.remove(&k) {
                        notes.push(note(&p, PeerDeleted));
                    }
                }
                WatchEvent::Sync(all) => {
                    let keys: std::collections::BTreeSet<&String> =
                        all.iter().map(|(k, _)| k).collect();
                    let gone: Vec<String> =
                        known.keys().filter(|k| !keys.contains(k)).cloned().collect();
                    for k in gone {
                        if let Some(p) = known.remove(&k) {
                            notes.push(note(&p, PeerDeleted));
                        }
                    }
                    for (k, v) in all {
                        put_peer(&mut known, &mut notes, k, &v, port);
                    }
                }
                WatchEvent::Error(_) => {}
            }
            for n in notes {
                if tx.send(n).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

#[tonic::async_trait]
impl PeerApi for Service {
    type NotifyStream =
        Pin<Box<dyn Stream<Item = Result<peer::ChangeNotification, Status>> + Send>>;

    /// Every node of the cluster store as PEER_ADDED, then each change.
    async fn notify(
        &self,
        _: Request<peer::NotifyRequest>,
    ) -> Result<Response<Self::NotifyStream>, Status> {
        use futures::StreamExt as _;
        let rx = peer_notes(self.kv.clone(), self.port)
            .await
            .map_err(|e| Status::unavailable(format!("watching nodes: {e}")))?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))))
    }
}

/// Reflection (v1 and v1alpha) listing every service served here, and the
/// health service saying `hubble.server.Observer` (and the server) serve:
/// what grpcurl and the hubble CLI look for.
pub async fn common_services(
    router: tonic::transport::server::Router,
) -> anyhow::Result<tonic::transport::server::Router> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_service_status("hubble.server.Observer", tonic_health::ServingStatus::Serving).await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ciliate_hubble::DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    Ok(router
        .add_service(health_svc)
        .add_service(described().build_v1()?)
        .add_service(described().build_v1alpha()?))
}

/// Serve the observer, the peer service, reflection and health on the unix
/// socket `socket` and on `tcp` (if any) until `shutdown`.
pub async fn serve(
    svc: Service,
    socket: Option<std::path::PathBuf>,
    tcp: Option<std::net::SocketAddr>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let router = tonic::transport::Server::builder()
        .add_service(observer::observer_server::ObserverServer::new(svc.clone()))
        .add_service(peer::peer_server::PeerServer::new(svc));
    serve_on(common_services(router).await?, socket, tcp, shutdown).await
}

/// Serve `router` on the unix socket `socket` and on `tcp` until `shutdown`.
pub async fn serve_on(
    router: tonic::transport::server::Router,
    socket: Option<std::path::PathBuf>,
    tcp: Option<std::net::SocketAddr>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    if let Some(path) = socket {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        // Flows name pods and addresses: the socket is its owner's only.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let (router, mut shutdown) = (router.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            router.serve_with_incoming_shutdown(incoming, crate::api::stopped(&mut shutdown)).await
        }));
    }
    if let Some(addr) = tcp {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            router.serve_with_incoming_shutdown(incoming, crate::api::stopped(&mut shutdown)).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
