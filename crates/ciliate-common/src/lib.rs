//! The binary layout shared by the datapath (kernel) and user space.
//!
//! Every map key, map value, load-time configuration block and event header
//! lives here once, `#[repr(C)]`, with explicit padding and a compile-time size
//! check. Nothing that crosses the boundary is a `bool`, an `enum` or an
//! `Option`: the kernel may write any bytes, so enumerations cross as integer
//! constants and user space converts them with the lookup functions below.
//!
//! With the `user` feature the types implement `aya::Pod` so the typed map
//! wrappers in `ciliate-datapath` can read and write them.
#![no_std]

pub mod config;
pub mod ct;
pub mod debug;
pub mod drop;
pub mod endpoint;
pub mod event;
pub mod frag;
pub mod identity;
pub mod ipcache;
pub mod lb;
pub mod metrics;
pub mod nat;
pub mod node;
pub mod policy;
pub mod prefilter;
pub mod sockops;
pub mod trace;

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for every type that goes into a map or a global.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $(
            // SAFETY: `#[repr(C)]`, only integer/byte-array fields, explicit
            // padding: every bit pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )* };
    }
    pod!(
        crate::config::EndpointConfig,
        crate::config::HostConfig,
        crate::ct::CtEntry,
        crate::ct::CtKey4,
        crate::endpoint::EndpointInfo,
        crate::endpoint::EndpointKey,
        crate::event::CaptureNotify,
        crate::event::DebugNotify,
        crate::event::DropNotify,
        crate::event::EventHeader,
        crate::event::TraceNotify,
        crate::frag::FragKey,
        crate::frag::FragPorts,
        crate::ipcache::IpcacheEntry,
        crate::ipcache::IpcacheKey,
        crate::event::PolicyVerdictNotify,
        crate::lb::AffinityKey,
        crate::lb::AffinityValue,
        crate::lb::LbBackend,
        crate::lb::LbKey,
        crate::lb::LbService,
        crate::lb::MaglevKey,
        crate::lb::RevNat,
        crate::lb::SockRevNatKey,
        crate::lb::SockRevNatValue,
        crate::lb::SrcRangeKey,
        crate::nat::NatEntry,
        crate::node::NodeConfig,
        crate::node::NoMasqKey,
        crate::prefilter::PrefilterKey,
        crate::prefilter::PrefilterStats,
        crate::sockops::SockKey,
        crate::metrics::MetricsKey,
        crate::metrics::MetricsValue,
        crate::policy::PolicyEntry,
        crate::policy::PolicyKey,
    );
}
