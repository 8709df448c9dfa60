//! The CustomResourceDefinitions of Cilium's cilium.io/v2 kinds the agent
//! and the operator use, generated from the Rust types: a policy's schema
//! is the policy parser's own types (`policy::RuleSpec`), the published
//! objects' are `types.rs`. `deploy/crds.yaml` is this output, checked in
//! (a test fails when it drifts; `CILIATE_REGENERATE=1 cargo test -p
//! ciliate-agent --test manifests` rewrites it).
//!
//! The schemas are made structural, as the API server requires: every
//! subschema inlined and typed (numbers-or-names as
//! `x-kubernetes-int-or-string`), no `additionalProperties: false` (the
//! API server prunes unknown fields rather than refusing them; the
//! agent's parser still refuses a typo it is handed), no defaults (the
//! server would write them into stored objects), formats Kubernetes knows.

use schemars::{JsonSchema, generate::SchemaSettings};
use serde_json::{Map, Value, json};

use super::types::{EndpointStatus, NodeSpec, PolicyStatus};
use crate::policy::RuleSpec;

/// One CRD's names and shape.
#[derive(Clone, Copy, Debug)]
pub struct Crd {
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Has the `/status` subresource.
    pub status: bool,
}

pub const GROUP: &str = "cilium.io";
pub const VERSION: &str = "v2";

pub const CRDS: &[Crd] = &[
    Crd {
        kind: "CiliumNetworkPolicy",
        plural: "ciliumnetworkpolicies",
        singular: "ciliumnetworkpolicy",
        short_names: &["cnp", "ciliumnp"],
        namespaced: true,
        status: true,
    },
    Crd {
        kind: "CiliumClusterwideNetworkPolicy",
        plural: "ciliumclusterwidenetworkpolicies",
        singular: "ciliumclusterwidenetworkpolicy",
        short_names: &["ccnp"],
        namespaced: false,
        status: true,
    },
    Crd {
        kind: "CiliumEndpoint",
        plural: "ciliumendpoints",
        singular: "ciliumendpoint",
        short_names: &["cep", "ciliumep"],
        namespaced: true,
        status: true,
    },
    Crd {
        kind: "CiliumIdentity",
        plural: "ciliumidentities",
        singular: "ciliumidentity",
        short_names: &["ciliumid"],
        namespaced: false,
        status: false,
    },
    Crd {
        kind: "CiliumNode",
        plural: "ciliumnodes",
        singular: "ciliumnode",
        short_names: &["cn", "ciliumn"],
        namespaced: false,
        status: true,
    },
];

/// `T`'s schema, structural (see the module comment).
pub fn schema_of<T: JsonSchema>() -> Value {
    let mut settings = SchemaSettings::openapi3();
    settings.inline_subschemas = true;
    settings.meta_schema = None;
    let mut v = settings.into_generator().into_root_schema_for::<T>().to_value();
    structural(&mut v);
    v
}

/// Formats the API server knows (others would be ignored at best).
const FORMATS: &[&str] = &["int32", "int64", "float", "double", "byte", "date", "date-time"];

/// Make one generated schema (and its subschemas) structural.
fn structural(v: &mut Value) {
    let Value::Object(m) = v else { return };
    for k in ["$schema", "title", "default", "examples", "example", "$defs", "components"] {
        m.remove(k);
    }
    if m.get("additionalProperties") == Some(&Value::Bool(false)) {
        m.remove("additionalProperties");
    }
    if m.get("format").and_then(Value::as_str).is_some_and(|f| !FORMATS.contains(&f)) {
        m.remove("format");
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        props.values_mut().for_each(structural);
    }
    for k in ["items", "additionalProperties"] {
        if let Some(s) = m.get_mut(k) {
            structural(s);
        }
    }
}

fn string() -> Value {
    json!({"type": "string"})
}

/// The object schema with Kubernetes' common fields and `fields`.
fn object(fields: Map<String, Value>, required: &[&str]) -> Value {
    let mut props = Map::new();
    props.insert("apiVersion".into(), string());
    props.insert("kind".into(), string());
    props.insert("metadata".into(), json!({"type": "object"}));
    props.extend(fields);
    let mut o = json!({"type": "object", "properties": props});
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    o
}

/// The schema of `crd`'s objects.
fn schema(crd: &Crd) -> Value {
    let mut f = Map::new();
    let required: &[&str] = match crd.kind {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            // A policy has a spec, a list of them, or both.
            f.insert("spec".into(), schema_of::<RuleSpec>());
            f.insert("specs".into(), json!({"type": "array", "items": schema_of::<RuleSpec>()}));
            f.insert("status".into(), schema_of::<PolicyStatus>());
            &[]
        }
        "CiliumEndpoint" => {
            f.insert("status".into(), schema_of::<EndpointStatus>());
            &[]
        }
        "CiliumIdentity" => {
            f.insert(
                "security-labels".into(),
                json!({"type": "object", "additionalProperties": string()}),
            );
            &["metadata", "security-labels"]
        }
        _ => {
            f.insert("spec".into(), schema_of::<NodeSpec>());
            // What IPAM modes report; the agent writes none of it yet.
            f.insert(
                "status".into(),
                json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            );
            &[]
        }
    };
    object(f, required)
}

/// `crd` as a CustomResourceDefinition object.
pub fn definition(crd: &Crd) -> Value {
    let mut version = json!({
        "name": VERSION, "served": true, "storage": true,
        "schema": {"openAPIV3Schema": schema(crd)},
    });
    if crd.status {
        version["subresources"] = json!({"status": {}});
    }
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{}.{GROUP}", crd.plural)},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": crd.kind, "listKind": format!("{}List", crd.kind),
                "plural": crd.plural, "singular": crd.singular,
                "shortNames": crd.short_names, "categories": ["cilium"],
            },
            "scope": if crd.namespaced { "Namespaced" } else { "Cluster" },
            "versions": [version],
        },
    })
}

/// Every CRD as one YAML stream (what `deploy/crds.yaml` holds).
pub fn manifest() -> String {
    let mut out = String::from(
        "# Cilium's cilium.io/v2 CRDs as Ciliate uses them, generated from the Rust types\n\
         # (crates/ciliate-agent/src/k8s/crds.rs). Do not edit: regenerate with\n\
         # CILIATE_REGENERATE=1 cargo test -p ciliate-agent --test manifests\n",
    );
    for crd in CRDS {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&definition(crd)).unwrap_or_default());
    }
    out
}
