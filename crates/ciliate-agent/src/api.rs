//! The agent's HTTP API (routes and JSON: `ciliate_api`) on axum, over a
//! unix socket only root can open.
//!
//! Reads are served from the subsystems' snapshots and never wait for a
//! change in progress (a CNI ADD, a policy import, a hung kvstore): no
//! agent-wide lock. Changes are commands to the subsystem that owns the
//! state ([`crate::actor`]). The server bounds what a client can make it
//! hold: concurrent connections, header bytes, the time to send headers
//! and body, body bytes; it backs off when `accept` fails (out of file
//! descriptors) instead of spinning.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ciliate_api::models::{
    ApiError, Endpoint, EndpointCreate, GcRequest, GcResult, IpamAllocation, IpamRequest,
    PolicyChange, PolicyImport, Status, TraceRequest,
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    actor::{Actor, Stopped},
    endpoint::{Datapath, EndpointError, Endpoints, EndpointsView},
    services::{ServiceError, Services},
};

/// Looks at an endpoint's datapath without changing it, from any thread,
/// while the endpoint manager works (the `ready` check of the API).
pub trait Probe: Send + Sync {
    fn check(&self, ep: &Endpoint) -> Result<(), String>;
}

/// A probe that finds everything in place (tests without a kernel).
pub struct NoProbe;

impl Probe for NoProbe {
    fn check(&self, _: &Endpoint) -> Result<(), String> {
        Ok(())
    }
}

/// The subsystems the API talks to.
pub type EndpointsActor<D> = Actor<Endpoints<D>, EndpointsView>;
pub type ServicesActor = Actor<Services, imbl::OrdMap<u16, ciliate_api::models::Service>>;

/// What the handlers share.
pub struct AppState<D: Datapath> {
    pub endpoints: EndpointsActor<D>,
    pub services: ServicesActor,
    /// The cluster's store (`node list`, `kvstore get|list`, identities).
    pub kv: Arc<dyn crate::kvstore::KvStore>,
    /// Whether new identities are allocated through `kv` (a cluster) or by
    /// the endpoint manager itself.
    pub cluster_identities: bool,
    /// Written by the cluster sync.
    pub kv_status: Arc<Mutex<crate::cluster::KvStatus>>,
    pub routing: crate::cluster::Routing,
    pub node: String,
    pub pin_dir: String,
    pub started: Instant,
    pub probe: Arc<dyn Probe>,
    /// How long a request waits for the kvstore.
    pub kv_timeout: Duration,
    /// Set once the start is done (endpoints and services restored): until
    /// then `healthz` and `status` say "restoring".
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The datapath's events, for `GET /v1/events`.
    pub events: crate::events::EventHub,
    /// Counted as requests change things.
    pub metrics: crate::metrics::Metrics,
    pub ifnames: Arc<crate::events::IfNames>,
    /// The XDP prefilter's deny list (`None`: `--enable-xdp-prefilter` is
    /// off).
    pub prefilter: Option<Arc<crate::prefilter::Prefilter>>,
    /// The acceleration paths the node runs (for `status`).
    pub acceleration: ciliate_api::models::Acceleration,
    /// The Kubernetes API's view (`None`: standalone).
    pub k8s: Option<Arc<crate::k8s::K8s>>,
}

impl<D: Datapath + 'static> AppState<D> {
    fn restoring(&self) -> bool {
        !self.ready.load(std::sync::atomic::Ordering::Relaxed)
            || self.endpoints.snapshot().restored.is_none()
    }
}

type St<D> = State<Arc<AppState<D>>>;

/// An error response: `{"message": …}` with its status.
pub struct ApiErr(StatusCode, String);

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.as_u16(), self.1)
    }
}

impl ApiErr {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message.into(),
        )
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ApiError { message: self.1 })).into_response()
    }
}

impl From<EndpointError> for ApiErr {
    fn from(e: EndpointError) -> Self {
        Self::new(e.status(), e.to_string())
    }
}

impl From<ServiceError> for ApiErr {
    fn from(e: ServiceError) -> Self {
        Self::new(e.status(), e.to_string())
    }
}

impl From<crate::prefilter::PrefilterError> for ApiErr {
    fn from(e: crate::prefilter::PrefilterError) -> Self {
        Self::new(e.status(), e.to_string())
    }
}

impl From<Stopped> for ApiErr {
    fn from(e: Stopped) -> Self {
        Self::new(503, e.to_string())
    }
}

type ApiResult = Result<Response, ApiErr>;

fn json<T: Serialize>(status: u16, v: &T) -> ApiResult {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok((status, axum::Json(v)).into_response())
}

/// A request body: a JSON object (nothing else, not even `[]`, which serde
/// would take for a struct), decoded as `T`; the error names the field.
fn body<T: DeserializeOwned>(b: &Bytes, what: &str) -> Result<T, ApiErr> {
    decode_body(b, what).map_err(|e| ApiErr::new(400, e))
}

/// [`body`] for any bytes (the fuzz targets decode what the API would):
/// the message names what was wrong.
pub fn decode_body<T: DeserializeOwned>(b: &[u8], what: &str) -> Result<T, String> {
    if !b.trim_ascii_start().starts_with(b"{") {
        return Err(format!("{what}: a JSON object is expected"));
    }
    let de = &mut serde_json::Deserializer::from_slice(b);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." { format!("{what}: {inner}") } else { format!("{what}: {path}: {inner}") }
    })
}

fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ApiErr> {
    s.parse().map_err(|_| ApiErr::new(400, format!("{what} {s:?} is not a number")))
}

/// Run blocking `f` (kvstore, datapath probes) off the runtime's workers,
/// giving up after `timeout` (a hung store answers 503, nothing hangs).
async fn blocking<R: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ApiErr> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(ApiErr::new(500, format!("{what}: {e}"))),
        Err(_) => Err(ApiErr::new(503, format!("{what}: no answer within {timeout:?}"))),
    }
}

