//! `ciliate-proxy-bench`: the HTTP proxy's cost, on loopback in one
//! thread (client, proxy and upstream share a core: no cross-CPU
//! wake-ups): keep-alive request rate with 1 KiB responses and the
//! latency added per request, new-connection rate, through an allowing L7
//! rule against the same client talking to the upstream directly (what an
//! L4-only rule costs: nothing on loopback), side by side in each round;
//! and the proxy's memory with 1,000 concurrent keep-alive connections.
//! `--runs N --seconds S` (default 5 and 2). Not the datapath redirect
//! (issue #14 continues): the proxy alone.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use ciliate_lab::bench::{median, pct, positive, rss_mib};
use ciliate_proxy::{
    http::{Limits, Policy, Redirect, serve},
    rules::{HttpRule, RuleSet},
};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const BODY: [u8; 1024] = [b'x'; 1024];

async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = l.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(&BODY))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

struct Fixed(Redirect);

impl Policy for Fixed {
    fn redirect(&self, _: SocketAddr, _: SocketAddr) -> Option<Redirect> {
        Some(self.0.clone())
    }
}

async fn proxy(to: SocketAddr) -> SocketAddr {
    let rules: Vec<HttpRule> =
        serde_json::from_str(r#"[{"method": "GET", "path": "/bench(/.*)?"}]"#).expect("rules");
    let redirect = Redirect {
        rules: Arc::new(RuleSet::compile(&rules).expect("rules compile")),
        upstream: to,
    };
    let l = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = l.local_addr().expect("an address");
    tokio::spawn(serve(l, Arc::new(Fixed(redirect)), Arc::new(|_| {}), Limits::default()));
    addr
}

/// One request on `c` and its whole response (1 KiB body).
async fn request(c: &mut TcpStream, close: bool) -> std::io::Result<()> {
    let req: &[u8] = if close {
        b"GET /bench HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    } else {
        b"GET /bench HTTP/1.1\r\nHost: b\r\n\r\n"
    };
    c.write_all(req).await?;
    let mut buf = [0u8; 4096];
    let mut got = Vec::with_capacity(1400);
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(h) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.len() >= h + 4 + BODY.len()
        {
            return Ok(());
        }
    }
}

async fn connect(to: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(to).await.expect("connects");
    let _ = c.set_nodelay(true);
    c
}

/// Keep-alive requests for `secs`: (requests/s, per-request latencies µs).
async fn rr(to: SocketAddr, secs: f64) -> (f64, Vec<f64>) {
    let mut c = connect(to).await;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        request(&mut c, false).await.expect("a response");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    (lat.len() as f64 / start.elapsed().as_secs_f64(), lat)
}

/// A new connection per request for `secs`: connections/s.
async fn crr(to: SocketAddr, secs: f64) -> f64 {
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < secs {
        let mut c = connect(to).await;
        request(&mut c, true).await.expect("a response");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// This process's memory growth (MiB) with `n` keep-alive connections
/// open to `to`, each past one request.
async fn memory(to: SocketAddr, n: usize) -> f64 {
    let before = rss_mib(std::process::id() as i32);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = connect(to).await;
        request(&mut c, false).await.expect("a response");
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    rss_mib(std::process::id() as i32) - before
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut runs, mut secs, mut mem) = (5u64, 2u64, None::<String>);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = positive(&mut it, "--runs", 100)?,
            "--seconds" => secs = positive(&mut it, "--seconds", 60)?,
            "--memory" => mem = it.next().cloned(),
            other => return Err(format!("unknown argument {other:?} (--runs N --seconds S)")),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let up = upstream().await;
        let px = proxy(up).await;
        // A child measures one memory case (a fresh heap each).
        if let Some(which) = mem {
            let to = if which == "proxy" { px } else { up };
            println!("{:.2}", memory(to, 1000).await);
            return Ok(());
        }
        let secs = secs as f64;
        let (mut rr_d, mut rr_p, mut crr_d, mut crr_p) = (vec![], vec![], vec![], vec![]);
        let (mut lat_d, mut lat_p) = (vec![], vec![]);
        for round in 1..=runs {
            let (d, ld) = rr(up, secs).await;
            let (p, lp) = rr(px, secs).await;
            let (cd, cp) = (crr(up, secs).await, crr(px, secs).await);
            println!(
                "[proxy-bench] round {round}: rr direct {d:.0}/s proxy {p:.0}/s; crr direct {cd:.0}/s proxy {cp:.0}/s"
            );
            rr_d.push(d);
            rr_p.push(p);
            crr_d.push(cd);
            crr_p.push(cp);
            lat_d.extend(ld);
            lat_p.extend(lp);
        }
        let (d, p) = (median(rr_d), median(rr_p));
        let (cd, cp) = (median(crr_d), median(crr_p));
        println!("[proxy-bench] keep-alive requests (1 KiB responses): direct {d:.0}/s, through the L7 rule {p:.0}/s: {:.2}x (goal >= 0.5x)", p / d);
        println!("[proxy-bench] new connections: direct {cd:.0}/s, through the L7 rule {cp:.0}/s: {:.2}x", cp / cd);
        let (p50d, p99d) = (pct(&mut lat_d, 0.5), pct(&mut lat_d, 0.99));
        let (p50p, p99p) = (pct(&mut lat_p, 0.5), pct(&mut lat_p, 0.99));
        println!(
            "[proxy-bench] latency per request: direct p50 {p50d:.0} us p99 {p99d:.0} us, proxy p50 {p50p:.0} us p99 {p99p:.0} us: {:.0} us added at p99",
            p99p - p99d
        );
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = |which: &str| -> Result<f64, String> {
            let out = std::process::Command::new(&exe)
                .args(["--memory", which])
                .output()
                .map_err(|e| e.to_string())?;
            String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("memory {which}: {e}"))
        };
        let (md, mp) = (child("direct")?, child("proxy")?);
        println!(
            "[proxy-bench] memory with 1,000 concurrent keep-alive connections: {:.1} MiB for the proxy ({:.1} KiB each; {mp:.1} MiB through it less {md:.1} MiB direct)",
            mp - md,
            (mp - md) * 1024.0 / 1000.0
        );
        Ok(())
    })
}
