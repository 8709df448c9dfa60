//! Services: the desired state (one service = one frontend, as
//! `cilium service update`), its validation, backend IDs and reverse-NAT
//! indexes, Maglev tables, and the writes to the load-balancer maps
//! through [`LbDatapath`] (the kernel's maps, or memory in tests).
//!
//! A service update never leaves its frontend without backends: backends
//! are written first, then each frontend (slots, then the master entry,
//! then the slots it no longer has), and only then are frontends the
//! service lost removed. A backend no service names any more is *retired*:
//! it stays in the backends map while conntrack still pins a flow to it
//! ([`Services::release_retired`], run after each conntrack GC), so a
//! backend change never moves or breaks an established flow.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ciliate_api::models::{
    BackendState, BackendStatus, FrontendStatus, L4Addr, LbAlgorithm, Service, ServiceKind,
    ServiceSpec,
};
use ciliate_common::lb::{
    self, BACKEND_ACTIVE, BACKEND_MAINTENANCE, BACKEND_QUARANTINED, BACKEND_TERMINATING, LbService,
};
use ciliate_datapath::lbmaps::{Backend, Frontend};
use serde::{Deserialize, Serialize};

use crate::store;

/// The NodePort range by default (Kubernetes'); `--node-port-range`.
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service {id}: {reason}")]
    Invalid { id: u16, reason: String },
    #[error("service {0} not found")]
    NotFound(u16),
    #[error("service {id}: frontend {frontend} belongs to service {owner}")]
    Conflict { id: u16, frontend: L4Addr, owner: u16 },
    #[error("service {id}: writing the datapath: {reason}")]
    Datapath { id: u16, reason: String },
    /// A map cannot hold the update; nothing was written.
    #[error("service {id}: {reason}")]
    Full { id: u16, reason: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

impl ServiceError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid { .. } => 400,
            Self::NotFound(_) => 404,
            Self::Conflict { .. } => 409,
            Self::Full { .. } => 507,
            Self::Datapath { .. } | Self::Store(_) => 500,
        }
    }
}

/// What a frontend write carries besides its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendWrite {
    pub master: LbService,
    pub slots: Vec<u32>,
    /// The Maglev table of a Maglev frontend.
    pub maglev: Option<Vec<u32>>,
    /// loadBalancerSourceRanges (network, length).
    pub ranges: Vec<(Ipv4Addr, u8)>,
}

