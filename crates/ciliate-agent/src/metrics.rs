//! Prometheus metrics under Cilium's names and labels, so existing
//! dashboards and alerts work (`--prometheus-serve-addr`, default `:9962`,
//! `GET /metrics`, Prometheus text format 0.0.4).
//!
//! Two kinds: counters and histograms the agent updates as things happen
//! ([`Metrics`]: policy changes, service events, endpoint regenerations,
//! kvstore operations), and values read at scrape time ([`Scraped`]): the
//! datapath's drop and forward counters (its metrics map), how full the
//! maps are, endpoints, identities, policy, unreachable nodes, the agent's
//! map operations and the process.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ciliate_common::{drop, metrics as dpm};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// "success" or "fail", as Cilium labels outcomes.
pub fn outcome(ok: bool) -> &'static str {
    if ok { "success" } else { "fail" }
}

fn seconds_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The counters and histograms code paths update. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    /// `cilium_policy_change_total{outcome}`.
    pub policy_change: Family<Labels, Counter>,
    /// `cilium_services_events_total{action}`: add, update, delete.
    pub services_events: Family<Labels, Counter>,
    /// `cilium_endpoint_regeneration_time_stats_seconds{scope,status}`.
    pub regeneration_time: Family<Labels, Histogram, fn() -> Histogram>,
    /// `cilium_endpoint_regenerations_total{outcome}`.
    pub regenerations: Family<Labels, Counter>,
    /// `cilium_kvstore_operations_duration_seconds{action,kind,outcome,scope}`.
    pub kvstore_ops: Family<Labels, Histogram, fn() -> Histogram>,
    /// `cilium_datapath_conntrack_gc_runs_total{family,status}`.
    pub ct_gc_runs: Family<Labels, Counter>,
    /// The last conntrack sweep (`cilium_datapath_conntrack_gc_entries`).
    pub ct_gc_last: Arc<Mutex<Option<ciliate_datapath::maps::Sweep>>>,
    /// Masquerading entries counted at the last sweep (their map's
    /// pressure).
    pub nat_entries: Arc<Mutex<Option<usize>>>,
    /// Capacities the maps were made with, where not the compiled ones.
    pub map_max: Arc<Mutex<std::collections::BTreeMap<String, u32>>>,
    /// Policy entries each endpoint holds and its share of the policy map
    /// (`--bpf-policy-map-max`), after the last policy write: each
    /// endpoint's pressure, as Cilium's per-endpoint policy maps have.
    pub policy_fill: Arc<Mutex<PolicyFill>>,
}

/// Endpoint ID → policy entries it holds; and the share each may hold.
#[derive(Clone, Debug, Default)]
pub struct PolicyFill {
    pub held: std::collections::BTreeMap<u16, usize>,
    pub share: usize,
}

