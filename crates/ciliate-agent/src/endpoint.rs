//! The endpoint manager: create, delete, restore and garbage-collect
//! endpoints. It owns the node's desired state (IPAM, identities,
//! endpoints) and writes it into the datapath through [`Datapath`], so it
//! can be tested without a kernel ([`MemoryDatapath`]).
//!
//! Bad input is refused before anything changes; a datapath failure while
//! creating leaves no endpoint behind and no half-written state.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ciliate_api::models::{Endpoint, EndpointCreate};
use ciliate_datapath::node::{Attached, EndpointSpec, format_mac, parse_mac};

use crate::{
    identity::{Identities, label_set},
    ipam::{Cidr, Ipam},
    policy::{
        NamedPorts, PortNames, Prefix, Resolved, Rule, cidr_label, referenced_cidrs, resolve_named,
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
    #[error("{0}")]
    Internal(String),
}

impl EndpointError {
    pub fn status(&self) -> u16 {
        match self {
            EndpointError::BadRequest(_) => 400,
            EndpointError::NotFound(_) => 404,
            EndpointError::Conflict(_) => 409,
            EndpointError::Internal(_) => 500,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Internal(e.to_string())
}

/// The datapath side of endpoints.
pub trait Datapath: Send {
    fn attach(&mut self, spec: &EndpointSpec) -> Result<Attached, String>;
    fn detach(&mut self, ip: Ipv4Addr, lxc: &str) -> Result<(), String>;
    /// Make the endpoint's policy in the datapath exactly `policy`.
    fn sync_policy(&mut self, endpoint_id: u16, policy: &Resolved) -> Result<(), String>;
    /// Make the ipcache's CIDR entries (local identities) exactly `cidrs`,
    /// never overwriting an entry of an endpoint or the host.
    fn sync_cidrs(&mut self, cidrs: &BTreeMap<Prefix, u32>) -> Result<(), String>;
    /// Does the host-side device still exist?
    fn device_exists(&self, lxc: &str) -> bool;
}

/// A datapath in memory: what is attached, for tests.
#[derive(Default)]
pub struct MemoryDatapath {
    pub attached: BTreeMap<Ipv4Addr, EndpointSpec>,
    pub policies: BTreeMap<u16, Resolved>,
    /// Policy writes per endpoint.
    pub syncs: BTreeMap<u16, usize>,
    pub cidrs: BTreeMap<Prefix, u32>,
    pub devices: Vec<String>,
    pub fail_next_attach: Option<String>,
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
    fn detach(&mut self, ip: Ipv4Addr, _lxc: &str) -> Result<(), String> {
        self.attached.remove(&ip);
        Ok(())
    }
    fn sync_cidrs(&mut self, cidrs: &BTreeMap<Prefix, u32>) -> Result<(), String> {
        self.cidrs = cidrs.clone();
        Ok(())
    }
    fn sync_policy(&mut self, endpoint_id: u16, policy: &Resolved) -> Result<(), String> {
        *self.syncs.entry(endpoint_id).or_default() += 1;
        if *policy == Resolved::default() {
            self.policies.remove(&endpoint_id);
        } else {
            self.policies.insert(endpoint_id, policy.clone());
        }
        Ok(())
    }
    fn device_exists(&self, lxc: &str) -> bool {
        self.devices.iter().any(|d| d == lxc)
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

/// Highest endpoint ID (Cilium's endpoint IDs fit in 12 bits... here 16).
pub const MAX_ENDPOINT_ID: u16 = 4095;

pub struct Endpoints<D: Datapath> {
    pub ipam: Ipam,
    pub identities: Identities,
    endpoints: BTreeMap<u16, Endpoint>,
    state_dir: Option<PathBuf>,
    pub datapath: D,
    /// Monitor aggregation "none" for the endpoints' programs.
    pub trace_all: bool,
    pub policy: PolicyState,
}

impl<D: Datapath> Endpoints<D> {
    /// Open the node's state (in `state_dir`, or in memory when `None`).
    pub fn open(cidr: Cidr, state_dir: Option<&Path>, datapath: D) -> Result<Self, EndpointError> {
        let ipam = Ipam::open(cidr, state_dir.map(|d| d.join("ipam.json"))).map_err(internal)?;
        let identities =
            Identities::open(state_dir.map(|d| d.join("identities.json"))).map_err(internal)?;
        let mut endpoints = BTreeMap::new();
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
            policy: match state_dir {
                Some(d) => {
                    store::load(&d.join("policy.json")).map_err(internal)?.unwrap_or_default()
                }
                None => PolicyState::default(),
            },
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
        })
    }

    /// Create an endpoint for a pod whose veth the CNI plugin set up.
    /// Repeating the same request returns the existing endpoint.
    pub fn create(&mut self, req: EndpointCreate) -> Result<Endpoint, EndpointError> {
        let bad = |m: String| Err(EndpointError::BadRequest(m));
        if req.container_id.is_empty() {
            return bad("container_id is empty".into());
        }
        if req.host_ifname.is_empty() || req.host_ifname.len() > 15 {
            return bad(format!("host_ifname {:?}: 1 to 15 characters", req.host_ifname));
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
        if let Some(ep) = self.by_container(&req.container_id) {
            if ep.ip == req.ip && ep.host_ifname == req.host_ifname {
                return Ok(ep.clone());
            }
            return Err(EndpointError::Conflict(format!(
                "container {} already has endpoint {} ({} on {})",
                req.container_id, ep.id, ep.ip, ep.host_ifname
            )));
        }
        let id = self.free_id()?;
        let known_before = self.identities.allocated();
        let identity = self.identities.allocate(&label_set(&req.labels)).map_err(internal)?;
        let new_identity = self.identities.allocated() > known_before;
        let mut ep = Endpoint {
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
        };
        let attached = self.datapath.attach(&self.spec(&ep)?).map_err(|e| {
            EndpointError::Internal(format!(
                "attaching endpoint {id} ({} on {}): {e}",
                ep.ip, ep.host_ifname
            ))
        })?;
        ep.host_ifindex = attached.ifindex;
        ep.host_mac = format_mac(&attached.lxc_mac);
        if let Err(e) = self.persist(&ep) {
            let _ = self.datapath.detach(ep.ip, &ep.host_ifname);
            return Err(e);
        }
        self.endpoints.insert(id, ep.clone());
        // The new endpoint's own policy; and when its identity is new, the
        // policy of the endpoints whose rules may now name it as a peer
        // (the selector cache at endpoint granularity: nobody else changes).
        let mut affected = vec![id];
        if new_identity {
            let labels = label_set(&ep.labels);
            let peering = crate::policy::rules_peering(&self.policy.rules, &labels);
            for other in self.endpoints.values() {
                let l = label_set(&other.labels);
                if peering.iter().any(|r| {
                    r.spec
                        .endpoint_selector
                        .as_ref()
                        .is_some_and(|s| s.matches(&l, r.namespace.as_deref()))
                }) {
                    affected.push(other.id);
                }
            }
        }
        affected.sort();
        affected.dedup();
        self.regenerate_only(&affected)?;
        self.get(id)
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

    /// Resolve the policy in force for every endpoint and write it into the
    /// datapath (only what changed is written). Endpoint enforcement columns
    /// follow.
    pub fn regenerate(&mut self) -> Result<(), EndpointError> {
        // CIDRs first: their local identities must exist (and be in the
        // ipcache) before rules name them.
        let mut cidrs = BTreeMap::new();
        for p in referenced_cidrs(&self.policy.rules) {
            cidrs.insert(p, self.identities.allocate_local(&cidr_label(p)).map_err(internal)?);
        }
        self.datapath
            .sync_cidrs(&cidrs)
            .map_err(|e| internal(format!("writing CIDR identities: {e}")))?;
        let all: Vec<u16> = self.endpoints.keys().copied().collect();
        self.regenerate_only(&all)
    }

    /// Every endpoint's named ports by identity: what egress rules' port
    /// names mean (computed once per regeneration, shared by all endpoints).
    fn named_ports_by_identity(&self) -> Arc<BTreeMap<u32, PortNames>> {
        let mut by_identity: BTreeMap<u32, PortNames> = BTreeMap::new();
        for other in self.endpoints.values() {
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

    /// Re-resolve and write the policy of the endpoints `which` only (the
    /// policy and its CIDRs unchanged).
    pub fn regenerate_only(&mut self, which: &[u16]) -> Result<(), EndpointError> {
        let ids: BTreeMap<u32, Vec<String>> =
            self.identities.list().into_iter().map(|i| (i.id, i.labels)).collect();
        let by_identity = self.named_ports_by_identity();
        let eps: Vec<Endpoint> =
            which.iter().filter_map(|id| self.endpoints.get(id).cloned()).collect();
        for mut ep in eps {
            if ep.container_id == HOST_CONTAINER {
                continue;
            }
            let named =
                NamedPorts { own: port_names(&ep.named_ports), by_identity: by_identity.clone() };
            let r = resolve_named(&self.policy.rules, ep.id, &label_set(&ep.labels), &ids, &named);
            self.datapath
                .sync_policy(ep.id, &r)
                .map_err(|e| internal(format!("writing the policy of endpoint {}: {e}", ep.id)))?;
            let mode = |on: bool| if on { "Enabled" } else { "Disabled" }.to_owned();
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

    /// `policy trace`: see [`crate::policy::trace`].
    pub fn trace(
        &self,
        r: &ciliate_api::models::TraceRequest,
    ) -> Result<crate::policy::Trace, EndpointError> {
        let ids: BTreeMap<u32, Vec<String>> =
            self.identities.list().into_iter().map(|i| (i.id, i.labels)).collect();
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
                        ids.get(&ep.identity).cloned().unwrap_or_else(|| label_set(&ep.labels)),
                    ))
                }
                (None, Some(id), None) => ids.get(&id).map(|l| (id, l.clone())).ok_or_else(|| {
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
        let by_identity = self.named_ports_by_identity();
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
            &ids,
            (&named(&r.src), &named(&r.dst)),
        ))
    }

    fn save_policy(&self, next: &PolicyState) -> Result<(), EndpointError> {
        match &self.state_dir {
            Some(d) => store::save(&d.join("policy.json"), next).map_err(internal),
            None => Ok(()),
        }
    }

    /// Add `rules` (replacing the rules of the same documents, as `kubectl
    /// apply` does), bump the revision and regenerate. Returns the revision.
    pub fn import_policy(&mut self, rules: Vec<Rule>) -> Result<u64, EndpointError> {
        let sources: Vec<&String> = rules.iter().map(|r| &r.source).collect();
        let mut next = self.policy.clone();
        next.rules.retain(|r| !sources.contains(&&r.source));
        next.rules.extend(rules.iter().cloned());
        next.revision += 1;
        self.save_policy(&next)?;
        self.policy = next;
        self.regenerate()?;
        Ok(self.policy.revision)
    }

    /// Delete the rules carrying every label in `labels` (all rules when
    /// `labels` is empty). Returns (removed, revision).
    pub fn delete_policy(&mut self, labels: &[String]) -> Result<(usize, u64), EndpointError> {
        let mut next = self.policy.clone();
        let before = next.rules.len();
        next.rules.retain(|r| !labels.iter().all(|l| r.labels.contains(l)));
        let removed = before - next.rules.len();
        next.revision += 1;
        self.save_policy(&next)?;
        self.policy = next;
        self.regenerate()?;
        Ok((removed, self.policy.revision))
    }

    /// Delete endpoint `id`: detach it, release its address, forget it.
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
        let _ = self.ipam.release_owner(&ep.container_id);
        if let Some(p) = self.ep_path(id) {
            store::remove(&p).map_err(internal)?;
        }
        self.endpoints.remove(&id);
        Ok(ep)
    }

    /// Delete the endpoint of `container_id` if there is one, and release
    /// its address either way (a CNI DEL after a failed ADD). Idempotent.
    pub fn delete_container(
        &mut self,
        container_id: &str,
    ) -> Result<Option<Endpoint>, EndpointError> {
        let ep = match self.by_container(container_id).map(|e| e.id) {
            Some(id) => Some(self.delete(id)?),
            None => None,
        };
        self.ipam.release_owner(container_id).map_err(internal)?;
        Ok(ep)
    }

    /// Re-attach every endpoint read from the state directory (after an
    /// agent restart: the pinned programs kept forwarding meanwhile). An
    /// endpoint whose device is gone (its pod was removed while the agent
    /// was down) is deleted. Returns how many were restored.
    pub fn restore(&mut self) -> Result<usize, EndpointError> {
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
        // Addresses whose owner has no endpoint (an ADD that died half-way)
        // stay allocated until a DEL or GC names their container.
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
        assert_eq!(n.delete_container("c1").unwrap(), None, "deleting again is fine");
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
}
