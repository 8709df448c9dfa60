//! Cilium's CRD mode: identities are CiliumIdentity objects, other nodes
//! are their CiliumNodes and other nodes' endpoints their CiliumEndpoints,
//! so with Kubernetes the kvstore is not needed for them
//! (`--identity-allocation-mode crd`, the default with Kubernetes).
//!
//! Allocation: the identity of a label set is the ID its claim names (a
//! ConfigMap `ciliate-identity-<hash of the labels>` in kube-system:
//! created once, so the first agent to claim a label set decides its ID
//! for everyone, however many race). An agent that finds no claim takes
//! one of the lowest IDs no CiliumIdentity has (at random, as Cilium's CRD
//! allocator does), creates the CiliumIdentity (the
//! API's AlreadyExists makes the ID its own, else it tries the next), then
//! the claim; if another agent's claim landed first it takes the claimed
//! ID and deletes the CiliumIdentity it made, unless the claim names that
//! very ID (two agents that picked the same ID share one identity, which
//! must not be deleted under the winner). The CiliumIdentity is made
//! before the claim names it, so a claimed ID is never another label
//! set's.
//!
//! Following: [`K8sRecords`] turns CiliumNodes, CiliumEndpoints and
//! CiliumIdentities into the records the cluster sync follows (as if
//! they were the kvstore's), so validation (a record claiming this node's
//! addresses is refused) and the datapath writes are the same code.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
    core::DynamicObject,
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    cluster::{IpRecord, NodeRecord, RecordSource, Routing},
    kvstore::{IDENTITY_IDS, IPS, NODES},
};

use super::{K8sError, api_err, is_code};

fn identities(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &super::cilium_resource("CiliumIdentity", "ciliumidentities"))
}

/// A label set as CiliumIdentity's `security-labels` (`k8s:app` → `web`).
fn security_labels(labels: &[String]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

/// The label set of a CiliumIdentity.
fn labels_of(o: &DynamicObject) -> Vec<String> {
    let mut out: Vec<String> = o.data["security-labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| match v.as_str().unwrap_or_default() {
            "" => k.clone(),
            v => format!("{k}={v}"),
        })
        .collect();
    out.sort();
    out
}

/// The claim's name for a label set (FNV-1a of the labels; `n` > 0 for
/// the rare second label set of one hash).
fn claim_name(labels: &[String], n: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in labels.join(";").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    if n == 0 {
        format!("ciliate-identity-{h:016x}")
    } else {
        format!("ciliate-identity-{h:016x}-{n}")
    }
}

/// An index below `n` (n > 0), from a fresh UUID's randomness.
fn rand_index(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n.max(1) as u128) as usize
}

/// The cluster identity of `labels` (see the module comment), at least
/// `min`.
pub async fn allocate(client: &Client, labels: &[String], min: u32) -> Result<u32, K8sError> {
    allocate_in(client, labels, min, 64).await
}

/// [`allocate`], picking among the `window` lowest free IDs (1: every
/// agent picks the same one, the case where racers share an identity).
pub async fn allocate_in(
    client: &Client,
    labels: &[String],
    min: u32,
    window: usize,
) -> Result<u32, K8sError> {
    let claims =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "kube-system");
    let ids = identities(client);
    let labels_json = serde_json::to_string(labels).unwrap_or_default();
    for _attempt in 0..64 {
        // The claim of this label set (past any hash collision).
        let mut n = 0;
        let claimed = loop {
            let name = claim_name(labels, n);
            match claims
                .get_opt(&name)
                .await
                .map_err(api_err(format!("configmap kube-system/{name}")))?
            {
                Some(c) => {
                    let data = c.data.unwrap_or_default();
                    if data.get("labels") == Some(&labels_json) {
                        break Some((name, data.get("id").and_then(|i| i.parse::<u32>().ok())));
                    }
                    n += 1;
                }
                None => break None,
            }
        };
        let claim = match claimed {
            Some((_, Some(id))) => {
                // Claimed: make sure its CiliumIdentity is there (a claimer
                // that stopped between the two writes is finished here).
                let _ = create_identity(&ids, id, labels).await;
                return Ok(id);
            }
            Some((name, None)) => return Err(K8sError::Claim { name }),
            None => claim_name(labels, n),
        };
        // Unclaimed: the lowest free ID, its CiliumIdentity, then the claim.
        let used: std::collections::BTreeSet<u32> = ids
            .list(&Default::default())
            .await
            .map_err(api_err("ciliumidentities"))?
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name?.parse().ok())
            .collect();
        // One of the lowest free IDs, at random (as Cilium's CRD
        // allocator picks at random): agents allocating at once seldom
        // collide on an ID, and the claim settles who wins a label set.
        let free: Vec<u32> =
            (min..u32::MAX).filter(|i| !used.contains(i)).take(window.max(1)).collect();
        let Some(&id) = free.get(rand_index(free.len())) else { break };
        let made = create_identity(&ids, id, labels).await?;
        if made == Made::Taken {
            continue; // taken meanwhile by another label set: look again
        }
        let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": claim, "namespace": "kube-system", "labels": {"ciliate.io/identity": id.to_string()}},
            "data": {"id": id.to_string(), "labels": labels_json},
        }))
        .map_err(|e| K8sError::Config { what: "an identity claim".into(), source: e.into() })?;
        match claims.create(&PostParams::default(), &cm).await {
            Ok(_) => return Ok(id),
            Err(e) if is_code(&e, 409) => {
                // Another agent claimed the set first: its ID is the one
                // (read on the next round). The identity goes only if this
                // agent made it and the claim names another: one the
                // claimer made or found too (the same ID) stays.
                let named = claims.get_opt(&claim).await.ok().flatten().and_then(|c| {
                    c.data.and_then(|d| d.get("id").and_then(|i| i.parse::<u32>().ok()))
                });
                if made == Made::Created && named != Some(id) {
                    let _ = ids.delete(&id.to_string(), &DeleteParams::default()).await;
                }
                continue;
            }
            Err(e) => {
                if made == Made::Created {
                    let _ = ids.delete(&id.to_string(), &DeleteParams::default()).await;
                }
                return Err(api_err(format!("configmap kube-system/{claim}"))(e));
            }
        }
    }
    Err(K8sError::Claim { name: claim_name(labels, 0) })
}

