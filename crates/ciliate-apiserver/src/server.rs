//! The HTTP side: paths to resources, lists, watches and writes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    ApiError,
    resources::{self, RESOURCES},
    selector::{FieldSelector, LabelSelector},
    store::{Change, Event, Store},
};

/// Options of a server.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many past versions stay listable and watchable.
    pub history: usize,
    /// How often an open watch that asked for them gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// A file the objects are kept in (written after every change, read
    /// at start): the server can be restarted as a real one is. `None`:
    /// memory only.
    pub state: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self { history: 10_000, bookmark_interval: Duration::from_secs(5), state: None }
    }
}

pub struct Shared {
    pub store: Mutex<Store>,
    opts: Options,
    /// Moved to close every open watch.
    close: watch::Sender<u64>,
    /// While true, new watches wait (as clients of a restarting server do).
    hold: watch::Sender<bool>,
    watches: Mutex<BTreeMap<String, usize>>,
    /// 410 answers given (lists and watches).
    expired: std::sync::atomic::AtomicU64,
    /// Every kind of request served, as RBAC sees it (what a role must
    /// allow its user).
    requests: Mutex<std::collections::BTreeSet<Access>>,
    /// Held while the state file is written (writes in order).
    saving: Mutex<()>,
}

impl Shared {
    /// Write the objects to the state file, if there is one: a temporary
    /// file renamed over it, so a crash leaves the old or the new one.
    fn persist(&self) {
        let Some(path) = &self.opts.state else { return };
        let _order = self.saving.lock().expect("save lock");
        let saved = self.store.lock().expect("store lock").save();
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, serde_json::to_vec(&saved).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::error!(path = %path.display(), error = %e, "writing the state file");
        }
    }
}

/// One kind of request as RBAC authorizes it: who (the bearer token the
/// client sent; `admin` without one), the verb, the API group, the
/// resource (`<plural>/status` for the subresource) and the namespace
/// (empty: cluster-wide).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Access {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: String,
}

