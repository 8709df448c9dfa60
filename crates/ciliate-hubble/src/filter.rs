//! Flow filters as Hubble applies them: a `FlowFilter` matches when every
//! field it sets matches (a field: any of its values); a request's
//! whitelist passes a flow that any of its filters matches (an empty one
//! passes all), its blacklist drops a flow that any of its filters
//! matches. Filters are checked once, when a request arrives: a bad one
//! (an invalid regex, CIDR, port, label selector or enum value) is an
//! error naming the field, and nothing is served.

use std::net::IpAddr;

use regex::Regex;

use crate::flow::{
    DropReason, Endpoint, Flow, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict,
    layer4::Protocol,
};

/// A filter that cannot be applied: `field` and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {} filter: {}", self.field, self.reason)
    }
}

impl std::error::Error for FilterError {}

fn bad(field: &'static str, reason: impl Into<String>) -> FilterError {
    FilterError { field, reason: reason.into() }
}

/// A whitelist and a blacklist, checked.
#[derive(Debug, Default)]
pub struct FlowFilters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl FlowFilters {
    pub fn new(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, FilterError> {
        Ok(Self {
            whitelist: whitelist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
            blacklist: blacklist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
        })
    }

    pub fn passes(&self, f: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|c| c.matches(f)))
            && !self.blacklist.iter().any(|c| c.matches(f))
    }
}

/// An IP or a CIDR.
#[derive(Debug, Clone, Copy)]
struct Net {
    addr: IpAddr,
    len: u8,
}

impl Net {
    fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr =
            a.parse().map_err(|_| bad(field, format!("{s:?} is not an IP or CIDR")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| bad(field, format!("{s:?}: prefix length {l:?}")))?,
        };
        Ok(Self { addr, len })
    }

    fn contains(&self, ip: &str) -> bool {
        let Ok(ip) = ip.parse::<IpAddr>() else { return false };
        let len = u32::from(self.len);
        match (ip, self.addr) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                let m = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(a) & m == u32::from(n) & m
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => {
                let m = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(a) & m == u128::from(n) & m
            }
            _ => false,
        }
    }
}

/// `namespace/name-prefix`, `namespace/`, `/name-prefix` or `name-prefix`
/// (any namespace).
#[derive(Debug, Clone)]
struct NameSel {
    namespace: Option<String>,
    prefix: String,
}

impl NameSel {
    fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((ns, p)) => {
                Self { namespace: (!ns.is_empty()).then(|| ns.to_owned()), prefix: p.to_owned() }
            }
            None => Self { namespace: None, prefix: s.to_owned() },
        }
    }

    fn matches(&self, namespace: &str, name: &str) -> bool {
        if name.is_empty() && namespace.is_empty() {
            return false;
        }
        self.namespace.as_deref().is_none_or(|ns| ns == namespace) && name.starts_with(&self.prefix)
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A Kubernetes-style label selector (`app=web,tier!=db`, `env in (a,b)`,
/// `!legacy`) over a flow endpoint's labels (`source:key=value`). A key
/// with a source (`k8s:app`) matches that source only; without one, any.
#[derive(Debug, Clone)]
struct LabelSel(Vec<Req>);

impl LabelSel {
    fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let mut reqs = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            // A requirement runs to the next comma outside parentheses.
            let mut depth = 0;
            let end = rest
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    *c == ',' && depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(rest.len());
            reqs.push(Self::req(field, rest[..end].trim(), s)?);
            rest = rest[end..].trim_start_matches(',').trim();
        }
        if reqs.is_empty() {
            return Err(bad(field, format!("{s:?} is an empty selector")));
        }
        Ok(Self(reqs))
    }

    fn req(field: &'static str, r: &str, whole: &str) -> Result<Req, FilterError> {
        let key_ok = |k: &str| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        };
        let err = || bad(field, format!("{whole:?} is not a label selector (at {r:?})"));
        let set = |v: &str| -> Result<Vec<String>, FilterError> {
            let v = v.trim();
            let inner = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or_else(err)?;
            Ok(inner.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect())
        };
        if let Some(k) = r.strip_prefix('!') {
            return if key_ok(k.trim()) { Ok(Req::NotExists(k.trim().into())) } else { Err(err()) };
        }
        for (op, neg) in [(" notin ", true), (" in ", false)] {
            if let Some((k, v)) = r.split_once(op) {
                let k = k.trim();
                if !key_ok(k) {
                    return Err(err());
                }
                return Ok(if neg {
                    Req::NotIn(k.into(), set(v)?)
                } else {
                    Req::In(k.into(), set(v)?)
                });
            }
        }
        for (op, neg) in [("!=", true), ("==", false), ("=", false)] {
            if let Some((k, v)) = r.split_once(op) {
                let (k, v) = (k.trim(), v.trim());
                if !key_ok(k) {
                    return Err(err());
                }
                return Ok(if neg {
                    Req::NotEq(k.into(), v.into())
                } else {
                    Req::Eq(k.into(), v.into())
                });
            }
        }
        if key_ok(r) { Ok(Req::Exists(r.into())) } else { Err(err()) }
    }

    fn matches(&self, labels: &[String]) -> bool {
        // (source, key, value) of each label.
        let parsed: Vec<(&str, &str, &str)> = labels
            .iter()
            .map(|l| {
                let (kv, v) = l.split_once('=').unwrap_or((l, ""));
                let (src, k) = kv.split_once(':').unwrap_or(("", kv));
                (src, k, v)
            })
            .collect();
        let value_of = |key: &str| -> Option<&str> {
            let (src, k) = match key.split_once(':') {
                Some((s, k)) => (Some(s), k),
                None => (None, key),
            };
            parsed
                .iter()
                .find(|(s, pk, _)| *pk == k && src.is_none_or(|src| src == "any" || src == *s))
                .map(|(_, _, v)| *v)
        };
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => value_of(k) == Some(v.as_str()),
            Req::NotEq(k, v) => value_of(k) != Some(v.as_str()),
            Req::In(k, vs) => value_of(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => value_of(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => value_of(k).is_some(),
            Req::NotExists(k) => value_of(k).is_none(),
        })
    }
}

