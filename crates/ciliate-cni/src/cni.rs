//! The plugin's logic, callable from tests with an environment and stdin.

use std::{collections::HashMap, path::PathBuf};

use ciliate_api::{
    Client, ClientError,
    client::method,
    models::{
        Endpoint, EndpointCreate, GcRequest, GcResult, IpamAllocation, IpamRequest, NamedPort,
        check_labels, valid_port_name,
    },
};
use ciliate_datapath::node::{
    PodLink, addresses_in, create_pod_link, delete_device, device_exists, lxc_name,
};
use serde_json::{Value, json};

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: CHECK found the interface not as ADD left it.
    pub const CHECK_FAILED: u32 = 100;
}

#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

/// The agent's answer as a CNI error: an agent that is down, went away
/// mid-request or is not ready yet → try again later; a request it
/// refused → invalid configuration; anything else → I/O failure.
fn agent_err(what: &str) -> impl FnOnce(ClientError) -> CniError + '_ {
    move |e| match &e {
        ClientError::Unreachable { .. } => {
            err(code::TRY_AGAIN, format!("{what}: agent unreachable"), e.to_string())
        }
        ClientError::Transport { .. } | ClientError::Api { status: 503, .. } => err(
            code::TRY_AGAIN,
            format!("{what}: the agent went away or is not ready"),
            e.to_string(),
        ),
        ClientError::Api { status: 400, message } => {
            err(code::INVALID_CONFIG, format!("{what}: {message}"), e.to_string())
        }
        _ => err(code::IO_FAILURE, format!("{what} failed"), e.to_string()),
    }
}

struct Conf {
    version: String,
    socket: PathBuf,
    mtu: u32,
    labels: Vec<(String, String)>,
    named_ports: std::collections::BTreeMap<String, NamedPort>,
    raw: Value,
}

fn parse_conf(stdin: &str) -> Result<Conf, CniError> {
    let raw: Value = serde_json::from_str(stdin).map_err(|e| {
        err(code::DECODE_FAILURE, "network configuration is not valid JSON", e.to_string())
    })?;
    let obj = raw
        .as_object()
        .ok_or_else(|| err(code::INVALID_CONFIG, "network configuration is not an object", ""))?;
    let version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| err(code::INVALID_CONFIG, "cniVersion is missing", ""))?
        .to_owned();
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(err(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version} is not supported"),
            format!("supported: {}", SUPPORTED.join(", ")),
        ));
    }
    if obj.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(err(code::INVALID_CONFIG, "name is missing", ""));
    }
    let mtu = match obj.get("mtu") {
        None => 1500,
        Some(v) => v.as_u64().filter(|m| (576..=65535).contains(m)).ok_or_else(|| {
            err(code::INVALID_CONFIG, format!("mtu {v}: a number from 576 to 65535"), "")
        })? as u32,
    };
    let socket = match obj.get("agent_socket") {
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            ciliate_api::default_socket(host.trim())
        }
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(v) => return Err(err(code::INVALID_CONFIG, format!("agent_socket {v}: a path"), "")),
    };
    let mut labels = Vec::new();
    let args = obj.get("args");
    if let Some(list) = args.and_then(|a| a.pointer("/cni/labels")) {
        let list = list
            .as_array()
            .ok_or_else(|| err(code::INVALID_CONFIG, "args.cni.labels is not a list", ""))?;
        for l in list {
            let (Some(k), Some(v)) =
                (l.get("key").and_then(Value::as_str), l.get("value").and_then(Value::as_str))
            else {
                return Err(err(
                    code::INVALID_CONFIG,
                    format!("args.cni.labels entry {l}: needs key and value strings"),
                    "",
                ));
            };
            labels.push((k.to_owned(), v.to_owned()));
        }
    }
    if let Some(map) = args.and_then(|a| a.get("labels")) {
        let map = map
            .as_object()
            .ok_or_else(|| err(code::INVALID_CONFIG, "args.labels is not an object", ""))?;
        for (k, v) in map {
            let v = v.as_str().ok_or_else(|| {
                err(code::INVALID_CONFIG, format!("args.labels.{k} is not a string"), "")
            })?;
            labels.push((k.clone(), v.to_owned()));
        }
    }
    // `args.namedPorts`: {"http": 80} or {"dns": {"port": 53, "protocol": "UDP"}}
    // (the pod's container ports, which a runtime without Kubernetes knows).
    let mut named_ports = std::collections::BTreeMap::new();
    if let Some(map) = args.and_then(|a| a.get("namedPorts")) {
        let map = map
            .as_object()
            .ok_or_else(|| err(code::INVALID_CONFIG, "args.namedPorts is not an object", ""))?;
        for (name, v) in map {
            let (port, proto) = match v {
                Value::Number(n) => (n.as_u64(), "TCP".to_owned()),
                Value::Object(o) => (
                    o.get("port").and_then(Value::as_u64),
                    o.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_owned(),
                ),
                _ => (None, String::new()),
            };
            let port = port.filter(|p| (1..=65535).contains(p)).ok_or_else(|| {
                err(
                    code::INVALID_CONFIG,
                    format!("args.namedPorts.{name}: a port from 1 to 65535"),
                    "",
                )
            })?;
            if !valid_port_name(name) {
                return Err(err(
                    code::INVALID_CONFIG,
                    format!(
                        "args.namedPorts.{name}: a port name is 1-15 lowercase letters, digits and '-'"
                    ),
                    "",
                ));
            }
            if proto != "TCP" && proto != "UDP" {
                return Err(err(
                    code::INVALID_CONFIG,
                    format!("args.namedPorts.{name}: protocol {proto} is not TCP or UDP"),
                    "",
                ));
            }
            named_ports.insert(name.clone(), NamedPort { port: port as u16, protocol: proto });
        }
    }
    let as_map: std::collections::BTreeMap<String, String> = labels.iter().cloned().collect();
    check_labels(&as_map).map_err(|e| err(code::INVALID_CONFIG, e, ""))?;
    Ok(Conf { version, socket, mtu, labels, named_ports, raw })
}

