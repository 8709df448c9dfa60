//! The node in its cluster, through the kvstore: cluster-pool IPAM (a pod
//! CIDR claimed for this node), node registration under a lease, this
//! node's endpoints published into the cluster ipcache, and the other
//! nodes' nodes, endpoints and identities brought into this node's
//! datapath (ipcache entries with their tunnel endpoint, routes in native
//! routing) and policy.
//!
//! [`ClusterSync::run`] follows the store through watches (no polling): the
//! other nodes, their endpoints and the cluster's identities come in as
//! they change; this node's record and endpoints go out as they change,
//! under a lease kept alive every few seconds. When the store is
//! unreachable the datapath keeps what it has (watches only report
//! failures, nothing is removed), [`KvStatus`] says so, and after the store
//! returns everything converges (each watch starts over with a full
//! listing that is diffed against what is known; the node and its entries
//! are written again, under a new lease if the old one expired).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use serde::{Deserialize, Serialize};

use crate::{
    ipam::Cidr,
    kvstore::{
        CIDRS, Cond, IDENTITY_IDS, IDENTITY_USERS, IDENTITY_VALUES, IPS, KvError, KvStore, NODES,
        Op, WatchEvent,
    },
};

/// Seconds a node's lease lives without keepalive: a node that stops is
/// removed from the others' maps this long after.
pub const LEASE_TTL: i64 = 15;

/// How a node reaches the pods of the others.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    #[default]
    Tunnel,
    Native,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tunnel" => Ok(Self::Tunnel),
            "native" => Ok(Self::Native),
            other => Err(format!("routing mode {other:?}: \"tunnel\" or \"native\"")),
        }
    }
}

/// Do `a` and `b` share their first `len` bits?
fn within(a: Ipv4Addr, b: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
    u32::from(a) & mask == u32::from(b) & mask
}

/// A node as registered in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeRecord {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub routing: Routing,
    /// The health endpoint's address, when it runs.
    #[serde(default)]
    pub health_ip: Option<Ipv4Addr>,
}

impl NodeRecord {
    pub fn cidr(&self) -> Option<Cidr> {
        self.pod_cidr.parse().ok()
    }

    /// Why another node's record cannot be taken by this node (`self`) (it claims this node's
    /// address or pod CIDR, or names no CIDR): a corrupt or hostile entry
    /// in the store must not reroute this node's pods. `None`: it can.
    pub fn refuse_node(&self, name: &str, n: &NodeRecord) -> Option<String> {
        if n.name != name {
            return Some(format!("it names node {:?}", n.name));
        }
        if n.ip == self.ip {
            return Some(format!("it claims this node's address {}", n.ip));
        }
        let Some(theirs) = n.cidr() else {
            return Some(format!("pod CIDR {:?} is not a CIDR", n.pod_cidr));
        };
        let mine = self.cidr()?;
        let shorter = theirs.len.min(mine.len);
        (within(theirs.net, mine.net, shorter))
            .then(|| format!("its pod CIDR {theirs} overlaps this node's {mine}"))
    }

    /// Why another node's endpoint record cannot be taken by this node: filed under
    /// another address, an address of this node's, or an identity no pod
    /// has (reserved ones but health's, local CIDR ones). `None`: it can.
    pub fn refuse_ip(&self, key: Ipv4Addr, r: &IpRecord) -> Option<String> {
        use ciliate_common::identity as id;
        if r.node == self.name {
            return None;
        }
        if r.ip != key {
            return Some(format!("it is for {} but filed under {key}", r.ip));
        }
        if r.ip == self.ip || self.cidr().is_some_and(|c| within(r.ip, c.net, c.len)) {
            return Some(format!("{} is this node's address", r.ip));
        }
        let pod = r.identity == id::HEALTH || id::is_cluster(r.identity);
        (!pod).then(|| format!("identity {} is no pod's", r.identity))
    }
}

/// An endpoint's address as published into the cluster ipcache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRecord {
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub node: String,
    /// The node's address: the tunnel endpoint of this IP.
    pub host_ip: Ipv4Addr,
    /// The pod's `namespace/name`, for flows seen on other nodes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
}

/// What `status` shows about the store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KvStatus {
    pub store: String,
    pub ok: bool,
    /// The last error, while failing.
    pub error: Option<String>,
    /// Seconds the store has been failing.
    pub failing_for: u64,
    pub nodes: usize,
    pub remote_ips: usize,
    /// Nodes whose health responder did not answer the last probe.
    pub unreachable: Vec<String>,
}

impl KvStatus {
    /// "local /path: ok", "etcd host:port: failing for 12s (…), retrying".
    pub fn describe(&self) -> String {
        match (&self.error, self.ok) {
            (Some(e), _) => {
                format!("{}: failing for {}s ({e}), retrying", self.store, self.failing_for)
            }
            (None, true) => format!("{}: ok", self.store),
            (None, false) => format!("{}: connecting", self.store),
        }
    }
}

