//! Hubble's flow metrics on the agent's Prometheus endpoint, with Hubble's
//! names and labels, enabled per `--hubble-metrics` as Hubble's option
//! list (`drop,tcp,flow,port-distribution,policy`); lost events are always
//! counted (`hubble_lost_events_total`).

use ciliate_hubble::flow::{
    DropReason, Flow, LostEventSource, TraceObservationPoint, TrafficDirection, Verdict,
    layer4::Protocol,
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// The metric groups `--hubble-metrics` names.
pub const GROUPS: [&str; 5] = ["drop", "tcp", "flow", "port-distribution", "policy"];

/// Parse `--hubble-metrics` (comma-separated groups; "" for none).
pub fn parse(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for g in s.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        // Hubble's options take `;`-separated settings after a group
        // (`drop:sourceContext=pod`): the group is what counts here.
        let name = g.split(':').next().unwrap_or(g);
        if !GROUPS.contains(&name) {
            return Err(format!("hubble metric {name:?}: one of {}", GROUPS.join(", ")));
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

#[derive(Clone, Default)]
pub struct HubbleMetrics {
    enabled: Vec<String>,
    flows_processed: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    tcp_flags: Family<Labels, Counter>,
    ports: Family<Labels, Counter>,
    policy_verdicts: Family<Labels, Counter>,
    lost: Family<Labels, Counter>,
}

fn on(enabled: &[String], g: &str) -> bool {
    enabled.iter().any(|e| e == g)
}

impl HubbleMetrics {
    /// The metrics of `enabled` groups, registered in `r`.
    pub fn register(r: &mut Registry, enabled: Vec<String>) -> Self {
        let m = Self { enabled, ..Default::default() };
        let e = &m.enabled;
        if on(e, "flow") {
            r.register(
                "hubble_flows_processed",
                "Total number of flows processed",
                m.flows_processed.clone(),
            );
        }
        if on(e, "drop") {
            r.register("hubble_drop", "Number of drops", m.drops.clone());
        }
        if on(e, "tcp") {
            r.register("hubble_tcp_flags", "TCP flag occurrences", m.tcp_flags.clone());
        }
        if on(e, "port-distribution") {
            r.register(
                "hubble_port_distribution",
                "Numbers of packets distributed by destination port",
                m.ports.clone(),
            );
        }
        if on(e, "policy") {
            r.register(
                "hubble_policy_verdicts",
                "Number of policy verdict events",
                m.policy_verdicts.clone(),
            );
        }
        r.register("hubble_lost_events", "Number of lost events", m.lost.clone());
        m
    }

    pub fn lost(&self, source: LostEventSource, n: u64) {
        self.lost.get_or_create(&vec![("source", source.as_str_name().to_owned())]).inc_by(n);
    }

    /// Count one flow in every enabled group.
    pub fn observe(&self, f: &Flow) {
        let e = &self.enabled;
        let verdict = Verdict::try_from(f.verdict).map(|v| v.as_str_name()).unwrap_or("");
        let et = f.event_type.unwrap_or_default();
        let protocol = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::Tcp(_)) => "TCP",
            Some(Protocol::Udp(_)) => "UDP",
            Some(Protocol::Sctp(_)) => "SCTP",
            Some(Protocol::IcmPv4(_)) => "ICMPv4",
            Some(Protocol::IcmPv6(_)) => "ICMPv6",
            None => "",
        };
        if on(e, "flow") {
            let (kind, subtype) = match et.r#type {
                1 => ("Drop", String::new()),
                9 => ("PolicyVerdict", String::new()),
                _ => (
                    "Trace",
                    TraceObservationPoint::try_from(f.trace_observation_point)
                        .map(|p| p.as_str_name().to_lowercase().replace('_', "-"))
                        .unwrap_or_default(),
                ),
            };
            self.flows_processed
                .get_or_create(&vec![
                    ("type", kind.to_owned()),
                    ("subtype", subtype),
                    ("verdict", verdict.to_owned()),
                ])
                .inc();
        }
        if on(e, "drop") && f.verdict == Verdict::Dropped as i32 && et.r#type == 1 {
            let reason =
                DropReason::try_from(f.drop_reason_desc).map(|r| r.as_str_name()).unwrap_or("");
            self.drops
                .get_or_create(&vec![
                    ("reason", reason.to_owned()),
                    ("protocol", protocol.to_owned()),
                ])
                .inc();
        }
        // Per packet seen on its way into an endpoint or out of one (a
        // trace point), so a packet traced twice is not counted twice.
        let counted_point = et.r#type == 4
            && (f.trace_observation_point == TraceObservationPoint::ToEndpoint as i32
                || f.trace_observation_point == TraceObservationPoint::ToStack as i32
                || f.trace_observation_point == TraceObservationPoint::ToOverlay as i32
                || f.trace_observation_point == TraceObservationPoint::ToNetwork as i32);
        if on(e, "tcp")
            && counted_point
            && let Some(Protocol::Tcp(t)) = f.l4.as_ref().and_then(|l| l.protocol.as_ref())
        {
            let fl = t.flags.unwrap_or_default();
            for (set, name) in [
                (fl.syn && !fl.ack, "SYN"),
                (fl.syn && fl.ack, "SYN-ACK"),
                (fl.fin, "FIN"),
                (fl.rst, "RST"),
            ] {
                if set {
                    self.tcp_flags
                        .get_or_create(&vec![("flag", name.to_owned()), ("family", "IPv4".into())])
                        .inc();
                }
            }
        }
        if on(e, "port-distribution")
            && counted_point
            && f.is_reply.is_none_or(|r| !r.value)
            && let (_, Some(port), _) = ciliate_hubble::filter::l4(f)
        {
            self.ports
                .get_or_create(&vec![("protocol", protocol.to_owned()), ("port", port.to_string())])
                .inc();
        }
        if on(e, "policy") && et.r#type == 9 {
            let direction = TrafficDirection::try_from(f.traffic_direction)
                .map(|d| d.as_str_name().to_lowercase())
                .unwrap_or_default();
            let matched =
                ciliate_common::policy::match_name(u8::try_from(f.policy_match_type).unwrap_or(0))
                    .to_lowercase();
            self.policy_verdicts
                .get_or_create(&vec![
                    ("direction", direction),
                    ("match", matched),
                    ("action", verdict.to_lowercase()),
                ])
                .inc();
        }
    }
}
