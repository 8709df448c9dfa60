//! `ciliate monitor`: the datapath's trace and drop events, one line each,
//! in Cilium's format, or JSON with `-j`.
//!
//! It reads the node's event ring buffer directly (the agent does not
//! consume it yet), so one monitor runs per node at a time.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ciliate_common::{ct, drop, trace};
use ciliate_datapath::{
    events::{Event, summary},
    maps::EventRing,
};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::target::Target;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Drop,
    Trace,
    PolicyVerdict,
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Only events of this type
    #[arg(long = "type", value_enum)]
    kind: Option<Kind>,
    /// Only events from or to this endpoint ID
    #[arg(long)]
    related_to: Option<u16>,
    /// JSON, one object per line
    #[arg(short = 'j', long)]
    json: bool,
    /// Stop after this many events
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this many seconds
    #[arg(long)]
    duration: Option<u64>,
}

fn state_name(s: u8) -> &'static str {
    match s {
        ct::CT_NEW => "new",
        ct::CT_ESTABLISHED => "established",
        ct::CT_REPLY => "reply",
        ct::CT_RELATED => "related",
        _ => "unknown",
    }
}

/// "-> endpoint 1777", "-> stack", ...: the verb of a trace line.
fn trace_target(point: u8, dst_id: u16) -> String {
    match point {
        trace::TO_LXC => format!("-> endpoint {dst_id}"),
        trace::TO_STACK => "-> stack".into(),
        trace::TO_HOST => "-> host".into(),
        trace::TO_OVERLAY => "-> overlay".into(),
        trace::TO_NETWORK => "-> network".into(),
        trace::TO_PROXY => "-> proxy".into(),
        p => format!("<- {}", trace::point_name(p).trim_start_matches("from-")),
    }
}

/// One event as a monitor line, or `None` when the filters drop it.
fn line(ev: &Event, args: &MonitorArgs, ifnames: &HashMap<u32, String>) -> Option<String> {
    let ifname = |i: u32| ifnames.get(&i).cloned().unwrap_or_else(|| i.to_string());
    let related = |a: u16, b: u32| args.related_to.is_none_or(|r| r == a || u32::from(r) == b);
    let pkt = summary(ev.captured());
    match ev {
        Event::Trace(t)
            if args.kind != Some(Kind::Drop) && related(t.hdr.source, u32::from(t.dst_id)) =>
        {
            let cap = ev.captured();
            let orig = if t.orig_ip[..4] != [0; 4] {
                Ipv4Addr::new(t.orig_ip[0], t.orig_ip[1], t.orig_ip[2], t.orig_ip[3])
            } else if cap.len() >= 30 && cap[12..14] == [8, 0] {
                Ipv4Addr::new(cap[26], cap[27], cap[28], cap[29])
            } else {
                Ipv4Addr::UNSPECIFIED
            };
            Some(if args.json {
                json!({
                    "type": "trace",
                    "observation_point": trace::point_name(t.hdr.subtype),
                    "source": t.hdr.source,
                    "flow": format!("{:#x}", t.hdr.hash),
                    "src_identity": t.src_identity,
                    "dst_identity": t.dst_identity,
                    "dst_endpoint": t.dst_id,
                    "state": state_name(t.ct_state),
                    "ifindex": t.ifindex,
                    "interface": ifname(t.ifindex),
                    "orig_ip": orig.to_string(),
                    "length": t.hdr.len_orig,
                    "summary": pkt,
                })
                .to_string()
            } else {
                format!(
                    "{} flow {:#x} , identity {}->{} state {} ifindex {} orig-ip {orig}: {pkt}",
                    trace_target(t.hdr.subtype, t.dst_id),
                    t.hdr.hash,
                    t.src_identity,
                    t.dst_identity,
                    state_name(t.ct_state),
                    ifname(t.ifindex),
                )
            })
        }
        Event::Drop(d)
            if args.kind.is_none_or(|k| k == Kind::Drop) && related(d.hdr.source, d.dst_id) =>
        {
            let reason = drop::reason_name(d.hdr.subtype);
            Some(if args.json {
                json!({
                    "type": "drop",
                    "reason": d.hdr.subtype,
                    "reason_text": reason,
                    "source": d.hdr.source,
                    "flow": format!("{:#x}", d.hdr.hash),
                    "src_identity": d.src_identity,
                    "dst_identity": d.dst_identity,
                    "dst_endpoint": d.dst_id,
                    "ifindex": d.ifindex,
                    "interface": ifname(d.ifindex),
                    "line": d.line,
                    "length": d.hdr.len_orig,
                    "summary": pkt,
                })
                .to_string()
            } else {
                format!(
                    "xx drop ({reason}) flow {:#x} to endpoint {}, ifindex {}, line {}, , identity {}->{}: {pkt}",
                    d.hdr.hash,
                    d.dst_id,
                    ifname(d.ifindex),
                    d.line,
                    d.src_identity,
                    d.dst_identity,
                )
            })
        }
        Event::PolicyVerdict(v)
            if args.kind.is_none_or(|k| k == Kind::PolicyVerdict) && related(v.hdr.source, 0) =>
        {
            let ingress = v.dir == ciliate_common::policy::DIR_INGRESS;
            let action =
                if v.verdict == ciliate_common::event::VERDICT_ALLOWED { "allow" } else { "deny" };
            let matched = ciliate_common::policy::match_name(v.match_type);
            Some(if args.json {
                json!({
                    "type": "policy-verdict",
                    "endpoint": v.hdr.source,
                    "flow": format!("{:#x}", v.hdr.hash),
                    "remote_identity": v.remote_identity,
                    "proto": v.proto,
                    "ingress": ingress,
                    "action": action,
                    "match": matched,
                    "summary": pkt,
                })
                .to_string()
            } else {
                format!(
                    "Policy verdict log: flow {:#x} local EP ID {}, remote ID {}, proto {}, {}, action {action}, match {matched}, {pkt}",
                    v.hdr.hash,
                    v.hdr.source,
                    v.remote_identity,
                    v.proto,
                    if ingress { "ingress" } else { "egress" },
                )
            })
        }
        _ => None,
    }
}

/// ifindex → device name in the node's namespace, when known.
fn interface_names(ns: Option<String>) -> HashMap<u32, String> {
    let links = |nl: &ciliate_datapath::netlink::Netlink| nl.links();
    let got = match &ns {
        Some(ns) => {
            ciliate_datapath::netlink::in_netns(&ciliate_datapath::netns::path_of(ns), links)
        }
        None => ciliate_datapath::netlink::Netlink::here().and_then(|nl| links(&nl)),
    };
    got.unwrap_or_default().into_iter().map(|l| (l.index, l.name)).collect()
}

pub fn run(t: &Target, args: &MonitorArgs) -> anyhow::Result<()> {
    let dir = t.pin_dir()?;
    let mut ring = EventRing::from_pin_dir(&dir)
        .with_context(|| format!("opening the event ring of {}", dir.display()))?;
    let ifnames = interface_names(t.node_ns());
    if !args.json {
        eprintln!("Listening for events on {}... Press Ctrl-C to quit", dir.display());
    }
    let end = args.duration.map(|s| Instant::now() + Duration::from_secs(s));
    let mut shown = 0;
    loop {
        for ev in ring.drain() {
            if let Some(l) = line(&ev, args, &ifnames) {
                println!("{l}");
                shown += 1;
                if args.count.is_some_and(|c| shown >= c) {
                    return Ok(());
                }
            }
        }
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