/// A shell-style pattern (`*` any run of characters) on node names, as
/// Hubble's `node_name` filter.
fn glob(field: &'static str, p: &str) -> Result<Regex, FilterError> {
    if p.is_empty() {
        return Err(bad(field, "empty pattern"));
    }
    let re: Vec<String> = p.split('*').map(regex::escape).collect();
    Regex::new(&format!("^{}$", re.join(".*"))).map_err(|e| bad(field, e.to_string()))
}

fn regexes(field: &'static str, v: &[String]) -> Result<Vec<Regex>, FilterError> {
    v.iter().map(|r| Regex::new(r).map_err(|e| bad(field, format!("{r:?}: {e}")))).collect()
}

fn enums<T: TryFrom<i32>>(field: &'static str, v: &[i32]) -> Result<Vec<i32>, FilterError> {
    for x in v {
        if T::try_from(*x).is_err() {
            return Err(bad(field, format!("unknown value {x}")));
        }
    }
    Ok(v.to_vec())
}

fn ports(field: &'static str, v: &[String]) -> Result<Vec<u16>, FilterError> {
    v.iter()
        .map(|p| p.parse::<u16>().map_err(|_| bad(field, format!("{p:?} is not a port"))))
        .collect()
}

/// The L4 protocol names the `protocol` filter takes.
const PROTOCOLS: [&str; 8] = ["tcp", "udp", "icmp", "icmpv4", "icmpv6", "sctp", "http", "dns"];

/// One `FlowFilter`, checked. Empty vectors match anything.
#[derive(Debug, Default)]
struct Compiled {
    uuid: Vec<String>,
    source_ip: Vec<Net>,
    destination_ip: Vec<Net>,
    source_pod: Vec<NameSel>,
    destination_pod: Vec<NameSel>,
    source_service: Vec<NameSel>,
    destination_service: Vec<NameSel>,
    source_label: Vec<LabelSel>,
    destination_label: Vec<LabelSel>,
    source_identity: Vec<u32>,
    destination_identity: Vec<u32>,
    source_fqdn: Vec<Regex>,
    destination_fqdn: Vec<Regex>,
    traffic_direction: Vec<i32>,
    verdict: Vec<i32>,
    drop_reason_desc: Vec<i32>,
    event_type: Vec<(i32, Option<i32>)>,
    protocol: Vec<String>,
    source_port: Vec<u16>,
    destination_port: Vec<u16>,
    reply: Vec<bool>,
    tcp_flags: Vec<TcpFlags>,
    node_name: Vec<Regex>,
    ip_version: Vec<i32>,
    interface: Vec<(u32, String)>,
    http_status_code: Vec<String>,
    http_method: Vec<String>,
    http_path: Vec<Regex>,
    http_url: Vec<Regex>,
    dns_query: Vec<Regex>,
    /// A field Ciliate's flows never carry (L7 until the L7 issue, trace
    /// IDs, workloads, cluster names, node labels, translated sources):
    /// set, it matches nothing.
    never: bool,
}