/// The map name an endpoint's policy pressure is reported under
/// (Cilium's per-endpoint map, `cilium_policy_v2_<ID, 5 digits>`).
pub fn endpoint_policy_map_name(endpoint_id: u16) -> String {
    format!("{}_{endpoint_id:05}", ciliate_common::policy::MAP_NAME)
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            policy_change: Family::default(),
            services_events: Family::default(),
            regeneration_time: Family::new_with_constructor(seconds_histogram),
            regenerations: Family::default(),
            kvstore_ops: Family::new_with_constructor(seconds_histogram),
            ct_gc_runs: Family::default(),
            ct_gc_last: Arc::default(),
            nat_entries: Arc::default(),
            map_max: Arc::default(),
            policy_fill: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn policy_changed(&self, ok: bool) {
        self.policy_change.get_or_create(&labels(&[("outcome", outcome(ok))])).inc();
    }

    pub fn service_event(&self, action: &str) {
        self.services_events.get_or_create(&labels(&[("action", action)])).inc();
    }

    /// A regeneration of `endpoints` endpoints that took `took`.
    pub fn regenerated(&self, endpoints: usize, took: Duration, ok: bool) {
        let status = outcome(ok);
        self.regeneration_time
            .get_or_create(&labels(&[("scope", "total"), ("status", status)]))
            .observe(took.as_secs_f64());
        self.regenerations.get_or_create(&labels(&[("outcome", status)])).inc_by(endpoints as u64);
    }

    /// One phase of a regeneration (Cilium's scopes: `policyCalculation`,
    /// `mapSync`) that took `took`.
    pub fn regeneration_phase(&self, scope: &str, took: Duration, ok: bool) {
        self.regeneration_time
            .get_or_create(&labels(&[("scope", scope), ("status", outcome(ok))]))
            .observe(took.as_secs_f64());
    }

    /// A kvstore operation (`kind`: Get, ListPrefix, Update, CreateOnly,
    /// Delete, LeaseGrant, LeaseKeepAlive, Watch) on `key`.
    pub fn kvstore_op(&self, kind: &str, key: &str, took: Duration, ok: bool) {
        let action = match kind {
            "Get" | "ListPrefix" | "Watch" => "read",
            "Delete" => "delete",
            _ => "set",
        };
        self.kvstore_ops
            .get_or_create(&labels(&[
                ("action", action),
                ("kind", kind),
                ("outcome", outcome(ok)),
                ("scope", &kv_scope(key)),
            ]))
            .observe(took.as_secs_f64());
    }

    pub fn ct_gc(&self, sweep: Option<ciliate_datapath::maps::Sweep>) {
        let status = if sweep.is_some() { "completed" } else { "uncompleted" };
        self.ct_gc_runs.get_or_create(&labels(&[("family", "ipv4"), ("status", status)])).inc();
        if let Some(s) = sweep {
            *self.ct_gc_last.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    }
}

/// "nodes/v1" of "ciliate/state/nodes/v1/node1": the part of a key that
/// says what it is (as Cilium scopes its kvstore metrics).
pub fn kv_scope(key: &str) -> String {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        [_, _, what, version, ..] => format!("{what}/{version}"),
        _ => key.chars().take(12).collect(),
    }
}

/// What the scrape reads from the rest of the agent.
pub struct Sources {
    pub pin_dir: PathBuf,
    pub endpoints: tokio::sync::watch::Receiver<Arc<crate::endpoint::EndpointsView>>,
    pub kv_status: Arc<Mutex<crate::cluster::KvStatus>>,
    pub metrics: Metrics,
    pub started: std::time::SystemTime,
}

/// Values read at scrape time.
pub struct Scraped(Sources);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

fn direction(d: u8) -> &'static str {
    match d {
        dpm::DIR_INGRESS => "INGRESS",
        dpm::DIR_EGRESS => "EGRESS",
        dpm::DIR_SERVICE => "SERVICE",
        _ => "UNKNOWN",
    }
}

/// One metric family of constant values.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let Some(first) = rows.first() else { return Ok(()) };
    let mut m = enc.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (l, v) in &rows {
        v.encode(m.encode_family(l)?)?;
    }
    Ok(())
}

fn gauge<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    family(enc, name, help, rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v))).collect())
}

fn counter<N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<N>: EncodeMetric,
{
    family(enc, name, help, rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v))).collect())
}

impl Collector for Scraped {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        // The datapath's counters.
        let dp = ciliate_datapath::maps::MetricsMap::from_pin_dir(&s.pin_dir)
            .and_then(|m| m.dump())
            .unwrap_or_default();
        let (mut drops_n, mut drops_b, mut fwd_n, mut fwd_b) = (vec![], vec![], vec![], vec![]);
        let mut fwd: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for (k, v) in &dp {
            if k.reason == dpm::REASON_FORWARDED {
                let e = fwd.entry(direction(k.dir)).or_default();
                e.0 += v.packets;
                e.1 += v.bytes;
            } else {
                let l = labels(&[
                    ("direction", direction(k.dir)),
                    ("reason", drop::reason_name(k.reason)),
                ]);
                drops_n.push((l.clone(), v.packets));
                drops_b.push((l, v.bytes));
            }
        }
        for (d, (n, b)) in fwd {
            fwd_n.push((labels(&[("direction", d)]), n));
            fwd_b.push((labels(&[("direction", d)]), b));
        }
        counter(
            &mut enc,
            "cilium_drop_count",
            "Total dropped packets, tagged by drop reason and ingress/egress direction",
            drops_n,
        )?;
        counter(
            &mut enc,
            "cilium_drop_bytes",
            "Total dropped bytes, tagged by drop reason and ingress/egress direction",
            drops_b,
        )?;
        counter(
            &mut enc,
            "cilium_forward_count",
            "Total forwarded packets, tagged by ingress/egress direction",
            fwd_n,
        )?;
        counter(
            &mut enc,
            "cilium_forward_bytes",
            "Total forwarded bytes, tagged by ingress/egress direction",
            fwd_b,
        )?;

