//! Kubernetes as the source of pods' labels (Cilium's pod and namespace
//! watchers): with `--k8s-kubeconfig-path` (or inside a pod), the agent
//! watches the pods of its node and every namespace through kube-runtime
//! reflectors (relisting after a 410 Gone, bookmarks on), an endpoint
//! created for a pod the CNI names (`K8S_POD_NAMESPACE`/`K8S_POD_NAME`)
//! takes its labels from the API, and a pod or namespace relabel moves the
//! endpoint to the identity of its new labels.
//!
//! An endpoint's labels, as Cilium derives them:
//! - the pod's labels (`k8s:<key>=<value>`), but for those Cilium's default
//!   identity label filter leaves out (`pod-template-hash`,
//!   `controller-revision-hash`, `pod-template-generation`, and keys under
//!   `kubernetes.io`, `k8s.io`, `io.kubernetes`,
//!   `statefulset.kubernetes.io/pod-name` and the like): they change per
//!   rollout and would split one workload into many identities;
//! - `io.kubernetes.pod.namespace=<namespace>`;
//! - `io.cilium.k8s.policy.serviceaccount=<service account>`;
//! - `io.cilium.k8s.namespace.labels.<key>=<value>` for each label of the
//!   namespace (so a `namespaceSelector` on any label selects).

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, reflector::ObjectRef, watcher},
};
use tokio::sync::{mpsc, watch};

use crate::{api::AppState, endpoint::Datapath};

pub mod crd;
pub mod crds;
pub mod ipam;
pub mod policies;
pub mod publish;
pub mod services;
pub mod types;

pub use policies::{POLICY_KINDS, follow_policies};

/// Cilium's `kind` (plural `plural`) in group cilium.io, version v2.
pub fn cilium_resource(kind: &str, plural: &str) -> kube::discovery::ApiResource {
    let gvk = kube::core::GroupVersionKind::gvk("cilium.io", "v2", kind);
    kube::discovery::ApiResource::from_gvk_with_plural(&gvk, plural)
}

/// Where the API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum K8sSource {
    Kubeconfig(PathBuf),
    /// The pod's service account and KUBERNETES_SERVICE_HOST/PORT.
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading the Kubernetes configuration ({what}): {source}")]
    Config {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pod {namespace}/{name} is not in the Kubernetes API")]
    PodNotFound { namespace: String, name: String },
    #[error("identity claim {name}: no identity could be allocated for its label set")]
    Claim { name: String },
    #[error("no pod CIDR for node {node} after {waited:?}: {hint}")]
    NoPodCidr { node: String, waited: Duration, hint: String },
    #[error("asking the Kubernetes API for {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl K8sError {
    /// The agent API's answer for it.
    pub fn status(&self) -> u16 {
        match self {
            Self::PodNotFound { .. } => 404,
            Self::Config { .. } | Self::Claim { .. } | Self::NoPodCidr { .. } => 500,
            Self::Api { .. } => 503,
        }
    }
}

/// A [`K8sError::Api`] about `what`.
pub(crate) fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> K8sError {
    let what = what.into();
    move |source| K8sError::Api { what, source }
}

/// Is `e` the API's answer with HTTP status `code`?
pub(crate) fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A client for the API at `src`.
pub async fn client(src: &K8sSource) -> Result<Client, K8sError> {
    let cfg_err = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| K8sError::Config { what, source: e }
    };
    let config = match src {
        K8sSource::Kubeconfig(path) => {
            let what = path.display().to_string();
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| cfg_err(what.clone())(e.into()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| cfg_err(what)(e.into()))?
        }
        K8sSource::InCluster => {
            kube::Config::incluster().map_err(|e| cfg_err("in-cluster".into())(e.into()))?
        }
    };
    Client::try_from(config).map_err(|e| K8sError::Api { what: "a client".into(), source: e })
}

/// What changed in the API that may change an endpoint's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touched {
    Pod { namespace: String, name: String },
    Namespace(String),
}

