//! Flow filters and field masks as `--hubble-export-allowlist`,
//! `-denylist` and `-fieldmask` take them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = ciliate_agent::hubble_export::parse_filters(text);
    let _ = ciliate_agent::hubble_export::parse_field_mask(text);
});
