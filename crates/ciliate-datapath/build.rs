//! Builds the eBPF crate for the BPF target (nightly, bpf-linker) and leaves
//! one object per hook family in OUT_DIR; `src/objects.rs` embeds them.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ciliate-ebpf")
        .canonicalize()
        .context("finding crates/ciliate-ebpf")?;
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path to ciliate-ebpf")?;
    let package = aya_build::Package { name: "ciliate-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly).context(
        "building the eBPF datapath (run scripts/bootstrap if bpf-linker or rust-src is missing)",
    )
}
