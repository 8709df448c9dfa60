//! `ciliate observe` and `ciliate hubble`: flows from a node's observer
//! over gRPC (Hubble's API), with `hubble observe`'s flags and output
//! formats.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use ciliate_hubble::{
    flow::{
        DropReason, Endpoint, Flow, FlowFilter, LostEvent, LostEventSource, TcpFlags,
        TraceObservationPoint, Verdict, layer4::Protocol,
    },
    observer::{
        GetFlowsRequest, GetFlowsResponse, GetNodesRequest, ServerStatusRequest,
        get_flows_response::ResponseTypes, observer_client::ObserverClient,
    },
};
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::target::Target;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow
    #[default]
    Compact,
    /// A block of `KEY: value` lines per flow
    Dict,
    /// One JSON object per line (protobuf JSON of the response)
    Json,
    /// As json (Hubble's name for it)
    Jsonpb,
    /// Columns
    Table,
}

/// `hubble observe`'s flags. A flag without `from-`/`to-` matches either
/// side (a flow passes if its source or its destination does).
#[derive(Args, Debug, Default)]
pub struct ObserveArgs {
    /// The observer: unix:///path or host:port [default: hubble.sock beside the agent's socket]
    #[arg(long)]
    server: Option<String>,
    /// The last N flows
    #[arg(long)]
    last: Option<u64>,
    /// The first N flows of the ring
    #[arg(long)]
    first: Option<u64>,
    /// Every flow the ring holds
    #[arg(long)]
    all: bool,
    /// Follow: keep printing flows as they happen
    #[arg(short = 'f', long)]
    follow: bool,
    /// Flows since: RFC 3339 time or a duration ago (5m, 1h)
    #[arg(long)]
    since: Option<String>,
    /// Flows until: RFC 3339 time or a duration ago
    #[arg(long)]
    until: Option<String>,
    /// Pods ([namespace/]name-prefix), either side
    #[arg(long)]
    pod: Vec<String>,
    #[arg(long)]
    from_pod: Vec<String>,
    #[arg(long)]
    to_pod: Vec<String>,
    /// Namespaces, either side
    #[arg(short = 'n', long)]
    namespace: Vec<String>,
    #[arg(long)]
    from_namespace: Vec<String>,
    #[arg(long)]
    to_namespace: Vec<String>,
    /// Label selectors (app=web,tier in (a,b)), either side
    #[arg(short = 'l', long)]
    label: Vec<String>,
    #[arg(long)]
    from_label: Vec<String>,
    #[arg(long)]
    to_label: Vec<String>,
    /// IPs or CIDRs, either side
    #[arg(long)]
    ip: Vec<String>,
    #[arg(long)]
    from_ip: Vec<String>,
    #[arg(long)]
    to_ip: Vec<String>,
    /// Security identities, either side
    #[arg(long)]
    identity: Vec<u32>,
    #[arg(long)]
    from_identity: Vec<u32>,
    #[arg(long)]
    to_identity: Vec<u32>,
    /// Services ([namespace/]name), either side
    #[arg(long)]
    service: Vec<String>,
    #[arg(long)]
    from_service: Vec<String>,
    #[arg(long)]
    to_service: Vec<String>,
    /// L4 ports, either side
    #[arg(long)]
    port: Vec<String>,
    #[arg(long)]
    from_port: Vec<String>,
    #[arg(long)]
    to_port: Vec<String>,
    /// FORWARDED, DROPPED, ...
    #[arg(long)]
    verdict: Vec<String>,
    /// Event types: drop, trace, policy-verdict (trace:to-endpoint for an observation point)
    #[arg(short = 't', long = "type")]
    kind: Vec<String>,
    /// tcp, udp, icmp, ...
    #[arg(long)]
    protocol: Vec<String>,
    /// Node name patterns (node-*)
    #[arg(long)]
    node_name: Vec<String>,
    /// ingress or egress
    #[arg(long)]
    traffic_direction: Vec<String>,
    /// Drop reasons (POLICY_DENIED, ...)
    #[arg(long)]
    drop_reason_desc: Vec<String>,
    /// Replies only (true) or requests only (false)
    #[arg(long)]
    is_reply: Option<bool>,
    /// ipv4 or ipv6
    #[arg(long)]
    ip_version: Vec<String>,
    /// Negate the filter flag that follows: --not --ip 10.0.0.0/8 leaves those flows out
    /// (negated flags together make one blacklist filter, as hubble's)
    #[arg(long, num_args = 0, default_missing_value = "true", action = clap::ArgAction::Append)]
    not: Vec<bool>,
    /// Read flows from this file of JSON lines (an export file, or -o json output; - for
    /// stdin) instead of an observer
    #[arg(long)]
    input_file: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    output: Output,
    /// Explain each policy drop: which side denied it, by which rule or by default deny,
    /// and the smallest policy that would allow it (asks the agent's policy trace; in JSON
    /// output, an "explain" field)
    #[arg(long)]
    explain: bool,
    /// The flags that followed a --not (set by [`negate`]).
    #[arg(skip)]
    negated: Option<Box<ObserveArgs>>,
}

