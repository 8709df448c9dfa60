//! Every API request body: the first byte picks the route's type, the rest
//! is the body, decoded as the API decodes it (a refusal names what was
//! wrong); what decodes goes through the checks the route runs next.
#![no_main]

use ciliate_agent::api::decode_body;
use ciliate_api::models as m;
use libfuzzer_sys::fuzz_target;

fn refused<T>(r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(!e.is_empty(), "a refusal without a message");
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 9 {
        0 => {
            if let Some(e) = refused(decode_body::<m::EndpointCreate>(body, "endpoint")) {
                let _ = m::check_labels(&e.labels);
                let _ = m::label_set(&e.labels);
            }
        }
        1 => {
            if let Some(s) = refused(decode_body::<m::ServiceSpec>(body, "service")) {
                let _ = ciliate_agent::services::validate(&s, (30000, 32767));
            }
        }
        2 => {
            if let Some(p) = refused(decode_body::<m::PolicyImport>(body, "policy")) {
                let _ = ciliate_agent::policy::parse(&p.text);
            }
        }
        3 => drop(refused(decode_body::<m::IpamRequest>(body, "ipam"))),
        4 => drop(refused(decode_body::<m::TraceRequest>(body, "trace"))),
        5 => drop(refused(decode_body::<m::AgentConfigChange>(body, "agent config"))),
        6 => drop(refused(decode_body::<m::EndpointConfigChange>(body, "endpoint config"))),
        7 => {
            // What decodes goes through the deny list's checks and writes;
            // what lands is listed back, whole.
            if let Some(spec) = refused(decode_body::<m::PrefilterSpec>(body, "prefilter")) {
                use ciliate_agent::prefilter::{MemoryPrefilter, Prefilter};
                let p = Prefilter::open(Box::new(MemoryPrefilter::default()), None, &[]).unwrap();
                if let Ok(v) = p.update(&spec) {
                    assert_eq!(v.spec.deny.len(), v.status.realized.deny.len());
                    assert!(!v.spec.deny.is_empty());
                }
            }
        }
        _ => drop(refused(decode_body::<m::GcRequest>(body, "gc"))),
    }
});