/// The datapath side of cluster membership.
pub trait ClusterDatapath: Send {
    /// A remote endpoint's address: identity and tunnel endpoint.
    fn upsert_remote_ip(&mut self, r: &IpRecord) -> Result<(), String>;
    fn remove_remote_ip(&mut self, ip: Ipv4Addr) -> Result<(), String>;
    /// Another node joined or changed: its address (remote-node identity),
    /// and in native routing a route to its pod CIDR.
    fn upsert_node(&mut self, n: &NodeRecord) -> Result<(), String>;
    fn remove_node(&mut self, n: &NodeRecord) -> Result<(), String>;
    /// For tests that look into a [`MemoryCluster`].
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// The datapath in memory, for tests.
#[derive(Default)]
pub struct MemoryCluster {
    pub ips: BTreeMap<Ipv4Addr, IpRecord>,
    pub nodes: BTreeMap<String, NodeRecord>,
}

impl ClusterDatapath for MemoryCluster {
    fn upsert_remote_ip(&mut self, r: &IpRecord) -> Result<(), String> {
        self.ips.insert(r.ip, r.clone());
        Ok(())
    }
    fn remove_remote_ip(&mut self, ip: Ipv4Addr) -> Result<(), String> {
        self.ips.remove(&ip);
        Ok(())
    }
    fn upsert_node(&mut self, n: &NodeRecord) -> Result<(), String> {
        self.nodes.insert(n.name.clone(), n.clone());
        Ok(())
    }
    fn remove_node(&mut self, n: &NodeRecord) -> Result<(), String> {
        self.nodes.remove(&n.name);
        Ok(())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Claim this node's pod CIDR from the cluster pool `pool` (subnets of
/// `/mask`): the one it had, or the first free one, atomically.
pub async fn claim_pod_cidr(
    kv: &dyn KvStore,
    node: &str,
    pool: Cidr,
    mask: u8,
) -> Result<Cidr, String> {
    let by_node = format!("{CIDRS}by-node/{node}");
    if let Some(v) = kv.get(&by_node).await.map_err(|e| e.to_string())? {
        return String::from_utf8_lossy(&v).parse().map_err(|e| format!("{by_node}: {e}"));
    }
    if mask < pool.len || mask > 30 {
        return Err(format!("pod CIDR size /{mask} does not fit the cluster pool {pool}"));
    }
    for cidr in pool.blocks(mask).take(65536) {
        let key = format!("{CIDRS}{}-{mask}", cidr.net);
        let cidr_text = cidr.to_string();
        let kvs: [(&str, &[u8]); 2] =
            [(key.as_str(), node.as_bytes()), (by_node.as_str(), cidr_text.as_bytes())];
        if kv.create_all(&kvs, None).await.map_err(|e| e.to_string())? {
            return Ok(cidr);
        }
    }
    Err(format!("the cluster pool {pool} has no free /{mask} left"))
}

/// The store's keys of identity `id` of `labels`: label set → ID, and
/// ID → label set (JSON).
fn identity_keys(id: u32, labels: &[String]) -> (String, String) {
    (format!("{IDENTITY_VALUES}{}", labels.join(";")), format!("{IDENTITY_IDS}{id}"))
}

/// Identity `id` of `labels` as the store holds it: the value key with
/// the ID, the ID key with the label set (JSON). (What an allocation
/// writes, for tools that write identities themselves: the benchmarks.)
pub fn identity_records(id: u32, labels: &[String]) -> [(String, Vec<u8>); 2] {
    let (value_key, id_key) = identity_keys(id, labels);
    let json = serde_json::to_vec(labels).unwrap_or_default();
    [(value_key, id.to_string().into_bytes()), (id_key, json)]
}

/// The key saying that `node` has an endpoint of identity `id`.
fn user_key(id: u32, node: &str) -> String {
    format!("{IDENTITY_USERS}{id}/{node}")
}

/// Allocate the cluster identity of `labels` through the store for a new
/// endpoint on `node`: the one it has, or the lowest free one from `min`,
/// created together with its reverse key in one transaction so two nodes
/// cannot race. Either way `node` is recorded as a user of it in the same
/// transaction, so the identity's garbage collection (which deletes only
/// identities without users) cannot take it away in between.
pub async fn allocate_identity(
    kv: &dyn KvStore,
    labels: &[String],
    min: u32,
    node: &str,
) -> Result<u32, KvError> {
    let value_key = identity_keys(0, labels).0;
    let labels_json = serde_json::to_vec(labels).unwrap_or_default();
    for _ in 0..64 {
        if let Some(v) = kv.get(&value_key).await?
            && let Ok(id) = String::from_utf8_lossy(&v).parse::<u32>()
        {
            let mark = user_key(id, node);
            let when = [Cond::Equals(&value_key, &v)];
            if kv.txn(&when, &[Op::Put(&mark, node.as_bytes(), None)]).await? {
                return Ok(id);
            }
            continue; // released meanwhile: allocate anew
        }
        let used: BTreeSet<u32> = kv
            .list(IDENTITY_IDS)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(IDENTITY_IDS)?.parse().ok())
            .collect();
        let id = (min..).find(|i| !used.contains(i)).unwrap_or(min);
        if create_identity(kv, id, labels, &labels_json, node, None).await? {
            return Ok(id);
        }
    }
    Err(KvError::Protocol {
        endpoint: kv.describe(),
        reason: format!("no identity for {labels:?} after 64 attempts"),
    })
}

/// Create identity `id` of `labels` with `node` as its user, if neither
/// the ID nor the label set is taken.
async fn create_identity(
    kv: &dyn KvStore,
    id: u32,
    labels: &[String],
    labels_json: &[u8],
    node: &str,
    lease: Option<i64>,
) -> Result<bool, KvError> {
    let (value_key, id_key) = identity_keys(id, labels);
    let (id_text, mark) = (id.to_string(), user_key(id, node));
    kv.txn(
        &[Cond::Absent(&value_key), Cond::Absent(&id_key)],
        &[
            Op::Put(&value_key, id_text.as_bytes(), None),
            Op::Put(&id_key, labels_json, None),
            Op::Put(&mark, node.as_bytes(), lease),
        ],
    )
    .await
}

/// The node in its cluster (see the module comment).
/// Does the health responder at `ip:port` answer `GET /hello` with 200
/// within `timeout`?
pub async fn probe_health(ip: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let probe = async {
        let stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/hello")
            .header(hyper::header::HOST, ip.to_string())
            .body(http_body_util::Empty::new())
            .ok()?;
        Some(send.send_request(req).await.ok()?.status() == hyper::StatusCode::OK)
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

/// The node's health responder: `GET /hello` answers 200 (what other
/// nodes probe), on every address of the node, until `shutdown`.
pub async fn serve_health(port: u16, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { crate::api::stopped(&mut shutdown).await })
        .await
}

/// This node's endpoints as published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mine {
    /// Address → (identity, pod `namespace/name`).
    pub ips: BTreeMap<Ipv4Addr, (u32, String)>,
    /// The labels of the identities of `ips` (the node is their user).
    pub identities: BTreeMap<u32, Vec<String>>,
}
pub type LocalIps = watch::Receiver<Mine>;
/// Other nodes' endpoints: address → pod `namespace/name` (a persistent
/// map: a reader's copy is cheap).
pub type RemotePods = watch::Receiver<imbl::OrdMap<Ipv4Addr, String>>;
/// Identities the cluster allocated or released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityChange {
    /// Allocated (by any node): its ID and labels.
    Learned(Vec<(u32, Vec<String>)>),
    /// Released by the garbage collection: no node used them.
    Released(Vec<u32>),
    /// Every identity the store has (read by each garbage collection
    /// pass): what a node knows beyond it (an allocation and release the
    /// watch saw as one, or not at all) goes, what it lacks comes.
    InStore(BTreeMap<u32, Vec<String>>),
}
/// Where identities allocated or released in the cluster are handed on.
pub type Learned = mpsc::Sender<IdentityChange>;

/// Cilium's defaults for identity garbage collection: how often unused
/// identities are looked for, and how long one stays unused before it is
/// released (`--identity-gc-interval`, `--identity-heartbeat-timeout`).
pub const IDENTITY_GC_INTERVAL: Duration = Duration::from_secs(15 * 60);
pub const IDENTITY_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where the cluster's records come from when not from the kvstore
/// (Kubernetes CRD mode, `crate::k8s::crd`): every change under `prefix`
/// (`NODES`, `IPS`, `IDENTITY_IDS`) as (key, Some(value)) or (key, None),
/// in the kvstore's encoding.
/// `health` is told how the source fares (Ok after each list and change,
/// the error when a watch fails), as the kvstore's watches tell it.
pub trait RecordSource: Send + Sync {
    fn changes(
        &self,
        prefix: &'static str,
        health: Box<dyn Fn(Result<(), String>) + Send + Sync>,
    ) -> mpsc::Receiver<(String, Option<Vec<u8>>)>;
}

pub struct ClusterSync {
    pub kv: Arc<dyn KvStore>,
    /// CRD mode: other nodes, their endpoints and identities come from
    /// here, and this node's are published by the Kubernetes side (its
    /// CiliumNode, CiliumEndpoints, CiliumIdentities), not to the kvstore.
    pub source: Option<Arc<dyn RecordSource>>,
    pub me: NodeRecord,
    /// Datapath writes block (maps, netlink): they run on the blocking
    /// pool, one at a time.
    pub datapath: Arc<Mutex<Box<dyn ClusterDatapath>>>,
    pub status: Arc<Mutex<KvStatus>>,
    /// Seconds the node's lease lives without keepalive.
    pub lease_ttl: i64,
    /// Other nodes' health responders are probed on this port (0: not).
    pub health_port: u16,
    pub health_interval: Duration,
    /// The other nodes (name → address), as followed.
    remote: Mutex<BTreeMap<String, Ipv4Addr>>,
    /// Other nodes' pods by address, as followed (for the flow observer).
    pub remote_pods: watch::Sender<imbl::OrdMap<Ipv4Addr, String>>,
    /// Identity garbage collection: look every `identity_gc_interval`,
    /// release what no live node used for `identity_heartbeat_timeout`.
    pub identity_gc_interval: Duration,
    pub identity_heartbeat_timeout: Duration,
}

/// Seconds between probes of other nodes' health responders.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Failures of the sync's parts, for [`KvStatus`].
#[derive(Default)]
struct Health {
    failing: BTreeMap<&'static str, (Instant, String)>,
}

impl ClusterSync {
    pub fn new(
        kv: Arc<dyn KvStore>,
        me: NodeRecord,
        datapath: Box<dyn ClusterDatapath>,
        status: Arc<Mutex<KvStatus>>,
    ) -> Self {
        status.lock().unwrap_or_else(|e| e.into_inner()).store = kv.describe();
        Self {
            kv,
            me,
            datapath: Arc::new(Mutex::new(datapath)),
            status,
            lease_ttl: LEASE_TTL,
            health_port: 0,
            health_interval: HEALTH_INTERVAL,
            source: None,
            remote: Mutex::default(),
            remote_pods: watch::channel(imbl::OrdMap::new()).0,
            identity_gc_interval: IDENTITY_GC_INTERVAL,
            identity_heartbeat_timeout: IDENTITY_HEARTBEAT_TIMEOUT,
        }
    }