/// The flags filters are made of (clap ids).
const FILTER_FLAGS: [&str; 29] = [
    "pod",
    "from_pod",
    "to_pod",
    "namespace",
    "from_namespace",
    "to_namespace",
    "label",
    "from_label",
    "to_label",
    "ip",
    "from_ip",
    "to_ip",
    "identity",
    "from_identity",
    "to_identity",
    "service",
    "from_service",
    "to_service",
    "port",
    "from_port",
    "to_port",
    "verdict",
    "kind",
    "protocol",
    "node_name",
    "traffic_direction",
    "drop_reason_desc",
    "is_reply",
    "ip_version",
];

/// Move the filter flags that directly follow a `--not` from `a` to
/// `a.negated` (clap tells where each flag and value stood on the command
/// line).
pub fn negate(a: &mut ObserveArgs, m: &clap::ArgMatches) -> anyhow::Result<()> {
    use clap::{Args as _, FromArgMatches as _};
    let nots: Vec<usize> = m.indices_of("not").map(Iterator::collect).unwrap_or_default();
    if nots.is_empty() {
        return Ok(());
    }
    let cmd = ObserveArgs::augment_args(clap::Command::new("observe"));
    /// A flag as given: where, its id, `--long`, its value (if it takes one).
    struct Given {
        at: usize,
        id: String,
        flag: String,
        value: Option<String>,
    }
    let mut given: Vec<Given> = Vec::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let from_cli = matches!(m.value_source(id), Some(clap::parser::ValueSource::CommandLine));
        let (Some(raw), Some(at), true, false) =
            (m.get_raw(id), m.indices_of(id), from_cli, id == "not")
        else {
            continue;
        };
        let flag = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
        let takes = arg.get_action().takes_values();
        for (v, i) in raw.zip(at) {
            let value = takes.then(|| v.to_string_lossy().into_owned());
            given.push(Given { at: i, id: id.to_owned(), flag: flag.clone(), value });
        }
    }
    given.sort_by_key(|g| g.at);
    // The flag right after each --not (its value's place: `--ip 1.2.3.4`
    // and `--ip=1.2.3.4` count differently) goes to the blacklist.
    let mut taken = Vec::new();
    for n in nots {
        let Some(k) = given.iter().position(|g| g.at > n) else {
            anyhow::bail!("--not must be followed by a filter flag (--not --ip 10.0.0.0/8)");
        };
        if !FILTER_FLAGS.contains(&given[k].id.as_str()) {
            anyhow::bail!("--not negates a filter flag; {} is not one", given[k].flag);
        }
        taken.push(k);
    }
    // Each side parsed again from its own flags.
    let parse = |pick: &dyn Fn(usize) -> bool| -> anyhow::Result<ObserveArgs> {
        let mut argv = vec!["observe".to_owned()];
        for (_, g) in given.iter().enumerate().filter(|(k, _)| pick(*k)) {
            argv.push(g.flag.clone());
            argv.extend(g.value.clone());
        }
        Ok(ObserveArgs::from_arg_matches(&cmd.clone().try_get_matches_from(&argv)?)?)
    };
    let neg = parse(&|k| taken.contains(&k))?;
    *a = parse(&|k| !taken.contains(&k))?;
    a.negated = Some(Box::new(neg));
    Ok(())
}

#[derive(Subcommand)]
pub enum HubbleCommand {
    /// The observer's state: flows held, capacity, rate
    Status {
        #[arg(long)]
        server: Option<String>,
    },
    /// The observers' nodes
    #[command(subcommand)]
    List(HubbleList),
}

