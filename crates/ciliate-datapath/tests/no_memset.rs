//! No datapath program calls `memset`. On this target (bpf-linker expands
//! memcpy in order, which turns LLVM's memset expansion off) every call is
//! a byte-by-byte loop: paid on every packet that reaches it, and walked by
//! the verifier on every path that does. Zero-fills go through
//! `ciliate_ebpf::zeroed`; keys have scalar padding. This reads the
//! embedded objects' relocations (no root needed).

use ciliate_datapath::objects;
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

#[test]
fn no_program_calls_memset() {
    let mut relocations = 0;
    for (name, bytes) in [
        ("lxc", objects::LXC),
        ("host", objects::HOST),
        ("sock", objects::SOCK),
        ("xdp", objects::XDP),
        ("sockops", objects::SOCKOPS),
    ] {
        let f = object::File::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        for sec in f.sections() {
            for (off, rel) in sec.relocations() {
                relocations += 1;
                let RelocationTarget::Symbol(i) = rel.target() else { continue };
                let sym = f.symbol_by_index(i).unwrap();
                assert_ne!(
                    sym.name().unwrap_or(""),
                    "memset",
                    "{name}: {} calls memset at {off:#x} (zero in place with ciliate_ebpf::zeroed)",
                    sec.name().unwrap_or("?")
                );
            }
        }
    }
    // The maps are relocations too: the walk saw them.
    assert!(relocations > 100, "only {relocations} relocations read");
}
