//! `ciliate-operator`: the cluster-wide work no agent does alone (Cilium's
//! operator), against the Kubernetes API:
//! - leader election through a Lease (`ciliate-operator` in kube-system):
//!   several operators can run, one works; a leader that cannot renew for
//!   the lease's duration stops working before another may take over;
//! - cluster-pool IPAM (with a pool): a pod CIDR for each CiliumNode
//!   without one, at once when one appears (see `k8s::ipam`);
//! - identity garbage collection (CRD mode): a CiliumIdentity no
//!   CiliumEndpoint uses for `identity_grace` is deleted with its claim;
//! - CiliumEndpoint garbage collection: one whose pod is gone;
//! - CiliumNode garbage collection: one whose Node is gone.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Node, Pod},
    },
    jiff::Timestamp,
};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
    core::DynamicObject,
};
use serde_json::json;

/// The Lease the operators elect a leader with.
pub const LEASE: &str = "ciliate-operator";
pub const LEASE_NAMESPACE: &str = "kube-system";

#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// This operator's name in the Lease.
    pub id: String,
    pub lease_duration: Duration,
    /// How often the leader renews (and others try to take over).
    pub renew_interval: Duration,
    pub gc_interval: Duration,
    /// How long an identity stays unused before it is deleted.
    pub identity_grace: Duration,
    /// Cluster-pool IPAM's pool and per-node prefix length (`None`: no
    /// IPAM).
    pub cluster_pool: Option<(crate::ipam::Cidr, u8)>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            // Cilium's operator: 15 s lease, 10 s renew deadline, 2 s retry.
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
            // Cilium's --identity-gc-interval and heartbeat timeout.
            gc_interval: crate::cluster::IDENTITY_GC_INTERVAL,
            identity_grace: crate::cluster::IDENTITY_HEARTBEAT_TIMEOUT,
            cluster_pool: None,
        }
    }
}

fn cilium(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &crate::k8s::cilium_resource(kind, plural))
}

/// One leader election round: take the Lease if it is free or expired,
/// renew it if ours. True: this operator leads until `now + duration`.
pub async fn try_lead(client: &Client, cfg: &OperatorConfig) -> Result<bool, kube::Error> {
    let api = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = Timestamp::now();
    let secs = cfg.lease_duration.as_secs().max(1) as i32;
    let spec = |transitions: i32, acquired: Option<Timestamp>| {
        json!({"holderIdentity": cfg.id, "leaseDurationSeconds": secs,
            "acquireTime": acquired.unwrap_or(now).to_string(), "renewTime": now.to_string(),
            "leaseTransitions": transitions})
    };
    let Some(mut lease) = api.get_opt(LEASE).await? else {
        let l: Lease = serde_json::from_value(json!({
            "metadata": {"name": LEASE, "namespace": LEASE_NAMESPACE}, "spec": spec(0, None)}))
        .map_err(kube::Error::SerdeError)?;
        return match api.create(&PostParams::default(), &l).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let s = lease.spec.clone().unwrap_or_default();
    let holder = s.holder_identity.clone().unwrap_or_default();
    let expired = match (s.renew_time.as_ref(), s.lease_duration_seconds) {
        (Some(t), Some(d)) => t.0.as_second() + i64::from(d) < now.as_second(),
        _ => true,
    };
    if holder != cfg.id && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let (transitions, acquired) = if holder == cfg.id {
        (s.lease_transitions.unwrap_or(0), s.acquire_time.map(|t| t.0))
    } else {
        (s.lease_transitions.unwrap_or(0) + 1, None)
    };
    lease.spec =
        Some(serde_json::from_value(spec(transitions, acquired)).map_err(kube::Error::SerdeError)?);
    // The update carries the version read: another operator's write in
    // between makes it a 409, and that one leads.
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// What one garbage collection pass deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub identities: Vec<String>,
    pub endpoints: Vec<String>,
    pub nodes: Vec<String>,
}

/// The garbage collector's memory between passes: since when each
/// identity has been seen unused.
#[derive(Default)]
pub struct Gc {
    unused_since: BTreeMap<String, Instant>,
}

impl Gc {
    /// One pass (see the module comment).
    pub async fn pass(
        &mut self,
        client: &Client,
        cfg: &OperatorConfig,
    ) -> Result<Collected, kube::Error> {
        let mut out = Collected::default();
        let lp = ListParams::default();
        let ceps = cilium(client, "CiliumEndpoint", "ciliumendpoints");
        let pods: BTreeSet<(String, String)> = Api::<Pod>::all(client.clone())
            .list(&lp)
            .await?
            .items
            .into_iter()
            .map(|p| {
                (p.metadata.namespace.unwrap_or_default(), p.metadata.name.unwrap_or_default())
            })
            .collect();
        let mut used: BTreeSet<String> = BTreeSet::new();
        for cep in ceps.list(&lp).await?.items {
            let ns = cep.metadata.namespace.clone().unwrap_or_default();
            let name = cep.metadata.name.clone().unwrap_or_default();
            if !pods.contains(&(ns.clone(), name.clone())) {
                let api = Api::<DynamicObject>::namespaced_with(
                    client.clone(),
                    &ns,
                    &crate::k8s::cilium_resource("CiliumEndpoint", "ciliumendpoints"),
                );
                if deleted(api.delete(&name, &DeleteParams::default()).await)? {
                    out.endpoints.push(format!("{ns}/{name}"));
                }
                continue;
            }
            if let Some(id) = cep.data["status"]["identity"]["id"].as_u64() {
                used.insert(id.to_string());
            }
        }
        let ids = cilium(client, "CiliumIdentity", "ciliumidentities");
        let claims = Api::<ConfigMap>::namespaced(client.clone(), "kube-system");
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for ci in ids.list(&lp).await?.items {
            let name = ci.metadata.name.clone().unwrap_or_default();
            seen.insert(name.clone());
            if used.contains(&name) {
                self.unused_since.remove(&name);
                continue;
            }
            let since = *self.unused_since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) < cfg.identity_grace {
                continue;
            }
            // The claim first: a new allocation then makes a new identity
            // rather than being handed the one going away.
            let lp = ListParams::default().labels(&format!("ciliate.io/identity={name}"));
            for c in claims.list(&lp).await?.items {
                let cname = c.metadata.name.unwrap_or_default();
                deleted(claims.delete(&cname, &DeleteParams::default()).await)?;
            }
            if deleted(ids.delete(&name, &DeleteParams::default()).await)? {
                out.identities.push(name.clone());
            }
            self.unused_since.remove(&name);
        }
        self.unused_since.retain(|k, _| seen.contains(k));
        let nodes: BTreeSet<String> = Api::<Node>::all(client.clone())
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let cns = cilium(client, "CiliumNode", "ciliumnodes");
        for cn in cns.list(&lp).await?.items {
            let name = cn.metadata.name.unwrap_or_default();
            if !nodes.contains(&name) && deleted(cns.delete(&name, &DeleteParams::default()).await)?
            {
                out.nodes.push(name);
            }
        }
        Ok(out)
    }
}