struct Env<'a> {
    env: &'a HashMap<String, String>,
}

impl Env<'_> {
    fn required(&self, key: &str) -> Result<&str, CniError> {
        self.env
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| err(code::INVALID_ENV, format!("{key} is not set"), ""))
    }
    fn optional(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or("")
    }
    /// `CNI_ARGS`: `K=V;K=V`.
    fn cni_args(&self) -> Result<HashMap<String, String>, CniError> {
        let mut out = HashMap::new();
        for pair in self.optional("CNI_ARGS").split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                err(code::INVALID_ENV, format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"), "")
            })?;
            out.insert(k.to_owned(), v.to_owned());
        }
        Ok(out)
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

fn io_err(what: &str) -> impl FnOnce(ciliate_datapath::DatapathError) -> CniError + '_ {
    move |e| err(code::IO_FAILURE, format!("{what} failed"), e.to_string())
}

fn error_json(version: &str, e: &CniError) -> String {
    json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}).to_string()
}

/// Everything an invocation checks before it touches the agent or a
/// namespace: the network configuration, the command, `CNI_CONTAINERID`,
/// `CNI_IFNAME` and `CNI_ARGS` (the fuzz targets feed it anything). An
/// error carries a CNI code.
pub fn check_input(env: &HashMap<String, String>, stdin: &str) -> Result<(), CniError> {
    let env = Env { env };
    parse_conf(stdin)?;
    match env.optional("CNI_COMMAND") {
        "ADD" | "DEL" | "CHECK" => {
            attachment(&env)?;
            env.cni_args()?;
        }
        "STATUS" | "GC" | "VERSION" => {}
        other => {
            return Err(err(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not a CNI command"),
                "",
            ));
        }
    }
    Ok(())
}

/// Run one plugin invocation: (stdout, exit code).
pub fn run(env: &HashMap<String, String>, stdin: &str) -> (String, i32) {
    let env = Env { env };
    let command = env.optional("CNI_COMMAND").to_owned();
    if command == "VERSION" {
        return (json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}).to_string(), 0);
    }
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".into());
    let result = parse_conf(stdin).and_then(|conf| match command.as_str() {
        "ADD" => add(&env, &conf),
        "DEL" => del(&env, &conf).map(|()| String::new()),
        "CHECK" => check(&env, &conf).map(|()| String::new()),
        "STATUS" => status(&conf).map(|()| String::new()),
        "GC" => gc(&conf).map(|()| String::new()),
        "" => Err(err(code::INVALID_ENV, "CNI_COMMAND is not set", "")),
        other => {
            Err(err(code::INVALID_ENV, format!("CNI_COMMAND {other} is not a CNI command"), ""))
        }
    });
    match result {
        Ok(out) => (out, 0),
        Err(e) => (error_json(&version, &e), 1),
    }
}

