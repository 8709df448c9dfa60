//! A Kubernetes API server for tests and the lab.
//!
//! No Kubernetes API server runs on the machines Ciliate is built on, so the
//! agent's and the operator's Kubernetes code is tested against this one. It
//! keeps objects in memory and answers as the real server does wherever a
//! client can tell (the API conventions):
//! - one resourceVersion for every object (etcd's revision), in every
//!   object and list; a consistent list at a past version
//!   (`resourceVersionMatch=Exact`, `limit`/`continue` pages) while that
//!   version is kept, `410 Expired` after;
//! - watches from a resourceVersion (ADDED / MODIFIED / DELETED, an ERROR
//!   event with a 410 Status when the version was compacted away),
//!   BOOKMARKs when asked (`allowWatchBookmarks`), `sendInitialEvents`,
//!   `timeoutSeconds`; with a selector, an object that stops matching
//!   arrives as DELETED and one that starts as ADDED;
//! - label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`) and the
//!   field selectors each resource supports (`field label not supported`
//!   for others);
//! - create (uid, creationTimestamp, generation 1, `generateName`, 409
//!   AlreadyExists, 404 for a missing namespace, 422 for a bad name),
//!   update (409 Conflict on a stale resourceVersion, 422 without one; a
//!   no-op update keeps the version; generation moves with the spec only),
//!   the status subresource (the main endpoint ignores status, `/status`
//!   changes only status), patch (merge, JSON, apply), delete (preconditions,
//!   finalizers, a namespace takes its objects with it);
//! - the discovery documents kubectl reads;
//! - the namespaces every cluster starts with (default, kube-system,
//!   kube-public, kube-node-lease); every namespace carries the label
//!   `kubernetes.io/metadata.name` (its name), which the server keeps.
//!
//! For tests, `POST /ciliate-test/compact` forgets every past version (a
//! later watch or list from one gets 410), optionally closing every open
//! watch (`?close-watches=true`); `POST /ciliate-test/hold-watches?on=true`
//! makes new watches wait until `on=false` (clients of a restarting
//! server); `GET /ciliate-test/stats` counts the
//! open watches per resource and the 410 answers given; and
//! `GET /ciliate-test/requests` lists every kind of request served as RBAC
//! sees it (bearer token, verb, group, resource or `resource/status`,
//! namespace), which the deployment manifest's roles are checked against.

pub mod patch;
pub mod resources;
pub mod selector;
pub mod server;
pub mod store;

use serde_json::{Value, json};

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    details: Option<(String, String)>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    pub fn details(mut self, name: &str, kind: &str) -> Self {
        self.details = Some((name.to_string(), kind.to_string()));
        self
    }

    pub fn conflict(r: &resources::Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                r.qualified()
            ),
        )
        .details(name, r.plural)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            s["details"] = json!({"name": name, "kind": kind});
        }
        s
    }
}

/// A kubeconfig whose one context points at `server` (`http://addr`), no
/// credentials.
pub fn kubeconfig(server: &str) -> String {
    kubeconfig_as(server, None)
}

/// [`kubeconfig`] for a client that sends `token` as its bearer token
/// (the server records its requests under it: `/ciliate-test/requests`).
pub fn kubeconfig_as(server: &str, token: Option<&str>) -> String {
    let user = match token {
        Some(t) => format!("\n    token: {t:?}"),
        None => " {}".into(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ciliate\n  cluster:\n    server: {server}\n\
         contexts:\n- name: ciliate\n  context:\n    cluster: ciliate\n    user: ciliate\n\
         current-context: ciliate\nusers:\n- name: ciliate\n  user:{user}\n"
    )
}
