//! The etcd store against a real etcd (Debian's etcd-server, started by the
//! test on loopback with a data directory of its own, killed and removed
//! by a guard): put/get/list/delete, atomic create, leases that expire
//! with their keys, watches that resume after etcd restarts or compacts,
//! TLS with client certificates, and a clear error when etcd is down.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ciliate_agent::kvstore::{Cond, Etcd, EtcdConfig, KvError, KvStore, Op, WatchEvent};
use tokio::sync::mpsc;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ciliate-{what}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// TLS material made with openssl: a CA, a server certificate for
/// 127.0.0.1 and a client certificate, all signed by the CA.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = TempDir::new("pki");
        let d = dir.0.clone();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&d).output().expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=ciliate-test-ca",
        ]);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (who, cn) in [("server", "127.0.0.1"), ("client", "ciliate-agent")] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{who}.crt"),
                "-extfile",
                &format!("{who}.ext"),
            ]);
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }
}

/// A running etcd; killed and its data removed on drop.
struct EtcdServer {
    child: Option<Child>,
    data: TempDir,
    client: u16,
    peer: u16,
    tls: Option<(String, String, String)>,
}

impl EtcdServer {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    async fn start_tls(pki: &Pki) -> Self {
        Self::start_with(Some((pki.path("server.crt"), pki.path("server.key"), pki.path("ca.crt"))))
            .await
    }

    async fn start_with(tls: Option<(String, String, String)>) -> Self {
        let mut s = Self {
            child: None,
            data: TempDir::new("etcd"),
            client: free_port(),
            peer: free_port(),
            tls,
        };
        s.spawn().await;
        s
    }