        // Endpoints, identities, policy.
        let v = s.endpoints.borrow().clone();
        gauge(
            &mut enc,
            "cilium_endpoint",
            "Number of endpoints managed by this agent",
            vec![(vec![], v.endpoints.len() as i64)],
        )?;
        let mut states: std::collections::BTreeMap<String, usize> =
            [("ready".to_owned(), 0), ("not-ready".to_owned(), 0)].into_iter().collect();
        for e in v.endpoints.values() {
            *states
                .entry(if e.state == "ready" { "ready".into() } else { "not-ready".into() })
                .or_default() += 1;
        }
        gauge(
            &mut enc,
            "cilium_endpoint_state",
            "Count of all endpoints, tagged by different endpoint states",
            states
                .into_iter()
                .map(|(k, n)| (labels(&[("endpoint_state", &k)]), n as i64))
                .collect(),
        )?;
        let (mut reserved, mut cluster, mut local) = (0, 0, 0);
        for i in v.identities.list() {
            if i.reserved {
                reserved += 1;
            } else if i.labels.iter().any(|l| l.starts_with("cidr:")) {
                local += 1;
            } else {
                cluster += 1;
            }
        }
        gauge(
            &mut enc,
            "cilium_identity",
            "Number of identities currently allocated",
            vec![
                (labels(&[("type", "reserved")]), reserved as i64),
                (labels(&[("type", "cluster_local")]), cluster as i64),
                (labels(&[("type", "node_local")]), local as i64),
            ],
        )?;
        gauge(
            &mut enc,
            "cilium_policy",
            "Number of policies currently loaded",
            vec![(vec![], v.policy.rules.len() as i64)],
        )?;
        gauge(
            &mut enc,
            "cilium_policy_max_revision",
            "Highest policy revision number in the agent",
            vec![(vec![], v.policy.revision as i64)],
        )?;
        let enforced = |on: &str| {
            v.endpoints
                .values()
                .filter(|e| e.ingress_enforcement == on || e.egress_enforcement == on)
                .count()
        };
        gauge(
            &mut enc,
            "cilium_policy_endpoint_enforcement_status",
            "Number of endpoints labeled by policy enforcement status",
            vec![
                (labels(&[("enforcement", "enabled")]), enforced("Enabled") as i64),
                (
                    labels(&[("enforcement", "disabled")]),
                    (v.endpoints.len() - enforced("Enabled")) as i64,
                ),
            ],
        )?;