#[derive(Subcommand)]
pub enum HubbleList {
    Nodes {
        #[arg(long)]
        server: Option<String>,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Where the observer is: `--server`, else beside the agent's socket.
fn server(t: &Target, given: Option<&str>) -> anyhow::Result<String> {
    match given {
        Some(s) => Ok(s.to_owned()),
        None => {
            let sock = t.socket()?;
            let dir = sock.parent().map(PathBuf::from).unwrap_or_default();
            Ok(format!("unix://{}", dir.join("hubble.sock").display()))
        }
    }
}

async fn connect(server: &str) -> anyhow::Result<ObserverClient<Channel>> {
    ciliate_hubble::client::channel(server, None)
        .await
        .with_context(|| format!("connecting to the observer at {server}"))
        .map(ObserverClient::new)
}

/// An RFC 3339 time, or a duration ago.
fn when(s: &str) -> anyhow::Result<pbjson_types::Timestamp> {
    let t = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let d = humantime::parse_duration(s)
                .with_context(|| format!("{s:?} is neither an RFC 3339 time nor a duration"))?;
            SystemTime::now() - d
        }
    };
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Ok(pbjson_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
}

fn enum_value<T: Into<i32>>(
    what: &str,
    v: &str,
    from_name: fn(&str) -> Option<T>,
) -> anyhow::Result<i32> {
    from_name(&v.to_ascii_uppercase())
        .map(Into::into)
        .with_context(|| format!("{what} {v:?} is not known"))
}

/// The request's whitelist (or blacklist with `--not`).
pub fn filters(a: &ObserveArgs) -> anyhow::Result<Vec<FlowFilter>> {
    let mut base = FlowFilter {
        source_pod: a.from_pod.clone(),
        destination_pod: a.to_pod.clone(),
        source_label: a.from_label.clone(),
        destination_label: a.to_label.clone(),
        source_ip: a.from_ip.clone(),
        destination_ip: a.to_ip.clone(),
        source_identity: a.from_identity.clone(),
        destination_identity: a.to_identity.clone(),
        source_service: a.from_service.clone(),
        destination_service: a.to_service.clone(),
        source_port: a.from_port.clone(),
        destination_port: a.to_port.clone(),
        protocol: a.protocol.clone(),
        node_name: a.node_name.clone(),
        reply: a.is_reply.into_iter().collect(),
        ..Default::default()
    };
    base.source_pod.extend(a.from_namespace.iter().map(|n| format!("{n}/")));
    base.destination_pod.extend(a.to_namespace.iter().map(|n| format!("{n}/")));
    for v in &a.verdict {
        base.verdict.push(enum_value("verdict", v, Verdict::from_str_name)?);
    }
    for v in &a.drop_reason_desc {
        base.drop_reason_desc.push(enum_value("drop reason", v, DropReason::from_str_name)?);
    }
    for v in &a.traffic_direction {
        base.traffic_direction.push(enum_value(
            "traffic direction",
            v,
            ciliate_hubble::flow::TrafficDirection::from_str_name,
        )?);
    }
    for v in &a.ip_version {
        base.ip_version.push(match v.to_ascii_lowercase().as_str() {
            "ipv4" | "v4" | "4" => 1,
            "ipv6" | "v6" | "6" => 2,
            _ => anyhow::bail!("ip version {v:?}: ipv4 or ipv6"),
        });
    }
    for k in &a.kind {
        let (kind, point) = k.split_once(':').unwrap_or((k, ""));
        let t = match kind {
            "drop" => 1,
            "trace" => 4,
            "policy-verdict" => 9,
            _ => anyhow::bail!("event type {k:?}: drop, trace or policy-verdict"),
        };
        let sub = if point.is_empty() {
            None
        } else {
            let p =
                TraceObservationPoint::from_str_name(&point.to_ascii_uppercase().replace('-', "_"))
                    .with_context(|| format!("observation point {point:?} is not known"))?;
            Some(if p == TraceObservationPoint::ToEndpoint { 0 } else { p as i32 })
        };
        base.event_type.push(ciliate_hubble::flow::EventTypeFilter {
            r#type: t,
            match_sub_type: sub.is_some(),
            sub_type: sub.unwrap_or(0),
        });
    }
    // Either-side flags: one filter for the source side, one for the
    // destination side, each with everything else.
    let namespaces: Vec<String> = a.namespace.iter().map(|n| format!("{n}/")).collect();
    let pods: Vec<String> = a.pod.iter().cloned().chain(namespaces).collect();
    let either = !pods.is_empty()
        || !a.label.is_empty()
        || !a.ip.is_empty()
        || !a.identity.is_empty()
        || !a.service.is_empty()
        || !a.port.is_empty();
    if !either {
        return Ok(if base == FlowFilter::default() { vec![] } else { vec![base] });
    }
    let mut src = base.clone();
    src.source_pod.extend(pods.iter().cloned());
    src.source_label.extend(a.label.iter().cloned());
    src.source_ip.extend(a.ip.iter().cloned());
    src.source_identity.extend(a.identity.iter().copied());
    src.source_service.extend(a.service.iter().cloned());
    src.source_port.extend(a.port.iter().cloned());
    let mut dst = base;
    dst.destination_pod.extend(pods);
    dst.destination_label.extend(a.label.iter().cloned());
    dst.destination_ip.extend(a.ip.iter().cloned());
    dst.destination_identity.extend(a.identity.iter().copied());
    dst.destination_service.extend(a.service.iter().cloned());
    dst.destination_port.extend(a.port.iter().cloned());
    Ok(vec![src, dst])
}

pub fn request(a: &ObserveArgs) -> anyhow::Result<GetFlowsRequest> {
    let whitelist = filters(a)?;
    let blacklist = match &a.negated {
        // Negated flags make one filter (a flow is left out when it
        // matches them all), either-side ones one per side.
        Some(n) => filters(n)?,
        None => vec![],
    };
    let since = a.since.as_deref().map(when).transpose()?;
    let until = a.until.as_deref().map(when).transpose()?;
    // As hubble observe: the last 20 unless told otherwise (or following).
    let number = match (a.last, a.first) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) if a.all || a.follow || since.is_some() => 0,
        (None, None) => 20,
    };
    Ok(GetFlowsRequest {
        number,
        first: a.first.is_some(),
        follow: a.follow,
        whitelist,
        blacklist,
        since,
        until,
        ..Default::default()
    })
}

