//! The API client of the CLI and the CNI plugin.

use std::{os::unix::net::UnixStream, path::PathBuf, time::Duration};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    http::{self, HttpError},
    models::ApiError,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket}: {source} (is ciliate-agent running?)")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Http(#[from] HttpError),
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

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Send one request; decode a 2xx body as `T`, anything else as an
    /// [`ApiError`].
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let unreachable =
            |source| ClientError::Unreachable { socket: self.socket.display().to_string(), source };
        let stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(unreachable)?;
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Decode {
                what: format!("{method} {target}"),
                reason: e.to_string(),
            })?,
            None => Vec::new(),
        };
        http::write_request(&stream, method, target, &body)?;
        let resp = http::read_response(&stream)?;
        if !(200..300).contains(&resp.status) {
            let message = serde_json::from_slice::<ApiError>(&resp.body)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).into_owned());
            return Err(ClientError::Api { status: resp.status, message });
        }
        let body = if resp.body.is_empty() { b"null".to_vec() } else { resp.body };
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            what: format!("{method} {target}"),
            reason: e.to_string(),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        self.call(method::GET, target, None::<&()>)
    }
}

pub mod method {
    pub const GET: &str = "GET";
    pub const PUT: &str = "PUT";
    pub const POST: &str = "POST";
    pub const DELETE: &str = "DELETE";
}
