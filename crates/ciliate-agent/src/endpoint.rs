//! The endpoint manager: create, delete, restore and garbage-collect
//! endpoints. It owns the node's desired state (IPAM, identities,
//! endpoints) and writes it into the datapath through [`Datapath`], so it
//! can be tested without a kernel ([`MemoryDatapath`]).
//!
//! Bad input is refused before anything changes; a datapath failure while
//! creating leaves no endpoint behind and no half-written state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ciliate_api::models::{Endpoint, EndpointCreate, check_labels};
use ciliate_common::policy::{DIR_EGRESS, DIR_INGRESS, PolicyEntry, PolicyKey};
use ciliate_datapath::{
    DatapathError,
    maps::{PolicyEntries, PolicyWriter, add_policy_batch, policy_entries, sync_policy_batch},
    node::{Attached, EndpointSpec, format_mac, parse_mac},
};

use crate::{
    identity::{Identities, label_set},
    ipam::{Cidr, Ipam},
    policy::{
        IdView, NamedPorts, PortNames, Prefix, Resolved, Rule, referenced_cidrs, resolve_named,
    },
    store,
};

/// An endpoint's named ports in the form resolution uses.
fn port_names(m: &BTreeMap<String, ciliate_api::models::NamedPort>) -> PortNames {
    m.iter()
        .map(|(n, p)| (n.clone(), vec![(p.port, if p.protocol == "UDP" { 17 } else { 6 })]))
        .collect()
}

/// The policy in force, persisted in the state directory.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PolicyState {
    pub revision: u64,
    pub rules: Vec<Rule>,
}

/// What went wrong, with the HTTP status the API answers with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A map cannot hold the change; nothing was changed.
    #[error("{0}")]
    Full(String),
    #[error("{0}")]
    Internal(String),
}

impl EndpointError {
    pub fn status(&self) -> u16 {
        match self {
            EndpointError::BadRequest(_) => 400,
            EndpointError::NotFound(_) => 404,
            EndpointError::Conflict(_) => 409,
            EndpointError::Full(_) => 507,
            EndpointError::Internal(_) => 500,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Internal(e.to_string())
}

/// A failed policy write, said with what it was for; a full map is
/// [`EndpointError::Full`].
fn policy_err(what: &str, e: DatapathError) -> EndpointError {
    match e {
        e @ (DatapathError::MapFull { .. } | DatapathError::EndpointPolicyFull { .. }) => {
            EndpointError::Full(format!("{what}: {e}"))
        }
        e => EndpointError::Internal(format!("{what}: {e}")),
    }
}

/// The datapath side of endpoints.
pub trait Datapath: Send {
    fn attach(&mut self, spec: &EndpointSpec) -> Result<Attached, String>;
    fn detach(&mut self, ip: Ipv4Addr, lxc: &str) -> Result<(), String>;
    /// Make the policy of each endpoint of `batch` exactly its `Resolved`
    /// (an empty one: no entries at all), as one change: when the map
    /// cannot hold it nothing is written, and a write that fails midway is
    /// undone (see `ciliate_datapath::maps::sync_policy_batch`).
    fn sync_policies(&mut self, batch: &[(u16, Resolved)]) -> Result<(), DatapathError>;
    /// Add the entries of each endpoint's `Resolved` in `batch` to what it
    /// holds, removing nothing (the entries of identities new to a policy
    /// in force), as one change like [`Datapath::sync_policies`].
    fn add_policies(&mut self, batch: &[(u16, Resolved)]) -> Result<(), DatapathError>;
    /// Endpoint IDs that have entries in the policy map.
    fn policy_holders(&mut self) -> Result<BTreeSet<u16>, String>;
    /// Make the ipcache's CIDR entries (local identities) exactly `cidrs`,
    /// never overwriting an entry of an endpoint or the host.
    fn sync_cidrs(&mut self, cidrs: &BTreeMap<Prefix, u32>) -> Result<(), String>;
    /// Does the host-side device still exist?
    fn device_exists(&self, lxc: &str) -> bool;
    /// Remove what an endpoint that never came to be may have left for
    /// device `lxc` (its pins; the lxc and ipcache entries of `ip`, the
    /// address its container was given).
    fn clear_leftovers(&mut self, ip: Option<Ipv4Addr>, lxc: &str) -> Result<(), String>;
    /// Remove datapath pieces (pins) of devices no endpoint in `keep` has;
    /// returns the devices cleaned.
    fn sweep(&mut self, keep: &[&str]) -> Result<Vec<String>, String>;
    /// Is the datapath of `ep` in place (its device, its program attached
    /// to it, its lxc and ipcache entries, its policy enforcement)? The
    /// reason when it is not.
    fn check(&mut self, ep: &Endpoint) -> Result<(), String>;
    /// Write only the endpoint's configuration entry (what its packets'
    /// program reads: switching its debugging).
    fn configure(&mut self, spec: &EndpointSpec) -> Result<(), String>;
    /// Switch the node programs' debugging.
    fn set_node_debug(&mut self, on: bool) -> Result<(), String>;
}

/// The policy entries of a resolution.
fn entries_of(endpoint_id: u16, r: &Resolved) -> Result<PolicyEntries, DatapathError> {
    let rules: Vec<_> = r.rules.iter().cloned().collect();
    let enforced = [(DIR_INGRESS, r.ingress_enforced), (DIR_EGRESS, r.egress_enforced)];
    policy_entries(endpoint_id, &enforced, &rules)
}

/// The map entries of each endpoint's `Resolved` in `batch`.
pub fn batch_entries(
    batch: &[(u16, Resolved)],
) -> Result<Vec<(u16, PolicyEntries)>, DatapathError> {
    batch.iter().map(|(id, r)| Ok((*id, entries_of(*id, r)?))).collect()
}

/// Policy entries in memory, with a write that fails on demand.
#[derive(Default)]
pub struct MemoryPolicyMap {
    pub entries: BTreeMap<(PolicyKey, u32), PolicyEntry>,
    /// Fail the write after this many more succeeded.
    pub fail_after: Option<usize>,
}

impl PolicyWriter for MemoryPolicyMap {
    fn insert_entry(
        &mut self,
        key: &(PolicyKey, u32),
        value: PolicyEntry,
    ) -> Result<(), DatapathError> {
        match &mut self.fail_after {
            Some(0) => {
                return Err(DatapathError::BadValue {
                    what: "memory policy map".into(),
                    reason: "injected failure".into(),
                });
            }
            Some(n) => *n -= 1,
            None => {}
        }
        self.entries.insert(*key, value);
        Ok(())
    }
    fn remove_entry(&mut self, key: &(PolicyKey, u32)) -> Result<(), DatapathError> {
        self.entries.remove(key);
        Ok(())
    }
}

/// A datapath in memory: what is attached, for tests.
#[derive(Default)]
pub struct MemoryDatapath {
    pub attached: BTreeMap<Ipv4Addr, EndpointSpec>,
    /// The resolved policy of each endpoint, as last written.
    pub policies: BTreeMap<u16, Resolved>,
    /// Policy writes per endpoint.
    pub syncs: BTreeMap<u16, usize>,
    pub map: MemoryPolicyMap,
    pub held: BTreeMap<u16, PolicyEntries>,
    pub policy_capacity: ciliate_datapath::maps::PolicyCapacity,
    pub cidrs: BTreeMap<Prefix, u32>,
    pub devices: Vec<String>,
    pub fail_next_attach: Option<String>,
    /// The node programs' debugging, as last switched.
    pub node_debug: bool,
    /// The next `configure` fails with this.
    pub fail_next_configure: Option<String>,
}

impl Datapath for MemoryDatapath {
    fn attach(&mut self, spec: &EndpointSpec) -> Result<Attached, String> {
        if let Some(e) = self.fail_next_attach.take() {
            return Err(e);
        }
        self.attached.insert(spec.ip, spec.clone());
        Ok(Attached {
            lxc_mac: [2, 0, 0, 0, 0, spec.endpoint_id as u8],
            ifindex: 100 + u32::from(spec.endpoint_id),
        })
    }
    fn configure(&mut self, spec: &EndpointSpec) -> Result<(), String> {
        if let Some(e) = self.fail_next_configure.take() {
            return Err(e);
        }
        self.attached.insert(spec.ip, spec.clone());
        Ok(())
    }
    fn set_node_debug(&mut self, on: bool) -> Result<(), String> {
        self.node_debug = on;
        Ok(())
    }
    fn detach(&mut self, ip: Ipv4Addr, _lxc: &str) -> Result<(), String> {
        self.attached.remove(&ip);
        Ok(())
    }
    fn sync_cidrs(&mut self, cidrs: &BTreeMap<Prefix, u32>) -> Result<(), String> {
        self.cidrs = cidrs.clone();
        Ok(())
    }
    fn sync_policies(&mut self, batch: &[(u16, Resolved)]) -> Result<(), DatapathError> {
        let entries = batch_entries(batch)?;
        sync_policy_batch(&mut self.map, &mut self.held, &entries, self.policy_capacity)?;
        for (id, r) in batch {
            *self.syncs.entry(*id).or_default() += 1;
            if *r == Resolved::default() {
                self.policies.remove(id);
            } else {
                self.policies.insert(*id, r.clone());
            }
        }
        Ok(())
    }
    fn add_policies(&mut self, batch: &[(u16, Resolved)]) -> Result<(), DatapathError> {
        let entries = batch_entries(batch)?;
        add_policy_batch(&mut self.map, &mut self.held, &entries, self.policy_capacity)?;
        for (id, r) in batch {
            *self.syncs.entry(*id).or_default() += 1;
            let p = self.policies.entry(*id).or_default();
            p.rules.extend(r.rules.iter().cloned());
            p.ingress_enforced |= r.ingress_enforced;
            p.egress_enforced |= r.egress_enforced;
        }
        Ok(())
    }
    fn policy_holders(&mut self) -> Result<BTreeSet<u16>, String> {
        Ok(self.held.keys().copied().collect())
    }
    fn device_exists(&self, lxc: &str) -> bool {
        self.devices.iter().any(|d| d == lxc)
    }
    fn clear_leftovers(&mut self, ip: Option<Ipv4Addr>, _lxc: &str) -> Result<(), String> {
        if let Some(ip) = ip {
            self.attached.remove(&ip);
        }
        Ok(())
    }
    fn sweep(&mut self, keep: &[&str]) -> Result<Vec<String>, String> {
        let gone: Vec<Ipv4Addr> = self
            .attached
            .iter()
            .filter(|(_, s)| !keep.contains(&s.lxc.as_str()))
            .map(|(ip, _)| *ip)
            .collect();
        Ok(gone.into_iter().filter_map(|ip| self.attached.remove(&ip).map(|s| s.lxc)).collect())
    }
    fn check(&mut self, ep: &Endpoint) -> Result<(), String> {
        match self.attached.get(&ep.ip) {
            Some(s) if s.lxc == ep.host_ifname && self.device_exists(&ep.host_ifname) => Ok(()),
            Some(s) if s.lxc != ep.host_ifname => Err(format!("attached to {}", s.lxc)),
            Some(_) => Err(format!("host device {} is gone", ep.host_ifname)),
            None => Err("no program attached".into()),
        }
    }
}

/// Container IDs of the node's own endpoints (Cilium's host and health
/// endpoints): never garbage-collected; the host one has no datapath of its
/// own and cannot be deleted.
pub const HOST_CONTAINER: &str = "reserved:host";
pub const HEALTH_CONTAINER: &str = "reserved:health";

fn is_reserved(container_id: &str) -> bool {
    container_id.starts_with("reserved:")
}

/// Every endpoint's named ports by identity: what egress rules' port names
/// mean (computed once per regeneration, shared by all endpoints).
fn named_ports_by_identity<'a>(
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> Arc<BTreeMap<u32, PortNames>> {
    let mut by_identity: BTreeMap<u32, PortNames> = BTreeMap::new();
    for other in endpoints {
        let slot = by_identity.entry(other.identity).or_default();
        for (n, ports) in port_names(&other.named_ports) {
            let v = slot.entry(n).or_default();
            v.extend(ports);
            v.sort();
            v.dedup();
        }
    }
    Arc::new(by_identity)
}

/// What the endpoint manager publishes for readers (the API, the cluster
/// sync, metrics): a consistent snapshot taken after a change, never a
/// lock on the manager's state.
#[derive(Clone, Debug)]
pub struct EndpointsView {
    pub endpoints: imbl::OrdMap<u16, Endpoint>,
    pub identities: Arc<IdView>,
    /// Cluster identities allocated (not counting CIDR ones).
    pub cluster_identities: usize,
    pub policy: Arc<PolicyState>,
    pub ipam_cidr: Cidr,
    pub ipam_used: usize,
    pub ipam_free: usize,
    /// How many endpoints the start restored; `None` while it restores.
    pub restored: Option<usize>,
    /// Datapath debugging for the whole node.
    pub debug_all: bool,
    /// Monitor aggregation "none".
    pub trace_all: bool,
}

impl EndpointsView {
    pub fn get(&self, id: u16) -> Result<&Endpoint, EndpointError> {
        self.endpoints
            .get(&id)
            .ok_or_else(|| EndpointError::NotFound(format!("endpoint {id} not found")))
    }

    pub fn by_container(&self, container_id: &str) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| e.container_id == container_id)
    }

