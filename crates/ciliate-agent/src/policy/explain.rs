//! The drop explainer: for a trace that ends DENIED, which direction denied
//! it, whether a deny rule or default deny decided, and the smallest policy
//! that would allow it — one direction, one peer, one port, selectors with
//! as few labels as tell the endpoint apart from every other identity of
//! its namespace — written as a CiliumNetworkPolicy ready to import.

use std::collections::BTreeMap;

use ciliate_common::identity as reserved;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{DirectionTrace, IdView, NAMESPACE_LABEL, label_value, split_label};

/// Why a flow was denied and what would allow it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Explanation {
    /// "ingress", "egress" or "egress and ingress".
    pub denied_at: String,
    /// "deny rule" (a deny rule matches: no allow can override it) or
    /// "default deny" (policy selects the endpoint and nothing allows this).
    pub decided_by: String,
    /// Per denied direction, in words, naming the documents of deny rules.
    pub because: Vec<String>,
    /// A policy (YAML, one document per direction) that allows the flow,
    /// when an allow can: not past a deny rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_with: Option<String>,
}

/// One side of the flow: identity and labels.
pub type Side<'a> = (u32, &'a [String]);

fn namespace_of(labels: &[String]) -> Option<&str> {
    label_value(labels, NAMESPACE_LABEL)
}

/// The fewest of `labels` (as `key: value`) that select identity `id` and
/// no other identity of its namespace (greedily: each step takes the label
/// that leaves out most of the others), then `DoesNotExist` for keys only
/// the others have (an identity whose labels are a superset). Labels the
/// agent adds (namespace, `io.cilium.*`) and reserved ones are not used.
fn smallest_selector(id: u32, labels: &[String], ids: &IdView) -> Value {
    let ns = namespace_of(labels);
    let candidates: Vec<(&str, &str)> = labels
        .iter()
        .map(|l| split_label(l))
        .filter(|(src, k, _)| {
            *src != "reserved"
                && *src != "cidr"
                && *k != NAMESPACE_LABEL
                && !k.starts_with("io.cilium")
        })
        .map(|(_, k, v)| (k, v))
        .collect();
    let has = |other: &[String], (k, v): (&str, &str)| {
        other.iter().map(|l| split_label(l)).any(|(_, ok, ov)| ok == k && ov == v)
    };
    let mut others: Vec<&Vec<String>> = ids
        .iter()
        .filter(|(other, l)| **other != id && namespace_of(l) == ns && l.as_slice() != labels)
        .map(|(_, l)| l)
        .collect();
    let mut chosen = BTreeMap::new();
    while !others.is_empty() {
        let best = candidates
            .iter()
            .filter(|c| !chosen.contains_key(c.0))
            .map(|c| (others.iter().filter(|o| !has(o, *c)).count(), *c))
            .max_by_key(|(left_out, _)| *left_out);
        match best {
            Some((n, (k, v))) if n > 0 => {
                chosen.insert(k.to_owned(), v.to_owned());
                others.retain(|o| has(o, (k, v)));
            }
            _ => break,
        }
    }
    if chosen.is_empty()
        && let Some((k, v)) = candidates.first()
    {
        chosen.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut absent: Vec<String> = Vec::new();
    while !others.is_empty() {
        let extra = |o: &Vec<String>| -> Vec<String> {
            o.iter()
                .map(|l| split_label(l))
                .filter(|(src, k, _)| *src != "reserved" && *k != NAMESPACE_LABEL)
                .map(|(_, k, _)| k.to_owned())
                .filter(|k| !candidates.iter().any(|(ck, _)| ck == k))
                .collect()
        };
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for o in &others {
            for k in extra(o) {
                *count.entry(k).or_default() += 1;
            }
        }
        let Some((k, _)) = count.into_iter().max_by_key(|(_, n)| *n) else { break };
        others.retain(|o| !extra(o).contains(&k));
        absent.push(k);
    }
    let mut sel = json!({ "matchLabels": chosen });
    if !absent.is_empty() {
        sel["matchExpressions"] =
            absent.into_iter().map(|k| json!({ "key": k, "operator": "DoesNotExist" })).collect();
    }
    sel
}

/// The entity a reserved identity is selected by.
fn entity(id: u32) -> Option<&'static str> {
    Some(match id {
        reserved::HOST => "host",
        reserved::WORLD => "world",
        reserved::HEALTH => "health",
        reserved::REMOTE_NODE => "remote-node",
        reserved::KUBE_APISERVER => "kube-apiserver",
        reserved::INGRESS => "ingress",
        _ => return None,
    })
}

