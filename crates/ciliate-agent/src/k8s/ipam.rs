//! Pod CIDRs from the Kubernetes API, Cilium's two Kubernetes IPAM modes:
//! - **cluster-pool** (the default): the operator hands each CiliumNode a
//!   `/mask` of the cluster pool in `spec.ipam.podCIDRs`; the agent
//!   creates its CiliumNode if it is not there and waits for it. The
//!   assignments live in the CiliumNodes themselves, so a restarted
//!   operator reads them back and a restarted agent finds its CIDR again.
//! - **kubernetes**: the node's `spec.podCIDRs`, as the controller manager
//!   (or whoever registers the node) writes them.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    core::DynamicObject,
};
use serde_json::json;

use super::{K8sError, api_err, is_code};
use crate::ipam::Cidr;

/// Where a node's pod CIDR comes from (`--ipam`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpamMode {
    /// From the cluster pool: the operator with Kubernetes (CiliumNode
    /// `spec.ipam.podCIDRs`), the kvstore without.
    #[default]
    ClusterPool,
    /// The Node's `spec.podCIDRs`.
    Kubernetes,
}

impl std::str::FromStr for IpamMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cluster-pool" => Ok(Self::ClusterPool),
            "kubernetes" => Ok(Self::Kubernetes),
            other => Err(format!("ipam mode {other:?}: \"cluster-pool\" or \"kubernetes\"")),
        }
    }
}

fn nodes_api(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &super::cilium_resource("CiliumNode", "ciliumnodes"))
}

/// The first pod CIDR in `list` (a JSON array of strings), if it is one.
fn first_cidr(list: &serde_json::Value) -> Option<Cidr> {
    list.get(0)?.as_str()?.parse().ok()
}

/// A CiliumNode's pod CIDR (`spec.ipam.podCIDRs[0]`).
pub fn cilium_node_cidr(o: &DynamicObject) -> Option<Cidr> {
    first_cidr(&o.data["spec"]["ipam"]["podCIDRs"])
}

/// This node's pod CIDR from the API (see the module comment), waiting up
/// to `timeout` for it to be assigned. The API being away meanwhile is
/// waited out too.
pub async fn pod_cidr(
    client: &Client,
    node: &str,
    mode: IpamMode,
    timeout: Duration,
) -> Result<Cidr, K8sError> {
    let deadline = Instant::now() + timeout;
    let mut last_err: Option<K8sError>;
    let mut warned = Instant::now();
    loop {
        let found = match mode {
            IpamMode::ClusterPool => cluster_pool_cidr(client, node).await,
            IpamMode::Kubernetes => node_cidr(client, node).await,
        };
        match found {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => last_err = None,
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(last_err.unwrap_or_else(|| K8sError::NoPodCidr {
                node: node.into(),
                waited: timeout,
                hint: match mode {
                    IpamMode::ClusterPool => format!(
                        "CiliumNode {node} has no spec.ipam.podCIDRs: is ciliate-operator running with --cluster-pool-ipv4-cidr?"
                    ),
                    IpamMode::Kubernetes => format!(
                        "Node {node} has no spec.podCIDRs (--ipam kubernetes takes them from the Node)"
                    ),
                },
            }));
        }
        if warned.elapsed() >= Duration::from_secs(10) {
            warned = Instant::now();
            tracing::warn!(subsystem = "ipam", node, ?mode, error = ?last_err.as_ref().map(ToString::to_string), "still waiting for this node's pod CIDR");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CiliumNode's CIDR; the CiliumNode is created (name only) when it is
/// not there, for the operator to fill.
async fn cluster_pool_cidr(client: &Client, node: &str) -> Result<Option<Cidr>, K8sError> {
    let api = nodes_api(client);
    match api.get_opt(node).await.map_err(api_err(format!("ciliumnode {node}")))? {
        Some(o) => Ok(cilium_node_cidr(&o)),
        None => {
            let o: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
                "metadata": {"name": node}, "spec": {},
            }))
            .map_err(|e| K8sError::Config { what: "a CiliumNode".into(), source: e.into() })?;
            match api.create(&PostParams::default(), &o).await {
                Ok(_) => {
                    tracing::info!(
                        subsystem = "ipam",
                        node,
                        "CiliumNode created; waiting for the operator's pod CIDR"
                    );
                    Ok(None)
                }
                Err(e) if is_code(&e, 409) => Ok(None),
                Err(e) => Err(api_err(format!("ciliumnode {node}"))(e)),
            }
        }
    }
}

