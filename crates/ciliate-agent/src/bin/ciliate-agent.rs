//! `ciliate-agent`: runs one node (in the network namespace it is started
//! in). Sets up bpffs, cgroup v2, the router devices and from-host, restores
//! the endpoints of a previous run (their programs kept forwarding while no
//! agent ran), then serves the API.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context as _;
use ciliate_agent::{
    api::{self, Server},
    cluster::{self, ClusterSync, NodeRecord, Routing},
    config::Flags,
    config::KvConfig,
    endpoint::Endpoints,
    kernel::{KernelCluster, KernelDatapath, KernelLb, ensure_cgroup2, ensure_health_endpoint},
    kvstore::{Etcd, KvStore, LocalStore},
    services::{self, Services},
};
use ciliate_datapath::{
    bpffs::NodePins,
    maps::{CtMaps, monotonic_secs},
    node::{self, HostSetup},
};
use clap::Parser;

fn log(msg: impl AsRef<str>) {
    eprintln!("[ciliate-agent] {}", msg.as_ref());
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ciliate-agent: {e:#}");
        std::process::exit(1);
    }
}

/// Conntrack garbage collection: every `interval` seconds, delete the
/// entries whose lifetime ran out, then the retired backends no flow is
/// pinned to any more.
fn spawn_ct_gc(dir: std::path::PathBuf, interval: u64, services: Arc<Mutex<Services>>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(interval));
            match CtMaps::from_pin_dir(&dir).and_then(|mut ct| ct.sweep(monotonic_secs())) {
                Ok(0) => {}
                Ok(n) => log(format!("conntrack GC removed {n} expired entries")),
                Err(e) => log(format!("conntrack GC: {e}")),
            }
            let mut svcs = services.lock().unwrap_or_else(|e| e.into_inner());
            match svcs.release_retired() {
                Ok(0) => {}
                Ok(n) => log(format!("released {n} retired backends")),
                Err(e) => log(format!("releasing retired backends: {e}")),
            }
        }
    });
}