    /// Run until `shutdown`: this node's endpoints (`mine`: address →
    /// identity, as the endpoint manager has them) go out; other nodes,
    /// their endpoints and new identities come in (identities are handed
    /// to `learned`).
    pub async fn run(self, mine: LocalIps, learned: Learned, mut shutdown: watch::Receiver<bool>) {
        let health = Arc::new(Mutex::new(Health::default()));
        let this = Arc::new(self);
        if this.source.is_some() {
            // CRD mode: nothing of this node goes to the kvstore.
            tokio::select! {
                _ = this.clone().follow_nodes(health.clone()) => {}
                _ = this.clone().follow_ips(health.clone()) => {}
                _ = this.clone().follow_identities(learned.clone(), health.clone()) => {}
                _ = this.clone().probe_nodes() => {}
                _ = crate::api::stopped(&mut shutdown) => {}
            }
            drop(mine);
            return;
        }
        tokio::select! {
            _ = this.clone().publish(mine.clone(), health.clone()) => {}
            _ = this.clone().follow_nodes(health.clone()) => {}
            _ = this.clone().follow_ips(health.clone()) => {}
            _ = this.clone().follow_identities(learned.clone(), health.clone()) => {}
            _ = this.clone().collect_identities(mine, learned, health.clone()) => {}
            _ = this.clone().probe_nodes() => {}
            _ = crate::api::stopped(&mut shutdown) => {}
        }
    }

    /// Probe every other node's health responder each interval; those that
    /// do not answer are the status's (and `cilium_unreachable_nodes`')
    /// unreachable nodes.
    async fn probe_nodes(self: Arc<Self>) {
        if self.health_port == 0 {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(self.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let nodes: Vec<(String, Ipv4Addr)> = self
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(n, ip)| (n.clone(), *ip))
                .collect();
            let timeout = self.health_interval.min(Duration::from_secs(2));
            let probes = nodes.iter().map(|(_, ip)| probe_health(*ip, self.health_port, timeout));
            let answers = futures::future::join_all(probes).await;
            let unreachable: Vec<String> =
                nodes.into_iter().zip(answers).filter(|(_, ok)| !ok).map(|((n, _), _)| n).collect();
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if st.unreachable != unreachable {
                tracing::info!(subsystem = "cluster", ?unreachable, "node health changed");
                st.unreachable = unreachable;
            }
        }
    }

