//! CNP/CCNP/KNP documents: parsed as `policy import` parses them; what
//! parses is resolved for an endpoint against a few identities, and its
//! CIDRs and selectors listed, as the agent would.
#![no_main]

use std::collections::BTreeMap;

use ciliate_agent::policy::{self, IdView};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(rules) = policy::parse(text) else { return };
    let labels = |app: &str| {
        vec![format!("k8s:app={app}"), "k8s:io.kubernetes.pod.namespace=default".to_string()]
    };
    let ids = IdView::new(BTreeMap::from([
        (256, labels("a")),
        (257, labels("b")),
        (16_777_217, vec!["cidr:10.0.0.0/8".to_string(), "reserved:world".to_string()]),
    ]));
    for (ep, app) in [(1, "a"), (2, "b")] {
        let _ = policy::resolve(&rules, ep, &labels(app), &ids);
    }
    let _ = policy::referenced_cidrs(&rules);
    let _ = policy::selectors(&rules, &ids);
});