fn attachment(env: &Env<'_>) -> Result<(String, String), CniError> {
    let container = env.required("CNI_CONTAINERID")?.to_owned();
    let ifname = env.required("CNI_IFNAME")?.to_owned();
    if !valid_ifname(&ifname) {
        return Err(err(
            code::INVALID_ENV,
            format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            "",
        ));
    }
    Ok((container, ifname))
}

fn add(env: &Env<'_>, conf: &Conf) -> Result<String, CniError> {
    let (container, ifname) = attachment(env)?;
    let netns = env.required("CNI_NETNS")?.to_owned();
    if !std::path::Path::new(&netns).exists() {
        return Err(err(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {netns} does not exist"),
            "",
        ));
    }
    if same_namespace(&netns, "/proc/self/ns/net") {
        return Err(err(
            code::INVALID_ENV,
            format!("CNI_NETNS {netns} is the node's own network namespace, not a pod's"),
            "",
        ));
    }
    let args = env.cni_args()?;
    let mut labels: std::collections::BTreeMap<String, String> =
        conf.labels.iter().cloned().collect();
    let ns = args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default();
    if !ns.is_empty() {
        labels.insert("io.kubernetes.pod.namespace".into(), ns.clone());
    }
    let pod_name = match args.get("K8S_POD_NAME") {
        Some(n) if !ns.is_empty() => format!("{ns}/{n}"),
        Some(n) => n.clone(),
        None => String::new(),
    };
    let client = Client::new(&conf.socket);
    let alloc: IpamAllocation = client
        .call(method::POST, "/v1/ipam", Some(&IpamRequest { owner: container.clone() }))
        .map_err(agent_err("allocating an address"))?;
    let lxc = lxc_name(&container, &ifname);
    // A repeated ADD (the runtime retries after a timeout): a pod whose
    // endpoint is whole keeps it untouched and gets the same result; a
    // broken one is rebuilt below.
    let eps: Vec<Endpoint> =
        client.get(&endpoint_of(&container)).map_err(agent_err("looking up the endpoint"))?;
    if let Some(ep) = eps.iter().find(|e| e.container_id == container)
        && ep.netns == netns
        && ep.ifname == ifname
        && ep.ip == alloc.ip
        && ep.state == "ready"
        && let Some(mac) = pod_mac_with(&netns, &ifname, ep)
    {
        return Ok(result_json(conf, ep, &mac, &alloc));
    }
    let link = PodLink {
        netns: &netns,
        ifname: &ifname,
        lxc: &lxc,
        ip: alloc.ip,
        gateway: alloc.gateway,
        mtu: conf.mtu,
    };
    match create_pod_link(&link).map_err(io_err("setting up the pod's interface")).and_then(|mac| {
        let req = EndpointCreate {
            container_id: container.clone(),
            netns: netns.clone(),
            ifname: ifname.clone(),
            host_ifname: lxc.clone(),
            ip: alloc.ip,
            mac: mac.clone(),
            labels,
            pod_name,
            named_ports: conf.named_ports.clone(),
        };
        client
            .call::<Endpoint>(method::PUT, "/v1/endpoint", Some(&req))
            .map_err(agent_err("creating the endpoint"))
            .map(|ep| (ep, mac))
    }) {
        Ok((ep, mac)) => Ok(result_json(conf, &ep, &mac, &alloc)),
        Err(e) => {
            // Undo: the host side takes the pair with it; the address goes
            // back to the pool.
            let _ = delete_device(&lxc);
            let target =
                format!("/v1/endpoint?container-id={}", ciliate_api::http::escape(&container));
            let _ = client.call::<Value>(method::DELETE, &target, None::<&()>);
            Err(e)
        }
    }
}

/// The API target of `container`'s endpoint (a list of none or one).
fn endpoint_of(container: &str) -> String {
    format!("/v1/endpoint?container-id={}", ciliate_api::http::escape(container))
}

