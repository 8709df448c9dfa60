//! Policy: the rule repository and its resolution into the policy map.
//!
//! Accepted documents (YAML or JSON, several per file): CiliumNetworkPolicy
//! and CiliumClusterwideNetworkPolicy (`cilium.io/v2`) with their real field
//! names. Supported so far: `endpointSelector` (matchLabels,
//! matchExpressions In/NotIn/Exists/DoesNotExist), `ingress`/`egress` with
//! `fromEndpoints`/`toEndpoints`, `fromEntities`/`toEntities`, `toPorts`
//! (port, endPort, protocol TCP/UDP/ICMP/ANY), `icmps` (ICMPv4 types by
//! number or name), and `ingressDeny`/
//! `egressDeny`. Anything else is refused with the field's name, so a file
//! never half-applies. (CIDR rules, named ports and Kubernetes
//! NetworkPolicy come next.)
//!
//! Semantics as Cilium's: an endpoint selected by a rule with an
//! `ingress`/`ingressDeny` (`egress`/`egressDeny`) section has that
//! direction enforced (default deny; `ingress: [{}]` denies all); deny wins
//! over allow; a namespaced policy selects endpoints of its namespace, and
//! its peer selectors too unless they name a namespace; the host may always
//! reach an endpoint whose ingress is enforced (Cilium's allow-localhost),
//! unless a deny names it.

use std::collections::{BTreeMap, BTreeSet};

use ciliate_common::{
    identity as reserved,
    policy::{ANY_IDENTITY, ANY_PROTO, DIR_EGRESS, DIR_INGRESS},
};
use ciliate_datapath::maps::{PolicyRule, port_range_prefixes};
use serde::{Deserialize, Serialize};

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// A pod's endpoint carries each label of its namespace under this prefix
/// (with Kubernetes; Cilium's `io.cilium.k8s.namespace.labels.`).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Expression>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expression {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortProtocol {
    /// A number or a named port (a container port's name).
    #[schemars(schema_with = "int_or_string")]
    pub port: serde_yaml_ng::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    #[serde(default)]
    pub ports: Vec<PortProtocol>,
    /// L7 rules on these ports (parsed and checked; refused until the
    /// proxy redirect is built: see [`L7_NOT_YET`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// `toPorts[].rules`: Cilium's L7 rules.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<ciliate_proxy::rules::HttpRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<DnsSelector>>,
}

/// A DNS name or pattern (`rules.dns[]`, `toFQDNs[]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DnsSelector {
    /// An exact name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    /// A pattern: `*` stands for any characters but `.`; `*` alone for
    /// every name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

/// Why a policy with L7 rules is refused today: enforcing them at L4 only
/// would let through what they forbid.
pub const L7_NOT_YET: &str = "L7 policy is not enforced yet (the proxy redirect is still being built, issue #14); refused rather than enforced at L4 only";

impl DnsSelector {
    fn check(&self) -> Result<(), String> {
        let ok = |s: &str, star: bool| {
            !s.is_empty()
                && s.len() <= 255
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (star && c == '*')
                })
        };
        match (&self.match_name, &self.match_pattern) {
            (Some(n), None) if ok(n, false) => Ok(()),
            (None, Some(p)) if ok(p, true) => Ok(()),
            (Some(n), None) => Err(format!("matchName {n:?} is not a DNS name")),
            (None, Some(p)) => Err(format!("matchPattern {p:?}: DNS characters and * only")),
            _ => Err("one of matchName and matchPattern".into()),
        }
    }
}

/// One ingress or egress rule; `from*` for ingress, `to*` for egress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Option::is_none")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    /// Egress to what these names resolve to (checked; refused until the
    /// DNS proxy is built).
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<DnsSelector>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IcmpRule {
    pub fields: Vec<IcmpField>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IcmpField {
    /// A number or Cilium's name of the type (`EchoRequest`).
    #[serde(rename = "type")]
    #[schemars(schema_with = "int_or_string")]
    pub kind: serde_yaml_ng::Value,
    #[serde(default)]
    pub family: Option<String>,
}

/// Kubernetes' schema for a field that is a number or a string.
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-int-or-string": true})
}