    fn scheme(&self) -> &str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client)
    }

    /// Start etcd (again, on the same ports and data) and wait until it
    /// answers.
    async fn spawn(&mut self) {
        let (client, peer) = (self.endpoint(), format!("http://127.0.0.1:{}", self.peer));
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(self.data.0.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key, ca)) = &self.tls {
            cmd.args([
                "--cert-file",
                cert,
                "--key-file",
                key,
                "--trusted-ca-file",
                ca,
                "--client-cert-auth",
            ]);
        }
        self.child = Some(
            cmd.spawn().expect("etcd (apt package etcd-server; scripts/bootstrap installs it)"),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpListener::bind(("127.0.0.1", self.client)).is_ok()
            || std::net::TcpStream::connect(("127.0.0.1", self.client)).is_err()
        {
            assert!(Instant::now() < deadline, "etcd did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn plain(server: &EtcdServer) -> Etcd {
    let s = Etcd::connect(&EtcdConfig::plain(&server.endpoint()).unwrap()).await.unwrap();
    // Wait until etcd serves requests (it listens before it has a leader).
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.get("ping").await.is_err() {
        assert!(Instant::now() < deadline, "etcd does not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}

/// The next event, within 10 s.
async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
}

/// The next event that is not an error report (the watch says when it
/// lost etcd, then resumes).
async fn next_change(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    loop {
        match next(rx).await {
            WatchEvent::Error(_) => continue,
            e => return e,
        }
    }
}

#[tokio::test]
async fn the_etcd_store_reads_writes_creates_atomically_and_expires_leases() {
    let server = EtcdServer::start().await;
    let s = plain(&server).await;
    s.put("a/1", b"one", None).await.unwrap();
    s.put("a/2", b"two", None).await.unwrap();
    s.put("b/1", b"other", None).await.unwrap();
    assert_eq!(s.get("a/1").await.unwrap().as_deref(), Some(&b"one"[..]));
    let keys: Vec<String> = s.list("a/").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["a/1", "a/2"]);
    assert!(s.create_all(&[("c/1", b"x"), ("c/2", b"y")], None).await.unwrap());
    assert!(!s.create_all(&[("c/3", b"x"), ("c/2", b"z")], None).await.unwrap(), "c/2 exists");
    assert_eq!(s.get("c/3").await.unwrap(), None, "a refused transaction writes nothing");
    s.delete("a/1").await.unwrap();
    assert_eq!(s.get("a/1").await.unwrap(), None);

    let lease = s.grant(2).await.unwrap();
    s.put("n/1", b"leased", Some(lease)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(s.keepalive(lease).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(s.get("n/1").await.unwrap().is_some(), "kept alive");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("n/1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the lease did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!s.keepalive(lease).await.unwrap(), "an expired lease is reported");

    drop(server);
    match s.get("a/2").await {
        Err(KvError::Unreachable { endpoint, .. }) => {
            assert!(endpoint.contains("127.0.0.1:"), "{endpoint}")
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
}

/// The transactions identity allocation and garbage collection stand on,
/// with the same answers from etcd and the local store.
async fn transactions_hold_only_when_every_condition_does(s: &dyn KvStore) {
    s.put("ids/v/x", b"7", None).await.unwrap();
    s.put("ids/u/7/a", b"a", None).await.unwrap();
    s.put("ids/u/70/a", b"a", None).await.unwrap();
    let put = |k| [Op::Put(k, b"1", None)];
    assert!(s.txn(&[Cond::Equals("ids/v/x", b"7")], &put("t/1")).await.unwrap());
    assert!(!s.txn(&[Cond::Equals("ids/v/x", b"8")], &put("t/2")).await.unwrap(), "7 != 8");
    assert!(!s.txn(&[Cond::Equals("ids/none", b"7")], &put("t/2")).await.unwrap(), "missing");
    assert!(s.txn(&[Cond::Absent("ids/none")], &put("t/3")).await.unwrap());
    assert!(!s.txn(&[Cond::Absent("ids/v/x")], &put("t/4")).await.unwrap(), "present");
    assert!(!s.txn(&[Cond::NoneUnder("ids/u/7/")], &put("t/5")).await.unwrap(), "a user");
    assert!(s.txn(&[Cond::NoneUnder("ids/u/8/")], &put("t/6")).await.unwrap(), "no user");
    s.delete("ids/u/7/a").await.unwrap();
    // ids/u/70/ is not under ids/u/7/.
    let (when, then) = (
        [Cond::NoneUnder("ids/u/7/"), Cond::Equals("ids/v/x", b"7")],
        [Op::Delete("ids/v/x"), Op::Put("t/7", b"2", None)],
    );
    assert!(s.txn(&when, &then).await.unwrap());
    assert_eq!(s.get("ids/v/x").await.unwrap(), None);
    let keys: Vec<String> = s.list("t/").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["t/1", "t/3", "t/6", "t/7"], "refused transactions write nothing");
}

#[tokio::test]
async fn lists_and_watches_of_more_than_a_grpc_message_come_in_pages() {
    let server = EtcdServer::start().await;
    let s = plain(&server).await;
    // 2,500 keys of 2 KiB: 5 MB, past gRPC's 4 MiB answer limit.
    let value = vec![b'x'; 2048];
    for chunk in (0..2500).collect::<Vec<u32>>().chunks(100) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("big/{i:05}")).collect();
        let ops: Vec<Op<'_>> = keys.iter().map(|k| Op::Put(k, &value, None)).collect();
        assert!(s.txn(&[], &ops).await.unwrap());
    }
    s.put("bigger", b"not under big/", None).await.unwrap();
    let all = s.list("big/").await.unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    let mut w = s.watch("big/").await.unwrap();
    match next(&mut w).await {
        WatchEvent::Sync(kvs) => assert_eq!(kvs.len(), 2500),
        other => panic!("expected the whole prefix, got {other:?}"),
    }
}

#[tokio::test]
async fn transactions_on_etcd_and_on_the_local_store() {
    let server = EtcdServer::start().await;
    transactions_hold_only_when_every_condition_does(&plain(&server).await).await;
    let local = ciliate_agent::kvstore::LocalStore::open(None).unwrap();
    transactions_hold_only_when_every_condition_does(&local).await;
}

#[tokio::test]
async fn a_watch_sees_changes_at_once_and_resumes_after_etcd_restarts() {
    let mut server = EtcdServer::start().await;
    let s = plain(&server).await;
    s.put("w/1", b"one", None).await.unwrap();
    let mut rx = s.watch("w/").await.unwrap();
    match next(&mut rx).await {
        WatchEvent::Sync(all) => assert_eq!(all, [("w/1".to_owned(), b"one".to_vec())]),
        e => panic!("expected the first list, got {e:?}"),
    }
    let t = Instant::now();
    s.put("w/2", b"two", None).await.unwrap();
    assert_eq!(next(&mut rx).await, WatchEvent::Put("w/2".into(), b"two".to_vec()));
    assert!(t.elapsed() < Duration::from_millis(500), "a watch, not a poll: {:?}", t.elapsed());
    s.put("x/1", b"elsewhere", None).await.unwrap();
    s.delete("w/1").await.unwrap();
    assert_eq!(
        next(&mut rx).await,
        WatchEvent::Delete("w/1".into()),
        "other prefixes are not seen"
    );

    // etcd goes away and comes back with the same data: the watch reports
    // the loss, then lists again and follows what changed since.
    server.stop();
    assert!(matches!(next(&mut rx).await, WatchEvent::Error(_)), "the loss is reported");
    server.spawn().await;
    let writer = plain(&server).await;
    writer.put("w/3", b"three", None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "the watch did not resume");
        match next_change(&mut rx).await {
            WatchEvent::Sync(all) if all.iter().any(|(k, _)| k == "w/3") => {
                let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(keys, ["w/2", "w/3"]);
                break;
            }
            WatchEvent::Put(k, _) if k == "w/3" => break,
            _ => continue,
        }
    }
    writer.put("w/4", b"four", None).await.unwrap();
    assert_eq!(next_change(&mut rx).await, WatchEvent::Put("w/4".into(), b"four".to_vec()));
}

#[tokio::test]
async fn a_watch_resumed_past_a_compaction_lists_everything_again() {
    let server = EtcdServer::start().await;
    let s = plain(&server).await;
    s.put("c/1", b"one", None).await.unwrap();
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await.unwrap();
    let rev = raw.get("c/1", None).await.unwrap().header().unwrap().revision();
    s.put("c/2", b"two", None).await.unwrap();
    s.delete("c/1").await.unwrap();
    let now = raw.get("c/", None).await.unwrap().header().unwrap().revision();
    raw.compact(now, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();

    let mut rx = s.watch_after("c/", rev);
    match next_change(&mut rx).await {
        WatchEvent::Sync(all) => assert_eq!(all, [("c/2".to_owned(), b"two".to_vec())]),
        e => panic!("a compacted revision must give a full list, got {e:?}"),
    }
    s.put("c/3", b"three", None).await.unwrap();
    assert_eq!(next_change(&mut rx).await, WatchEvent::Put("c/3".into(), b"three".to_vec()));
}

#[tokio::test]
async fn etcd_over_tls_with_a_client_certificate_from_a_cilium_style_config() {
    let pki = Pki::new();
    let server = EtcdServer::start_tls(&pki).await;
    let cfg_dir = TempDir::new("etcd-config");
    let write = |name: &str, text: String| {
        let p = cfg_dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write(
        "etcd.yaml",
        format!(
            "endpoints:\n- {}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n",
            server.endpoint(),
            pki.path("ca.crt"),
            pki.path("client.crt"),
            pki.path("client.key")
        ),
    );
    let s = Etcd::connect(&EtcdConfig::read(&good).unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = s.put("t/1", b"secure", None).await {
        assert!(Instant::now() < deadline, "TLS etcd does not answer: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.get("t/1").await.unwrap().as_deref(), Some(&b"secure"[..]));
    assert!(s.describe().contains("https://127.0.0.1:"), "{}", s.describe());

    // Without a client certificate etcd refuses the client; the error
    // names the endpoint.
    let no_cert = write(
        "no-cert.yaml",
        format!("endpoints:\n- {}\ntrusted-ca-file: {}\n", server.endpoint(), pki.path("ca.crt")),
    );
    let refused = Etcd::connect(&EtcdConfig::read(&no_cert).unwrap()).await;
    if let Ok(c) = refused {
        let e = c.get("t/1").await.expect_err("a client without a certificate is refused");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
    }

    // A config with a key but no certificate, or a typo'd field, is refused
    // before connecting, naming the file.
    let half = write(
        "half.yaml",
        format!("endpoints: [{}]\nkey-file: {}\n", server.endpoint(), pki.path("client.key")),
    );
    let e = EtcdConfig::read(&half).unwrap_err();
    assert!(e.contains("half.yaml") && e.contains("cert-file"), "{e}");
    let typo = write("typo.yaml", format!("endpoints: [{}]\ntrusted-ca: x\n", server.endpoint()));
    let e = EtcdConfig::read(&typo).unwrap_err();
    assert!(e.contains("typo.yaml") && e.contains("trusted-ca"), "{e}");
}
