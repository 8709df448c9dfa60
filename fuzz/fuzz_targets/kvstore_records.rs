//! Records another node wrote to the cluster's store (corrupt or hostile):
//! decoded as the cluster sync decodes them and checked against this node;
//! nothing that claims this node's address, pod CIDR or a reserved
//! identity may pass.
#![no_main]

use std::net::Ipv4Addr;

use ciliate_agent::cluster::{IpRecord, NodeRecord, Routing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let me = NodeRecord {
        name: "me".into(),
        ip: Ipv4Addr::new(192, 168, 200, 2),
        pod_cidr: "10.200.0.0/24".into(),
        routing: Routing::Tunnel,
        health_ip: None,
    };
    let Some((&kind, body)) = data.split_first() else { return };
    if kind % 2 == 0 {
        if let Ok(n) = serde_json::from_slice::<NodeRecord>(body)
            && me.refuse_node(&n.name, &n).is_none()
        {
            assert_ne!(n.ip, me.ip, "a node claiming this node's address passed");
            let c = n.cidr().expect("a node without a CIDR passed");
            // Overlap: the first min(len, 24) bits agree with 10.200.0.0.
            let bits = u32::from(c.len.min(24));
            let differ = u32::from(c.net) ^ u32::from(Ipv4Addr::new(10, 200, 0, 0));
            assert!(
                bits > 0 && differ >> (32 - bits) != 0,
                "a node overlapping this node's pod CIDR passed: {c}"
            );
        }
    } else if let Ok(r) = serde_json::from_slice::<IpRecord>(body)
        && r.node != me.name
        && me.refuse_ip(r.ip, &r).is_none()
    {
        assert!(r.identity == 4 || r.identity >= 256, "identity {} passed", r.identity);
        assert_ne!(r.ip.octets()[..3], [10, 200, 0], "this node's pod address passed");
    }
});
