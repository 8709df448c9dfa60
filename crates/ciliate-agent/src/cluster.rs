//! The node in its cluster, through the kvstore: cluster-pool IPAM (a pod
//! CIDR claimed for this node), node registration under a lease, this
//! node's endpoints published into the cluster ipcache, and the other
//! nodes' nodes, endpoints and identities brought into this node's
//! datapath (ipcache entries with their tunnel endpoint, routes in native
//! routing) and policy.
//!
//! [`ClusterSync::step`] does one round; the agent runs it every second on
//! a thread. When the store is unreachable the datapath keeps what it has
//! (nothing is removed on a failed read), the step is retried with backoff
//! and [`KvStatus`] says so; after the store returns everything converges
//! (the node and its entries are written again, under a new lease if the
//! old one expired meanwhile).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    ipam::Cidr,
    kvstore::{CIDRS, IDENTITY_IDS, IPS, KvError, KvStore, NODES},
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
}

/// An endpoint's address as published into the cluster ipcache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRecord {
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub node: String,
    /// The node's address: the tunnel endpoint of this IP.
    pub host_ip: Ipv4Addr,
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

/// What the sync needs from the node's own state.
pub trait LocalState: Send + Sync {
    /// This node's endpoints: address and identity.
    fn endpoints(&self) -> Vec<(Ipv4Addr, u32)>;
    /// Identities of the cluster (to select peers in policy); the node
    /// regenerates its policy when one is new to it.
    fn learn_identities(&self, ids: Vec<(u32, Vec<String>)>);
}

/// Claim this node's pod CIDR from the cluster pool `pool` (subnets of
/// `/mask`): the one it had, or the first free one, atomically.
pub fn claim_pod_cidr(kv: &dyn KvStore, node: &str, pool: Cidr, mask: u8) -> Result<Cidr, String> {
    let by_node = format!("{CIDRS}by-node/{node}");
    if let Some(v) = kv.get(&by_node).map_err(|e| e.to_string())? {
        return String::from_utf8_lossy(&v).parse().map_err(|e| format!("{by_node}: {e}"));
    }
    if mask < pool.len || mask > 30 {
        return Err(format!("pod CIDR size /{mask} does not fit the cluster pool {pool}"));
    }
    let count = 1u64 << (mask - pool.len);
    for i in 0..count.min(65536) {
        let net = Ipv4Addr::from(u32::from(pool.net) + ((i as u32) << (32 - mask)));
        let cidr = Cidr { net, len: mask };
        let key = format!("{CIDRS}{net}-{mask}");
        let cidr_text = cidr.to_string();
        let kvs: [(&str, &[u8]); 2] =
            [(key.as_str(), node.as_bytes()), (by_node.as_str(), cidr_text.as_bytes())];
        if kv.create_all(&kvs, None).map_err(|e| e.to_string())? {
            return Ok(cidr);
        }
    }
    Err(format!("the cluster pool {pool} has no free /{mask} left"))
}

/// Allocate the cluster identity of `labels` through the store: the one
/// it has, or the lowest free one from `min`, created together with its
/// reverse key in one transaction so two nodes cannot race.
pub fn allocate_identity(kv: &dyn KvStore, labels: &[String], min: u32) -> Result<u32, KvError> {
    let value_key = format!("{}{}", crate::kvstore::IDENTITY_VALUES, labels.join(";"));
    for _ in 0..64 {
        if let Some(v) = kv.get(&value_key)?
            && let Ok(id) = String::from_utf8_lossy(&v).parse()
        {
            return Ok(id);
        }
        let used: BTreeSet<u32> = kv
            .list(IDENTITY_IDS)?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(IDENTITY_IDS)?.parse().ok())
            .collect();
        let id = (min..).find(|i| !used.contains(i)).unwrap_or(min);
        let id_key = format!("{IDENTITY_IDS}{id}");
        let labels_json = serde_json::to_vec(labels).unwrap_or_default();
        let id_text = id.to_string();
        let kvs: [(&str, &[u8]); 2] =
            [(value_key.as_str(), id_text.as_bytes()), (id_key.as_str(), &labels_json)];
        if kv.create_all(&kvs, None)? {
            return Ok(id);
        }
    }
    Err(KvError::Protocol {
        endpoint: kv.describe(),
        reason: format!("no identity for {labels:?} after 64 attempts"),
    })
}

