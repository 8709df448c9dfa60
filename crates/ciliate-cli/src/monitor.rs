//! `ciliate monitor`: the datapath's trace, drop and policy verdict
//! events, one line each, in Cilium's format, or JSON with `-j`; with `-v`
//! (or `--type debug|capture`) the debug and capture events of datapath
//! debugging too, interleaved as Cilium prints them.
//!
//! The agent owns the event ring; the monitor subscribes through its API
//! (`GET /v1/events`), so any number of monitors run at once and each sees
//! every event. Lost events are shown as Cilium shows them.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ciliate_api::models::MonitorEvent;
use clap::{Args, ValueEnum};

use crate::target::Target;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Drop,
    Trace,
    PolicyVerdict,
    /// The datapath's decisions, step by step (while debugging is on)
    Debug,
    /// Packets at points of the programs (while debugging is on)
    Capture,
}

impl Kind {
    fn query(self) -> &'static str {
        match self {
            Kind::Drop => "drop",
            Kind::Trace => "trace",
            Kind::PolicyVerdict => "policy-verdict",
            Kind::Debug => "debug",
            Kind::Capture => "capture",
        }
    }
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Only events of this type
    #[arg(long = "type", value_enum)]
    kind: Option<Kind>,
    /// Only events from or to this endpoint ID
    #[arg(long)]
    related_to: Option<u16>,
    /// JSON, one object per line (every type, debug ones included)
    #[arg(short = 'j', long)]
    json: bool,
    /// Verbose: debug and capture events too, interleaved with the others
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Stop after this many events
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this many seconds
    #[arg(long)]
    duration: Option<u64>,
}

/// "-> endpoint 1777", "-> stack", ...: the verb of a trace line.
fn trace_target(point: &str, dst_id: u16) -> String {
    match point {
        "to-endpoint" => format!("-> endpoint {dst_id}"),
        p if p.starts_with("to-") => format!("-> {}", &p[3..]),
        p => format!("<- {}", p.trim_start_matches("from-")),
    }
}

/// One event as Cilium's monitor prints it.
fn line(ev: &MonitorEvent) -> String {
    match ev {
        MonitorEvent::Trace(t) => format!(
            "{} flow {} , identity {}->{} state {} ifindex {} orig-ip {}: {}",
            trace_target(&t.observation_point, t.dst_endpoint),
            t.flow,
            t.src_identity,
            t.dst_identity,
            t.state,
            t.interface,
            t.orig_ip,
            t.summary,
        ),
        MonitorEvent::Drop(d) => format!(
            "xx drop ({}) flow {} to endpoint {}, ifindex {}, line {}, , identity {}->{}: {}",
            d.reason_text,
            d.flow,
            d.dst_endpoint,
            d.interface,
            d.line,
            d.src_identity,
            d.dst_identity,
            d.summary,
        ),
        MonitorEvent::PolicyVerdict(v) => format!(
            "Policy verdict log: flow {} local EP ID {}, remote ID {}, proto {}, {}, action {}, match {}, {}",
            v.flow,
            v.endpoint,
            v.remote_identity,
            v.proto,
            if v.ingress { "ingress" } else { "egress" },
            v.action,
            v.matched,
            v.summary,
        ),
        MonitorEvent::Debug(d) => {
            format!("{}: MARK {} FROM {} DEBUG: {}", d.cpu, d.flow, d.source, d.message)
        }
        MonitorEvent::Capture(c) => format!(
            "{}: MARK {} FROM {} DEBUG: {} bytes, {}: {}",
            c.cpu, c.flow, c.source, c.length, c.message, c.summary
        ),
        MonitorEvent::Lost(l) => format!("Lost {} events ({})", l.lost, l.cause),
    }
}

/// Is datapath debugging on anywhere (the node, or some endpoint)?
fn debugging(client: &ciliate_api::Client) -> anyhow::Result<bool> {
    let cfg: serde_json::Value = client.get("/v1/config")?;
    if cfg["debug"].as_bool() == Some(true) {
        return Ok(true);
    }
    let eps: Vec<ciliate_api::models::Endpoint> = client.get("/v1/endpoint")?;
    Ok(eps.iter().any(|e| e.debug))
}

pub fn run(t: &Target, args: &MonitorArgs) -> anyhow::Result<()> {
    let client = t.client()?;
    let mut query = Vec::new();
    if let Some(k) = args.kind {
        query.push(format!("type={}", k.query()));
    }
    if let Some(id) = args.related_to {
        query.push(format!("related-to={id}"));
    }
    let target = if query.is_empty() {
        "/v1/events".to_owned()
    } else {
        format!("/v1/events?{}", query.join("&"))
    };
    let debug_kind = matches!(args.kind, Some(Kind::Debug | Kind::Capture));
    if debug_kind && !debugging(&client).unwrap_or(true) {
        eprintln!(
            "Datapath debugging is off: no debug or capture events will come. Turn it on for the \
             node with `ciliate config Debug=true` (or ciliate-agent --bpf-debug), or for one \
             endpoint with `ciliate endpoint config ID Debug=true`."
        );
    }
    let end = args.duration.map(|s| Instant::now() + Duration::from_secs(s));
    let mut stream = client.stream(&target).context("subscribing to the agent's events")?;
    if !args.json {
        eprintln!("Listening for events on {}... Press Ctrl-C to quit", client.socket().display());
    }
    let mut shown = 0;
    while let Some(l) = stream.next_line(end).context("reading the agent's events")? {
        let ev: MonitorEvent = serde_json::from_slice(&l)
            .with_context(|| format!("an event the agent sent: {}", String::from_utf8_lossy(&l)))?;
        let debug_event = matches!(ev, MonitorEvent::Debug(_) | MonitorEvent::Capture(_));
        if debug_event && !(args.json || args.verbose || debug_kind) {
            continue;
        }
        if args.json {
            println!("{}", String::from_utf8_lossy(&l));
        } else {
            println!("{}", line(&ev));
        }
        if !matches!(ev, MonitorEvent::Lost(_)) {
            shown += 1;
        }
        if args.count.is_some_and(|c| shown >= c) {
            break;
        }
    }
    Ok(())
}