/// The ICMPv4 type of an `icmps` field: a number or Cilium's name.
fn icmp_type(f: &IcmpField) -> Result<u8, String> {
    if let Some(fam) = &f.family
        && fam != "IPv4"
    {
        return Err(format!("family {fam}: only IPv4 is supported"));
    }
    match &f.kind {
        serde_yaml_ng::Value::Number(n) => n
            .as_u64()
            .filter(|t| *t <= 255)
            .map(|t| t as u8)
            .ok_or_else(|| format!("ICMP type {n}: 0 to 255")),
        serde_yaml_ng::Value::String(s) => Ok(match s.as_str() {
            "EchoReply" => 0,
            "DestinationUnreachable" => 3,
            "Redirect" => 5,
            "Echo" | "EchoRequest" => 8,
            "TimeExceeded" => 11,
            "ParameterProblem" => 12,
            "Timestamp" => 13,
            "TimestampReply" => 14,
            other => return Err(format!("ICMP type {other:?} is not a known ICMPv4 type")),
        }),
        v => Err(format!("ICMP type {v:?} is not a number or a name")),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CidrRule {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

/// An IPv4 prefix.
pub type Prefix = (std::net::Ipv4Addr, u8);

/// Parse `a.b.c.d/n` (or a bare address, /32); host bits must be clear.
pub fn parse_cidr(s: &str) -> Result<Prefix, String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: std::net::Ipv4Addr =
        ip.parse().map_err(|_| format!("CIDR {s:?}: not an IPv4 prefix"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("CIDR {s:?}: bad prefix length"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    if u32::from(ip) & !mask != 0 {
        return Err(format!(
            "CIDR {s:?}: host bits set (network is {}/{len})",
            std::net::Ipv4Addr::from(u32::from(ip) & mask)
        ));
    }
    Ok((ip, len))
}

/// Is prefix `inner` inside prefix `outer`?
pub fn contains(outer: Prefix, inner: Prefix) -> bool {
    let mask = if outer.1 == 0 { 0 } else { u32::MAX << (32 - u32::from(outer.1)) };
    inner.1 >= outer.1 && u32::from(inner.0) & mask == u32::from(outer.0)
}

/// The label of the local identity of a CIDR.
pub fn cidr_label(p: Prefix) -> String {
    format!("cidr:{}/{}", p.0, p.1)
}

/// The label every identity outside the cluster carries.
pub const WORLD_LABEL: &str = "reserved:world";

/// `p` with its host bits cleared, at length `len` (≤ `p.1`).
fn truncate(p: Prefix, len: u8) -> Prefix {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    (std::net::Ipv4Addr::from(u32::from(p.0) & mask), len)
}

/// The labels of the local identity of prefix `p`, as Cilium gives them:
/// `cidr:` for `p` and for every prefix that contains it (so a selector
/// names it by any of them), and `reserved:world` when `p` lies outside
/// the cluster (`in_cluster`), so `world` and every rule about the world
/// still select an address once some policy names its CIDR.
pub fn cidr_labels(p: Prefix, in_cluster: bool) -> Vec<String> {
    let mut out: Vec<String> = (0..=p.1).rev().map(|len| cidr_label(truncate(p, len))).collect();
    if !in_cluster {
        out.push(WORLD_LABEL.to_owned());
    }
    out.sort();
    out
}

/// The identities a resolution chooses peers from: every identity's
/// labels, and the local (CIDR) identities indexed by each prefix their
/// labels name and by `reserved:world`, so a CIDR or `world` peer costs a
/// lookup instead of a scan of every identity.
#[derive(Clone, Debug, Default)]
pub struct IdView {
    labels: BTreeMap<u32, Vec<String>>,
    by_prefix: BTreeMap<Prefix, Vec<u32>>,
    world: Vec<u32>,
}

impl IdView {
    pub fn new(labels: BTreeMap<u32, Vec<String>>) -> Self {
        let mut v = Self::default();
        for (id, l) in labels {
            v.insert(id, l);
        }
        v
    }

    /// Add identity `id` (a no-op for one already present). Only local
    /// identities are indexed by prefix: a `cidr:` label on anything else
    /// selects nothing.
    pub fn insert(&mut self, id: u32, labels: Vec<String>) {
        if self.labels.contains_key(&id) {
            return;
        }
        if id & reserved::LOCAL_FLAG != 0 {
            for l in &labels {
                if let Some(p) = l.strip_prefix("cidr:").and_then(|c| parse_cidr(c).ok()) {
                    self.by_prefix.entry(p).or_default().push(id);
                } else if l == WORLD_LABEL {
                    self.world.push(id);
                }
            }
        }
        self.labels.insert(id, labels);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &Vec<String>)> {
        self.labels.iter()
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.labels.keys().copied()
    }

    pub fn get(&self, id: u32) -> Option<&Vec<String>> {
        self.labels.get(&id)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The identity with exactly `labels`, if there is one.
    pub fn find(&self, labels: &[String]) -> Option<u32> {
        self.labels.iter().find(|(_, l)| l.as_slice() == labels).map(|(id, _)| *id)
    }

    /// Identity `id` as the API shows it.
    pub fn identity(&self, id: u32) -> Option<ciliate_api::models::Identity> {
        self.labels.get(&id).map(|l| ciliate_api::models::Identity {
            id,
            labels: l.clone(),
            reserved: id < reserved::MIN_CLUSTER,
        })
    }

    /// Every identity as the API shows it: reserved ones first, by number.
    pub fn list(&self) -> Vec<ciliate_api::models::Identity> {
        self.labels.keys().filter_map(|id| self.identity(*id)).collect()
    }

    /// Local identities whose labels name prefix `p`: those of `p` and of
    /// every prefix inside it.
    fn in_prefix(&self, p: Prefix) -> &[u32] {
        self.by_prefix.get(&p).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Local identities outside the cluster.
    fn world(&self) -> &[u32] {
        &self.world
    }
}

impl From<BTreeMap<u32, Vec<String>>> for IdView {
    fn from(labels: BTreeMap<u32, Vec<String>>) -> Self {
        Self::new(labels)
    }
}

impl PeerRule {
    /// (CIDR, excepts) of this rule's CIDR peers; unparsable ones were
    /// refused by validation.
    fn cidrs(&self) -> Vec<(Prefix, Vec<Prefix>)> {
        let plain = self.from_cidr.iter().chain(self.to_cidr.iter()).flatten();
        let sets = self.from_cidr_set.iter().chain(self.to_cidr_set.iter()).flatten();
        plain
            .filter_map(|c| parse_cidr(c).ok().map(|p| (p, Vec::new())))
            .chain(sets.filter_map(|s| {
                let p = parse_cidr(&s.cidr).ok()?;
                Some((p, s.except.iter().filter_map(|e| parse_cidr(e).ok()).collect()))
            }))
            .collect()
    }

    fn has_cidrs(&self) -> bool {
        self.from_cidr.is_some()
            || self.to_cidr.is_some()
            || self.from_cidr_set.is_some()
            || self.to_cidr_set.is_some()
    }
}

/// Every CIDR (and except) the rules name: each gets a local identity and
/// an ipcache entry.
pub fn referenced_cidrs(rules: &[Rule]) -> BTreeSet<Prefix> {
    let mut out = BTreeSet::new();
    for r in rules {
        for list in [&r.spec.ingress, &r.spec.ingress_deny, &r.spec.egress, &r.spec.egress_deny] {
            for pr in list.iter().flatten() {
                for (p, excepts) in pr.cidrs() {
                    if p.1 > 0 {
                        out.insert(p);
                    }
                    out.extend(excepts);
                }
            }
        }
    }
    out
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    pub endpoint_selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<PeerRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<PeerRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<PeerRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<PeerRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Cilium 1.15's `enableDefaultDeny`: a direction set to `false` is
    /// not put into default deny by this rule (its allows add to whatever
    /// else is allowed; its denies still deny).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDeny>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

impl RuleSpec {
    /// Does this rule have rules in `dir` (a non-empty allow or deny list,
    /// as Cilium counts them: `ingress: []` is no rule), and does it put
    /// the direction into default deny?
    pub fn direction(&self, dir: u8) -> (bool, bool) {
        let (allow, deny, dd) = if dir == DIR_INGRESS {
            (
                &self.ingress,
                &self.ingress_deny,
                self.enable_default_deny.as_ref().and_then(|d| d.ingress),
            )
        } else {
            (
                &self.egress,
                &self.egress_deny,
                self.enable_default_deny.as_ref().and_then(|d| d.egress),
            )
        };
        let has = allow.as_ref().is_some_and(|l| !l.is_empty())
            || deny.as_ref().is_some_and(|l| !l.is_empty());
        (has, has && dd.unwrap_or(true))
    }
}

/// A document's metadata: what a policy uses (name, namespace, labels),
/// and the rest of Kubernetes' ObjectMeta taken and left alone (a file
/// written by `kubectl get -o yaml`, or an object from the API, parses as
/// it is); anything else is refused by name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    annotations: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    uid: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    resource_version: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    generation: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    creation_timestamp: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    deletion_timestamp: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    deletion_grace_period_seconds: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    finalizers: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    owner_references: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    managed_fields: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    generate_name: Option<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing)]
    self_link: Option<serde_yaml_ng::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<RuleSpec>,
    #[serde(default)]
    specs: Option<Vec<RuleSpec>>,
    /// What the cluster wrote about it (ignored).
    #[serde(default, skip_serializing)]
    status: Option<serde_yaml_ng::Value>,
}

/// A validated rule in the repository.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    /// `kind/namespace/name` of the document it came from.
    pub source: String,
    /// Namespace of a namespaced policy; `None` for clusterwide ones.
    pub namespace: Option<String>,
    /// `k8s:key=value` labels of the rule (from the metadata), used by
    /// `policy delete`.
    pub labels: Vec<String>,
    pub spec: RuleSpec,
}

impl Rule {
    /// Does this rule select the endpoint with `labels`?
    pub fn selects(&self, labels: &[String]) -> bool {
        self.spec
            .endpoint_selector
            .as_ref()
            .is_some_and(|s| s.matches(labels, self.namespace.as_deref()))
    }
}

/// Parse and validate every document in `text`. Nothing is returned unless
/// all of them are valid.
pub fn parse(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let mut rules = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|e| PolicyError(format!("document {}: not YAML or JSON: {e}", i + 1)))?;
        if value.is_null() {
            continue;
        }
        if value.get("apiVersion").and_then(|v| v.as_str()) == Some("networking.k8s.io/v1") {
            let d: K8sDocument = from_value(value, i + 1)?;
            let d =
                k8s_to_cilium(d).map_err(|e| PolicyError(format!("document {}: {e}", i + 1)))?;
            // Its own source: a NetworkPolicy and a CiliumNetworkPolicy of
            // one name are two documents.
            let mut translated = validate_document(d, i + 1)?;
            for r in &mut translated {
                if let Some(rest) = r.source.strip_prefix("CiliumNetworkPolicy/") {
                    r.source = format!("NetworkPolicy/{rest}");
                }
            }
            rules.extend(translated);
            continue;
        }
        let d: Document = from_value(value, i + 1)?;
        rules.extend(validate_document(d, i + 1)?);
    }
    if rules.is_empty() {
        return err("no policy in the input");
    }
    Ok(rules)
}

/// Document `n` as `T`; an error names the field it is about
/// (`spec.enableDefaultDeny.ingress: invalid type …`).
fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
    n: usize,
) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = unsupported(&e.into_inner().to_string());
        PolicyError(if path == "." {
            format!("document {n}: {inner}")
        } else {
            format!("document {n}: {path}: {inner}")
        })
    })
}