/// The RBAC verb of `method` on `t` (`watch` from the query).
fn verb(method: &Method, t: &Target, q: &HashMap<String, String>) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match (method.as_str(), t.name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

pub type AppState = Arc<Shared>;

/// The namespaces every cluster has from the start.
pub const SYSTEM_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

pub fn new_state(opts: Options) -> AppState {
    let mut store = Store::new(opts.history);
    let nsres = resources::find("", "v1", "namespaces").expect("namespaces are served");
    for ns in SYSTEM_NAMESPACES {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        store.create(nsres, "", obj).expect("a new store takes the system namespaces");
    }
    let st = shared(store, opts);
    st.persist();
    st
}

/// [`new_state`], or with `opts.state` naming a file that exists, the
/// server it saved (its objects at its resourceVersion).
pub fn open_state(opts: Options) -> Result<AppState, String> {
    let Some(path) = opts.state.clone().filter(|p| p.exists()) else {
        return Ok(new_state(opts));
    };
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let saved: Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let store =
        Store::load(opts.history, &saved).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(shared(store, opts))
}

fn shared(store: Store, opts: Options) -> AppState {
    Arc::new(Shared {
        store: Mutex::new(store),
        opts,
        close: watch::channel(0).0,
        hold: watch::channel(false).0,
        watches: Mutex::new(BTreeMap::new()),
        expired: Default::default(),
        requests: Default::default(),
        saving: Mutex::new(()),
    })
}

pub fn router(state: AppState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

fn json_response(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap_or_default()))
        .expect("a valid response")
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// Where a request points: the resource, its namespace, a name and whether
/// it is the status subresource.
struct Target {
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn not_found() -> ApiError {
    ApiError::new(404, "NotFound", "the server could not find the requested resource")
}

fn target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let find = |plural: &str| resources::find(group, version, plural).ok_or_else(not_found);
    let ns_res = |p: &str| find(p).map(|r| RESOURCES[r].namespaced);
    let t = |res, ns: Option<&str>, name: Option<&str>, status| Target {
        res,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        status,
    };
    Ok(match rest {
        // Namespaced resources under a namespace (not "namespaces/<n>/status").
        ["namespaces", ns, plural, tail @ ..]
            if *plural != "status" && group_has_namespaces(group, version, plural) =>
        {
            let res = find(plural)?;
            if !RESOURCES[res].namespaced {
                return Err(not_found());
            }
            match tail {
                [] => t(res, Some(ns), None, false),
                [name] => t(res, Some(ns), Some(name), false),
                [name, "status"] if RESOURCES[res].status => t(res, Some(ns), Some(name), true),
                _ => return Err(not_found()),
            }
        }
        [plural] => t(find(plural)?, None, None, false),
        [plural, name] if !ns_res(plural)? => t(find(plural)?, Some(""), Some(name), false),
        [plural, name, "status"] if !ns_res(plural)? && RESOURCES[find(plural)?].status => {
            t(find(plural)?, Some(""), Some(name), true)
        }
        _ => return Err(not_found()),
    })
}

/// Is `plural` served at this group/version (so that "namespaces/x/pods"
/// is read as pods in x)?
fn group_has_namespaces(group: &str, version: &str, plural: &str) -> bool {
    resources::find(group, version, plural).is_some()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (unescape(k), unescape(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unescape(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    State(st): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match route(&st, &method, &uri, &headers, &body).await {
        Ok(r) => {
            let write = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
            if write.contains(&method) && !uri.path().starts_with("/ciliate-test/") {
                st.persist();
            }
            r
        }
        Err(e) => {
            if e.code == 410 {
                st.expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            error_response(&e)
        }
    }
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("yaml") {
        serde_yaml_ng::from_slice(body).map_err(|e| {
            ApiError::new(400, "BadRequest", format!("the body is not valid YAML: {e}"))
        })
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(400, "BadRequest", format!("the body is not valid JSON: {e}"))
        })
    }
}

async fn route(
    st: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let path: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let q = query(uri);
    let ok = |v: Value| Ok(json_response(200, &v));
    match path.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok(Response::builder().status(200).body(Body::from("ok")).expect("response"));
        }
        ["version"] => {
            return ok(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-ciliate-apiserver",
                "platform": "linux/amd64"}),
            );
        }
        ["api"] => return ok(resources::api_versions()),
        ["apis"] => return ok(resources::api_group_list()),
        ["api", "v1"] => {
            return resources::resource_list("", "v1").map_or_else(|| Err(not_found()), ok);
        }
        ["apis", g] => return resources::api_group(g).map_or_else(|| Err(not_found()), ok),
        ["apis", g, v] => {
            return resources::resource_list(g, v).map_or_else(|| Err(not_found()), ok);
        }
        ["ciliate-test", "compact"] if method == Method::POST => {
            st.store.lock().expect("store lock").compact();
            if q.get("close-watches").is_some_and(|v| v == "true") {
                st.close.send_modify(|g| *g += 1);
            }
            return ok(json!({}));
        }
        ["ciliate-test", "hold-watches"] if method == Method::POST => {
            st.hold.send_replace(q.get("on").is_some_and(|v| v == "true"));
            return ok(json!({}));
        }
        ["ciliate-test", "requests"] => {
            let seen = st.requests.lock().expect("request log").clone();
            return ok(json!(seen));
        }
        ["ciliate-test", "stats"] => {
            let w = st.watches.lock().expect("watch counts").clone();
            return ok(
                json!({"watches": w, "expired": st.expired.load(std::sync::atomic::Ordering::Relaxed)}),
            );
        }
        _ => {}
    }
    let t = match path.as_slice() {
        ["api", "v1", rest @ ..] => target("", "v1", rest)?,
        ["apis", g, v, rest @ ..] => target(g, v, rest)?,
        _ => return Err(not_found()),
    };
    let r = &RESOURCES[t.res];
    let ns = t.ns.clone().unwrap_or_default();
    let user = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("admin");
    st.requests.lock().expect("request log").insert(Access {
        user: user.to_string(),
        verb: verb(method, &t, &q).into(),
        group: r.group.into(),
        resource: if t.status { format!("{}/status", r.plural) } else { r.plural.into() },
        namespace: ns.clone(),
    });
    match (method.clone(), &t.name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let mut hold = st.hold.subscribe();
            while *hold.borrow_and_update() {
                let _ = hold.changed().await;
            }
            watch_stream(st, &t, &q)
        }
        (Method::GET, None) => ok(list(st, &t, &q)?),
        (Method::GET, Some(name)) => {
            ok((*st.store.lock().expect("store lock").get(t.res, &ns, name)?).clone())
        }
        (Method::POST, None) => {
            if r.namespaced && t.ns.is_none() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "create a namespaced object under its namespace",
                ));
            }
            let obj = parse_body(headers, body)?;
            let created = st.store.lock().expect("store lock").create(t.res, &ns, obj)?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, Some(name)) => {
            let obj = parse_body(headers, body)?;
            ok((*st.store.lock().expect("store lock").update(t.res, &ns, name, obj, t.status)?)
                .clone())
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let p = parse_body(headers, body)?;
            ok((*st
                .store
                .lock()
                .expect("store lock")
                .patch(t.res, &ns, name, &ct, &p, t.status)?)
            .clone())
        }
        (Method::DELETE, Some(name)) if !t.status => {
            let opts = if body.is_empty() { Value::Null } else { parse_body(headers, body)? };
            let pre = opts.get("preconditions").cloned().unwrap_or(Value::Null);
            let gone =
                (*st.store.lock().expect("store lock").delete(t.res, &ns, name, &pre)?).clone();
            if r.plural == "namespaces" {
                let (st, name) = (st.clone(), name.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    st.store.lock().expect("store lock").finish_namespace(&name);
                    st.persist();
                });
            }
            ok(gone)
        }
        (Method::DELETE, None) => {
            let (ls, fs) = selectors(&t, &q)?;
            let mut store = st.store.lock().expect("store lock");
            let names: Vec<(String, String)> = store
                .objects
                .iter()
                .filter(|((rr, n, _), o)| {
                    *rr == t.res
                        && t.ns.as_ref().is_none_or(|x| x == n)
                        && ls.matches(o.pointer("/metadata/labels"))
                        && fs.matches(o)
                })
                .map(|((_, n, nm), _)| (n.clone(), nm.clone()))
                .collect();
            let mut items = Vec::new();
            for (n, nm) in names {
                items.push((*store.delete(t.res, &n, &nm, &Value::Null)?).clone());
            }
            ok(json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported here"))),
    }
}

