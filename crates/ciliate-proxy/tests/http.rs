//! The HTTP proxy against real clients (curl, and raw TCP where curl
//! will not send what a test needs) on loopback: an upstream server, the
//! proxy in front of it with an L7 rule set, and requests allowed,
//! denied, pipelined, kept alive, smuggled, oversized and malformed.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use ciliate_proxy::{
    http::{DENIED_BODY, L7Event, L7Verdict, Limits, Policy, Redirect, serve},
    rules::{HttpRule, RuleSet},
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// FNV-1a of `b` (what the upstream reports of a body).
fn fnv(b: &[u8]) -> u64 {
    b.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3))
}

/// An upstream answering "<method> <target> <body length> <body fnv>"
/// and the headers it got (`x-*` only), HTTP/1.1 and h2c; counts its
/// connections.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (conns.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let mut xs: Vec<String> = parts
                                .headers
                                .iter()
                                .filter(|(k, _)| k.as_str().starts_with("x-"))
                                .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                                .collect();
                            xs.sort();
                            let line = format!(
                                "{} {} {} {:x} {}\n",
                                parts.method,
                                parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                                body.len(),
                                fnv(&body),
                                xs.join(",")
                            );
                            s.lock().unwrap().push(line.clone());
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(line))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, conns, seen)
}

struct Fixed(Redirect);

impl Policy for Fixed {
    fn redirect(&self, _: SocketAddr, _: SocketAddr) -> Option<Redirect> {
        Some(self.0.clone())
    }
}

const RULES: &str = r#"[
  {"method": "GET", "path": "/public(/.*)?"},
  {"method": "POST", "path": "/upload"},
  {"method": "GET", "path": "/team", "headerMatches": [{"name": "X-Team", "value": "a", "mismatch": "REPLACE"}]}
]"#;

struct Setup {
    proxy: SocketAddr,
    upstream_conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
    events: Arc<Mutex<Vec<L7Event>>>,
}

