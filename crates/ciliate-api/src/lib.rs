//! The agent's API: versioned JSON over HTTP/1.1 on a unix socket.
//!
//! - [`models`]: request and response bodies (with JSON schemas, from
//!   which the agent's OpenAPI description is generated).
//! - [`client`]: the hyper client the CLI, the CNI plugin and the labs use.
//! - [`http`]: query escaping.
//!
//! Paths (all under `/v1`): `GET healthz`, `GET status`, `GET endpoint`,
//! `GET endpoint/{id}`, `PUT endpoint` (create), `DELETE endpoint/{id}`,
//! `DELETE endpoint?container-id=…`, `POST ipam` (allocate), `DELETE
//! ipam/{ip}`, `GET identity`, `GET identity/{id}`, `POST gc`, policy,
//! services, `GET openapi.json` (the full list, with schemas).
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