fn selectors(
    t: &Target,
    q: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let bad = |e: String| ApiError::new(400, "BadRequest", e);
    let ls =
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)).map_err(bad)?;
    let fs = FieldSelector::parse(
        q.get("fieldSelector").map_or("", String::as_str),
        RESOURCES[t.res].fields,
    )
    .map_err(bad)?;
    Ok((ls, fs))
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::new(400, "BadRequest", format!("invalid resource version {s:?}")))
}

fn list(st: &AppState, t: &Target, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let r = &RESOURCES[t.res];
    let (ls, fs) = selectors(t, q)?;
    let store = st.store.lock().expect("store lock");
    let rv_param = q.get("resourceVersion").filter(|s| !s.is_empty());
    let (snap_rv, start) = if let Some(c) = q.get("continue").filter(|s| !s.is_empty()) {
        let tok: Value = base64::engine::general_purpose::STANDARD
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ApiError::new(400, "BadRequest", "invalid continue token"))?;
        let rv = tok["rv"].as_u64().unwrap_or(0);
        let start = (
            tok["ns"].as_str().unwrap_or("").to_string(),
            tok["name"].as_str().unwrap_or("").to_string(),
        );
        (rv, Some(start))
    } else if q.get("resourceVersionMatch").is_some_and(|m| m == "Exact") {
        (parse_rv(rv_param.map_or("", String::as_str))?, None)
    } else {
        if let Some(v) = rv_param {
            parse_rv(v)?;
        }
        (store.rv, None)
    };
    let objects = store.at(snap_rv).ok_or_else(|| {
        if start.is_some() {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
        } else {
            ApiError::expired(format!("too old resource version: {snap_rv} ({})", store.compacted))
        }
    })?;
    let limit: usize =
        q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut next = None;
    for ((rr, n, nm), o) in objects.iter() {
        if *rr != t.res || t.ns.as_ref().is_some_and(|x| x != n) {
            continue;
        }
        if let Some((sn, snm)) = &start
            && (n, nm) <= (sn, snm)
        {
            continue;
        }
        if !ls.matches(o.pointer("/metadata/labels")) || !fs.matches(o) {
            continue;
        }
        if items.len() == limit {
            next = Some(());
            break;
        }
        items.push((**o).clone());
    }
    let mut meta = json!({"resourceVersion": snap_rv.to_string()});
    if next.is_some()
        && let Some(last) = items.last()
    {
        let tok = json!({"rv": snap_rv, "ns": last["metadata"]["namespace"].as_str().unwrap_or(""),
            "name": last["metadata"]["name"]});
        meta["continue"] = json!(base64::engine::general_purpose::STANDARD.encode(tok.to_string()));
    }
    Ok(
        json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta, "items": items}),
    )
}

