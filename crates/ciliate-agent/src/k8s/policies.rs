//! Policies from the Kubernetes API (Cilium's CNP/CCNP/NetworkPolicy
//! watchers): each object parsed as `policy import` parses it, its rules
//! in force all or nothing, refusals reported, deletions and objects gone
//! while a watch was down removed.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    core::DynamicObject,
    runtime::{WatchStreamExt as _, watcher},
};

use super::types::PolicyNodeStatus;
use crate::{api::AppState, endpoint::Datapath};

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
    // Every event already waiting comes in one chunk, so that a burst
    // (a relist, `kubectl apply` of many objects) is put in force in one
    // policy change: one regeneration rather than one per object.
    let mut stream =
        watcher(api, watcher::Config::default()).default_backoff().ready_chunks(1024).boxed();
    let derived = format!("{DERIVED_FROM}={kind}");
    // What was last applied per source: (uid, generation).
    let mut applied: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut listed: Option<std::collections::BTreeSet<String>> = None;
    let f = Follower { st: &st, client: &client, node: &node, ar: &ar, kind, derived: &derived };
    while let Some(chunk) = stream.next().await {
        // Objects to apply, in order, the last version of each.
        let mut batch: Vec<DynamicObject> = Vec::new();
        for ev in chunk {
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
                    applied.insert(source.clone(), version);
                    batch.retain(|b| source_of(kind, b) != source);
                    batch.push(o);
                }
                Event::Delete(o) => {
                    f.apply(std::mem::take(&mut batch)).await;
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
                    f.apply(std::mem::take(&mut batch)).await;
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
        f.apply(batch).await;
    }
}

/// One policy kind's follower: what applying and reporting need.
struct Follower<'a, D: Datapath + 'static> {
    st: &'a AppState<D>,
    client: &'a Client,
    node: &'a str,
    ar: &'a kube::discovery::ApiResource,
    kind: &'static str,
    derived: &'a str,
}

impl<D: Datapath + 'static> Follower<'_, D> {
    /// Put `objects` in force, each all or nothing: those that parse go in
    /// as one policy change; if that change is refused (a capacity
    /// refusal), each goes alone, so a refusal is its own object's. Each
    /// object's outcome is reported.
    async fn apply(&self, objects: Vec<DynamicObject>) {
        if objects.is_empty() {
            return;
        }
        let mut parsed: Vec<(DynamicObject, Vec<crate::policy::Rule>)> = Vec::new();
        for o in objects {
            match self.rules_of(&o) {
                Ok(rules) => parsed.push((o, rules)),
                Err(e) => self.report(&o, Err(e)).await,
            }
        }
        let all: Vec<crate::policy::Rule> =
            parsed.iter().flat_map(|(_, r)| r.iter().cloned()).collect();
        if parsed.len() > 1 {
            let r =
                flat(self.st.endpoints.write(move |e| e.import_policy(all), |e| e.view()).await);
            if let Ok(rev) = r {
                tracing::info!(
                    subsystem = "k8s",
                    kind = self.kind,
                    policies = parsed.len(),
                    revision = rev,
                    "policies from the API in force"
                );
                for (o, _) in &parsed {
                    self.report(o, Ok(rev)).await;
                }
                return;
            }
        }
        for (o, rules) in parsed {
            let r =
                flat(self.st.endpoints.write(move |e| e.import_policy(rules), |e| e.view()).await);
            if let Ok(rev) = &r {
                tracing::info!(subsystem = "k8s", policy = %source_of(self.kind, &o), revision = rev, "policy from the API in force");
            }
            self.report(&o, r).await;
        }
    }

    /// Object `o`'s rules as `policy import` would parse it, labelled
    /// with where they came from.
    fn rules_of(&self, o: &DynamicObject) -> Result<Vec<crate::policy::Rule>, String> {
        let mut o = o.clone();
        // List items may come without their type.
        o.types = Some(kube::core::TypeMeta {
            api_version: self.ar.api_version.clone(),
            kind: self.kind.into(),
        });
        let text = serde_json::to_string(&o).map_err(|e| e.to_string())?;
        let mut rules = crate::policy::parse(&text).map_err(|e| e.to_string())?;
        let uid = format!(
            "k8s:io.cilium.k8s.policy.uid={}",
            o.metadata.uid.as_deref().unwrap_or_default()
        );
        for r in &mut rules {
            r.labels.push(self.derived.to_string());
            r.labels.push(uid.clone());
            r.labels.sort();
        }
        Ok(rules)
    }

    async fn report(&self, o: &DynamicObject, result: Result<u64, String>) {
        report(self.client, self.node, self.ar, self.kind, o, result).await;
    }
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
        Ok(rev) => PolicyNodeStatus {
            ok: true,
            enforcing: true,
            local_policy_revision: Some(*rev),
            last_updated: now_rfc3339(),
            error: None,
        },
        Err(e) => PolicyNodeStatus {
            error: Some(e.clone()),
            last_updated: now_rfc3339(),
            ..Default::default()
        },
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
