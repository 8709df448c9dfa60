//! What the agent writes to the Kubernetes API about itself, as Cilium's
//! agents do: a CiliumEndpoint per local pod endpoint (ID, identity and its
//! labels, address, node, state, policy enforcement), kept to the
//! endpoint's state and removed with it, and the node's CiliumNode
//! (addresses, pod CIDR, health address).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ciliate_api::models::Endpoint;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    core::DynamicObject,
};
use serde_json::{Value, json};

use super::types::{
    Addressing, EndpointIdentity, EndpointNetworking, EndpointPolicy, EndpointStatus, Enforcement,
    ExternalIdentifiers, NodeAddress, NodeHealth, NodeIpam, NodeSpec,
};
use crate::{api::AppState, cluster::NodeRecord, endpoint::Datapath};

/// The label on every CiliumEndpoint naming the node that wrote it (how a
/// restarted agent finds its own stale ones).
pub const NODE_LABEL: &str = "ciliate.io/node";

/// The CiliumEndpoint status of `ep` (Cilium's field names).
pub fn endpoint_status(ep: &Endpoint, node_ip: Option<std::net::Ipv4Addr>) -> Value {
    let (ns, pod) = ep.pod_name.split_once('/').unwrap_or_default();
    let status = EndpointStatus {
        id: i64::from(ep.id),
        identity: EndpointIdentity {
            id: i64::from(ep.identity),
            labels: ciliate_api::models::label_set(&ep.labels),
        },
        networking: EndpointNetworking {
            addressing: vec![Addressing { ipv4: Some(ep.ip.to_string()), ipv6: None }],
            node: node_ip.map(|i| i.to_string()).unwrap_or_default(),
        },
        state: ep.state.clone(),
        policy: EndpointPolicy {
            ingress: Enforcement { enforcing: ep.ingress_enforcement != "Disabled" },
            egress: Enforcement { enforcing: ep.egress_enforcement != "Disabled" },
        },
        external_identifiers: ExternalIdentifiers {
            container_id: ep.container_id.clone(),
            k8s_namespace: ns.into(),
            k8s_pod_name: pod.into(),
            pod_name: ep.pod_name.clone(),
        },
    };
    serde_json::to_value(status).unwrap_or_default()
}

/// Keep one CiliumEndpoint per local pod endpoint (named as its pod, in
/// its namespace) equal to the endpoint, until the agent stops. A write
/// the API refuses is tried again on the next change or after 2 s.
pub async fn publish_endpoints<D: Datapath + 'static>(
    st: Arc<AppState<D>>,
    client: Client,
    node: String,
    node_ip: Option<std::net::Ipv4Addr>,
) {
    let ar = super::cilium_resource("CiliumEndpoint", "ciliumendpoints");
    let all = Api::<DynamicObject>::all_with(client.clone(), &ar);
    // (namespace, name) -> the status last written.
    let mut written: BTreeMap<(String, String), Value> = BTreeMap::new();
    // Ones an earlier run of this agent wrote: removed unless still wanted.
    let lp = ListParams::default().labels(&format!("{NODE_LABEL}={node}"));
    let mut stale: Vec<(String, String)> = match all.list(&lp).await {
        Ok(l) => l
            .items
            .into_iter()
            .map(|o| {
                (o.metadata.namespace.unwrap_or_default(), o.metadata.name.unwrap_or_default())
            })
            .collect(),
        Err(e) => {
            tracing::warn!(subsystem = "k8s", error = %e, "listing this node's CiliumEndpoints");
            vec![]
        }
    };
    let mut snaps = st.endpoints.watch();
    loop {
        let view = snaps.borrow_and_update().clone();
        let mut want: BTreeMap<(String, String), Value> = BTreeMap::new();
        for ep in view.endpoints.values() {
            if let Some((ns, name)) = ep.pod_name.split_once('/') {
                want.insert((ns.to_string(), name.to_string()), endpoint_status(ep, node_ip));
            }
        }
        let mut failed = false;
        for ((ns, name), status) in &want {
            if written.get(&(ns.clone(), name.clone())) == Some(status) {
                continue;
            }
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar);
            let obj: DynamicObject = match serde_json::from_value(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
                "metadata": {"name": name, "namespace": ns, "labels": {NODE_LABEL: node}},
            })) {
                Ok(o) => o,
                Err(_) => continue,
            };
            let created = match api.create(&PostParams::default(), &obj).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e),
            };
            let r = match created {
                Ok(()) => api
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"status": status})),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    written.insert((ns.clone(), name.clone()), status.clone());
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(subsystem = "k8s", endpoint = %format!("{ns}/{name}"), error = %e, "writing the CiliumEndpoint");
                }
            }
        }
        let gone: Vec<(String, String)> = written
            .keys()
            .cloned()
            .chain(stale.drain(..))
            .filter(|k| !want.contains_key(k))
            .collect();
        for (ns, name) in gone {
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ar);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    written.remove(&(ns, name));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    written.remove(&(ns, name));
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(subsystem = "k8s", endpoint = %format!("{ns}/{name}"), error = %e, "removing the CiliumEndpoint");
                }
            }
        }
        let retry = tokio::time::sleep(if failed {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(3600)
        });
        tokio::select! {
            r = snaps.changed() => if r.is_err() { return },
            _ = retry => {}
        }
    }
}

/// The CiliumNode of `me` (Cilium's fields).
pub fn node_object(me: &NodeRecord, router: Option<std::net::Ipv4Addr>) -> Value {
    let mut addresses = vec![NodeAddress { kind: "InternalIP".into(), ip: me.ip.to_string() }];
    if let Some(r) = router {
        addresses.push(NodeAddress { kind: "CiliumInternalIP".into(), ip: r.to_string() });
    }
    let spec = NodeSpec {
        addresses,
        ipam: NodeIpam { pod_cidrs: vec![me.pod_cidr.clone()] },
        health: me.health_ip.map(|h| NodeHealth { ipv4: Some(h.to_string()) }),
    };
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": me.name}, "spec": spec})
}

/// Create or update this node's CiliumNode (retried every 2 s until it
/// lands).
pub async fn publish_node(client: Client, me: NodeRecord, router: Option<std::net::Ipv4Addr>) {
    let api = Api::<DynamicObject>::all_with(
        client,
        &super::cilium_resource("CiliumNode", "ciliumnodes"),
    );
    let want = node_object(&me, router);
    loop {
        let r = match api.get_opt(&me.name).await {
            Ok(None) => match serde_json::from_value::<DynamicObject>(want.clone()) {
                Ok(o) => api.create(&PostParams::default(), &o).await.map(|_| ()),
                Err(_) => return,
            },
            Ok(Some(_)) => api
                .patch(
                    &me.name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": want["spec"]})),
                )
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                tracing::info!(subsystem = "k8s", node = %me.name, "CiliumNode written");
                return;
            }
            Err(e) => {
                tracing::warn!(subsystem = "k8s", node = %me.name, error = %e, "writing the CiliumNode")
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