/// Is the namespace at `a` the one at `b`? (Same device and inode.)
fn same_namespace(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// The MAC of the pod's interface when it carries the endpoint's address
/// and is the one the endpoint knows.
fn pod_mac_with(netns: &str, ifname: &str, ep: &Endpoint) -> Option<String> {
    let addrs = addresses_in(netns, ifname).ok()?;
    if !addrs.contains(&(ep.ip, 32)) {
        return None;
    }
    let mac = ciliate_datapath::node::mac_in(netns, ifname).ok()?;
    (mac.eq_ignore_ascii_case(&ep.mac)).then_some(mac)
}

fn result_json(conf: &Conf, ep: &Endpoint, mac: &str, alloc: &IpamAllocation) -> String {
    let gw = alloc.gateway.to_string();
    let mut ip = json!({"address": format!("{}/32", alloc.ip), "gateway": gw, "interface": 1});
    if conf.version.starts_with("0.3") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": conf.version,
        "interfaces": [
            {"name": ep.host_ifname, "mac": ep.host_mac},
            {"name": ep.ifname, "mac": mac, "sandbox": ep.netns},
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": gw}],
        "dns": {},
    })
    .to_string()
}

fn del(env: &Env<'_>, conf: &Conf) -> Result<(), CniError> {
    let (container, ifname) = attachment(env)?;
    let client = Client::new(&conf.socket);
    let lxc = lxc_name(&container, &ifname);
    // The host device is named too: an ADD cut short (the agent killed
    // mid-way) may have left datapath pieces for it without an endpoint.
    let target = format!(
        "/v1/endpoint?container-id={}&host-ifname={lxc}",
        ciliate_api::http::escape(&container)
    );
    client
        .call::<Value>(method::DELETE, &target, None::<&()>)
        .map_err(agent_err("deleting the endpoint"))?;
    delete_device(&lxc).map_err(io_err("deleting the host device"))
}

fn check(env: &Env<'_>, conf: &Conf) -> Result<(), CniError> {
    let (container, ifname) = attachment(env)?;
    let netns = env.required("CNI_NETNS")?;
    let eps: Vec<Endpoint> = Client::new(&conf.socket)
        .get(&endpoint_of(&container))
        .map_err(agent_err("looking up the endpoint"))?;
    let ep = eps.iter().find(|e| e.container_id == container).ok_or_else(|| {
        err(code::UNKNOWN_CONTAINER, format!("container {container} has no endpoint"), "")
    })?;
    if ep.state != "ready" {
        return Err(err(code::CHECK_FAILED, format!("endpoint {} is {}", ep.id, ep.state), ""));
    }
    let addrs = addresses_in(netns, &ifname).map_err(|e| {
        err(code::CHECK_FAILED, format!("interface {ifname} in {netns}"), e.to_string())
    })?;
    if !addrs.contains(&(ep.ip, 32)) {
        return Err(err(
            code::CHECK_FAILED,
            format!("{ifname} in {netns} does not have {}/32", ep.ip),
            format!("{addrs:?}"),
        ));
    }
    if !device_exists(&ep.host_ifname) {
        return Err(err(
            code::CHECK_FAILED,
            format!("host device {} is missing", ep.host_ifname),
            "",
        ));
    }
    // The pod's interface is the one the endpoint was made for (not a
    // rebuilt one the datapath knows nothing of).
    let mac = ciliate_datapath::node::mac_in(netns, &ifname).map_err(|e| {
        err(code::CHECK_FAILED, format!("interface {ifname} in {netns}"), e.to_string())
    })?;
    if !mac.eq_ignore_ascii_case(&ep.mac) {
        return Err(err(
            code::CHECK_FAILED,
            format!(
                "{ifname} in {netns} has MAC {mac}, endpoint {} was made for {}",
                ep.id, ep.mac
            ),
            "",
        ));
    }
    Ok(())
}

fn status(conf: &Conf) -> Result<(), CniError> {
    Client::new(&conf.socket)
        .get::<Value>("/v1/healthz")
        .map(drop)
        .map_err(|e| err(code::NOT_AVAILABLE, "the Ciliate agent is not available", e.to_string()))
}