async fn setup_with(upstream_addr: Option<SocketAddr>) -> Setup {
    let (up, upstream_conns, seen) = upstream().await;
    let rules: Vec<HttpRule> = serde_json::from_str(RULES).unwrap();
    let redirect = Redirect {
        rules: Arc::new(RuleSet::compile(&rules).unwrap()),
        upstream: upstream_addr.unwrap_or(up),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = l.local_addr().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let limits = Limits { max_head: 16 * 1024, max_body: 64 << 20, ..Default::default() };
    tokio::spawn(serve(
        l,
        Arc::new(Fixed(redirect)),
        Arc::new(move |e| ev.lock().unwrap().push(e)),
        limits,
    ));
    Setup { proxy, upstream_conns, seen, events }
}

async fn setup() -> Setup {
    setup_with(None).await
}

/// curl `args` (stdout with `-w` output appended).
async fn curl(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(&args)
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

fn url(s: &Setup, path: &str) -> String {
    format!("http://{}{path}", s.proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_requests_go_through_and_denied_ones_get_403() {
    let s = setup().await;
    let w = "%{http_code}\n".to_string();
    let out = curl(vec!["-w".into(), w.clone(), url(&s, "/public")]).await;
    assert_eq!(out, "GET /public 0 cbf29ce484222325 \n200\n");
    let out = curl(vec!["-w".into(), w.clone(), url(&s, "/private")]).await;
    assert_eq!(out, format!("{DENIED_BODY}403\n"));
    let out =
        curl(vec!["-w".into(), w.clone(), "-X".into(), "POST".into(), url(&s, "/public")]).await;
    assert_eq!(out, format!("{DENIED_BODY}403\n"), "POST is not allowed on /public");
    // The upstream saw only the allowed one.
    assert_eq!(s.seen.lock().unwrap().len(), 1);
    // Every request is an event with its verdict.
    let ev = s.events.lock().unwrap().clone();
    let v: Vec<(String, String, u16, L7Verdict)> =
        ev.iter().map(|e| (e.method.clone(), e.url.clone(), e.status, e.verdict)).collect();
    assert_eq!(
        v,
        [
            ("GET".into(), "/public".into(), 200, L7Verdict::Forwarded),
            ("GET".into(), "/private".into(), 403, L7Verdict::Denied),
            ("POST".into(), "/public".into(), 403, L7Verdict::Denied),
        ]
    );
    // A header rule's REPLACE reaches upstream.
    let out = curl(vec!["-H".into(), "X-Team: b".into(), url(&s, "/team")]).await;
    assert_eq!(out, "GET /team 0 cbf29ce484222325 x-team=a\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_survives_a_denied_request() {
    let s = setup().await;
    // Two requests on one connection: denied, then allowed.
    let out = curl(vec![
        "-w".into(),
        "%{http_code} %{num_connects}\n".into(),
        url(&s, "/private"),
        url(&s, "/public/x"),
    ])
    .await;
    assert_eq!(out, format!("{DENIED_BODY}403 1\nGET /public/x 0 cbf29ce484222325 \n200 0\n"));
    assert_eq!(s.upstream_conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_mib_upload_arrives_intact() {
    let s = setup().await;
    let data: Vec<u8> =
        (0..10 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let file = std::env::temp_dir().join(format!("proxy-upload-{}", std::process::id()));
    std::fs::write(&file, &data).unwrap();
    let out = curl(vec![
        "--data-binary".into(),
        format!("@{}", file.display()),
        "-H".into(),
        "Content-Type: application/octet-stream".into(),
        url(&s, "/upload"),
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(out, format!("POST /upload {} {:x} \n", data.len(), fnv(&data)));
    // Chunked too.
    let out = curl(vec![
        "-H".into(),
        "Transfer-Encoding: chunked".into(),
        "--data-binary".into(),
        "hello".into(),
        url(&s, "/upload"),
    ])
    .await;
    assert_eq!(out, format!("POST /upload 5 {:x} \n", fnv(b"hello")));
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge() {
    let s = setup().await;
    // curl (one request per run: curl 7.88 fails to reuse a prior-knowledge
    // connection, against any server).
    let w = vec![
        "--http2-prior-knowledge".to_string(),
        "-w".into(),
        "%{http_version} %{http_code}\n".into(),
    ];
    let out = curl([w.clone(), vec![url(&s, "/public")]].concat()).await;
    assert_eq!(out, "GET /public 0 cbf29ce484222325 \n2 200\n");
    let out = curl([w, vec![url(&s, "/private")]].concat()).await;
    assert_eq!(out, format!("{DENIED_BODY}2 403\n"));
    // Several streams at once on one connection (hyper's h2 client).
    let tcp = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for path in ["/public/1", "/private", "/public/2", "/admin"] {
        let mut send = send.clone();
        let uri = format!("http://{}{path}", s.proxy);
        calls.push(tokio::spawn(async move {
            let req = http::Request::get(uri).body(Full::new(Bytes::new())).unwrap();
            let resp = send.send_request(req).await.unwrap();
            let code = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (code, String::from_utf8_lossy(&body).into_owned())
        }));
    }
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.unwrap());
    }
    assert_eq!(
        got,
        [
            (200, "GET /public/1 0 cbf29ce484222325 \n".to_string()),
            (403, DENIED_BODY.to_string()),
            (200, "GET /public/2 0 cbf29ce484222325 \n".to_string()),
            (403, DENIED_BODY.to_string()),
        ]
    );
}

/// Send `raw` on one connection; everything read until the server closes
/// it or 2 s pass.
async fn raw(s: &Setup, raw: &'static [u8]) -> String {
    let addr = s.proxy;
    tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let s = setup().await;
    let out = raw(
        &s,
        b"GET /private HTTP/1.1\r\nHost: a\r\n\r\nGET /public HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let denied = out.find("403 Forbidden").expect(&out);
    let ok = out.find("200 OK").expect(&out);
    assert!(denied < ok, "{out}");
    assert!(out.ends_with("GET /public 0 cbf29ce484222325 \n"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_smuggled_and_bad_requests_get_400() {
    let s = setup().await;
    // Both framings: read as chunked (an empty body), and the connection
    // closed after it: the "request" in the would-be body is never served.
    let out = raw(
        &s,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /private HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "one response only: {out}");
    assert!(out.contains("POST /upload 0 "), "{out}");
    let urls: Vec<String> = s.events.lock().unwrap().iter().map(|e| e.url.clone()).collect();
    assert_eq!(urls, ["/upload"], "the smuggled GET /private was never a request");
    // Two different lengths: 400.
    let out = raw(
        &s,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Not HTTP: 400, and the proxy serves the next connection.
    let out = raw(&s, b"GARBAGE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // A head over the limit: 431.
    let big: &'static [u8] = Box::leak(
        format!("GET /public HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024))
            .into_bytes()
            .into_boxed_slice(),
    );
    let out = raw(&s, big).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // A declared body over the limit: 413, never sent upstream.
    let out = raw(&s, b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let out = curl(vec![url(&s, "/public")]).await;
    assert_eq!(out, "GET /public 0 cbf29ce484222325 \n");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_gets_503() {
    // A port nothing listens on (bound, then closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let s = setup_with(Some(dead)).await;
    let out = curl(vec!["-w".into(), "%{http_code}".into(), url(&s, "/public")]).await;
    assert!(out.ends_with("503"), "{out}");
    assert_eq!(s.events.lock().unwrap()[0].verdict, L7Verdict::Error);
}