pub struct ClusterSync {
    pub kv: Arc<dyn KvStore>,
    pub me: NodeRecord,
    pub datapath: Box<dyn ClusterDatapath>,
    pub local: Arc<dyn LocalState>,
    pub status: Arc<Mutex<KvStatus>>,
    lease: Option<i64>,
    /// What this node published, under which lease.
    published: BTreeMap<Ipv4Addr, (IpRecord, i64)>,
    nodes: BTreeMap<String, NodeRecord>,
    remote_ips: BTreeMap<Ipv4Addr, IpRecord>,
    known_ids: BTreeSet<u32>,
    failing_since: Option<Instant>,
}

impl ClusterSync {
    /// A sync that reports into `status` (shared with the API).
    pub fn new(
        kv: Arc<dyn KvStore>,
        me: NodeRecord,
        datapath: Box<dyn ClusterDatapath>,
        local: Arc<dyn LocalState>,
        status: Arc<Mutex<KvStatus>>,
    ) -> Self {
        status.lock().unwrap_or_else(|e| e.into_inner()).store = kv.describe();
        Self {
            kv,
            me,
            datapath,
            local,
            status,
            lease: None,
            published: BTreeMap::new(),
            nodes: BTreeMap::new(),
            remote_ips: BTreeMap::new(),
            known_ids: BTreeSet::new(),
            failing_since: None,
        }
    }

