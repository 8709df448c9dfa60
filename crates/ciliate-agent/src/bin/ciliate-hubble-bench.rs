//! The flow observer under load, no kernel needed: the agent's own event hub,
//! parser, ring and gRPC server (on a unix socket in a temporary directory),
//! with one following client (tonic) reading every flow. Datapath events
//! (to-endpoint traces of TCP SYNs, policy drops, policy verdicts, as the
//! datapath encodes them) are published into the hub at an offered rate;
//! the bench prints the flows per second made and delivered and the events
//! lost before the ring and by the follower. Then the memory a full ring
//! takes at Hubble's default 4095 flows and at 65535.
//!
//! `ciliate-hubble-bench [--seconds S]` (default 3 per rate).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ciliate_agent::{
    endpoint::{EndpointsView, PolicyState},
    events::{BACKLOG, EventHub, IfNames, Record},
    hubble::{self, Known, Observer, Sources},
    policy::IdView,
};
use ciliate_common::{
    ct, drop,
    event::{
        CAPTURE_LEN, DropNotify, EVENT_VERSION, EventHeader, KIND_DROP, KIND_POLICY_VERDICT,
        KIND_TRACE, PolicyVerdictNotify, TraceNotify, VERDICT_ALLOWED,
    },
    metrics, policy, trace,
};
use ciliate_datapath::events::Event;
use ciliate_hubble::observer::{
    GetFlowsRequest, get_flows_response::ResponseTypes, observer_client::ObserverClient,
};

const POD1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 4);

fn endpoint(id: u16, ip: Ipv4Addr, app: &str, identity: u32) -> ciliate_api::models::Endpoint {
    ciliate_api::models::Endpoint {
        id,
        container_id: format!("c{id}"),
        netns: String::new(),
        ifname: "eth0".into(),
        host_ifname: format!("lxc{id}"),
        host_ifindex: u32::from(id) + 10,
        host_mac: String::new(),
        ip,
        mac: String::new(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        pod_name: format!("default/{app}"),
        named_ports: BTreeMap::new(),
        identity,
        state: "ready".into(),
        ingress_enforcement: "Enabled".into(),
        egress_enforcement: "Disabled".into(),
        debug: false,
    }
}

/// Two pods, their identities, a policy: what a small node's view holds.
fn view() -> Arc<EndpointsView> {
    let labels = |app: &str| {
        vec![format!("k8s:app={app}"), "k8s:io.kubernetes.pod.namespace=default".to_owned()]
    };
    let ids = IdView::new([(256, labels("pod1")), (257, labels("pod2"))].into());
    let rules = ciliate_agent::policy::parse(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n\
         spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
         \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}]}]\n",
    )
    .expect("the bench's policy");
    Arc::new(EndpointsView {
        endpoints: [(3u16, endpoint(3, POD1, "pod1", 256)), (4u16, endpoint(4, POD2, "pod2", 257))]
            .into_iter()
            .collect(),
        identities: Arc::new(ids),
        cluster_identities: 2,
        policy: Arc::new(PolicyState { revision: 1, rules }),
        ipam_cidr: "10.200.0.0/24".parse().expect("a CIDR"),
        ipam_used: 2,
        ipam_free: 250,
        restored: Some(2),
        debug_all: false,
        trace_all: false,
    })
}

