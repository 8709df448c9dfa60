//! The OpenAPI description of `/v1` (served at `GET /v1/openapi.json`),
//! generated from the route table below and the models' JSON schemas
//! (schemars), so it cannot drift from the types the API speaks. A test
//! calls every route of the table against the router.

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings};
use serde_json::{Map, Value, json};

use ciliate_api::models as m;

/// One route: method, path (`{id}`-style parameters), what it does, its
/// request body's schema, its success status and body schema.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub request: Option<fn(&mut SchemaGenerator) -> Schema>,
    pub status: u16,
    pub response: fn(&mut SchemaGenerator) -> Schema,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
}

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

fn any(_: &mut SchemaGenerator) -> Schema {
    Schema::from(true)
}

macro_rules! route {
    ($m:literal $p:literal $sum:literal, $req:expr, $st:literal => $resp:expr) => {
        route!($m $p $sum, $req, $st => $resp, q: &[])
    };
    ($m:literal $p:literal $sum:literal, $req:expr, $st:literal => $resp:expr, q: $q:expr) => {
        Route { method: $m, path: $p, summary: $sum, request: $req, status: $st, response: $resp, query: $q }
    };
}

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    route!("get" "/v1/healthz" "Liveness: ok, or restoring while endpoints are restored", None, 200 => any),
    route!("get" "/v1/status" "The agent: node, pod CIDR, IPAM, endpoints, identities, kvstore", None, 200 => s::<m::Status>),
    route!("get" "/v1/node" "The cluster's nodes, from the kvstore", None, 200 => s::<Vec<crate::cluster::NodeRecord>>),
    route!("get" "/v1/kvstore" "Keys of the cluster's store", None, 200 => s::<Vec<m::KvPair>>,
        q: &[("key", "one key"), ("prefix", "every key under a prefix")]),
    route!("get" "/v1/endpoint" "Endpoints, their state checked against the datapath", None, 200 => s::<Vec<m::Endpoint>>,
        q: &[("container-id", "only this container's endpoint")]),
    route!("put" "/v1/endpoint" "Create an endpoint (the CNI plugin's ADD)", Some(s::<m::EndpointCreate>), 201 => s::<m::Endpoint>),
    route!("delete" "/v1/endpoint" "Delete a container's endpoint and release its address (CNI DEL)", None, 200 => s::<Option<m::Endpoint>>,
        q: &[("container-id", "the container (required)"), ("host-ifname", "its host device, for leftovers of an ADD cut short")]),
    route!("get" "/v1/endpoint/{id}" "One endpoint", None, 200 => s::<m::Endpoint>),
    route!("delete" "/v1/endpoint/{id}" "Delete an endpoint", None, 200 => s::<m::Endpoint>),
    route!("patch" "/v1/endpoint/{id}/config" "Switch an endpoint's options (datapath debugging)", Some(s::<m::EndpointConfigChange>), 200 => s::<m::Endpoint>),
    route!("get" "/v1/config" "The agent's run-time options", None, 200 => s::<m::AgentConfig>),
    route!("patch" "/v1/config" "Switch the agent's run-time options (datapath debugging for the node)", Some(s::<m::AgentConfigChange>), 200 => s::<m::AgentConfig>),
    route!("get" "/v1/prefilter" "The XDP prefilter: denied source CIDRs, devices, drops per CIDR", None, 200 => s::<m::Prefilter>),
    route!("patch" "/v1/prefilter" "Deny more source CIDRs at XDP (revision 0, or the current one)", Some(s::<m::PrefilterSpec>), 200 => s::<m::Prefilter>),
    route!("delete" "/v1/prefilter" "Stop denying source CIDRs (each must be denied now)", Some(s::<m::PrefilterSpec>), 200 => s::<m::Prefilter>),
    route!("get" "/v1/service" "Services", None, 200 => s::<Vec<m::Service>>),
    route!("put" "/v1/service" "Create or replace a service", Some(s::<m::ServiceSpec>), 200 => s::<m::Service>),
    route!("get" "/v1/service/{id}" "One service", None, 200 => s::<m::Service>),
    route!("delete" "/v1/service/{id}" "Delete a service", None, 200 => s::<m::Service>),
    route!("post" "/v1/ipam" "Allocate an address for an owner (the same owner gets the same one)", Some(s::<m::IpamRequest>), 201 => s::<m::IpamAllocation>),
    route!("delete" "/v1/ipam/{ip}" "Release an address no endpoint holds", None, 200 => any),
    route!("get" "/v1/identity" "Reserved and allocated identities", None, 200 => s::<Vec<m::Identity>>),
    route!("get" "/v1/identity/{id}" "One identity", None, 200 => s::<m::Identity>),
    route!("post" "/v1/gc" "Remove endpoints of containers not listed (CNI GC)", Some(s::<m::GcRequest>), 200 => s::<m::GcResult>),
    route!("get" "/v1/policy" "The policy in force and its revision", None, 200 => any),
    route!("put" "/v1/policy" "Import policy documents, all or nothing", Some(s::<m::PolicyImport>), 200 => s::<m::PolicyChange>),
    route!("delete" "/v1/policy" "Delete rules by labels, or all", None, 200 => s::<m::PolicyChange>,
        q: &[("labels", "k8s:key=value[,…]"), ("all", "true: every rule")]),
    route!("get" "/v1/policy/selectors" "The policy's selectors and the identities each selects", None, 200 => s::<Vec<crate::policy::SelectorUse>>),
    route!("post" "/v1/policy/trace" "Would a source reach a destination, and which rules decide", Some(s::<m::TraceRequest>), 200 => s::<crate::policy::Trace>),
    route!("get" "/v1/events" "The datapath's events from now on, streamed, one JSON object a line (ciliate monitor)", None, 200 => s::<m::MonitorEvent>,
        q: &[("type", "drop, trace or policy-verdict"), ("related-to", "only events from or to this endpoint ID")]),
    route!("get" "/v1/openapi.json" "This description", None, 200 => any),
];

/// Streams are newline-delimited JSON; everything else one JSON document.
fn content_type(path: &str) -> &'static str {
    if path == "/v1/events" { "application/x-ndjson" } else { "application/json" }
}

/// The OpenAPI 3.0 document of [`ROUTES`].
pub fn document() -> Value {
    let mut g = SchemaSettings::openapi3().into_generator();
    let error = s::<m::ApiError>(&mut g);
    let mut paths: Map<String, Value> = Map::new();
    for r in ROUTES {
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(r.query.iter().map(|(name, d)| {
            json!({"name": name, "in": "query", "required": false, "description": d, "schema": {"type": "string"}})
        }));
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}{}", r.method, r.path.replace(['/', '{', '}', '.'], "_")),
            "responses": {
                r.status.to_string(): {
                    "description": "success",
                    "content": {content_type(r.path): {"schema": (r.response)(&mut g)}},
                },
                "default": {
                    "description": "an error, naming what was wrong",
                    "content": {"application/json": {"schema": error.clone()}},
                },
            },
        });
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(req) = r.request {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": req(&mut g)}}});
        }
        let item = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        item[r.method] = op;
    }
    let schemas: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Ciliate agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The node agent's API on its unix socket: endpoints (CNI), IPAM, identities, policy, services, the cluster's store.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
