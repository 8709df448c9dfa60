//! The only crate that speaks to the kernel through aya.
//!
//! - [`objects`]: the eBPF objects, built by `build.rs` and embedded.
//! - [`bpffs`]: mounting bpffs and the per-node pin directories.
//! - [`loader`]: loading an object with its load-time configuration,
//!   attaching to devices, pinning links so forwarding survives restarts.
//! - [`maps`]: typed map wrappers that speak domain types.
//! - [`migrate`]: pinned maps whose definition a new build changed are
//!   made anew with their entries carried over.
//! - [`lbmaps`]: the service (load-balancer) maps.
//! - [`nodemaps`]: the node configuration and masquerading maps.
//! - [`events`]: decoding of ring-buffer events.
//! - [`packet`]: packet builders and parsers with correct checksums
//!   (tests, the lab and benchmarks).
//! - [`testrun`]: the BPF_PROG_TEST_RUN harness.

pub mod bpffs;
pub mod error;
pub mod events;
pub mod lbmaps;
pub mod loader;
pub mod maps;
pub mod migrate;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod nodemaps;
pub mod objects;
pub mod packet;
pub mod sockops;
pub mod testrun;

pub use error::DatapathError;

/// aya types that appear in this crate's API.
pub mod aya_reexport {
    pub use aya::programs::TcAttachType;
}
