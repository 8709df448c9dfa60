//! Hubble's gRPC API as Ciliate speaks it. The messages are generated from
//! `proto/` (Hubble's package, message and field names, numbers and
//! types, so Hubble's clients decode them with their own definitions),
//! with the protobuf JSON mapping Hubble prints flows in.

#[allow(clippy::all, reason = "generated code")]
pub mod flow {
    tonic::include_proto!("flow");
    include!(concat!(env!("OUT_DIR"), "/flow.serde.rs"));
}
#[allow(clippy::all, reason = "generated code")]
pub mod relay {
    tonic::include_proto!("relay");
    include!(concat!(env!("OUT_DIR"), "/relay.serde.rs"));
}
#[allow(clippy::all, reason = "generated code")]
pub mod observer {
    tonic::include_proto!("observer");
    include!(concat!(env!("OUT_DIR"), "/observer.serde.rs"));
}
#[allow(clippy::all, reason = "generated code")]
pub mod peer {
    tonic::include_proto!("peer");
    include!(concat!(env!("OUT_DIR"), "/peer.serde.rs"));
}

/// The descriptor set of the protos (for gRPC server reflection).
pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("hubble_descriptor");
pub mod client;
pub mod filter;