/// The flows of a file of JSON lines that `req` asks for (as an observer
/// would answer it: window, filters, first or last N).
fn from_file(
    path: &std::path::Path,
    req: &GetFlowsRequest,
) -> anyhow::Result<Vec<GetFlowsResponse>> {
    use std::io::BufRead as _;
    let input: Box<dyn std::io::Read> = if path == std::path::Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| format!("{}", path.display()))?)
    };
    let filters = ciliate_hubble::filter::FlowFilters::new(&req.whitelist, &req.blacklist)?;
    let key = |t: &pbjson_types::Timestamp| (t.seconds, t.nanos);
    let mut out = Vec::new();
    for (n, l) in std::io::BufReader::new(input).lines().enumerate() {
        let l = l.with_context(|| format!("reading {}", path.display()))?;
        if l.trim().is_empty() {
            continue;
        }
        let r: GetFlowsResponse = serde_json::from_str(&l)
            .with_context(|| format!("{} line {}: not a flow response", path.display(), n + 1))?;
        if let Some(ResponseTypes::Flow(f)) = &r.response_types {
            let t = f.time.as_ref().map(key).unwrap_or_default();
            if req.since.as_ref().is_some_and(|s| t < key(s))
                || req.until.as_ref().is_some_and(|u| t > key(u))
                || !filters.passes(f)
            {
                continue;
            }
        }
        out.push(r);
    }
    let n = req.number as usize;
    if req.since.is_none() && n > 0 && out.len() > n {
        if req.first {
            out.truncate(n);
        } else {
            out.drain(..out.len() - n);
        }
    }
    Ok(out)
}

pub fn observe(t: &Target, a: &ObserveArgs) -> anyhow::Result<()> {
    let req = request(a)?;
    if let Some(path) = &a.input_file {
        anyhow::ensure!(!a.follow, "--follow reads an observer, not a file");
        if a.output == Output::Table {
            println!("{}", table_header());
        }
        let mut ex = a.explain.then(|| Explainer::new(t));
        for r in from_file(path, &req)? {
            println!("{}", render_explained(&r, a.output, ex.as_mut()));
        }
        return Ok(());
    }
    let server = server(t, a.server.as_deref())?;
    runtime()?.block_on(async {
        let mut c = connect(&server).await?;
        let mut stream = c.get_flows(req).await.context("GetFlows")?.into_inner();
        if a.output == Output::Table {
            println!("{}", table_header());
        }
        let mut out = std::io::stdout().lock();
        use std::io::Write as _;
        let mut ex = a.explain.then(|| Explainer::new(t));
        while let Some(r) = stream.message().await.context("reading flows")? {
            writeln!(out, "{}", render_explained(&r, a.output, ex.as_mut()))?;
            if a.follow {
                out.flush()?;
            }
        }
        Ok(())
    })
}

