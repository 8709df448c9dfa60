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
    core::DynamicObject,
    runtime::{WatchStreamExt as _, reflector, reflector::ObjectRef, watcher},
};
use tokio::sync::{mpsc, watch};

use crate::{api::AppState, endpoint::Datapath};

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
            Self::Config { .. } => 500,
            Self::Api { .. } => 503,
        }
    }
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
        (Arc::new(Self { client, pods, namespaces }), rx)
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
    /// pod is not in them).
    fn stored_labels(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let pod = self.pods.get(&ObjectRef::new(name).within(namespace))?;
        Some(endpoint_labels(&pod, self.namespace(namespace).as_deref()))
    }
}

/// Follow the watchers' changes: an endpoint whose pod's labels (or its
/// namespace's) changed gets them, and with them its new identity.
pub async fn follow<D: Datapath + 'static>(
    st: Arc<AppState<D>>,
    k8s: Arc<K8s>,
    mut changes: mpsc::UnboundedReceiver<Touched>,
) {
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

/// The policy kinds the agent takes from the API:
/// (group, version, kind, plural).
pub const POLICY_KINDS: [(&str, &str, &str, &str); 3] = [
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies"),
    ("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies"),
    ("cilium.io", "v2", "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies"),
];

/// The label every rule taken from the API carries (Cilium's), with the
/// kind of its object: how a resync tells them from imported ones.
pub const DERIVED_FROM: &str = "k8s:io.cilium.k8s.policy.derived-from";

fn source_of(kind: &str, o: &DynamicObject) -> String {
    let ns = o.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("-");
    format!("{kind}/{ns}/{}", o.metadata.name.as_deref().unwrap_or_default())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Follow the policies of one kind in the API into the policy repository:
/// an object's rules replace the ones of its earlier version, all or
/// nothing; a refused object (the errors `policy import` gives) leaves
/// what was in force and is reported (a Warning event, and on Cilium's
/// kinds its status for this node); a deleted object's rules go; after
/// every (re)list, rules of objects no longer in the API go.
pub async fn follow_policies<D: Datapath + 'static>(
    st: Arc<AppState<D>>,
    client: Client,
    node: String,
    (group, version, kind, plural): (&'static str, &'static str, &'static str, &'static str),
) {
    use kube::{core::GroupVersionKind, discovery::ApiResource, runtime::watcher::Event};
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let derived = format!("{DERIVED_FROM}={kind}");
    // What was last applied per source: (uid, generation).
    let mut applied: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut listed: Option<std::collections::BTreeSet<String>> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(subsystem = "k8s", kind, error = %e, "watching policies");
                continue;
            }
        };
        match ev {
            Event::Init => listed = Some(Default::default()),
            Event::InitApply(o) | Event::Apply(o) => {
                let source = source_of(kind, &o);
                if let Some(l) = listed.as_mut() {
                    l.insert(source.clone());
                }
                let version = (
                    o.metadata.uid.clone().unwrap_or_default(),
                    o.metadata.generation.unwrap_or(0),
                );
                if applied.get(&source) == Some(&version) {
                    continue;
                }
                applied.insert(source, version);
                let result = apply_policy(&st, ar.api_version.as_str(), kind, &derived, &o).await;
                report(&client, &node, &ar, kind, &o, result).await;
            }
            Event::Delete(o) => {
                let source = source_of(kind, &o);
                applied.remove(&source);
                let r = st
                    .endpoints
                    .write(move |e| e.delete_policy_sources(&[source]), |e| e.view())
                    .await;
                if let Err(e) = flat(r) {
                    tracing::warn!(subsystem = "k8s", kind, error = %e, "removing a deleted policy");
                }
            }
            Event::InitDone => {
                let Some(seen) = listed.take() else { continue };
                let gone: Vec<String> = st
                    .endpoints
                    .snapshot()
                    .policy
                    .rules
                    .iter()
                    .filter(|r| r.labels.contains(&derived) && !seen.contains(&r.source))
                    .map(|r| r.source.clone())
                    .collect();
                applied.retain(|s, _| seen.contains(s));
                if !gone.is_empty() {
                    tracing::info!(subsystem = "k8s", kind, gone = ?gone, "policies no longer in the API");
                    let r = st
                        .endpoints
                        .write(move |e| e.delete_policy_sources(&gone), |e| e.view())
                        .await;
                    if let Err(e) = flat(r) {
                        tracing::warn!(subsystem = "k8s", kind, error = %e, "removing policies gone from the API");
                    }
                }
            }
        }
    }
}

