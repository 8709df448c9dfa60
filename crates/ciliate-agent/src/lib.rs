//! The Ciliate node agent (ARCHITECTURE.md section 4). One process per node
//! on one tokio runtime. Each subsystem owns its state on a thread of its
//! own, takes commands, and publishes snapshots readers use ([`actor`]):
//! there is no agent-wide lock.
//!
//! - [`actor`]: the subsystem pattern (commands in, snapshots out).
//! - [`store`]: atomic JSON files in the node's state directory.
//! - [`ipam`]: pod addresses from the node's pod CIDR, persisted.
//! - [`identity`]: labels → numeric identity, persisted.
//! - [`endpoint`]: endpoint create / delete / restore / GC, through the
//!   [`endpoint::Datapath`] trait (the kernel, or memory in tests).
//! - [`services`]: services and their load-balancer maps.
//! - [`prefilter`]: the XDP prefilter's deny list.
//! - [`kvstore`]: the cluster's shared state (local file or etcd).
//! - [`cluster`]: cluster-pool IPAM, node registration, the cluster ipcache.
//! - [`api`]: the HTTP API (axum) on the agent's unix socket; [`openapi`]
//!   describes it.
//! - [`config`]: flags, environment and an optional JSON file.

pub mod actor;
pub mod api;
pub mod cluster;
pub mod config;
pub mod ctgc;
pub mod endpoint;
pub mod events;
pub mod hubble;
pub mod hubble_export;
pub mod hubble_metrics;
pub mod identity;
pub mod ipam;
pub mod k8s;
pub mod kernel;
pub mod kvstore;
pub mod metrics;
pub mod openapi;
pub mod operator;
pub mod policy;
pub mod prefilter;
pub mod relay;

pub mod services;
pub mod store;
