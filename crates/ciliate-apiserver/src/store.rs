//! The object store: every object under (resource, namespace, name), one
//! resourceVersion counter for all of them (etcd's revision), the recent
//! states and changes for consistent lists and watches from a past
//! resourceVersion, and a broadcast of changes to open watches.

use std::{collections::VecDeque, sync::Arc};

use imbl::OrdMap;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::{
    ApiError, patch,
    resources::{RESOURCES, Resource},
};

pub type Key = (usize, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub res: usize,
    pub ns: String,
    pub change: Change,
    pub obj: Arc<Value>,
    /// The object before a modification (a watch with a selector tells
    /// "stopped matching" from "changed").
    pub old: Option<Arc<Value>>,
}

pub struct Store {
    pub rv: u64,
    pub objects: OrdMap<Key, Arc<Value>>,
    /// (rv, the objects as of rv), oldest first; the first is `compacted`.
    snapshots: VecDeque<(u64, OrdMap<Key, Arc<Value>>)>,
    /// Changes after `compacted`, oldest first.
    log: VecDeque<Arc<Event>>,
    pub compacted: u64,
    history: usize,
    pub tx: broadcast::Sender<Arc<Event>>,
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // RFC 3339 in UTC, from days since the epoch (civil_from_days).
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A DNS-1123 subdomain (most names) or label (namespaces).
fn name_error(name: &str, label_only: bool) -> Option<String> {
    let max = if label_only { 63 } else { 253 };
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (!label_only && c == '.')
    };
    let ok = !name.is_empty()
        && name.len() <= max
        && name.chars().all(ok_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        if label_only {
            format!(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
                 and must start and end with an alphanumeric character (at most {max} characters)"
            )
        } else {
            format!(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
                 and must start and end with an alphanumeric character (at most {max} characters)"
            )
        }
    })
}

/// The object without what the server owns, for "did the spec change?".
fn spec_part(obj: &Value, res: &Resource) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if res.status {
            m.remove("status");
        }
    }
    v
}

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str).map(str::to_string)
}

impl Store {
    pub fn new(history: usize) -> Self {
        let (tx, _) = broadcast::channel(16_384);
        let objects = OrdMap::new();
        Self {
            rv: 1,
            snapshots: VecDeque::from([(1, objects.clone())]),
            objects,
            log: VecDeque::new(),
            compacted: 1,
            history: history.max(1),
            tx,
        }
    }

    /// What a restarted server starts from: the version and every object.
    pub fn save(&self) -> Value {
        let objects: Vec<Value> = self
            .objects
            .iter()
            .map(|((res, ns, _), o)| {
                serde_json::json!({"resource": RESOURCES[*res].qualified(), "namespace": ns, "object": &**o})
            })
            .collect();
        serde_json::json!({"resourceVersion": self.rv, "objects": objects})
    }

    /// A store holding what [`Store::save`] saved, at its version, with no
    /// history before it (as etcd after a compaction: a client watching
    /// from an older version gets 410 and relists).
    pub fn load(history: usize, saved: &Value) -> Result<Self, String> {
        let mut s = Self::new(history);
        s.rv = saved["resourceVersion"].as_u64().ok_or("no resourceVersion")?;
        for e in saved["objects"].as_array().ok_or("no objects")? {
            let q = e["resource"].as_str().unwrap_or_default();
            let res = RESOURCES
                .iter()
                .position(|r| r.qualified() == q)
                .ok_or_else(|| format!("resource {q:?} is not served"))?;
            let ns = e["namespace"].as_str().unwrap_or_default().to_string();
            let name = e["object"]["metadata"]["name"]
                .as_str()
                .ok_or_else(|| format!("a {q} without a name"))?
                .to_string();
            s.objects.insert((res, ns, name), Arc::new(e["object"].clone()));
        }
        s.snapshots = VecDeque::from([(s.rv, s.objects.clone())]);
        s.compacted = s.rv;
        Ok(s)
    }

    /// The objects as they were at `rv` (None: compacted away or future).
    pub fn at(&self, rv: u64) -> Option<OrdMap<Key, Arc<Value>>> {
        if rv < self.compacted || rv > self.rv {
            return None;
        }
        self.snapshots.iter().rev().find(|(r, _)| *r <= rv).map(|(_, o)| o.clone())
    }

