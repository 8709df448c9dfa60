//! The cluster's shared state behind one interface, [`KvStore`], with two
//! implementations:
//! - [`LocalStore`]: the embedded default: no server, a JSON file under a
//!   lock (the node's state directory, or one file shared by the nodes of
//!   a lab on one machine);
//! - [`Etcd`]: the etcd v3 API (through etcd's JSON gateway, `/v3/...`,
//!   over plain HTTP/1.1: no async runtime, no gRPC stack), with leases for
//!   what must vanish when its node does.
//!
//! Keys (Cilium's layout under our own prefix):
//! - `ciliate/state/nodes/v1/<node>`: a node (leased);
//! - `ciliate/state/ip/v1/default/<ip>`: an endpoint's address → identity
//!   and node (leased: a node that goes away takes its entries along);
//! - `ciliate/state/identities/v1/value/<labels>` and `.../id/<id>`:
//!   cluster-wide identities (created together in one transaction, so two
//!   nodes never give one label set two identities or one identity two
//!   label sets);
//! - `ciliate/state/ipam/v1/cidrs/<cidr>`: which node owns a pod CIDR of
//!   the cluster pool.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};

pub const NODES: &str = "ciliate/state/nodes/v1/";
pub const IPS: &str = "ciliate/state/ip/v1/default/";
pub const IDENTITY_VALUES: &str = "ciliate/state/identities/v1/value/";
pub const IDENTITY_IDS: &str = "ciliate/state/identities/v1/id/";
pub const CIDRS: &str = "ciliate/state/ipam/v1/cidrs/";

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kvstore {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("kvstore {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
    #[error("local kvstore {path}: {reason}")]
    Local { path: String, reason: String },
}

/// The operations the agent needs from a key-value store.
pub trait KvStore: Send + Sync {
    /// Where it is, for status: "local" or the etcd endpoints.
    fn describe(&self) -> String;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Every key under `prefix`, ordered.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError>;
    fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError>;
    /// Create every key of `kvs` only if none of them exists, atomically.
    /// `Ok(true)` when created.
    fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError>;
    fn delete(&self, key: &str) -> Result<(), KvError>;
    /// A lease of `ttl` seconds.
    fn grant(&self, ttl: i64) -> Result<i64, KvError>;
    /// Refresh `lease`; `Ok(false)` when it has expired.
    fn keepalive(&self, lease: i64) -> Result<bool, KvError>;
}

/// The local store: a JSON file, read and written under an exclusive lock
/// (`flock`) for every operation, so the agents of several nodes on one
/// machine (a lab) can share it with no server. Leases expire like etcd's:
/// a lease not kept alive for its TTL takes its keys along.
pub struct LocalStore {
    path: Option<PathBuf>,
    /// Without a path: the data in memory.
    mem: Mutex<LocalData>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct LocalData {
    kvs: BTreeMap<String, LocalValue>,
    /// Lease → expiry (ms since the epoch) and TTL (s).
    leases: BTreeMap<i64, (u64, i64)>,
    next_lease: i64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LocalValue {
    value: String,
    #[serde(default)]
    lease: Option<i64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl LocalData {
    /// Drop expired leases and their keys; whether anything went.
    fn expire(&mut self) -> bool {
        let now = now_ms();
        let dead: Vec<i64> =
            self.leases.iter().filter(|(_, (exp, _))| *exp < now).map(|(id, _)| *id).collect();
        for id in &dead {
            self.leases.remove(id);
        }
        let before = self.kvs.len();
        self.kvs.retain(|_, v| v.lease.is_none_or(|l| !dead.contains(&l)));
        !dead.is_empty() || before != self.kvs.len()
    }
}

impl LocalStore {
    pub fn open(path: Option<PathBuf>) -> Result<Self, KvError> {
        let s = Self { path, mem: Mutex::new(LocalData::default()) };
        s.with(|_| ((), false))?;
        Ok(s)
    }

    fn err(&self, reason: impl std::fmt::Display) -> KvError {
        let path = self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        KvError::Local { path, reason: reason.to_string() }
    }

    /// Run `f` on the data under the lock; `f` returns its result and
    /// whether it changed the data, which is then saved (as after expiry).
    fn with<R>(&self, f: impl FnOnce(&mut LocalData) -> (R, bool)) -> Result<R, KvError> {
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = &self.path else {
            mem.expire();
            return Ok(f(&mut mem).0);
        };
        use std::os::fd::AsRawFd;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_extension("lock"))
            .map_err(|e| self.err(e))?;
        // SAFETY: flock on an open descriptor; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        let mut data: LocalData =
            crate::store::load(path).map_err(|e| self.err(e))?.unwrap_or_default();
        let expired = data.expire();
        let (r, changed) = f(&mut data);
        if expired || changed {
            crate::store::save(path, &data).map_err(|e| self.err(e))?;
        }
        Ok(r)
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

impl KvStore for LocalStore {
    fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("local {}", p.display()),
            None => "local (memory)".into(),
        }
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.with(|d| (d.kvs.get(key).map(|v| v.value.clone().into_bytes()), false))
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        self.with(|d| {
            let found = d
                .kvs
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.value.clone().into_bytes()))
                .collect();
            (found, false)
        })
    }
    fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError> {
        self.with(|d| {
            let v = LocalValue { value: text(value), lease };
            let old = d.kvs.insert(key.to_owned(), v);
            ((), old.is_none_or(|o| o.value != text(value) || o.lease != lease))
        })
    }
    fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError> {
        self.with(|d| {
            if kvs.iter().any(|(k, _)| d.kvs.contains_key(*k)) {
                return (false, false);
            }
            for (k, v) in kvs {
                d.kvs.insert((*k).to_owned(), LocalValue { value: text(v), lease });
            }
            (true, true)
        })
    }
    fn delete(&self, key: &str) -> Result<(), KvError> {
        self.with(|d| ((), d.kvs.remove(key).is_some()))
    }
    fn grant(&self, ttl: i64) -> Result<i64, KvError> {
        self.with(|d| {
            d.next_lease += 1;
            let id = d.next_lease;
            d.leases.insert(id, (now_ms() + ttl.max(1) as u64 * 1000, ttl));
            (id, true)
        })
    }
    fn keepalive(&self, lease: i64) -> Result<bool, KvError> {
        self.with(|d| match d.leases.get_mut(&lease) {
            Some((exp, ttl)) => {
                *exp = now_ms() + (*ttl).max(1) as u64 * 1000;
                (true, true)
            }
            None => (false, false),
        })
    }
}

/// etcd through its v3 JSON gateway.
pub struct Etcd {
    endpoints: Vec<String>,
    timeout: Duration,
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn b64(v: &[u8]) -> String {
    B64.encode(v)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str().and_then(|s| B64.decode(s).ok()).unwrap_or_default()
}

/// A gateway integer (int64s travel as strings).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_i64().unwrap_or(0),
    }
}