fn gc(conf: &Conf) -> Result<(), CniError> {
    let valid = conf.raw.get("cni.dev/valid-attachments").map(|v| {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.get("containerID")?.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
    });
    let valid = match valid {
        None => Vec::new(),
        Some(Some(v)) => v,
        Some(None) => {
            return Err(err(code::INVALID_CONFIG, "cni.dev/valid-attachments is not a list", ""));
        }
    };
    // The veth pairs of removed pods went with their namespaces; what is
    // left is the agent's state: endpoints and addresses.
    Client::new(&conf.socket)
        .call::<GcResult>(method::POST, "/v1/gc", Some(&GcRequest { valid_container_ids: valid }))
        .map(drop)
        .map_err(agent_err("garbage collection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn code_of(out: &(String, i32)) -> u64 {
        assert_eq!(out.1, 1, "{}", out.0);
        serde_json::from_str::<Value>(&out.0).unwrap()["code"].as_u64().unwrap()
    }

    const CONF: &str = r#"{"cniVersion":"1.1.0","name":"ciliate","type":"ciliate-cni","agent_socket":"/nonexistent/agent.sock"}"#;

    /// A stand-in for a pod's namespace file: it exists and is not the
    /// plugin's own namespace (the plugin stops before using it).
    fn pod_ns() -> String {
        let p = std::env::temp_dir().join(format!("ciliate-cni-test-ns-{}", std::process::id()));
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    }

    fn add_env(netns: &str) -> HashMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns),
        ])
    }

    fn message_of(out: &(String, i32)) -> String {
        serde_json::from_str::<Value>(&out.0).unwrap()["msg"].as_str().unwrap().to_owned()
    }

    #[test]
    fn the_plugins_own_namespace_is_no_pods() {
        let out = run(&add_env("/proc/self/ns/net"), CONF);
        assert_eq!(code_of(&out), 4);
        assert!(message_of(&out).contains("node's own network namespace"), "{}", out.0);
    }

    #[test]
    fn reserved_labels_and_bad_port_names_are_invalid_configuration() {
        let ns = pod_ns();
        for (args, needle) in [
            (r#"{"labels":{"reserved:host":""}}"#, "reserved:host"),
            (r#"{"labels":{"reserved:world":""}}"#, "reserved:world"),
            (r#"{"cni":{"labels":[{"key":"reserved:health","value":""}]}}"#, "reserved:health"),
            (r#"{"labels":{"cidr:10.0.0.0/8":""}}"#, "cidr:10.0.0.0/8"),
            (r#"{"namedPorts":{"Http_X":80}}"#, "Http_X"),
            (r#"{"namedPorts":{"dns":{"port":53,"protocol":"SCTP"}}}"#, "protocol SCTP"),
        ] {
            let conf = CONF.replace("}", &format!(r#","args":{args}}}"#));
            let out = run(&add_env(&ns), &conf);
            assert_eq!(code_of(&out), 7, "{args}: {}", out.0);
            assert!(message_of(&out).contains(needle), "{args}: {}", out.0);
        }
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let (out, rc) = run(&env(&[("CNI_COMMAND", "VERSION")]), "");
        assert_eq!(rc, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), SUPPORTED.len());
    }

    #[test]
    fn config_and_environment_errors_have_the_spec_codes() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ];
        assert_eq!(code_of(&run(&env(&add), "{not json")), 6);
        assert_eq!(code_of(&run(&env(&add), r#"{"name":"x"}"#)), 7);
        assert_eq!(code_of(&run(&env(&add), r#"{"cniVersion":"9.9.9","name":"x"}"#)), 1);
        assert_eq!(code_of(&run(&env(&add), r#"{"cniVersion":"1.1.0","name":"x","mtu":10}"#)), 7);
        assert_eq!(
            code_of(&run(&env(&add), r#"{"cniVersion":"1.1.0","name":"x","args":{"labels":[1]}}"#)),
            7
        );
        assert_eq!(code_of(&run(&env(&add[..1]), CONF)), 4, "no container ID");
        let bad_if = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_NETNS", "/x"),
        ];
        assert_eq!(code_of(&run(&env(&bad_if), CONF)), 4);
        let gone = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent/ns"),
        ];
        assert_eq!(code_of(&run(&env(&gone), CONF)), 3);
        assert_eq!(code_of(&run(&env(&[("CNI_COMMAND", "FLY")]), CONF)), 4);
        let ns = pod_ns();
        let bad_args = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ns.as_str()),
            ("CNI_ARGS", "novalue"),
        ];
        let out = run(&env(&bad_args), CONF);
        assert_eq!(code_of(&out), 4);
        assert!(message_of(&out).contains("CNI_ARGS"), "{}", out.0);
    }

    #[test]
    fn an_unreachable_agent_is_status_50_and_try_again_for_add() {
        assert_eq!(code_of(&run(&env(&[("CNI_COMMAND", "STATUS")]), CONF)), 50);
        assert_eq!(code_of(&run(&add_env(&pod_ns()), CONF)), 11);
    }
}
