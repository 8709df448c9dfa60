//! The cluster's shared state behind one async interface, [`KvStore`], with
//! two implementations:
//! - [`LocalStore`]: the embedded default: no server, a JSON file under a
//!   lock (the node's state directory, or one file shared by the nodes of
//!   a lab on one machine); watchers learn of changes through inotify on
//!   its directory;
//! - [`Etcd`]: etcd's v3 gRPC API through etcd-client: transactions,
//!   leases with keepalive, watches; optional TLS (`--etcd-config`).
//!
//! Watches ([`KvStore::watch`]) first deliver everything under a prefix
//! ([`WatchEvent::Sync`]), then each change; after a compaction, a lost
//! connection or an etcd restart they deliver a new `Sync` with everything
//! there is (the watcher diffs), then changes again. A watch ends when its
//! receiver is dropped.
//!
//! Keys (Cilium's layout under our own prefix):
//! - `ciliate/state/nodes/v1/<node>`: a node (leased);
//! - `ciliate/state/ip/v1/default/<ip>`: an endpoint's address → identity
//!   and node (leased: a node that goes away takes its entries along);
//! - `ciliate/state/identities/v1/value/<labels>` and `.../id/<id>`:
//!   cluster-wide identities (created together in one transaction, so two
//!   nodes never give one label set two identities or one identity two
//!   label sets);
//! - `ciliate/state/identities/v1/users/<id>/<node>`: a node has an
//!   endpoint of that identity (leased with the node's record; an identity
//!   no live node uses for the heartbeat timeout is released);
//! - `ciliate/state/ipam/v1/cidrs/<cidr>`: which node owns a pod CIDR of
//!   the cluster pool.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;

pub const NODES: &str = "ciliate/state/nodes/v1/";
pub const IPS: &str = "ciliate/state/ip/v1/default/";
pub const IDENTITY_VALUES: &str = "ciliate/state/identities/v1/value/";
pub const IDENTITY_IDS: &str = "ciliate/state/identities/v1/id/";
pub const IDENTITY_USERS: &str = "ciliate/state/identities/v1/users/";
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

/// What a watch delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Everything under the prefix now (first, and again after the watch
    /// had to start over): keys not in it are gone.
    Sync(Vec<(String, Vec<u8>)>),
    Put(String, Vec<u8>),
    Delete(String),
    /// The store failed; the watch retries on its own (a `Sync` follows
    /// once it is back).
    Error(String),
}

/// A condition of [`KvStore::txn`].
#[derive(Clone, Copy, Debug)]
pub enum Cond<'a> {
    /// The key holds exactly this value.
    Equals(&'a str, &'a [u8]),
    /// The key does not exist.
    Absent(&'a str),
    /// No key exists under the prefix.
    NoneUnder(&'a str),
}

/// An operation of [`KvStore::txn`].
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Put(&'a str, &'a [u8], Option<i64>),
    Delete(&'a str),
}

/// The operations the agent needs from a key-value store.
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    /// Where it is, for status: "local …" or "etcd …".
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Every key under `prefix`, ordered.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError>;
    async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError>;
    /// Create every key of `kvs` only if none of them exists, atomically.
    /// `Ok(true)` when created.
    async fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError>;
    async fn delete(&self, key: &str) -> Result<(), KvError>;
    /// Apply every operation of `then` if every condition of `when` holds,
    /// atomically. `Ok(true)` when applied.
    async fn txn(&self, when: &[Cond<'_>], then: &[Op<'_>]) -> Result<bool, KvError>;
    /// A lease of `ttl` seconds.
    async fn grant(&self, ttl: i64) -> Result<i64, KvError>;
    /// Refresh `lease`; `Ok(false)` when it has expired.
    async fn keepalive(&self, lease: i64) -> Result<bool, KvError>;
    /// Watch every key under `prefix` (see the module comment).
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, KvError>;
}

