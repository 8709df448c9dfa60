//! The node fixture of the BPF_PROG_TEST_RUN path tests: pods A and B in
//! the lxc map and the ipcache, their from-container programs, the host
//! object, and packet helpers. Needs root.
#![allow(dead_code, reason = "each test file uses its own part of the fixture")]

use std::net::Ipv4Addr;

use ciliate_common::{
    config::{EndpointConfig, HostConfig},
    ct::CtKey4,
    endpoint::{ENDPOINT_F_HOST, EndpointInfo},
    identity,
    ipcache::IpcacheEntry,
};
use ciliate_datapath::{
    bpffs::NodePins,
    events::Event,
    loader::{self, Loaded},
    maps::EventRing,
    objects::programs::{FROM_CONTAINER, FROM_HOST},
    packet::{self, Eth, Ip4, L4},
    testrun::{ScratchNode, TcRun, run_tc, run_tc_on},
};

pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub struct Pod {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub lxc_mac: [u8; 6],
    pub ifindex: u32,
    pub id: u16,
    pub identity: u32,
}

pub const A: Pod = Pod {
    ip: Ipv4Addr::new(10, 200, 0, 2),
    mac: [0x0a, 0, 0, 0, 0, 0x02],
    lxc_mac: [0x12, 0, 0, 0, 0, 0x02],
    ifindex: 12,
    id: 101,
    identity: 1001,
};
pub const B: Pod = Pod {
    ip: Ipv4Addr::new(10, 200, 0, 3),
    mac: [0x0a, 0, 0, 0, 0, 0x03],
    lxc_mac: [0x12, 0, 0, 0, 0, 0x03],
    ifindex: 13,
    id: 102,
    identity: 1002,
};

impl Pod {
    pub fn config(&self) -> EndpointConfig {
        EndpointConfig {
            ifindex: self.ifindex,
            identity: self.identity,
            ipv4: self.ip.octets(),
            endpoint_id: self.id,
            lxc_mac: self.lxc_mac,
            flags: 0,
        }
    }
    pub fn info(&self) -> EndpointInfo {
        EndpointInfo {
            ifindex: self.ifindex,
            endpoint_id: self.id,
            mac: self.mac,
            node_mac: self.lxc_mac,
            identity: self.identity,
            ..Default::default()
        }
    }
    /// A frame as this pod sends it (to its gateway MAC).
    pub fn send(&self, dst: Ipv4Addr, l4: &L4<'_>) -> Vec<u8> {
        packet::ipv4_frame(&Eth { dst: self.lxc_mac, src: self.mac }, &Ip4::new(self.ip, dst), l4)
    }
}

pub fn ipcache_entry(identity: u32) -> IpcacheEntry {
    IpcacheEntry { identity, ..Default::default() }
}

/// A node with pods A and B in the lxc map, the ipcache and the endpoint
/// configuration map, the node's one from-container, and the host object.
/// The test thread gets a network namespace of its own with devices of A's
/// and B's ifindexes (a test run's packet comes from one of them).
pub struct Node {
    pub node: ScratchNode,
    pub lxc: Loaded,
    pub host: Loaded,
    pub events: EventRing,
}

/// Load the node's from-container and configure `pods` (their devices made
/// in the test thread's own network namespace).
pub fn endpoints(node: &ScratchNode, pods: &[EndpointConfig]) -> Loaded {
    let ifindexes: Vec<u32> = pods.iter().map(|p| p.ifindex).collect();
    ciliate_datapath::testrun::own_netns_with_devices(&ifindexes).expect("test devices");
    let mut lxc = loader::load_lxc(&node.pins).unwrap();
    lxc.classifier(FROM_CONTAINER).unwrap();
    let mut cfg = node.endpoint_config().unwrap();
    for p in pods {
        cfg.set(p).unwrap();
    }
    lxc
}

impl Node {
    pub fn new(tag: &str) -> Self {
        Self::with_pins(tag, |_| {})
    }