pub fn hubble(t: &Target, c: &HubbleCommand) -> anyhow::Result<()> {
    match c {
        HubbleCommand::Status { server: s } => {
            let server = server(t, s.as_deref())?;
            runtime()?.block_on(async {
                let mut c = connect(&server).await?;
                let s = c.server_status(ServerStatusRequest {}).await?.into_inner();
                println!("Healthcheck (via {server}): Ok");
                let pct = if s.max_flows > 0 {
                    s.num_flows as f64 * 100.0 / s.max_flows as f64
                } else {
                    0.0
                };
                println!("Current/Max Flows: {}/{} ({pct:.2}%)", s.num_flows, s.max_flows);
                println!("Flows/s: {:.2}", s.flows_rate);
                if let Some(n) = s.num_connected_nodes {
                    let down = s.num_unavailable_nodes.map(|v| v.value).unwrap_or(0);
                    println!("Connected Nodes: {}/{}", n.value, n.value + down);
                }
                Ok(())
            })
        }
        HubbleCommand::List(HubbleList::Nodes { server: s }) => {
            let server = server(t, s.as_deref())?;
            runtime()?.block_on(async {
                let mut c = connect(&server).await?;
                let nodes = c.get_nodes(GetNodesRequest {}).await?.into_inner().nodes;
                println!(
                    "{:<24} {:<16} {:<10} {:<20} ADDRESS",
                    "NAME", "STATUS", "AGE", "CURRENT/MAX-FLOWS"
                );
                for n in nodes {
                    let state = ciliate_hubble::relay::NodeState::try_from(n.state)
                        .map(|s| match s {
                            ciliate_hubble::relay::NodeState::NodeConnected => "Connected",
                            ciliate_hubble::relay::NodeState::NodeUnavailable => "Unavailable",
                            ciliate_hubble::relay::NodeState::NodeGone => "Gone",
                            ciliate_hubble::relay::NodeState::NodeError => "Error",
                            _ => "Unknown",
                        })
                        .unwrap_or("Unknown");
                    let age = humantime::format_duration(Duration::from_secs(
                        n.uptime_ns / 1_000_000_000,
                    ));
                    println!(
                        "{:<24} {:<16} {:<10} {:<20} {}",
                        n.name,
                        state,
                        age.to_string(),
                        format!("{}/{}", n.num_flows, n.max_flows),
                        n.address
                    );
                }
                Ok(())
            })
        }
    }
}

// ---------------------------------------------------------------------
// Output.

fn time_of(r: &GetFlowsResponse) -> String {
    let t = r.time.as_ref().map(|t| {
        SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
    });
    t.map(|t| humantime::format_rfc3339_millis(t).to_string()).unwrap_or_default()
}

/// `namespace/pod:port`, else `ip:port`, and the identity.
fn side(ep: Option<&Endpoint>, ip: &str, port: Option<u16>) -> String {
    let name = match ep {
        Some(e) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
        _ => ip.to_owned(),
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let id = ep.map(|e| format!(" (ID:{})", e.identity)).unwrap_or_default();
    format!("{name}{port}{id}")
}

fn flags(f: &TcpFlags) -> String {
    let names = [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
        (f.ns, "NS"),
    ];
    names.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
}

/// The event's kind as hubble prints it: `to-endpoint`, `policy-verdict:L3-L4 INGRESS`, `Policy denied`, ...
fn kind(f: &Flow) -> String {
    let et = f.event_type.unwrap_or_default();
    let dir = ciliate_hubble::flow::TrafficDirection::try_from(f.traffic_direction)
        .map(|d| d.as_str_name())
        .unwrap_or("");
    match et.r#type {
        // The datapath's drop reasons and match types, named as the
        // monitor names them.
        1 => ciliate_common::drop::reason_name(u8::try_from(f.drop_reason_desc).unwrap_or(0))
            .to_owned(),
        9 => {
            let m =
                ciliate_common::policy::match_name(u8::try_from(f.policy_match_type).unwrap_or(0));
            format!("policy-verdict:{m} {dir}")
        }
        _ => TraceObservationPoint::try_from(f.trace_observation_point)
            .map(|p| p.as_str_name().to_lowercase().replace('_', "-"))
            .unwrap_or_else(|_| "trace".into()),
    }
}

