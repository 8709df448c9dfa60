//! The agent's HTTP routes (see `ciliate_api` for the list) over a unix
//! socket only root can open. One thread per connection; the state is
//! behind one lock, held for the length of one request.

use std::{
    io::ErrorKind,
    os::unix::{fs::PermissionsExt, net::UnixListener},
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

use ciliate_api::{
    http::{self, Request, Response},
    models::{
        ApiError, GcRequest, GcResult, IpamAllocation, IpamRequest, PolicyChange, PolicyImport,
        Status, TraceRequest,
    },
};
use serde::{Serialize, de::DeserializeOwned};

use crate::endpoint::{Datapath, EndpointError, Endpoints};

pub struct Server<D: Datapath> {
    pub state: Mutex<Endpoints<D>>,
    /// Locked after `state` when both are needed (shared with the GC).
    pub services: Arc<Mutex<crate::services::Services>>,
    pub node: String,
    pub pin_dir: String,
    pub started: Instant,
    pub restored: usize,
    /// The cluster's store (`node list`, `kvstore get|list`).
    pub kv: Arc<dyn crate::kvstore::KvStore>,
    /// Written by the cluster sync.
    pub kv_status: Arc<Mutex<crate::cluster::KvStatus>>,
    pub routing: crate::cluster::Routing,
}

fn json<T: Serialize>(status: u16, v: &T) -> Response {
    Response { status, body: serde_json::to_vec(v).unwrap_or_default() }
}

fn error(status: u16, message: impl Into<String>) -> Response {
    json(status, &ApiError { message: message.into() })
}

fn from_err(e: EndpointError) -> Response {
    error(e.status(), e.to_string())
}

fn body<T: DeserializeOwned>(req: &Request, what: &str) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| error(400, format!("{what}: {e}")))
}

impl<D: Datapath> Server<D> {
    pub fn handle(&self, req: &Request) -> Response {
        match self.route(req) {
            Ok(r) | Err(r) => r,
        }
    }