    /// Changes after `rv`, if they are all still known.
    pub fn since(&self, rv: u64) -> Option<Vec<Arc<Event>>> {
        (rv >= self.compacted).then(|| self.log.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Forget every past state: a watch or list from before now gets 410.
    pub fn compact(&mut self) {
        self.snapshots = VecDeque::from([(self.rv, self.objects.clone())]);
        self.log.clear();
        self.compacted = self.rv;
    }

    fn commit(
        &mut self,
        res: usize,
        ns: &str,
        change: Change,
        obj: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        let ev = Arc::new(Event { rv: self.rv, res, ns: ns.to_string(), change, obj, old });
        self.snapshots.push_back((self.rv, self.objects.clone()));
        self.log.push_back(ev.clone());
        while self.snapshots.len() > self.history {
            self.snapshots.pop_front();
            self.compacted = self.snapshots.front().map(|s| s.0).unwrap_or(self.rv);
            while self.log.front().is_some_and(|e| e.rv <= self.compacted) {
                self.log.pop_front();
            }
        }
        let _ = self.tx.send(ev);
    }

    fn not_found(res: usize, name: &str) -> ApiError {
        let r = &RESOURCES[res];
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", r.qualified()))
            .details(name, r.plural)
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| Self::not_found(res, name))
    }

    fn check_namespace(&self, res: usize, ns: &str) -> Result<(), ApiError> {
        if RESOURCES[res].namespaced {
            let nsres =
                crate::resources::find("", "v1", "namespaces").expect("namespaces are served");
            let Some(n) = self.objects.get(&(nsres, String::new(), ns.to_string())) else {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("namespaces \"{ns}\" not found"),
                )
                .details(ns, "namespaces"));
            };
            if n.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check the body's apiVersion/kind, metadata.name and
    /// metadata.namespace against the request.
    fn check_body(
        res: usize,
        ns: &str,
        name: Option<&str>,
        obj: &Value,
    ) -> Result<String, ApiError> {
        let r = &RESOURCES[res];
        let bad = |m: String| ApiError::new(400, "BadRequest", m);
        if !obj.is_object() {
            return Err(bad("the body is not a JSON object".into()));
        }
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("Object 'Kind' is missing".into()))?;
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        if av != r.api_version() {
            return Err(bad(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                r.api_version()
            )));
        }
        if kind != r.kind {
            return Err(bad(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                r.kind
            )));
        }
        if let Some(bns) = meta(obj, "namespace")
            && !bns.is_empty()
            && r.namespaced
            && bns != ns
        {
            return Err(bad(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        let body_name = meta(obj, "name").unwrap_or_default();
        let name = match name {
            Some(n) if !body_name.is_empty() && body_name != n => {
                return Err(bad(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({n})"
                )));
            }
            Some(n) => n.to_string(),
            None => body_name,
        };
        if let Some(why) = name_error(&name, r.plural == "namespaces") {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": {why}",
                    r.kind
                ),
            )
            .details(&name, r.plural));
        }
        Ok(name)
    }

    pub fn create(&mut self, res: usize, ns: &str, mut obj: Value) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        if obj.get("metadata").is_some_and(|m| m.get("name").is_none())
            && let Some(g) = meta(&obj, "generateName")
        {
            let suffix: String =
                uuid::Uuid::new_v4().simple().to_string().chars().take(5).collect();
            obj["metadata"]["name"] = json!(format!("{g}{suffix}"));
        }
        let name = Self::check_body(res, ns, None, &obj)?;
        self.check_namespace(res, ns)?;
        let key = (res, ns.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", r.qualified()),
            )
            .details(&name, r.plural));
        }
        self.rv += 1;
        let m = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata is not an object"))?;
        m.insert("name".into(), json!(name));
        if r.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(now()));
        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        if r.status {
            obj.as_object_mut().expect("checked").remove("status");
        }
        if r.plural == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        let obj = Arc::new(obj);
        self.objects.insert(key, obj.clone());
        self.commit(res, ns, Change::Added, obj.clone(), None);
        Ok(obj)
    }

    /// PUT of the object (`status`: the status subresource).
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        obj: Value,
        status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        Self::check_body(res, ns, Some(name), &obj)?;
        let old = self.get(res, ns, name)?;
        let want = meta(&obj, "resourceVersion").unwrap_or_default();
        if want.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                    r.kind
                ),
            )
            .details(name, r.plural));
        }
        if meta(&old, "resourceVersion").as_deref() != Some(want.as_str()) {
            return Err(ApiError::conflict(r, name));
        }
        self.replace(res, ns, name, old, obj, status)
    }

    /// Put `obj` in place of `old` (already checked for preconditions).
    fn replace(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        old: Arc<Value>,
        mut obj: Value,
        status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        if status {
            // The status subresource changes only the status (and nothing
            // of metadata but what it had).
            let mut next = (*old).clone();
            next["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            obj = next;
        } else {
            // The server's fields are the server's.
            let m = obj["metadata"]
                .as_object_mut()
                .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata is not an object"))?;
            for f in
                ["uid", "creationTimestamp", "generation", "deletionTimestamp", "namespace", "name"]
            {
                match old["metadata"].get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            if r.status {
                match old.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        obj.as_object_mut().expect("object").remove("status");
                    }
                }
            }
        }
        if r.plural == "namespaces" {
            // The server keeps this label (the real one since 1.21).
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if obj == *old {
            return Ok(old);
        }
        if spec_part(&obj, r) != spec_part(&old, r) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = (res, ns.to_string(), name.to_string());
        // An object being deleted goes when its last finalizer does.
        let finalizers_gone =
            obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if obj.pointer("/metadata/deletionTimestamp").is_some() && finalizers_gone {
            let obj = Arc::new(obj);
            self.objects.remove(&key);
            self.commit(res, ns, Change::Deleted, obj.clone(), Some(old));
            return Ok(obj);
        }
        let obj = Arc::new(obj);
        self.objects.insert(key, obj.clone());
        self.commit(res, ns, Change::Modified, obj.clone(), Some(old));
        Ok(obj)
    }

    pub fn patch(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &Value,
        status: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        let ct = content_type.split(';').next().unwrap_or_default().trim();
        let old = match self.get(res, ns, name) {
            Ok(o) => o,
            // Server-side apply creates what is not there.
            Err(_) if ct == "application/apply-patch+yaml" && !status => {
                return self.create(res, ns, body.clone());
            }
            Err(e) => return Err(e),
        };
        let bad = |m: String| ApiError::new(422, "Invalid", m);
        let mut next = (*old).clone();
        match ct {
            "application/json-patch+json" => next = patch::json_patch(&old, body).map_err(bad)?,
            "application/merge-patch+json" | "application/apply-patch+yaml" => {
                patch::merge(&mut next, body)
            }
            "application/strategic-merge-patch+json" => {
                if let Some(d) = patch::strategic_directive(body) {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "strategic merge patch directive {d} is not supported by this test API server"
                        ),
                    ));
                }
                patch::merge(&mut next, body)
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                    ),
                ));
            }
        }
        // A resourceVersion in the patch is a precondition.
        let want = meta(&next, "resourceVersion");
        let have = meta(&old, "resourceVersion");
        if want != have {
            return Err(ApiError::conflict(r, name));
        }
        Self::check_body(res, ns, Some(name), &next)?;
        self.replace(res, ns, name, old, next, status)
    }

    /// The namespace controller's part of deleting a namespace: everything
    /// in it, then the namespace (if it is still Terminating).
    pub fn finish_namespace(&mut self, name: &str) {
        let nsres = crate::resources::find("", "v1", "namespaces").expect("namespaces are served");
        let terminating = self
            .objects
            .get(&(nsres, String::new(), name.to_string()))
            .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some());
        if !terminating {
            return;
        }
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|(rr, n, _)| n == name && RESOURCES[*rr].namespaced)
            .cloned()
            .collect();
        for (rr, n, nm) in keys {
            let _ = self.delete(rr, &n, &nm, &Value::Null);
        }
        let Ok(old) = self.get(nsres, "", name) else { return };
        self.rv += 1;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let gone = Arc::new(gone);
        self.objects.remove(&(nsres, String::new(), name.to_string()));
        self.commit(nsres, "", Change::Deleted, gone, Some(old));
    }

    /// DELETE: gone at once, or (with finalizers) marked and gone when they
    /// are. `preconditions`: uid / resourceVersion that must still hold.
    pub fn delete(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[res];
        let old = self.get(res, ns, name)?;
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str)
                && meta(&old, field).as_deref() != Some(want)
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        r.qualified(),
                        meta(&old, field).unwrap_or_default()
                    ),
                )
                .details(name, r.plural));
            }
        }
        // A namespace is Terminating first; the namespace controller
        // (`finish_namespace`, a moment later) deletes what is in it, then it.
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers || r.plural == "namespaces" {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut next = (*old).clone();
            next["metadata"]["deletionTimestamp"] = json!(now());
            if r.plural == "namespaces" {
                next["status"] = json!({"phase": "Terminating"});
            }
            self.rv += 1;
            next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            let next = Arc::new(next);
            self.objects.insert((res, ns.to_string(), name.to_string()), next.clone());
            self.commit(res, ns, Change::Modified, next.clone(), Some(old));
            return Ok(next);
        }
        self.rv += 1;
        // The DELETED event carries the object at the deletion's version.
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let gone = Arc::new(gone);
        self.objects.remove(&(res, ns.to_string(), name.to_string()));
        self.commit(res, ns, Change::Deleted, gone.clone(), Some(old));
        Ok(gone)
    }
}
