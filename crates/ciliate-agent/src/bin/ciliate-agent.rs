//! `ciliate-agent`: runs one node (in the network namespace it is started
//! in) on one tokio runtime. Start: the cluster's store, bpffs, cgroup v2,
//! the router devices and the node programs (verified once per binary),
//! then the API (serving `healthz`/`status` while endpoints are restored),
//! the endpoint manager (restore, host and health endpoints, the policy in
//! force), services, conntrack GC and the cluster sync. SIGTERM or SIGINT
//! stop it cleanly; the datapath stays (pinned maps, tc filters and links
//! keep forwarding while no agent runs).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ciliate_agent::{
    actor::Actor,
    api::{self, AppState},
    cluster::{self, ClusterSync, IdentityChange, NodeRecord, Routing},
    config::{Config, Flags},
    endpoint::{Datapath, Endpoints, EndpointsView},
    kernel::{KernelCluster, KernelDatapath, KernelLb, ensure_cgroup2, ensure_health_endpoint},
    kvstore::KvStore,
    services::{self, Services},
};
use ciliate_datapath::{
    bpffs::NodePins,
    maps::{CtMaps, monotonic_secs},
    node::{self, HostSetup},
};
use clap::Parser;
use tracing::{error, info, warn};

fn main() {
    let cfg = match Flags::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ciliate-agent: {e:#}");
            std::process::exit(2);
        }
    };
    init_logs(&cfg);
    // Few malloc arenas: the blocking pool's threads would otherwise each
    // keep one, and the memory a burst of requests used never goes back.
    // SAFETY: mallopt(3) before any thread is started.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("ciliate-agent")
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    if let Err(e) = rt.block_on(run(cfg)) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

/// Logs through `tracing`: text or JSON lines on stderr, info (or debug
/// with `--debug`; `CILIATE_LOG` takes an env-filter directive).
fn init_logs(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let default =
        if cfg.debug { "info,ciliate_agent=debug,ciliate_datapath=debug" } else { "info" };
    let filter = EnvFilter::try_from_env("CILIATE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log_json {
        b.json().flatten_event(true).with_current_span(false).init();
    } else {
        b.with_target(false).init();
    }
}

/// Run blocking `f` on the runtime's blocking pool.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> anyhow::Result<R> {
    tokio::task::spawn_blocking(f).await.context("a blocking task panicked")
}