/// The longest prefix among `cidr:` labels.
fn narrowest_cidr(labels: &[String]) -> Option<String> {
    labels
        .iter()
        .filter_map(|l| l.strip_prefix("cidr:"))
        .max_by_key(|c| c.rsplit_once('/').and_then(|(_, n)| n.parse::<u8>().ok()).unwrap_or(0))
        .map(str::to_owned)
}

/// A short DNS-1123 name part for a side: its `app` label, else its
/// entity, else its identity.
fn short(s: Side<'_>) -> String {
    let app = label_value(s.1, "app");
    let raw = match (app, entity(s.0)) {
        (Some(a), _) => a.to_owned(),
        (None, Some(e)) => e.to_owned(),
        (None, None) => format!("id{}", s.0),
    };
    let clean: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.trim_matches('-').chars().take(20).collect()
}

/// The policy document that lets `peer` reach `me` (ingress) or `me`
/// reach `peer` (egress) on `proto`/`port`.
fn allow_document(
    ingress: bool,
    me: Side<'_>,
    peer: Side<'_>,
    proto: &str,
    port: u16,
    ids: &IdView,
) -> Value {
    let ns = namespace_of(me.1);
    let select = smallest_selector(me.0, me.1, ids);
    let peer_rule: (&str, Value) = if let Some(c) = narrowest_cidr(peer.1) {
        (if ingress { "fromCIDR" } else { "toCIDR" }, json!([c]))
    } else if let Some(e) = entity(peer.0) {
        (if ingress { "fromEntities" } else { "toEntities" }, json!([e]))
    } else {
        let mut sel = smallest_selector(peer.0, peer.1, ids);
        let peer_ns = namespace_of(peer.1);
        if let Some(pn) = peer_ns.filter(|pn| Some(*pn) != ns) {
            sel["matchLabels"][format!("k8s:{NAMESPACE_LABEL}")] = json!(pn);
        }
        (if ingress { "fromEndpoints" } else { "toEndpoints" }, json!([sel]))
    };
    let mut rule = serde_json::Map::new();
    rule.insert(peer_rule.0.into(), peer_rule.1);
    match proto {
        "icmp" => {
            rule.insert(
                "icmps".into(),
                json!([{ "fields": [{ "type": port, "family": "IPv4" }] }]),
            );
        }
        p => {
            rule.insert(
                "toPorts".into(),
                json!([{ "ports": [{ "port": port.to_string(), "protocol": p.to_ascii_uppercase() }] }]),
            );
        }
    }
    let (from, to) = if ingress { (peer, me) } else { (me, peer) };
    let name = format!("allow-{}-to-{}-{proto}-{port}", short(from), short(to));
    let (kind, metadata) = match ns {
        Some(n) => ("CiliumNetworkPolicy", json!({ "name": name, "namespace": n })),
        None => ("CiliumClusterwideNetworkPolicy", json!({ "name": name })),
    };
    json!({
        "apiVersion": "cilium.io/v2",
        "kind": kind,
        "metadata": metadata,
        "spec": {
            "endpointSelector": select,
            (if ingress { "ingress" } else { "egress" }): [Value::Object(rule)],
        }
    })
}

/// Explain a trace whose verdict is DENIED (`egress` and `ingress` as the
/// trace decided them).
pub fn explain(
    egress: &DirectionTrace,
    ingress: &DirectionTrace,
    src: Side<'_>,
    dst: Side<'_>,
    proto: &str,
    port: u16,
    ids: &IdView,
) -> Explanation {
    let denied: Vec<(&str, &DirectionTrace)> = [("egress", egress), ("ingress", ingress)]
        .into_iter()
        .filter(|(_, t)| t.verdict == "denied")
        .collect();
    let by_deny = |t: &DirectionTrace| !t.rules.is_empty();
    let because = denied
        .iter()
        .map(|(d, t)| {
            let who = if *d == "ingress" { "the destination" } else { "the source" };
            if t.rules.is_empty() {
                format!("{d} of {who}: {}", t.reason)
            } else {
                format!("{d} of {who}: {} in {}", t.reason, t.rules.join(", "))
            }
        })
        .collect();
    let any_deny_rule = denied.iter().any(|(_, t)| by_deny(t));
    let allow_with = (!any_deny_rule).then(|| {
        denied
            .iter()
            .map(|(d, _)| {
                let doc = if *d == "ingress" {
                    allow_document(true, dst, src, proto, port, ids)
                } else {
                    allow_document(false, src, dst, proto, port, ids)
                };
                serde_yaml_ng::to_string(&doc).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("---\n")
    });
    Explanation {
        denied_at: denied.iter().map(|(d, _)| *d).collect::<Vec<_>>().join(" and "),
        decided_by: if any_deny_rule { "deny rule" } else { "default deny" }.into(),
        because,
        allow_with,
    }
}
