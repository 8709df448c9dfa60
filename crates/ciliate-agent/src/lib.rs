//! The Ciliate node agent (ARCHITECTURE.md section 4). One process per node,
//! no async runtime: a thread per API connection around one state lock,
//! which keeps the agent small.
//!
//! - [`store`]: atomic JSON files in the node's state directory.
//! - [`ipam`]: pod addresses from the node's pod CIDR, persisted.
//! - [`identity`]: labels → numeric identity, persisted.
//! - [`endpoint`]: endpoint create / delete / restore / GC, through the
//!   [`endpoint::Datapath`] trait (the kernel, or memory in tests).
//! - [`services`]: services and their load-balancer maps.
//! - [`kvstore`]: the cluster's shared state (local file or etcd).
//! - [`cluster`]: cluster-pool IPAM, node registration, the cluster ipcache.
//! - [`api`]: the HTTP routes of `ciliate_api` on the agent's unix socket.
//! - [`config`]: flags, environment and an optional JSON file.

pub mod api;
pub mod cluster;
pub mod config;
pub mod endpoint;
pub mod identity;
pub mod ipam;
pub mod kernel;
pub mod kvstore;
pub mod policy;
pub mod services;
pub mod store;