    fn route(&self, req: &Request) -> Result<Response, Response> {
        let path = req
            .path
            .strip_prefix("/v1/")
            .ok_or_else(|| error(404, format!("no route {}", req.path)))?;
        let mut parts = path.trim_end_matches('/').splitn(2, '/');
        let (resource, arg) = (parts.next().unwrap_or(""), parts.next());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let m = req.method.as_str();
        Ok(match (m, resource, arg) {
            ("GET", "healthz", None) => json(200, &serde_json::json!({"status": "ok"})),
            ("GET", "status", None) => json(
                200,
                &Status {
                    node: self.node.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    pod_cidr: st.ipam.cidr.to_string(),
                    router_ip: st.ipam.cidr.router(),
                    endpoints: st.list().len(),
                    identities: st.identities.allocated(),
                    ipam_used: st.ipam.used(),
                    ipam_free: st.ipam.free(),
                    pin_dir: self.pin_dir.clone(),
                    uptime: self.started.elapsed().as_secs(),
                    restored_endpoints: self.restored,
                    kvstore: self.kv_text(),
                    cluster_nodes: self.kv_status().nodes,
                    routing: format!("{:?}", self.routing).to_lowercase(),
                },
            ),
            ("GET", "node", None) => {
                let nodes: Vec<crate::cluster::NodeRecord> = self
                    .kv
                    .list(crate::kvstore::NODES)
                    .map_err(|e| error(503, e.to_string()))?
                    .into_iter()
                    .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
                    .collect();
                json(200, &nodes)
            }
            ("GET", "kvstore", None) => {
                let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
                let pairs: Vec<ciliate_api::models::KvPair> =
                    match (req.query("key"), req.query("prefix")) {
                        (Some(k), _) => {
                            match self.kv.get(k).map_err(|e| error(503, e.to_string()))? {
                                Some(v) => vec![ciliate_api::models::KvPair {
                                    key: k.into(),
                                    value: text(v),
                                }],
                                None => return Err(error(404, format!("key {k:?} not found"))),
                            }
                        }
                        (None, p) => self
                            .kv
                            .list(p.unwrap_or(""))
                            .map_err(|e| error(503, e.to_string()))?
                            .into_iter()
                            .map(|(key, v)| ciliate_api::models::KvPair { key, value: text(v) })
                            .collect(),
                    };
                json(200, &pairs)
            }
            ("GET", "endpoint", None) => match req.query("container-id") {
                // One container's endpoint (none or one), checked.
                Some(c) => {
                    let id = st.by_container(c).map(|e| e.id);
                    let one: Vec<_> = id
                        .map(|id| st.get_checked(id))
                        .transpose()
                        .map_err(from_err)?
                        .into_iter()
                        .collect();
                    json(200, &one)
                }
                None => json(200, &st.list_checked()),
            },
            ("GET", "endpoint", Some(id)) => {
                json(200, &st.get_checked(parse_id(id)?).map_err(from_err)?)
            }
            ("PUT", "endpoint", None) => {
                let ep = st.create(body(req, "endpoint")?).map_err(from_err)?;
                self.endpoints_changed(&st);
                json(201, &ep)
            }
            ("DELETE", "endpoint", Some(id)) => {
                let ep = st.delete(parse_id(id)?).map_err(from_err)?;
                self.endpoints_changed(&st);
                json(200, &ep)
            }
            ("DELETE", "endpoint", None) => {
                let c = req
                    .query("container-id")
                    .ok_or_else(|| error(400, "container-id is required"))?;
                let r = st.delete_container(c, req.query("host-ifname")).map_err(from_err)?;
                self.endpoints_changed(&st);
                json(200, &r)
            }
            ("GET", "service", None) => json(200, &self.services().list()),
            ("GET", "service", Some(id)) => {
                json(200, &self.services().get(parse_service_id(id)?).map_err(svc_err)?)
            }
            ("PUT", "service", None) => {
                let spec = body(req, "service")?;
                let local = local_ips(&st);
                json(200, &self.services().update(spec, &local).map_err(svc_err)?)
            }
            ("DELETE", "service", Some(id)) => {
                json(200, &self.services().delete(parse_service_id(id)?).map_err(svc_err)?)
            }
            ("POST", "ipam", None) => {
                let r: IpamRequest = body(req, "ipam request")?;
                if r.owner.is_empty() {
                    return Err(error(400, "owner is empty"));
                }
                let ip = st.ipam.allocate(&r.owner).map_err(|e| error(503, e.to_string()))?;
                json(201, &IpamAllocation { ip, gateway: st.ipam.cidr.router(), owner: r.owner })
            }
            ("DELETE", "ipam", Some(ip)) => {
                let ip =
                    ip.parse().map_err(|_| error(400, format!("{ip:?} is not an IPv4 address")))?;
                st.release_ip(ip).map_err(from_err)?;
                json(200, &serde_json::json!({"released": ip}))
            }
            ("GET", "identity", None) => json(200, &st.identities.list()),
            ("GET", "identity", Some(id)) => {
                let n: u32 = id
                    .parse()
                    .map_err(|_| error(400, format!("identity {id:?} is not a number")))?;
                json(
                    200,
                    &st.identities
                        .get(n)
                        .ok_or_else(|| error(404, format!("identity {n} not found")))?,
                )
            }
            ("POST", "gc", None) => {
                let r: GcRequest = body(req, "gc request")?;
                json(200, &GcResult { removed: st.gc(&r.valid_container_ids).map_err(from_err)? })
            }
            ("GET", "policy", None) => json(200, &st.policy),
            ("GET", "policy", Some("selectors")) => {
                json(200, &crate::policy::selectors(&st.policy.rules, &st.identities.view()))
            }
            ("POST", "policy", Some("trace")) => {
                let r: TraceRequest = body(req, "trace request")?;
                json(200, &st.trace(&r).map_err(from_err)?)
            }
            ("PUT", "policy", None) => {
                let r: PolicyImport = body(req, "policy import")?;
                // Everything is validated before anything changes.
                let rules = crate::policy::parse(&r.text).map_err(|e| error(400, e.to_string()))?;
                let n = rules.len();
                let revision = st.import_policy(rules).map_err(from_err)?;
                json(200, &PolicyChange { revision, rules: n })
            }
            ("DELETE", "policy", None) => {
                let labels: Vec<String> = match (req.query("labels"), req.query("all")) {
                    (Some(l), _) if !l.is_empty() => l.split(',').map(str::to_owned).collect(),
                    (_, Some("true")) => Vec::new(),
                    _ => return Err(error(400, "give labels=LABEL[,LABEL] or all=true")),
                };
                let (removed, revision) = st.delete_policy(&labels).map_err(from_err)?;
                json(200, &PolicyChange { revision, rules: removed })
            }
            (
                _,
                "healthz" | "status" | "endpoint" | "ipam" | "identity" | "gc" | "policy"
                | "service",
                _,
            ) => error(405, format!("{m} /v1/{path} is not supported")),
            _ => error(404, format!("no route {m} {}", req.path)),
        })
    }
}