/// A watch that turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tokio::spawn(async move {
        let which = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        info!("{which}: shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(mut cfg: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    // The state directory is the agent's own, or the agent does not start.
    ciliate_agent::store::private_dir(&cfg.state_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let shutdown = shutdown_signal()?;
    let metrics = ciliate_agent::metrics::Metrics::default();
    // The cluster's store first: the pod CIDR may come from it.
    let store: Arc<dyn KvStore> = cfg.kvstore.open().await?;
    let kv: Arc<dyn KvStore> =
        Arc::new(ciliate_agent::kvstore::Metered::new(store, metrics.clone()));
    // The Kubernetes API's client (the pod CIDR may come from it too).
    let api_client = match &cfg.k8s {
        Some(src) => Some(ciliate_agent::k8s::client(src).await?),
        None => None,
    };
    let k8s_ipam = api_client.as_ref().filter(|_| !cfg.pod_cidr_given);
    if let Some(client) = k8s_ipam {
        cfg.pod_cidr = ciliate_agent::k8s::ipam::pod_cidr(
            client,
            &cfg.node,
            cfg.ipam,
            Duration::from_secs(120),
        )
        .await?;
        info!(subsystem = "ipam", mode = ?cfg.ipam, "pod CIDR {} from the Kubernetes API", cfg.pod_cidr);
    } else if let (Some((pool, mask)), false) = (cfg.cluster_pool, cfg.pod_cidr_given) {
        // The store may be briefly away at start: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        cfg.pod_cidr = loop {
            match cluster::claim_pod_cidr(kv.as_ref(), &cfg.node, pool, mask).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    warn!(subsystem = "cluster", "claiming a pod CIDR from {pool}: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => anyhow::bail!("claiming a pod CIDR from {pool}: {e}"),
            }
        };
        info!(
            subsystem = "cluster",
            "claimed pod CIDR {} from the cluster pool {pool}", cfg.pod_cidr
        );
    }
    info!(
        node = %cfg.node,
        pod_cidr = %cfg.pod_cidr,
        state_dir = %cfg.state_dir.display(),
        kvstore = %kv.describe(),
        routing = ?cfg.routing,
        "starting"
    );
    let setup = HostSetup {
        pod_cidr: cfg.pod_cidr.net,
        pod_cidr_len: cfg.pod_cidr.len,
        router: cfg.pod_cidr.router(),
        trace_all: cfg.trace_all,
        debug: cfg.bpf_debug,
        devices: cfg.devices.clone(),
        routing: match cfg.routing {
            Routing::Tunnel => ciliate_common::node::ROUTING_TUNNEL,
            Routing::Native => ciliate_common::node::ROUTING_NATIVE,
        },
        masquerade: cfg.masquerade,
        xdp_nodeport: cfg.xdp_nodeport,
        node_port_mode: cfg.node_port_mode,
        non_masquerade: cfg.non_masquerade.iter().map(|c| (c.net, c.len)).collect(),
        cluster_cidr: match cfg.cluster_pool {
            Some((pool, _)) => (pool.net, pool.len),
            None => (cfg.pod_cidr.net, cfg.pod_cidr.len),
        },
    };
    // The node's datapath: devices, maps, the node programs.
    let (pins, node_ips, dp, xdp_devices) = {
        let (cfg, setup) = (cfg.clone(), setup.clone());
        let policy_fill = metrics.policy_fill.clone();
        blocking(move || -> anyhow::Result<_> {
            let mut pins = NodePins::create(&cfg.bpffs, &cfg.node).context("setting up bpffs")?;
            pins.capacities = cfg.capacities.by_map();
            pins.maglev_size = cfg.capacities.maglev_size;
            let cgroup = ensure_cgroup2().context("finding or mounting cgroup v2")?;
            let node_ips = node::setup_host(&pins, &setup)
                .context("setting up the router devices and the node programs")?;
            if cfg.socket_lb {
                let root = cfg.cgroup_root.clone().unwrap_or(cgroup.clone());
                node::attach_sock_lb(&pins, &root)
                    .with_context(|| format!("attaching socket LB to {}", root.display()))?;
                info!(subsystem = "services", cgroup = %root.display(), "socket LB attached");
            } else {
                node::detach_sock_lb(&pins);
            }
            if cfg.sockops {
                let root = cfg.cgroup_root.clone().unwrap_or(cgroup.clone());
                node::attach_sockops(&pins, &root)
                    .with_context(|| format!("attaching socket-layer acceleration to {}", root.display()))?;
                info!(subsystem = "sockops", cgroup = %root.display(), "socket-layer acceleration attached");
            } else {
                node::detach_sockops(&pins);
            }
            let xdp_devices = if cfg.xdp_prefilter || cfg.xdp_nodeport {
                let modes = node::attach_xdp(&pins, &cfg.devices).context(
                    "attaching XDP (--enable-xdp-prefilter, --node-port-acceleration)",
                )?;
                for (dev, native) in &modes {
                    if *native {
                        info!(subsystem = "datapath", device = %dev, prefilter = cfg.xdp_prefilter, node_port_acceleration = cfg.xdp_nodeport, "XDP attached (native)");
                    } else {
                        warn!(subsystem = "datapath", device = %dev, "the driver has no native XDP: XDP runs generic, after the skb is allocated");
                    }
                }
                if !cfg.xdp_prefilter {
                    // XDP runs for NodePort only: a deny list an earlier run
                    // left in the pinned map, which no API would show now,
                    // must not drop anything (its record stays in the state
                    // directory for when the prefilter is on again).
                    ciliate_datapath::nodemaps::PrefilterMaps::from_pin_dir(&pins.dir)
                        .and_then(|mut m| m.clear())
                        .context("emptying the prefilter's map")?;
                }
                cfg.xdp_prefilter.then_some(modes)
            } else {
                node::detach_xdp(&pins, &cfg.devices);
                None
            };
            let mut dp =
                KernelDatapath::new(pins.clone()).context("loading the node's from-container")?;
            dp.policy_per_endpoint = cfg.capacities.policy_per_endpoint as usize;
            dp.policy_fill = Some(policy_fill.clone());
            info!(
                bpffs = %pins.dir.display(),
                cgroup = %cgroup.display(),
                devices = ?cfg.devices,
                node_ips = ?node_ips,
                from_container = if dp.verified_now() { "loaded and verified" } else { "found pinned, not verified again" },
                "datapath ready"
            );
            Ok((pins, node_ips, dp, xdp_devices))
        })
        .await??
    };
    for m in ciliate_datapath::migrate::take_report() {
        let (map, from, to) = (m.map.as_str(), m.from.to_string(), m.to.to_string());
        if m.lost > 0 || (m.copied == 0 && m.outcome.starts_with("layout")) {
            warn!(subsystem = "datapath", map, %from, %to, copied = m.copied, lost = m.lost, outcome = %m.outcome, "pinned map migrated with losses");
        } else {
            info!(subsystem = "datapath", map, %from, %to, copied = m.copied, outcome = %m.outcome, "pinned map migrated to this build's definition");
        }
    }
    let prefilter = match xdp_devices {
        Some(devices) => {
            let maps = ciliate_agent::kernel::KernelPrefilter::new(&pins.dir)
                .map_err(|e| anyhow::anyhow!("opening the prefilter's maps: {e}"))?;
            let p = ciliate_agent::prefilter::Prefilter::open(
                Box::new(maps),
                Some(&cfg.state_dir),
                &devices,
            )
            .map_err(|e| anyhow::anyhow!("restoring the prefilter: {e}"))?;
            Some(Arc::new(p))
        }
        None => None,
    };
    let probe = Arc::new(dp.probe().map_err(|e| anyhow::anyhow!(e))?);
    let mut eps = Endpoints::open(cfg.pod_cidr, Some(&cfg.state_dir), dp)
        .map_err(|e| anyhow::anyhow!("opening the state in {}: {e}", cfg.state_dir.display()))?;
    eps.trace_all = cfg.trace_all;
    eps.debug_all = cfg.bpf_debug;
    eps.metrics = metrics.clone();
    eps.cluster_cidrs = vec![setup.cluster_cidr];
    eps.restored = None;
    let endpoints = {
        let (router, node, health) = (setup.router, cfg.node.clone(), cfg.enable_health);
        Actor::start(
            "endpoints",
            eps,
            |e| e.view(),
            move |e| restore_endpoints(e, router, &node, health, started),
        )
    };
    let lb = Box::new(KernelLb::new(pins.dir.clone()));
    let mut svcs = Services::open(Some(&cfg.state_dir), lb, node_ips.clone(), cfg.lb_algorithm)
        .map_err(|e| anyhow::anyhow!("opening services: {e}"))?;
    svcs.cluster_cidr = Some(setup.cluster_cidr);
    svcs.node_ports = cfg.node_port_range;
    svcs.lb_map_max = cfg.capacities.lb;
    svcs.maglev_size = cfg.capacities.maglev_size;
    *metrics.map_max.lock().unwrap_or_else(|e| e.into_inner()) = cfg.capacities.by_map();
    let services: api::ServicesActor = Actor::start("services", svcs, |s| s.view(), |_| {});
    let kv_status =
        Arc::new(Mutex::new(cluster::KvStatus { store: kv.describe(), ..Default::default() }));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The agent is the ring's one reader; subscribers get copies.
    let events = ciliate_agent::events::EventHub::new(ciliate_agent::events::BACKLOG);
    match ciliate_datapath::maps::EventRing::from_pin_dir(&pins.dir) {
        Ok(ring) => {
            let lost = ciliate_datapath::maps::EventsLost::from_pin_dir(&pins.dir)
                .inspect_err(|e| warn!(subsystem = "events", error = %e, "no lost-event counter"))
                .ok();
            tokio::spawn(ciliate_agent::events::read_ring(
                events.clone(),
                ring,
                lost,
                shutdown.clone(),
            ));
        }
        Err(e) => warn!(subsystem = "events", error = %e, "cannot open the event ring; no events"),
    }
    // Kubernetes: the pods of this node and every namespace, watched.
    let k8s = match &cfg.k8s {
        Some(src) => {
            let client = api_client.clone().context("the Kubernetes client")?;
            let (view, changes) =
                ciliate_agent::k8s::K8s::start(client, &cfg.node, cfg.crd_mode, shutdown.clone());
            info!(subsystem = "k8s", source = ?src, "watching pods and namespaces in the Kubernetes API");
            Some((view, changes))
        }
        None => None,
    };
    let state = Arc::new(AppState {
        endpoints: endpoints.clone(),
        services: services.clone(),
        kv: kv.clone(),
        cluster_identities: true,
        kv_status: kv_status.clone(),
        routing: cfg.routing,
        node: cfg.node.clone(),
        pin_dir: pins.dir.display().to_string(),
        started,
        probe,
        kv_timeout: Duration::from_secs(10),
        ready: ready.clone(),
        events,
        ifnames: Default::default(),
        metrics: metrics.clone(),
        prefilter,
        acceleration: ciliate_api::models::Acceleration {
            xdp_prefilter: cfg.xdp_prefilter,
            node_port: if cfg.xdp_nodeport { "native" } else { "disabled" }.into(),
            node_port_mode: cfg.node_port_mode.as_str().into(),
            sockops: cfg.sockops,
        },
        k8s: k8s.as_ref().map(|(v, _)| v.clone()),
    });
    let k8s_client = k8s.as_ref().map(|(v, _)| v.client());
    if let Some((view, changes)) = k8s {
        for kind in ciliate_agent::k8s::POLICY_KINDS {
            let (st, client, node) = (state.clone(), view.client(), cfg.node.clone());
            tokio::spawn(ciliate_agent::k8s::follow_policies(st, client, node, kind));
        }
        tokio::spawn(ciliate_agent::k8s::services::follow_services(state.clone(), view.client()));
        tokio::spawn(ciliate_agent::k8s::publish::publish_endpoints(
            state.clone(),
            view.client(),
            cfg.node.clone(),
            node_ips.first().copied(),
        ));
        tokio::spawn(ciliate_agent::k8s::follow(state.clone(), view, changes));
    }
    // Other nodes' pods, as the cluster sync follows them (for flows).
    let remote_pods = tokio::sync::watch::channel(imbl::OrdMap::new()).0;
    let observer =
        cfg.hubble.as_ref().map(|h| ciliate_agent::hubble::Observer::new(&cfg.node, h.capacity));
    if let Some(addr) = cfg.prometheus_serve_addr {
        let mut registry = ciliate_agent::metrics::registry(ciliate_agent::metrics::Sources {
            pin_dir: pins.dir.clone(),
            endpoints: endpoints.watch(),
            kv_status: kv_status.clone(),
            metrics: metrics.clone(),
            started: std::time::SystemTime::now() - started.elapsed(),
        });
        if let (Some(h), Some(o)) = (&cfg.hubble, &observer) {
            let m = ciliate_agent::hubble_metrics::HubbleMetrics::register(
                &mut registry,
                h.metrics.clone(),
            );
            let _ = o.metrics.set(m);
        }
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            info!(subsystem = "metrics", %addr, "serving Prometheus metrics on /metrics");
            if let Err(e) = ciliate_agent::metrics::serve(addr, registry, shutdown).await {
                warn!(subsystem = "metrics", %addr, error = %e, "cannot serve metrics");
            }
        });
    }
    if let (Some(h), Some(observer)) = (cfg.hubble.clone(), observer) {
        if let Some(addr) = h.listen {
            let ip = node_ips.first().map(|ip| std::net::IpAddr::V4(*ip)).unwrap_or(addr.ip());
            *observer.address.lock().unwrap_or_else(|e| e.into_inner()) =
                std::net::SocketAddr::new(ip, addr.port()).to_string();
        }
        if let Some(x) = &h.export {
            match ciliate_agent::hubble_export::start(&observer, x.clone()) {
                Ok(()) => info!(subsystem = "hubble", file = %x.path.display(), "exporting flows"),
                Err(e) => warn!(subsystem = "hubble", error = %e, "cannot export flows"),
            }
        }
        tokio::spawn(ciliate_agent::hubble::run_parser(
            observer.clone(),
            state.events.clone(),
            ciliate_agent::hubble::Sources {
                endpoints: endpoints.watch(),
                services: Some(services.watch()),
                remote_pods: Some(remote_pods.subscribe()),
            },
            state.ifnames.clone(),
        ));
        let svc = ciliate_agent::hubble::Service {
            observer,
            kv: kv.clone(),
            port: h.listen.map(|a| a.port()).unwrap_or(ciliate_agent::hubble::DEFAULT_PORT),
            export: h.export.as_ref().map(|x| x.path.clone()),
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            info!(subsystem = "hubble", socket = %h.socket.display(), listen = ?h.listen, "serving flows (Hubble observer)");
            if let Err(e) =
                ciliate_agent::hubble::serve(svc, Some(h.socket), h.listen, shutdown).await
            {
                warn!(subsystem = "hubble", error = %e, "cannot serve the flow observer");
            }
        });
    }
    if cfg.cluster_health_port != 0 {
        let (port, shutdown) = (cfg.cluster_health_port, shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = cluster::serve_health(port, shutdown).await {
                warn!(subsystem = "cluster", port, error = %e, "cannot serve the health responder");
            }
        });
    }
    let server = {
        let (socket, shutdown) = (cfg.socket.clone(), shutdown.clone());
        info!(subsystem = "api", socket = %socket.display(), "serving the API");
        tokio::spawn(async move {
            api::serve(api::router(state), &socket, api::Limits::default(), shutdown).await
        })
    };
    // Services once endpoints are restored (Local traffic policies need
    // this node's endpoints).
    endpoints.read(|_| ()).await?;
    let local: std::collections::BTreeSet<_> =
        endpoints.snapshot().endpoints.values().map(|e| e.ip).collect();
    let file = cfg.services.clone();
    let restored = services
        .write(move |s| restore_services(s, &local, file.as_deref()), |s| s.view())
        .await??;
    info!(
        subsystem = "services",
        restored,
        in_force = services.snapshot().len(),
        "services restored"
    );
    spawn_ct_gc(
        pins.dir.clone(),
        cfg.ct_gc_interval,
        (cfg.capacities.ct_tcp, cfg.capacities.ct_any),
        services.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    if let Some(node_ip) = node_ips.first().copied() {
        let health_ip = endpoints
            .snapshot()
            .by_container(ciliate_agent::endpoint::HEALTH_CONTAINER)
            .map(|e| e.ip);
        let me = NodeRecord {
            name: cfg.node.clone(),
            ip: node_ip,
            pod_cidr: cfg.pod_cidr.to_string(),
            routing: cfg.routing,
            health_ip,
        };
        let dp = Box::new(KernelCluster {
            pin_dir: pins.dir.clone(),
            routing: cfg.routing,
            device: cfg.devices.first().cloned(),
            ipcache: None,
        });
        if let Some(k8s) = &k8s_client {
            let router = Some(cfg.pod_cidr.router());
            tokio::spawn(ciliate_agent::k8s::publish::publish_node(
                k8s.clone(),
                me.clone(),
                router,
            ));
        }
        let mut sync = ClusterSync::new(kv.clone(), me, dp, kv_status);
        if let Some(client) = k8s_client.as_ref().filter(|_| cfg.crd_mode) {
            sync.source = Some(Arc::new(ciliate_agent::k8s::crd::K8sRecords {
                client: client.clone(),
                routing: cfg.routing,
            }));
            sync.status.lock().unwrap_or_else(|e| e.into_inner()).store =
                "Kubernetes CRDs (CiliumNode, CiliumEndpoint, CiliumIdentity)".into();
        }
        sync.remote_pods = remote_pods.clone();
        sync.health_port = cfg.cluster_health_port;
        sync.identity_gc_interval = cfg.identity_gc_interval;
        sync.identity_heartbeat_timeout = cfg.identity_heartbeat_timeout;
        info!(subsystem = "cluster", store = %kv.describe(), node_ip = %node_ip, "cluster sync");
        let (mine, learned) = local_endpoints(endpoints.clone(), shutdown.clone());
        tokio::spawn(sync.run(mine, learned, shutdown.clone()));
    } else {
        warn!("no --devices: the node has no address to join a cluster with; running alone");
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "agent ready");
    api::stopped(&mut shutdown.clone()).await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(subsystem = "api", error = %e, "API server"),
        Err(e) => warn!(subsystem = "api", error = %e, "API server task"),
    }
    info!("stopped; the datapath keeps forwarding (maps, filters and links stay)");
    Ok(())
}

