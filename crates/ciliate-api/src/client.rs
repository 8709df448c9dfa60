//! The API client of the CLI, the CNI plugin and the labs: hyper (HTTP/1.1)
//! over the agent's unix socket. Blocking calls: each runs on a small
//! runtime of its own, so callers need none.

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Incoming};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::models::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket}: {source} (is ciliate-agent running?)")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out mid-request (the agent went away).
    #[error("talking to the agent at {socket}: {reason}")]
    Transport { socket: String, reason: String },
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from the agent to {what}: {reason}")]
    Decode { what: String, reason: String },
}

pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: Duration::from_secs(30) }
    }

    /// The same client, giving up on a call after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    fn runtime(&self) -> Result<tokio::runtime::Runtime, ClientError> {
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
            ClientError::Transport {
                socket: self.socket.display().to_string(),
                reason: e.to_string(),
            }
        })
    }

    /// Send one request; a 2xx response's body is decoded as `T`, anything
    /// else as an [`ApiError`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let decode =
            |reason: String| ClientError::Decode { what: format!("{method} {target}"), reason };
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| decode(e.to_string()))?,
            None => Vec::new(),
        };
        let rt = self.runtime()?;
        let (status, bytes) = rt.block_on(async {
            let resp = self.send(method, target, body).await?;
            let status = resp.status().as_u16();
            let bytes = self.timed(resp.into_body().collect()).await?.to_bytes();
            Ok::<_, ClientError>((status, bytes))
        })?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        let bytes = if bytes.is_empty() { Bytes::from_static(b"null") } else { bytes };
        serde_json::from_slice(&bytes).map_err(|e| decode(e.to_string()))
    }

    pub fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        self.call(method::GET, target, None::<&()>)
    }

    /// GET a streaming response (the agent's event streams: one JSON
    /// object a line). It returns once the agent answered, so whatever the
    /// stream follows is followed from then on; read it with
    /// [`LineStream::next_line`]. No timeout: a stream lasts as long as it
    /// lasts.
    pub fn stream(&self, target: &str) -> Result<LineStream, ClientError> {
        let rt = self.runtime()?;
        let body = rt.block_on(async {
            let resp = self.send(method::GET, target, Vec::new()).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body();
            if !(200..300).contains(&status) {
                let bytes = self.timed(body.collect()).await?.to_bytes();
                let message = serde_json::from_slice::<ApiError>(&bytes)
                    .map(|e| e.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                return Err(ClientError::Api { status, message });
            }
            Ok(body)
        })?;
        Ok(LineStream { rt, body, pending: Vec::new(), socket: self.socket.display().to_string() })
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { socket: self.socket.display().to_string(), reason: e.to_string() }
    }

    async fn timed<T, E: std::fmt::Display>(
        &self,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| self.transport(e)),
            Err(_) => Err(self.transport(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Connect, send, and return the response head (its body still to read).
    async fn send(
        &self,
        method: &str,
        target: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let socket = self.socket.display().to_string();
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable { socket: socket.clone(), source })?;
        let (mut sender, conn) = self
            .timed(hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)))
            .await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(target)
            .header(hyper::header::HOST, "ciliate-agent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Decode {
                what: format!("{method} {target}"),
                reason: e.to_string(),
            })?;
        self.timed(sender.send_request(req)).await
    }
}

/// An open streaming response, read a line at a time.
pub struct LineStream {
    rt: tokio::runtime::Runtime,
    body: Incoming,
    pending: Vec<u8>,
    socket: String,
}

impl LineStream {
    /// The next line (without its newline); `None` when the stream ended
    /// or `until` passed first.
    pub fn next_line(
        &mut self,
        until: Option<std::time::Instant>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=nl).collect();
                line.pop();
                return Ok(Some(line));
            }
            let frame = self.rt.block_on(async {
                match until {
                    Some(t) => tokio::time::timeout_at(t.into(), self.body.frame()).await.ok(),
                    None => Some(self.body.frame().await),
                }
            });
            match frame {
                None | Some(None) => return Ok(None),
                Some(Some(Err(e))) => {
                    return Err(ClientError::Transport {
                        socket: self.socket.clone(),
                        reason: e.to_string(),
                    });
                }
                Some(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

pub mod method {
    pub const GET: &str = "GET";
    pub const PUT: &str = "PUT";
    pub const POST: &str = "POST";
    pub const PATCH: &str = "PATCH";
    pub const DELETE: &str = "DELETE";
}