/// What [`create_identity`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    /// This call created it.
    Created,
    /// It was there with these labels (another agent made it).
    There,
    /// It was there with other labels.
    Taken,
}

/// Create CiliumIdentity `id` of `labels`, or find it there.
async fn create_identity(
    ids: &Api<DynamicObject>,
    id: u32,
    labels: &[String],
) -> Result<Made, K8sError> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
        "metadata": {"name": id.to_string()},
        "security-labels": security_labels(labels),
    }))
    .map_err(|e| K8sError::Config { what: "a CiliumIdentity".into(), source: e.into() })?;
    match ids.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(Made::Created),
        Err(e) if is_code(&e, 409) => {
            let there = ids
                .get_opt(&id.to_string())
                .await
                .map_err(api_err(format!("ciliumidentity {id}")))?;
            Ok(if there.is_some_and(|o| labels_of(&o) == labels) {
                Made::There
            } else {
                Made::Taken
            })
        }
        Err(e) => Err(api_err(format!("ciliumidentity {id}"))(e)),
    }
}

/// CiliumNodes, CiliumEndpoints and CiliumIdentities as the cluster
/// sync's records (see the module comment).
pub struct K8sRecords {
    pub client: Client,
    /// The cluster's routing mode (a CiliumNode does not say it).
    pub routing: Routing,
}

/// A CiliumNode as a node record.
fn node_record(o: &DynamicObject, routing: Routing) -> Option<NodeRecord> {
    let spec = &o.data["spec"];
    let ip = spec["addresses"].as_array()?.iter().find(|a| a["type"] == "InternalIP")?["ip"]
        .as_str()?
        .parse()
        .ok()?;
    Some(NodeRecord {
        name: o.metadata.name.clone()?,
        ip,
        pod_cidr: spec["ipam"]["podCIDRs"][0].as_str()?.to_string(),
        routing,
        health_ip: spec["health"]["ipv4"].as_str().and_then(|h| h.parse().ok()),
    })
}

/// The cluster's nodes: its CiliumNodes as node records.
pub async fn nodes(client: &Client, routing: Routing) -> Result<Vec<NodeRecord>, K8sError> {
    let api = Api::<DynamicObject>::all_with(
        client.clone(),
        &super::cilium_resource("CiliumNode", "ciliumnodes"),
    );
    let list = api.list(&Default::default()).await.map_err(api_err("ciliumnodes"))?;
    Ok(list.items.iter().filter_map(|o| node_record(o, routing)).collect())
}

/// A CiliumEndpoint as an endpoint record.
fn ip_record(o: &DynamicObject) -> Option<IpRecord> {
    let st = &o.data["status"];
    let ip = st["networking"]["addressing"][0]["ipv4"].as_str()?.parse().ok()?;
    let host_ip = st["networking"]["node"].as_str()?.parse().ok()?;
    let node = o
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(super::publish::NODE_LABEL).cloned())
        .unwrap_or_else(|| format!("node {host_ip}"));
    Some(IpRecord {
        ip,
        identity: u32::try_from(st["identity"]["id"].as_u64()?).ok()?,
        node,
        host_ip,
        pod: format!("{}/{}", o.metadata.namespace.as_deref()?, o.metadata.name.as_deref()?),
    })
}

/// An object as (key, value) in the store's encoding.
fn record(prefix: &str, o: &DynamicObject, routing: Routing) -> Option<(String, Vec<u8>)> {
    match prefix {
        NODES => {
            let n = node_record(o, routing)?;
            Some((format!("{NODES}{}", n.name), serde_json::to_vec(&n).ok()?))
        }
        IPS => {
            let r = ip_record(o)?;
            Some((format!("{IPS}{}", r.ip), serde_json::to_vec(&r).ok()?))
        }
        IDENTITY_IDS => {
            let id: u32 = o.metadata.name.as_deref()?.parse().ok()?;
            Some((format!("{IDENTITY_IDS}{id}"), serde_json::to_vec(&labels_of(o)).ok()?))
        }
        _ => None,
    }
}