/// The endpoint manager's start: re-attach what the state directory lists
/// (the datapath kept forwarding meanwhile), the host and health
/// endpoints, then the policy in force (entries of endpoints gone while no
/// agent ran go too).
fn restore_endpoints<D: Datapath>(
    e: &mut Endpoints<D>,
    router: std::net::Ipv4Addr,
    node: &str,
    health: bool,
    started: Instant,
) {
    match e.restore() {
        Ok(n) => info!(
            subsystem = "endpoint",
            restored = n,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "endpoints restored"
        ),
        Err(err) => error!(subsystem = "endpoint", error = %err, "restoring endpoints"),
    }
    match e.ensure_host(router) {
        Ok(h) => info!(
            subsystem = "endpoint",
            endpoint_id = h.id,
            identity = h.identity,
            "host endpoint"
        ),
        Err(err) => error!(subsystem = "endpoint", error = %err, "host endpoint"),
    }
    if health {
        match ensure_health_endpoint(e, node) {
            Ok(h) => {
                info!(subsystem = "endpoint", endpoint_id = h.id, ip = %h.ip, netns = %h.netns, "health endpoint")
            }
            Err(err) => error!(subsystem = "endpoint", error = %err, "health endpoint"),
        }
    }
    if let Err(err) = e.regenerate() {
        error!(subsystem = "policy", error = %err, "writing the policy in force");
    }
    if e.restored.is_none() {
        e.restored = Some(0);
    }
}