impl Compiled {
    fn new(f: &FlowFilter) -> Result<Self, FilterError> {
        let nets = |field, v: &[String]| -> Result<Vec<Net>, FilterError> {
            v.iter().map(|s| Net::parse(field, s)).collect()
        };
        let labels = |field, v: &[String]| -> Result<Vec<LabelSel>, FilterError> {
            v.iter().map(|s| LabelSel::parse(field, s)).collect()
        };
        let fqdn = |field, v: &[String]| -> Result<Vec<Regex>, FilterError> {
            v.iter().map(|p| glob(field, p)).collect()
        };
        for p in &f.protocol {
            if !PROTOCOLS.contains(&p.to_ascii_lowercase().as_str()) {
                return Err(bad("protocol", format!("{p:?}: one of {}", PROTOCOLS.join(", "))));
            }
        }
        for c in &f.http_status_code {
            let ok = c.len() == 3 && c.chars().all(|d| d.is_ascii_digit())
                || c.len() == 2 && c.ends_with('+') && c.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(bad("http_status_code", format!("{c:?}: 404 or 4+")));
            }
        }
        Ok(Self {
            uuid: f.uuid.clone(),
            source_ip: nets("source_ip", &f.source_ip)?,
            destination_ip: nets("destination_ip", &f.destination_ip)?,
            source_pod: f.source_pod.iter().map(|s| NameSel::parse(s)).collect(),
            destination_pod: f.destination_pod.iter().map(|s| NameSel::parse(s)).collect(),
            source_service: f.source_service.iter().map(|s| NameSel::parse(s)).collect(),
            destination_service: f.destination_service.iter().map(|s| NameSel::parse(s)).collect(),
            source_label: labels("source_label", &f.source_label)?,
            destination_label: labels("destination_label", &f.destination_label)?,
            source_identity: f.source_identity.clone(),
            destination_identity: f.destination_identity.clone(),
            source_fqdn: fqdn("source_fqdn", &f.source_fqdn)?,
            destination_fqdn: fqdn("destination_fqdn", &f.destination_fqdn)?,
            traffic_direction: enums::<TrafficDirection>(
                "traffic_direction",
                &f.traffic_direction,
            )?,
            verdict: enums::<Verdict>("verdict", &f.verdict)?,
            drop_reason_desc: enums::<DropReason>("drop_reason_desc", &f.drop_reason_desc)?,
            event_type: f
                .event_type
                .iter()
                .map(|e| (e.r#type, e.match_sub_type.then_some(e.sub_type)))
                .collect(),
            protocol: f.protocol.iter().map(|p| p.to_ascii_lowercase()).collect(),
            source_port: ports("source_port", &f.source_port)?,
            destination_port: ports("destination_port", &f.destination_port)?,
            reply: f.reply.clone(),
            tcp_flags: f.tcp_flags.clone(),
            node_name: f
                .node_name
                .iter()
                .map(|p| glob("node_name", p))
                .collect::<Result<_, _>>()?,
            ip_version: enums::<IpVersion>("ip_version", &f.ip_version)?,
            interface: f.interface.iter().map(|i| (i.index, i.name.clone())).collect(),
            http_status_code: f.http_status_code.clone(),
            http_method: f.http_method.clone(),
            http_path: regexes("http_path", &f.http_path)?,
            http_url: regexes("http_url", &f.http_url)?,
            dns_query: regexes("dns_query", &f.dns_query)?,
            never: !f.trace_id.is_empty()
                || !f.source_workload.is_empty()
                || !f.destination_workload.is_empty()
                || !f.source_cluster_name.is_empty()
                || !f.destination_cluster_name.is_empty()
                || !f.node_labels.is_empty()
                || !f.source_ip_xlated.is_empty()
                || !f.http_header.is_empty()
                || f.experimental.as_ref().is_some_and(|e| !e.cel_expression.is_empty()),
        })
    }

    fn matches(&self, f: &Flow) -> bool {
        if self.never {
            return false;
        }
        let none = Endpoint::default();
        let (src, dst) =
            (f.source.as_ref().unwrap_or(&none), f.destination.as_ref().unwrap_or(&none));
        let ip = f.ip.as_ref();
        let (sip, dip) = (ip.map(|i| i.source.as_str()), ip.map(|i| i.destination.as_str()));
        let any = |empty: bool, m: &dyn Fn() -> bool| empty || m();
        let (sport, dport, proto) = l4(f);
        let http = f.l7.as_ref().and_then(|l| match &l.record {
            Some(crate::flow::layer7::Record::Http(h)) => Some(h),
            _ => None,
        });
        let dns = f.l7.as_ref().and_then(|l| match &l.record {
            Some(crate::flow::layer7::Record::Dns(d)) => Some(d),
            _ => None,
        });
        let service = |s: &Option<Box<crate::flow::Service>>, sel: &[NameSel]| {
            s.as_ref().is_some_and(|s| sel.iter().any(|n| n.matches(&s.namespace, &s.name)))
        };
        any(self.uuid.is_empty(), &|| self.uuid.contains(&f.uuid))
            && any(self.source_ip.is_empty(), &|| {
                sip.is_some_and(|a| self.source_ip.iter().any(|n| n.contains(a)))
            })
            && any(self.destination_ip.is_empty(), &|| {
                dip.is_some_and(|a| self.destination_ip.iter().any(|n| n.contains(a)))
            })
            && any(self.source_pod.is_empty(), &|| {
                self.source_pod.iter().any(|n| n.matches(&src.namespace, &src.pod_name))
            })
            && any(self.destination_pod.is_empty(), &|| {
                self.destination_pod.iter().any(|n| n.matches(&dst.namespace, &dst.pod_name))
            })
            && any(self.source_service.is_empty(), &|| {
                service(&f.source_service, &self.source_service)
            })
            && any(self.destination_service.is_empty(), &|| {
                service(&f.destination_service, &self.destination_service)
            })
            && any(self.source_label.is_empty(), &|| {
                self.source_label.iter().any(|l| l.matches(&src.labels))
            })
            && any(self.destination_label.is_empty(), &|| {
                self.destination_label.iter().any(|l| l.matches(&dst.labels))
            })
            && any(self.source_identity.is_empty(), &|| {
                self.source_identity.contains(&src.identity)
            })
            && any(self.destination_identity.is_empty(), &|| {
                self.destination_identity.contains(&dst.identity)
            })
            && any(self.source_fqdn.is_empty(), &|| {
                f.source_names.iter().any(|n| self.source_fqdn.iter().any(|r| r.is_match(n)))
            })
            && any(self.destination_fqdn.is_empty(), &|| {
                f.destination_names
                    .iter()
                    .any(|n| self.destination_fqdn.iter().any(|r| r.is_match(n)))
            })
            && any(self.traffic_direction.is_empty(), &|| {
                self.traffic_direction.contains(&f.traffic_direction)
            })
            && any(self.verdict.is_empty(), &|| self.verdict.contains(&f.verdict))
            && any(self.drop_reason_desc.is_empty(), &|| {
                self.drop_reason_desc.contains(&f.drop_reason_desc)
            })
            && any(self.event_type.is_empty(), &|| {
                f.event_type.as_ref().is_some_and(|e| {
                    self.event_type
                        .iter()
                        .any(|(t, sub)| *t == e.r#type && sub.is_none_or(|s| s == e.sub_type))
                })
            })
            && any(self.protocol.is_empty(), &|| {
                self.protocol.iter().any(|p| match p.as_str() {
                    "icmp" => proto == "icmpv4" || proto == "icmpv6",
                    "http" => http.is_some(),
                    "dns" => dns.is_some(),
                    p => p == proto,
                })
            })
            && any(self.source_port.is_empty(), &|| {
                sport.is_some_and(|p| self.source_port.contains(&p))
            })
            && any(self.destination_port.is_empty(), &|| {
                dport.is_some_and(|p| self.destination_port.contains(&p))
            })
            && any(self.reply.is_empty(), &|| {
                f.is_reply.as_ref().is_some_and(|r| self.reply.contains(&r.value))
            })
            && any(self.tcp_flags.is_empty(), &|| {
                tcp_flags(f)
                    .is_some_and(|have| self.tcp_flags.iter().any(|want| flags_set(want, &have)))
            })
            && any(self.node_name.is_empty(), &|| {
                self.node_name.iter().any(|r| r.is_match(&f.node_name))
            })
            && any(self.ip_version.is_empty(), &|| {
                ip.is_some_and(|i| self.ip_version.contains(&i.ip_version))
            })
            && any(self.interface.is_empty(), &|| {
                f.interface.as_ref().is_some_and(|i| {
                    self.interface.iter().any(|(idx, name)| {
                        (*idx == 0 || *idx == i.index) && (name.is_empty() || *name == i.name)
                    })
                })
            })
            && any(self.http_status_code.is_empty(), &|| {
                http.is_some_and(|h| {
                    let code = h.code.to_string();
                    self.http_status_code.iter().any(|c| match c.strip_suffix('+') {
                        Some(first) => code.starts_with(first),
                        None => *c == code,
                    })
                })
            })
            && any(self.http_method.is_empty(), &|| {
                http.is_some_and(|h| {
                    self.http_method.iter().any(|m| m.eq_ignore_ascii_case(&h.method))
                })
            })
            && any(self.http_path.is_empty(), &|| {
                http.is_some_and(|h| {
                    let path = h
                        .url
                        .split_once("://")
                        .map_or(h.url.as_str(), |(_, r)| r.find('/').map_or("/", |i| &r[i..]));
                    self.http_path.iter().any(|r| r.is_match(path))
                })
            })
            && any(self.http_url.is_empty(), &|| {
                http.is_some_and(|h| self.http_url.iter().any(|r| r.is_match(&h.url)))
            })
            && any(self.dns_query.is_empty(), &|| {
                dns.is_some_and(|d| self.dns_query.iter().any(|r| r.is_match(&d.query)))
            })
    }
}

/// Source port, destination port and protocol name of a flow.
pub fn l4(f: &Flow) -> (Option<u16>, Option<u16>, &'static str) {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => {
            (Some(t.source_port as u16), Some(t.destination_port as u16), "tcp")
        }
        Some(Protocol::Udp(u)) => {
            (Some(u.source_port as u16), Some(u.destination_port as u16), "udp")
        }
        Some(Protocol::Sctp(s)) => {
            (Some(s.source_port as u16), Some(s.destination_port as u16), "sctp")
        }
        Some(Protocol::IcmPv4(_)) => (None, None, "icmpv4"),
        Some(Protocol::IcmPv6(_)) => (None, None, "icmpv6"),
        None => (None, None, ""),
    }
}

