//! Ring-buffer records as the datapath writes them (or a newer datapath,
//! or garbage): decoded, their captured bytes summarized and their
//! messages written as the monitor does.
#![no_main]

use ciliate_datapath::events::{Event, capture_message, debug_message, summary};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let e = Event::decode(data);
    let _ = summary(e.captured());
    match &e {
        Event::Debug(d) => drop(debug_message(d)),
        Event::Capture(c) => drop(capture_message(c)),
        _ => {}
    }
    let _ = summary(data);
});