/// Services from the state directory, then from the services file.
fn restore_services(
    s: &mut Services,
    local: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<usize> {
    let n = s.restore(local).map_err(|e| anyhow::anyhow!("restoring services: {e}"))?;
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading services {}", file.display()))?;
        let specs = services::parse_file(&text)
            .map_err(|e| anyhow::anyhow!("services {}: {e}", file.display()))?;
        for spec in specs {
            s.update(spec, local)
                .map_err(|e| anyhow::anyhow!("services {}: {e}", file.display()))?;
        }
    }
    Ok(n)
}

/// Conntrack garbage collection: every `interval` seconds, delete the
/// entries whose lifetime ran out, then the retired backends no flow is
/// pinned to any more.
fn spawn_ct_gc(
    dir: PathBuf,
    interval: Option<u64>,
    ct_max: (u32, u32),
    services: api::ServicesActor,
    metrics: ciliate_agent::metrics::Metrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use ciliate_agent::ctgc::Schedule;
    tokio::spawn(async move {
        let mut schedule = Schedule::new(interval);
        let mut wait = schedule.next();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = api::stopped(&mut shutdown) => return,
            }
            let d = dir.clone();
            match tokio::task::spawn_blocking(move || {
                let sweep = CtMaps::from_pin_dir(&d).and_then(|mut ct| ct.sweep(monotonic_secs()));
                let nat = ciliate_datapath::nodemaps::NatMap::from_pin_dir(&d).map(|n| n.count());
                (sweep, nat.ok())
            })
            .await
            {
                Ok((Ok(sweep), nat)) => {
                    let before = wait;
                    wait = schedule.after(&sweep, ct_max);
                    let fill = ciliate_agent::ctgc::fill(&sweep, ct_max);
                    if sweep.removed() > 0 || wait != before {
                        info!(
                            subsystem = "conntrack",
                            removed = sweep.removed(),
                            fill = format!("{:.1}%", fill * 100.0),
                            next_in = ?wait,
                            "conntrack GC"
                        );
                    }
                    metrics.ct_gc(Some(sweep));
                    *metrics.nat_entries.lock().unwrap_or_else(|e| e.into_inner()) = nat;
                }
                Ok((Err(e), _)) => {
                    warn!(subsystem = "conntrack", error = %e, "conntrack GC");
                    metrics.ct_gc(None);
                }
                Err(e) => warn!(subsystem = "conntrack", error = %e, "conntrack GC task"),
            }
            match services.write(|s| s.release_retired(), |s| s.view()).await {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(n)) => {
                    info!(subsystem = "services", released = n, "retired backends released")
                }
                Ok(Err(e)) => {
                    warn!(subsystem = "services", error = %e, "releasing retired backends")
                }
            }
        }
    });
}