/// The agent's view of the API: the reflectors' stores.
pub struct K8s {
    client: Client,
    /// CRD mode: identities are allocated as CiliumIdentities.
    pub crd_identities: bool,
    pods: reflector::Store<Pod>,
    namespaces: reflector::Store<Namespace>,
}

/// Label keys Cilium's default identity filter leaves out of identities.
fn identity_relevant(key: &str) -> bool {
    const EXCLUDED: [&str; 4] =
        ["pod-template-hash", "pod-template-generation", "controller-revision-hash", "etcd_node"];
    let prefix = key.split_once('/').map(|(p, _)| p);
    !(EXCLUDED.contains(&key)
        || key.starts_with("annotation.")
        || prefix.is_some_and(|p| {
            p == "kubernetes.io"
                || p.ends_with(".kubernetes.io")
                || p == "k8s.io"
                || p.ends_with(".k8s.io")
        })
        || key.starts_with("io.kubernetes"))
}

/// The labels Cilium gives the endpoint of `pod` in namespace `ns`.
pub fn endpoint_labels(pod: &Pod, ns: Option<&Namespace>) -> BTreeMap<String, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out: BTreeMap<String, String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| identity_relevant(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(crate::policy::NAMESPACE_LABEL.into(), namespace);
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone());
    out.insert(
        "io.cilium.k8s.policy.serviceaccount".into(),
        sa.filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
    );
    if let Some(ns) = ns {
        for (k, v) in ns.metadata.labels.iter().flatten() {
            out.insert(format!("{}{k}", crate::policy::NAMESPACE_LABELS_PREFIX), v.clone());
        }
    }
    out
}