/// Wait for the kvstore's answer `f` at most `timeout` (503 after: a
/// hung store never hangs a request).
async fn kv_call<T>(
    timeout: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, crate::kvstore::KvError>>,
) -> Result<T, ApiErr> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| ApiErr::new(503, format!("{what}: {e}"))),
        Err(_) => Err(ApiErr::new(503, format!("{what}: no answer within {timeout:?}"))),
    }
}

/// The API's routes.
pub fn router<D: Datapath + 'static>(state: Arc<AppState<D>>) -> Router {
    let no_method = || async { ApiErr::new(405, "method not supported on this path") };
    Router::new()
        .route("/v1/healthz", get(healthz::<D>).fallback(no_method))
        .route("/v1/status", get(status::<D>).fallback(no_method))
        .route("/v1/node", get(nodes::<D>).fallback(no_method))
        .route("/v1/kvstore", get(kvstore::<D>).fallback(no_method))
        .route(
            "/v1/endpoint",
            get(list_endpoints::<D>)
                .put(create_endpoint::<D>)
                .delete(delete_container::<D>)
                .fallback(no_method),
        )
        .route(
            "/v1/endpoint/{id}",
            get(get_endpoint::<D>).delete(delete_endpoint::<D>).fallback(no_method),
        )
        .route(
            "/v1/endpoint/{id}/config",
            axum::routing::patch(endpoint_config::<D>).fallback(no_method),
        )
        .route("/v1/config", get(get_config::<D>).patch(patch_config::<D>).fallback(no_method))
        .route(
            "/v1/prefilter",
            get(get_prefilter::<D>)
                .patch(patch_prefilter::<D>)
                .delete(delete_prefilter::<D>)
                .fallback(no_method),
        )
        .route("/v1/service", get(list_services::<D>).put(update_service::<D>).fallback(no_method))
        .route(
            "/v1/service/{id}",
            get(get_service::<D>).delete(delete_service::<D>).fallback(no_method),
        )
        .route("/v1/ipam", post(allocate_ip::<D>).fallback(no_method))
        .route("/v1/ipam/{ip}", axum::routing::delete(release_ip::<D>).fallback(no_method))
        .route("/v1/identity", get(list_identities::<D>).fallback(no_method))
        .route("/v1/identity/{id}", get(get_identity::<D>).fallback(no_method))
        .route("/v1/gc", post(gc::<D>).fallback(no_method))
        .route(
            "/v1/policy",
            get(get_policy::<D>)
                .put(import_policy::<D>)
                .delete(delete_policy::<D>)
                .fallback(no_method),
        )
        .route("/v1/policy/selectors", get(selectors::<D>).fallback(no_method))
        .route("/v1/policy/trace", post(trace::<D>).fallback(no_method))
        .route("/v1/events", get(events::<D>).fallback(no_method))
        .route("/v1/openapi.json", get(openapi).fallback(no_method))
        .fallback(|m: axum::http::Method, u: axum::http::Uri| async move {
            ApiErr::new(404, format!("no route {m} {}", u.path()))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Largest request body (a policy of 65,535 port rules is ~3 MiB).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

async fn healthz<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    let status = if st.restoring() { "restoring" } else { "ok" };
    json(200, &serde_json::json!({"status": status}))
}

async fn status<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    let v = st.endpoints.snapshot();
    let kv = st.kv_status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    json(
        200,
        &Status {
            node: st.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pod_cidr: v.ipam_cidr.to_string(),
            router_ip: v.ipam_cidr.router(),
            endpoints: v.endpoints.len(),
            identities: v.cluster_identities,
            ipam_used: v.ipam_used,
            ipam_free: v.ipam_free,
            pin_dir: st.pin_dir.clone(),
            uptime: st.started.elapsed().as_secs(),
            restored_endpoints: v.restored.unwrap_or(0),
            kvstore: kv.describe(),
            cluster_nodes: kv.nodes,
            remote_endpoints: kv.remote_ips,
            routing: format!("{:?}", st.routing).to_lowercase(),
            state: if st.restoring() { "restoring" } else { "ok" }.into(),
            monitor: st.events.status(),
            unreachable_nodes: kv.unreachable.clone(),
            acceleration: st.acceleration.clone(),
        },
    )
}

/// `GET /v1/events?type=drop|trace|policy-verdict&related-to=ID`: the
/// datapath's events from now on, one JSON object a line
/// (`application/x-ndjson`), until the client goes away. The response
/// head is sent once the subscription exists.
async fn events<D: Datapath + 'static>(
    State(st): St<D>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let filter = crate::events::Filter::parse(
        q.get("type").map(String::as_str),
        q.get("related-to").map(String::as_str),
    )
    .map_err(|e| ApiErr::new(400, e))?;
    let sub = st.events.subscribe();
    let ifnames = st.ifnames.clone();
    let lines =
        futures::stream::unfold((sub, ifnames, filter), |(mut sub, ifnames, filter)| async move {
            loop {
                let r = sub.next().await?;
                let Some(m) = crate::events::model(&r, &ifnames).await else { continue };
                if !filter.passes(&m) {
                    continue;
                }
                let mut line = serde_json::to_vec(&m).unwrap_or_default();
                line.push(b'\n');
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(line)),
                    (sub, ifnames, filter),
                ));
            }
        });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