    /// One round, recording the outcome in the status.
    pub fn step(&mut self) -> Result<(), String> {
        let r = self.try_step();
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Ok(()) => {
                self.failing_since = None;
                st.ok = true;
                st.error = None;
                st.failing_for = 0;
            }
            Err(e) => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                st.ok = false;
                st.error = Some(e.clone());
                st.failing_for = since.elapsed().as_secs();
            }
        }
        st.nodes = self.nodes.len() + 1;
        st.remote_ips = self.remote_ips.len();
        r
    }

    fn try_step(&mut self) -> Result<(), String> {
        let kv = self.kv.clone();
        let e = |e: KvError| e.to_string();
        // The lease: kept alive, or a new one (the old expired while the
        // store was away: everything is written again under the new one).
        let lease = match self.lease {
            Some(l) if kv.keepalive(l).map_err(e)? => l,
            _ => {
                let l = kv.grant(LEASE_TTL).map_err(e)?;
                self.lease = Some(l);
                self.published.clear();
                l
            }
        };
        let me = serde_json::to_vec(&self.me).unwrap_or_default();
        kv.put(&format!("{NODES}{}", self.me.name), &me, Some(lease)).map_err(e)?;

        // This node's endpoints into the cluster ipcache.
        let mine: BTreeMap<Ipv4Addr, u32> = self.local.endpoints().into_iter().collect();
        for (ip, identity) in &mine {
            let r = IpRecord {
                ip: *ip,
                identity: *identity,
                node: self.me.name.clone(),
                host_ip: self.me.ip,
            };
            if self.published.get(ip).is_some_and(|(p, l)| *p == r && *l == lease) {
                continue;
            }
            let v = serde_json::to_vec(&r).unwrap_or_default();
            kv.put(&format!("{IPS}{ip}"), &v, Some(lease)).map_err(e)?;
            self.published.insert(*ip, (r, lease));
        }
        let gone: Vec<Ipv4Addr> =
            self.published.keys().filter(|ip| !mine.contains_key(ip)).copied().collect();
        for ip in gone {
            kv.delete(&format!("{IPS}{ip}")).map_err(e)?;
            self.published.remove(&ip);
        }

        // The other nodes.
        let mut nodes = BTreeMap::new();
        for (_, v) in kv.list(NODES).map_err(e)? {
            if let Ok(n) = serde_json::from_slice::<NodeRecord>(&v)
                && n.name != self.me.name
            {
                nodes.insert(n.name.clone(), n);
            }
        }
        for (name, n) in &nodes {
            if self.nodes.get(name) != Some(n) {
                self.datapath.upsert_node(n)?;
            }
        }
        let left: Vec<NodeRecord> = self
            .nodes
            .iter()
            .filter(|(k, _)| !nodes.contains_key(*k))
            .map(|(_, n)| n.clone())
            .collect();
        for n in &left {
            self.datapath.remove_node(n)?;
        }
        self.nodes = nodes;

        // The other nodes' endpoints.
        let mut ips = BTreeMap::new();
        for (_, v) in kv.list(IPS).map_err(e)? {
            if let Ok(r) = serde_json::from_slice::<IpRecord>(&v)
                && r.node != self.me.name
                && !mine.contains_key(&r.ip)
            {
                ips.insert(r.ip, r);
            }
        }
        for (ip, r) in &ips {
            if self.remote_ips.get(ip) != Some(r) {
                self.datapath.upsert_remote_ip(r)?;
            }
        }
        let stale: Vec<Ipv4Addr> =
            self.remote_ips.keys().filter(|ip| !ips.contains_key(ip)).copied().collect();
        for ip in stale {
            self.datapath.remove_remote_ip(ip)?;
        }
        self.remote_ips = ips;

        // Identities of the cluster, for policy.
        let mut new = Vec::new();
        for (k, v) in kv.list(IDENTITY_IDS).map_err(e)? {
            let Some(id) = k.strip_prefix(IDENTITY_IDS).and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if self.known_ids.insert(id)
                && let Ok(labels) = serde_json::from_slice::<Vec<String>>(&v)
            {
                new.push((id, labels));
            }
        }
        if !new.is_empty() {
            self.local.learn_identities(new);
        }
        Ok(())
    }

    /// The other nodes as last read.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes.values().cloned().collect()
    }

    /// Run forever: a round every second, backing off to 8 s while the
    /// store fails.
    pub fn run(mut self, log: impl Fn(String)) {
        let mut delay = Duration::from_secs(1);
        let mut was_ok = true;
        loop {
            match self.step() {
                Ok(()) => {
                    if !was_ok {
                        log(format!("kvstore {} is back; state converged", self.kv.describe()));
                    }
                    was_ok = true;
                    delay = Duration::from_secs(1);
                }
                Err(e) => {
                    if was_ok {
                        log(format!("kvstore: {e}; the datapath keeps what it has, retrying"));
                    }
                    was_ok = false;
                    delay = (delay * 2).min(Duration::from_secs(8));
                }
            }
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::LocalStore;

    struct Eps(Mutex<Vec<(Ipv4Addr, u32)>>, Mutex<Vec<u32>>);
    impl LocalState for Eps {
        fn endpoints(&self) -> Vec<(Ipv4Addr, u32)> {
            self.0.lock().unwrap().clone()
        }
        fn learn_identities(&self, ids: Vec<(u32, Vec<String>)>) {
            self.1.lock().unwrap().extend(ids.into_iter().map(|(i, _)| i));
        }
    }

    fn node(name: &str, ip: &str, cidr: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            ip: ip.parse().unwrap(),
            pod_cidr: cidr.into(),
            routing: Routing::Tunnel,
            health_ip: None,
        }
    }

    fn mem(s: &mut ClusterSync) -> &MemoryCluster {
        s.datapath.as_any_mut().downcast_mut().unwrap()
    }

    fn sync(kv: &Arc<LocalStore>, me: NodeRecord, eps: &Arc<Eps>) -> ClusterSync {
        ClusterSync::new(
            kv.clone(),
            me,
            Box::new(MemoryCluster::default()),
            eps.clone(),
            Default::default(),
        )
    }

    #[test]
    fn nodes_see_each_other_and_each_others_endpoints_and_a_leaving_node_goes() {
        let kv = Arc::new(LocalStore::open(None).unwrap());
        let a_eps =
            Arc::new(Eps(Mutex::new(vec![("10.200.0.3".parse().unwrap(), 256)]), Mutex::default()));
        let b_eps =
            Arc::new(Eps(Mutex::new(vec![("10.200.1.3".parse().unwrap(), 257)]), Mutex::default()));
        let mut a = sync(&kv, node("a", "192.168.200.2", "10.200.0.0/24"), &a_eps);
        let mut b = sync(&kv, node("b", "192.168.200.3", "10.200.1.0/24"), &b_eps);
        a.step().unwrap();
        b.step().unwrap();
        a.step().unwrap();
        let seen = mem(&mut a);
        assert_eq!(seen.nodes.keys().collect::<Vec<_>>(), ["b"]);
        let r = &seen.ips[&"10.200.1.3".parse::<Ipv4Addr>().unwrap()];
        assert_eq!((r.identity, r.host_ip.to_string().as_str()), (257, "192.168.200.3"));
        assert_eq!(mem(&mut b).ips.len(), 1, "b sees a's endpoint");
        assert!(a.status.lock().unwrap().ok);
        assert_eq!(a.status.lock().unwrap().nodes, 2);

        // b's endpoint goes: a forgets it.
        b_eps.0.lock().unwrap().clear();
        b.step().unwrap();
        a.step().unwrap();
        assert!(mem(&mut a).ips.is_empty());
        // b stops; its lease is revoked (expires): a removes the node.
        kv.delete("ciliate/state/nodes/v1/b").unwrap();
        a.step().unwrap();
        assert!(mem(&mut a).nodes.is_empty());
    }

    #[test]
    fn two_nodes_allocating_at_once_never_share_an_identity() {
        let path = std::env::temp_dir().join(format!("ciliate-ids-{}.json", std::process::id()));
        let handles: Vec<_> = (0..2)
            .map(|node| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let kv = LocalStore::open(Some(path)).unwrap();
                    (0..20)
                        .map(|i| {
                            // Half the label sets are shared by both nodes.
                            let l = if i % 2 == 0 {
                                format!("shared{i}")
                            } else {
                                format!("n{node}-{i}")
                            };
                            (l.clone(), allocate_identity(&kv, &[l], 256).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut by_labels = BTreeMap::new();
        for h in handles {
            for (l, id) in h.join().unwrap() {
                let prev = by_labels.insert(l.clone(), id);
                assert!(prev.is_none_or(|p| p == id), "{l} got {prev:?} and {id}");
            }
        }
        let ids: BTreeSet<u32> = by_labels.values().copied().collect();
        assert_eq!(ids.len(), by_labels.len(), "two label sets share an identity");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    #[test]
    fn cluster_pool_cidrs_and_identities_are_unique_across_nodes() {
        let kv = LocalStore::open(None).unwrap();
        let pool: Cidr = "10.200.0.0/16".parse().unwrap();
        let a = claim_pod_cidr(&kv, "a", pool, 24).unwrap();
        let b = claim_pod_cidr(&kv, "b", pool, 24).unwrap();
        assert_ne!(a, b);
        assert_eq!(claim_pod_cidr(&kv, "a", pool, 24).unwrap(), a, "a node keeps its CIDR");
        assert!(claim_pod_cidr(&kv, "c", pool, 8).is_err());
        let l1 = vec!["k8s:app=web".to_string()];
        let l2 = vec!["k8s:app=db".to_string()];
        let i1 = allocate_identity(&kv, &l1, 256).unwrap();
        let i2 = allocate_identity(&kv, &l2, 256).unwrap();
        assert_eq!((i1, i2), (256, 257));
        assert_eq!(allocate_identity(&kv, &l1, 256).unwrap(), 256, "same labels, same identity");
    }
}