/// One watch's filter: resource, namespace, selectors.
struct Filter {
    res: usize,
    ns: Option<String>,
    ls: LabelSelector,
    fs: FieldSelector,
}

impl Filter {
    fn matches(&self, ns: &str, o: &Value) -> bool {
        self.ns.as_ref().is_none_or(|x| x == ns)
            && self.ls.matches(o.pointer("/metadata/labels"))
            && self.fs.matches(o)
    }

    /// What a watch with this filter sees of a change.
    fn view(&self, e: &Event) -> Option<(&'static str, Value)> {
        if e.res != self.res {
            return None;
        }
        let now = self.matches(&e.ns, &e.obj);
        let before = e.old.as_ref().is_some_and(|o| self.matches(&e.ns, o));
        let kind = match e.change {
            Change::Added if now => "ADDED",
            Change::Modified if now && before => "MODIFIED",
            Change::Modified if now => "ADDED",
            Change::Modified if before => "DELETED",
            Change::Deleted if before || now => "DELETED",
            _ => return None,
        };
        Some((kind, (*e.obj).clone()))
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn watch_stream(
    st: &AppState,
    t: &Target,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let r = &RESOURCES[t.res];
    let (ls, fs) = selectors(t, q)?;
    let filter = Filter { res: t.res, ns: t.ns.clone(), ls, fs };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial_events = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let rv_param = q.get("resourceVersion").filter(|s| !s.is_empty() && *s != "0");
    let bookmark = move |rv: u64, end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line("BOOKMARK", &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}))
    };
    // Under the store's lock: what came before, and the subscription for
    // what comes after, with no gap between them.
    let (first, mut rx, mut last) = {
        let store = st.store.lock().expect("store lock");
        let rx = store.tx.subscribe();
        let mut first = Vec::new();
        match rv_param {
            Some(v) if !initial_events => {
                let from = parse_rv(v)?;
                match store.since(from) {
                    Some(evs) => first.extend(
                        evs.iter().filter_map(|e| filter.view(e)).map(|(k, o)| line(k, &o)),
                    ),
                    None => {
                        let e = ApiError::expired(format!(
                            "too old resource version: {from} ({})",
                            store.compacted
                        ));
                        first.push(line("ERROR", &e.status()));
                        st.expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let body = Body::from_stream(futures::stream::iter(
                            first.into_iter().map(Ok::<_, std::io::Error>),
                        ));
                        return Ok(stream_response(body));
                    }
                }
            }
            _ => {
                for ((rr, n, _), o) in store.objects.iter() {
                    if *rr == t.res && filter.matches(n, o) {
                        first.push(line("ADDED", o));
                    }
                }
                if initial_events && bookmarks {
                    first.push(bookmark(store.rv, true));
                }
            }
        }
        (first, rx, store.rv)
    };
    let (out, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let mut close = st.close.subscribe();
    let interval = st.opts.bookmark_interval;
    let counts = st.clone();
    let plural = r.qualified();
    *counts.watches.lock().expect("watch counts").entry(plural.clone()).or_default() += 1;
    tokio::spawn(async move {
        let _guard = WatchCount(counts, plural);
        for b in first {
            if out.send(Ok(b)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        close.borrow_and_update();
        loop {
            let b = tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.rv <= last => continue,
                    Ok(e) => {
                        last = e.rv;
                        match filter.view(&e) {
                            Some((k, o)) => line(k, &o),
                            None => continue,
                        }
                    }
                    // A watcher too slow to keep up is closed, as the real
                    // server does; the client watches again.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => bookmark(last, false),
                _ = close.changed() => return,
                _ = &mut deadline => return,
                _ = out.closed() => return,
            };
            if out.send(Ok(b)).await.is_err() {
                return;
            }
        }
    });
    Ok(stream_response(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx))))
}

struct WatchCount(AppState, String);

impl Drop for WatchCount {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.watches.lock()
            && let Some(n) = w.get_mut(&self.1)
        {
            *n = n.saturating_sub(1);
        }
    }
}

fn stream_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(body)
        .expect("a valid response")
}

/// Serve on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