/// A delete's outcome: done (true), already gone (false), or the error.
fn deleted<T>(r: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Run until `shutdown`: elect, and while leading collect garbage every
/// `gc_interval`. A leader that has not renewed for the lease's duration
/// stops collecting.
pub async fn run(
    client: Client,
    cfg: OperatorConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut gc = Gc::default();
    // (With backoff: while the API is away its errors would otherwise
    // come back at once, and the wait below would spin.)
    let mut cilium_nodes =
        watcher::watcher(cilium(&client, "CiliumNode", "ciliumnodes"), watcher::Config::default())
            .default_backoff()
            .boxed();
    let mut renewed: Option<Instant> = None;
    let mut was_leading = false;
    let mut last_gc: Option<Instant> = None;
    loop {
        match try_lead(&client, &cfg).await {
            Ok(true) => {
                if renewed.is_none() {
                    tracing::info!(subsystem = "operator", id = %cfg.id, "leading");
                }
                renewed = Some(Instant::now());
            }
            Ok(false) => {
                if renewed.take().is_some() {
                    tracing::warn!(subsystem = "operator", id = %cfg.id, "lost the lease");
                }
            }
            Err(e) => tracing::warn!(subsystem = "operator", error = %e, "leader election"),
        }
        let leading = renewed.is_some_and(|t| t.elapsed() < cfg.lease_duration);
        // A new leader assigns what waited; after that, CiliumNode events
        // drive the passes (below).
        if leading && !was_leading {
            assign(&client, &cfg).await;
        }
        was_leading = leading;
        if leading && last_gc.is_none_or(|t| t.elapsed() >= cfg.gc_interval) {
            match gc.pass(&client, &cfg).await {
                Ok(c) => {
                    last_gc = Some(Instant::now());
                    if c != Collected::default() {
                        tracing::info!(subsystem = "operator", identities = ?c.identities, endpoints = ?c.endpoints, nodes = ?c.nodes, "garbage collected");
                    }
                }
                Err(e) => tracing::warn!(subsystem = "operator", error = %e, "garbage collection"),
            }
        }
        // Until the next round, a new CiliumNode is given its CIDR at
        // once (its agent is waiting), with no list every round.
        let wait = tokio::time::sleep(cfg.renew_interval);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = crate::api::stopped(&mut shutdown) => return,
                ev = cilium_nodes.next() => {
                    let still = renewed.is_some_and(|t| t.elapsed() < cfg.lease_duration);
                    // A CiliumNode added or changed (maybe one a pass
                    // left after a 409), one deleted (its CIDR free for a
                    // node still waiting), or a relist done.
                    let relevant = matches!(
                        ev,
                        Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone))
                    );
                    if relevant && still {
                        assign(&client, &cfg).await;
                    }
                }
            }
        }
    }
}

/// One IPAM pass when the operator has a pool (errors logged; the next
/// round tries again).
async fn assign(client: &Client, cfg: &OperatorConfig) {
    let Some((pool, mask)) = cfg.cluster_pool else { return };
    match crate::k8s::ipam::assign_pod_cidrs(client, pool, mask).await {
        Ok(done) => {
            for (node, cidr) in done {
                tracing::info!(subsystem = "operator", %node, %cidr, "pod CIDR assigned");
            }
        }
        Err(e) => tracing::warn!(subsystem = "operator", error = %e, "cluster-pool IPAM"),
    }
}