    /// `policy trace`: would `r.src` reach `r.dst`? (See
    /// [`crate::policy::trace`].)
    pub fn trace(
        &self,
        r: &ciliate_api::models::TraceRequest,
    ) -> Result<crate::policy::Trace, EndpointError> {
        let ids = &self.identities;
        let peer = |p: &ciliate_api::models::TracePeer,
                    side: &str,
                    spare: u32|
         -> Result<(u32, Vec<String>), EndpointError> {
            let bad = |m: String| EndpointError::BadRequest(format!("{side}: {m}"));
            match (p.endpoint, p.identity, &p.labels) {
                (Some(id), None, None) => {
                    let ep = self.get(id)?;
                    Ok((
                        ep.identity,
                        ids.get(ep.identity).cloned().unwrap_or_else(|| label_set(&ep.labels)),
                    ))
                }
                (None, Some(id), None) => ids.get(id).map(|l| (id, l.clone())).ok_or_else(|| {
                    EndpointError::NotFound(format!("{side}: identity {id} not found"))
                }),
                (None, None, Some(labels)) if !labels.is_empty() => {
                    let mut l = labels.clone();
                    l.sort();
                    let known = ids.iter().find(|(_, v)| **v == l).map(|(id, _)| *id);
                    Ok((known.unwrap_or(spare), l))
                }
                _ => Err(bad("give exactly one of endpoint, identity or labels".into())),
            }
        };
        let proto = match r.proto.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            p => {
                return Err(EndpointError::BadRequest(format!("protocol {p:?}: tcp, udp or icmp")));
            }
        };
        // Spare identities for label sets nobody has yet.
        let (src, src_labels) = peer(&r.src, "src", u32::MAX - 1)?;
        let (dst, dst_labels) = peer(&r.dst, "dst", u32::MAX - 2)?;
        let by_identity = named_ports_by_identity(self.endpoints.values());
        let named = |p: &ciliate_api::models::TracePeer| NamedPorts {
            own: p
                .endpoint
                .and_then(|id| self.endpoints.get(&id))
                .map(|ep| port_names(&ep.named_ports))
                .unwrap_or_default(),
            by_identity: by_identity.clone(),
        };
        Ok(crate::policy::trace(
            &self.policy.rules,
            (src, &src_labels),
            (dst, &dst_labels),
            proto,
            r.dport,
            ids,
            (&named(&r.src), &named(&r.dst)),
        ))
    }
}

/// Highest endpoint ID (Cilium's endpoint IDs fit in 12 bits... here 16).
pub const MAX_ENDPOINT_ID: u16 = 4095;

pub struct Endpoints<D: Datapath> {
    pub ipam: Ipam,
    pub identities: Identities,
    endpoints: imbl::OrdMap<u16, Endpoint>,
    state_dir: Option<PathBuf>,
    pub datapath: D,
    /// Monitor aggregation "none" for the endpoints' programs.
    pub trace_all: bool,
    /// Datapath debugging for the whole node (`--bpf-debug`, `ciliate
    /// config Debug=true`): every endpoint's packets debug.
    pub debug_all: bool,
    pub policy: Arc<PolicyState>,
    /// How many endpoints the start restored; `None` while it restores.
    pub restored: Option<usize>,
    /// The cluster's pod CIDRs: a CIDR identity outside them is also the
    /// world (`reserved:world`). The node's pod CIDR unless told more.
    pub cluster_cidrs: Vec<Prefix>,
    /// Regenerations are timed into these.
    pub metrics: crate::metrics::Metrics,
}