impl<D: Datapath> Server<D> {
    fn kv_status(&self) -> crate::cluster::KvStatus {
        self.kv_status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// "local /path: ok", "etcd host:port: failing for 12s (…), retrying".
    fn kv_text(&self) -> String {
        let st = self.kv_status();
        match (&st.error, st.ok) {
            (Some(e), _) => {
                format!("{}: failing for {}s ({e}), retrying", st.store, st.failing_for)
            }
            (None, true) => format!("{}: ok", st.store),
            (None, false) => format!("{}: connecting", st.store),
        }
    }

    fn services(&self) -> std::sync::MutexGuard<'_, crate::services::Services> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Services with a Local traffic policy follow this node's endpoints.
    fn endpoints_changed(&self, st: &Endpoints<D>) {
        if let Err(e) = self.services().refresh_local(&local_ips(st)) {
            eprintln!("[ciliate-agent] refreshing Local services: {e}");
        }
    }
}

/// This node's endpoint addresses.
pub fn local_ips<D: Datapath>(st: &Endpoints<D>) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
    st.list().iter().map(|e| e.ip).collect()
}

fn svc_err(e: crate::services::ServiceError) -> Response {
    error(e.status(), e.to_string())
}

fn parse_service_id(s: &str) -> Result<u16, Response> {
    s.parse().map_err(|_| error(400, format!("service ID {s:?} is not a number")))
}

