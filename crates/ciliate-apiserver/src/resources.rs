//! The resources this API server serves, and the discovery documents
//! (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`) kubectl reads to
//! find them.

use serde_json::{Value, json};

pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: the main endpoint ignores `status`, the
    /// subresource changes only it (and `generation` follows spec alone).
    pub status: bool,
    pub short: &'static [&'static str],
    /// Field selectors beyond metadata.name / metadata.namespace.
    pub fields: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// How error messages name it: `pods`, `ciliumnodes.cilium.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

// One row of the table below, in the order of its columns.
#[allow(clippy::too_many_arguments)]
const fn r(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    short: &'static [&'static str],
    fields: &'static [&'static str],
) -> Resource {
    Resource { group, version, plural, singular, kind, namespaced, status, short, fields }
}

pub const RESOURCES: &[Resource] = &[
    r("", "v1", "namespaces", "namespace", "Namespace", false, true, &["ns"], &["status.phase"]),
    r(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        true,
        &["po"],
        &["spec.nodeName", "spec.serviceAccountName", "status.phase", "status.podIP"],
    ),
    r(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        true,
        &["svc"],
        &["spec.clusterIP", "spec.type"],
    ),
    r("", "v1", "nodes", "node", "Node", false, true, &["no"], &["spec.unschedulable"]),
    r(
        "",
        "v1",
        "events",
        "event",
        "Event",
        true,
        false,
        &["ev"],
        &["involvedObject.name", "reason", "type"],
    ),
    r("", "v1", "configmaps", "configmap", "ConfigMap", true, false, &["cm"], &[]),
    r("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, false, &["sa"], &[]),
    r(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        false,
        &[],
        &[],
    ),
    r(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "networkpolicy",
        "NetworkPolicy",
        true,
        false,
        &["netpol"],
        &[],
    ),
    r("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, false, &[], &[]),
    r(
        "events.k8s.io",
        "v1",
        "events",
        "event",
        "Event",
        true,
        false,
        &["ev"],
        &["regarding.name", "reason", "type"],
    ),
    r(
        "cilium.io",
        "v2",
        "ciliumnetworkpolicies",
        "ciliumnetworkpolicy",
        "CiliumNetworkPolicy",
        true,
        true,
        &["cnp", "ciliumnp"],
        &[],
    ),
    r(
        "cilium.io",
        "v2",
        "ciliumclusterwidenetworkpolicies",
        "ciliumclusterwidenetworkpolicy",
        "CiliumClusterwideNetworkPolicy",
        false,
        true,
        &["ccnp"],
        &[],
    ),
    r(
        "cilium.io",
        "v2",
        "ciliumendpoints",
        "ciliumendpoint",
        "CiliumEndpoint",
        true,
        true,
        &["cep", "ciliumep"],
        &[],
    ),
    r(
        "cilium.io",
        "v2",
        "ciliumidentities",
        "ciliumidentity",
        "CiliumIdentity",
        false,
        false,
        &["ciliumid"],
        &[],
    ),
    r(
        "cilium.io",
        "v2",
        "ciliumnodes",
        "ciliumnode",
        "CiliumNode",
        false,
        true,
        &["cn", "ciliumn"],
        &[],
    ),
];

/// The resource at `group`/`version` with this plural name.
pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

fn groups() -> Vec<(&'static str, &'static str)> {
    let mut g: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !g.contains(&(r.group, r.version)) {
            g.push((r.group, r.version));
        }
    }
    g
}

pub fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
}

fn group_doc(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(|(g, v)| group_doc(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut doc = group_doc(g, v);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        list.push(json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "shortNames": r.short,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        }));
        if r.status {
            list.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}