impl<D: Datapath> Endpoints<D> {
    /// Open the node's state (in `state_dir`, or in memory when `None`).
    pub fn open(cidr: Cidr, state_dir: Option<&Path>, datapath: D) -> Result<Self, EndpointError> {
        let ipam = Ipam::open(cidr, state_dir.map(|d| d.join("ipam.json"))).map_err(internal)?;
        let identities =
            Identities::open(state_dir.map(|d| d.join("identities.json"))).map_err(internal)?;
        let mut endpoints = imbl::OrdMap::new();
        if let Some(dir) = state_dir {
            let ep_dir = dir.join("endpoints");
            if let Ok(entries) = std::fs::read_dir(&ep_dir) {
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "json")
                        && let Some(ep) = store::load::<Endpoint>(&e.path()).map_err(internal)?
                    {
                        endpoints.insert(ep.id, ep);
                    }
                }
            }
        }
        Ok(Self {
            ipam,
            identities,
            endpoints,
            state_dir: state_dir.map(Path::to_owned),
            datapath,
            trace_all: false,
            debug_all: false,
            metrics: Default::default(),
            cluster_cidrs: vec![(cidr.net, cidr.len)],
            restored: Some(0),
            policy: Arc::new(match state_dir {
                Some(d) => {
                    store::load(&d.join("policy.json")).map_err(internal)?.unwrap_or_default()
                }
                None => PolicyState::default(),
            }),
        })
    }

    fn ep_path(&self, id: u16) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join("endpoints").join(format!("{id}.json")))
    }

    fn persist(&self, ep: &Endpoint) -> Result<(), EndpointError> {
        match self.ep_path(ep.id) {
            Some(p) => store::save(&p, ep).map_err(internal),
            None => Ok(()),
        }
    }

    pub fn list(&self) -> Vec<Endpoint> {
        self.endpoints.values().cloned().collect()
    }

    pub fn get(&self, id: u16) -> Result<Endpoint, EndpointError> {
        self.endpoints
            .get(&id)
            .cloned()
            .ok_or_else(|| EndpointError::NotFound(format!("endpoint {id} not found")))
    }

    /// `ep` with its state as the datapath has it now: a "ready" endpoint
    /// whose program, device or map entries are not in place is
    /// "not-ready: <why>".
    fn checked(&mut self, mut ep: Endpoint) -> Endpoint {
        if ep.state == "ready"
            && ep.container_id != HOST_CONTAINER
            && let Err(why) = self.datapath.check(&ep)
        {
            ep.state = format!("not-ready: {why}");
        }
        ep
    }

    /// Every endpoint, with its state checked against the datapath (what
    /// the API shows).
    pub fn list_checked(&mut self) -> Vec<Endpoint> {
        let eps = self.list();
        eps.into_iter().map(|e| self.checked(e)).collect()
    }

    /// [`Endpoints::get`] with its state checked against the datapath.
    pub fn get_checked(&mut self, id: u16) -> Result<Endpoint, EndpointError> {
        let ep = self.get(id)?;
        Ok(self.checked(ep))
    }

    pub fn by_container(&self, container_id: &str) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| e.container_id == container_id)
    }

    fn spec(&self, ep: &Endpoint) -> Result<EndpointSpec, EndpointError> {
        Ok(EndpointSpec {
            ip: ep.ip,
            lxc: ep.host_ifname.clone(),
            mac: parse_mac(&ep.mac).ok_or_else(|| {
                EndpointError::BadRequest(format!("endpoint {}: bad MAC {:?}", ep.id, ep.mac))
            })?,
            endpoint_id: ep.id,
            identity: ep.identity,
            trace_all: self.trace_all,
            debug: ep.debug || self.debug_all,
        })
    }

    /// Switch datapath debugging of endpoint `id` (its configuration entry
    /// only: no program is loaded, nothing reattached). A failed write
    /// leaves the endpoint as it was.
    pub fn set_endpoint_debug(&mut self, id: u16, on: bool) -> Result<Endpoint, EndpointError> {
        let mut ep = self
            .endpoints
            .get(&id)
            .cloned()
            .ok_or_else(|| EndpointError::NotFound(format!("endpoint {id} not found")))?;
        if ep.identity == ciliate_common::identity::HOST {
            return Err(EndpointError::BadRequest(format!(
                "endpoint {id} is the host: the node's programs debug with `ciliate config Debug=true`"
            )));
        }
        let was = ep.clone();
        ep.debug = on;
        let spec = self.spec(&ep)?;
        self.datapath
            .configure(&spec)
            .map_err(|e| EndpointError::Internal(format!("endpoint {id}: {e}")))?;
        if let Err(e) = self.persist(&ep) {
            let _ = self.spec(&was).map(|s| self.datapath.configure(&s));
            return Err(e);
        }
        self.endpoints.insert(id, ep.clone());
        Ok(ep)
    }

    /// Give endpoint `id` new labels (its pod was relabelled, or its
    /// namespace): the identity of the new set (allocated by the caller
    /// through the cluster's store when given, else here), written to its
    /// configuration, lxc and ipcache entries, then every endpoint's policy
    /// regenerated (its own rules and its peers' entries for both
    /// identities). While the policy changes, the new identity is in no
    /// peer's map yet: its traffic is dropped, never let through by the
    /// old identity's rules. A failed write puts the endpoint back whole.
    pub fn relabel(
        &mut self,
        id: u16,
        labels: BTreeMap<String, String>,
        identity: Option<(u32, Vec<String>)>,
    ) -> Result<Endpoint, EndpointError> {
        check_labels(&labels).map_err(EndpointError::BadRequest)?;
        let was = self.get(id)?;
        if was.container_id == HOST_CONTAINER {
            return Err(EndpointError::BadRequest(format!(
                "endpoint {id} is the host endpoint: its labels are the agent's"
            )));
        }
        if was.labels == labels {
            return Ok(was);
        }
        if let Some((i, l)) = identity {
            self.identities.learn(vec![(i, l)]).map_err(internal)?;
        }
        let mut ep = was.clone();
        ep.identity = self.identities.allocate(&label_set(&labels)).map_err(internal)?;
        ep.labels = labels;
        let put = |me: &mut Self, ep: &Endpoint| -> Result<(), EndpointError> {
            let spec = me.spec(ep)?;
            me.datapath.attach(&spec).map_err(|e| {
                internal(format!("writing endpoint {id}'s identity {}: {e}", ep.identity))
            })?;
            me.persist(ep)?;
            me.endpoints.insert(id, ep.clone());
            Ok(())
        };
        put(self, &ep)?;
        if let Err(e) = self.regenerate() {
            // Back to the old identity, and the policy it had (which fit).
            let _ = put(self, &was);
            let _ = self.regenerate();
            return Err(e);
        }
        self.get(id)
    }

    /// Switch datapath debugging for the whole node: the node programs'
    /// switch and every endpoint's configuration. A write that fails midway
    /// is undone: all of it or nothing.
    pub fn set_node_debug(&mut self, on: bool) -> Result<(), EndpointError> {
        let was = self.debug_all;
        let eps: Vec<Endpoint> = self
            .endpoints
            .values()
            .filter(|e| e.identity != ciliate_common::identity::HOST)
            .cloned()
            .collect();
        let apply = |me: &mut Self, value: bool| -> Result<(), String> {
            me.debug_all = value;
            me.datapath.set_node_debug(value)?;
            for ep in &eps {
                let spec = me.spec(ep).map_err(|e| e.to_string())?;
                me.datapath.configure(&spec).map_err(|e| format!("endpoint {}: {e}", ep.id))?;
            }
            Ok(())
        };
        if let Err(e) = apply(self, on) {
            let _ = apply(self, was);
            self.debug_all = was;
            return Err(EndpointError::Internal(format!("switching debugging: {e}")));
        }
        Ok(())
    }

    /// Create an endpoint for a pod whose veth the CNI plugin set up.
    /// Labels of the agent's own sources (`reserved:`, `cidr:`, …) are
    /// refused: only the agent gives reserved identities. Repeating the
    /// same request re-attaches the endpoint (a retried CNI ADD may have
    /// rebuilt the pod's device) and returns it.
    pub fn create(&mut self, req: EndpointCreate) -> Result<Endpoint, EndpointError> {
        check_labels(&req.labels).map_err(EndpointError::BadRequest)?;
        self.create_any(req)
    }

    /// [`Endpoints::create`] with the identity of its labels allocated by
    /// the caller (through the cluster's store: the endpoint manager never
    /// waits for it), when given.
    pub fn create_with(
        &mut self,
        req: EndpointCreate,
        identity: Option<(u32, Vec<String>)>,
    ) -> Result<Endpoint, EndpointError> {
        check_labels(&req.labels).map_err(EndpointError::BadRequest)?;
        let mut learned = false;
        if let Some((id, labels)) = identity {
            learned = self.identities.learn(vec![(id, labels)]).map_err(internal)?;
        }
        let t = std::time::Instant::now();
        let r = self.build(req, learned);
        self.metrics.regenerated(1, t.elapsed(), r.is_ok());
        r
    }

    /// [`Endpoints::create`] for the agent's own endpoints (the health
    /// endpoint carries `reserved:health`).
    pub(crate) fn create_any(&mut self, req: EndpointCreate) -> Result<Endpoint, EndpointError> {
        let t = std::time::Instant::now();
        let r = self.build(req, false);
        self.metrics.regenerated(1, t.elapsed(), r.is_ok());
        r
    }

    /// Is `req` a request [`Self::create`] could take (its fields, its
    /// address allocated to its container, nobody else's device or address)?
    /// Changes nothing.
    pub fn validate(&self, req: &EndpointCreate) -> Result<(), EndpointError> {
        let bad = |m: String| Err(EndpointError::BadRequest(m));
        if req.container_id.is_empty() {
            return bad("container_id is empty".into());
        }
        let name = &req.host_ifname;
        // The kernel's rule for device names (dev_valid_name).
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return bad(format!("host_ifname {name:?}: 1 to 15 characters, no '/', ':' or spaces"));
        }
        if parse_mac(&req.mac).is_none() {
            return bad(format!("mac {:?} is not a MAC address", req.mac));
        }
        for (name, p) in &req.named_ports {
            if !crate::policy::valid_port_name(name) {
                return bad(format!("named port {name:?}: 1-15 lowercase letters, digits and '-'"));
            }
            if p.protocol != "TCP" && p.protocol != "UDP" {
                return bad(format!(
                    "named port {name}: protocol {} is not TCP or UDP",
                    p.protocol
                ));
            }
        }
        match self.ipam.owner(req.ip) {
            Some(o) if o == req.container_id => {}
            Some(o) => {
                return bad(format!(
                    "{} is allocated to container {o}, not {}",
                    req.ip, req.container_id
                ));
            }
            None => return bad(format!("{} is not allocated (POST /v1/ipam first)", req.ip)),
        }
        // Nobody else's device or address: an endpoint cannot be pointed
        // at another pod's datapath.
        if let Some(other) = self.endpoints.values().find(|e| {
            e.container_id != req.container_id
                && (e.host_ifname == req.host_ifname || e.ip == req.ip)
        }) {
            return Err(EndpointError::Conflict(format!(
                "{} / {} belongs to endpoint {} (container {})",
                req.host_ifname, req.ip, other.id, other.container_id
            )));
        }
        Ok(())
    }

    /// An endpoint made and in the datapath (see [`Self::create_with`]);
    /// `learned`: its identity was allocated in the store and is new here
    /// (so peers' policies must take it in, as for one allocated here).
    fn build(&mut self, req: EndpointCreate, learned: bool) -> Result<Endpoint, EndpointError> {
        self.validate(&req)?;
        if let Some(ep) = self.by_container(&req.container_id) {
            if ep.ip == req.ip && ep.host_ifname == req.host_ifname {
                let ep = ep.clone();
                return self.reattach(ep, &req.mac);
            }
            return Err(EndpointError::Conflict(format!(
                "container {} already has endpoint {} ({} on {})",
                req.container_id, ep.id, ep.ip, ep.host_ifname
            )));
        }
        let id = self.free_id()?;
        let known_before = self.identities.allocated();
        let identity = self.identities.allocate(&label_set(&req.labels)).map_err(internal)?;
        let new_identity = learned || self.identities.allocated() > known_before;
        let ep = Endpoint {
            id,
            container_id: req.container_id,
            netns: req.netns,
            ifname: req.ifname,
            host_ifname: req.host_ifname,
            host_ifindex: 0,
            host_mac: String::new(),
            ip: req.ip,
            mac: req.mac.to_lowercase(),
            labels: req.labels,
            pod_name: req.pod_name,
            named_ports: req.named_ports,
            identity,
            state: "ready".into(),
            ingress_enforcement: "Disabled".into(),
            egress_enforcement: "Disabled".into(),
            debug: false,
        };
        let spec = self.spec(&ep)?;
        // The policy goes in before the endpoint is routable: its own, and
        // when its identity is new, that of the endpoints whose rules may
        // now name it as a peer (the selector cache at endpoint
        // granularity: nobody else changes).
        let mut affected = vec![id];
        if new_identity {
            let labels = label_set(&ep.labels);
            let peering = crate::policy::rules_peering(&self.policy.rules, &labels);
            for other in self.endpoints.values() {
                let l = label_set(&other.labels);
                if peering.iter().any(|r| r.selects(&l)) {
                    affected.push(other.id);
                }
            }
        }
        affected.sort();
        affected.dedup();
        self.endpoints.insert(id, ep);
        let ids = self.identities.view();
        let batch = self.resolve_batch(&self.policy.rules, &affected, &ids);
        if let Err(e) = self.datapath.sync_policies(&batch) {
            self.endpoints.remove(&id);
            return Err(policy_err(&format!("writing the policy of endpoint {id}"), e));
        }
        let undo = |this: &mut Self| {
            this.endpoints.remove(&id);
            // Best effort; a leftover would be removed by the next
            // regeneration (entries of unknown endpoints go).
            let _ = this.datapath.sync_policies(&[(id, Resolved::default())]);
        };
        let attached = match self.datapath.attach(&spec) {
            Ok(a) => a,
            Err(e) => {
                undo(self);
                return Err(EndpointError::Internal(format!(
                    "attaching endpoint {id} ({} on {}): {e}",
                    spec.ip, spec.lxc
                )));
            }
        };
        let mut ep = self.endpoints[&id].clone();
        ep.host_ifindex = attached.ifindex;
        ep.host_mac = format_mac(&attached.lxc_mac);
        if let Err(e) = self.persist(&ep) {
            let _ = self.datapath.detach(ep.ip, &ep.host_ifname);
            undo(self);
            return Err(e);
        }
        self.endpoints.insert(id, ep);
        self.note_enforcement(&batch)?;
        self.get(id)
    }

    /// Attach endpoint `ep` again (a repeated ADD: the pod's device may be
    /// new, with a new MAC), keeping its ID, identity and policy.
    fn reattach(&mut self, mut ep: Endpoint, mac: &str) -> Result<Endpoint, EndpointError> {
        ep.mac = mac.to_lowercase();
        let spec = self.spec(&ep)?;
        let attached = self.datapath.attach(&spec).map_err(|e| {
            EndpointError::Internal(format!(
                "re-attaching endpoint {} ({} on {}): {e}",
                ep.id, ep.ip, ep.host_ifname
            ))
        })?;
        ep.host_ifindex = attached.ifindex;
        ep.host_mac = format_mac(&attached.lxc_mac);
        ep.state = "ready".into();
        self.persist(&ep)?;
        self.endpoints.insert(ep.id, ep.clone());
        Ok(ep)
    }

    /// The host endpoint (identity 1, the node itself, reached through
    /// the stack): listed like any endpoint, created once with a stable ID.
    pub fn ensure_host(&mut self, router: Ipv4Addr) -> Result<Endpoint, EndpointError> {
        if let Some(ep) = self.by_container(HOST_CONTAINER) {
            return Ok(ep.clone());
        }
        let id = self.free_id()?;
        let ep = Endpoint {
            id,
            container_id: HOST_CONTAINER.into(),
            netns: String::new(),
            ifname: String::new(),
            host_ifname: ciliate_datapath::node::HOST_DEV.into(),
            host_ifindex: 0,
            host_mac: String::new(),
            ip: router,
            mac: String::new(),
            labels: [("reserved:host".to_string(), String::new())].into(),
            pod_name: String::new(),
            named_ports: BTreeMap::new(),
            identity: ciliate_common::identity::HOST,
            state: "ready".into(),
            ingress_enforcement: "Disabled".into(),
            egress_enforcement: "Disabled".into(),
            debug: false,
        };
        self.persist(&ep)?;
        self.endpoints.insert(id, ep.clone());
        Ok(ep)
    }

    fn free_id(&self) -> Result<u16, EndpointError> {
        (1..=MAX_ENDPOINT_ID).find(|id| !self.endpoints.contains_key(id)).ok_or_else(|| {
            EndpointError::Conflict(format!("all {MAX_ENDPOINT_ID} endpoint IDs are in use"))
        })
    }

    /// Release address `ip` (`DELETE /v1/ipam/<ip>`): refused while an
    /// endpoint holds it, so no two endpoints ever share an address.
    pub fn release_ip(&mut self, ip: Ipv4Addr) -> Result<(), EndpointError> {
        if let Some(ep) = self.endpoints.values().find(|e| e.ip == ip) {
            return Err(EndpointError::Conflict(format!(
                "{ip} is held by endpoint {} (container {}): delete the endpoint instead",
                ep.id, ep.container_id
            )));
        }
        self.ipam.release(ip).map_err(|e| EndpointError::NotFound(e.to_string()))
    }

    /// Resolve the policy in force for every endpoint and write it into the
    /// datapath (only what changed is written); entries of endpoints that
    /// no longer exist go. Endpoint enforcement columns follow.
    pub fn regenerate(&mut self) -> Result<(), EndpointError> {
        self.commit_policy((*self.policy).clone(), false)
    }

    /// Identities the cluster allocated (learned) or released (forgotten,
    /// unless an endpoint here still has one: the cluster sync creates it
    /// again); the policy is regenerated once when any changed, so a
    /// released identity's entries leave every endpoint's policy.
    pub fn identities_changed(
        &mut self,
        changes: Vec<crate::cluster::IdentityChange>,
    ) -> Result<(), String> {
        use crate::cluster::IdentityChange;
        let in_use: std::collections::BTreeSet<u32> =
            self.endpoints.values().map(|e| e.identity).collect();
        // Consecutive learns go as one: each learn saves the whole table,
        // so one per identity made learning n identities O(n²) (10,000 of
        // them from the store took minutes).
        let mut merged: Vec<IdentityChange> = Vec::with_capacity(changes.len());
        for c in changes {
            match (merged.last_mut(), c) {
                (Some(IdentityChange::Learned(all)), IdentityChange::Learned(ids)) => {
                    all.extend(ids)
                }
                (_, c) => merged.push(c),
            }
        }
        // Identities new here (no ID relabelled, none released): only the
        // endpoints whose rules may name them as a peer change (the
        // selector cache at endpoint granularity, as for a new local
        // endpoint); anything else regenerates every endpoint.
        let fresh = self.all_new(&merged);
        let mut changed = false;
        for c in merged {
            changed |= match c {
                IdentityChange::Learned(ids) => self.identities.learn(ids),
                IdentityChange::Released(ids) => {
                    let gone: Vec<u32> =
                        ids.into_iter().filter(|id| !in_use.contains(id)).collect();
                    self.identities.forget(&gone)
                }
                IdentityChange::InStore(all) => {
                    let gone = self.identities.missing_from(&all, &in_use);
                    let forgot = self.identities.forget(&gone);
                    let learned = self.identities.learn(all.into_iter().collect());
                    forgot.and_then(|f| learned.map(|l| f | l))
                }
            }
            .map_err(|e| e.to_string())?;
        }
        if let (true, Some(fresh)) = (changed, fresh) {
            let mut peering: Vec<&Rule> = fresh
                .values()
                .flat_map(|l| crate::policy::rules_peering(&self.policy.rules, l))
                .collect();
            peering.sort_by_key(|r| std::ptr::from_ref(*r));
            peering.dedup_by_key(|r| std::ptr::from_ref(*r));
            let affected: Vec<u16> = self
                .endpoints
                .values()
                .filter(|ep| {
                    let l = label_set(&ep.labels);
                    peering.iter().any(|r| r.selects(&l))
                })
                .map(|ep| ep.id)
                .collect();
            if !affected.is_empty() {
                let t = std::time::Instant::now();
                let r = self.add_identities(&affected, fresh);
                self.metrics.regenerated(affected.len(), t.elapsed(), r.is_ok());
                r.map_err(|e| e.to_string())?;
            }
        } else if changed {
            self.regenerate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn named_ports_by_identity(&self) -> Arc<BTreeMap<u32, PortNames>> {
        named_ports_by_identity(self.endpoints.values())
    }

    /// The policy of the endpoints `which` under `rules`: an ID that is no
    /// endpoint (any more) gets none, so its entries go; the host endpoint
    /// has no policy of its own and is left out.
    fn resolve_batch(&self, rules: &[Rule], which: &[u16], ids: &IdView) -> Vec<(u16, Resolved)> {
        let by_identity = self.named_ports_by_identity();
        which
            .iter()
            .filter_map(|id| match self.endpoints.get(id) {
                Some(ep) if ep.container_id == HOST_CONTAINER => None,
                Some(ep) => {
                    let named = NamedPorts {
                        own: port_names(&ep.named_ports),
                        by_identity: by_identity.clone(),
                    };
                    Some((ep.id, resolve_named(rules, ep.id, &label_set(&ep.labels), ids, &named)))
                }
                None => Some((*id, Resolved::default())),
            })
            .collect()
    }

    /// Record the enforcement columns of the endpoints of a written batch.
    fn note_enforcement(&mut self, batch: &[(u16, Resolved)]) -> Result<(), EndpointError> {
        let mode = |on: bool| if on { "Enabled" } else { "Disabled" }.to_owned();
        for (id, r) in batch {
            let Some(mut ep) = self.endpoints.get(id).cloned() else { continue };
            let (i, e) = (mode(r.ingress_enforced), mode(r.egress_enforced));
            if ep.ingress_enforcement != i || ep.egress_enforcement != e {
                ep.ingress_enforcement = i;
                ep.egress_enforcement = e;
                self.persist(&ep)?;
                self.endpoints.insert(ep.id, ep);
            }
        }
        Ok(())
    }

    /// The cluster identities `changes` learn, if every one is new here:
    /// neither its ID nor its label set known (a label set the store moved
    /// to another ID takes the old one away), and none twice in `changes`
    /// (the last would stand). `None` when anything else changes.
    fn all_new(
        &self,
        changes: &[crate::cluster::IdentityChange],
    ) -> Option<BTreeMap<u32, Vec<String>>> {
        use crate::cluster::IdentityChange;
        let mut fresh = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for c in changes {
            let IdentityChange::Learned(ids) = c else { return None };
            for (id, labels) in ids {
                let known = self.identities.get(*id);
                if known.as_ref().is_some_and(|k| k.labels == *labels)
                    || !ciliate_common::identity::is_cluster(*id)
                {
                    continue;
                }
                let moved = self.identities.id_of(labels).is_some();
                let twice = !seen.insert(labels) || fresh.contains_key(id);
                if known.is_some() || moved || twice {
                    return None;
                }
                fresh.insert(*id, labels.clone());
            }
        }
        Some(fresh)
    }

    /// Identities `new` (none known before) into the policy of the
    /// endpoints `which`: each endpoint's rules resolved against the new
    /// identities alone, and the entries added. Resolution is by identity
    /// (what a rule gives one peer, a deny of the same peer takes away:
    /// nothing across peers), so this is what resolving against every
    /// identity would add, at the cost of the new ones.
    fn add_identities(
        &mut self,
        which: &[u16],
        new: BTreeMap<u32, Vec<String>>,
    ) -> Result<(), EndpointError> {
        let policy = self.policy.clone();
        let r = self.resolve_and_write(&policy.rules, which, &IdView::new(new), true);
        r.map(drop).map_err(|e| policy_err("writing policy", e))
    }

    /// Re-resolve and write the policy of the endpoints `which` only (the
    /// policy and its CIDRs unchanged).
    pub fn regenerate_only(&mut self, which: &[u16]) -> Result<(), EndpointError> {
        let (policy, ids) = (self.policy.clone(), self.identities.view());
        let r = self.resolve_and_write(&policy.rules, which, &ids, false);
        let batch = r.map_err(|e| policy_err("writing policy", e))?;
        self.note_enforcement(&batch)
    }

    /// Resolve the policy of the endpoints `which` under `rules` against
    /// `ids` and write it (`add`: add the entries to what each holds; else
    /// make each hold exactly them), each phase timed as Cilium's
    /// `policyCalculation` and `mapSync`.
    fn resolve_and_write(
        &mut self,
        rules: &[Rule],
        which: &[u16],
        ids: &IdView,
        add: bool,
    ) -> Result<Vec<(u16, Resolved)>, DatapathError> {
        let t = std::time::Instant::now();
        let batch = self.resolve_batch(rules, which, ids);
        self.metrics.regeneration_phase("policyCalculation", t.elapsed(), true);
        let t = std::time::Instant::now();
        let r = if add {
            self.datapath.add_policies(&batch)
        } else {
            self.datapath.sync_policies(&batch)
        };
        self.metrics.regeneration_phase("mapSync", t.elapsed(), r.is_ok());
        r.map(|()| batch)
    }

    /// Put `next` in force, all or nothing: the CIDR identities it names
    /// (allocated, in the ipcache), every endpoint's policy (checked to fit
    /// before anything is written; undone if a write fails), then the saved
    /// policy (`save`). Any failure leaves the policy in force, the
    /// identities and the maps as they were. Then the CIDR identities no
    /// rule names any more are released.
    fn commit_policy(&mut self, next: PolicyState, save: bool) -> Result<(), EndpointError> {
        let t = std::time::Instant::now();
        let r = self.apply_policy(next, save);
        self.metrics.regenerated(self.endpoints.len(), t.elapsed(), r.is_ok());
        r
    }

    fn apply_policy(&mut self, next: PolicyState, save: bool) -> Result<(), EndpointError> {
        let old_cidrs = referenced_cidrs(&self.policy.rules);
        let new_cidrs = referenced_cidrs(&next.rules);
        let cluster = self.cluster_cidrs.clone();
        let in_cluster = |p: Prefix| cluster.iter().any(|c| crate::policy::contains(*c, p));
        let wanted: Vec<(Prefix, bool)> = new_cidrs.iter().map(|p| (*p, in_cluster(*p))).collect();
        // The CIDRs of both policies are in the ipcache while the maps change.
        self.identities.allocate_locals(&wanted).map_err(internal)?;
        let mut which: Vec<u16> = self.endpoints.keys().copied().collect();
        let stale = self.datapath.policy_holders().map_err(internal)?;
        which.extend(stale.into_iter().filter(|id| !self.endpoints.contains_key(id)));
        let result = self
            .datapath
            .sync_cidrs(self.identities.locals())
            .map_err(|e| internal(format!("writing CIDR identities: {e}")))
            .and_then(|()| {
                let ids = self.identities.view();
                self.resolve_and_write(&next.rules, &which, &ids, false)
                    .map_err(|e| policy_err("writing the policy of the endpoints", e))
            })
            .and_then(|batch| {
                if save && let Err(e) = self.save_policy(&next) {
                    // Back to the policy in force (its resolution fits: it
                    // was written before).
                    let ids = self.identities.view();
                    let old = self.resolve_batch(&self.policy.rules, &which, &ids);
                    let _ = self.datapath.sync_policies(&old);
                    return Err(e);
                }
                Ok(batch)
            });
        let batch = match result {
            Ok(b) => b,
            Err(e) => {
                // New CIDR identities go again, and with them anything that
                // named them.
                if let Ok(gone) = self.identities.release_locals_except(&old_cidrs)
                    && !gone.is_empty()
                {
                    let ids = self.identities.view();
                    let old = self.resolve_batch(&self.policy.rules, &which, &ids);
                    let _ = self.datapath.sync_policies(&old);
                }
                let _ = self.datapath.sync_cidrs(self.identities.locals());
                return Err(e);
            }
        };
        self.policy = Arc::new(next);
        self.note_enforcement(&batch)?;
        // CIDRs no rule names any more: their identities are released and
        // their ipcache entries removed, after the maps stopped naming them
        // (resolved again without them, which writes only what differs).
        let gone = self.identities.release_locals_except(&new_cidrs).map_err(internal)?;
        if !gone.is_empty() {
            let ids = self.identities.view();
            let batch = self.resolve_batch(&self.policy.rules, &which, &ids);
            self.datapath.sync_policies(&batch).map_err(|e| policy_err("writing policy", e))?;
        }
        self.datapath
            .sync_cidrs(self.identities.locals())
            .map_err(|e| internal(format!("removing CIDR identities: {e}")))
    }

    /// `policy trace`: see [`EndpointsView::trace`].
    pub fn trace(
        &self,
        r: &ciliate_api::models::TraceRequest,
    ) -> Result<crate::policy::Trace, EndpointError> {
        self.view().trace(r)
    }

    /// A snapshot of what readers may see: endpoints, identities, the
    /// policy in force, IPAM; cheap to make (shared, persistent maps).
    pub fn view(&self) -> EndpointsView {
        EndpointsView {
            endpoints: self.endpoints.clone(),
            identities: self.identities.view(),
            cluster_identities: self.identities.allocated(),
            policy: self.policy.clone(),
            ipam_cidr: self.ipam.cidr,
            ipam_used: self.ipam.used(),
            ipam_free: self.ipam.free(),
            restored: self.restored,
            debug_all: self.debug_all,
            trace_all: self.trace_all,
        }
    }

    fn save_policy(&self, next: &PolicyState) -> Result<(), EndpointError> {
        match &self.state_dir {
            Some(d) => store::save(&d.join("policy.json"), next).map_err(internal),
            None => Ok(()),
        }
    }

    /// Add `rules` (replacing the rules of the same documents, as `kubectl
    /// apply` does), bump the revision and regenerate, all or nothing.
    /// Returns the revision.
    pub fn import_policy(&mut self, rules: Vec<Rule>) -> Result<u64, EndpointError> {
        let sources: Vec<&String> = rules.iter().map(|r| &r.source).collect();
        let mut next = (*self.policy).clone();
        next.rules.retain(|r| !sources.contains(&&r.source));
        next.rules.extend(rules.iter().cloned());
        next.revision += 1;
        self.commit_policy(next, true)?;
        Ok(self.policy.revision)
    }

    /// Delete the rules of the documents `sources` (`kind/namespace/name`),
    /// all or nothing (none of them there: nothing changes). Returns
    /// (removed, revision).
    pub fn delete_policy_sources(
        &mut self,
        sources: &[String],
    ) -> Result<(usize, u64), EndpointError> {
        let mut next = (*self.policy).clone();
        let before = next.rules.len();
        next.rules.retain(|r| !sources.contains(&r.source));
        let removed = before - next.rules.len();
        if removed == 0 {
            return Ok((0, self.policy.revision));
        }
        next.revision += 1;
        self.commit_policy(next, true)?;
        Ok((removed, self.policy.revision))
    }

    /// Delete the rules carrying every label in `labels` (all rules when
    /// `labels` is empty), all or nothing. Returns (removed, revision).
    pub fn delete_policy(&mut self, labels: &[String]) -> Result<(usize, u64), EndpointError> {
        let mut next = (*self.policy).clone();
        let before = next.rules.len();
        next.rules.retain(|r| !labels.iter().all(|l| r.labels.contains(l)));
        let removed = before - next.rules.len();
        next.revision += 1;
        self.commit_policy(next, true)?;
        Ok((removed, self.policy.revision))
    }

    /// Delete endpoint `id`: detach it, remove its policy entries, release
    /// its address, forget it.
    pub fn delete(&mut self, id: u16) -> Result<Endpoint, EndpointError> {
        let ep = self.get(id)?;
        if ep.container_id == HOST_CONTAINER {
            return Err(EndpointError::BadRequest(format!(
                "endpoint {id} is the host endpoint: it cannot be deleted"
            )));
        }
        self.datapath
            .detach(ep.ip, &ep.host_ifname)
            .map_err(|e| internal(format!("detaching endpoint {id}: {e}")))?;
        self.datapath
            .sync_policies(&[(id, Resolved::default())])
            .map_err(|e| policy_err(&format!("removing the policy of endpoint {id}"), e))?;
        let _ = self.ipam.release_owner(&ep.container_id);
        if let Some(p) = self.ep_path(id) {
            store::remove(&p).map_err(internal)?;
        }
        self.endpoints.remove(&id);
        Ok(ep)
    }

    /// Delete the endpoint of `container_id` if there is one, and release
    /// its address either way (a CNI DEL after a failed ADD). `host_ifname`
    /// (the device the plugin would have made): an ADD cut short may have
    /// left datapath pieces for it without an endpoint; they go too, unless
    /// the device belongs to some endpoint. Idempotent.
    pub fn delete_container(
        &mut self,
        container_id: &str,
        host_ifname: Option<&str>,
    ) -> Result<Option<Endpoint>, EndpointError> {
        let ep = match self.by_container(container_id).map(|e| e.id) {
            Some(id) => Some(self.delete(id)?),
            None => {
                if let Some(lxc) = host_ifname
                    && !lxc.is_empty()
                    && !self.endpoints.values().any(|e| e.host_ifname == lxc)
                {
                    // Only this container's own address, never another's.
                    let ip = self
                        .ipam
                        .allocations()
                        .find(|(_, o)| o.as_str() == container_id)
                        .map(|(ip, _)| *ip);
                    self.datapath
                        .clear_leftovers(ip, lxc)
                        .map_err(|e| internal(format!("removing leftovers of {lxc}: {e}")))?;
                }
                None
            }
        };
        self.ipam.release_owner(container_id).map_err(internal)?;
        Ok(ep)
    }

    /// Re-attach every endpoint read from the state directory (after an
    /// agent restart: the pinned programs kept forwarding meanwhile). An
    /// endpoint whose device is gone (its pod was removed while the agent
    /// was down) is deleted. Returns how many were restored.
    pub fn restore(&mut self) -> Result<usize, EndpointError> {
        self.restored = None;
        let mut restored = 0;
        for ep in self.list() {
            if ep.container_id == HOST_CONTAINER {
                continue;
            }
            if !self.datapath.device_exists(&ep.host_ifname) {
                self.delete(ep.id)?;
                continue;
            }
            let spec = self.spec(&ep)?;
            match self.datapath.attach(&spec) {
                Ok(_) => restored += 1,
                Err(e) => {
                    let mut ep = ep;
                    ep.state = format!("restore failed: {e}");
                    self.endpoints.insert(ep.id, ep);
                }
            }
        }
        // Pins of devices no endpoint has (an ADD that died half-way) go;
        // their addresses stay allocated until a DEL or GC names their
        // container.
        let keep: Vec<String> = self.endpoints.values().map(|e| e.host_ifname.clone()).collect();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        self.datapath.sweep(&keep).map_err(|e| internal(format!("sweeping leftovers: {e}")))?;
        self.restored = Some(restored);
        Ok(restored)
    }

    /// Remove every endpoint whose container is not in `valid` (CNI GC).
    pub fn gc(&mut self, valid: &[String]) -> Result<Vec<u16>, EndpointError> {
        let stale: Vec<u16> = self
            .endpoints
            .values()
            .filter(|e| !is_reserved(&e.container_id) && !valid.contains(&e.container_id))
            .map(|e| e.id)
            .collect();
        for id in &stale {
            self.delete(*id)?;
        }
        let orphans: Vec<String> = self
            .ipam
            .allocations()
            .map(|(_, owner)| owner.clone())
            .filter(|o| !is_reserved(o) && !valid.contains(o))
            .collect();
        for o in orphans {
            self.ipam.release_owner(&o).map_err(internal)?;
        }
        Ok(stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Endpoints<MemoryDatapath> {
        Endpoints::open("10.9.0.0/24".parse().unwrap(), None, MemoryDatapath::default()).unwrap()
    }

    fn request(n: &mut Endpoints<MemoryDatapath>, container: &str, app: &str) -> EndpointCreate {
        let ip = n.ipam.allocate(container).unwrap();
        let lxc = format!("lxc{container}");
        n.datapath.devices.push(lxc.clone());
        EndpointCreate {
            container_id: container.into(),
            netns: format!("/run/netns/{container}"),
            ifname: "eth0".into(),
            host_ifname: lxc,
            ip,
            mac: "0A:00:00:00:00:01".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            pod_name: String::new(),
            named_ports: BTreeMap::new(),
        }
    }

    #[test]
    fn create_attaches_with_an_identity_and_delete_releases_everything() {
        let mut n = node();
        let r = request(&mut n, "c1", "web");
        let ep = n.create(r.clone()).unwrap();
        assert_eq!((ep.id, ep.identity, ep.mac.as_str()), (1, 256, "0a:00:00:00:00:01"));
        assert_eq!(n.datapath.attached[&ep.ip].identity, 256);
        assert_eq!(n.create(r).unwrap(), ep, "a repeated create returns the endpoint");

        let r2 = request(&mut n, "c2", "web");
        let ep2 = n.create(r2).unwrap();
        assert_eq!((ep2.id, ep2.identity), (2, 256), "same labels, same identity");

        n.delete(ep.id).unwrap();
        assert!(!n.datapath.attached.contains_key(&ep.ip));
        assert_eq!(n.ipam.owner(ep.ip), None);
        assert_eq!(n.get(ep.id).unwrap_err().status(), 404);
        assert_eq!(n.delete_container("c1", None).unwrap(), None, "deleting again is fine");
    }

    #[test]
    fn debugging_switches_per_endpoint_and_per_node_all_or_nothing() {
        let mut n = node();
        let r1 = request(&mut n, "c1", "web");
        let e1 = n.create(r1).unwrap();
        let r2 = request(&mut n, "c2", "db");
        let e2 = n.create(r2).unwrap();
        let debug = |n: &Endpoints<MemoryDatapath>, ip: Ipv4Addr| n.datapath.attached[&ip].debug;

        // One endpoint: its configuration only, kept in its state.
        assert!(n.set_endpoint_debug(e1.id, true).unwrap().debug);
        assert!(debug(&n, e1.ip) && !debug(&n, e2.ip));
        assert!(n.get(e1.id).unwrap().debug);
        assert_eq!(n.set_endpoint_debug(99, true).unwrap_err().status(), 404);
        // A failed write leaves it as it was.
        n.datapath.fail_next_configure = Some("map full".into());
        let e = n.set_endpoint_debug(e1.id, false).unwrap_err();
        assert!(e.to_string().contains("map full"), "{e}");
        assert!(n.get(e1.id).unwrap().debug && debug(&n, e1.ip));

        // The node: every endpoint and the node programs; off again leaves
        // the endpoint that debugs on its own.
        n.set_node_debug(true).unwrap();
        assert!(n.datapath.node_debug && debug(&n, e1.ip) && debug(&n, e2.ip));
        assert!(n.view().debug_all);
        n.set_node_debug(false).unwrap();
        assert!(!n.datapath.node_debug && debug(&n, e1.ip) && !debug(&n, e2.ip));
        // Failing midway: nothing changed.
        n.datapath.fail_next_configure = Some("gone".into());
        assert!(n.set_node_debug(true).is_err());
        assert!(!n.datapath.node_debug && !n.debug_all && !debug(&n, e2.ip));
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut n = node();
        let good = request(&mut n, "c1", "web");
        let cases = [
            (EndpointCreate { mac: "nope".into(), ..good.clone() }, "not a MAC"),
            (EndpointCreate { host_ifname: "x".repeat(16), ..good.clone() }, "1 to 15"),
            (EndpointCreate { ip: Ipv4Addr::new(10, 9, 0, 99), ..good.clone() }, "not allocated"),
            (
                EndpointCreate { container_id: "other".into(), ..good.clone() },
                "allocated to container c1",
            ),
            (
                EndpointCreate { container_id: String::new(), ..good.clone() },
                "container_id is empty",
            ),
        ];
        for (req, why) in cases {
            let e = n.create(req).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(why), "{e}");
        }
        assert!(n.list().is_empty());
        assert!(n.datapath.attached.is_empty());
        assert_eq!(n.identities.allocated(), 0);
    }

    #[test]
    fn a_failed_attach_leaves_no_endpoint() {
        let mut n = node();
        let r = request(&mut n, "c1", "web");
        n.datapath.fail_next_attach = Some("no such device".into());
        let e = n.create(r.clone()).unwrap_err();
        assert!(e.to_string().contains("no such device"), "{e}");
        assert!(n.list().is_empty());
        assert_eq!(n.create(r).unwrap().id, 1, "and a retry works");
    }

    #[test]
    fn restart_restores_endpoints_and_drops_those_whose_device_is_gone() {
        let dir = std::env::temp_dir().join(format!("ciliate-ep-{}", std::process::id()));
        let cidr: Cidr = "10.9.0.0/24".parse().unwrap();
        let (a, b) = {
            let mut n = Endpoints::open(cidr, Some(&dir), MemoryDatapath::default()).unwrap();
            let ra = request(&mut n, "a", "web");
            let rb = request(&mut n, "b", "db");
            (n.create(ra).unwrap(), n.create(rb).unwrap())
        };
        let dp = MemoryDatapath { devices: vec![a.host_ifname.clone()], ..Default::default() };
        let mut n = Endpoints::open(cidr, Some(&dir), dp).unwrap();
        assert_eq!(n.restore().unwrap(), 1);
        assert_eq!(n.list(), vec![a.clone()]);
        assert!(n.datapath.attached.contains_key(&a.ip), "re-attached");
        assert_eq!(n.ipam.owner(b.ip), None, "the gone pod's address is free");
        assert_eq!(n.identities.allocate(&label_set(&b.labels)).unwrap(), b.identity);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_host_endpoint_is_listed_once_kept_by_gc_and_cannot_be_deleted() {
        let mut n = node();
        let router = Ipv4Addr::new(10, 9, 0, 1);
        let host = n.ensure_host(router).unwrap();
        assert_eq!((host.id, host.identity, host.ip), (1, 1, router));
        assert_eq!(n.ensure_host(router).unwrap(), host, "created once");
        assert!(n.datapath.attached.is_empty(), "no program of its own");
        assert_eq!(n.delete(host.id).unwrap_err().status(), 400);
        assert_eq!(n.gc(&[]).unwrap(), Vec::<u16>::new());
        assert_eq!(n.restore().unwrap(), 0);
        assert_eq!(n.list(), vec![host]);
    }

    #[test]
    fn a_relabel_moves_the_identity_and_the_peers_policy_follows() {
        let mut n = node();
        let policy = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";
        n.import_policy(crate::policy::parse(policy).unwrap()).unwrap();
        let r = request(&mut n, "db", "db");
        let db = n.create(r).unwrap();
        let r = request(&mut n, "c", "api");
        let api = n.create(r).unwrap();
        let allows = |n: &Endpoints<MemoryDatapath>, id: u32| {
            n.datapath.policies[&db.id].rules.iter().any(|x| x.identity == id)
        };
        assert!(allows(&n, api.identity));
        // Relabelled away from what db allows: a new identity, in the
        // endpoint's datapath entries (its packets carry it), which db's
        // policy does not allow. (The old identity stays allowed while it
        // exists: a pod elsewhere may have it; its garbage collection takes
        // it out.)
        let other: BTreeMap<String, String> = [("app".to_string(), "other".to_string())].into();
        let moved = n.relabel(api.id, other.clone(), None).unwrap();
        assert_ne!(moved.identity, api.identity);
        assert_eq!(n.datapath.attached[&api.ip].identity, moved.identity);
        assert!(!allows(&n, moved.identity));
        assert_eq!(
            n.relabel(api.id, other, None).unwrap(),
            moved,
            "the same labels: nothing to do"
        );
        // And back: allowed again, under the identity of app=api.
        let back = n.relabel(api.id, api.labels.clone(), None).unwrap();
        assert_eq!(back.identity, api.identity);
        assert!(allows(&n, api.identity));
        // A failed write leaves the endpoint as it was.
        n.datapath.fail_next_attach = Some("no such device".into());
        let e = n.relabel(api.id, [("app".into(), "x".into())].into(), None).unwrap_err();
        assert!(e.to_string().contains("no such device"), "{e}");
        assert_eq!(n.get(api.id).unwrap(), back);
        assert!(allows(&n, api.identity));
        // Nobody relabels the host, or to a reserved label.
        let e =
            n.relabel(api.id, [("reserved:host".into(), String::new())].into(), None).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn a_new_pod_regenerates_only_the_endpoints_whose_rules_can_name_it() {
        let mut n = node();
        let policy = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";
        n.import_policy(crate::policy::parse(policy).unwrap()).unwrap();
        let r = request(&mut n, "db", "db");
        let db = n.create(r).unwrap();
        let r = request(&mut n, "web", "web");
        n.create(r).unwrap();
        assert!(
            n.datapath.policies[&db.id].rules.iter().all(|x| x.identity == 1),
            "no api pod yet"
        );
        // A new identity that db's rule selects: db is regenerated and now
        // allows it.
        let r = request(&mut n, "api", "api");
        let api = n.create(r).unwrap();
        assert!(n.datapath.policies[&db.id].rules.iter().any(|x| x.identity == api.identity));
        // Counting writes: a second web pod (identity known) touches nobody else.
        let before = n.datapath.syncs.clone();
        let r = request(&mut n, "web2", "web");
        let web2 = n.create(r).unwrap();
        let touched: Vec<u16> = n
            .datapath
            .syncs
            .iter()
            .filter(|(ep, c)| before.get(ep) != Some(c))
            .map(|(ep, _)| *ep)
            .collect();
        assert_eq!(touched, vec![web2.id]);
        // The same for an identity the cluster's store allocated (the
        // agent's path): db takes it in at once.
        let mut r = request(&mut n, "api2", "api");
        r.labels.insert("track".into(), "canary".into());
        let labels = label_set(&r.labels);
        let api2 = n.create_with(r, Some((300, labels))).unwrap();
        assert_eq!(api2.identity, 300);
        assert!(n.datapath.policies[&db.id].rules.iter().any(|x| x.identity == 300));
        // Released by the cluster once its pod is gone: db's entries for it
        // go; one a local endpoint still has is kept.
        n.delete(api2.id).unwrap();
        use crate::cluster::IdentityChange;
        let changes = vec![IdentityChange::Released(vec![300, api.identity])];
        n.identities_changed(changes).unwrap();
        assert!(n.identities.get(300).is_none());
        assert!(n.identities.get(api.identity).is_some(), "the api pod still has it");
        assert!(n.datapath.policies[&db.id].rules.iter().all(|x| x.identity != 300));
        assert!(n.datapath.policies[&db.id].rules.iter().any(|x| x.identity == api.identity));
    }

    #[test]
    fn identities_other_nodes_allocate_regenerate_only_the_endpoints_that_can_name_them() {
        use crate::cluster::IdentityChange;
        let mut n = node();
        let policy = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";
        n.import_policy(crate::policy::parse(policy).unwrap()).unwrap();
        let (r1, r2) = (request(&mut n, "db", "db"), request(&mut n, "web", "web"));
        let (db, web) = (n.create(r1).unwrap(), n.create(r2).unwrap());
        let labels = |app: &str| {
            vec![format!("k8s:app={app}"), "k8s:io.kubernetes.pod.namespace=default".into()]
        };
        let touched = |n: &Endpoints<MemoryDatapath>, before: &BTreeMap<u16, usize>| -> Vec<u16> {
            let s = &n.datapath.syncs;
            s.iter().filter(|(ep, c)| before.get(ep) != Some(c)).map(|(ep, _)| *ep).collect()
        };
        // Two api identities (learned one by one, as a watch hands them
        // over) and an unrelated one: db alone is written, once, and allows
        // both; web is not touched.
        let before = n.datapath.syncs.clone();
        let changes = vec![
            IdentityChange::Learned(vec![(400, labels("api"))]),
            IdentityChange::Learned(vec![(401, labels("other"))]),
            IdentityChange::Learned(vec![(402, [labels("api"), vec!["k8s:v=2".into()]].concat())]),
        ];
        n.identities_changed(changes).unwrap();
        assert_eq!(touched(&n, &before), vec![db.id]);
        assert_eq!(n.datapath.syncs[&db.id], before[&db.id] + 1, "one write for the batch");
        let allowed: Vec<u32> =
            n.datapath.policies[&db.id].rules.iter().map(|x| x.identity).collect();
        assert!(allowed.contains(&400) && allowed.contains(&402) && !allowed.contains(&401));
        // Nobody's rules name it: nothing is written.
        let before = n.datapath.syncs.clone();
        n.identities_changed(vec![IdentityChange::Learned(vec![(403, labels("x"))])]).unwrap();
        assert_eq!(touched(&n, &before), Vec::<u16>::new());
        // An ID relabelled (released and reused elsewhere): every endpoint
        // again, and db no longer allows it.
        let before = n.datapath.syncs.clone();
        n.identities_changed(vec![IdentityChange::Learned(vec![(400, labels("other"))])]).unwrap();
        assert_eq!(touched(&n, &before), vec![db.id, web.id]);
        assert!(n.datapath.policies[&db.id].rules.iter().all(|x| x.identity != 400));
    }

    /// Identities added one batch at a time leave every endpoint's map
    /// exactly as resolving everything again would: allows, port ranges,
    /// denies of one port or of a whole peer, entities, egress,
    /// clusterwide and namespaced rules, default deny off.
    #[test]
    fn identities_added_incrementally_give_the_maps_a_full_regeneration_gives() {
        use crate::cluster::IdentityChange;
        let mut n = node();
        let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: ranges}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: front}}]
    toPorts: [{ports: [{port: "5000", endPort: 5100, protocol: TCP}, {port: "53", protocol: UDP}]}]
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [api, batch]}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: batch}}]
    toPorts: [{ports: [{port: "5050", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {bad: "yes"}}]
  egress:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: front}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: batch}}]