        // Maps.
        let mut pressure: Vec<(Labels, f64)> = ciliate_datapath::maps::map_fill(&s.pin_dir)
            .into_iter()
            .map(|f| {
                (
                    labels(&[("map_name", f.name)]),
                    f.entries as f64 / f64::from(f.max_entries.max(1)),
                )
            })
            .collect();
        let map_max = s.metrics.map_max.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let max =
            |name: &str, compiled: u32| f64::from(map_max.get(name).copied().unwrap_or(compiled));
        if let Some(n) = *s.metrics.nat_entries.lock().unwrap_or_else(|e| e.into_inner()) {
            use ciliate_common::nat;
            pressure.push((
                labels(&[("map_name", nat::MAP_NAME)]),
                n as f64 / max(nat::MAP_NAME, nat::MAX_ENTRIES),
            ));
        }
        let fill = s.metrics.policy_fill.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (id, n) in &fill.held {
            let name = endpoint_policy_map_name(*id);
            pressure.push((labels(&[("map_name", &name)]), *n as f64 / fill.share.max(1) as f64));
        }
        let last = *s.metrics.ct_gc_last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sw) = last {
            use ciliate_common::ct;
            pressure.push((
                labels(&[("map_name", ct::TCP_MAP_NAME)]),
                sw.tcp_alive as f64 / max(ct::TCP_MAP_NAME, ct::MAX_ENTRIES_TCP),
            ));
            pressure.push((
                labels(&[("map_name", ct::ANY_MAP_NAME)]),
                sw.any_alive as f64 / max(ct::ANY_MAP_NAME, ct::MAX_ENTRIES_ANY),
            ));
            gauge(
                &mut enc,
                "cilium_datapath_conntrack_gc_entries",
                "The number of alive and deleted conntrack entries at the end of a garbage collector run",
                vec![
                    (
                        labels(&[("family", "ipv4"), ("protocol", "TCP"), ("status", "alive")]),
                        sw.tcp_alive as i64,
                    ),
                    (
                        labels(&[("family", "ipv4"), ("protocol", "TCP"), ("status", "deleted")]),
                        sw.tcp_deleted as i64,
                    ),
                    (
                        labels(&[("family", "ipv4"), ("protocol", "non-TCP"), ("status", "alive")]),
                        sw.any_alive as i64,
                    ),
                    (
                        labels(&[
                            ("family", "ipv4"),
                            ("protocol", "non-TCP"),
                            ("status", "deleted"),
                        ]),
                        sw.any_deleted as i64,
                    ),
                ],
            )?;
        }
        gauge(
            &mut enc,
            "cilium_bpf_map_pressure",
            "Fill percentage of a BPF map (0 to 1)",
            pressure,
        )?;
        counter(
            &mut enc,
            "cilium_bpf_map_ops",
            "Total operations on BPF maps, tagged by map name, operation and outcome",
            ciliate_datapath::maps::map_ops()
                .into_iter()
                .map(|(m, op, out, n)| {
                    (labels(&[("map_name", m), ("operation", op), ("outcome", out)]), n)
                })
                .collect(),
        )?;

        // The cluster.
        let kv = s.kv_status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        gauge(
            &mut enc,
            "cilium_unreachable_nodes",
            "Number of nodes that cannot be reached",
            vec![(vec![], kv.unreachable.len() as i64)],
        )?;
        gauge(
            &mut enc,
            "cilium_nodes_all_num",
            "Number of nodes managed",
            vec![(vec![], kv.nodes as i64)],
        )?;

        // The process.
        let p = process();
        counter(
            &mut enc,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            vec![(vec![], p.cpu_seconds)],
        )?;
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            vec![(vec![], p.rss_bytes as i64)],
        )?;
        gauge(
            &mut enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            vec![(vec![], p.vsize_bytes as i64)],
        )?;
        gauge(
            &mut enc,
            "process_open_fds",
            "Number of open file descriptors",
            vec![(vec![], p.open_fds as i64)],
        )?;
        gauge(
            &mut enc,
            "process_max_fds",
            "Maximum number of open file descriptors",
            vec![(vec![], p.max_fds as i64)],
        )?;
        let start =
            s.started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        gauge(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            vec![(vec![], start)],
        )?;
        Ok(())
    }
}

#[derive(Default)]
struct Process {
    cpu_seconds: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    open_fds: f64,
    max_fds: f64,
}

/// This process from /proc/self.
fn process() -> Process {
    let mut p = Process::default();
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) =
        unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        // Fields after the command name (which may hold spaces).
        && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // state is f[0]: utime f[11], stime f[12], vsize f[20], rss f[21].
        p.cpu_seconds = (num(11) + num(12)) / ticks.max(1) as f64;
        p.vsize_bytes = num(20);
        p.rss_bytes = num(21) * page.max(1) as f64;
    }
    p.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).unwrap_or(0.0);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        p.max_fds = lim.rlim_cur as f64;
    }
    p
}

