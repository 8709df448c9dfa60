//! The etcd store against a real etcd (Debian's etcd-server, started by the
//! test on loopback with a data directory of its own, killed and removed
//! by a guard): put/get/list/delete, atomic create, leases that expire
//! with their keys, and a clear error when etcd is down.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ciliate_agent::kvstore::{Etcd, KvError, KvStore};

/// A running etcd; killed and its data removed on drop.
struct EtcdServer {
    child: Child,
    dir: std::path::PathBuf,
    endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdServer {
    fn start() -> Self {
        let (client, peer) = (free_port(), free_port());
        let dir =
            std::env::temp_dir().join(format!("ciliate-etcd-{}-{client}", std::process::id()));
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (apt package etcd-server; scripts/bootstrap installs it)");
        let s = Self { child, dir, endpoint: format!("127.0.0.1:{client}") };
        let store = Etcd::new(&s.endpoint).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while store.get("ping").is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_etcd_store_reads_writes_creates_atomically_and_expires_leases() {
    let server = EtcdServer::start();
    let s = Etcd::new(&server.endpoint).unwrap();
    s.put("a/1", b"one", None).unwrap();
    s.put("a/2", b"two", None).unwrap();
    s.put("b/1", b"other", None).unwrap();
    assert_eq!(s.get("a/1").unwrap().as_deref(), Some(&b"one"[..]));
    let keys: Vec<String> = s.list("a/").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert!(s.create_all(&[("c/1", b"x"), ("c/2", b"y")], None).unwrap());
    assert!(!s.create_all(&[("c/3", b"x"), ("c/2", b"z")], None).unwrap(), "c/2 exists");
    assert_eq!(s.get("c/3").unwrap(), None, "a refused transaction writes nothing");
    s.delete("a/1").unwrap();
    assert_eq!(s.get("a/1").unwrap(), None);

    let lease = s.grant(2).unwrap();
    s.put("n/1", b"leased", Some(lease)).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s.keepalive(lease).unwrap());
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s.get("n/1").unwrap().is_some(), "kept alive");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("n/1").unwrap().is_some() {
        assert!(Instant::now() < deadline, "the lease did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!s.keepalive(lease).unwrap(), "an expired lease is reported");

    drop(server);
    match s.get("a/2") {
        Err(KvError::Unreachable { endpoint, .. }) => assert!(endpoint.starts_with("127.0.0.1:")),
        other => panic!("expected unreachable, got {other:?}"),
    }
}
