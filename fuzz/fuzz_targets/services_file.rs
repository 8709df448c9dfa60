//! The services file (`--services`, YAML or JSON): parsed as at start, and
//! each service checked as `service update` checks it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(specs) = ciliate_agent::services::parse_file(text) {
        for s in &specs {
            let _ = ciliate_agent::services::validate(s, (30000, 32767));
        }
    }
});
