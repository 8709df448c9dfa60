//! The HTTP proxy: each connection the datapath redirects is served
//! (HTTP/1.1 with keep-alive and pipelining, chunked bodies; HTTP/2 with
//! prior knowledge, h2c), each request judged by the connection's rules:
//! a denied one is answered `403 Access denied` here and the connection
//! stays usable; an allowed one goes upstream (one upstream connection
//! per downstream connection, opened at the first allowed request, of
//! the same HTTP version), its body streamed both ways.
//!
//! Defences: a head over [`Limits::max_head`] gets 431; a declared body
//! over [`Limits::max_body`] 413; malformed requests 400 (hyper's parser;
//! the connection then closes). A request with both `Transfer-Encoding`
//! and `Content-Length` is read by its chunked encoding and its
//! connection closed after it (RFC 9112 6.1), so nothing can be smuggled
//! behind it; conflicting Content-Lengths get 400.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};

use crate::rules::{RuleSet, Verdict};

/// Cilium's (Envoy's) answer to a denied request.
pub const DENIED_BODY: &str = "Access denied\r\n";

/// Where a redirected connection goes and what it may do.
#[derive(Clone, Debug)]
pub struct Redirect {
    pub rules: Arc<RuleSet>,
    /// The original destination.
    pub upstream: SocketAddr,
}

/// What the proxy asks about each accepted connection (from `peer`,
/// accepted on `local`: under transparent redirection the original
/// destination). `None`: not a redirected connection; it is closed.
pub trait Policy: Send + Sync + 'static {
    fn redirect(&self, peer: SocketAddr, local: SocketAddr) -> Option<Redirect>;
}

/// One request, for the monitor and flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Event {
    pub peer: SocketAddr,
    pub upstream: SocketAddr,
    pub method: String,
    pub url: String,
    pub protocol: String,
    /// The status answered (403 when denied; 502/503 when upstream
    /// failed).
    pub status: u16,
    pub verdict: L7Verdict,
    /// Header mismatches a rule logs (`mismatch: LOG`).
    pub logged: Vec<String>,
    /// From the request's head to the response's head.
    pub latency: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L7Verdict {
    Forwarded,
    Denied,
    /// Allowed, but upstream failed.
    Error,
}

/// Where events go.
pub type Events = Arc<dyn Fn(L7Event) + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request's head (request line and headers), bytes.
    pub max_head: usize,
    /// A request body's declared length, bytes.
    pub max_body: u64,
    /// How long an idle keep-alive connection is kept open.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_head: 64 * 1024, max_body: 1 << 30, idle: Duration::from_secs(300) }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn local(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_LENGTH, text.len())
        .body(Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {}).boxed())
        .expect("a valid response")
}

/// The upstream side of one downstream connection.
enum Upstream {
    None,
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

struct Conn {
    peer: SocketAddr,
    redirect: Redirect,
    limits: Limits,
    events: Events,
    upstream: Mutex<Upstream>,
}

impl Conn {
    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut up = self.upstream.lock().await;
        let h2 = req.version() == http::Version::HTTP_2;
        let stale = match &*up {
            Upstream::None => true,
            Upstream::H1(s) => s.is_closed(),
            Upstream::H2(s) => s.is_closed(),
        };
        if stale {
            let tcp = TcpStream::connect(self.redirect.upstream)
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.redirect.upstream))?;
            let _ = tcp.set_nodelay(true);
            let io = TokioIo::new(tcp);
            *up = if h2 {
                let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Upstream::H2(s)
            } else {
                let (s, conn) =
                    hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Upstream::H1(s)
            };
        }
        match &mut *up {
            Upstream::H1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
            Upstream::H2(s) => {
                let mut s = s.clone();
                drop(up); // streams go in parallel
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(|e| e.to_string())
            }
            Upstream::None => Err("no upstream".into()),
        }
    }

    async fn serve(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let method = parts.method.to_string();
        let url = parts.uri.to_string();
        let protocol = format!("{:?}", parts.version);
        let event = |status: u16, verdict: L7Verdict, logged: Vec<String>| L7Event {
            peer: self.peer,
            upstream: self.redirect.upstream,
            method: method.clone(),
            url: url.clone(),
            protocol: protocol.clone(),
            status,
            verdict,
            logged,
            latency: start.elapsed(),
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body) {
            (self.events)(event(413, L7Verdict::Denied, vec![]));
            return Ok(local(StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large\r\n"));
        }
        let logged = match self.redirect.rules.judge(&mut parts) {
            Verdict::Denied => {
                (self.events)(event(403, L7Verdict::Denied, vec![]));
                return Ok(local(StatusCode::FORBIDDEN, DENIED_BODY));
            }
            Verdict::Allowed { logged } => logged,
        };
        match self.send(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                (self.events)(event(resp.status().as_u16(), L7Verdict::Forwarded, logged));
                Ok(resp.map(|b| b.boxed()))
            }
            Err(e) => {
                tracing::debug!(subsystem = "proxy", upstream = %self.redirect.upstream, error = %e, "upstream failed");
                (self.events)(event(503, L7Verdict::Error, logged));
                Ok(local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers\r\n",
                ))
            }
        }
    }
}

/// Serve connections from `listener` until it fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    policy: Arc<dyn Policy>,
    events: Events,
    limits: Limits,
) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let Ok(local_addr) = tcp.local_addr() else { continue };
        let Some(redirect) = policy.redirect(peer, local_addr) else {
            tracing::debug!(subsystem = "proxy", %peer, local = %local_addr, "not a redirected connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Arc::new(Conn {
            peer,
            redirect,
            limits,
            events: events.clone(),
            upstream: Mutex::new(Upstream::None),
        });
        tokio::spawn(async move {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .max_buf_size(limits.max_head.max(8192))
                .header_read_timeout(Some(limits.idle))
                .timer(hyper_util::rt::TokioTimer::new());
            b.http2().timer(hyper_util::rt::TokioTimer::new());
            let svc = hyper::service::service_fn(move |req| conn.clone().serve(req));
            if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(subsystem = "proxy", %peer, error = %e, "connection ended");
            }
        });
    }
}