/// Parse object `o` as `policy import` would and put its rules in force.
/// The revision, or why not.
async fn apply_policy<D: Datapath + 'static>(
    st: &AppState<D>,
    api_version: &str,
    kind: &str,
    derived: &str,
    o: &DynamicObject,
) -> Result<u64, String> {
    let mut o = o.clone();
    // List items may come without their type.
    o.types = Some(kube::core::TypeMeta { api_version: api_version.into(), kind: kind.into() });
    let text = serde_json::to_string(&o).map_err(|e| e.to_string())?;
    let mut rules = crate::policy::parse(&text).map_err(|e| e.to_string())?;
    let uid =
        format!("k8s:io.cilium.k8s.policy.uid={}", o.metadata.uid.as_deref().unwrap_or_default());
    for r in &mut rules {
        r.labels.push(derived.to_string());
        r.labels.push(uid.clone());
        r.labels.sort();
    }
    let source = source_of(kind, &o);
    let rev = flat(st.endpoints.write(move |e| e.import_policy(rules), |e| e.view()).await)?;
    tracing::info!(subsystem = "k8s", policy = %source, revision = rev, "policy from the API in force");
    Ok(rev)
}

/// An actor call's two layers of failure as one message.
fn flat<T, A: std::fmt::Display, B: std::fmt::Display>(
    r: Result<Result<T, B>, A>,
) -> Result<T, String> {
    r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// Tell the cluster how object `o` fared on this node: a Warning event
/// when it was refused, and on Cilium's kinds `status.nodes.<node>`
/// (Cilium's per-node policy status: ok, error, enforcing, revision).
async fn report(
    client: &Client,
    node: &str,
    ar: &kube::discovery::ApiResource,
    kind: &str,
    o: &DynamicObject,
    result: Result<u64, String>,
) {
    let name = o.metadata.name.clone().unwrap_or_default();
    let ns = o.metadata.namespace.clone().filter(|n| !n.is_empty());
    if let Err(e) = &result {
        tracing::warn!(subsystem = "k8s", policy = %source_of(kind, o), error = %e, "policy from the API refused; the one in force stays");
        let event: k8s_openapi::api::core::v1::Event = match serde_json::from_value(
            serde_json::json!({
                "metadata": {"generateName": format!("{name}."), "namespace": ns.clone().unwrap_or_else(|| "default".into())},
                "involvedObject": {"apiVersion": ar.api_version, "kind": kind, "name": name,
                    "namespace": ns, "uid": o.metadata.uid},
                "reason": "PolicyRejected", "type": "Warning",
                "message": format!("ciliate-agent on {node}: {e}"),
                "source": {"component": "ciliate-agent", "host": node},
                "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1,
            }),
        ) {
            Ok(ev) => ev,
            Err(_) => return,
        };
        let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(
            client.clone(),
            event.metadata.namespace.as_deref().unwrap_or("default"),
        );
        if let Err(err) = events.create(&Default::default(), &event).await {
            tracing::warn!(subsystem = "k8s", error = %err, "reporting a refused policy as an event");
        }
    }
    if ar.group != "cilium.io" {
        return;
    }
    let status = match &result {
        Ok(rev) => {
            serde_json::json!({"ok": true, "enforcing": true, "localPolicyRevision": rev, "lastUpdated": now_rfc3339()})
        }
        Err(e) => {
            serde_json::json!({"ok": false, "enforcing": false, "error": e, "lastUpdated": now_rfc3339()})
        }
    };
    let patch = serde_json::json!({"status": {"nodes": {node: status}}});
    let api = match &ns {
        Some(n) => Api::<DynamicObject>::namespaced_with(client.clone(), n, ar),
        None => Api::<DynamicObject>::all_with(client.clone(), ar),
    };
    let pp = kube::api::PatchParams::default();
    if let Err(e) = api.patch_status(&name, &pp, &kube::api::Patch::Merge(&patch)).await {
        tracing::warn!(subsystem = "k8s", error = %e, "writing the policy's status");
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