/// Events a watch holds before its producer waits.
const WATCH_QUEUE: usize = 4096;

/// A store whose every operation is timed into
/// `cilium_kvstore_operations_duration_seconds`.
pub struct Metered {
    inner: Arc<dyn KvStore>,
    metrics: crate::metrics::Metrics,
}

impl Metered {
    pub fn new(inner: Arc<dyn KvStore>, metrics: crate::metrics::Metrics) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        kind: &str,
        key: &str,
        f: impl std::future::Future<Output = Result<T, KvError>>,
    ) -> Result<T, KvError> {
        let t = std::time::Instant::now();
        let r = f.await;
        self.metrics.kvstore_op(kind, key, t.elapsed(), r.is_ok());
        r
    }
}

#[async_trait::async_trait]
impl KvStore for Metered {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.timed("Get", key, self.inner.get(key)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        self.timed("ListPrefix", prefix, self.inner.list(prefix)).await
    }
    async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError> {
        self.timed("Update", key, self.inner.put(key, value, lease)).await
    }
    async fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError> {
        let key = kvs.first().map_or("", |(k, _)| *k);
        self.timed("CreateOnly", key, self.inner.create_all(kvs, lease)).await
    }
    async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.timed("Delete", key, self.inner.delete(key)).await
    }
    async fn txn(&self, when: &[Cond<'_>], then: &[Op<'_>]) -> Result<bool, KvError> {
        let key = match then.first() {
            Some(Op::Put(k, ..) | Op::Delete(k)) => *k,
            None => "",
        };
        self.timed("Txn", key, self.inner.txn(when, then)).await
    }
    async fn grant(&self, ttl: i64) -> Result<i64, KvError> {
        self.timed("LeaseGrant", "lease", self.inner.grant(ttl)).await
    }
    async fn keepalive(&self, lease: i64) -> Result<bool, KvError> {
        self.timed("LeaseKeepAlive", "lease", self.inner.keepalive(lease)).await
    }
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, KvError> {
        self.timed("Watch", prefix, self.inner.watch(prefix)).await
    }
}

// ---------------------------------------------------------------------
// The local store.

/// The local store: a JSON file, read and written under an exclusive lock
/// (`flock`) for every operation, so the agents of several nodes on one
/// machine (a lab) can share it with no server. Leases expire like etcd's:
/// a lease not kept alive for its TTL takes its keys along.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    path: Option<PathBuf>,
    /// Without a path: the data in memory.
    mem: Mutex<LocalData>,
    /// Without a path, watchers are told of changes in-process.
    changed: tokio::sync::broadcast::Sender<()>,
    /// Watchers read the file again at least this often (which also
    /// expires the leases of nodes that stopped).
    tick: Duration,
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

    fn under(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.value.clone().into_bytes()))
            .collect()
    }
}

impl LocalStore {
    pub fn open(path: Option<PathBuf>) -> Result<Self, KvError> {
        Self::open_with_tick(path, Duration::from_secs(1))
    }

    /// [`LocalStore::open`] with watchers that read the file again every
    /// `tick` when nothing wakes them (tests show inotify with a long one).
    pub fn open_with_tick(path: Option<PathBuf>, tick: Duration) -> Result<Self, KvError> {
        let s = Self {
            inner: Arc::new(LocalInner {
                path,
                mem: Mutex::new(LocalData::default()),
                changed: tokio::sync::broadcast::channel(16).0,
                tick,
            }),
        };
        s.with(|_| ((), false))?;
        Ok(s)
    }

    fn err(&self, reason: impl std::fmt::Display) -> KvError {
        let path = self.inner.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        KvError::Local { path, reason: reason.to_string() }
    }