/// The load-balancer maps as the agent writes them.
pub trait LbDatapath: Send {
    fn upsert_backend(&mut self, id: u32, b: &Backend) -> Result<(), String>;
    fn remove_backend(&mut self, id: u32) -> Result<(), String>;
    /// Write frontend `fe` (reverse NAT, Maglev table and source ranges
    /// first, then its slots and master entry).
    fn write_frontend(&mut self, fe: &Frontend, w: &FrontendWrite) -> Result<(), String>;
    /// Remove frontend `fe` and everything of its reverse-NAT index.
    fn remove_frontend(&mut self, fe: &Frontend, rev_nat_index: u16) -> Result<(), String>;
    /// The backends conntrack still pins a live flow to.
    fn pinned_backends(&self) -> Result<BTreeSet<u32>, String>;
    /// For tests that look into a [`MemoryLb`].
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// The load-balancer maps in memory, for tests.
#[derive(Default)]
pub struct MemoryLb {
    pub backends: BTreeMap<u32, Backend>,
    pub frontends: BTreeMap<Frontend, FrontendWrite>,
    pub pinned: BTreeSet<u32>,
    /// Every write, in order, for tests of the ordering.
    pub log: Vec<String>,
    /// Fail the write after this many more succeeded.
    pub fail_after: Option<usize>,
}

impl MemoryLb {
    fn fail(&mut self) -> Result<(), String> {
        match &mut self.fail_after {
            Some(0) => Err("injected failure".into()),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl LbDatapath for MemoryLb {
    fn upsert_backend(&mut self, id: u32, b: &Backend) -> Result<(), String> {
        self.fail()?;
        self.log.push(format!("backend+ {id}"));
        self.backends.insert(id, *b);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), String> {
        self.log.push(format!("backend- {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn write_frontend(&mut self, fe: &Frontend, w: &FrontendWrite) -> Result<(), String> {
        self.fail()?;
        self.log.push(format!("frontend+ {}:{}", fe.addr, fe.port));
        self.frontends.insert(*fe, w.clone());
        Ok(())
    }
    fn remove_frontend(&mut self, fe: &Frontend, _: u16) -> Result<(), String> {
        self.log.push(format!("frontend- {}:{}", fe.addr, fe.port));
        self.frontends.remove(fe);
        Ok(())
    }
    fn pinned_backends(&self) -> Result<BTreeSet<u32>, String> {
        Ok(self.pinned.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// One service as persisted in `services/<id>.json`: what was asked, and
/// what was allocated for it (reverse-NAT indexes and backend IDs must
/// stay the same across restarts: conntrack entries carry them).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    spec: ServiceSpec,
    frontends: Vec<FrontendStatus>,
    /// This service's backends by ID.
    backends: BTreeMap<u32, L4Addr>,
    /// Entries its frontends take in the services map (a master entry
    /// and one per slot each), as last written.
    #[serde(default)]
    entries: usize,
}

/// The services and the indexes that keep an update's cost independent
/// of how many services exist.
#[derive(Default)]
struct State {
    records: BTreeMap<u16, Record>,
    /// Frontend → the service that has it.
    fe_owner: BTreeMap<L4Addr, u16>,
    rev_used: BTreeSet<u16>,
    backend_by_addr: BTreeMap<L4Addr, u32>,
    /// Backend → the services that name it.
    refs: BTreeMap<u32, BTreeSet<u16>>,
    /// Backends no service names, kept while flows are pinned to them
    /// (persisted in `services/retired.json`).
    retired: BTreeMap<u32, L4Addr>,
    /// Where the search for a free index / ID starts.
    next_rev: u16,
    next_backend: u32,
    /// Entries the services' frontends take in the services map.
    entries: usize,
    /// Frontends with a Maglev table.
    maglev_frontends: usize,
}

/// A service in the maps: its backends (ID, value), and each frontend
/// with its write.
type Writes = (Vec<(u32, Backend)>, Vec<(Frontend, FrontendWrite)>);

/// What a service update allocated in [`State`], to give back if the
/// update fails.
#[derive(Default)]
struct Undo {
    revs: Vec<u16>,
    backends: Vec<(u32, L4Addr)>,
    unretired: Vec<(u32, L4Addr)>,
}

impl State {
    fn index(&mut self, r: &Record) {
        let id = r.spec.id;
        for f in &r.frontends {
            self.fe_owner.insert(f.address, id);
            self.rev_used.insert(f.rev_nat_index);
        }
        for (bid, a) in &r.backends {
            self.backend_by_addr.insert(*a, *bid);
            self.refs.entry(*bid).or_default().insert(id);
        }
        self.entries += r.entries;
        if r.spec.algorithm == Some(LbAlgorithm::Maglev) {
            self.maglev_frontends += r.frontends.len();
        }
    }

    fn unindex(&mut self, r: &Record) {
        let id = r.spec.id;
        for f in &r.frontends {
            self.fe_owner.remove(&f.address);
            self.rev_used.remove(&f.rev_nat_index);
        }
        for bid in r.backends.keys() {
            if let Some(set) = self.refs.get_mut(bid) {
                set.remove(&id);
            }
        }
        self.entries -= r.entries.min(self.entries);
        if r.spec.algorithm == Some(LbAlgorithm::Maglev) {
            self.maglev_frontends -= r.frontends.len().min(self.maglev_frontends);
        }
    }

    /// Give back what a failed update allocated.
    fn undo(&mut self, u: Undo) {
        for i in u.revs {
            self.rev_used.remove(&i);
        }
        for (id, a) in u.backends {
            self.refs.remove(&id);
            if self.backend_by_addr.get(&a) == Some(&id) {
                self.backend_by_addr.remove(&a);
            }
        }
        for (id, a) in u.unretired {
            self.retired.insert(id, a);
            self.backend_by_addr.insert(a, id);
        }
    }

    /// A free reverse-NAT index: never 0 (none) nor `REV_NAT_DSR` (the
    /// datapath's mark of a DSR backend's flow).
    fn alloc_rev(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.next_rev = self.next_rev.wrapping_add(1).max(1);
            if self.next_rev == ciliate_common::lb::REV_NAT_DSR {
                continue;
            }
            if self.rev_used.insert(self.next_rev) {
                return Some(self.next_rev);
            }
        }
        None
    }

    /// The backend ID of `a`, allocated when new (and noted in `undo`).
    fn backend_id(&mut self, a: L4Addr, undo: &mut Undo) -> u32 {
        if let Some(id) = self.backend_by_addr.get(&a) {
            return *id;
        }
        loop {
            self.next_backend = self.next_backend.wrapping_add(1).max(1);
            let id = self.next_backend;
            if !self.refs.contains_key(&id) && !self.retired.contains_key(&id) {
                self.backend_by_addr.insert(a, id);
                self.refs.insert(id, BTreeSet::new());
                undo.backends.push((id, a));
                return id;
            }
        }
    }
}

pub struct Services {
    state: State,
    /// What readers see: every service as `get` shows it, kept in step
    /// with each change (a persistent map: a snapshot is a cheap clone).
    shown: imbl::OrdMap<u16, Service>,
    /// `<state dir>/services`: one file per service, plus `retired.json`.
    dir: Option<PathBuf>,
    pub datapath: Box<dyn LbDatapath>,
    /// The node's addresses: where a 0.0.0.0 NodePort/HostPort frontend is.
    pub node_ips: Vec<Ipv4Addr>,
    pub default_algorithm: LbAlgorithm,
    /// The cluster's pod CIDR: pods' addresses are never frontends (the
    /// datapath skips the services lookup for them).
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// The NodePort range.
    pub node_ports: (u16, u16),
    /// Entries of each load-balancer map (`--bpf-lb-map-max`).
    pub lb_map_max: u32,
    /// Entries of a Maglev table (`--bpf-lb-maglev-table-size`: what the
    /// node's programs were loaded with).
    pub maglev_size: u32,
}

fn kind_flag(k: ServiceKind) -> u16 {
    match k {
        ServiceKind::ClusterIP => lb::SVC_F_CLUSTER_IP,
        ServiceKind::NodePort => lb::SVC_F_NODE_PORT,
        ServiceKind::ExternalIPs => lb::SVC_F_EXTERNAL_IP,
        ServiceKind::LoadBalancer => lb::SVC_F_LOAD_BALANCER,
        ServiceKind::HostPort => lb::SVC_F_HOST_PORT,
    }
}

fn state_code(s: BackendState) -> u8 {
    match s {
        BackendState::Active => BACKEND_ACTIVE,
        BackendState::Terminating => BACKEND_TERMINATING,
        BackendState::Quarantined => BACKEND_QUARANTINED,
        BackendState::Maintenance => BACKEND_MAINTENANCE,
    }
}

fn parse_range(id: u16, s: &str) -> Result<(Ipv4Addr, u8), ServiceError> {
    let bad = |reason: String| ServiceError::Invalid { id, reason };
    let (net, len) = s.split_once('/').unwrap_or((s, "32"));
    let net: Ipv4Addr = net.parse().map_err(|_| bad(format!("source range {s:?}: bad address")))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| bad(format!("source range {s:?}: bad prefix length")))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    if u32::from(net) & !mask != 0 {
        return Err(bad(format!("source range {s:?}: host bits set")));
    }
    Ok((net, len))
}

/// Check everything about `spec` that does not depend on other services,
/// NodePorts against `node_ports`.
pub fn validate(spec: &ServiceSpec, node_ports: (u16, u16)) -> Result<(), ServiceError> {
    let (np_min, np_max) = node_ports;
    let id = spec.id;
    let bad = |reason: String| Err(ServiceError::Invalid { id, reason });
    if id == 0 {
        return bad("ID 0 is reserved; use 1-65535".into());
    }
    let fe = &spec.frontend;
    if fe.port == 0 {
        return bad(format!("frontend {fe}: port 0"));
    }
    let wildcard = fe.ip.is_unspecified();
    match spec.kind {
        ServiceKind::NodePort if !(np_min..=np_max).contains(&fe.port) => {
            return bad(format!("frontend {fe}: a NodePort must be in {np_min}-{np_max}"));
        }
        ServiceKind::NodePort | ServiceKind::HostPort => {}
        k if wildcard => {
            return bad(format!(
                "frontend {fe}: 0.0.0.0 is only for NodePort and HostPort, not {}",
                k.name()
            ));
        }
        _ => {}
    }
    let mut seen = BTreeSet::new();
    for b in &spec.backends {
        if b.port == 0 {
            return bad(format!("backend {}:0: port 0", b.ip));
        }
        if b.ip.is_unspecified() || b.ip.is_broadcast() || b.ip.is_multicast() {
            return bad(format!("backend {}:{}: not a unicast address", b.ip, b.port));
        }
        if !seen.insert((b.ip, b.port)) {
            return bad(format!("backend {}:{} is listed twice", b.ip, b.port));
        }
    }
    if let Some(t) = spec.affinity_timeout
        && (t == 0 || t > 86400)
    {
        return bad(format!("affinity timeout {t}s: 1-86400 seconds"));
    }
    if !spec.source_ranges.is_empty()
        && !matches!(spec.kind, ServiceKind::LoadBalancer | ServiceKind::NodePort)
    {
        return bad(format!(
            "source ranges apply to LoadBalancer and NodePort, not {}",
            spec.kind.name()
        ));
    }
    for r in &spec.source_ranges {
        parse_range(id, r)?;
    }
    Ok(())
}

/// FNV-1a (64 bit) with a seed: the backend hashes of Maglev. The same on
/// every node, so every node builds the same table.
fn fnv(seed: u64, s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The Maglev lookup table (Eisenbud et al., 2016) of `backends` (ID and
/// a stable name each) with `m` entries (a prime): every backend gets
/// ⌊m/n⌋ or ⌈m/n⌉ entries, and removing one of n backends moves only about
/// 1/n of the entries. Independent of the order of `backends`.
pub fn maglev_table(backends: &[(u32, String)], m: usize) -> Vec<u32> {
    let mut table = vec![0u32; m];
    if backends.is_empty() {
        return table;
    }
    let mut bs: Vec<&(u32, String)> = backends.iter().collect();
    bs.sort_by(|a, b| a.1.cmp(&b.1));
    let m64 = m as u64;
    let perm: Vec<(u64, u64)> = bs
        .iter()
        .map(|(_, name)| (fnv(0, name) % m64, fnv(0x5bd1_e995, name) % (m64 - 1) + 1))
        .collect();
    let mut next = vec![0u64; bs.len()];
    let mut filled = vec![false; m];
    let mut n = 0;
    loop {
        for (i, (id, _)) in bs.iter().enumerate() {
            let (offset, skip) = perm[i];
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while filled[c] {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            table[c] = *id;
            filled[c] = true;
            next[i] += 1;
            n += 1;
            if n == m {
                return table;
            }
        }
    }
}

fn proto(a: &L4Addr) -> u8 {
    a.protocol.number()
}

impl Services {
    /// Open the services of `state_dir` (none without one).
    pub fn open(
        state_dir: Option<&Path>,
        datapath: Box<dyn LbDatapath>,
        node_ips: Vec<Ipv4Addr>,
        default_algorithm: LbAlgorithm,
    ) -> Result<Self, ServiceError> {
        let dir = state_dir.map(|d| d.join("services"));
        let mut state = State::default();
        if let Some(dir) = &dir {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
                Err(_) => Vec::new(),
            };
            for path in entries {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                if stem.parse::<u16>().is_ok()
                    && path.extension().is_some_and(|e| e == "json")
                    && let Some(r) = store::load::<Record>(&path)?
                {
                    state.index(&r);
                    state.records.insert(r.spec.id, r);
                }
            }
            state.retired = store::load(&dir.join("retired.json"))?.unwrap_or_default();
            for (id, a) in &state.retired {
                state.backend_by_addr.entry(*a).or_insert(*id);
            }
        }
        Ok(Self {
            state,
            shown: imbl::OrdMap::new(),
            dir,
            datapath,
            node_ips,
            default_algorithm,
            cluster_cidr: None,
            node_ports: NODE_PORT_RANGE,
            lb_map_max: lb::MAX_SERVICES,
            maglev_size: lb::MAGLEV_DEFAULT_SIZE,
        })
    }

    fn save_record(&self, id: u16) -> Result<(), ServiceError> {
        let (Some(dir), Some(r)) = (&self.dir, self.state.records.get(&id)) else { return Ok(()) };
        Ok(store::save(&dir.join(format!("{id}.json")), r)?)
    }

    fn save_retired(&self) -> Result<(), ServiceError> {
        match &self.dir {
            Some(dir) => Ok(store::save(&dir.join("retired.json"), &self.state.retired)?),
            None => Ok(()),
        }
    }

    /// Write every service again (a restarted agent: the maps are pinned
    /// and already hold them, so this rewrites the same values).
    pub fn restore(&mut self, local: &BTreeSet<Ipv4Addr>) -> Result<usize, ServiceError> {
        let specs: Vec<ServiceSpec> = self.state.records.values().map(|r| r.spec.clone()).collect();
        for s in &specs {
            self.update(s.clone(), local)?;
        }
        Ok(specs.len())
    }

    /// Every service as readers see it (a snapshot: a cheap clone).
    pub fn view(&self) -> imbl::OrdMap<u16, Service> {
        self.shown.clone()
    }

    pub fn list(&self) -> Vec<Service> {
        self.state.records.keys().filter_map(|id| self.get(*id).ok()).collect()
    }

    pub fn get(&self, id: u16) -> Result<Service, ServiceError> {
        let r = self.state.records.get(&id).ok_or(ServiceError::NotFound(id))?;
        let spec = &r.spec;
        let backends = spec
            .backends
            .iter()
            .map(|b| {
                let a = L4Addr { ip: b.ip, port: b.port, protocol: spec.frontend.protocol };
                BackendStatus {
                    id: self.state.backend_by_addr.get(&a).copied().unwrap_or(0),
                    ip: b.ip,
                    port: b.port,
                    state: b.state,
                    selectable: b.state == BackendState::Active,
                }
            })
            .collect();
        Ok(Service {
            spec: spec.clone(),
            frontends: r.frontends.clone(),
            backends,
            algorithm: spec.algorithm.unwrap_or(self.default_algorithm),
        })
    }

    /// The frontend addresses of `spec` (a 0.0.0.0 NodePort or HostPort:
    /// one per node address).
    fn expand(&self, spec: &ServiceSpec) -> Result<Vec<L4Addr>, ServiceError> {
        let fe = spec.frontend;
        if !fe.ip.is_unspecified() {
            return Ok(vec![fe]);
        }
        if self.node_ips.is_empty() {
            return Err(ServiceError::Invalid {
                id: spec.id,
                reason: format!(
                    "frontend {fe} stands for the node's addresses, and the node has none \
                     (start the agent with --devices)"
                ),
            });
        }
        Ok(self.node_ips.iter().map(|ip| L4Addr { ip: *ip, ..fe }).collect())
    }

    /// Create or replace service `spec.id`. `local` are this node's
    /// endpoint addresses (for the Local traffic policies). All or
    /// nothing: validation and a capacity check come first (a refused
    /// update writes nothing), and a map write or save that fails midway
    /// is undone, in the maps and in the agent's record.
    pub fn update(
        &mut self,
        spec: ServiceSpec,
        local: &BTreeSet<Ipv4Addr>,
    ) -> Result<Service, ServiceError> {
        validate(&spec, self.node_ports)?;
        let id = spec.id;
        if let Some((net, len)) = self.cluster_cidr {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            if u32::from(spec.frontend.ip) & mask == u32::from(net) & mask && len > 0 {
                return Err(ServiceError::Invalid {
                    id,
                    reason: format!(
                        "frontend {} is inside the cluster's pod CIDR {net}/{len}",
                        spec.frontend
                    ),
                });
            }
        }
        let addrs = self.expand(&spec)?;
        for a in &addrs {
            match self.state.fe_owner.get(a) {
                Some(owner) if *owner != id => {
                    return Err(ServiceError::Conflict { id, frontend: *a, owner: *owner });
                }
                _ => {}
            }
        }
        let old = self.state.records.get(&id).cloned();
        self.check_capacity(&spec, &addrs, local, old.as_ref())?;
        if let Some(o) = &old {
            self.state.records.remove(&id);
            self.state.unindex(o);
        }
        let mut undo = Undo::default();
        let result = self
            .allocate(spec, &addrs, old.as_ref(), &mut undo)
            .and_then(|record| self.write(record, old.as_ref(), local));
        match result {
            Ok(retired_changed) => {
                if retired_changed || !undo.unretired.is_empty() {
                    self.save_retired()?;
                }
                let svc = self.get(id)?;
                self.shown.insert(id, svc.clone());
                Ok(svc)
            }
            Err(e) => {
                self.state.undo(undo);
                if let Some(o) = old {
                    self.state.index(&o);
                    self.state.records.insert(id, o);
                }
                Err(e)
            }
        }
    }

    /// Refuse, before anything is written, an update the maps cannot
    /// hold: new backends in the backends map, its frontends' master and
    /// slot entries in the services map (at their fullest: new slots go in
    /// before old ones go), Maglev tables.
    fn check_capacity(
        &self,
        spec: &ServiceSpec,
        addrs: &[L4Addr],
        local: &BTreeSet<Ipv4Addr>,
        old: Option<&Record>,
    ) -> Result<(), ServiceError> {
        let full = |map: &str, needed: usize, in_use: usize, capacity: u32| {
            Err(ServiceError::Full {
                id: spec.id,
                reason: format!(
                    "map {map} would need {needed} entries and holds {capacity} ({in_use} in use); nothing was written"
                ),
            })
        };
        let new_backends = spec
            .backends
            .iter()
            .filter(|b| {
                let a = L4Addr { ip: b.ip, port: b.port, protocol: spec.frontend.protocol };
                !self.state.backend_by_addr.contains_key(&a)
            })
            .count();
        let in_use = self.state.refs.len() + self.state.retired.len();
        if in_use + new_backends > self.lb_map_max as usize {
            return full(lb::BACKENDS_MAP, in_use + new_backends, in_use, self.lb_map_max);
        }
        let slots = spec
            .backends
            .iter()
            .filter(|b| {
                b.state == BackendState::Active
                    && (!spec.traffic_policy_local || local.contains(&b.ip))
            })
            .count();
        let per_frontend_old = old.map_or(0, |o| o.entries / o.frontends.len().max(1));
        let grow: usize = addrs
            .iter()
            .map(|a| {
                let had = if old.is_some_and(|o| o.frontends.iter().any(|f| f.address == *a)) {
                    per_frontend_old
                } else {
                    0
                };
                (1 + slots).saturating_sub(had)
            })
            .sum();
        if self.state.entries + grow > self.lb_map_max as usize {
            return full(
                lb::SERVICES_MAP,
                self.state.entries + grow,
                self.state.entries,
                self.lb_map_max,
            );
        }
        let algorithm = spec.algorithm.unwrap_or(self.default_algorithm);
        if algorithm == LbAlgorithm::Maglev {
            let had = old
                .filter(|o| o.spec.algorithm == Some(LbAlgorithm::Maglev))
                .map_or(0, |o| o.frontends.len());
            let needed = self.state.maglev_frontends + addrs.len().saturating_sub(had);
            if needed > lb::MAX_MAGLEV as usize {
                return full(lb::MAGLEV_MAP, needed, self.state.maglev_frontends, lb::MAX_MAGLEV);
            }
        }
        Ok(())
    }

    /// The record of `spec`: reverse-NAT indexes kept for the frontends
    /// the service had and new ones for the others, backend IDs (new ones
    /// noted in `undo`).
    fn allocate(
        &mut self,
        spec: ServiceSpec,
        addrs: &[L4Addr],
        old: Option<&Record>,
        undo: &mut Undo,
    ) -> Result<Record, ServiceError> {
        let id = spec.id;
        let mut frontends = Vec::new();
        for a in addrs {
            let kept = old
                .and_then(|o| o.frontends.iter().find(|f| f.address == *a))
                .map(|f| f.rev_nat_index)
                .filter(|i| self.state.rev_used.insert(*i));
            let idx = match kept {
                Some(i) => i,
                None => self.state.alloc_rev().ok_or_else(|| ServiceError::Invalid {
                    id,
                    reason: "no reverse-NAT index left".into(),
                })?,
            };
            undo.revs.push(idx);
            frontends.push(FrontendStatus { address: *a, rev_nat_index: idx });
        }
        let mut backends = BTreeMap::new();
        for b in &spec.backends {
            let a = L4Addr { ip: b.ip, port: b.port, protocol: spec.frontend.protocol };
            let bid = self.state.backend_id(a, undo);
            if let Some(addr) = self.state.retired.remove(&bid) {
                undo.unretired.push((bid, addr));
            }
            backends.insert(bid, a);
        }
        Ok(Record { spec, frontends, backends, entries: 0 })
    }

    /// What the maps hold for `r`: its backends, and each frontend's write.
    fn writes_of(&self, r: &Record, local: &BTreeSet<Ipv4Addr>) -> Writes {
        let spec = &r.spec;
        let by_addr: BTreeMap<&L4Addr, u32> = r.backends.iter().map(|(id, a)| (a, *id)).collect();
        let mut backends = Vec::new();
        let mut slots = Vec::new();
        let mut named = Vec::new();
        for b in &spec.backends {
            let a = L4Addr { ip: b.ip, port: b.port, protocol: spec.frontend.protocol };
            let Some(&bid) = by_addr.get(&a) else { continue };
            let raw =
                Backend { addr: b.ip, port: b.port, proto: proto(&a), state: state_code(b.state) };
            backends.push((bid, raw));
            if b.state == BackendState::Active
                && (!spec.traffic_policy_local || local.contains(&b.ip))
            {
                slots.push(bid);
                named.push((bid, format!("{}:{}", b.ip, b.port)));
            }
        }
        let algorithm = spec.algorithm.unwrap_or(self.default_algorithm);
        let maglev = (algorithm == LbAlgorithm::Maglev)
            .then(|| maglev_table(&named, self.maglev_size as usize));
        let mut flags = kind_flag(spec.kind);
        if spec.affinity_timeout.is_some() {
            flags |= lb::SVC_F_AFFINITY;
        }
        if !spec.source_ranges.is_empty() {
            flags |= lb::SVC_F_SRC_RANGES;
        }
        if maglev.is_some() {
            flags |= lb::SVC_F_MAGLEV;
        }
        if spec.traffic_policy_local {
            flags |= lb::SVC_F_LOCAL;
        }
        let ranges: Vec<(Ipv4Addr, u8)> =
            spec.source_ranges.iter().filter_map(|x| parse_range(spec.id, x).ok()).collect();
        let frontends = r
            .frontends
            .iter()
            .map(|f| {
                let master = LbService {
                    rev_nat_index: f.rev_nat_index,
                    flags,
                    affinity_timeout: spec.affinity_timeout.unwrap_or(0),
                    ..Default::default()
                };
                let w = FrontendWrite {
                    master,
                    slots: slots.clone(),
                    maglev: maglev.clone(),
                    ranges: ranges.clone(),
                };
                (frontend(&f.address), w)
            })
            .collect();
        (backends, frontends)
    }

    /// Write `record` (replacing `old`) into the maps in an order that
    /// never leaves a frontend without backends, then record and save it.
    /// A failure puts the maps back as `old` had them. Returns whether
    /// the retired backends changed.
    fn write(
        &mut self,
        mut record: Record,
        old: Option<&Record>,
        local: &BTreeSet<Ipv4Addr>,
    ) -> Result<bool, ServiceError> {
        let id = record.spec.id;
        let (backends, frontends) = self.writes_of(&record, local);
        let lost: Vec<&FrontendStatus> = old
            .map(|o| o.frontends.iter().filter(|f| !record.frontends.contains(f)).collect())
            .unwrap_or_default();
        let written = (|| -> Result<(), String> {
            // 1. Backends, 2. frontends, 3. frontends the service lost.
            for (bid, raw) in &backends {
                self.datapath.upsert_backend(*bid, raw)?;
            }
            for (fe, w) in &frontends {
                self.datapath.write_frontend(fe, w)?;
            }
            for f in &lost {
                self.datapath.remove_frontend(&frontend(&f.address), f.rev_nat_index)?;
            }
            Ok(())
        })();
        record.entries = frontends.iter().map(|(_, w)| 1 + w.slots.len()).sum();
        let saved =
            written.map_err(|reason| ServiceError::Datapath { id, reason }).and_then(|()| {
                self.state.index(&record);
                self.state.records.insert(id, record.clone());
                self.save_record(id).inspect_err(|_| {
                    self.state.records.remove(&id);
                    self.state.unindex(&record);
                })
            });
        if let Err(e) = saved {
            self.unwrite(&record, old, local);
            return Err(e);
        }
        Ok(old.is_some_and(|o| self.retire_unnamed(o.backends.iter())))
    }

    /// Put the maps back as `old` had them after `record` was (partly)
    /// written: frontends only `record` has go, `old`'s are written again,
    /// backends only `record` names go (unless some other service or a
    /// pinned flow has them), `old`'s are written again. Best effort.
    fn unwrite(&mut self, record: &Record, old: Option<&Record>, local: &BTreeSet<Ipv4Addr>) {
        let had = |f: &FrontendStatus| old.is_some_and(|o| o.frontends.contains(f));
        for f in record.frontends.iter().filter(|f| !had(f)) {
            let _ = self.datapath.remove_frontend(&frontend(&f.address), f.rev_nat_index);
        }
        if let Some(o) = old {
            let (backends, frontends) = self.writes_of(o, local);
            for (bid, raw) in &backends {
                let _ = self.datapath.upsert_backend(*bid, raw);
            }
            for (fe, w) in &frontends {
                let _ = self.datapath.write_frontend(fe, w);
            }
        }
        for bid in record.backends.keys() {
            let elsewhere = old.is_some_and(|o| o.backends.contains_key(bid))
                || self.state.refs.get(bid).is_some_and(|s| !s.is_empty())
                || self.state.retired.contains_key(bid);
            if !elsewhere {
                let _ = self.datapath.remove_backend(*bid);
            }
        }
    }

    /// Delete service `id`: its frontends go; its backends retire.
    pub fn delete(&mut self, id: u16) -> Result<Service, ServiceError> {
        let svc = self.get(id)?;
        for f in &svc.frontends {
            self.datapath
                .remove_frontend(&frontend(&f.address), f.rev_nat_index)
                .map_err(|reason| ServiceError::Datapath { id, reason })?;
        }
        let r = self.state.records.remove(&id).expect("get found it");
        self.state.unindex(&r);
        if self.retire_unnamed(r.backends.iter()) {
            self.save_retired()?;
        }
        if let Some(dir) = &self.dir {
            store::remove(&dir.join(format!("{id}.json")))?;
        }
        self.shown.remove(&id);
        Ok(svc)
    }

    /// Retire those of `backends` no service names any more; whether any
    /// was.
    fn retire_unnamed<'a>(
        &mut self,
        backends: impl Iterator<Item = (&'a u32, &'a L4Addr)>,
    ) -> bool {
        let mut any = false;
        for (id, a) in backends {
            if self.state.refs.get(id).is_none_or(|s| s.is_empty()) {
                self.state.refs.remove(id);
                self.state.retired.insert(*id, *a);
                any = true;
            }
        }
        any
    }

    /// Remove the retired backends no flow is pinned to any more; returns
    /// how many went.
    pub fn release_retired(&mut self) -> Result<usize, String> {
        if self.state.retired.is_empty() {
            return Ok(0);
        }
        let pinned = self.datapath.pinned_backends()?;
        let free: Vec<(u32, L4Addr)> = self
            .state
            .retired
            .iter()
            .filter(|(id, _)| !pinned.contains(id))
            .map(|(id, a)| (*id, *a))
            .collect();
        for (id, a) in &free {
            self.datapath.remove_backend(*id)?;
            self.state.retired.remove(id);
            if self.state.backend_by_addr.get(a) == Some(id) {
                self.state.backend_by_addr.remove(a);
            }
        }
        if !free.is_empty() {
            self.save_retired().map_err(|e| e.to_string())?;
        }
        Ok(free.len())
    }

    /// Rewrite the services with a Local traffic policy after this node's
    /// endpoints changed.
    pub fn refresh_local(&mut self, local: &BTreeSet<Ipv4Addr>) -> Result<(), ServiceError> {
        let specs: Vec<ServiceSpec> = self
            .state
            .records
            .values()
            .filter(|r| r.spec.traffic_policy_local)
            .map(|r| r.spec.clone())
            .collect();
        for s in specs {
            self.update(s, local)?;
        }
        Ok(())
    }

    /// The retired backends (for status and tests).
    pub fn retired(&self) -> Vec<u32> {
        self.state.retired.keys().copied().collect()
    }
}

fn frontend(a: &L4Addr) -> Frontend {
    Frontend { addr: a.ip, port: a.port, proto: proto(a) }
}

/// Parse a services file: a YAML or JSON list of service specs.
pub fn parse_file(text: &str) -> Result<Vec<ServiceSpec>, String> {
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciliate_api::models::{BackendSpec, Protocol};

    #[test]
    fn reverse_nat_indexes_skip_none_and_the_dsr_mark() {
        let mut st = State { next_rev: u16::MAX - 2, ..Default::default() };
        let got: Vec<u16> = (0..3).map(|_| st.alloc_rev().unwrap()).collect();
        assert_eq!(got, [u16::MAX - 1, 1, 2], "0 and REV_NAT_DSR are never handed out");
    }

    fn spec(id: u16, fe: &str, backends: &[(&str, u16)]) -> ServiceSpec {
        ServiceSpec {
            id,
            frontend: fe.parse().unwrap(),
            kind: ServiceKind::ClusterIP,
            backends: backends
                .iter()
                .map(|(ip, port)| BackendSpec {
                    ip: ip.parse().unwrap(),
                    port: *port,
                    state: BackendState::Active,
                })
                .collect(),
            affinity_timeout: None,
            traffic_policy_local: false,
            source_ranges: vec![],
            algorithm: None,
            name: String::new(),
            source: Default::default(),
        }
    }

    fn services() -> Services {
        Services::open(
            None,
            Box::new(MemoryLb::default()),
            vec!["192.168.1.2".parse().unwrap()],
            LbAlgorithm::Random,
        )
        .unwrap()
    }

    fn mem(s: &mut Services) -> &mut MemoryLb {
        s.datapath.as_any_mut().downcast_mut().unwrap()
    }

    #[test]
    fn maglev_spreads_evenly_and_a_removal_moves_about_one_nth() {
        let m = 16381;
        let names: Vec<(u32, String)> = (1..=5).map(|i| (i, format!("10.0.0.{i}:80"))).collect();
        let t = maglev_table(&names, m);
        for (id, _) in &names {
            let n = t.iter().filter(|x| **x == *id).count();
            assert!(n == m / 5 || n == m / 5 + 1, "backend {id}: {n} entries");
        }
        // Order of the input does not matter.
        let mut rev = names.clone();
        rev.reverse();
        assert_eq!(maglev_table(&rev, m), t);
        // Remove backend 3: its entries move, and few others do.
        let fewer: Vec<_> = names.iter().filter(|(id, _)| *id != 3).cloned().collect();
        let t2 = maglev_table(&fewer, m);
        let moved = t.iter().zip(&t2).filter(|(a, b)| a != b && **a != 3).count();
        let changed = t.iter().zip(&t2).filter(|(a, b)| a != b).count();
        assert!(changed < m * 2 / 5, "{changed} of {m} entries changed (expect about 1/5)");
        assert!(moved < m / 10, "{moved} entries of surviving backends moved");
        assert!(t2.iter().all(|x| *x != 3 && *x != 0));
    }

    #[test]
    fn updates_write_backends_then_frontends_and_validate_first() {
        let mut s = services();
        let local = BTreeSet::new();
        let svc = s
            .update(spec(1, "10.96.0.10:80", &[("10.0.0.1", 8080), ("10.0.0.2", 8080)]), &local)
            .unwrap();
        assert_eq!(svc.frontends.len(), 1);
        assert_eq!(mem(&mut s).log, ["backend+ 1", "backend+ 2", "frontend+ 10.96.0.10:80"]);
        let fe = mem(&mut s).frontends.values().next().unwrap().clone();
        assert_eq!(fe.slots, [1, 2]);
        assert_eq!(fe.master.flags, lb::SVC_F_CLUSTER_IP);

        // Refused updates leave everything as it was.
        for (bad, needle) in [
            (spec(0, "10.96.0.10:80", &[]), "ID 0"),
            (spec(2, "10.96.0.10:80", &[]), "belongs to service 1"),
            (spec(2, "10.96.0.11:0", &[]), "port 0"),
            (spec(2, "0.0.0.0:80", &[]), "only for NodePort"),
            (spec(2, "10.96.0.11:80", &[("10.0.0.1", 1), ("10.0.0.1", 1)]), "twice"),
            (
                ServiceSpec { kind: ServiceKind::NodePort, ..spec(2, "0.0.0.0:80", &[]) },
                "30000-32767",
            ),
            (
                ServiceSpec {
                    source_ranges: vec!["10.0.0.1/8".into()],
                    kind: ServiceKind::LoadBalancer,
                    ..spec(2, "1.2.3.4:80", &[])
                },
                "host bits",
            ),
            (
                ServiceSpec { affinity_timeout: Some(0), ..spec(2, "10.96.0.12:80", &[]) },
                "affinity",
            ),
        ] {
            let before = mem(&mut s).log.len();
            let e = s.update(bad, &local).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(mem(&mut s).log.len(), before, "a refused update wrote: {e}");
        }
    }

    #[test]
    fn a_removed_backend_retires_until_no_flow_is_pinned_to_it() {
        let mut s = services();
        let local = BTreeSet::new();
        s.update(spec(1, "10.96.0.10:80", &[("10.0.0.1", 8080), ("10.0.0.2", 8080)]), &local)
            .unwrap();
        s.update(spec(1, "10.96.0.10:80", &[("10.0.0.2", 8080)]), &local).unwrap();
        assert_eq!(s.retired(), [1]);
        assert!(mem(&mut s).backends.contains_key(&1), "kept while it may carry flows");
        mem(&mut s).pinned.insert(1);
        assert_eq!(s.release_retired().unwrap(), 0);
        mem(&mut s).pinned.clear();
        assert_eq!(s.release_retired().unwrap(), 1);
        assert!(!mem(&mut s).backends.contains_key(&1));
        // A terminating backend stays in the map but has no slot.
        let mut t = spec(1, "10.96.0.10:80", &[("10.0.0.2", 8080), ("10.0.0.3", 8080)]);
        t.backends[0].state = BackendState::Terminating;
        s.update(t, &local).unwrap();
        let fe = mem(&mut s).frontends.values().next().unwrap().clone();
        assert_eq!(fe.slots.len(), 1);
        assert_eq!(
            mem(&mut s).backends.values().filter(|b| b.state == BACKEND_TERMINATING).count(),
            1
        );
    }

    #[test]
    fn services_persist_with_their_indexes_and_backend_ids() {
        let dir = std::env::temp_dir().join(format!("ciliate-svc-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let open = || {
            Services::open(Some(&dir), Box::new(MemoryLb::default()), vec![], LbAlgorithm::Random)
                .unwrap()
        };
        let local = BTreeSet::new();
        let mut s = open();
        let a = s.update(spec(1, "10.96.0.10:80", &[("10.0.0.1", 80)]), &local).unwrap();
        let b = s.update(spec(2, "10.96.0.11:80", &[("10.0.0.2", 80)]), &local).unwrap();
        s.update(spec(3, "10.96.0.12:80", &[("10.0.0.3", 80)]), &local).unwrap();
        s.delete(3).unwrap();
        drop(s);
        let mut s = open();
        assert_eq!(s.list(), [a.clone(), b]);
        assert_eq!(s.retired(), [3], "the deleted service's backend is retired");
        // A new service gets fresh indexes, not those in use.
        let c = s.update(spec(4, "10.96.0.13:80", &[("10.0.0.1", 80)]), &local).unwrap();
        assert_eq!(c.backends[0].id, a.backends[0].id, "same address, same backend");
        assert!(c.frontends[0].rev_nat_index > 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_node_port_range_is_configurable() {
        let mut s = services();
        s.node_ports = (31000, 31010);
        let mut np = spec(5, "0.0.0.0:30080", &[]);
        np.kind = ServiceKind::NodePort;
        let e = s.update(np.clone(), &BTreeSet::new()).unwrap_err().to_string();
        assert!(e.contains("31000-31010"), "{e}");
        np.frontend.port = 31005;
        assert!(s.update(np, &BTreeSet::new()).is_ok());
    }

    #[test]
    fn nodeport_expands_to_node_addresses_and_local_policy_filters_backends() {
        let mut s = services();
        let mut np = spec(3, "0.0.0.0:30080", &[("10.0.0.1", 80), ("10.0.0.9", 80)]);
        np.kind = ServiceKind::NodePort;
        np.traffic_policy_local = true;
        np.frontend.protocol = Protocol::UDP;
        let local: BTreeSet<Ipv4Addr> = ["10.0.0.1".parse().unwrap()].into();
        let svc = s.update(np, &local).unwrap();
        assert_eq!(svc.frontends[0].address.to_string(), "192.168.1.2:30080/UDP");
        let fe = mem(&mut s).frontends.values().next().unwrap().clone();
        assert_eq!(fe.slots, [1], "only the local backend");
        assert_ne!(fe.master.flags & lb::SVC_F_LOCAL, 0);
        let mut mg = spec(4, "10.96.0.20:80", &[("10.0.0.1", 80)]);
        mg.algorithm = Some(LbAlgorithm::Maglev);
        let bid = s.update(mg, &local).unwrap().backends[0].id;
        assert_eq!(bid, 3, "an address with another protocol is another backend");
        let w = mem(&mut s).frontends.iter().find(|(f, _)| f.port == 80).unwrap().1.clone();
        assert!(w.maglev.as_ref().is_some_and(|t| t.iter().all(|x| *x == bid)));
        assert_eq!(s.delete(4).unwrap().spec.id, 4);
        assert!(matches!(s.delete(4), Err(ServiceError::NotFound(4))));
    }

    fn many(n: u32) -> Vec<(String, u16)> {
        (0..n).map(|i| (Ipv4Addr::from(0x0a01_0000 + i).to_string(), 80)).collect()
    }

    fn spec_of(id: u16, fe: &str, backends: &[(String, u16)]) -> ServiceSpec {
        let b: Vec<(&str, u16)> = backends.iter().map(|(ip, p)| (ip.as_str(), *p)).collect();
        spec(id, fe, &b)
    }

    #[test]
    fn an_update_the_maps_cannot_hold_is_refused_before_any_write() {
        let mut s = services();
        s.update(spec(1, "10.96.0.1:80/TCP", &[("10.0.0.1", 80)]), &BTreeSet::new()).unwrap();
        let e =
            s.update(spec_of(2, "10.96.0.2:80/TCP", &many(70_000)), &BTreeSet::new()).unwrap_err();
        assert_eq!(e.status(), 507, "{e}");
        assert!(e.to_string().contains("ciliate_lb4_backends"), "{e}");
        let lb = mem(&mut s);
        assert_eq!(lb.backends.len(), 1, "no orphan backends");
        assert_eq!(lb.frontends.len(), 1);
        assert_eq!(s.list().len(), 1);
        // A later service with a new backend still goes in.
        s.update(spec(3, "10.96.0.3:80/TCP", &[("10.0.0.9", 80)]), &BTreeSet::new()).unwrap();
        // Slots: 2 frontends of 40,000 backends each do not fit the
        // services map (65,536), whatever the backends map says.
        let b = many(40_000);
        s.update(spec_of(4, "10.96.0.4:80/TCP", &b), &BTreeSet::new()).unwrap();
        let e = s.update(spec_of(5, "10.96.0.5:80/TCP", &b), &BTreeSet::new()).unwrap_err();
        assert!(e.to_string().contains("ciliate_lb4_services"), "{e}");
        assert!(s.get(5).is_err());
    }

    #[test]
    fn a_write_that_fails_midway_leaves_the_service_as_it_was() {
        let mut s = services();
        let before = spec(1, "10.96.0.1:80/TCP", &[("10.0.0.1", 80), ("10.0.0.2", 80)]);
        s.update(before.clone(), &BTreeSet::new()).unwrap();
        let (backends, frontends) = {
            let lb = mem(&mut s);
            (lb.backends.clone(), lb.frontends.clone())
        };
        let svc = s.get(1).unwrap();
        // The new version adds two backends; the third write fails.
        mem(&mut s).fail_after = Some(2);
        let after = spec(1, "10.96.0.1:80/TCP", &[("10.0.0.3", 80), ("10.0.0.4", 80)]);
        let e = s.update(after.clone(), &BTreeSet::new()).unwrap_err();
        assert_eq!(e.status(), 500, "{e}");
        mem(&mut s).fail_after = None;
        let lb = mem(&mut s);
        assert_eq!(lb.backends, backends, "new backends removed");
        assert_eq!(lb.frontends, frontends, "the frontend as it was");
        assert_eq!(s.get(1).unwrap(), svc, "the agent's record as it was");
        assert!(s.retired().is_empty());
        // And the same update goes through once writes work.
        s.update(after, &BTreeSet::new()).unwrap();
        assert_eq!(s.get(1).unwrap().backends.len(), 2);
    }
}