"#;
        n.import_policy(crate::policy::parse(policy).unwrap()).unwrap();
        for (c, app) in [("db", "db"), ("web", "web"), ("other", "other")] {
            let r = request(&mut n, c, app);
            n.create(r).unwrap();
        }
        let labels = |extra: &[&str]| -> Vec<String> {
            let mut l: Vec<String> = extra.iter().map(|s| format!("k8s:{s}")).collect();
            l.push("k8s:io.kubernetes.pod.namespace=default".into());
            l.sort();
            l
        };
        let peers = [
            labels(&["tier=front", "app=f1"]),
            labels(&["app=api"]),
            labels(&["app=batch", "tier=front"]),
            labels(&["app=api", "bad=yes"]),
            labels(&["app=x"]),
            vec!["k8s:app=api".into(), "k8s:io.kubernetes.pod.namespace=other".into()],
        ];
        for (k, batch) in peers.chunks(2).enumerate() {
            let changes = batch
                .iter()
                .enumerate()
                .map(|(i, l)| IdentityChange::Learned(vec![(500 + (k * 2 + i) as u32, l.clone())]))
                .collect();
            n.identities_changed(changes).unwrap();
        }
        let incremental = n.datapath.held.clone();
        assert!(
            incremental.values().flat_map(|e| e.keys()).any(|(k, _)| k.identity == 502),
            "the batch identity reached the maps"
        );
        n.regenerate().unwrap();
        assert_eq!(n.datapath.held, incremental, "a full regeneration changes nothing");
        // A label set the store moved to a new ID (the old one goes with
        // it), and one label set twice in a batch (the last ID stands):
        // the maps are still what a full pass gives.
        n.identities_changed(vec![IdentityChange::Learned(vec![(520, peers[1].clone())])]).unwrap();
        let after = n.datapath.held.clone();
        assert!(after.values().flat_map(|e| e.keys()).all(|(k, _)| k.identity != 501));
        n.regenerate().unwrap();
        assert_eq!(n.datapath.held, after, "a moved label set");
        let twice = vec![
            IdentityChange::Learned(vec![(521, labels(&["app=api", "v=9"]))]),
            IdentityChange::Learned(vec![(522, labels(&["app=api", "v=9"]))]),
        ];
        n.identities_changed(twice).unwrap();
        let after = n.datapath.held.clone();
        assert!(after.values().flat_map(|e| e.keys()).all(|(k, _)| k.identity != 521));
        n.regenerate().unwrap();
        assert_eq!(n.datapath.held, after, "a label set twice in a batch");
    }

    #[test]
    fn gc_removes_endpoints_and_addresses_of_unknown_containers() {
        let mut n = node();
        for c in ["keep", "stale"] {
            let r = request(&mut n, c, c);
            n.create(r).unwrap();
        }
        n.ipam.allocate("half-added").unwrap();
        let removed = n.gc(&["keep".into()]).unwrap();
        assert_eq!(removed, vec![2]);
        assert_eq!(n.list().len(), 1);
        assert_eq!(n.ipam.used(), 1);
    }

    const SELECT_C1: &str = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p1}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";

    /// A policy selecting app=web with `n` single-port TCP rules.
    fn many_ports(n: u32) -> Vec<Rule> {
        let ports: Vec<String> =
            (1..=n).map(|p| format!("{{port: \"{p}\", protocol: TCP}}")).collect();
        crate::policy::parse(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{toPorts: [{{ports: [{}]}}]}}]\n",
            ports.join(", ")
        ))
        .unwrap()
    }

    fn map_entries(n: &Endpoints<MemoryDatapath>) -> BTreeMap<(PolicyKey, u32), PolicyEntry> {
        n.datapath.map.entries.clone()
    }

    #[test]
    fn a_policy_that_does_not_fit_is_refused_and_nothing_changes() {
        let mut n = node();
        n.datapath.policy_capacity.total = 100;
        let r = request(&mut n, "c1", "web");
        n.create(r).unwrap();
        n.import_policy(crate::policy::parse(SELECT_C1).unwrap()).unwrap();
        let (before, policy) = (map_entries(&n), n.policy.clone());
        let e = n.import_policy(many_ports(200)).unwrap_err();
        assert_eq!(e.status(), 507, "{e}");
        assert!(e.to_string().contains("ciliate_policy") && e.to_string().contains("100"), "{e}");
        assert_eq!(n.policy, policy, "the policy in force is unchanged");
        assert_eq!(map_entries(&n), before, "the map is unchanged");
        // A new pod selected by the policy still gets in.
        let r = request(&mut n, "c2", "web");
        n.create(r).unwrap();
        // And a policy that fits goes in.
        n.import_policy(many_ports(20)).unwrap();
    }

    #[test]
    fn an_endpoint_whose_policy_exceeds_its_share_is_refused_and_others_keep_theirs() {
        let mut n = node();
        n.datapath.policy_capacity.per_endpoint = 50;
        let r = request(&mut n, "web1", "web");
        let web = n.create(r).unwrap();
        let r = request(&mut n, "db1", "db");
        n.create(r).unwrap();
        let db_policy = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: d}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]\n";
        n.import_policy(crate::policy::parse(db_policy).unwrap()).unwrap();
        let before = map_entries(&n);
        // 60 ports for web: more than its 50, though the map has room.
        let e = n.import_policy(many_ports(60)).unwrap_err();
        assert_eq!(e.status(), 507, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("endpoint {}", web.id)) && text.contains("50"),
            "names the endpoint and its share: {text}"
        );
        assert_eq!(map_entries(&n), before, "nobody's entries changed");
        // 30 fit.
        n.import_policy(many_ports(30)).unwrap();
    }

    #[test]
    fn a_write_that_fails_midway_is_undone_whole() {
        let mut n = node();
        for c in ["c1", "c2", "c3"] {
            let r = request(&mut n, c, "web");
            n.create(r).unwrap();
        }
        n.import_policy(crate::policy::parse(SELECT_C1).unwrap()).unwrap();
        let (before, policy) = (map_entries(&n), n.policy.clone());
        // Fail after the first endpoint's entries went in.
        n.datapath.map.fail_after = Some(15);
        let e = n.import_policy(many_ports(10)).unwrap_err();
        assert_eq!(e.status(), 500);
        assert!(e.to_string().contains("undone"), "{e}");
        n.datapath.map.fail_after = None;
        assert_eq!(map_entries(&n), before, "rolled back to the entries before");
        assert_eq!(n.policy, policy);
        let held: usize = n.datapath.held.values().map(|w| w.len()).sum();
        assert_eq!(held, before.len(), "the agent's view and the map agree");
        // Delete removes everything it wrote.
        n.import_policy(many_ports(10)).unwrap();
        n.delete_policy(&[]).unwrap();
        assert!(map_entries(&n).is_empty(), "{:?}", map_entries(&n));
    }

    /// New identities added to the maps (no full regeneration): past an
    /// endpoint's share nothing is written, and a write that fails midway
    /// is undone; then they go in.
    #[test]
    fn identities_added_to_the_maps_are_refused_or_undone_whole() {
        use crate::cluster::IdentityChange;
        let mut n = node();
        let ports: Vec<String> =
            (1..=10).map(|p| format!("{{port: \"{p}\", protocol: TCP}}")).collect();
        let policy = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: api}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{fromEndpoints: [{{matchLabels: {{app: api}}}}], toPorts: [{{ports: [{}]}}]}}]\n",
            ports.join(", ")
        );
        n.import_policy(crate::policy::parse(&policy).unwrap()).unwrap();
        for c in ["c1", "c2"] {
            let r = request(&mut n, c, "web");
            n.create(r).unwrap();
        }
        let api = |i: u32| {
            (
                700 + i,
                vec![
                    "k8s:app=api".to_string(),
                    format!("k8s:i={i}"),
                    "k8s:io.kubernetes.pod.namespace=default".into(),
                ],
            )
        };
        let before = map_entries(&n);
        // Ten ports per new api identity and endpoint: 3 identities pass 30
        // entries a share of 30 cannot take with what each holds.
        let held = n.datapath.held.values().map(|w| w.len()).max().unwrap();
        n.datapath.policy_capacity.per_endpoint = held + 25;
        let e = n.identities_changed(vec![IdentityChange::Learned((0..3).map(api).collect())]);
        let e = e.unwrap_err();
        assert!(e.contains("one endpoint may hold"), "refused by the share: {e}");
        assert_eq!(map_entries(&n), before, "nothing written");
        // Room again, but the map fails after 15 writes: undone whole.
        n.datapath.policy_capacity.per_endpoint = held + 100;
        n.datapath.map.fail_after = Some(15);
        let e = n.identities_changed(vec![IdentityChange::Learned((3..5).map(api).collect())]);
        assert!(e.unwrap_err().contains("undone"), "rolled back");
        n.datapath.map.fail_after = None;
        assert_eq!(map_entries(&n), before, "rolled back to the entries before");
        let held_now: usize = n.datapath.held.values().map(|w| w.len()).sum();
        assert_eq!(held_now, before.len(), "the agent's view and the map agree");
        // A full regeneration puts in what the failed adds could not.
        n.regenerate().unwrap();
        assert_eq!(map_entries(&n).len(), before.len() + 2 * 5 * 10);
    }

    #[test]
    fn deleted_endpoints_leave_no_policy_entries_and_stale_ones_are_removed() {
        let mut n = node();
        n.import_policy(crate::policy::parse(SELECT_C1).unwrap()).unwrap();
        for i in 0..30 {
            let c = format!("c{i}");
            let r = request(&mut n, &c, "web");
            let ep = n.create(r).unwrap();
            assert!(n.datapath.held.contains_key(&ep.id));
            n.delete(ep.id).unwrap();
        }
        assert!(map_entries(&n).is_empty(), "30 ADD/DEL cycles left entries behind");
        // Entries of an endpoint the agent does not know (an older agent's
        // leftovers) go at the next regeneration.
        let r = request(&mut n, "c1", "web");
        let ep = n.create(r).unwrap();
        let ghost = crate::policy::resolve(
            &n.policy.rules,
            77,
            &label_set(&ep.labels),
            &n.identities.view(),
        );
        n.datapath.sync_policies(&[(77, ghost)]).unwrap();
        n.regenerate().unwrap();
        assert_eq!(n.datapath.held.keys().copied().collect::<Vec<_>>(), vec![ep.id]);
    }

    #[test]
    fn pods_cannot_claim_reserved_labels_but_the_agent_can() {
        let mut n = node();
        for key in ["reserved:host", "reserved:world", "reserved:health", "cidr:10.0.0.0/8"] {
            let mut r = request(&mut n, "c1", "x");
            r.labels = [(key.to_string(), String::new())].into();
            let e = n.create(r).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(key), "{e}");
        }
        assert!(n.list().is_empty());
        let mut r = request(&mut n, "health", "x");
        r.labels = [("reserved:health".to_string(), String::new())].into();
        assert_eq!(n.create_any(r).unwrap().identity, ciliate_common::identity::HEALTH);
    }

    #[test]
    fn a_repeated_create_reattaches_and_nobody_takes_anothers_device_or_address() {
        let mut n = node();
        let r = request(&mut n, "c1", "web");
        let ep = n.create(r.clone()).unwrap();
        n.datapath.attached.clear(); // the plugin rebuilt the device
        assert!(n.list_checked()[0].state.starts_with("not-ready"), "{:?}", n.list_checked());
        let again = n.create(EndpointCreate { mac: "0a:00:00:00:00:02".into(), ..r }).unwrap();
        assert_eq!((again.id, again.identity), (ep.id, ep.identity));
        assert!(n.datapath.attached.contains_key(&ep.ip), "attached again");
        assert_eq!(n.list_checked()[0].state, "ready");
        // Another container naming c1's device, or its address.
        let mut other = request(&mut n, "c2", "web");
        other.host_ifname = ep.host_ifname.clone();
        let e = n.create(other).unwrap_err();
        assert_eq!(e.status(), 409, "{e}");
        // The address of a live endpoint cannot be released.
        let e = n.release_ip(ep.ip).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("held by endpoint"), "{e}");
        assert_eq!(n.ipam.owner(ep.ip), Some("c1"));
    }

    #[test]
    fn cidr_identities_go_with_the_last_policy_that_names_them() {
        let mut n = node();
        let cidr = |name: &str, c: &str| {
            crate::policy::parse(&format!(
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: {name}, labels: {{p: {name}}}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  egress: [{{toCIDR: [{c}]}}]\n"
            ))
            .unwrap()
        };
        let r = request(&mut n, "c1", "web");
        n.create(r).unwrap();
        n.import_policy(cidr("a", "192.0.2.0/24")).unwrap();
        n.import_policy(cidr("b", "192.0.2.0/24")).unwrap();
        n.import_policy(cidr("c", "198.51.100.0/24")).unwrap();
        assert_eq!(n.datapath.cidrs.len(), 2);
        let id = n.datapath.cidrs[&crate::policy::parse_cidr("192.0.2.0/24").unwrap()];
        assert!(n.identities.get(id).unwrap().labels.contains(&"reserved:world".to_string()));
        n.delete_policy(&["k8s:p=a".into()]).unwrap();
        assert_eq!(n.datapath.cidrs.len(), 2, "b still names it");
        n.delete_policy(&["k8s:p=b".into()]).unwrap();
        assert_eq!(n.datapath.cidrs.len(), 1);
        assert!(n.identities.get(id).is_none(), "identity {id} released");
        assert!(
            map_entries(&n).keys().all(|(k, _)| k.identity != id),
            "no entry names the released identity"
        );
    }
}