fn tcp_flags(f: &Flow) -> Option<TcpFlags> {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => Some(t.flags.unwrap_or_default()),
        _ => None,
    }
}

/// Every flag `want` sets is set in `have`.
fn flags_set(want: &TcpFlags, have: &TcpFlags) -> bool {
    let w =
        [want.fin, want.syn, want.rst, want.psh, want.ack, want.urg, want.ece, want.cwr, want.ns];
    let h =
        [have.fin, have.syn, have.rst, have.psh, have.ack, have.urg, have.ece, have.cwr, have.ns];
    w.iter().zip(h).all(|(w, h)| !w || h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{
        CiliumEventType, EventTypeFilter, Ip, Layer4, NetworkInterface, Service, Tcp,
    };

    /// pod1 (default, 256) → pod2 (prod, 257), TCP 40000 → 7 SYN, dropped
    /// by policy on pod2's ingress, on node-a.
    fn sample() -> Flow {
        Flow {
            uuid: "u-1".into(),
            verdict: Verdict::Dropped as i32,
            drop_reason_desc: DropReason::PolicyDenied as i32,
            ip: Some(Ip {
                source: "10.200.0.3".into(),
                destination: "10.200.1.4".into(),
                ip_version: IpVersion::IPv4 as i32,
                ..Default::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: 7,
                    flags: Some(TcpFlags { syn: true, ..Default::default() }),
                })),
            }),
            source: Some(Endpoint {
                identity: 256,
                namespace: "default".into(),
                pod_name: "web-1".into(),
                labels: vec!["k8s:app=web".into(), "k8s:tier=front".into()],
                ..Default::default()
            }),
            destination: Some(Endpoint {
                identity: 257,
                namespace: "prod".into(),
                pod_name: "db-0".into(),
                labels: vec!["k8s:app=db".into()],
                ..Default::default()
            }),
            destination_service: Some(Box::new(Service {
                name: "db".into(),
                namespace: "prod".into(),
            })),
            node_name: "node-a".into(),
            traffic_direction: TrafficDirection::Ingress as i32,
            event_type: Some(CiliumEventType { r#type: 1, sub_type: 133 }),
            is_reply: Some(pbjson_types::BoolValue { value: false }),
            interface: Some(NetworkInterface { index: 8, name: "lxc1".into() }),
            ..Default::default()
        }
    }

    fn one(f: FlowFilter) -> bool {
        FlowFilters::new(&[f], &[]).unwrap().passes(&sample())
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn each_field_matches_what_it_names_and_nothing_else() {
        let ff = FlowFilter::default;
        let rows: Vec<(&str, FlowFilter, bool)> = vec![
            ("empty", ff(), true),
            ("uuid", FlowFilter { uuid: s(&["u-1"]), ..ff() }, true),
            ("uuid other", FlowFilter { uuid: s(&["u-2"]), ..ff() }, false),
            ("source_ip exact", FlowFilter { source_ip: s(&["10.200.0.3"]), ..ff() }, true),
            ("source_ip cidr", FlowFilter { source_ip: s(&["10.200.0.0/24"]), ..ff() }, true),
            (
                "source_ip other cidr",
                FlowFilter { source_ip: s(&["10.200.1.0/24"]), ..ff() },
                false,
            ),
            ("destination_ip /0", FlowFilter { destination_ip: s(&["0.0.0.0/0"]), ..ff() }, true),
            ("destination_ip v6", FlowFilter { destination_ip: s(&["::/0"]), ..ff() }, false),
            ("source_pod ns/prefix", FlowFilter { source_pod: s(&["default/web"]), ..ff() }, true),
            ("source_pod ns only", FlowFilter { source_pod: s(&["default/"]), ..ff() }, true),
            ("source_pod any ns", FlowFilter { source_pod: s(&["/web-1"]), ..ff() }, true),
            ("source_pod other ns", FlowFilter { source_pod: s(&["prod/web"]), ..ff() }, false),
            ("destination_pod", FlowFilter { destination_pod: s(&["prod/db"]), ..ff() }, true),
            ("destination_pod other", FlowFilter { destination_pod: s(&["web"]), ..ff() }, false),
            ("source_label", FlowFilter { source_label: s(&["app=web"]), ..ff() }, true),
            (
                "source_label src",
                FlowFilter { source_label: s(&["k8s:app=web,tier"]), ..ff() },
                true,
            ),
            (
                "source_label in",
                FlowFilter { source_label: s(&["app in (db, web)"]), ..ff() },
                true,
            ),
            (
                "source_label notin",
                FlowFilter { source_label: s(&["app notin (web)"]), ..ff() },
                false,
            ),
            ("source_label !=", FlowFilter { source_label: s(&["app!=web"]), ..ff() }, false),
            ("source_label !key", FlowFilter { source_label: s(&["!tier"]), ..ff() }, false),
            (
                "source_label other src",
                FlowFilter { source_label: s(&["cidr:app=web"]), ..ff() },
                false,
            ),
            ("destination_label", FlowFilter { destination_label: s(&["app=db"]), ..ff() }, true),
            ("source_identity", FlowFilter { source_identity: vec![256], ..ff() }, true),
            ("destination_identity", FlowFilter { destination_identity: vec![256], ..ff() }, false),
            (
                "destination_service",
                FlowFilter { destination_service: s(&["prod/db"]), ..ff() },
                true,
            ),
            ("source_service", FlowFilter { source_service: s(&["prod/db"]), ..ff() }, false),
            ("verdict", FlowFilter { verdict: vec![Verdict::Dropped as i32], ..ff() }, true),
            (
                "verdict other",
                FlowFilter { verdict: vec![Verdict::Forwarded as i32], ..ff() },
                false,
            ),
            ("drop reason", FlowFilter { drop_reason_desc: vec![133], ..ff() }, true),
            ("drop reason other", FlowFilter { drop_reason_desc: vec![181], ..ff() }, false),
            ("direction", FlowFilter { traffic_direction: vec![1], ..ff() }, true),
            ("direction other", FlowFilter { traffic_direction: vec![2], ..ff() }, false),
            (
                "event type",
                FlowFilter {
                    event_type: vec![EventTypeFilter { r#type: 1, ..Default::default() }],
                    ..ff()
                },
                true,
            ),
            (
                "event subtype other",
                FlowFilter {
                    event_type: vec![EventTypeFilter {
                        r#type: 1,
                        match_sub_type: true,
                        sub_type: 181,
                    }],
                    ..ff()
                },
                false,
            ),
            ("protocol", FlowFilter { protocol: s(&["TCP"]), ..ff() }, true),
            ("protocol other", FlowFilter { protocol: s(&["udp", "icmp"]), ..ff() }, false),
            ("source_port", FlowFilter { source_port: s(&["40000"]), ..ff() }, true),
            ("destination_port", FlowFilter { destination_port: s(&["7"]), ..ff() }, true),
            ("destination_port other", FlowFilter { destination_port: s(&["8"]), ..ff() }, false),
            ("reply false", FlowFilter { reply: vec![false], ..ff() }, true),
            ("reply true", FlowFilter { reply: vec![true], ..ff() }, false),
            (
                "tcp SYN",
                FlowFilter {
                    tcp_flags: vec![TcpFlags { syn: true, ..Default::default() }],
                    ..ff()
                },
                true,
            ),
            (
                "tcp SYN+ACK",
                FlowFilter {
                    tcp_flags: vec![TcpFlags { syn: true, ack: true, ..Default::default() }],
                    ..ff()
                },
                false,
            ),
            ("node_name glob", FlowFilter { node_name: s(&["node-*"]), ..ff() }, true),
            ("node_name other", FlowFilter { node_name: s(&["node-b"]), ..ff() }, false),
            ("ip_version", FlowFilter { ip_version: vec![1], ..ff() }, true),
            ("ip_version 6", FlowFilter { ip_version: vec![2], ..ff() }, false),
            (
                "interface",
                FlowFilter {
                    interface: vec![NetworkInterface { index: 0, name: "lxc1".into() }],
                    ..ff()
                },
                true,
            ),
            ("http_method (no L7)", FlowFilter { http_method: s(&["GET"]), ..ff() }, false),
            ("dns_query (no L7)", FlowFilter { dns_query: s(&[".*"]), ..ff() }, false),
            ("trace_id (never set)", FlowFilter { trace_id: s(&["x"]), ..ff() }, false),
            (
                "fields AND",
                FlowFilter { source_pod: s(&["default/"]), verdict: vec![1], ..ff() },
                false,
            ),
        ];
        for (name, f, want) in rows {
            assert_eq!(one(f), want, "{name}");
        }
    }

    #[test]
    fn whitelists_are_any_of_and_blacklists_take_away() {
        let web = FlowFilter { source_pod: s(&["default/web"]), ..Default::default() };
        let other = FlowFilter { source_pod: s(&["kube-system/"]), ..Default::default() };
        let dropped = FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() };
        let f = sample();
        assert!(FlowFilters::new(&[other.clone(), web.clone()], &[]).unwrap().passes(&f));
        assert!(!FlowFilters::new(std::slice::from_ref(&other), &[]).unwrap().passes(&f));
        assert!(!FlowFilters::new(&[web], std::slice::from_ref(&dropped)).unwrap().passes(&f));
        assert!(!FlowFilters::new(&[], &[other, dropped]).unwrap().passes(&f));
    }

    #[test]
    fn bad_filters_are_refused_naming_the_field() {
        let ff = FlowFilter::default;
        for (f, field) in [
            (FlowFilter { source_ip: s(&["10.0.0.300"]), ..ff() }, "source_ip"),
            (FlowFilter { destination_ip: s(&["10.0.0.0/40"]), ..ff() }, "destination_ip"),
            (FlowFilter { http_path: s(&["(unclosed"]), ..ff() }, "http_path"),
            (FlowFilter { dns_query: s(&["[z-a]"]), ..ff() }, "dns_query"),
            (FlowFilter { source_label: s(&["app in web"]), ..ff() }, "source_label"),
            (FlowFilter { destination_label: s(&["="]), ..ff() }, "destination_label"),
            (FlowFilter { destination_port: s(&["http"]), ..ff() }, "destination_port"),
            (FlowFilter { protocol: s(&["quic"]), ..ff() }, "protocol"),
            (FlowFilter { verdict: vec![42], ..ff() }, "verdict"),
            (FlowFilter { drop_reason_desc: vec![1], ..ff() }, "drop_reason_desc"),
            (FlowFilter { http_status_code: s(&["4xx"]), ..ff() }, "http_status_code"),
        ] {
            let e = FlowFilters::new(&[ff()], &[f]).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }
}