/// Object (namespace, name) -> its record (key, value), as handed on.
type Records = BTreeMap<(String, String), (String, Vec<u8>)>;

impl RecordSource for K8sRecords {
    fn changes(
        &self,
        prefix: &'static str,
        health: Box<dyn Fn(Result<(), String>) + Send + Sync>,
    ) -> mpsc::Receiver<(String, Option<Vec<u8>>)> {
        let (tx, rx) = mpsc::channel(1024);
        let ar = match prefix {
            NODES => super::cilium_resource("CiliumNode", "ciliumnodes"),
            IPS => super::cilium_resource("CiliumEndpoint", "ciliumendpoints"),
            _ => super::cilium_resource("CiliumIdentity", "ciliumidentities"),
        };
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &ar);
        let routing = self.routing;
        tokio::spawn(async move {
            use watcher::Event;
            let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
            let mut known: Records = BTreeMap::new();
            let mut listing: Option<Records> = None;
            let id = |o: &DynamicObject| {
                (
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.metadata.name.clone().unwrap_or_default(),
                )
            };
            while let Some(ev) = stream.next().await {
                let mut out: Vec<(String, Option<Vec<u8>>)> = Vec::new();
                match ev {
                    Err(e) => {
                        tracing::warn!(subsystem = "k8s", kind = %ar.kind, error = %e, "watching");
                        health(Err(format!("watching {}: {e}", ar.plural)));
                        continue;
                    }
                    Ok(Event::Init) => listing = Some(BTreeMap::new()),
                    Ok(Event::InitApply(o)) => {
                        if let (Some(l), Some(r)) = (listing.as_mut(), record(prefix, &o, routing))
                        {
                            l.insert(id(&o), r);
                        }
                    }
                    Ok(Event::InitDone) => {
                        let now = listing.take().unwrap_or_default();
                        let keys: std::collections::BTreeSet<&String> =
                            now.values().map(|(k, _)| k).collect();
                        for (k, _) in known.values() {
                            if !keys.contains(k) {
                                out.push((k.clone(), None));
                            }
                        }
                        for (o, r) in &now {
                            if known.get(o) != Some(r) {
                                out.push((r.0.clone(), Some(r.1.clone())));
                            }
                        }
                        known = now;
                    }
                    Ok(Event::Apply(o)) => {
                        let key = id(&o);
                        match record(prefix, &o, routing) {
                            Some(r) if known.get(&key) == Some(&r) => {}
                            Some(r) => {
                                if let Some((old, _)) = known.get(&key)
                                    && *old != r.0
                                {
                                    out.push((old.clone(), None));
                                }
                                out.push((r.0.clone(), Some(r.1.clone())));
                                known.insert(key, r);
                            }
                            // Not (or no longer) a whole record: gone.
                            None => {
                                if let Some((old, _)) = known.remove(&key) {
                                    out.push((old, None));
                                }
                            }
                        }
                    }
                    Ok(Event::Delete(o)) => {
                        if let Some((old, _)) = known.remove(&id(&o)) {
                            out.push((old, None));
                        }
                    }
                }
                if listing.is_none() {
                    health(Ok(()));
                }
                for c in out {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn objects_become_the_records_the_cluster_sync_follows() {
        let node: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "n2"},
            "spec": {"addresses": [{"type": "CiliumInternalIP", "ip": "10.200.1.1"}, {"type": "InternalIP", "ip": "192.168.200.3"}],
                "ipam": {"podCIDRs": ["10.200.1.0/24"]}, "health": {"ipv4": "10.200.1.2"}}
        }))
        .unwrap();
        let n = node_record(&node, Routing::Tunnel).unwrap();
        assert_eq!(
            (n.name.as_str(), n.ip.to_string(), n.pod_cidr.as_str()),
            ("n2", "192.168.200.3".into(), "10.200.1.0/24")
        );
        assert_eq!(n.health_ip, Some("10.200.1.2".parse().unwrap()));
        let cep: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"ciliate.io/node": "n2"}},
            "status": {"identity": {"id": 300}, "networking": {"addressing": [{"ipv4": "10.200.1.5"}], "node": "192.168.200.3"}}
        }))
        .unwrap();
        let r = ip_record(&cep).unwrap();
        assert_eq!(
            (r.ip.to_string(), r.identity, r.node.as_str(), r.pod.as_str()),
            ("10.200.1.5".into(), 300, "n2", "shop/web")
        );
        let id: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": "300"},
            "security-labels": {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "shop"}
        }))
        .unwrap();
        assert_eq!(labels_of(&id), ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]);
        let (k, v) = record(IDENTITY_IDS, &id, Routing::Tunnel).unwrap();
        assert_eq!(k, format!("{IDENTITY_IDS}300"));
        assert_eq!(
            serde_json::from_slice::<Value>(&v).unwrap(),
            json!(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"])
        );
        // A CiliumEndpoint without its status yet is no record.
        let bare: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint", "metadata": {"name": "x", "namespace": "shop"}
        }))
        .unwrap();
        assert!(ip_record(&bare).is_none());
    }
}