/// The registry: the updated metrics and the scrape-time ones.
pub fn registry(sources: Sources) -> Registry {
    let m = sources.metrics.clone();
    let mut r = Registry::default();
    r.register("cilium_policy_change", "Number of policy changes by outcome", m.policy_change);
    r.register(
        "cilium_services_events",
        "Number of services events labeled by action type",
        m.services_events,
    );
    r.register(
        "cilium_endpoint_regeneration_time_stats_seconds",
        "Endpoint regeneration time stats labeled by the scope",
        m.regeneration_time,
    );
    r.register(
        "cilium_endpoint_regenerations",
        "Count of all endpoint regenerations that have completed, tagged by outcome",
        m.regenerations,
    );
    r.register(
        "cilium_kvstore_operations_duration_seconds",
        "Duration in seconds of kvstore operations",
        m.kvstore_ops,
    );
    r.register(
        "cilium_datapath_conntrack_gc_runs",
        "Number of times that the conntrack garbage collector process was run",
        m.ct_gc_runs,
    );
    r.register_collector(Box::new(Scraped(sources)));
    r
}

/// The text of one scrape.
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, r).is_err() {
        out.clear();
    }
    out
}

/// Serve `GET /metrics` on `addr` until `shutdown` (each scrape reads the
/// maps on the blocking pool).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::{Router, routing::get};
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let r = registry.clone();
            async move {
                let t = Instant::now();
                let body =
                    tokio::task::spawn_blocking(move || render(&r)).await.unwrap_or_default();
                tracing::debug!(
                    subsystem = "metrics",
                    took_ms = t.elapsed().as_millis() as u64,
                    "scrape"
                );
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { crate::api::stopped(&mut shutdown).await })
        .await
}

/// `--prometheus-serve-addr`: `:9962` (every address), `host:port`, or
/// empty (off).
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let full =
        if let Some(port) = s.strip_prefix(':') { format!("0.0.0.0:{port}") } else { s.to_owned() };
    full.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("--prometheus-serve-addr {s:?}: not [host]:port (e.g. :9962 or 127.0.0.1:9962)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_cilium_takes_them() {
        assert_eq!(parse_addr(":9962").unwrap(), Some("0.0.0.0:9962".parse().unwrap()));
        assert_eq!(parse_addr("127.0.0.1:9090").unwrap(), Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(parse_addr("").unwrap(), None);
        let e = parse_addr("9962").unwrap_err();
        assert!(e.contains("\"9962\""), "{e}");
    }

    #[test]
    fn kvstore_scopes_name_what_a_key_is() {
        assert_eq!(kv_scope("ciliate/state/nodes/v1/node1"), "nodes/v1");
        assert_eq!(kv_scope("ciliate/state/identities/v1/id/256"), "identities/v1");
        assert_eq!(kv_scope("ping"), "ping");
    }

    #[test]
    fn updated_metrics_render_with_cilium_names() {
        let m = Metrics::default();
        m.policy_changed(true);
        m.policy_changed(false);
        m.service_event("add");
        m.regenerated(3, Duration::from_millis(4), true);
        m.kvstore_op("Get", "ciliate/state/nodes/v1/a", Duration::from_millis(1), true);
        let mut r = Registry::default();
        r.register(
            "cilium_policy_change",
            "Number of policy changes by outcome",
            m.policy_change.clone(),
        );
        r.register("cilium_services_events", "x", m.services_events.clone());
        r.register("cilium_endpoint_regenerations", "x", m.regenerations.clone());
        r.register("cilium_kvstore_operations_duration_seconds", "x", m.kvstore_ops.clone());
        let text = render(&r);
        for want in [
            "cilium_policy_change_total{outcome=\"success\"} 1",
            "cilium_policy_change_total{outcome=\"fail\"} 1",
            "cilium_services_events_total{action=\"add\"} 1",
            "cilium_endpoint_regenerations_total{outcome=\"success\"} 3",
            "cilium_kvstore_operations_duration_seconds_count{action=\"read\",kind=\"Get\",outcome=\"success\",scope=\"nodes/v1\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}