    /// Run `f` on the data under the lock; `f` returns its result and
    /// whether it changed the data, which is then saved (as after expiry).
    fn with<R>(&self, f: impl FnOnce(&mut LocalData) -> (R, bool)) -> Result<R, KvError> {
        let mut mem = self.inner.mem.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = &self.inner.path else {
            let expired = mem.expire();
            let (r, changed) = f(&mut mem);
            if expired || changed {
                let _ = self.inner.changed.send(());
            }
            return Ok(r);
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

    /// [`LocalStore::with`] off the runtime's workers.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalData) -> (R, bool) + Send + 'static,
    ) -> Result<R, KvError> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.with(f))
            .await
            .map_err(|e| KvError::Local { path: String::new(), reason: e.to_string() })?
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

#[async_trait::async_trait]
impl KvStore for LocalStore {
    fn describe(&self) -> String {
        match &self.inner.path {
            Some(p) => format!("local {}", p.display()),
            None => "local (memory)".into(),
        }
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let key = key.to_owned();
        self.run(move |d| (d.kvs.get(&key).map(|v| v.value.clone().into_bytes()), false)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let prefix = prefix.to_owned();
        self.run(move |d| (d.under(&prefix), false)).await
    }
    async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError> {
        let (key, value) = (key.to_owned(), text(value));
        self.run(move |d| {
            let old = d.kvs.insert(key, LocalValue { value: value.clone(), lease });
            ((), old.is_none_or(|o| o.value != value || o.lease != lease))
        })
        .await
    }
    async fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError> {
        let kvs: Vec<(String, String)> =
            kvs.iter().map(|(k, v)| ((*k).to_owned(), text(v))).collect();
        self.run(move |d| {
            if kvs.iter().any(|(k, _)| d.kvs.contains_key(k)) {
                return (false, false);
            }
            for (k, v) in kvs {
                d.kvs.insert(k, LocalValue { value: v, lease });
            }
            (true, true)
        })
        .await
    }
    async fn delete(&self, key: &str) -> Result<(), KvError> {
        let key = key.to_owned();
        self.run(move |d| ((), d.kvs.remove(&key).is_some())).await
    }
    async fn txn(&self, when: &[Cond<'_>], then: &[Op<'_>]) -> Result<bool, KvError> {
        enum C {
            Equals(String, String),
            Absent(String),
            NoneUnder(String),
        }
        let when: Vec<C> = when
            .iter()
            .map(|c| match c {
                Cond::Equals(k, v) => C::Equals((*k).to_owned(), text(v)),
                Cond::Absent(k) => C::Absent((*k).to_owned()),
                Cond::NoneUnder(p) => C::NoneUnder((*p).to_owned()),
            })
            .collect();
        let then: Vec<(String, Option<(String, Option<i64>)>)> = then
            .iter()
            .map(|o| match o {
                Op::Put(k, v, l) => ((*k).to_owned(), Some((text(v), *l))),
                Op::Delete(k) => ((*k).to_owned(), None),
            })
            .collect();
        self.run(move |d| {
            let holds = when.iter().all(|c| match c {
                C::Equals(k, v) => d.kvs.get(k).is_some_and(|x| x.value == *v),
                C::Absent(k) => !d.kvs.contains_key(k),
                C::NoneUnder(p) => d.under(p).is_empty(),
            });
            if !holds {
                return (false, false);
            }
            for (k, op) in then {
                match op {
                    Some((value, lease)) => d.kvs.insert(k, LocalValue { value, lease }),
                    None => d.kvs.remove(&k),
                };
            }
            (true, true)
        })
        .await
    }
    async fn grant(&self, ttl: i64) -> Result<i64, KvError> {
        self.run(move |d| {
            d.next_lease += 1;
            let id = d.next_lease;
            d.leases.insert(id, (now_ms() + ttl.max(1) as u64 * 1000, ttl));
            (id, true)
        })
        .await
    }
    async fn keepalive(&self, lease: i64) -> Result<bool, KvError> {
        // The expiry moves, but no key changes: saved (other nodes read
        // it), yet nothing a watcher sees.
        self.run(move |d| match d.leases.get_mut(&lease) {
            Some((exp, ttl)) => {
                *exp = now_ms() + (*ttl).max(1) as u64 * 1000;
                (true, true)
            }
            None => (false, false),
        })
        .await
    }
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, KvError> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        // Listen for changes before the first read: a write between the two
        // would otherwise wait for the tick.
        let changed = self.inner.changed.subscribe();
        let files = self.inner.path.as_ref().and_then(|p| dir_events(p).ok());
        let first = self.list(prefix).await?;
        let _ = tx.send(WatchEvent::Sync(first.clone())).await;
        let (s, prefix) = (self.clone(), prefix.to_owned());
        tokio::spawn(async move { s.watch_loop(prefix, first, tx, changed, files).await });
        Ok(rx)
    }
}

impl LocalStore {
    /// Follow the file: on every change of its directory (another agent
    /// wrote it) or in-process write, read the prefix again and send what
    /// differs; at least once a tick (a second) too, which also expires the
    /// leases of nodes that stopped.
    async fn watch_loop(
        &self,
        prefix: String,
        mut last: Vec<(String, Vec<u8>)>,
        tx: mpsc::Sender<WatchEvent>,
        mut changed: tokio::sync::broadcast::Receiver<()>,
        mut files: Option<DirEvents>,
    ) {
        loop {
            let tick = tokio::time::sleep(self.inner.tick);
            tokio::select! {
                _ = tick => {}
                _ = changed.recv() => {}
                _ = async {
                    match &mut files {
                        Some(f) => { let _ = f.next_change().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
                _ = tx.closed() => return,
            }
            let now = match self.list(&prefix).await {
                Ok(now) => now,
                Err(e) => {
                    if tx.send(WatchEvent::Error(e.to_string())).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            for ev in diff(&last, &now) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            last = now;
        }
    }
}

/// The events that turn `old` into `new` (both ordered by key).
fn diff(old: &[(String, Vec<u8>)], new: &[(String, Vec<u8>)]) -> Vec<WatchEvent> {
    let old: BTreeMap<&String, &Vec<u8>> = old.iter().map(|(k, v)| (k, v)).collect();
    let new_map: BTreeMap<&String, &Vec<u8>> = new.iter().map(|(k, v)| (k, v)).collect();
    let mut out: Vec<WatchEvent> = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(&v))
        .map(|(k, v)| WatchEvent::Put(k.clone(), v.clone()))
        .collect();
    out.extend(
        old.keys().filter(|k| !new_map.contains_key(*k)).map(|k| WatchEvent::Delete((*k).clone())),
    );
    out
}

/// Changes of the file at `path`, through inotify on its directory (the
/// store renames its new content into place). Only events naming the file
/// count: the lock file beside it is closed after every read, and a
/// watcher woken by that would read again, close the lock, and spin.
struct DirEvents {
    stream: inotify::EventStream<Vec<u8>>,
    name: std::ffi::OsString,
}

fn dir_events(path: &std::path::Path) -> std::io::Result<DirEvents> {
    let dir = path.parent().unwrap_or(std::path::Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_owned();
    let ino = inotify::Inotify::init()?;
    ino.watches().add(dir, inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE)?;
    Ok(DirEvents { stream: ino.into_event_stream(vec![0u8; 4096])?, name })
}

impl DirEvents {
    async fn next_change(&mut self) -> Option<()> {
        use futures::StreamExt;
        loop {
            let ev = self.stream.next().await?.ok()?;
            if ev.name.as_deref() == Some(self.name.as_os_str()) {
                return Some(());
            }
        }
    }
}

// ---------------------------------------------------------------------
// etcd.

/// `--etcd-config`: Cilium's etcd configuration file (YAML).
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `https://host:port` (or `http://`, or `host:port`).
    pub endpoints: Vec<String>,
    #[serde(rename = "trusted-ca-file", default)]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(rename = "cert-file", default)]
    pub cert_file: Option<PathBuf>,
    #[serde(rename = "key-file", default)]
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Endpoints given as `host:port[,…]` (plain HTTP).
    pub fn plain(endpoints: &str) -> Result<Self, String> {
        let eps: Vec<String> =
            endpoints.split(',').map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
        let c = Self { endpoints: eps, ..Default::default() };
        c.check()?;
        Ok(c)
    }

    /// Read `--etcd-config`.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("etcd config {}: {e}", path.display()))?;
        let c: Self = serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("etcd config {}: {e}", path.display()))?;
        c.check().map_err(|e| format!("etcd config {}: {e}", path.display()))?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("no etcd endpoints".into());
        }
        for e in &self.endpoints {
            let hostport = e.trim_start_matches("https://").trim_start_matches("http://");
            let port = hostport
                .rsplit_once(':')
                .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok());
            if hostport.is_empty() || port.is_none() {
                return Err(format!("etcd endpoint {e:?}: not [scheme://]host:port"));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert-file and key-file go together".into());
        }
        Ok(())
    }

    fn tls(&self) -> bool {
        self.trusted_ca_file.is_some() || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

/// etcd through etcd-client (gRPC). Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: etcd_client::Client,
    described: String,
    /// Keepalive streams of the leases this store kept alive.
    keepers: Arc<
        tokio::sync::Mutex<
            HashMap<i64, (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
        >,
    >,
    timeout: Duration,
}

impl Etcd {
    /// A client of the etcd of `cfg` (it connects lazily: etcd may come up
    /// later).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, KvError> {
        let described = format!("etcd {}", cfg.endpoints.join(","));
        let bad = |reason: String| KvError::Protocol { endpoint: described.clone(), reason };
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let tls = cfg.tls();
        if tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.trusted_ca_file {
                let pem = std::fs::read(ca).map_err(|e| bad(format!("{}: {e}", ca.display())))?;
                t = t.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
                let cert = std::fs::read(c).map_err(|e| bad(format!("{}: {e}", c.display())))?;
                let key = std::fs::read(k).map_err(|e| bad(format!("{}: {e}", k.display())))?;
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        let eps: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let client = etcd_client::Client::connect(eps, Some(opts)).await.map_err(|e| {
            KvError::Unreachable { endpoint: described.clone(), reason: e.to_string() }
        })?;
        Ok(Self { client, described, keepers: Default::default(), timeout: Duration::from_secs(5) })
    }

    fn err(&self, e: etcd_client::Error) -> KvError {
        match e {
            // A status etcd itself sent (not one tonic made up for a lost
            // connection).
            etcd_client::Error::GRpcStatus(s)
                if !matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) =>
            {
                KvError::Protocol {
                    endpoint: self.described.clone(),
                    reason: s.message().to_owned(),
                }
            }
            e => KvError::Unreachable { endpoint: self.described.clone(), reason: e.to_string() },
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(KvError::Unreachable {
                endpoint: self.described.clone(),
                reason: format!("no answer within {:?}", self.timeout),
            }),
        }
    }

    /// Everything under `prefix` and the revision it was read at.
    /// Everything under `prefix` and the revision it was read at, in pages
    /// of [`LIST_PAGE`] keys read at that one revision: a single answer
    /// for 100,000 endpoints would pass gRPC's 4 MiB message limit (the
    /// watch then never starts).
    async fn list_at(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), KvError> {
        let mut kv = self.client.kv_client();
        let end = prefix_end(prefix.as_bytes());
        let (mut out, mut rev) = (Vec::new(), 0);
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut opts =
                etcd_client::GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let r = self.timed(kv.get(from.clone(), Some(opts))).await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            out.extend(r.kvs().iter().map(|kv| (text(kv.key()), kv.value().to_vec())));
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, rev)),
            }
        }
    }

    /// Follow `prefix` from revision `rev` on; start over (a new `Sync`)
    /// after a compaction, a cancelled watch or a lost etcd.
    async fn watch_loop(self, prefix: String, mut rev: i64, tx: mpsc::Sender<WatchEvent>) {
        let mut backoff = Duration::from_millis(100);
        let mut need_sync = false;
        loop {
            if tx.is_closed() {
                return;
            }
            if need_sync {
                match self.list_at(&prefix).await {
                    Ok((kvs, r)) => {
                        rev = r;
                        if tx.send(WatchEvent::Sync(kvs)).await.is_err() {
                            return;
                        }
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        if tx.send(WatchEvent::Error(e.to_string())).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            let mut wc = self.client.watch_client();
            let mut stream = match self.timed(wc.watch(prefix.as_str(), Some(opts))).await {
                Ok(w) => w,
                Err(e) => {
                    if tx.send(WatchEvent::Error(e.to_string())).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    need_sync = true;
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 || resp.canceled() {
                            // Compacted past what we had: start over.
                            need_sync = true;
                            break;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            rev = rev.max(kv.mod_revision());
                            let e = match ev.event_type() {
                                etcd_client::EventType::Put => {
                                    WatchEvent::Put(text(kv.key()), kv.value().to_vec())
                                }
                                etcd_client::EventType::Delete => {
                                    WatchEvent::Delete(text(kv.key()))
                                }
                            };
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        let why = match msg {
                            Err(e) => e.to_string(),
                            _ => "the watch stream ended".into(),
                        };
                        if tx.send(WatchEvent::Error(why)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        need_sync = true;
                        break;
                    }
                }
            }
        }
    }
}

/// Keys a list reads per request.
const LIST_PAGE: i64 = 1000;

/// The end of the key range of `prefix` (etcd's rule: the prefix with its
/// last byte below 0xff incremented; all keys when there is none).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait::async_trait]
impl KvStore for Etcd {
    fn describe(&self) -> String {
        self.described.clone()
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let mut kv = self.client.kv_client();
        let r = self.timed(kv.get(key, None)).await?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        Ok(self.list_at(prefix).await?.0)
    }
    async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), KvError> {
        let mut kv = self.client.kv_client();
        let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
        self.timed(kv.put(key, value, opts)).await.map(drop)
    }
    async fn create_all(&self, kvs: &[(&str, &[u8])], lease: Option<i64>) -> Result<bool, KvError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let when: Vec<Compare> =
            kvs.iter().map(|(k, _)| Compare::create_revision(*k, CompareOp::Equal, 0)).collect();
        let then: Vec<TxnOp> = kvs
            .iter()
            .map(|(k, v)| {
                TxnOp::put(*k, *v, lease.map(|l| etcd_client::PutOptions::new().with_lease(l)))
            })
            .collect();
        let mut kv = self.client.kv_client();
        let r = self.timed(kv.txn(Txn::new().when(when).and_then(then))).await?;
        Ok(r.succeeded())
    }
    async fn delete(&self, key: &str) -> Result<(), KvError> {
        let mut kv = self.client.kv_client();
        self.timed(kv.delete(key, None)).await.map(drop)
    }
    async fn txn(&self, when: &[Cond<'_>], then: &[Op<'_>]) -> Result<bool, KvError> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        // A compare over a range holds when it holds for every key in it;
        // over an empty range, against version 0 (etcd's rule).
        let when: Vec<Compare> = when
            .iter()
            .map(|c| match c {
                Cond::Equals(k, v) => Compare::value(*k, CompareOp::Equal, *v),
                Cond::Absent(k) => Compare::create_revision(*k, CompareOp::Equal, 0),
                Cond::NoneUnder(p) => Compare::version(*p, CompareOp::Equal, 0).with_prefix(),
            })
            .collect();
        let then: Vec<TxnOp> = then
            .iter()
            .map(|o| match o {
                Op::Put(k, v, l) => TxnOp::put(*k, *v, l.map(|l| PutOptions::new().with_lease(l))),
                Op::Delete(k) => TxnOp::delete(*k, None),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let r = self.timed(kv.txn(Txn::new().when(when).and_then(then))).await?;
        Ok(r.succeeded())
    }
    async fn grant(&self, ttl: i64) -> Result<i64, KvError> {
        let mut l = self.client.lease_client();
        Ok(self.timed(l.grant(ttl, None)).await?.id())
    }
    async fn keepalive(&self, lease: i64) -> Result<bool, KvError> {
        let mut keepers = self.keepers.lock().await;
        if let std::collections::hash_map::Entry::Vacant(slot) = keepers.entry(lease) {
            let mut l = self.client.lease_client();
            slot.insert(self.timed(l.keep_alive(lease)).await?);
        }
        let (keeper, stream) = keepers.get_mut(&lease).expect("inserted above");
        let sent = self.timed(keeper.keep_alive()).await;
        let answer = match sent {
            Ok(()) => match tokio::time::timeout(self.timeout, stream.message()).await {
                Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
                Ok(Ok(None)) => Err(KvError::Unreachable {
                    endpoint: self.described.clone(),
                    reason: "the keepalive stream ended".into(),
                }),
                Ok(Err(e)) => Err(self.err(e)),
                Err(_) => Err(KvError::Unreachable {
                    endpoint: self.described.clone(),
                    reason: "no keepalive answer".into(),
                }),
            },
            Err(e) => Err(e),
        };
        // A broken or expired keeper is made anew next time.
        if !matches!(answer, Ok(true)) {
            keepers.remove(&lease);
        }
        answer
    }
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, KvError> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let (kvs, rev) = self.list_at(prefix).await?;
        let _ = tx.send(WatchEvent::Sync(kvs)).await;
        tokio::spawn(self.clone().watch_loop(prefix.to_owned(), rev, tx));
        Ok(rx)
    }
}

impl Etcd {
    /// Resume following `prefix` after revision `rev` (what a watch does
    /// after losing its stream). If etcd compacted past `rev`, the first
    /// event is a `Sync` with everything under the prefix.
    pub fn watch_after(&self, prefix: &str, rev: i64) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(self.clone().watch_loop(prefix.to_owned(), rev, tx));
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_store_creates_atomically_and_lists_by_prefix() {
        let s = LocalStore::open(None).unwrap();
        assert!(s.create_all(&[("a/1", b"x"), ("a/2", b"y")], None).await.unwrap());
        assert!(!s.create_all(&[("a/3", b"z"), ("a/1", b"w")], None).await.unwrap(), "a/1 exists");
        assert_eq!(s.get("a/3").await.unwrap(), None, "nothing of a failed create");
        s.put("b/1", b"q", None).await.unwrap();
        let keys: Vec<String> = s.list("a/").await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        s.delete("a/1").await.unwrap();
        assert_eq!(s.get("a/1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn local_leases_expire_with_their_keys_and_files_are_shared() {
        let dir = std::env::temp_dir().join(format!("ciliate-kv-{}", std::process::id()));
        let path = dir.join("kv.json");
        let (a, b) =
            (LocalStore::open(Some(path.clone())).unwrap(), LocalStore::open(Some(path)).unwrap());
        let lease = a.grant(1).await.unwrap();
        a.put("n/1", b"node", Some(lease)).await.unwrap();
        assert_eq!(
            b.get("n/1").await.unwrap().as_deref(),
            Some(&b"node"[..]),
            "one file, two stores"
        );
        assert!(b.keepalive(lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(a.get("n/1").await.unwrap(), None, "the lease expired with its key");
        assert!(!a.keepalive(lease).await.unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The next event of `rx` within a second.
    async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .expect("an event in time")
            .unwrap()
    }

    #[tokio::test]
    async fn a_local_watch_sees_writes_of_another_store_on_the_same_file() {
        let dir = std::env::temp_dir().join(format!("ciliate-kvw-{}", std::process::id()));
        let path = dir.join("kv.json");
        // b's watcher reads the file again only every hour unless inotify
        // wakes it: what it sees in time, inotify told it.
        let (a, b) = (
            LocalStore::open(Some(path.clone())).unwrap(),
            LocalStore::open_with_tick(Some(path.clone()), Duration::from_secs(3600)).unwrap(),
        );
        a.put("w/old", b"1", None).await.unwrap();
        let mut rx = b.watch("w/").await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Sync(vec![("w/old".into(), b"1".to_vec())]));
        a.put("w/new", b"2", None).await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Put("w/new".into(), b"2".to_vec()));
        a.put("x/other", b"3", None).await.unwrap();
        a.delete("w/old").await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Delete("w/old".into()));
        drop(rx);
        // A lease that expires takes its key, and a watch (with the usual
        // tick, which expires leases nobody writes about) says so.
        let c = LocalStore::open(Some(path)).unwrap();
        let mut rx = c.watch("w/").await.unwrap();
        let _ = next(&mut rx).await;
        let l = a.grant(1).await.unwrap();
        a.put("w/leased", b"4", Some(l)).await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Put("w/leased".into(), b"4".to_vec()));
        assert_eq!(next(&mut rx).await, WatchEvent::Delete("w/leased".into()));
        drop(rx);
        // The watcher may be reading (and creating the lock file) as the
        // directory goes: try again until it has stopped.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&dir).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[tokio::test]
    async fn a_local_watch_wakes_for_its_file_only() {
        let dir = std::env::temp_dir().join(format!("ciliate-kvd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.json");
        let mut ev = dir_events(&path).unwrap();
        let quiet = Duration::from_millis(300);
        // What every read does: open the lock beside the file for writing
        // and close it. Waking for that made each watcher read again.
        std::fs::write(path.with_extension("lock"), b"").unwrap();
        std::fs::write(dir.join("other.json"), b"{}").unwrap();
        assert!(
            tokio::time::timeout(quiet, ev.next_change()).await.is_err(),
            "woken by a file that is not the store"
        );
        crate::store::save(&path, &LocalData::default()).unwrap();
        assert_eq!(tokio::time::timeout(quiet, ev.next_change()).await, Ok(Some(())));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn an_in_memory_watch_is_told_in_process() {
        let s = LocalStore::open(None).unwrap();
        let mut rx = s.watch("p/").await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Sync(vec![]));
        s.put("p/1", b"x", None).await.unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Put("p/1".into(), b"x".to_vec()));
    }

    #[test]
    fn etcd_configs_are_checked() {
        assert!(EtcdConfig::plain("127.0.0.1:2379,10.0.0.2:2379").is_ok());
        assert!(EtcdConfig::plain("").unwrap_err().contains("no etcd endpoints"));
        assert!(EtcdConfig::plain("nohost").unwrap_err().contains("not [scheme://]host:port"));
        let dir = std::env::temp_dir().join(format!("ciliate-etcdcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("etcd.yaml");
        std::fs::write(&f, "endpoints: [\"https://127.0.0.1:2379\"]\ntrusted-ca-file: /ca.pem\ncert-file: /c.pem\nkey-file: /k.pem\n").unwrap();
        let c = EtcdConfig::read(&f).unwrap();
        assert!(c.tls() && c.cert_file.is_some());
        std::fs::write(&f, "endpoints: [\"127.0.0.1:2379\"]\ncert-file: /c.pem\n").unwrap();
        assert!(EtcdConfig::read(&f).unwrap_err().contains("go together"));
        std::fs::write(&f, "endpoint: x\n").unwrap();
        assert!(EtcdConfig::read(&f).unwrap_err().contains("endpoint"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