/// The node's endpoints and identities, for the cluster sync.
impl<D: Datapath + 'static> crate::cluster::LocalState for Server<D> {
    fn endpoints(&self) -> Vec<(std::net::Ipv4Addr, u32)> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.list()
            .into_iter()
            .filter(|e| e.identity != ciliate_common::identity::HOST)
            .map(|e| (e.ip, e.identity))
            .collect()
    }

    fn learn_identities(&self, ids: Vec<(u32, Vec<String>)>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.identities.learn(ids) {
            Ok(true) => {
                if let Err(e) = st.regenerate() {
                    eprintln!("[ciliate-agent] regenerating policy after new identities: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => eprintln!("[ciliate-agent] saving learned identities: {e}"),
        }
    }
}

fn parse_id(s: &str) -> Result<u16, Response> {
    s.parse().map_err(|_| error(400, format!("endpoint ID {s:?} is not a number")))
}

/// Listen on `socket` (replacing a stale one) with mode 0600, and serve
/// forever.
pub fn serve<D: Datapath + 'static>(server: Arc<Server<D>>, socket: &Path) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let server = server.clone();
        std::thread::spawn(move || {
            let resp = match http::read_request(&conn) {
                Ok(req) => server.handle(&req),
                Err(e) => error(400, e.to_string()),
            };
            let _ = http::write_response(&conn, &resp);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::MemoryDatapath;

    fn server() -> Server<MemoryDatapath> {
        let st = Endpoints::open("10.9.0.0/24".parse().unwrap(), None, MemoryDatapath::default())
            .unwrap();
        let svcs = crate::services::Services::open(
            None,
            Box::new(crate::services::MemoryLb::default()),
            vec![],
            Default::default(),
        )
        .unwrap();
        Server {
            state: Mutex::new(st),
            services: Arc::new(Mutex::new(svcs)),
            kv: Arc::new(crate::kvstore::LocalStore::open(None).unwrap()),
            kv_status: Default::default(),
            routing: Default::default(),
            node: "n1".into(),
            pin_dir: "/x".into(),
            started: Instant::now(),
            restored: 0,
        }
    }

    fn call(
        s: &Server<MemoryDatapath>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let query = query
            .split('&')
            .filter(|q| !q.is_empty())
            .map(|q| {
                let (k, v) = q.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let r = s.handle(&Request {
            method: method.into(),
            path: path.into(),
            query,
            body: body.into(),
        });
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn ipam_endpoint_and_identity_routes() {
        let s = server();
        let (st, alloc) = call(&s, "POST", "/v1/ipam", r#"{"owner":"c1"}"#);
        assert_eq!(
            (st, alloc["ip"].as_str(), alloc["gateway"].as_str()),
            (201, Some("10.9.0.2"), Some("10.9.0.1"))
        );
        s.state.lock().unwrap().datapath.devices.push("lxc1".into());
        let create = serde_json::json!({
            "container_id": "c1", "netns": "/run/netns/p", "ifname": "eth0", "host_ifname": "lxc1",
            "ip": "10.9.0.2", "mac": "0a:00:00:00:00:01", "labels": {"app": "web"}
        });
        let (st, ep) = call(&s, "PUT", "/v1/endpoint", &create.to_string());
        assert_eq!((st, ep["id"].as_u64(), ep["identity"].as_u64()), (201, Some(1), Some(256)));
        assert_eq!(call(&s, "GET", "/v1/endpoint", "").1.as_array().unwrap().len(), 1);
        assert_eq!(call(&s, "GET", "/v1/endpoint/1", "").1["container_id"], "c1");
        assert_eq!(call(&s, "GET", "/v1/identity/256", "").1["labels"][0], "k8s:app=web");
        assert_eq!(call(&s, "GET", "/v1/status", "").1["endpoints"], 1);
        let (st, _) = call(&s, "DELETE", "/v1/endpoint?container-id=c1", "");
        assert_eq!(st, 200);
        assert_eq!(call(&s, "GET", "/v1/endpoint/1", "").0, 404);
        assert_eq!(call(&s, "DELETE", "/v1/endpoint?container-id=c1", "").0, 200, "idempotent");
    }

    #[test]
    fn a_bad_policy_is_refused_and_the_policy_in_force_stays() {
        let s = server();
        let good = serde_json::json!({"text": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n"});
        let (st, b) = call(&s, "PUT", "/v1/policy", &good.to_string());
        assert_eq!((st, b["revision"].as_u64()), (200, Some(1)), "{b}");
        let bad = serde_json::json!({"text": "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEntities: [moon]}]\n"});
        let (st, b) = call(&s, "PUT", "/v1/policy", &bad.to_string());
        assert_eq!(st, 400);
        assert!(b["message"].as_str().unwrap().contains("moon"), "{b}");
        let (_, p) = call(&s, "GET", "/v1/policy", "");
        assert_eq!((p["revision"].as_u64(), p["rules"].as_array().unwrap().len()), (Some(1), 1));
        let (st, b) = call(&s, "DELETE", "/v1/policy?all=true", "");
        assert_eq!((st, b["rules"].as_u64(), b["revision"].as_u64()), (200, Some(1), Some(2)));
        assert_eq!(call(&s, "DELETE", "/v1/policy", "").0, 400);
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let s = server();
        for (m, p, b, status, needle) in [
            ("GET", "/v2/endpoint", "", 404, "no route"),
            ("GET", "/v1/nothing", "", 404, "no route"),
            ("PATCH", "/v1/endpoint", "", 405, "not supported"),
            ("GET", "/v1/endpoint/abc", "", 400, "not a number"),
            ("GET", "/v1/endpoint/7", "", 404, "endpoint 7 not found"),
            ("PUT", "/v1/endpoint", "{", 400, "endpoint:"),
            ("POST", "/v1/ipam", r#"{"owner":""}"#, 400, "owner is empty"),
            ("DELETE", "/v1/ipam/10.9.0.50", "", 404, "not allocated"),
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
        ] {
            let (st, body) = call(&s, m, p, b);
            assert_eq!(st, status, "{m} {p}: {body}");
            assert!(body["message"].as_str().unwrap().contains(needle), "{m} {p}: {body}");
        }
    }
}
