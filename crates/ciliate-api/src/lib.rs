//! The agent's API: versioned JSON over HTTP/1.1 on a unix socket.
//!
//! - [`models`]: request and response bodies.
//! - [`http`]: just enough HTTP/1.1 (one request per connection,
//!   `Content-Length` bodies) for the agent, the CLI and the CNI plugin,
//!   without an async runtime: the agent stays small.
//! - [`client`]: the client the CLI and the CNI plugin use.
//!
//! Paths (all under `/v1`): `GET healthz`, `GET status`, `GET endpoint`,
//! `GET endpoint/{id}`, `PUT endpoint` (create), `DELETE endpoint/{id}`,
//! `DELETE endpoint?container-id=…`, `POST ipam` (allocate), `DELETE
//! ipam/{ip}`, `GET identity`, `GET identity/{id}`, `POST gc`.
//! Errors are `{"message": …}` with a 4xx/5xx status; the message names the
//! object.

pub mod client;
pub mod http;
pub mod models;

pub use client::{Client, ClientError};

/// Default socket of an agent for node `node`.
pub fn default_socket(node: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/ciliate/{node}/agent.sock"))
}