async fn nodes<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    // CRD mode: the cluster's nodes are its CiliumNodes.
    if let Some(k8s) = st.k8s.as_ref().filter(|k| k.crd_identities) {
        let nodes =
            tokio::time::timeout(st.kv_timeout, crate::k8s::crd::nodes(&k8s.client(), st.routing))
                .await
                .map_err(|_| ApiErr::new(503, "listing nodes: the Kubernetes API did not answer"))?
                .map_err(|e| ApiErr::new(503, format!("listing nodes: {e}")))?;
        return json(200, &nodes);
    }
    let list = kv_call(st.kv_timeout, "listing nodes", st.kv.list(crate::kvstore::NODES)).await?;
    let nodes: Vec<crate::cluster::NodeRecord> =
        list.into_iter().filter_map(|(_, v)| serde_json::from_slice(&v).ok()).collect();
    json(200, &nodes)
}

async fn kvstore<D: Datapath + 'static>(
    State(st): St<D>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    if let Some(k) = q.get("key").cloned() {
        let v = kv_call(st.kv_timeout, "reading the kvstore", st.kv.get(&k))
            .await?
            .ok_or_else(|| ApiErr::new(404, format!("key {k:?} not found")))?;
        return json(200, &vec![ciliate_api::models::KvPair { key: k, value: text(v) }]);
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let pairs = kv_call(st.kv_timeout, "listing the kvstore", st.kv.list(&prefix)).await?;
    let pairs: Vec<ciliate_api::models::KvPair> = pairs
        .into_iter()
        .map(|(key, v)| ciliate_api::models::KvPair { key, value: text(v) })
        .collect();
    json(200, &pairs)
}

/// `eps` with their state as the datapath has it now: a "ready" endpoint
/// whose program, device or entries are not in place is "not-ready: why".
async fn checked<D: Datapath + 'static>(
    st: &AppState<D>,
    eps: Vec<Endpoint>,
) -> Result<Vec<Endpoint>, ApiErr> {
    let probe = st.probe.clone();
    blocking(Duration::from_secs(10), "checking endpoints", move || {
        eps.into_iter()
            .map(|mut ep| {
                if ep.state == "ready"
                    && ep.container_id != crate::endpoint::HOST_CONTAINER
                    && let Err(why) = probe.check(&ep)
                {
                    ep.state = format!("not-ready: {why}");
                }
                ep
            })
            .collect()
    })
    .await
}

async fn list_endpoints<D: Datapath + 'static>(
    State(st): St<D>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let v = st.endpoints.snapshot();
    let eps: Vec<Endpoint> = match q.get("container-id") {
        // One container's endpoint (none or one).
        Some(c) => v.by_container(c).cloned().into_iter().collect(),
        None => v.endpoints.values().cloned().collect(),
    };
    json(200, &checked(&st, eps).await?)
}

async fn get_endpoint<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let id: u16 = parse_id(&id, "endpoint ID")?;
    let ep = st.endpoints.snapshot().get(id)?.clone();
    let mut one = checked(&st, vec![ep]).await?;
    json(200, &one.remove(0))
}

/// This node's endpoint addresses (Local traffic policies follow them).
pub(crate) fn local_ips(v: &EndpointsView) -> BTreeSet<Ipv4Addr> {
    v.endpoints.values().map(|e| e.ip).collect()
}

/// Services with a Local traffic policy follow this node's endpoints.
async fn endpoints_changed<D: Datapath + 'static>(st: &AppState<D>) {
    let local = local_ips(&st.endpoints.snapshot());
    let r = st.services.write(move |s| s.refresh_local(&local), |s| s.view()).await;
    if let Ok(Err(e)) = r {
        tracing::warn!(subsystem = "services", error = %e, "refreshing Local services");
    }
}

/// The identity of a label set for an endpoint: one a local endpoint
/// already has (in use here: the node is recorded as its user), else in a
/// cluster one allocated through the store, here (with a timeout) and not by
/// the endpoint manager, so that a slow or hung store only holds up
/// endpoints of new label sets; the store records the node as its user
/// before the garbage collection could release it. `None`: the endpoint
/// manager allocates it (no cluster).
async fn identity_for<D: Datapath + 'static>(
    st: &AppState<D>,
    labels: &[String],
) -> Result<Option<u32>, ApiErr> {
    let snap = st.endpoints.snapshot();
    let known = snap
        .identities
        .find(labels)
        .filter(|id| snap.endpoints.values().any(|e| e.identity == *id));
    drop(snap);
    Ok(match known {
        Some(id) => Some(id),
        None if let Some(k8s) = st.k8s.as_ref().filter(|k| k.crd_identities) => {
            let min = ciliate_common::identity::MIN_CLUSTER;
            let client = k8s.client();
            let alloc = crate::k8s::crd::allocate(&client, labels, min);
            let id = tokio::time::timeout(st.kv_timeout, alloc)
                .await
                .map_err(|_| {
                    ApiErr::new(
                        503,
                        format!(
                            "allocating an identity: the Kubernetes API did not answer in {:?}",
                            st.kv_timeout
                        ),
                    )
                })?
                .map_err(|e| ApiErr::new(503, format!("allocating an identity: {e}")))?;
            Some(id)
        }
        None if st.cluster_identities => {
            let min = ciliate_common::identity::MIN_CLUSTER;
            let alloc = crate::cluster::allocate_identity(st.kv.as_ref(), labels, min, &st.node);
            Some(kv_call(st.kv_timeout, "allocating an identity", alloc).await?)
        }
        None => None,
    })
}

/// New labels for endpoint `id` (see [`crate::endpoint::Endpoints::relabel`]),
/// its identity allocated as an ADD's is.
pub async fn relabel_endpoint<D: Datapath + 'static>(
    st: &AppState<D>,
    id: u16,
    labels: BTreeMap<String, String>,
) -> Result<ciliate_api::models::Endpoint, ApiErr> {
    ciliate_api::models::check_labels(&labels).map_err(|e| ApiErr::new(400, e))?;
    let set = ciliate_api::models::label_set(&labels);
    let identity = identity_for(st, &set).await?;
    let ep = st
        .endpoints
        .write(move |e| e.relabel(id, labels, identity.map(|i| (i, set))), |e| e.view())
        .await??;
    tracing::info!(
        subsystem = "endpoint",
        endpoint_id = id,
        identity = ep.identity,
        "endpoint relabelled"
    );
    Ok(ep)
}