fn summary(f: &Flow) -> String {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => {
            format!("TCP Flags: {}", t.flags.as_ref().map(flags).unwrap_or_default())
        }
        Some(Protocol::Udp(_)) => "UDP".into(),
        Some(Protocol::IcmPv4(i)) => match (i.r#type, i.code) {
            (8, 0) => "ICMPv4 EchoRequest".into(),
            (0, 0) => "ICMPv4 EchoReply".into(),
            (t, c) => format!("ICMPv4 type {t} code {c}"),
        },
        _ => f.summary.clone(),
    }
}

fn lost(l: &LostEvent) -> String {
    let src = LostEventSource::try_from(l.source).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
    format!("EVENTS LOST: {src} {}", l.num_events_lost)
}

fn verdict(f: &Flow) -> &'static str {
    Verdict::try_from(f.verdict).map(|v| v.as_str_name()).unwrap_or("UNKNOWN")
}

fn table_header() -> String {
    format!(
        "{:<26} {:<40} {:<40} {:<28} {:<10} {}",
        "TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"
    )
}

/// Explanations of policy drops, asked of the agent's policy trace once
/// per (source identity, destination identity, protocol, port).
struct Explainer {
    client: anyhow::Result<ciliate_api::Client>,
    known: std::collections::HashMap<(u32, u32, &'static str, u16), serde_json::Value>,
}

impl Explainer {
    fn new(t: &Target) -> Self {
        Self { client: t.client(), known: Default::default() }
    }

    /// The trace's explanation for policy drop `f` (`None` for any other
    /// flow); an error from the agent is the explanation's `error`.
    fn explain(&mut self, f: &Flow) -> Option<serde_json::Value> {
        if f.verdict != Verdict::Dropped as i32
            || f.drop_reason_desc != DropReason::PolicyDenied as i32
        {
            return None;
        }
        let (_, dport, proto) = ciliate_hubble::filter::l4(f);
        let proto: &'static str = match proto {
            "tcp" => "tcp",
            "udp" => "udp",
            _ => "icmp",
        };
        let port = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::IcmPv4(i)) => i.r#type as u16,
            _ => dport.unwrap_or(0),
        };
        let (src, dst) = (
            f.source.as_ref().map(|e| e.identity).unwrap_or(0),
            f.destination.as_ref().map(|e| e.identity).unwrap_or(0),
        );
        let key = (src, dst, proto, port);
        if let Some(x) = self.known.get(&key) {
            return Some(x.clone());
        }
        let x = match &self.client {
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            Ok(c) => {
                let peer = |id| ciliate_api::models::TracePeer {
                    identity: Some(id),
                    ..Default::default()
                };
                let req = ciliate_api::models::TraceRequest {
                    src: peer(src),
                    dst: peer(dst),
                    proto: proto.to_owned(),
                    dport: port,
                };
                // The API client runs its own runtime: not on the stream's.
                let t: anyhow::Result<serde_json::Value> = std::thread::scope(|s| {
                    s.spawn(|| {
                        Ok(c.call(
                            ciliate_api::client::method::POST,
                            "/v1/policy/trace",
                            Some(&req),
                        )?)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the trace call panicked")))
                });
                match t {
                    Ok(t) => t.get("explanation").cloned().unwrap_or_else(|| {
                        serde_json::json!({ "error": "the policy in force now allows this flow" })
                    }),
                    Err(e) => serde_json::json!({ "error": format!("policy trace: {e:#}") }),
                }
            }
        };
        self.known.insert(key, x.clone());
        Some(x)
    }
}

/// One response in `output`, with its explanation when `ex` is given and
/// the response is a policy drop.
fn render_explained(r: &GetFlowsResponse, output: Output, ex: Option<&mut Explainer>) -> String {
    let x = match (&r.response_types, ex) {
        (Some(ResponseTypes::Flow(f)), Some(ex)) => ex.explain(f),
        _ => None,
    };
    let Some(x) = x else { return render(r, output) };
    if matches!(output, Output::Json | Output::Jsonpb) {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["explain"] = x;
        return v.to_string();
    }
    let text = match x.get("error").and_then(|e| e.as_str()) {
        Some(e) => format!("    (not explained: {e})\n"),
        None => crate::policy::explanation_text(&x, "    "),
    };
    format!("{}\n{}", render(r, output), text.trim_end())
}