    /// Record the outcome of part `what` in the status.
    fn report(&self, health: &Mutex<Health>, what: &'static str, r: Result<(), String>) {
        let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
        let was_ok = h.failing.is_empty();
        match r {
            Ok(()) => {
                h.failing.remove(what);
            }
            Err(e) => {
                let since = h.failing.get(what).map_or_else(Instant::now, |(t, _)| *t);
                h.failing.insert(what, (since, e));
            }
        }
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match h.failing.values().min_by_key(|(t, _)| *t) {
            None => {
                if !was_ok {
                    tracing::info!(subsystem = "cluster", store = %st.store, "kvstore is back; state converges");
                }
                st.ok = true;
                st.error = None;
                st.failing_for = 0;
            }
            Some((since, e)) => {
                if was_ok {
                    tracing::warn!(subsystem = "cluster", error = %e, "kvstore failing; the datapath keeps what it has, retrying");
                }
                st.ok = false;
                st.error = Some(e.clone());
                st.failing_for = since.elapsed().as_secs();
            }
        }
    }

    /// Run a datapath change on the blocking pool.
    async fn datapath<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn ClusterDatapath) -> R + Send + 'static,
    ) -> R {
        let dp = self.datapath.clone();
        tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
            f(dp.as_mut())
        })
        .await
        .expect("a datapath task panicked")
    }

    /// This node's record and endpoints, under a lease kept alive; written
    /// again (under a new lease) when the old one is lost.
    async fn publish(self: Arc<Self>, mut mine: LocalIps, health: Arc<Mutex<Health>>) {
        let mut lease: Option<i64> = None;
        let mut published = Published::default();
        let mut backoff = Duration::from_millis(200);
        // Kept alive three times per lease (every 5 s for the 15 s lease).
        let mut keepalive =
            tokio::time::interval(Duration::from_millis(self.lease_ttl.max(1) as u64 * 1000 / 3));
        loop {
            let now = mine.borrow_and_update().clone();
            let r = self.publish_once(&mut lease, &mut published, &now).await;
            let failed = r.is_err();
            self.report(&health, "publishing this node", r);
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
                continue;
            }
            backoff = Duration::from_millis(200);
            tokio::select! {
                _ = keepalive.tick() => {
                    if let Some(l) = lease {
                        match self.kv.keepalive(l).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(subsystem = "cluster", "the node's lease expired; registering again");
                                lease = None;
                            }
                            Err(e) => self.report(&health, "publishing this node", Err(e.to_string())),
                        }
                    }
                }
                r = mine.changed() => if r.is_err() { return },
            }
        }
    }

    async fn publish_once(
        &self,
        lease: &mut Option<i64>,
        published: &mut Published,
        mine: &Mine,
    ) -> Result<(), String> {
        let e = |e: KvError| e.to_string();
        let l = match *lease {
            Some(l) => l,
            None => {
                let l = self.kv.grant(self.lease_ttl).await.map_err(e)?;
                let me = serde_json::to_vec(&self.me).unwrap_or_default();
                self.kv.put(&format!("{NODES}{}", self.me.name), &me, Some(l)).await.map_err(e)?;
                *lease = Some(l);
                *published = Published::default();
                l
            }
        };
        self.mark_identities(l, published, mine).await?;
        let published = &mut published.ips;
        for (ip, (identity, pod)) in &mine.ips {
            let r = IpRecord {
                ip: *ip,
                identity: *identity,
                node: self.me.name.clone(),
                host_ip: self.me.ip,
                pod: pod.clone(),
            };
            if published.get(ip) == Some(&r) {
                continue;
            }
            let v = serde_json::to_vec(&r).unwrap_or_default();
            self.kv.put(&format!("{IPS}{ip}"), &v, Some(l)).await.map_err(e)?;
            published.insert(*ip, r);
        }
        let gone: Vec<Ipv4Addr> =
            published.keys().filter(|ip| !mine.ips.contains_key(ip)).copied().collect();
        for ip in gone {
            self.kv.delete(&format!("{IPS}{ip}")).await.map_err(e)?;
            published.remove(&ip);
        }
        Ok(())
    }

    /// Record this node as the user of its endpoints' identities (under
    /// its lease), and as no longer the user of those it has no endpoint
    /// of. An identity released while this node's agent was away (its
    /// pods kept running) is created again with the same ID when it is
    /// free, so the datapath's identities stay true.
    async fn mark_identities(
        &self,
        lease: i64,
        published: &mut Published,
        mine: &Mine,
    ) -> Result<(), String> {
        let e = |e: KvError| e.to_string();
        let node = self.me.name.as_str();
        for (&id, labels) in
            mine.identities.iter().filter(|(id, _)| ciliate_common::identity::is_cluster(**id))
        {
            if published.users.contains(&id) {
                continue;
            }
            let (value_key, _) = identity_keys(id, labels);
            let (id_text, mark) = (id.to_string(), user_key(id, node));
            let when = [Cond::Equals(&value_key, id_text.as_bytes())];
            let marked = self
                .kv
                .txn(&when, &[Op::Put(&mark, node.as_bytes(), Some(lease))])
                .await
                .map_err(e)?;
            if !marked {
                let json = serde_json::to_vec(labels).unwrap_or_default();
                if create_identity(self.kv.as_ref(), id, labels, &json, node, Some(lease))
                    .await
                    .map_err(e)?
                {
                    tracing::warn!(
                        subsystem = "cluster",
                        identity = id,
                        ?labels,
                        "an identity of this node's endpoints was gone from the store; created again"
                    );
                } else {
                    tracing::error!(
                        subsystem = "cluster",
                        identity = id,
                        ?labels,
                        "an identity of this node's endpoints is gone from the store and its ID or labels are taken: its endpoints keep it until they are created again"
                    );
                }
            }
            published.users.insert(id);
        }
        let unused: Vec<u32> = published
            .users
            .iter()
            .filter(|id| !mine.identities.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            self.kv.delete(&user_key(id, node)).await.map_err(e)?;
            published.users.remove(&id);
        }
        Ok(())
    }

    /// Identity garbage collection (as Cilium's operator does it in
    /// kvstore mode, here by every agent: each deletion is a transaction
    /// that holds only while nobody uses the identity, so agents running
    /// it at once are safe). An identity with no user whose node is alive
    /// for the heartbeat timeout is released; every node then forgets it
    /// (and regenerates its policy without it).
    async fn collect_identities(
        self: Arc<Self>,
        mine: LocalIps,
        learned: Learned,
        health: Arc<Mutex<Health>>,
    ) {
        let mut unused_since: BTreeMap<u32, Instant> = BTreeMap::new();
        let mut tick = tokio::time::interval(self.identity_gc_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let used_here: BTreeSet<u32> = mine.borrow().identities.keys().copied().collect();
            let r = self.collect_identities_once(&mut unused_since, &used_here).await;
            let r = match r {
                Ok(in_store) => {
                    let _ = learned.send(IdentityChange::InStore(in_store)).await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            self.report(&health, "collecting identities", r);
        }
    }

    /// One pass of [`Self::collect_identities`]: the identities left in
    /// the store (ID → labels). A user
    /// record counts while its node is registered; this node's own counts
    /// only for the identities its endpoints have now (`used_here`: an ADD
    /// that allocated an identity and then failed leaves a record that
    /// must not keep the identity forever).
    async fn collect_identities_once(
        &self,
        unused_since: &mut BTreeMap<u32, Instant>,
        used_here: &BTreeSet<u32>,
    ) -> Result<BTreeMap<u32, Vec<String>>, String> {
        let e = |e: KvError| e.to_string();
        let ids = self.kv.list(IDENTITY_IDS).await.map_err(e)?;
        let users = self.kv.list(IDENTITY_USERS).await.map_err(e)?;
        let nodes: BTreeSet<String> = self
            .kv
            .list(NODES)
            .await
            .map_err(e)?
            .into_iter()
            .filter_map(|(k, _)| Some(k.strip_prefix(NODES)?.to_owned()))
            .collect();
        let mut users_of: BTreeMap<u32, Vec<(String, bool)>> = BTreeMap::new();
        for (k, _) in users {
            if let Some((id, node)) = k.strip_prefix(IDENTITY_USERS).and_then(|r| r.split_once('/'))
                && let Ok(id) = id.parse::<u32>()
            {
                let alive = if node == self.me.name {
                    used_here.contains(&id)
                } else {
                    nodes.contains(node)
                };
                users_of.entry(id).or_default().push((k.clone(), alive));
            }
        }
        let now = Instant::now();
        let mut left = BTreeMap::new();
        let mut present = BTreeSet::new();
        for (k, json) in ids {
            let Some(id) = k.strip_prefix(IDENTITY_IDS).and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            present.insert(id);
            let labels: Vec<String> = serde_json::from_slice(&json).unwrap_or_default();
            let users = users_of.remove(&id).unwrap_or_default();
            if users.iter().any(|(_, alive)| *alive) {
                unused_since.remove(&id);
                left.insert(id, labels);
                continue;
            }
            let since = *unused_since.entry(id).or_insert(now);
            if now.duration_since(since) < self.identity_heartbeat_timeout {
                left.insert(id, labels);
                continue;
            }
            // Users that do not count (their node is gone) go first.
            for (mark, _) in &users {
                self.kv.delete(mark).await.map_err(e)?;
            }
            let (value_key, id_key) = identity_keys(id, &labels);
            let (id_text, mine) = (id.to_string(), format!("{IDENTITY_USERS}{id}/"));
            let when = [
                Cond::NoneUnder(&mine),
                Cond::Equals(&id_key, &json),
                Cond::Equals(&value_key, id_text.as_bytes()),
            ];
            let done = self
                .kv
                .txn(&when, &[Op::Delete(&id_key), Op::Delete(&value_key)])
                .await
                .map_err(e)?;
            if done {
                tracing::info!(
                    subsystem = "cluster",
                    identity = id,
                    ?labels,
                    "identity released: no endpoint had it"
                );
            } else {
                left.insert(id, labels);
            }
            unused_since.remove(&id);
        }
        unused_since.retain(|id, _| present.contains(id));
        Ok(left)
    }

    /// Follow a prefix: every change arrives as (key, Some(value)) or
    /// (key, None); a `Sync` (first list, or a resync after the watch was
    /// lost) is turned into the changes against what was known. The
    /// watch is re-opened with backoff whenever it ends.
    fn changes(
        self: &Arc<Self>,
        prefix: &'static str,
        what: &'static str,
        health: Arc<Mutex<Health>>,
    ) -> mpsc::Receiver<(String, Option<Vec<u8>>)> {
        if let Some(source) = &self.source {
            let me = self.clone();
            return source.changes(prefix, Box::new(move |r| me.report(&health, what, r)));
        }
        let (tx, rx) = mpsc::channel(1024);
        let me = self.clone();
        tokio::spawn(async move {
            let mut known: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut watch = match me.kv.watch(prefix).await {
                    Ok(w) => w,
                    Err(e) => {
                        me.report(&health, what, Err(e.to_string()));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(8));
                        continue;
                    }
                };
                backoff = Duration::from_millis(200);
                while let Some(ev) = watch.recv().await {
                    let mut out = Vec::new();
                    match ev {
                        WatchEvent::Sync(all) => {
                            let now: BTreeMap<String, Vec<u8>> = all.into_iter().collect();
                            for (k, v) in &now {
                                if known.get(k) != Some(v) {
                                    out.push((k.clone(), Some(v.clone())));
                                }
                            }
                            out.extend(
                                known
                                    .keys()
                                    .filter(|k| !now.contains_key(*k))
                                    .map(|k| (k.clone(), None)),
                            );
                            known = now;
                        }
                        WatchEvent::Put(k, v) => {
                            known.insert(k.clone(), v.clone());
                            out.push((k, Some(v)));
                        }
                        WatchEvent::Delete(k) => {
                            known.remove(&k);
                            out.push((k, None));
                        }
                        WatchEvent::Error(e) => {
                            me.report(&health, what, Err(e));
                            continue;
                        }
                    }
                    me.report(&health, what, Ok(()));
                    for c in out {
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }

    async fn follow_nodes(self: Arc<Self>, health: Arc<Mutex<Health>>) {
        let mut nodes: BTreeMap<String, NodeRecord> = BTreeMap::new();
        let mut changes = self.changes(NODES, "following nodes", health);
        while let Some((key, v)) = changes.recv().await {
            let name = key.strip_prefix(NODES).unwrap_or(&key).to_owned();
            if name == self.me.name {
                // (A node alone in its cluster counts itself too.)
                self.status.lock().unwrap_or_else(|e| e.into_inner()).nodes = nodes.len() + 1;
                continue;
            }
            let record = v.and_then(|v| serde_json::from_slice::<NodeRecord>(&v).ok());
            if let Some(why) = record.as_ref().and_then(|n| self.me.refuse_node(&name, n)) {
                tracing::warn!(subsystem = "cluster", node = %name, "ignoring a node record: {why}");
                continue;
            }
            match record {
                Some(n) if nodes.get(&name) != Some(&n) => {
                    let c = n.clone();
                    if let Err(e) = self.datapath(move |dp| dp.upsert_node(&c)).await {
                        tracing::warn!(subsystem = "cluster", node = %name, error = %e, "adding a node");
                    }
                    tracing::info!(subsystem = "cluster", node = %name, ip = %n.ip, pod_cidr = %n.pod_cidr, "node joined");
                    self.remote
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(name.clone(), n.ip);
                    nodes.insert(name, n);
                }
                Some(_) => {}
                None => {
                    if let Some(n) = nodes.remove(&name) {
                        self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
                        self.status
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .unreachable
                            .retain(|u| *u != name);
                        if let Err(e) = self.datapath(move |dp| dp.remove_node(&n)).await {
                            tracing::warn!(subsystem = "cluster", node = %name, error = %e, "removing a node");
                        }
                        tracing::info!(subsystem = "cluster", node = %name, "node left");
                    }
                }
            }
            self.status.lock().unwrap_or_else(|e| e.into_inner()).nodes = nodes.len() + 1;
        }
    }

    async fn follow_ips(self: Arc<Self>, health: Arc<Mutex<Health>>) {
        let mut ips: BTreeMap<Ipv4Addr, IpRecord> = BTreeMap::new();
        let mut changes = self.changes(IPS, "following endpoints", health);
        while let Some((key, v)) = changes.recv().await {
            let Some(ip) = key.strip_prefix(IPS).and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let record = v.and_then(|v| serde_json::from_slice::<IpRecord>(&v).ok());
            if let Some(why) = record.as_ref().and_then(|r| self.me.refuse_ip(ip, r)) {
                tracing::warn!(subsystem = "cluster", %ip, "ignoring an endpoint record: {why}");
                continue;
            }
            match record {
                Some(r) if r.node == self.me.name => {}
                Some(r) if ips.get(&ip) != Some(&r) => {
                    let c = r.clone();
                    if let Err(e) = self.datapath(move |dp| dp.upsert_remote_ip(&c)).await {
                        tracing::warn!(subsystem = "cluster", %ip, error = %e, "adding a remote endpoint");
                    }
                    ips.insert(ip, r);
                }
                Some(_) => continue,
                None => {
                    if ips.remove(&ip).is_some()
                        && let Err(e) = self.datapath(move |dp| dp.remove_remote_ip(ip)).await
                    {
                        tracing::warn!(subsystem = "cluster", %ip, error = %e, "removing a remote endpoint");
                    }
                }
            }
            self.status.lock().unwrap_or_else(|e| e.into_inner()).remote_ips = ips.len();
            let pod = ips.get(&ip).map(|r| r.pod.clone()).filter(|p| !p.is_empty());
            self.remote_pods.send_if_modified(|p| match pod {
                Some(pod) => p.insert(ip, pod.clone()).as_ref() != Some(&pod),
                None => p.remove(&ip).is_some(),
            });
        }
    }

    async fn follow_identities(self: Arc<Self>, learned: Learned, health: Arc<Mutex<Health>>) {
        let mut known: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let mut changes = self.changes(IDENTITY_IDS, "following identities", health);
        while let Some((key, v)) = changes.recv().await {
            let Some(id) = key.strip_prefix(IDENTITY_IDS).and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // An ID released and allocated again for other labels between
            // two reads of the local store is one put with new labels.
            let change = match v {
                Some(v) => match serde_json::from_slice::<Vec<String>>(&v) {
                    Ok(labels) if known.get(&id) != Some(&labels) => {
                        known.insert(id, labels.clone());
                        IdentityChange::Learned(vec![(id, labels)])
                    }
                    _ => continue,
                },
                None if known.remove(&id).is_some() => IdentityChange::Released(vec![id]),
                None => continue,
            };
            let _ = learned.send(change).await;
        }
    }
}

/// What [`ClusterSync::publish`] has written under the node's lease.
#[derive(Default)]
struct Published {
    ips: BTreeMap<Ipv4Addr, IpRecord>,
    /// Identities this node is recorded as the user of.
    users: BTreeSet<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::LocalStore;

    fn node(name: &str, ip: &str, cidr: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            ip: ip.parse().unwrap(),
            pod_cidr: cidr.into(),
            routing: Routing::Tunnel,
            health_ip: None,
        }
    }

    /// A running sync of node `me` on `kv`: its endpoints' sender, what
    /// it learned, its datapath and status, and its stop switch.
    struct Running {
        mine: watch::Sender<Mine>,
        learned: mpsc::Receiver<IdentityChange>,
        dp: Arc<Mutex<Box<dyn ClusterDatapath>>>,
        status: Arc<Mutex<KvStatus>>,
        stop: watch::Sender<bool>,
    }

    /// The labels tests give identity `id`.
    fn id_labels(id: u32) -> Vec<String> {
        vec![format!("k8s:app=p{id}")]
    }

    /// Endpoints (address, identity) as published.
    fn mine_of(eps: &[(&str, u32)]) -> Mine {
        let mut m = Mine::default();
        for (ip, id) in eps {
            m.ips.insert(ip.parse().unwrap(), (*id, format!("ns/p{id}")));
            m.identities.insert(*id, id_labels(*id));
        }
        m
    }

    fn start(kv: &LocalStore, me: NodeRecord, eps: &[(&str, u32)]) -> Running {
        start_with(kv, me, eps, |_| {})
    }

    fn start_with(
        kv: &LocalStore,
        me: NodeRecord,
        eps: &[(&str, u32)],
        tune: impl FnOnce(&mut ClusterSync),
    ) -> Running {
        let mut s = ClusterSync::new(
            Arc::new(kv.clone()),
            me,
            Box::new(MemoryCluster::default()),
            Default::default(),
        );
        s.lease_ttl = 1;
        tune(&mut s);
        let (dp, status) = (s.datapath.clone(), s.status.clone());
        let (mine, mine_rx) = watch::channel(mine_of(eps));
        let (learned_tx, learned) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(s.run(mine_rx, learned_tx, stop_rx));
        Running { mine, learned, dp, status, stop }
    }

    fn seen<T>(r: &Running, f: impl FnOnce(&MemoryCluster) -> T) -> T {
        let mut dp = r.dp.lock().unwrap();
        f(dp.as_any_mut().downcast_mut().unwrap())
    }

    /// Wait (up to 5 s) until `cond` holds.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_or_hostile_records_in_the_store_are_ignored() {
        let kv = LocalStore::open(None).unwrap();
        let a = start(&kv, node("a", "192.168.200.2", "10.200.0.0/24"), &[("10.200.0.3", 256)]);
        let put = |k: String, v: Vec<u8>| {
            let kv = kv.clone();
            async move { kv.put(&k, &v, None).await.unwrap() }
        };
        let rec = |n: NodeRecord| serde_json::to_vec(&n).unwrap();
        // Nodes: claiming a's pod CIDR, a's address, under another name,
        // not JSON, no CIDR.
        put(format!("{NODES}evil"), rec(node("evil", "192.168.200.9", "10.200.0.0/25"))).await;
        put(format!("{NODES}evil2"), rec(node("evil2", "192.168.200.2", "10.201.0.0/24"))).await;
        put(format!("{NODES}alias"), rec(node("someone", "192.168.200.8", "10.202.0.0/24"))).await;
        put(format!("{NODES}garbage"), b"{not json".to_vec()).await;
        put(format!("{NODES}nocidr"), rec(node("nocidr", "192.168.200.7", "ten/8"))).await;
        // Endpoints: claiming a's pod, a reserved identity, filed under
        // another address, not JSON.
        let ip = |ip: &str, identity: u32, node: &str| IpRecord {
            ip: ip.parse().unwrap(),
            identity,
            node: node.into(),
            host_ip: "192.168.200.9".parse().unwrap(),
            pod: String::new(),
        };
        let ipv = |r: IpRecord| serde_json::to_vec(&r).unwrap();
        put(format!("{IPS}10.200.0.3"), ipv(ip("10.200.0.3", 999, "evil"))).await;
        put(format!("{IPS}10.201.0.5"), ipv(ip("10.201.0.5", 1, "evil"))).await;
        put(format!("{IPS}10.201.0.6"), ipv(ip("10.201.0.7", 300, "evil"))).await;
        put(format!("{IPS}10.201.0.8"), b"garbage".to_vec()).await;
        // Then a node and an endpoint as they should be.
        let b = start(&kv, node("b", "192.168.200.3", "10.200.1.0/24"), &[("10.200.1.3", 257)]);
        until("a sees b and its endpoint", || {
            seen(&a, |m| {
                m.nodes.contains_key("b") && m.ips.contains_key(&"10.200.1.3".parse().unwrap())
            })
        })
        .await;
        let (nodes, ips): (Vec<String>, Vec<Ipv4Addr>) =
            seen(&a, |m| (m.nodes.keys().cloned().collect(), m.ips.keys().copied().collect()));
        assert_eq!(nodes, ["b"], "only the sound node record");
        assert_eq!(ips, ["10.200.1.3".parse::<Ipv4Addr>().unwrap()], "only the sound endpoint");
        drop((a.stop, a.learned, b.stop, b.learned));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_see_each_other_and_each_others_endpoints_and_a_leaving_node_goes() {
        let kv = LocalStore::open(None).unwrap();
        let a = start(&kv, node("a", "192.168.200.2", "10.200.0.0/24"), &[("10.200.0.3", 256)]);
        let b = start(&kv, node("b", "192.168.200.3", "10.200.1.0/24"), &[("10.200.1.3", 257)]);
        until("a sees b and its endpoint", || {
            seen(&a, |m| m.nodes.contains_key("b") && m.ips.len() == 1)
        })
        .await;
        let r = seen(&a, |m| m.ips[&"10.200.1.3".parse::<Ipv4Addr>().unwrap()].clone());
        assert_eq!((r.identity, r.host_ip.to_string().as_str()), (257, "192.168.200.3"));
        until("b sees a's endpoint", || seen(&b, |m| m.ips.len() == 1)).await;
        until("status", || a.status.lock().unwrap().ok && a.status.lock().unwrap().nodes == 2)
            .await;
        // A new endpoint on b shows up on a at once (a watch, not a poll).
        let t = Instant::now();
        b.mine.send_modify(|m| {
            m.ips.insert("10.200.1.4".parse().unwrap(), (258, "ns/p258".into()));
            m.identities.insert(258, id_labels(258));
        });
        until("a sees b's new endpoint", || seen(&a, |m| m.ips.len() == 2)).await;
        assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
        // b's endpoints go: a forgets them.
        b.mine.send_modify(|m| *m = Mine::default());
        until("a forgets b's endpoints", || seen(&a, |m| m.ips.is_empty())).await;
        // b stops; its lease (1 s) expires: a removes the node.
        b.stop.send(true).unwrap();
        until("a removes b", || seen(&a, |m| m.nodes.is_empty())).await;
        drop((a.stop, a.learned));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identities_of_other_nodes_are_learned() {
        let kv = LocalStore::open(None).unwrap();
        let mut a = start(&kv, node("a", "192.168.200.2", "10.200.0.0/24"), &[]);
        let id = allocate_identity(&kv, &["k8s:app=x".to_string()], 256, "b").await.unwrap();
        // (The identity collection's view of the store may come first.)
        let got = loop {
            let c = tokio::time::timeout(Duration::from_secs(3), a.learned.recv())
                .await
                .unwrap()
                .unwrap();
            if !matches!(c, IdentityChange::InStore(_)) {
                break c;
            }
        };
        assert_eq!(got, IdentityChange::Learned(vec![(id, vec!["k8s:app=x".to_string()])]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_allocating_at_once_never_share_an_identity() {
        let path = std::env::temp_dir().join(format!("ciliate-ids-{}.json", std::process::id()));
        let handles: Vec<_> = (0..2)
            .map(|node| {
                let path = path.clone();
                tokio::spawn(async move {
                    let kv = LocalStore::open(Some(path)).unwrap();
                    let mut out = Vec::new();
                    for i in 0..20 {
                        // Half the label sets are shared by both nodes.
                        let l =
                            if i % 2 == 0 { format!("shared{i}") } else { format!("n{node}-{i}") };
                        out.push((
                            l.clone(),
                            allocate_identity(&kv, &[l], 256, "n").await.unwrap(),
                        ));
                    }
                    out
                })
            })
            .collect();
        let mut by_labels = BTreeMap::new();
        for h in handles {
            for (l, id) in h.await.unwrap() {
                let prev = by_labels.insert(l.clone(), id);
                assert!(prev.is_none_or(|p| p == id), "{l} got {prev:?} and {id}");
            }
        }
        let ids: BTreeSet<u32> = by_labels.values().copied().collect();
        assert_eq!(ids.len(), by_labels.len(), "two label sets share an identity");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    #[tokio::test]
    async fn cluster_pool_cidrs_and_identities_are_unique_across_nodes() {
        let kv = LocalStore::open(None).unwrap();
        let pool: Cidr = "10.200.0.0/16".parse().unwrap();
        let a = claim_pod_cidr(&kv, "a", pool, 24).await.unwrap();
        let b = claim_pod_cidr(&kv, "b", pool, 24).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(claim_pod_cidr(&kv, "a", pool, 24).await.unwrap(), a, "a node keeps its CIDR");
        assert!(claim_pod_cidr(&kv, "c", pool, 8).await.is_err());
        let l1 = vec!["k8s:app=web".to_string()];
        let l2 = vec!["k8s:app=db".to_string()];
        let i1 = allocate_identity(&kv, &l1, 256, "a").await.unwrap();
        let i2 = allocate_identity(&kv, &l2, 256, "a").await.unwrap();
        assert_eq!((i1, i2), (256, 257));
        assert_eq!(
            allocate_identity(&kv, &l1, 256, "a").await.unwrap(),
            256,
            "same labels, same identity"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identities_no_live_node_uses_are_released_after_the_heartbeat_timeout() {
        let kv = LocalStore::open(None).unwrap();
        let (la, lb, lc) =
            (id_labels(256), vec!["k8s:app=b".to_string()], vec!["k8s:app=c".into()]);
        // 256: a's endpoint has it. b allocated one and went away (its node
        // never registered); a allocated one its endpoint never got (a
        // failed ADD).
        assert_eq!(allocate_identity(&kv, &la, 256, "a").await.unwrap(), 256);
        let idb = allocate_identity(&kv, &lb, 256, "b").await.unwrap();
        let idc = allocate_identity(&kv, &lc, 256, "a").await.unwrap();
        let t = Instant::now();
        let timeout = Duration::from_millis(600);
        let mut a = start_with(
            &kv,
            node("a", "192.168.200.2", "10.200.0.0/24"),
            &[("10.200.0.3", 256)],
            |s| {
                s.identity_gc_interval = Duration::from_millis(100);
                s.identity_heartbeat_timeout = timeout;
            },
        );
        let ids = || {
            let kv = kv.clone();
            async move {
                let ids: BTreeSet<u32> = kv
                    .list(IDENTITY_IDS)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter_map(|(k, _)| k.strip_prefix(IDENTITY_IDS)?.parse().ok())
                    .collect();
                let values = kv.list(IDENTITY_VALUES).await.unwrap().len();
                (ids, values)
            }
        };
        let mut released = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while released.len() < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, a.learned.recv()).await.expect("released in 5 s") {
                Some(IdentityChange::Released(ids)) => released.extend(ids),
                Some(IdentityChange::Learned(_) | IdentityChange::InStore(_)) => {}
                None => panic!("the sync stopped"),
            }
        }
        assert!(t.elapsed() >= timeout, "released before the timeout: {:?}", t.elapsed());
        assert_eq!(released, BTreeSet::from([idb, idc]));
        assert_eq!(ids().await, (BTreeSet::from([256]), 1), "256 is in use and stays");
        assert!(kv.list(&format!("{IDENTITY_USERS}{idb}/")).await.unwrap().is_empty());
        // a's endpoint goes: 256 follows after the timeout.
        a.mine.send_modify(|m| *m = Mine::default());
        until_async("256 released", || async { ids().await.0.is_empty() }).await;
        assert!(kv.list(IDENTITY_USERS).await.unwrap().is_empty(), "no user records left");
        // A new endpoint on a with a released label set gets an identity
        // again (the lowest free ID).
        assert_eq!(allocate_identity(&kv, &lb, 256, "a").await.unwrap(), 256);
        drop(a.stop);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_identity_released_while_its_node_was_away_is_created_again_with_its_id() {
        let kv = LocalStore::open(None).unwrap();
        // The store lost 300 (released while a's agent was away); a's pod
        // still has it.
        let a = start(&kv, node("a", "192.168.200.2", "10.200.0.0/24"), &[("10.200.0.3", 300)]);
        until_async("300 back in the store", || async {
            kv.get(&format!("{IDENTITY_IDS}300")).await.unwrap().is_some()
        })
        .await;
        let (value_key, _) = identity_keys(300, &id_labels(300));
        assert_eq!(kv.get(&value_key).await.unwrap().as_deref(), Some(&b"300"[..]));
        assert!(kv.get(&user_key(300, "a")).await.unwrap().is_some(), "a is its user");
        drop(a.stop);
    }

    /// Wait (up to 5 s) until the async `cond` holds.
    async fn until_async<F: std::future::Future<Output = bool>>(
        what: &str,
        mut cond: impl FnMut() -> F,
    ) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