/// Kubernetes NetworkPolicy (networking.k8s.io/v1).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sDocument {
    #[allow(dead_code, reason = "checked before parsing")]
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: K8sSpec,
    #[allow(dead_code, reason = "what the cluster wrote about it (ignored)")]
    #[serde(default)]
    status: Option<serde_yaml_ng::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sSpec {
    pod_selector: Selector,
    #[serde(default)]
    policy_types: Option<Vec<String>>,
    #[serde(default)]
    ingress: Option<Vec<K8sRule>>,
    #[serde(default)]
    egress: Option<Vec<K8sRule>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sRule {
    #[serde(default)]
    from: Option<Vec<K8sPeer>>,
    #[serde(default)]
    to: Option<Vec<K8sPeer>>,
    #[serde(default)]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPeer {
    #[serde(default)]
    pod_selector: Option<Selector>,
    #[serde(default)]
    namespace_selector: Option<Selector>,
    #[serde(default)]
    ip_block: Option<K8sIpBlock>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sIpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct K8sPort {
    #[serde(default)]
    port: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    end_port: Option<u32>,
    #[serde(default)]
    protocol: Option<String>,
}

/// The label every namespace has (Kubernetes sets it): its name.
const K8S_NS_NAME: &str = "kubernetes.io/metadata.name";

/// A namespace label key as the endpoints of its pods carry it: the name
/// as the pod's namespace label (known in standalone mode too), any other
/// under [`NAMESPACE_LABELS_PREFIX`] (from the Kubernetes API).
fn namespace_label_key(key: &str) -> String {
    if key == K8S_NS_NAME {
        format!("k8s:{NAMESPACE_LABEL}")
    } else {
        format!("k8s:{NAMESPACE_LABELS_PREFIX}{key}")
    }
}

/// A Kubernetes peer as a Cilium endpoint selector: the namespace
/// selector's labels become the endpoint labels pods carry for their
/// namespace's labels, as Cilium translates them.
fn k8s_peer_selector(p: &K8sPeer) -> Result<Selector, String> {
    let mut sel = p.pod_selector.clone().unwrap_or_default();
    if let Some(ns) = &p.namespace_selector {
        // Pods only (any namespace when the selector is empty).
        sel.match_expressions.push(Expression {
            key: format!("k8s:{NAMESPACE_LABEL}"),
            operator: "Exists".into(),
            values: vec![],
        });
        for (k, v) in &ns.match_labels {
            sel.match_labels.insert(namespace_label_key(k), v.clone());
        }
        for e in &ns.match_expressions {
            sel.match_expressions
                .push(Expression { key: namespace_label_key(&e.key), ..e.clone() });
        }
    }
    Ok(sel)
}

/// Translate a NetworkPolicy into the CiliumNetworkPolicy it means.
fn k8s_to_cilium(d: K8sDocument) -> Result<Document, String> {
    if d.kind != "NetworkPolicy" {
        return Err(format!("kind {} is not supported (NetworkPolicy)", d.kind));
    }
    let types = d.spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if d.spec.egress.is_some() {
            t.push("Egress".into());
        }
        t
    });
    for t in &types {
        if t != "Ingress" && t != "Egress" {
            return Err(format!("policyTypes: {t} is not Ingress or Egress"));
        }
    }
    let convert = |rules: &Option<Vec<K8sRule>>, ingress: bool| -> Result<Vec<PeerRule>, String> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().flatten().enumerate() {
            let field = if ingress { "ingress" } else { "egress" };
            let peers = if ingress { &r.from } else { &r.to };
            if (ingress && r.to.is_some()) || (!ingress && r.from.is_some()) {
                return Err(format!(
                    "{field}[{i}]: {} does not belong in this direction",
                    if ingress { "to" } else { "from" }
                ));
            }
            let mut pr = PeerRule::default();
            let mut selectors = Vec::new();
            let mut blocks = Vec::new();
            for (j, p) in peers.iter().flatten().enumerate() {
                match (&p.ip_block, p.pod_selector.is_some() || p.namespace_selector.is_some()) {
                    (Some(_), true) => {
                        return Err(format!("{field}[{i}] peer {j}: ipBlock goes alone"));
                    }
                    (Some(b), false) => {
                        blocks.push(CidrRule { cidr: b.cidr.clone(), except: b.except.clone() })
                    }
                    (None, true) => selectors.push(
                        k8s_peer_selector(p).map_err(|e| format!("{field}[{i}] peer {j}: {e}"))?,
                    ),
                    (None, false) => return Err(format!("{field}[{i}] peer {j}: empty peer")),
                }
            }
            let mut ports: Vec<PortProtocol> = Vec::new();
            for (k, p) in r.ports.iter().flatten().enumerate() {
                // Kubernetes refuses port 0; without a port, all ports.
                if p.port.as_ref().and_then(serde_yaml_ng::Value::as_u64) == Some(0) {
                    return Err(format!(
                        "{field}[{i}].ports[{k}]: port 0 is no port (leave the port out for all)"
                    ));
                }
                ports.push(PortProtocol {
                    port: p.port.clone().unwrap_or(serde_yaml_ng::Value::Number(0.into())),
                    end_port: p.end_port,
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                });
            }
            let all_peers = peers.as_ref().is_none_or(Vec::is_empty);
            if !ports.is_empty() {
                pr.to_ports = Some(vec![PortRule { ports, rules: None }]);
            }
            if all_peers {
                if pr.to_ports.is_none() {
                    if ingress {
                        pr.from_entities = Some(vec!["all".into()])
                    } else {
                        pr.to_entities = Some(vec!["all".into()])
                    }
                }
            } else {
                if !selectors.is_empty() {
                    if ingress {
                        pr.from_endpoints = Some(selectors)
                    } else {
                        pr.to_endpoints = Some(selectors)
                    }
                }
                if !blocks.is_empty() {
                    if ingress {
                        pr.from_cidr_set = Some(blocks)
                    } else {
                        pr.to_cidr_set = Some(blocks)
                    }
                }
            }
            out.push(pr);
        }
        Ok(out)
    };
    // A policy type without rules isolates the pod in that direction:
    // `[{}]` (a rule that allows nothing), since Cilium counts an empty
    // list as no rule at all.
    let direction = |ingress: bool| -> Result<Option<Vec<PeerRule>>, String> {
        let (name, rules) =
            if ingress { ("Ingress", &d.spec.ingress) } else { ("Egress", &d.spec.egress) };
        if !types.iter().any(|t| t == name) {
            return Ok(None);
        }
        let converted = convert(rules, ingress)?;
        Ok(Some(if converted.is_empty() { vec![PeerRule::default()] } else { converted }))
    };
    let spec = RuleSpec {
        endpoint_selector: Some(d.spec.pod_selector.clone()),
        ingress: direction(true)?,
        egress: direction(false)?,
        ..Default::default()
    };
    Ok(Document {
        api_version: "cilium.io/v2".into(),
        kind: "CiliumNetworkPolicy".into(),
        metadata: d.metadata,
        spec: Some(spec),
        specs: None,
        status: None,
    })
}