/// The node's endpoints as the cluster sync publishes them (address →
/// identity, following the endpoint manager's snapshots), and where it
/// hands the identities of other nodes (learned by the endpoint manager,
/// which regenerates the policy when one is new).
fn local_endpoints<D: Datapath + 'static>(
    endpoints: Actor<Endpoints<D>, EndpointsView>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> (ciliate_agent::cluster::LocalIps, ciliate_agent::cluster::Learned) {
    let mine_of = |v: &EndpointsView| {
        let mut mine = ciliate_agent::cluster::Mine::default();
        for e in v.endpoints.values().filter(|e| e.identity != ciliate_common::identity::HOST) {
            mine.ips.insert(e.ip, (e.identity, e.pod_name.clone()));
            mine.identities
                .entry(e.identity)
                .or_insert_with(|| ciliate_api::models::label_set(&e.labels));
        }
        mine
    };
    let mut snaps = endpoints.watch();
    let (mine_tx, mine) = tokio::sync::watch::channel(mine_of(&snaps.borrow_and_update()));
    let (learned, mut learned_rx) = tokio::sync::mpsc::channel::<IdentityChange>(256);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = snaps.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let now = mine_of(&snaps.borrow_and_update());
                    mine_tx.send_if_modified(|m| if *m != now { *m = now; true } else { false });
                }
                change = learned_rx.recv() => {
                    let Some(change) = change else { return };
                    // Take what else is queued too: one regeneration for all.
                    let mut changes = vec![change];
                    while let Ok(more) = learned_rx.try_recv() {
                        changes.push(more);
                    }
                    let r = endpoints
                        .write(move |e| e.identities_changed(changes), |e| e.view())
                        .await;
                    if let Ok(Err(e)) = r {
                        warn!(subsystem = "cluster", error = %e, "learning identities");
                    }
                }
                _ = api::stopped(&mut shutdown) => return,
            }
        }
    });
    (mine, learned)
}