async fn create_endpoint<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let mut req: EndpointCreate = body(&b, "endpoint")?;
    // With Kubernetes, a pod's labels are the API's (its own, its
    // namespace's, its service account), not the caller's.
    if let Some(k8s) = &st.k8s
        && let Some((ns, name)) = req.pod_name.split_once('/')
    {
        req.labels =
            k8s.pod_labels(ns, name).await.map_err(|e| ApiErr::new(e.status(), e.to_string()))?;
    }
    ciliate_api::models::check_labels(&req.labels).map_err(|e| ApiErr::new(400, e))?;
    // Everything the endpoint manager checks, before an identity is
    // allocated in the store for a request that is refused anyway.
    let check = req.clone();
    st.endpoints.write(move |e| e.validate(&check), |e| e.view()).await??;
    let labels = ciliate_api::models::label_set(&req.labels);
    let identity = identity_for(&st, &labels).await?;
    let (container, ip) = (req.container_id.clone(), req.ip);
    let ep = st
        .endpoints
        .write(move |e| e.create_with(req, identity.map(|i| (i, labels))), |e| e.view())
        .await??;
    tracing::info!(subsystem = "endpoint", endpoint_id = ep.id, container_id = %container, identity = ep.identity, %ip, "endpoint created");
    endpoints_changed(&st).await;
    json(201, &ep)
}

async fn endpoint_config<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
    b: Bytes,
) -> ApiResult {
    let id: u16 = parse_id(&id, "endpoint ID")?;
    let change: ciliate_api::models::EndpointConfigChange = body(&b, "endpoint config")?;
    let Some(on) = change.debug else {
        return json(200, st.endpoints.snapshot().get(id)?);
    };
    let ep = st.endpoints.write(move |e| e.set_endpoint_debug(id, on), |e| e.view()).await??;
    tracing::info!(
        subsystem = "endpoint",
        endpoint_id = id,
        debug = on,
        "endpoint debugging switched"
    );
    json(200, &ep)
}

fn agent_config(v: &EndpointsView) -> ciliate_api::models::AgentConfig {
    ciliate_api::models::AgentConfig {
        debug: v.debug_all,
        monitor_aggregation: if v.trace_all { "none" } else { "medium" }.into(),
    }
}

async fn get_config<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    json(200, &agent_config(&st.endpoints.snapshot()))
}

async fn patch_config<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let change: ciliate_api::models::AgentConfigChange = body(&b, "agent config")?;
    if let Some(on) = change.debug {
        st.endpoints.write(move |e| e.set_node_debug(on), |e| e.view()).await??;
        tracing::info!(subsystem = "datapath", debug = on, "node debugging switched");
    }
    json(200, &agent_config(&st.endpoints.snapshot()))
}

/// The node's prefilter, or 501 when it is off.
fn prefilter<D: Datapath>(st: &AppState<D>) -> Result<Arc<crate::prefilter::Prefilter>, ApiErr> {
    st.prefilter.clone().ok_or_else(|| crate::prefilter::PrefilterError::Off.into())
}

async fn get_prefilter<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    let p = prefilter(&st)?;
    json(200, &blocking(st.kv_timeout, "reading the prefilter", move || p.get()).await??)
}

/// `PATCH` (add CIDRs) or `DELETE` (remove them) with a `PrefilterSpec`.
async fn change_prefilter<D: Datapath + 'static>(
    st: &AppState<D>,
    b: &Bytes,
    add: bool,
) -> ApiResult {
    let spec: ciliate_api::models::PrefilterSpec = body(b, "prefilter")?;
    let p = prefilter(st)?;
    let what = spec.deny.join(",");
    let v = blocking(st.kv_timeout, "changing the prefilter", move || {
        if add { p.update(&spec) } else { p.delete(&spec) }
    })
    .await??;
    tracing::info!(subsystem = "prefilter", cidrs = %what, revision = v.spec.revision, "{}", if add { "denied" } else { "no longer denied" });
    json(200, &v)
}

async fn patch_prefilter<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    change_prefilter(&st, &b, true).await
}

async fn delete_prefilter<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    change_prefilter(&st, &b, false).await
}

async fn delete_endpoint<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let id: u16 = parse_id(&id, "endpoint ID")?;
    let ep = st.endpoints.write(move |e| e.delete(id), |e| e.view()).await??;
    tracing::info!(subsystem = "endpoint", endpoint_id = id, container_id = %ep.container_id, "endpoint deleted");
    endpoints_changed(&st).await;
    json(200, &ep)
}

async fn delete_container<D: Datapath + 'static>(
    State(st): St<D>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let c = q
        .get("container-id")
        .cloned()
        .ok_or_else(|| ApiErr::new(400, "container-id is required"))?;
    let lxc = q.get("host-ifname").cloned();
    let r =
        st.endpoints.write(move |e| e.delete_container(&c, lxc.as_deref()), |e| e.view()).await??;
    endpoints_changed(&st).await;
    json(200, &r)
}

async fn list_services<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    let v = st.services.snapshot();
    json(200, &v.values().collect::<Vec<_>>())
}

async fn get_service<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let id: u16 = parse_id(&id, "service ID")?;
    let v = st.services.snapshot();
    let svc = v.get(&id).ok_or(ServiceError::NotFound(id))?;
    json(200, svc)
}

async fn update_service<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let spec: ciliate_api::models::ServiceSpec = body(&b, "service")?;
    if !spec.source.is_empty() {
        return Err(ApiErr::new(
            400,
            format!("source {:?}: only the agent derives services from a source", spec.source),
        ));
    }
    k8s_owned(&st, spec.id)?;
    let action = if st.services.snapshot().contains_key(&spec.id) { "update" } else { "add" };
    let local = local_ips(&st.endpoints.snapshot());
    let svc = st.services.write(move |s| s.update(spec, &local), |s| s.view()).await??;
    st.metrics.service_event(action);
    json(200, &svc)
}

