//! The agent's config file (`--config`, JSON): resolved with no flags, as
//! at start; a refusal names what was wrong.
#![no_main]

use ciliate_agent::config::Flags;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Flags::default().resolve_text(text) {
        assert!(!e.to_string().is_empty());
    }
});