/// serde's "unknown field" message, said the way an operator reads it.
fn unsupported(msg: &str) -> String {
    match msg.strip_prefix("unknown field `") {
        Some(rest) => {
            let field = rest.split('`').next().unwrap_or(rest);
            format!("field {field} is not supported (unknown or not built yet)")
        }
        None => msg.to_owned(),
    }
}

fn validate_document(d: Document, n: usize) -> Result<Vec<Rule>, PolicyError> {
    let at = |what: &str| format!("document {n}: {what}");
    if d.api_version != "cilium.io/v2" {
        return err(at(&format!("apiVersion {} is not supported (cilium.io/v2)", d.api_version)));
    }
    let namespaced = match d.kind.as_str() {
        "CiliumNetworkPolicy" => true,
        "CiliumClusterwideNetworkPolicy" => false,
        k => return err(at(&format!("kind {k} is not supported"))),
    };
    let name = match d.metadata.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return err(at("metadata.name is missing")),
    };
    let namespace = if namespaced {
        Some(d.metadata.namespace.clone().unwrap_or_else(|| "default".into()))
    } else {
        if d.metadata.namespace.is_some() {
            return err(at("metadata.namespace: a clusterwide policy has no namespace"));
        }
        None
    };
    let specs: Vec<RuleSpec> = match (d.spec, d.specs) {
        (Some(s), None) => vec![s],
        (None, Some(v)) if !v.is_empty() => v,
        (Some(_), Some(_)) => return err(at("spec and specs: give one of them")),
        _ => return err(at("spec is missing")),
    };
    let mut labels: Vec<String> =
        d.metadata.labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
    labels.push(format!("k8s:io.cilium.k8s.policy.name={name}"));
    if let Some(ns) = &namespace {
        labels.push(format!("k8s:io.cilium.k8s.policy.namespace={ns}"));
    }
    labels.sort();
    let source = format!("{}/{}/{name}", d.kind, namespace.as_deref().unwrap_or("-"));
    let mut out = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let at = |what: String| format!("document {n} ({source}), rule {}: {what}", i + 1);
        let Some(sel) = &spec.endpoint_selector else {
            return err(at("endpointSelector is missing".into()));
        };
        validate_selector(sel).map_err(|e| PolicyError(at(format!("endpointSelector: {e}"))))?;
        for (field, list, ingress) in [
            ("ingress", &spec.ingress, true),
            ("ingressDeny", &spec.ingress_deny, true),
            ("egress", &spec.egress, false),
            ("egressDeny", &spec.egress_deny, false),
        ] {
            for (j, r) in list.iter().flatten().enumerate() {
                validate_peer_rule(r, ingress)
                    .map_err(|e| PolicyError(at(format!("{field}[{j}]: {e}"))))?;
            }
        }
        out.push(Rule {
            source: source.clone(),
            namespace: namespace.clone(),
            labels: labels.clone(),
            spec,
        });
    }
    Ok(out)
}