/// Refuse to change service `id` when the agent derived it from the
/// Kubernetes API (the API server owns it).
fn k8s_owned<D: Datapath + 'static>(st: &AppState<D>, id: u16) -> Result<(), ApiErr> {
    match st.services.snapshot().get(&id) {
        Some(s) if !s.spec.source.is_empty() => Err(ApiErr::new(
            409,
            format!(
                "service {id} ({}) comes from the Kubernetes API (source {}): change it there",
                s.spec.name, s.spec.source
            ),
        )),
        _ => Ok(()),
    }
}

async fn delete_service<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let id: u16 = parse_id(&id, "service ID")?;
    k8s_owned(&st, id)?;
    let svc = st.services.write(move |s| s.delete(id), |s| s.view()).await??;
    st.metrics.service_event("delete");
    json(200, &svc)
}

async fn allocate_ip<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let r: IpamRequest = body(&b, "ipam request")?;
    if r.owner.is_empty() {
        return Err(ApiErr::new(400, "owner is empty"));
    }
    let owner = r.owner.clone();
    let (ip, gateway) = st
        .endpoints
        .write(move |e| e.ipam.allocate(&owner).map(|ip| (ip, e.ipam.cidr.router())), |e| e.view())
        .await?
        .map_err(|e| ApiErr::new(503, e.to_string()))?;
    json(201, &IpamAllocation { ip, gateway, owner: r.owner })
}

async fn release_ip<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(ip): UrlPath<String>,
) -> ApiResult {
    let ip: Ipv4Addr =
        ip.parse().map_err(|_| ApiErr::new(400, format!("{ip:?} is not an IPv4 address")))?;
    st.endpoints.write(move |e| e.release_ip(ip), |e| e.view()).await??;
    json(200, &serde_json::json!({"released": ip}))
}

async fn list_identities<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    json(200, &st.endpoints.snapshot().identities.list())
}

async fn get_identity<D: Datapath + 'static>(
    State(st): St<D>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let n: u32 = parse_id(&id, "identity")?;
    let v = st.endpoints.snapshot();
    let id = v
        .identities
        .identity(n)
        .ok_or_else(|| ApiErr::new(404, format!("identity {n} not found")))?;
    json(200, &id)
}

async fn gc<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let r: GcRequest = body(&b, "gc request")?;
    let removed = st.endpoints.write(move |e| e.gc(&r.valid_container_ids), |e| e.view()).await??;
    endpoints_changed(&st).await;
    json(200, &GcResult { removed })
}

async fn get_policy<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    json(200, &*st.endpoints.snapshot().policy)
}

async fn selectors<D: Datapath + 'static>(State(st): St<D>) -> ApiResult {
    let v = st.endpoints.snapshot();
    json(200, &crate::policy::selectors(&v.policy.rules, &v.identities))
}

async fn trace<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let r: TraceRequest = body(&b, "trace request")?;
    let v = st.endpoints.snapshot();
    json(200, &v.trace(&r)?)
}

/// Every policy change, refused or not, is counted by its outcome.
async fn import_policy<D: Datapath + 'static>(State(st): St<D>, b: Bytes) -> ApiResult {
    let r = import_policy_counted(&st, b).await;
    st.metrics.policy_changed(r.is_ok());
    r
}

async fn import_policy_counted<D: Datapath + 'static>(st: &AppState<D>, b: Bytes) -> ApiResult {
    let r: PolicyImport = body(&b, "policy import")?;
    // Everything is validated before anything changes (and off the
    // endpoint manager: parsing a large file does not hold it up).
    let rules = blocking(Duration::from_secs(60), "parsing the policy", move || {
        crate::policy::parse(&r.text)
    })
    .await?
    .map_err(|e| ApiErr::new(400, e.to_string()))?;
    let n = rules.len();
    let revision = st.endpoints.write(move |e| e.import_policy(rules), |e| e.view()).await??;
    tracing::info!(subsystem = "policy", revision, rules = n, "policy imported");
    json(200, &PolicyChange { revision, rules: n })
}

async fn delete_policy<D: Datapath + 'static>(
    State(st): St<D>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = delete_policy_counted(&st, q).await;
    st.metrics.policy_changed(r.is_ok());
    r
}

async fn delete_policy_counted<D: Datapath + 'static>(
    st: &AppState<D>,
    q: HashMap<String, String>,
) -> ApiResult {
    let labels: Vec<String> = match (q.get("labels"), q.get("all").map(String::as_str)) {
        (Some(l), _) if !l.is_empty() => l.split(',').map(str::to_owned).collect(),
        (_, Some("true")) => Vec::new(),
        _ => return Err(ApiErr::new(400, "give labels=LABEL[,LABEL] or all=true")),
    };
    let (removed, revision) =
        st.endpoints.write(move |e| e.delete_policy(&labels), |e| e.view()).await??;
    tracing::info!(subsystem = "policy", revision, removed, "policy rules deleted");
    json(200, &PolicyChange { revision, rules: removed })
}

async fn openapi() -> ApiResult {
    json(200, &crate::openapi::document())
}

/// Wait until `rx` turns true (or its sender goes).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// What a client may make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the socket's backlog.
    pub max_connections: usize,
    /// Time to send the request headers.
    pub header_timeout: Duration,
    /// Header bytes buffered (hyper's read buffer).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Listen on `socket` (replacing a stale one) with mode 0600 and serve