impl K8s {
    /// Start the watchers (pods of `node`, every namespace). Returns the
    /// view and the changes the watchers see (every object again after a
    /// relist, so nothing missed while a watch was down is lost).
    pub fn start(
        client: Client,
        node: &str,
        crd_identities: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Touched>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (pods, pods_w) = reflector::store::<Pod>();
        let (namespaces, ns_w) = reflector::store::<Namespace>();
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pod_stream = reflector(pods_w, watcher(Api::<Pod>::all(client.clone()), pod_cfg))
            .default_backoff()
            .touched_objects();
        let ns_stream = reflector(
            ns_w,
            watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects();
        let pod_tx = tx.clone();
        let pods_task = pod_stream.for_each(move |r| {
            match r {
                Ok(p) => {
                    let _ = pod_tx.send(Touched::Pod {
                        namespace: p.metadata.namespace.clone().unwrap_or_default(),
                        name: p.metadata.name.clone().unwrap_or_default(),
                    });
                }
                Err(e) => tracing::warn!(subsystem = "k8s", error = %e, "watching pods"),
            }
            async {}
        });
        let ns_task = ns_stream.for_each(move |r| {
            match r {
                Ok(n) => {
                    let _ =
                        tx.send(Touched::Namespace(n.metadata.name.clone().unwrap_or_default()));
                }
                Err(e) => tracing::warn!(subsystem = "k8s", error = %e, "watching namespaces"),
            }
            async {}
        });
        tokio::spawn(async move {
            tokio::select! {
                _ = futures::future::join(pods_task, ns_task) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
        (Arc::new(Self { client, crd_identities, pods, namespaces }), rx)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&ObjectRef::new(name))
    }

    /// The labels of pod `namespace/name`'s endpoint: from the watchers'
    /// stores, or asked of the API when the pod is not there yet (a pod
    /// the kubelet sets up at once).
    pub async fn pod_labels(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, String>, K8sError> {
        let pod = match self.pods.get(&ObjectRef::new(name).within(namespace)) {
            Some(p) => p,
            None => {
                let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
                let what = format!("pod {namespace}/{name}");
                let got = tokio::time::timeout(Duration::from_secs(10), api.get_opt(name))
                    .await
                    .map_err(|_| K8sError::Api {
                        what: what.clone(),
                        source: kube::Error::Service("timed out after 10 s".into()),
                    })?
                    .map_err(|e| K8sError::Api { what, source: e })?;
                Arc::new(got.ok_or_else(|| K8sError::PodNotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                })?)
            }
        };
        let ns = match self.namespace(namespace) {
            Some(n) => Some(n),
            None => Api::<Namespace>::all(self.client.clone())
                .get_opt(namespace)
                .await
                .map_err(|e| K8sError::Api { what: format!("namespace {namespace}"), source: e })?
                .map(Arc::new),
        };
        Ok(endpoint_labels(&pod, ns.as_deref()))
    }

    /// The labels the stores give pod `namespace/name` now (`None`: the
    /// pod or its namespace is not in them; labels without the
    /// namespace's would move the endpoint to a wrong identity and back).
    fn stored_labels(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let pod = self.pods.get(&ObjectRef::new(name).within(namespace))?;
        let ns = self.namespace(namespace)?;
        Some(endpoint_labels(&pod, Some(&ns)))
    }
}

/// Follow the watchers' changes: an endpoint whose pod's labels (or its
/// namespace's) changed gets them, and with them its new identity.
pub async fn follow<D: Datapath + 'static>(
    st: Arc<AppState<D>>,
    k8s: Arc<K8s>,
    mut changes: mpsc::UnboundedReceiver<Touched>,
) {
    // Nothing is relabelled before both lists are in (a restarted agent
    // would otherwise see its pods before their namespaces).
    if k8s.pods.wait_until_ready().await.is_err()
        || k8s.namespaces.wait_until_ready().await.is_err()
    {
        return;
    }
    while let Some(t) = changes.recv().await {
        let eps = st.endpoints.snapshot();
        let hit: Vec<(u16, String, String)> = eps
            .endpoints
            .values()
            .filter_map(|e| {
                let (ns, name) = e.pod_name.split_once('/')?;
                let hit = match &t {
                    Touched::Pod { namespace, name: n } => namespace == ns && n == name,
                    Touched::Namespace(n) => n == ns,
                };
                hit.then(|| (e.id, ns.to_string(), name.to_string()))
            })
            .collect();
        for (id, ns, name) in hit {
            let Some(labels) = k8s.stored_labels(&ns, &name) else { continue };
            if eps.endpoints.get(&id).is_some_and(|e| e.labels == labels) {
                continue;
            }
            if let Err(e) = crate::api::relabel_endpoint(&st, id, labels).await {
                tracing::warn!(subsystem = "k8s", endpoint_id = id, pod = %format!("{ns}/{name}"), error = %e, "relabelling the endpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_are_cilium_s() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {
                "app": "web", "pod-template-hash": "5d8f", "controller-revision-hash": "x",
                "statefulset.kubernetes.io/pod-name": "web-1", "app.kubernetes.io/name": "web",
                "example.com/tier": "front"}},
            "spec": {"serviceAccountName": "web-sa", "containers": []}
        }))
        .unwrap();
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"team": "a", "kubernetes.io/metadata.name": "shop"}}
        }))
        .unwrap();
        let got = endpoint_labels(&pod, Some(&ns));
        let want: BTreeMap<String, String> = [
            ("app", "web"),
            ("example.com/tier", "front"),
            ("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "shop"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            ("io.cilium.k8s.policy.serviceaccount", "web-sa"),
            ("io.kubernetes.pod.namespace", "shop"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        // No service account named: "default"; labels pass the agent's
        // check (no reserved source can come from the API).
        let mut bare = pod.clone();
        bare.spec.as_mut().unwrap().service_account_name = None;
        let l = endpoint_labels(&bare, None);
        assert_eq!(l["io.cilium.k8s.policy.serviceaccount"], "default");
        ciliate_api::models::check_labels(&l).unwrap();
    }
}
