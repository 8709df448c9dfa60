//! A CNI invocation: the first three lines are CNI_COMMAND, CNI_ARGS and
//! CNI_IFNAME, the rest the network configuration on stdin. Checked as the
//! plugin checks it before it touches anything; an error carries a code
//! from the CNI spec's range.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let mut env = HashMap::new();
    for key in ["CNI_COMMAND", "CNI_ARGS", "CNI_IFNAME"] {
        env.insert(key.to_string(), parts.next().unwrap_or_default().to_string());
    }
    env.insert("CNI_CONTAINERID".into(), "fuzz".into());
    let stdin = parts.next().unwrap_or_default();
    if let Err(e) = ciliate_cni::cni::check_input(&env, stdin) {
        assert!(e.code > 0 && e.code < 1000, "code {} out of range", e.code);
        assert!(!e.msg.is_empty(), "an error without a message");
    }
});
