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
    config::Flags,
    endpoint::Endpoints,
    kernel::{KernelDatapath, ensure_cgroup2, ensure_health_endpoint},
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
/// entries whose lifetime ran out.
fn spawn_ct_gc(dir: std::path::PathBuf, interval: u64) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(interval));
            match CtMaps::from_pin_dir(&dir).and_then(|mut ct| ct.sweep(monotonic_secs())) {
                Ok(0) => {}
                Ok(n) => log(format!("conntrack GC removed {n} expired entries")),
                Err(e) => log(format!("conntrack GC: {e}")),
            }
        }
    });
}

fn run() -> anyhow::Result<()> {
    let cfg = Flags::parse().resolve()?;
    let started = Instant::now();
    log(format!("node {} pod CIDR {} state {}", cfg.node, cfg.pod_cidr, cfg.state_dir.display()));
    let pins = NodePins::create(&cfg.bpffs, &cfg.node).context("setting up bpffs")?;
    let cgroup = ensure_cgroup2().context("finding or mounting cgroup v2")?;
    log(format!("bpffs {}, cgroup v2 {}", pins.dir.display(), cgroup.display()));
    let setup = HostSetup {
        pod_cidr: cfg.pod_cidr.net,
        pod_cidr_len: cfg.pod_cidr.len,
        router: cfg.pod_cidr.router(),
        trace_all: cfg.trace_all,
    };
    node::setup_host(&pins, &setup).context("setting up the router devices and from-host")?;
    log(format!("{} is {}, from-host attached", node::HOST_DEV, setup.router));
    let pin_dir = pins.dir.display().to_string();
    spawn_ct_gc(pins.dir.clone(), cfg.ct_gc_interval);
    let mut eps = Endpoints::open(cfg.pod_cidr, Some(&cfg.state_dir), KernelDatapath::new(pins))
        .map_err(|e| anyhow::anyhow!("opening the state in {}: {e}", cfg.state_dir.display()))?;
    eps.trace_all = cfg.trace_all;
    let restored = eps.restore().map_err(|e| anyhow::anyhow!("restoring endpoints: {e}"))?;
    log(format!("restored {restored} endpoints in {:?}", started.elapsed()));
    let host = eps.ensure_host(setup.router).map_err(|e| anyhow::anyhow!("host endpoint: {e}"))?;
    log(format!("host endpoint {} (identity {})", host.id, host.identity));
    if cfg.enable_health {
        let h = ensure_health_endpoint(&mut eps, &cfg.node).map_err(|e| anyhow::anyhow!("{e}"))?;
        log(format!("health endpoint {} at {} in {}", h.id, h.ip, h.netns));
    }
    let server =
        Arc::new(Server { state: Mutex::new(eps), node: cfg.node, pin_dir, started, restored });
    log(format!("serving the API on {}", cfg.socket.display()));
    api::serve(server, &cfg.socket).with_context(|| format!("serving on {}", cfg.socket.display()))
}