    /// A node whose pins (capacities, Maglev table size) `configure` set
    /// before anything loads.
    pub fn with_pins(tag: &str, configure: impl FnOnce(&mut NodePins)) -> Self {
        let mut node = ScratchNode::new(tag).expect("scratch pin dir (needs root)");
        configure(&mut node.pins);
        let lxc = endpoints(&node, &[A.config(), B.config()]);
        let host_cfg = HostConfig {
            ifindex: 3,
            router_ip: ROUTER.octets(),
            mac: HOST_MAC,
            ..Default::default()
        };
        let mut host = loader::load_host(&node.pins, &host_cfg).unwrap();
        host.classifier(FROM_HOST).unwrap();
        let mut lxc_map = node.lxc().unwrap();
        lxc_map.upsert(A.ip, &A.info()).unwrap();
        lxc_map.upsert(B.ip, &B.info()).unwrap();
        let host_ep =
            EndpointInfo { flags: ENDPOINT_F_HOST, identity: identity::HOST, ..Default::default() };
        lxc_map.upsert(ROUTER, &host_ep).unwrap();
        let mut ipc = node.ipcache().unwrap();
        ipc.upsert(Ipv4Addr::UNSPECIFIED, 0, &ipcache_entry(identity::WORLD)).unwrap();
        ipc.upsert(A.ip, 32, &ipcache_entry(A.identity)).unwrap();
        ipc.upsert(B.ip, 32, &ipcache_entry(B.identity)).unwrap();
        ipc.upsert(ROUTER, 32, &ipcache_entry(identity::HOST)).unwrap();
        let events = node.events().unwrap();
        Self { node, lxc, host, events }
    }

    pub fn run(loaded: &mut Loaded, prog: &str, pkt: &[u8]) -> TcRun {
        run_tc(loaded.classifier(prog).unwrap(), prog, pkt).unwrap()
    }
    /// Run the node's from-container on `pkt` coming from the device of
    /// the endpoint configured for `ifindex`.
    pub fn from_container(lxc: &mut Loaded, ifindex: u32, pkt: &[u8]) -> TcRun {
        run_tc_on(lxc.classifier(FROM_CONTAINER).unwrap(), FROM_CONTAINER, pkt, ifindex).unwrap()
    }
    pub fn send_a(&mut self, pkt: &[u8]) -> TcRun {
        Self::from_container(&mut self.lxc, A.ifindex, pkt)
    }
    pub fn send_b(&mut self, pkt: &[u8]) -> TcRun {
        Self::from_container(&mut self.lxc, B.ifindex, pkt)
    }
    pub fn send_host(&mut self, pkt: &[u8]) -> TcRun {
        Self::run(&mut self.host, FROM_HOST, pkt)
    }

    /// The one trace event the last run sent.
    pub fn trace(&mut self) -> ciliate_common::event::TraceNotify {
        let events = self.events.drain();
        match events.as_slice() {
            [Event::Trace(t)] => *t,
            other => panic!("expected one trace event, got {other:?}"),
        }
    }

    pub fn ct_entry(&self, key: CtKey4) -> Option<ciliate_common::ct::CtEntry> {
        self.node.ct().unwrap().get(&key).unwrap()
    }
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> L4<'static> {
    L4::Tcp { sport, dport, seq: 1, ack: 0, flags, payload: b"" }
}

pub fn key(src: &Pod, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey4 {
    CtKey4 {
        saddr: src.ip.octets(),
        daddr: dst.octets(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// The debug and capture events of `events`, in words.
#[allow(dead_code, reason = "not every test binary reads debug events")]
pub fn debug_lines(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Debug(d) => Some(ciliate_datapath::events::debug_message(d)),
            Event::Capture(c) => {
                Some(format!("capture: {}", ciliate_datapath::events::capture_message(c)))
            }
            _ => None,
        })
        .collect()
}