/// The Node's first pod CIDR (`spec.podCIDRs`, or the older `spec.podCIDR`).
async fn node_cidr(client: &Client, node: &str) -> Result<Option<Cidr>, K8sError> {
    let n = Api::<Node>::all(client.clone())
        .get_opt(node)
        .await
        .map_err(api_err(format!("node {node}")))?;
    let spec = n.and_then(|n| n.spec).unwrap_or_default();
    Ok(spec
        .pod_cidrs
        .unwrap_or_default()
        .into_iter()
        .chain(spec.pod_cidr)
        .find_map(|c| c.parse::<Cidr>().ok()))
}

/// The lowest `/mask` of `pool` that overlaps none of `used`.
pub fn free_block(pool: Cidr, mask: u8, used: &[Cidr]) -> Option<Cidr> {
    use crate::policy::contains;
    pool.blocks(mask).find(|c| {
        !used.iter().any(|u| contains(u.prefix(), c.prefix()) || contains(c.prefix(), u.prefix()))
    })
}

/// One pass of the operator's cluster-pool IPAM: every CiliumNode without
/// a pod CIDR gets the lowest `/mask` of `pool` no other CiliumNode has
/// (by name, so passes are repeatable). Each write replaces the object at
/// the version read: a CiliumNode changed meanwhile (409) ends the pass,
/// and the next one starts from a fresh list, so a node is never given a
/// second CIDR nor two nodes one (one leader assigns; see the operator).
/// The CIDRs assigned, by node.
pub async fn assign_pod_cidrs(
    client: &Client,
    pool: Cidr,
    mask: u8,
) -> Result<Vec<(String, Cidr)>, kube::Error> {
    let api = nodes_api(client);
    let mut list = api.list(&ListParams::default()).await?.items;
    list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut used: Vec<Cidr> = list.iter().filter_map(cilium_node_cidr).collect();
    let mut out = Vec::new();
    for mut o in list {
        if cilium_node_cidr(&o).is_some() {
            continue;
        }
        let name = o.metadata.name.clone().unwrap_or_default();
        let Some(c) = free_block(pool, mask, &used) else {
            tracing::warn!(subsystem = "ipam", node = %name, %pool, mask, "the cluster pool has no free CIDR left");
            continue;
        };
        if !o.data["spec"].is_object() {
            o.data["spec"] = json!({});
        }
        o.data["spec"]["ipam"]["podCIDRs"] = json!([c.to_string()]);
        match api.replace(&name, &PostParams::default(), &o).await {
            Ok(_) => {
                used.push(c);
                out.push((name, c));
            }
            // Changed or gone since the list: what this pass knows is
            // stale (another writer may have assigned meanwhile), so the
            // rest waits for the next pass's fresh list.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn free_blocks_skip_every_overlap() {
        let pool = c("10.8.0.0/16");
        assert_eq!(free_block(pool, 24, &[]), Some(c("10.8.0.0/24")));
        assert_eq!(free_block(pool, 24, &[c("10.8.0.0/24")]), Some(c("10.8.1.0/24")));
        // A bigger block taken by hand covers several.
        assert_eq!(free_block(pool, 24, &[c("10.8.0.0/23")]), Some(c("10.8.2.0/24")));
        // A smaller one blocks the /24 it is in.
        assert_eq!(free_block(pool, 24, &[c("10.8.0.128/25")]), Some(c("10.8.1.0/24")));
        // One outside the pool changes nothing.
        assert_eq!(free_block(pool, 24, &[c("10.9.0.0/24")]), Some(c("10.8.0.0/24")));
        let full: Vec<Cidr> = (0..4).map(|i| c(&format!("10.8.{i}.0/24"))).collect();
        assert_eq!(free_block(c("10.8.0.0/22"), 24, &full), None);
        assert_eq!(free_block(pool, 8, &[]), None, "a mask wider than the pool");
    }

    #[test]
    fn ipam_modes_parse_by_cilium_name() {
        assert_eq!("cluster-pool".parse(), Ok(IpamMode::ClusterPool));
        assert_eq!("kubernetes".parse(), Ok(IpamMode::Kubernetes));
        let e = "eni".parse::<IpamMode>().unwrap_err();
        assert!(e.contains("\"eni\""), "{e}");
    }
}