fn validate_selector(s: &Selector) -> Result<(), String> {
    for (i, e) in s.match_expressions.iter().enumerate() {
        match e.operator.as_str() {
            "In" | "NotIn" if e.values.is_empty() => {
                return Err(format!("matchExpressions[{i}]: operator {} needs values", e.operator));
            }
            "Exists" | "DoesNotExist" if !e.values.is_empty() => {
                return Err(format!(
                    "matchExpressions[{i}]: operator {} takes no values",
                    e.operator
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            op => {
                return Err(format!(
                    "matchExpressions[{i}]: operator {op} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        }
        if e.key.is_empty() {
            return Err(format!("matchExpressions[{i}]: key is empty"));
        }
    }
    Ok(())
}

fn validate_peer_rule(r: &PeerRule, ingress: bool) -> Result<(), String> {
    let (wrong_sel, wrong_ent) =
        if ingress { ("toEndpoints", "toEntities") } else { ("fromEndpoints", "fromEntities") };
    if (ingress && r.to_endpoints.is_some()) || (!ingress && r.from_endpoints.is_some()) {
        return Err(format!("{wrong_sel} does not belong in this direction"));
    }
    if (ingress && r.to_entities.is_some()) || (!ingress && r.from_entities.is_some()) {
        return Err(format!("{wrong_ent} does not belong in this direction"));
    }
    for s in r.from_endpoints.iter().chain(r.to_endpoints.iter()).flatten() {
        validate_selector(s)?;
    }
    for e in r.from_entities.iter().chain(r.to_entities.iter()).flatten() {
        if entity_identities(e).is_none() {
            return Err(format!(
                "entity {e:?} is not one of host, remote-node, world, cluster, all, health, init, unmanaged, kube-apiserver, ingress"
            ));
        }
    }
    if (ingress && (r.to_cidr.is_some() || r.to_cidr_set.is_some()))
        || (!ingress && (r.from_cidr.is_some() || r.from_cidr_set.is_some()))
    {
        let wrong = if ingress { "toCIDR/toCIDRSet" } else { "fromCIDR/fromCIDRSet" };
        return Err(format!("{wrong} does not belong in this direction"));
    }
    for c in r.from_cidr.iter().chain(r.to_cidr.iter()).flatten() {
        parse_cidr(c)?;
    }
    for set in r.from_cidr_set.iter().chain(r.to_cidr_set.iter()).flatten() {
        let outer = parse_cidr(&set.cidr)?;
        for e in &set.except {
            let inner = parse_cidr(e)?;
            if !contains(outer, inner) {
                return Err(format!("except {e} is not inside {}", set.cidr));
            }
        }
    }
    for (i, ir) in r.icmps.iter().flatten().enumerate() {
        for (j, f) in ir.fields.iter().enumerate() {
            icmp_type(f).map_err(|e| format!("icmps[{i}].fields[{j}]: {e}"))?;
        }
    }
    for (i, pr) in r.to_ports.iter().flatten().enumerate() {
        for (j, p) in pr.ports.iter().enumerate() {
            port_spec(p).map_err(|e| format!("toPorts[{i}].ports[{j}]: {e}"))?;
        }
        if let Some(l7) = &pr.rules {
            let at = format!("toPorts[{i}].rules");
            if let Some(http) = &l7.http {
                ciliate_proxy::rules::RuleSet::compile(http).map_err(|e| format!("{at}.{e}"))?;
            }
            for (j, d) in l7.dns.iter().flatten().enumerate() {
                d.check().map_err(|e| format!("{at}.dns[{j}]: {e}"))?;
            }
            return Err(format!("{at}: {L7_NOT_YET}"));
        }
    }
    if let Some(fqdns) = &r.to_fqdns {
        if ingress {
            return Err("toFQDNs does not belong in this direction".into());
        }
        for (j, d) in fqdns.iter().enumerate() {
            d.check().map_err(|e| format!("toFQDNs[{j}]: {e}"))?;
        }
        return Err(format!("toFQDNs: {L7_NOT_YET}"));
    }
    Ok(())
}

/// An inclusive port range; `None` for every port.
pub type Ports = Option<(u16, u16)>;

pub use ciliate_api::models::valid_port_name;

/// Port name → (port, protocol) pairs.
pub type PortNames = BTreeMap<String, Vec<(u16, u8)>>;

/// The named ports a resolution may use: the endpoint's own (for its
/// ingress rules) and every identity's (for egress rules to it; shared
/// between the endpoints of one regeneration).
#[derive(Clone, Debug, Default)]
pub struct NamedPorts {
    pub own: PortNames,
    pub by_identity: std::sync::Arc<BTreeMap<u32, PortNames>>,
}

/// The port name of a `ports` entry, if it names one.
fn port_name(p: &PortProtocol) -> Option<&str> {
    match &p.port {
        serde_yaml_ng::Value::String(s) if s.parse::<u32>().is_err() => Some(s.as_str()),
        _ => None,
    }
}

/// (protocols, ports) of one `ports` entry.
fn port_spec(p: &PortProtocol) -> Result<(Vec<u8>, Ports), String> {
    let protos = match p.protocol.as_deref().unwrap_or("ANY") {
        "TCP" => vec![6],
        "UDP" => vec![17],
        "ICMP" => vec![1],
        "ANY" => vec![6, 17],
        other => return Err(format!("protocol {other} is not TCP, UDP, ICMP or ANY")),
    };
    let port: u32 = match &p.port {
        serde_yaml_ng::Value::Number(n) => {
            n.as_u64().map(|v| v as u32).ok_or("port is not a whole number")?
        }
        serde_yaml_ng::Value::String(s) => match s.parse() {
            Ok(v) => v,
            Err(_) if valid_port_name(s) => {
                if p.end_port.is_some() {
                    return Err(format!("port {s:?}: a named port takes no endPort"));
                }
                return Ok((protos, None));
            }
            Err(_) => {
                return Err(format!(
                    "port {s:?} is neither a number nor a port name (lowercase letters, digits, '-')"
                ));
            }
        },
        v => return Err(format!("port {v:?} is not a number")),
    };
    if port > 65535 {
        return Err(format!("port {port} is over 65535"));
    }
    let end = p.end_port.unwrap_or(port);
    if end > 65535 || end < port {
        return Err(format!("endPort {end}: between port ({port}) and 65535"));
    }
    Ok((
        protos,
        if port == 0 && p.end_port.is_none() { None } else { Some((port as u16, end as u16)) },
    ))
}

/// Identities an entity stands for; `None` for an unknown entity. "all" is
/// the wildcard; "cluster" is every identity but world.
pub fn entity_identities(e: &str) -> Option<Vec<u32>> {
    Some(match e {
        "all" => vec![ANY_IDENTITY],
        "world" => vec![reserved::WORLD],
        "host" => vec![reserved::HOST],
        "remote-node" => vec![reserved::REMOTE_NODE],
        "health" => vec![reserved::HEALTH],
        "init" => vec![reserved::INIT],
        "unmanaged" => vec![reserved::UNMANAGED],
        "kube-apiserver" => vec![reserved::KUBE_APISERVER],
        "ingress" => vec![reserved::INGRESS],
        "cluster" => vec![], // filled in from the known identities
        _ => return None,
    })
}

/// `source:key=value` → (source, key, value).
fn split_label(l: &str) -> (&str, &str, &str) {
    let (src, rest) = l.split_once(':').unwrap_or(("any", l));
    let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
    (src, k, v)
}

/// The value of selector key `key` (`app`, `k8s:app`, `any:app`) in `labels`.
pub(crate) fn label_value<'a>(labels: &'a [String], key: &str) -> Option<&'a str> {
    let (want_src, want_key) = match key.split_once(':') {
        Some((s, k)) => (s, k),
        None => ("any", key),
    };
    labels.iter().map(|l| split_label(l)).find_map(|(src, k, v)| {
        (k == want_key && (want_src == "any" || want_src == src)).then_some(v)
    })
}

impl Selector {
    /// Does this selector match an identity with `labels`? `namespace`:
    /// the implicit namespace requirement of a namespaced policy.
    pub fn matches(&self, labels: &[String], namespace: Option<&str>) -> bool {
        if let Some(ns) = namespace {
            let names_ns = self.match_labels.keys().any(|k| k.ends_with(NAMESPACE_LABEL))
                || self.match_expressions.iter().any(|e| e.key.ends_with(NAMESPACE_LABEL));
            if !names_ns && label_value(labels, NAMESPACE_LABEL) != Some(ns) {
                return false;
            }
        }
        self.match_labels.iter().all(|(k, v)| label_value(labels, k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|e| {
                let have = label_value(labels, &e.key);
                match e.operator.as_str() {
                    "In" => have.is_some_and(|v| e.values.iter().any(|x| x == v)),
                    "NotIn" => have.is_none_or(|v| !e.values.iter().any(|x| x == v)),
                    "Exists" => have.is_some(),
                    _ => have.is_none(),
                }
            })
    }
}

/// The policy map content of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub rules: BTreeSet<PolicyRule>,
}

/// Resolve the rules that select an endpoint (`endpoint_id` with
/// `labels`) against the known identities (`id → labels`).
pub fn resolve(
    rules: &[Rule],
    endpoint_id: u16,
    labels: &[String],
    identities: &IdView,
) -> Resolved {
    resolve_with(rules, endpoint_id, labels, identities, true, &NamedPorts::default())
}

/// [`resolve`] with the named ports rules may name.
pub fn resolve_named(
    rules: &[Rule],
    endpoint_id: u16,
    labels: &[String],
    identities: &IdView,
    named: &NamedPorts,
) -> Resolved {
    resolve_with(rules, endpoint_id, labels, identities, true, named)
}

fn resolve_with(
    rules: &[Rule],
    endpoint_id: u16,
    labels: &[String],
    identities: &IdView,
    implicit: bool,
    named: &NamedPorts,
) -> Resolved {
    let mut out = Resolved::default();
    let mut denies: Vec<PolicyRule> = Vec::new();
    let mut allows: Vec<PolicyRule> = Vec::new();
    // Per direction: does some selecting rule put it into default deny?
    let (mut ingress_dd, mut egress_dd) = (false, false);
    for rule in rules {
        if !rule.selects(labels) {
            continue;
        }
        let ns = rule.namespace.as_deref();
        let (has_in, dd_in) = rule.spec.direction(DIR_INGRESS);
        let (has_eg, dd_eg) = rule.spec.direction(DIR_EGRESS);
        out.ingress_enforced |= has_in;
        out.egress_enforced |= has_eg;
        ingress_dd |= dd_in;
        egress_dd |= dd_eg;
        for (list, dir, deny) in [
            (&rule.spec.ingress, DIR_INGRESS, false),
            (&rule.spec.ingress_deny, DIR_INGRESS, true),
            (&rule.spec.egress, DIR_EGRESS, false),
            (&rule.spec.egress_deny, DIR_EGRESS, true),
        ] {
            for pr in list.iter().flatten() {
                let peers = peers_of(pr, ns, identities);
                let icmps = pr
                    .icmps
                    .iter()
                    .flatten()
                    .flat_map(|i| i.fields.iter())
                    .filter_map(|f| icmp_type(f).ok())
                    .map(|t| (1u8, Some((u16::from(t), u16::from(t)))));
                let ports: Vec<(u8, Option<(u16, u16)>)> = match (&pr.to_ports, &pr.icmps) {
                    (None, None) => vec![(ANY_PROTO, None)],
                    (prs, _) => prs
                        .iter()
                        .flatten()
                        .flat_map(|p| p.ports.iter())
                        .filter(|p| port_name(p).is_none())
                        .filter_map(|p| port_spec(p).ok())
                        .flat_map(|(protos, range)| protos.into_iter().map(move |pr| (pr, range)))
                        .chain(icmps)
                        .collect(),
                };
                // Named ports: the endpoint's own for ingress, each peer's
                // for egress.
                let names: Vec<(&str, Vec<u8>)> = pr
                    .to_ports
                    .iter()
                    .flatten()
                    .flat_map(|p| p.ports.iter())
                    .filter_map(|p| Some((port_name(p)?, port_spec(p).ok()?.0)))
                    .collect();
                for identity in peers {
                    let table = if dir == DIR_INGRESS {
                        Some(&named.own)
                    } else {
                        named.by_identity.get(&identity)
                    };
                    let mut ports = ports.clone();
                    for (name, protos) in &names {
                        for (port, proto) in table.and_then(|t| t.get(*name)).into_iter().flatten()
                        {
                            if protos.contains(proto) {
                                ports.push((*proto, Some((*port, *port))));
                            }
                        }
                    }
                    for (proto, range) in &ports {
                        let blocks: Vec<Option<(u16, u16)>> = match range {
                            None => vec![None],
                            Some((s, e)) => port_range_prefixes(*s, *e)
                                .into_iter()
                                .map(|(p, bits)| {
                                    let size = 1u32 << (16 - u32::from(bits));
                                    Some((p, (u32::from(p) + size - 1) as u16))
                                })
                                .collect(),
                        };
                        for ports in blocks {
                            let r = PolicyRule {
                                endpoint_id,
                                dir,
                                identity,
                                proto: *proto,
                                ports,
                                deny,
                            };
                            if deny { denies.push(r) } else { allows.push(r) }
                        }
                    }
                }
            }
        }
    }
    if implicit {
        for (dir, enforced, dd) in [
            (DIR_INGRESS, out.ingress_enforced, ingress_dd),
            (DIR_EGRESS, out.egress_enforced, egress_dd),
        ] {
            // Only rules with `enableDefaultDeny: false` in this direction:
            // enforced (their denies apply), but everything else passes,
            // as Cilium's added allow-all.
            if enforced && !dd {
                allows.push(allow_all(endpoint_id, dir, ANY_IDENTITY));
            }
        }
        // As Cilium's allow-localhost (the default in Kubernetes): the node
        // may always reach its endpoints (health checks, probes), unless a
        // deny names the host.
        if out.ingress_enforced {
            allows.push(allow_all(endpoint_id, DIR_INGRESS, reserved::HOST));
        }
    }
    // Within one identity the longest prefix wins in the datapath: leave out
    // an allow that a deny of the same identity and direction covers.
    let mut by_peer: BTreeMap<(u8, u32), Vec<&PolicyRule>> = BTreeMap::new();
    for d in &denies {
        by_peer.entry((d.dir, d.identity)).or_default().push(d);
    }
    let covered = |a: &PolicyRule| {
        by_peer.get(&(a.dir, a.identity)).is_some_and(|ds| {
            ds.iter().any(|d| {
                d.proto == ANY_PROTO
                    || (d.proto == a.proto
                        && match (d.ports, a.ports) {
                            (None, _) => true,
                            (Some(_), None) => false,
                            (Some((ds, de)), Some((as_, ae))) => ds <= as_ && ae <= de,
                        })
            })
        })
    };
    let kept: Vec<PolicyRule> = allows.into_iter().filter(|a| !covered(a)).collect();
    out.rules.extend(kept);
    out.rules.extend(denies);
    out
}

/// Allow everything from (or to) `identity` in `dir`.
fn allow_all(endpoint_id: u16, dir: u8, identity: u32) -> PolicyRule {
    PolicyRule { endpoint_id, dir, identity, proto: ANY_PROTO, ports: None, deny: false }
}

/// The identities a peer rule names: its endpoint selectors matched
/// against the known identities, its entities; any identity when it names
/// no peer but ports (an L4-only rule); none for an empty rule (`{}`).
fn peers_of(pr: &PeerRule, ns: Option<&str>, identities: &IdView) -> BTreeSet<u32> {
    let selectors = pr.from_endpoints.as_ref().or(pr.to_endpoints.as_ref());
    let entities = pr.from_entities.as_ref().or(pr.to_entities.as_ref());
    let mut out = BTreeSet::new();
    for s in selectors.into_iter().flatten() {
        if s.match_labels.is_empty() && s.match_expressions.is_empty() && ns.is_none() {
            // `{}` in a clusterwide policy: every endpoint.
            out.extend(identities.ids().filter(|id| reserved::is_cluster(*id)));
            continue;
        }
        out.extend(identities.iter().filter(|(_, l)| s.matches(l, ns)).map(|(id, _)| *id));
    }
    for e in entities.into_iter().flatten() {
        match e.as_str() {
            "cluster" => out.extend(
                identities
                    .ids()
                    .filter(|id| *id != reserved::WORLD && *id & reserved::LOCAL_FLAG == 0),
            ),
            // The world is also every CIDR identity outside the cluster: an
            // address does not leave the world because a policy named it.
            "world" => {
                out.insert(reserved::WORLD);
                out.extend(identities.world());
            }
            e => out.extend(entity_identities(e).unwrap_or_default()),
        }
    }
    // A CIDR selects the local identities whose labels name it (its own and
    // those of every prefix inside it) that no except names; 0.0.0.0/0 is
    // also the world.
    for (cidr, excepts) in pr.cidrs() {
        if cidr.1 == 0 {
            out.insert(reserved::WORLD);
        }
        let excluded: BTreeSet<u32> =
            excepts.iter().flat_map(|e| identities.in_prefix(*e)).copied().collect();
        out.extend(identities.in_prefix(cidr).iter().filter(|id| !excluded.contains(id)));
    }
    if selectors.is_none()
        && entities.is_none()
        && !pr.has_cidrs()
        && (pr.to_ports.is_some() || pr.icmps.is_some())
    {
        out.insert(ANY_IDENTITY);
    }
    out
}

pub mod explain;
#[cfg(test)]
mod tests;

/// What a packet would meet in one direction, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct DirectionTrace {
    pub enforced: bool,
    /// "allowed" or "denied".
    pub verdict: String,
    /// How it was decided, in words.
    pub reason: String,
    /// The documents whose rules decided (allow or deny).
    pub rules: Vec<String>,
}

/// `policy trace`: would `src` reach `dst` on `proto`/`port`?
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Trace {
    pub egress: DirectionTrace,
    pub ingress: DirectionTrace,
    /// "ALLOWED" or "DENIED".
    pub verdict: String,
    /// DENIED: why, and the smallest policy that would allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<explain::Explanation>,
}

fn matching(r: &PolicyRule, identity: u32, proto: u8, port: u16) -> bool {
    (r.identity == identity || r.identity == ANY_IDENTITY)
        && (r.proto == ANY_PROTO || r.proto == proto)
        && r.ports.is_none_or(|(s, e)| s <= port && port <= e)
}

/// One direction, decided as the datapath decides it (see
/// `ciliate_common::policy`) from the rules of `rules` that select the
/// endpoint with `labels`, for a peer with identity `peer`.
#[allow(clippy::too_many_arguments, reason = "one direction of a trace: all of it is input")]
pub fn trace_direction(
    rules: &[Rule],
    dir: u8,
    labels: &[String],
    peer: u32,
    proto: u8,
    port: u16,
    ids: &IdView,
    named: &NamedPorts,
) -> DirectionTrace {
    let all = resolve_with(rules, 0, labels, ids, true, named);
    let enforced = if dir == DIR_INGRESS { all.ingress_enforced } else { all.egress_enforced };
    if !enforced {
        return DirectionTrace {
            enforced,
            verdict: "allowed".into(),
            reason: "no policy selects the endpoint in this direction".into(),
            rules: vec![],
        };
    }
    let hits = |deny: bool| -> Vec<String> {
        let mut out: Vec<String> = rules
            .iter()
            .filter(|r| {
                resolve_with(std::slice::from_ref(*r), 0, labels, ids, false, named)
                    .rules
                    .iter()
                    .any(|x| x.dir == dir && x.deny == deny && matching(x, peer, proto, port))
            })
            .map(|r| r.source.clone())
            .collect();
        out.dedup();
        out
    };
    let denies = hits(true);
    if !denies.is_empty() {
        return DirectionTrace {
            enforced,
            verdict: "denied".into(),
            reason: "a deny rule matches (deny wins)".into(),
            rules: denies,
        };
    }
    if all.rules.iter().any(|x| x.dir == dir && !x.deny && matching(x, peer, proto, port)) {
        let allows = hits(false);
        if !allows.is_empty() {
            return DirectionTrace {
                enforced,
                verdict: "allowed".into(),
                reason: "an allow rule matches".into(),
                rules: allows,
            };
        }
        // Allowed by what the agent adds: allow-localhost, or the allow-all
        // of a direction no rule puts into default deny.
        let dd = rules.iter().any(|r| r.selects(labels) && r.spec.direction(dir).1);
        let (reason, rules) = if !dd {
            let off: Vec<String> = rules
                .iter()
                .filter(|r| r.selects(labels) && r.spec.direction(dir).0)
                .map(|r| r.source.clone())
                .collect();
            ("no rule puts this direction into default deny (enableDefaultDeny: false)", off)
        } else {
            ("the host may always reach its endpoints", vec!["allow-localhost".to_owned()])
        };
        return DirectionTrace {
            enforced,
            verdict: "allowed".into(),
            reason: reason.into(),
            rules,
        };
    }
    DirectionTrace {
        enforced,
        verdict: "denied".into(),
        reason: "policy selects the endpoint and no rule allows this (default deny)".into(),
        rules: vec![],
    }
}

/// Trace `src` → `dst` (each an identity with its labels) on `proto`/`port`.
/// `named`: the named ports of the source's and the destination's
/// resolution (see [`NamedPorts`]).
#[allow(clippy::too_many_arguments, reason = "a trace: all of it is input")]
pub fn trace(
    rules: &[Rule],
    src: (u32, &[String]),
    dst: (u32, &[String]),
    proto: u8,
    port: u16,
    identities: &IdView,
    named: (&NamedPorts, &NamedPorts),
) -> Trace {
    // Peers given by labels nobody has yet join a copy of the identities.
    let known = |p: (u32, &[String])| identities.get(p.0).is_some();
    let ids = if known(src) && known(dst) {
        std::borrow::Cow::Borrowed(identities)
    } else {
        let mut ids = identities.clone();
        ids.insert(src.0, src.1.to_vec());
        ids.insert(dst.0, dst.1.to_vec());
        std::borrow::Cow::Owned(ids)
    };
    // Only endpoints have policy: a peer that is not one (world, host, a
    // CIDR) enforces nothing on its side.
    let is_endpoint = |id: u32| reserved::is_cluster(id) || id == reserved::HEALTH;
    let open = || DirectionTrace {
        enforced: false,
        verdict: "allowed".into(),
        reason: "not an endpoint: no policy of its own".into(),
        rules: vec![],
    };
    let egress = if is_endpoint(src.0) {
        trace_direction(rules, DIR_EGRESS, src.1, dst.0, proto, port, &ids, named.0)
    } else {
        open()
    };
    let ingress = if is_endpoint(dst.0) {
        trace_direction(rules, DIR_INGRESS, dst.1, src.0, proto, port, &ids, named.1)
    } else {
        open()
    };
    if egress.verdict == "allowed" && ingress.verdict == "allowed" {
        return Trace { egress, ingress, verdict: "ALLOWED".into(), explanation: None };
    }
    let proto_name = match proto {
        6 => "tcp",
        17 => "udp",
        _ => "icmp",
    };
    let explanation = explain::explain(&egress, &ingress, src, dst, proto_name, port, &ids);
    Trace { egress, ingress, verdict: "DENIED".into(), explanation: Some(explanation) }
}

/// One selector of the policy in force and what it selects now
/// (`policy selectors`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct SelectorUse {
    /// The selector, as JSON text.
    pub selector: String,
    /// "endpointSelector", "fromEndpoints", "toEndpoints", "entities", "cidr".
    pub role: String,
    /// The document it comes from.
    pub source: String,
    pub identities: Vec<u32>,
}

/// Every selector of `rules` with the identities it selects among `ids`.
pub fn selectors(rules: &[Rule], ids: &IdView) -> Vec<SelectorUse> {
    let mut out = Vec::new();
    let text = |s: &Selector| serde_json::to_string(s).unwrap_or_default();
    for r in rules {
        let ns = r.namespace.as_deref();
        if let Some(s) = &r.spec.endpoint_selector {
            out.push(SelectorUse {
                selector: text(s),
                role: "endpointSelector".into(),
                source: r.source.clone(),
                identities: ids
                    .iter()
                    .filter(|(_, l)| s.matches(l, ns))
                    .map(|(id, _)| *id)
                    .collect(),
            });
        }
        for list in [&r.spec.ingress, &r.spec.ingress_deny, &r.spec.egress, &r.spec.egress_deny] {
            for pr in list.iter().flatten() {
                for (role, sels) in
                    [("fromEndpoints", &pr.from_endpoints), ("toEndpoints", &pr.to_endpoints)]
                {
                    for s in sels.iter().flatten() {
                        let single = PeerRule {
                            from_endpoints: Some(vec![s.clone()]),
                            ..Default::default()
                        };
                        out.push(SelectorUse {
                            selector: text(s),
                            role: role.into(),
                            source: r.source.clone(),
                            identities: peers_of(&single, ns, ids).into_iter().collect(),
                        });
                    }
                }
                for (role, ents) in
                    [("fromEntities", &pr.from_entities), ("toEntities", &pr.to_entities)]
                {
                    if let Some(e) = ents {
                        let single =
                            PeerRule { from_entities: Some(e.clone()), ..Default::default() };
                        out.push(SelectorUse {
                            selector: e.join(","),
                            role: role.into(),
                            source: r.source.clone(),
                            identities: peers_of(&single, ns, ids).into_iter().collect(),
                        });
                    }
                }
                for (cidr, excepts) in pr.cidrs() {
                    let single = PeerRule {
                        from_cidr_set: Some(vec![CidrRule {
                            cidr: format!("{}/{}", cidr.0, cidr.1),
                            except: excepts.iter().map(|e| format!("{}/{}", e.0, e.1)).collect(),
                        }]),
                        ..Default::default()
                    };
                    out.push(SelectorUse {
                        selector: format!("{}/{}", cidr.0, cidr.1),
                        role: "cidr".into(),
                        source: r.source.clone(),
                        identities: peers_of(&single, ns, ids).into_iter().collect(),
                    });
                }
            }
        }
    }
    out
}

/// The rules whose peers may include a new identity with `labels`: their
/// endpoint selectors, entities ("cluster", "all") or an L4-only rule. The
/// endpoints these rules select are the only ones a new identity changes.
pub fn rules_peering<'a>(rules: &'a [Rule], labels: &[String]) -> Vec<&'a Rule> {
    rules
        .iter()
        .filter(|r| {
            let ns = r.namespace.as_deref();
            [&r.spec.ingress, &r.spec.ingress_deny, &r.spec.egress, &r.spec.egress_deny]
                .into_iter()
                .flatten()
                .flatten()
                .any(|pr| {
                    let sel = pr.from_endpoints.iter().chain(pr.to_endpoints.iter()).flatten();
                    let ents = pr.from_entities.iter().chain(pr.to_entities.iter()).flatten();
                    sel.clone().any(|s| {
                        s.match_labels.is_empty() && s.match_expressions.is_empty()
                            || s.matches(labels, ns)
                    }) || ents.into_iter().any(|e| e == "cluster" || e == "all")
                })
        })
        .collect()
}
