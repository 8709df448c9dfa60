//! Labs on network namespaces, for tests and for `ciliate lab`.
//!
//! - [`netns`]: one namespace with a guard that removes it (and kills what
//!   runs in it) when dropped, also when a test panics; running commands and
//!   closures inside it; veth pairs between namespaces.
//! - [`names`]: names unique per run, short enough for device names.
//! - [`node`]: the one-node topology (a node namespace with `ciliate_host`
//!   and pods on veth pairs behind the from-container program).
//! - [`bench`]: measurement helpers of the benchmarks.
//! - [`cluster`]: the multi-node topology (nodes on an underlay bridge, an
//!   external host, a shared store or etcd).
//! - [`pins`]: a node's pins and maps as bpftool reads them.
//!
//! Nothing here touches the root namespace's devices, routes or sysctls:
//! every device is created inside, or moved into, a namespace of the lab.

pub mod bench;
pub mod cluster;
pub mod error;
pub mod events;
pub mod names;
pub mod netns;
pub mod node;
pub mod pins;

pub use error::LabError;
pub use netns::Netns;