/// `app` until `shutdown` turns true.
pub async fn serve(
    app: Router,
    socket: &Path,
    limits: Limits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        service::TowerToHyperService,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        // Ours, or somebody else could swap the socket.
        crate::store::private_dir(dir).map_err(std::io::Error::other)?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff = Duration::from_millis(5); s }
                Err(e) => {
                    // Out of file descriptors (or the like): wait, do not spin.
                    tracing::warn!(subsystem = "api", error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(subsystem = "api", error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::MemoryDatapath;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn state<D: Datapath + 'static>(dp: D) -> Arc<AppState<D>> {
        state_with(dp, None)
    }

    fn state_with<D: Datapath + 'static>(
        dp: D,
        prefilter: Option<Arc<crate::prefilter::Prefilter>>,
    ) -> Arc<AppState<D>> {
        let eps = Endpoints::open("10.9.0.0/24".parse().unwrap(), None, dp).unwrap();
        let svcs = Services::open(
            None,
            Box::new(crate::services::MemoryLb::default()),
            vec![],
            Default::default(),
        )
        .unwrap();
        Arc::new(AppState {
            endpoints: Actor::start("endpoints", eps, |e| e.view(), |_| {}),
            services: Actor::start("services", svcs, |s| s.view(), |_| {}),
            kv: Arc::new(crate::kvstore::LocalStore::open(None).unwrap()),
            cluster_identities: false,
            kv_status: Default::default(),
            routing: Default::default(),
            node: "n1".into(),
            pin_dir: "/x".into(),
            started: Instant::now(),
            probe: Arc::new(NoProbe),
            kv_timeout: Duration::from_secs(5),
            ready: Arc::new(true.into()),
            events: crate::events::EventHub::new(64),
            ifnames: Default::default(),
            metrics: Default::default(),
            prefilter,
            acceleration: Default::default(),
            k8s: None,
        })
    }

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn create_body(container: &str, ip: &str, lxc: &str) -> String {
        serde_json::json!({
            "container_id": container, "netns": "/run/netns/p", "ifname": "eth0", "host_ifname": lxc,
            "ip": ip, "mac": "0a:00:00:00:00:01", "labels": {"app": "web"}
        })
        .to_string()
    }

    #[tokio::test]
    async fn ipam_endpoint_and_identity_routes() {
        let st = state(MemoryDatapath { devices: vec!["lxc1".into()], ..Default::default() });
        let app = router(st);
        let (s, alloc) = call(&app, "POST", "/v1/ipam", r#"{"owner":"c1"}"#).await;
        assert_eq!(
            (s, alloc["ip"].as_str(), alloc["gateway"].as_str()),
            (201, Some("10.9.0.2"), Some("10.9.0.1"))
        );
        let (s, ep) =
            call(&app, "PUT", "/v1/endpoint", &create_body("c1", "10.9.0.2", "lxc1")).await;
        assert_eq!(
            (s, ep["id"].as_u64(), ep["identity"].as_u64()),
            (201, Some(1), Some(256)),
            "{ep}"
        );
        assert_eq!(call(&app, "GET", "/v1/endpoint", "").await.1.as_array().unwrap().len(), 1);
        let one = call(&app, "GET", "/v1/endpoint?container-id=c1", "").await.1;
        assert_eq!(one[0]["id"], 1);
        assert!(
            call(&app, "GET", "/v1/endpoint?container-id=zz", "")
                .await
                .1
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(call(&app, "GET", "/v1/endpoint/1", "").await.1["container_id"], "c1");
        assert_eq!(call(&app, "GET", "/v1/identity/256", "").await.1["labels"][0], "k8s:app=web");
        let ids = call(&app, "GET", "/v1/identity", "").await.1;
        assert_eq!(ids[0]["labels"][0], "reserved:host");
        let st = call(&app, "GET", "/v1/status", "").await.1;
        assert_eq!((st["endpoints"].as_u64(), st["state"].as_str()), (Some(1), Some("ok")));
        let (s, _) = call(&app, "DELETE", "/v1/endpoint?container-id=c1", "").await;
        assert_eq!(s, 200);
        assert_eq!(call(&app, "GET", "/v1/endpoint/1", "").await.0, 404);
        assert_eq!(
            call(&app, "DELETE", "/v1/endpoint?container-id=c1", "").await.0,
            200,
            "idempotent"
        );
    }

    #[tokio::test]
    async fn prefilter_routes() {
        let off = router(state(MemoryDatapath::default()));
        let (s, b) = call(&off, "GET", "/v1/prefilter", "").await;
        assert_eq!(s, 501);
        assert!(b["message"].as_str().unwrap().contains("--enable-xdp-prefilter"), "{b}");
        let mem = crate::prefilter::MemoryPrefilter::default();
        let p = crate::prefilter::Prefilter::open(Box::new(mem), None, &[("eth0".into(), false)])
            .unwrap();
        let st = state_with(MemoryDatapath::default(), Some(Arc::new(p)));
        let app = router(st);
        let (s, b) = call(&app, "PATCH", "/v1/prefilter", r#"{"deny":["10.9.0.0/16"]}"#).await;
        assert_eq!((s, b["spec"]["revision"].as_u64()), (200, Some(1)), "{b}");
        assert_eq!(b["status"]["devices"][0]["mode"], "generic");
        let (s, b) = call(&app, "PATCH", "/v1/prefilter", r#"{"deny":["10.9.0.1/16"]}"#).await;
        assert_eq!(s, 400, "{b}");
        let (s, b) = call(&app, "PATCH", "/v1/prefilter", r#"{"deny":[], "cidrs": 1}"#).await;
        assert!(s == 400 && b["message"].as_str().unwrap().contains("cidrs"), "{s} {b}");
        let (s, _) =
            call(&app, "DELETE", "/v1/prefilter", r#"{"revision":5,"deny":["10.9.0.0/16"]}"#).await;
        assert_eq!(s, 409);
        let (s, b) =
            call(&app, "DELETE", "/v1/prefilter", r#"{"revision":1,"deny":["10.9.0.0/16"]}"#).await;
        assert_eq!((s, b["spec"]["deny"].as_array().map(Vec::len)), (200, Some(0)), "{b}");
        assert_eq!(call(&app, "PUT", "/v1/prefilter", "{}").await.0, 405);
    }

    #[tokio::test]
    async fn a_bad_policy_is_refused_and_the_policy_in_force_stays() {
        let app = router(state(MemoryDatapath::default()));
        let good = serde_json::json!({"text": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n"});
        let (s, b) = call(&app, "PUT", "/v1/policy", &good.to_string()).await;
        assert_eq!((s, b["revision"].as_u64()), (200, Some(1)), "{b}");
        let bad = serde_json::json!({"text": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEntities: [moon]}]\n"});
        let (s, b) = call(&app, "PUT", "/v1/policy", &bad.to_string()).await;
        assert_eq!(s, 400);
        assert!(b["message"].as_str().unwrap().contains("moon"), "{b}");
        let (_, p) = call(&app, "GET", "/v1/policy", "").await;
        assert_eq!((p["revision"].as_u64(), p["rules"].as_array().unwrap().len()), (Some(1), 1));
        let (s, b) = call(&app, "DELETE", "/v1/policy?all=true", "").await;
        assert_eq!((s, b["rules"].as_u64(), b["revision"].as_u64()), (200, Some(1), Some(2)));
        assert_eq!(call(&app, "DELETE", "/v1/policy", "").await.0, 400);
    }

    #[tokio::test]
    async fn errors_name_what_was_wrong() {
        let app = router(state(MemoryDatapath::default()));
        for (m, p, b, status, needle) in [
            ("GET", "/v2/endpoint", "", 404, "no route"),
            ("GET", "/v1/nothing", "", 404, "no route"),
            ("PATCH", "/v1/endpoint", "", 405, "not supported"),
            ("GET", "/v1/endpoint/abc", "", 400, "not a number"),
            ("GET", "/v1/endpoint/7", "", 404, "endpoint 7 not found"),
            ("PUT", "/v1/endpoint", "{", 400, "endpoint:"),
            ("POST", "/v1/ipam", r#"{"owner":""}"#, 400, "owner is empty"),
            ("DELETE", "/v1/ipam/10.9.0.50", "", 404, "not allocated"),
            ("DELETE", "/v1/ipam/nope", "", 400, "not an IPv4 address"),
            ("DELETE", "/v1/endpoint", "", 400, "container-id is required"),
            ("GET", "/v1/identity/999", "", 404, "identity 999 not found"),
            ("GET", "/v1/service/9", "", 404, "service 9 not found"),
            ("GET", "/v1/service/x", "", 400, "not a number"),
            ("PUT", "/v1/service", r#"{"id":1}"#, 400, "missing field `frontend`"),
            (
                "PUT",
                "/v1/service",
                r#"{"id":1,"frontend":{"ip":"10.96.0.1","port":80},"color":1}"#,
                400,
                "unknown field `color`",
            ),
            (
                "PUT",
                "/v1/service",
                r#"{"id":1,"frontend":{"ip":"0.0.0.0","port":80}}"#,
                400,
                "only for NodePort",
            ),
            (
                "POST",
                "/v1/policy/trace",
                r#"{"src":{},"dst":{},"proto":"tcp","dport":1}"#,
                400,
                "exactly one",
            ),
        ] {
            let (s, body) = call(&app, m, p, b).await;
            assert_eq!(s, status, "{m} {p}: {body}");
            let msg = body["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{m} {p}: {msg:?} lacks {needle:?}");
        }
    }

    /// A datapath whose attach waits until the test lets it go.
    struct Stuck {
        inner: MemoryDatapath,
        gate: std::sync::mpsc::Receiver<()>,
    }

    impl Datapath for Stuck {
        fn attach(
            &mut self,
            s: &ciliate_datapath::node::EndpointSpec,
        ) -> Result<ciliate_datapath::node::Attached, String> {
            let _ = self.gate.recv();
            self.inner.attach(s)
        }
        fn detach(&mut self, ip: Ipv4Addr, lxc: &str) -> Result<(), String> {
            self.inner.detach(ip, lxc)
        }
        fn sync_policies(
            &mut self,
            b: &[(u16, crate::policy::Resolved)],
        ) -> Result<(), ciliate_datapath::DatapathError> {
            self.inner.sync_policies(b)
        }
        fn add_policies(
            &mut self,
            b: &[(u16, crate::policy::Resolved)],
        ) -> Result<(), ciliate_datapath::DatapathError> {
            self.inner.add_policies(b)
        }
        fn policy_holders(&mut self) -> Result<BTreeSet<u16>, String> {
            self.inner.policy_holders()
        }
        fn sync_cidrs(
            &mut self,
            c: &std::collections::BTreeMap<crate::policy::Prefix, u32>,
        ) -> Result<(), String> {
            self.inner.sync_cidrs(c)
        }
        fn device_exists(&self, lxc: &str) -> bool {
            self.inner.device_exists(lxc)
        }
        fn clear_leftovers(&mut self, ip: Option<Ipv4Addr>, lxc: &str) -> Result<(), String> {
            self.inner.clear_leftovers(ip, lxc)
        }
        fn sweep(&mut self, keep: &[&str]) -> Result<Vec<String>, String> {
            self.inner.sweep(keep)
        }
        fn check(&mut self, ep: &Endpoint) -> Result<(), String> {
            self.inner.check(ep)
        }
        fn configure(&mut self, s: &ciliate_datapath::node::EndpointSpec) -> Result<(), String> {
            self.inner.configure(s)
        }
        fn set_node_debug(&mut self, on: bool) -> Result<(), String> {
            self.inner.set_node_debug(on)
        }
    }

    #[tokio::test]
    async fn adds_stuck_in_the_datapath_do_not_block_status_or_reads() {
        let (go, gate) = std::sync::mpsc::channel();
        let app = router(state(Stuck { inner: MemoryDatapath::default(), gate }));
        let mut bodies = Vec::new();
        for i in 0..5 {
            let c = format!("c{i}");
            let (s, alloc) = call(&app, "POST", "/v1/ipam", &format!(r#"{{"owner":"{c}"}}"#)).await;
            assert_eq!(s, 201);
            bodies.push(create_body(&c, alloc["ip"].as_str().unwrap(), &format!("lxc{i}")));
        }
        let adds: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let app = app.clone();
                tokio::spawn(async move { call(&app, "PUT", "/v1/endpoint", &body).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Five ADDs wait in (or for) a stuck attach; readers do not.
        for path in [
            "/v1/status",
            "/v1/healthz",
            "/v1/endpoint",
            "/v1/identity",
            "/v1/policy",
            "/v1/service",
        ] {
            let r = tokio::time::timeout(Duration::from_secs(2), call(&app, "GET", path, "")).await;
            assert!(matches!(r, Ok((200, _))), "GET {path} waited for the stuck ADDs: {r:?}");
        }
        assert!(adds.iter().all(|a| !a.is_finished()), "the ADDs are still stuck");
        for _ in 0..5 {
            go.send(()).unwrap();
        }
        for a in adds {
            assert_eq!(a.await.unwrap().0, 201);
        }
        assert_eq!(call(&app, "GET", "/v1/status", "").await.1["endpoints"], 5);
    }

    #[tokio::test]
    async fn every_documented_route_is_served() {
        let app = router(state(MemoryDatapath::default()));
        // (The event stream never ends: its own test below.)
        for r in crate::openapi::ROUTES.iter().filter(|r| r.path != "/v1/events") {
            let path = r.path.replace("{id}", "1").replace("{ip}", "10.9.0.77");
            let (s, body) = call(&app, &r.method.to_uppercase(), &path, "{}").await;
            let msg = body["message"].as_str().unwrap_or_default();
            assert!(
                s != 405 && !msg.starts_with("no route"),
                "{} {}: {s} {body}",
                r.method,
                r.path
            );
        }
        let doc = call(&app, "GET", "/v1/openapi.json", "").await.1;
        assert_eq!(doc["openapi"], "3.0.3");
        assert!(
            doc["components"]["schemas"]["Endpoint"]["properties"]["container_id"].is_object(),
            "{doc}"
        );
        assert!(doc["paths"]["/v1/endpoint"]["put"]["requestBody"].is_object());
    }

    #[tokio::test]
    async fn events_stream_to_every_subscriber_as_json_lines() {
        use crate::events::Record;
        let st = state(MemoryDatapath::default());
        let app = router(st.clone());
        let (s, body) = call(&app, "GET", "/v1/events?type=drops", "").await;
        assert_eq!(s, 400);
        assert!(body["message"].as_str().unwrap().contains("\"drops\""), "{body}");

        let open = |q: &str| {
            let req = axum::http::Request::builder()
                .uri(format!("/v1/events{q}"))
                .body(axum::body::Body::empty());
            app.clone().oneshot(req.unwrap())
        };
        let (all, drops) = (open("").await.unwrap(), open("?type=drop").await.unwrap());
        assert_eq!(all.headers()["content-type"], "application/x-ndjson");
        assert_eq!(st.events.status().subscribers, 2, "subscribed when the head is sent");
        let lost = Record::Lost {
            time: std::time::SystemTime::now(),
            count: 2,
            cause: crate::events::LostCause::RingFull,
        };
        st.events.publish(lost);
        let (mut a, mut d) = (all.into_body(), drops.into_body());
        for body in [&mut a, &mut d] {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let line = frame.into_data().unwrap();
            assert!(line.ends_with(b"\n"));
            let ev: ciliate_api::models::MonitorEvent = serde_json::from_slice(&line).unwrap();
            assert!(
                matches!(ev, ciliate_api::models::MonitorEvent::Lost(ref l) if l.lost == 2),
                "{ev:?}"
            );
        }
        drop((a, d));
        assert_eq!(st.events.status().subscribers, 0, "a client that goes away unsubscribes");
    }

    #[tokio::test]
    async fn the_server_bounds_connections_headers_and_idle_clients() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("ciliate-api-{}", std::process::id()));
        let sock = dir.join("a.sock");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            max_header_bytes: 16 * 1024,
        };
        let server = tokio::spawn({
            let (app, sock) = (router(state(MemoryDatapath::default())), sock.clone());
            async move { serve(app, &sock, limits, stop).await }
        });
        for _ in 0..50 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // More idle connections than the server serves at once...
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
        }
        // ... are closed after the header timeout, so a real client gets in.
        let sock2 = sock.clone();
        let t = Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(5), async move {
            tokio::task::spawn_blocking(move || {
                ciliate_api::Client::new(&sock2).get::<serde_json::Value>("/v1/healthz")
            })
            .await
            .unwrap()
        })
        .await;
        assert!(matches!(answered, Ok(Ok(_))), "{answered:?} after {:?}", t.elapsed());
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), idle[0].read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "an idle connection was closed: {n:?}");
        // A request line without end is refused, not buffered forever.
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let junk = vec![b'a'; 1024 * 1024];
        let _ = c.write_all(b"GET /").await;
        let _ = c.write_all(&junk).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut out)).await;
        let head = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty() || head.starts_with("HTTP/1.1 431") || head.starts_with("HTTP/1.1 400"),
            "{head}"
        );
        stop_tx.send(true).unwrap();
        server.await.unwrap().unwrap();
        assert!(!sock.exists(), "the socket goes with the server");
        let _ = std::fs::remove_dir_all(dir);
    }
}