impl Etcd {
    /// `endpoints`: `host:port` or `http://host:port`, comma-separated.
    pub fn new(endpoints: &str) -> Result<Self, String> {
        let eps: Vec<String> = endpoints
            .split(',')
            .map(|e| e.trim().trim_start_matches("http://").trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if eps.is_empty() {
            return Err(format!("etcd endpoints {endpoints:?}: none given"));
        }
        for e in &eps {
            if e.starts_with("https://") {
                return Err(format!("etcd endpoint {e}: TLS is not supported yet"));
            }
            if e.to_socket_addrs().map(|mut a| a.next().is_none()).unwrap_or(true) {
                return Err(format!("etcd endpoint {e}: not host:port"));
            }
        }
        Ok(Self { endpoints: eps, timeout: Duration::from_secs(2) })
    }

    fn call_one(&self, ep: &str, path: &str, body: &Value) -> Result<Value, KvError> {
        let unreachable = |reason: String| KvError::Unreachable { endpoint: ep.to_owned(), reason };
        let addr: SocketAddr = ep
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| unreachable("cannot resolve".into()))?;
        let mut s = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| unreachable(e.to_string()))?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| unreachable(e.to_string()))?;
        s.set_write_timeout(Some(self.timeout)).map_err(|e| unreachable(e.to_string()))?;
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| unreachable(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| unreachable(e.to_string()))?;
        let proto = |reason: String| KvError::Protocol { endpoint: ep.to_owned(), reason };
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| proto("no HTTP header in the answer".into()))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut payload = raw[split + 4..].to_vec();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            payload = dechunk(&payload);
        }
        // A streaming call (keepalive) answers one JSON object per line.
        let first = payload.split(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap_or(&[]);
        let v: Value = serde_json::from_slice(first)
            .map_err(|e| proto(format!("{path}: bad JSON ({e}): {}", text(first))))?;
        if status != 200 {
            return Err(proto(format!("{path}: HTTP {status}: {v}")));
        }
        Ok(v.get("result").cloned().unwrap_or(v))
    }

    /// Call `path` on the first endpoint that answers.
    fn call(&self, path: &str, body: Value) -> Result<Value, KvError> {
        let mut last = None;
        for ep in &self.endpoints {
            match self.call_one(ep, path, &body) {
                Ok(v) => return Ok(v),
                Err(e @ KvError::Unreachable { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let n = usize::from_str_radix(text(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}

fn put_req(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut r = json!({"key": b64(key.as_bytes()), "value": b64(value)});
    if let Some(l) = lease {
        r["lease"] = json!(l.to_string());
    }
    r
}

impl KvStore for Etcd {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))?;
        Ok(v["kvs"].as_array().and_then(|a| a.first()).map(|kv| unb64(&kv["value"])))
    }
    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let v = self.call(
            "/v3/kv/range",
            json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
        )?;
        let mut out: Vec<(String, Vec<u8>)> = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(|kv| (text(&unb64(&kv["key"])), unb64(&kv["value"]))).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
    fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError> {
        self.call("/v3/kv/put", put_req(key, value, lease)).map(drop)
    }
    fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError> {
        let compare: Vec<Value> = kvs
            .iter()
            .map(|(k, _)| {
                json!({"key": b64(k.as_bytes()), "target": "CREATE", "result": "EQUAL",
                       "create_revision": "0"})
            })
            .collect();
        let success: Vec<Value> =
            kvs.iter().map(|(k, v)| json!({"request_put": put_req(k, v, lease)})).collect();
        let v = self.call("/v3/kv/txn", json!({"compare": compare, "success": success}))?;
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }
    fn delete(&self, key: &str) -> Result<(), KvError> {
        self.call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())})).map(drop)
    }
    fn grant(&self, ttl: i64) -> Result<i64, KvError> {
        let v = self.call("/v3/lease/grant", json!({"TTL": ttl.to_string()}))?;
        match int(&v["ID"]) {
            0 => Err(KvError::Protocol {
                endpoint: self.describe(),
                reason: format!("lease grant: {v}"),
            }),
            id => Ok(id),
        }
    }
    fn keepalive(&self, lease: i64) -> Result<bool, KvError> {
        let v = self.call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))?;
        Ok(int(&v["TTL"]) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_store_creates_atomically_and_lists_by_prefix() {
        let s = LocalStore::open(None).unwrap();
        assert!(s.create_all(&[("a/1", b"x"), ("b/1", b"y")], None).unwrap());
        assert!(!s.create_all(&[("a/2", b"z"), ("b/1", b"w")], None).unwrap(), "b/1 exists");
        assert_eq!(s.get("a/2").unwrap(), None, "nothing of a refused create is written");
        s.put("a/3", b"q", None).unwrap();
        let l: Vec<String> = s.list("a/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(l, ["a/1", "a/3"]);
        s.delete("a/1").unwrap();
        assert_eq!(s.get("a/1").unwrap(), None);
    }

    #[test]
    fn local_leases_expire_with_their_keys_and_files_are_shared() {
        let path = std::env::temp_dir().join(format!("ciliate-kv-{}.json", std::process::id()));
        let a = LocalStore::open(Some(path.clone())).unwrap();
        let b = LocalStore::open(Some(path.clone())).unwrap();
        let lease = a.grant(1).unwrap();
        a.put("n/1", b"node1", Some(lease)).unwrap();
        a.put("n/keep", b"x", None).unwrap();
        assert_eq!(b.get("n/1").unwrap().as_deref(), Some(&b"node1"[..]), "shared");
        std::thread::sleep(Duration::from_millis(700));
        assert!(a.keepalive(lease).unwrap());
        std::thread::sleep(Duration::from_millis(700));
        assert!(b.get("n/1").unwrap().is_some(), "kept alive");
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(b.get("n/1").unwrap(), None, "expired with its lease");
        assert!(!a.keepalive(lease).unwrap());
        assert!(b.get("n/keep").unwrap().is_some());
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    #[test]
    fn prefix_ends_and_chunks() {
        assert_eq!(prefix_end("a/"), b"a0");
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
        assert!(Etcd::new("").is_err());
        assert!(Etcd::new("https://x:1").is_err());
        assert!(Etcd::new("127.0.0.1:2379").is_ok());
    }
}