/// One response in `output`.
pub fn render(r: &GetFlowsResponse, output: Output) -> String {
    if matches!(output, Output::Json | Output::Jsonpb) {
        return serde_json::to_string(r).unwrap_or_default();
    }
    let f = match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f,
        Some(ResponseTypes::LostEvents(l)) => return lost(l),
        Some(ResponseTypes::NodeStatus(n)) => {
            return format!("NODE STATUS: {:?} {}", n.node_names, n.message);
        }
        None => return String::new(),
    };
    let ip = f.ip.clone().unwrap_or_default();
    let (sp, dp, _) = ciliate_hubble::filter::l4(f);
    let (src, dst) = (
        side(f.source.as_ref(), &ip.source, sp),
        side(f.destination.as_ref(), &ip.destination, dp),
    );
    match output {
        Output::Compact => format!(
            "{}: {src} {} {dst} {} {} ({})",
            time_of(r),
            if f.is_reply.is_some_and(|r| r.value) { "<-" } else { "->" },
            kind(f),
            verdict(f),
            summary(f)
        ),
        Output::Dict => [
            ("TIMESTAMP", time_of(r)),
            ("SOURCE", src),
            ("DESTINATION", dst),
            ("TYPE", kind(f)),
            ("VERDICT", verdict(f).to_owned()),
            ("SUMMARY", summary(f)),
            ("NODE", f.node_name.clone()),
        ]
        .iter()
        .map(|(k, v)| format!("{k:>11}: {v}"))
        .chain(std::iter::once("------------".to_owned()))
        .collect::<Vec<_>>()
        .join("\n"),
        _ => format!(
            "{:<26} {src:<40} {dst:<40} {:<28} {:<10} {}",
            time_of(r),
            kind(f),
            verdict(f),
            summary(f)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciliate_hubble::flow::{CiliumEventType, Ip, Layer4, Tcp};

    /// A policy drop of pod1's SYN to pod2:7.
    fn drop_response() -> GetFlowsResponse {
        let time = Some(pbjson_types::Timestamp { seconds: 1_796_212_800, nanos: 123_000_000 });
        let ep = |id, pod: &str| Endpoint {
            identity: id,
            namespace: "default".into(),
            pod_name: pod.into(),
            labels: vec![format!("k8s:app={pod}")],
            ..Default::default()
        };
        GetFlowsResponse {
            time,
            node_name: "node1".into(),
            response_types: Some(ResponseTypes::Flow(Flow {
                time,
                verdict: Verdict::Dropped as i32,
                drop_reason_desc: DropReason::PolicyDenied as i32,
                ip: Some(Ip {
                    source: "10.200.0.3".into(),
                    destination: "10.200.0.4".into(),
                    ip_version: 1,
                    ..Default::default()
                }),
                l4: Some(Layer4 {
                    protocol: Some(Protocol::Tcp(Tcp {
                        source_port: 40000,
                        destination_port: 7,
                        flags: Some(TcpFlags { syn: true, ..Default::default() }),
                    })),
                }),
                source: Some(ep(256, "pod1")),
                destination: Some(ep(257, "pod2")),
                event_type: Some(CiliumEventType { r#type: 1, sub_type: 133 }),
                traffic_direction: 1,
                node_name: "node1".into(),
                ..Default::default()
            })),
        }
    }

    /// The golden file `name`; with CILIATE_BLESS=1 in the environment,
    /// `got` is written as the new golden file (then read it before
    /// committing).
    fn golden(name: &str, got: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
        if std::env::var_os("CILIATE_BLESS").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, got).unwrap();
        }
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn each_output_format_prints_a_drop_as_its_golden_file() {
        let r = drop_response();
        for (out, file) in [
            (Output::Compact, "observe-compact.txt"),
            (Output::Dict, "observe-dict.txt"),
            (Output::Table, "observe-table.txt"),
            (Output::Json, "observe-json.txt"),
        ] {
            let got = if out == Output::Table {
                format!("{}\n{}\n", table_header(), render(&r, out))
            } else {
                format!("{}\n", render(&r, out))
            };
            assert_eq!(got, golden(file, &got), "{file}");
        }
        let lost = GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(LostEvent {
                source: LostEventSource::HubbleRingBuffer as i32,
                num_events_lost: 7,
                cpu: None,
            })),
            ..Default::default()
        };
        assert_eq!(render(&lost, Output::Compact), "EVENTS LOST: HUBBLE_RING_BUFFER 7");
    }

    /// `ciliate observe ARGS` as main parses it.
    fn args(argv: &[&str]) -> ObserveArgs {
        use clap::{Args as _, FromArgMatches as _};
        let m = ObserveArgs::augment_args(clap::Command::new("observe"))
            .try_get_matches_from(std::iter::once("observe").chain(argv.iter().copied()))
            .unwrap();
        let mut a = ObserveArgs::from_arg_matches(&m).unwrap();
        negate(&mut a, &m).unwrap();
        a
    }

    #[test]
    fn not_negates_only_the_flag_after_it() {
        let a = args(&[
            "--verdict",
            "DROPPED",
            "--not",
            "--from-ip=10.0.0.0/8",
            "-f",
            "--not",
            "--to-port",
            "53",
            "--from-pod",
            "default/a",
        ]);
        assert!(a.follow);
        let r = request(&a).unwrap();
        assert_eq!(r.whitelist.len(), 1);
        let w = &r.whitelist[0];
        assert_eq!(w.verdict, [Verdict::Dropped as i32]);
        assert_eq!(w.source_pod, ["default/a"]);
        assert!(w.source_ip.is_empty() && w.destination_port.is_empty(), "{w:?}");
        assert_eq!(r.blacklist.len(), 1);
        let b = &r.blacklist[0];
        assert_eq!(b.source_ip, ["10.0.0.0/8"]);
        assert_eq!(b.destination_port, ["53"]);
        assert!(b.verdict.is_empty() && b.source_pod.is_empty(), "{b:?}");
        // Not a filter, or nothing after it: said.
        use clap::{Args as _, FromArgMatches as _};
        for bad in [&["--not", "--follow"][..], &["--not"], &["--not", "--last", "3"]] {
            let m = ObserveArgs::augment_args(clap::Command::new("observe"))
                .try_get_matches_from(std::iter::once("observe").chain(bad.iter().copied()))
                .unwrap();
            let mut a = ObserveArgs::from_arg_matches(&m).unwrap();
            let e = negate(&mut a, &m).unwrap_err().to_string();
            assert!(e.contains("--not"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn an_input_file_is_read_as_an_observer_would_answer() {
        let dir = std::env::temp_dir().join(format!("ciliate-observe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("flows.json");
        let mut lines = String::new();
        for i in 0..5 {
            let mut r = drop_response();
            if let Some(ResponseTypes::Flow(f)) = r.response_types.as_mut() {
                f.time.as_mut().unwrap().seconds += i;
                if i % 2 == 1 {
                    f.verdict = Verdict::Forwarded as i32;
                }
            }
            lines += &render(&r, Output::Json);
            lines += "\n";
        }
        std::fs::write(&p, lines).unwrap();
        let req = request(&args(&["--verdict", "DROPPED", "--last", "2"])).unwrap();
        let got = from_file(&p, &req).unwrap();
        let secs: Vec<i64> = got
            .iter()
            .filter_map(|r| match &r.response_types {
                Some(ResponseTypes::Flow(f)) => Some(f.time.unwrap().seconds - 1_796_212_800),
                _ => None,
            })
            .collect();
        assert_eq!(secs, [2, 4], "the last two dropped flows");
        std::fs::write(&p, "{not json\n").unwrap();
        let e = from_file(&p, &req).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn either_side_flags_make_a_source_and_a_destination_filter() {
        let a = ObserveArgs {
            pod: vec!["default/pod1".into()],
            verdict: vec!["dropped".into()],
            kind: vec!["trace:to-endpoint".into()],
            ..Default::default()
        };
        let f = filters(&a).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].source_pod, ["default/pod1"]);
        assert!(f[0].destination_pod.is_empty());
        assert_eq!(f[1].destination_pod, ["default/pod1"]);
        for x in &f {
            assert_eq!(x.verdict, [Verdict::Dropped as i32]);
            assert_eq!(x.event_type[0].r#type, 4);
            assert!(x.event_type[0].match_sub_type);
            assert_eq!(x.event_type[0].sub_type, 0);
        }
        let r = request(&args(&["--not", "--ip", "10.0.0.0/8"])).unwrap();
        assert!(r.whitelist.is_empty());
        assert_eq!(r.blacklist.len(), 2);
        assert_eq!(r.number, 20, "the last 20 by default");
        assert!(
            filters(&ObserveArgs { verdict: vec!["maybe".into()], ..Default::default() }).is_err()
        );
        assert!(
            request(&ObserveArgs { since: Some("yesterday-ish".into()), ..Default::default() })
                .is_err()
        );
        let r =
            request(&ObserveArgs { since: Some("5m".into()), follow: true, ..Default::default() })
                .unwrap();
        assert_eq!(r.number, 0);
        assert!(r.since.is_some() && r.follow);
    }
}