/// A TCP SYN from pod1:`sport` to pod2:7 as captured (Ethernet, IPv4, TCP).
fn syn(sport: u16) -> ([u8; CAPTURE_LEN], u16) {
    let mut d = [0u8; CAPTURE_LEN];
    d[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 4]);
    d[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 3]);
    d[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut d[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&POD1.octets());
    ip[16..20].copy_from_slice(&POD2.octets());
    let tcp = &mut d[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&7u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    (d, 54)
}

fn header(kind: u8, subtype: u8, source: u16, len: u16) -> EventHeader {
    EventHeader {
        kind,
        subtype,
        source,
        hash: 0,
        len_orig: u32::from(len),
        len_cap: len,
        version: EVENT_VERSION,
    }
}

/// Event `i` of the mix: a to-endpoint trace, a policy verdict, a policy
/// drop, in turn.
fn event(i: u64) -> Event {
    let (data, len) = syn(10_000 + (i % 50_000) as u16);
    match i % 3 {
        0 => Event::Trace(TraceNotify {
            hdr: header(KIND_TRACE, trace::TO_LXC, 4, len),
            src_identity: 256,
            dst_identity: 257,
            dst_id: 4,
            ct_state: ct::CT_NEW,
            _pad: 0,
            ifindex: 14,
            orig_ip: [0; 16],
            tunnel_endpoint: [0; 4],
            _pad2: [0; 4],
            data,
        }),
        1 => Event::PolicyVerdict(PolicyVerdictNotify {
            hdr: header(KIND_POLICY_VERDICT, 0, 4, len),
            remote_identity: 256,
            dir: policy::DIR_INGRESS,
            proto: 6,
            dport: 7u16.to_be(),
            verdict: VERDICT_ALLOWED,
            match_type: 0,
            _pad: [0; 2],
            _pad2: 0,
            data,
        }),
        _ => Event::Drop(DropNotify {
            hdr: header(KIND_DROP, drop::POLICY, 0, len),
            src_identity: 256,
            dst_identity: 257,
            dst_id: 4,
            ifindex: 14,
            line: 1,
            file: 1,
            ext_error: 0,
            dir: metrics::DIR_INGRESS,
            _pad: [0; 3],
            data,
        }),
    }
}

/// What one rate gave.
struct Outcome {
    offered: u64,
    seconds: f64,
    made: u64,
    delivered: u64,
    lost_before_ring: u64,
    lost_by_follower: u64,
}

/// Publish events at `rate` per second for `secs` into a hub whose
/// observer serves one follower.
async fn one_rate(rate: u64, secs: f64, dir: &std::path::Path) -> Result<Outcome, String> {
    let hub = EventHub::new(BACKLOG);
    let obs = Observer::new("bench", hubble::DEFAULT_CAPACITY);
    let (_view_tx, view_rx) = tokio::sync::watch::channel(view());
    tokio::spawn(hubble::run_parser(
        obs.clone(),
        hub.clone(),
        Sources { endpoints: view_rx, services: None, remote_pods: None },
        Arc::new(IfNames::default()),
    ));
    let socket = dir.join(format!("hubble-{rate}.sock"));
    let kv = ciliate_agent::kvstore::LocalStore::open(None).map_err(|e| e.to_string())?;
    let svc = hubble::Service { observer: obs.clone(), kv: Arc::new(kv), port: 0, export: None };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(hubble::serve(svc, Some(socket.clone()), None, stop_rx));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the observer did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ch = ciliate_hubble::client::channel(&format!("unix://{}", socket.display()), None)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = ObserverClient::new(ch)
        .get_flows(GetFlowsRequest { follow: true, ..Default::default() })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let (delivered, lost_follower) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (delivered, lost) = (delivered.clone(), lost_follower.clone());
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                match r.response_types {
                    Some(ResponseTypes::Flow(_)) => delivered.fetch_add(1, Ordering::Relaxed),
                    Some(ResponseTypes::LostEvents(l)) => {
                        lost.fetch_add(l.num_events_lost, Ordering::Relaxed)
                    }
                    _ => 0,
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, seen0, lost0) = obs.counts();
    // The publisher: a thread of its own, as the ring reader is a task of
    // its own in the agent; batches each millisecond at a paced rate.
    let publisher = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64 + 1;
                while sent < due {
                    hub.publish(Record::Event { time: SystemTime::now(), event: event(sent) });
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            (sent, start.elapsed().as_secs_f64())
        })
    };
    let (offered, seconds) = tokio::task::spawn_blocking(move || publisher.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the publisher panicked".to_string())?;
    // Let the pipeline drain.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let (_, _, seen, lost) = obs.counts();
    let _ = stop_tx.send(true);
    reader.abort();
    let _ = server.await;
    Ok(Outcome {
        offered,
        seconds,
        made: seen - seen0,
        delivered: delivered.load(Ordering::Relaxed),
        lost_before_ring: lost - lost0,
        lost_by_follower: lost_follower.load(Ordering::Relaxed).saturating_sub(lost - lost0),
    })
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// Fill a ring of `capacity` flows made from the mix; (RSS before, after).
fn ring_memory(capacity: usize) -> (f64, f64, Arc<Observer>) {
    let known = Known::new(view());
    let obs = Observer::new("bench", capacity);
    let before = rss_mib();
    for i in 0..capacity as u64 {
        if let Some(f) = hubble::to_flow("bench", SystemTime::now(), &event(i), &known) {
            obs.push(f);
        }
    }
    (before, rss_mib(), obs)
}

fn main() {
    let mut secs = 3.0;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, v] = args.as_slice()
        && flag == "--seconds"
    {
        secs = v.parse().unwrap_or(3.0);
    }
    let dir = std::env::temp_dir().join(format!("ciliate-hubble-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "[hubble-bench] the observer pipeline (hub -> parser -> ring of 4095 -> gRPC on a unix socket -> one follower), {secs} s per rate"
    );
    println!(
        "{:>16} {:>14} {:>18} {:>22} {:>20}",
        "offered ev/s",
        "flows made/s",
        "delivered/s",
        "lost before the ring",
        "lost by the follower"
    );
    for rate in [50_000, 100_000, 150_000, 200_000] {
        match rt.block_on(one_rate(rate, secs, &dir)) {
            Ok(o) => {
                let pct = |n: u64| 100.0 * n as f64 / o.offered.max(1) as f64;
                println!(
                    "{rate:>16} {:>14.0} {:>18.0} {:>14} ({:>4.1}%) {:>12} ({:>4.1}%)",
                    o.made as f64 / o.seconds,
                    o.delivered as f64 / o.seconds,
                    o.lost_before_ring,
                    pct(o.lost_before_ring),
                    o.lost_by_follower,
                    pct(o.lost_by_follower),
                );
            }
            Err(e) => println!("{rate:>16} failed: {e}"),
        }
    }
    drop(rt);
    println!();
    println!("[hubble-bench] memory of a full flow ring (flows of the same mix)");
    let base = rss_mib();
    let mut keep = Vec::new();
    for cap in [hubble::DEFAULT_CAPACITY, 65_535] {
        let (before, after, obs) = ring_memory(cap);
        let (n, ..) = obs.counts();
        println!(
            "ring of {cap:>6} flows ({n} held): +{:.1} MiB ({:.0} bytes per flow); process RSS {:.1} MiB (before any ring: {base:.1} MiB)",
            after - before,
            (after - before) * 1024.0 * 1024.0 / n.max(1) as f64,
            after
        );
        keep.push(obs);
    }
}
