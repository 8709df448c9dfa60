//! Generate the messages and the gRPC server and client code from the
//! protos (protoc from the machine: `scripts/bootstrap` installs it), the
//! descriptor set served through gRPC reflection, and the protobuf JSON
//! mapping of every message (pbjson) with the protos' field names, as
//! Hubble prints flows.

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let protos =
        ["flow/flow.proto", "observer/observer.proto", "relay/relay.proto", "peer/peer.proto"]
            .map(|p| format!("proto/{p}"));
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = out.join("hubble_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Fields most flows leave empty, boxed: a flow held in the ring
        // takes their pointer, not their size.
        .boxed(".flow.Flow.l7")
        .boxed(".flow.Flow.encap")
        .boxed(".flow.Flow.source_service")
        .boxed(".flow.Flow.destination_service")
        .boxed(".flow.Flow.trace_context")
        .boxed(".flow.Flow.extensions")
        .boxed(".flow.Flow.file")
        .compile_protos(&protos, &["proto".to_string()])
        .expect("compiling Hubble's protos");
    let set = std::fs::read(&descriptors).expect("reading the descriptor set");
    pbjson_build::Builder::new()
        .register_descriptors(&set)
        .expect("registering the descriptors")
        // Hubble prints (and its exporter writes) the protos' own field
        // names: `pod_name`, `traffic_direction`, `IP.ipVersion`.
        .preserve_proto_field_names()
        .build(&[".flow", ".observer", ".relay", ".peer"])
        .expect("generating the JSON mapping");
}