fn run() -> anyhow::Result<()> {
    let mut cfg = Flags::parse().resolve()?;
    let started = Instant::now();
    // The cluster's store first: the pod CIDR may come from it.
    let kv: Arc<dyn KvStore> = match &cfg.kvstore {
        KvConfig::Local(path) => {
            Arc::new(LocalStore::open(Some(path.clone())).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        KvConfig::Etcd(eps) => Arc::new(Etcd::new(eps).map_err(|e| anyhow::anyhow!(e))?),
    };
    if let (Some((pool, mask)), false) = (cfg.cluster_pool, cfg.pod_cidr_given) {
        // The store may be briefly away at start: retry for a while.
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        cfg.pod_cidr = loop {
            match cluster::claim_pod_cidr(kv.as_ref(), &cfg.node, pool, mask) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    log(format!("claiming a pod CIDR from {pool}: {e}; retrying"));
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Err(e) => anyhow::bail!("claiming a pod CIDR from {pool}: {e}"),
            }
        };
        log(format!("claimed pod CIDR {} from the cluster pool {pool}", cfg.pod_cidr));
    }
    log(format!(
        "node {} pod CIDR {} state {} kvstore {} routing {:?}",
        cfg.node,
        cfg.pod_cidr,
        cfg.state_dir.display(),
        kv.describe(),
        cfg.routing
    ));
    let pins = NodePins::create(&cfg.bpffs, &cfg.node).context("setting up bpffs")?;
    let cgroup = ensure_cgroup2().context("finding or mounting cgroup v2")?;
    log(format!("bpffs {}, cgroup v2 {}", pins.dir.display(), cgroup.display()));
    let setup = HostSetup {
        pod_cidr: cfg.pod_cidr.net,
        pod_cidr_len: cfg.pod_cidr.len,
        router: cfg.pod_cidr.router(),
        trace_all: cfg.trace_all,
        devices: cfg.devices.clone(),
        routing: match cfg.routing {
            Routing::Tunnel => ciliate_common::node::ROUTING_TUNNEL,
            Routing::Native => ciliate_common::node::ROUTING_NATIVE,
        },
        masquerade: cfg.masquerade,
        non_masquerade: cfg.non_masquerade.iter().map(|c| (c.net, c.len)).collect(),
        cluster_cidr: match cfg.cluster_pool {
            Some((pool, _)) => (pool.net, pool.len),
            None => (cfg.pod_cidr.net, cfg.pod_cidr.len),
        },
    };
    let node_ips =
        node::setup_host(&pins, &setup).context("setting up the router devices and from-host")?;
    log(format!(
        "{} is {}, from-host attached; devices {:?} (node addresses {node_ips:?})",
        node::HOST_DEV,
        setup.router,
        cfg.devices
    ));
    if cfg.socket_lb {
        let root = cfg.cgroup_root.clone().unwrap_or(cgroup.clone());
        node::attach_sock_lb(&pins, &root)
            .with_context(|| format!("attaching socket LB to {}", root.display()))?;
        log(format!("socket LB attached to {}", root.display()));
    } else {
        node::detach_sock_lb(&pins);
    }
    let pin_dir = pins.dir.display().to_string();
    let lb = Box::new(KernelLb::new(pins.dir.clone()));
    let services = Services::open(Some(&cfg.state_dir), lb, node_ips.clone(), cfg.lb_algorithm)
        .map_err(|e| anyhow::anyhow!("opening services: {e}"))?;
    let mut services = services;
    services.cluster_cidr = Some(setup.cluster_cidr);
    services.node_ports = cfg.node_port_range;
    let services = Arc::new(Mutex::new(services));
    spawn_ct_gc(pins.dir.clone(), cfg.ct_gc_interval, services.clone());
    let dp = KernelDatapath::new(pins).context("loading the node's from-container")?;
    log(format!(
        "from-container {}",
        if dp.verified_now() { "loaded and verified" } else { "found pinned (not verified again)" }
    ));
    let mut eps = Endpoints::open(cfg.pod_cidr, Some(&cfg.state_dir), dp)
        .map_err(|e| anyhow::anyhow!("opening the state in {}: {e}", cfg.state_dir.display()))?;
    eps.trace_all = cfg.trace_all;
    eps.cluster_cidrs = vec![setup.cluster_cidr];
    eps.identities.cluster = Some(kv.clone());
    let restored = eps.restore().map_err(|e| anyhow::anyhow!("restoring endpoints: {e}"))?;
    log(format!("restored {restored} endpoints in {:?}", started.elapsed()));
    let host = eps.ensure_host(setup.router).map_err(|e| anyhow::anyhow!("host endpoint: {e}"))?;
    log(format!("host endpoint {} (identity {})", host.id, host.identity));
    if cfg.enable_health {
        let h = ensure_health_endpoint(&mut eps, &cfg.node).map_err(|e| anyhow::anyhow!("{e}"))?;
        log(format!("health endpoint {} at {} in {}", h.id, h.ip, h.netns));
    }
    // The policy in force, written again where the maps differ (entries
    // of endpoints gone while no agent ran go too).
    eps.regenerate().map_err(|e| anyhow::anyhow!("writing the policy in force: {e}"))?;
    {
        let local = api::local_ips(&eps);
        let mut svcs = services.lock().unwrap_or_else(|e| e.into_inner());
        let n = svcs.restore(&local).map_err(|e| anyhow::anyhow!("restoring services: {e}"))?;
        if let Some(file) = &cfg.services {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading services {}", file.display()))?;
            let specs = services::parse_file(&text)
                .map_err(|e| anyhow::anyhow!("services {}: {e}", file.display()))?;
            for spec in specs {
                svcs.update(spec, &local)
                    .map_err(|e| anyhow::anyhow!("services {}: {e}", file.display()))?;
            }
        }
        log(format!("restored {n} services; {} in force", svcs.list().len()));
    }
    let health_ip = eps.by_container(ciliate_agent::endpoint::HEALTH_CONTAINER).map(|e| e.ip);
    let kv_status =
        Arc::new(Mutex::new(cluster::KvStatus { store: kv.describe(), ..Default::default() }));
    let server = Arc::new(Server {
        state: Mutex::new(eps),
        services,
        kv: kv.clone(),
        kv_status: kv_status.clone(),
        routing: cfg.routing,
        node: cfg.node.clone(),
        pin_dir,
        started,
        restored,
    });
    if let Some(node_ip) = node_ips.first().copied() {
        let me = NodeRecord {
            name: cfg.node.clone(),
            ip: node_ip,
            pod_cidr: cfg.pod_cidr.to_string(),
            routing: cfg.routing,
            health_ip,
        };
        let dp = Box::new(KernelCluster {
            pin_dir: std::path::PathBuf::from(&server.pin_dir),
            routing: cfg.routing,
            device: cfg.devices.first().cloned(),
        });
        let sync = ClusterSync::new(kv.clone(), me, dp, server.clone(), kv_status);
        std::thread::spawn(move || sync.run(log));
        log(format!("cluster sync through {} as {node_ip}", kv.describe()));
    } else {
        log("no --devices: the node has no address to join a cluster with; running alone");
    }
    log(format!("serving the API on {}", cfg.socket.display()));
    api::serve(server, &cfg.socket).with_context(|| format!("serving on {}", cfg.socket.display()))
}
