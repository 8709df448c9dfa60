//! The checked-in Kubernetes manifests (`deploy/`): the CRDs are what the
//! Rust types generate, structural as the API server requires, named as
//! the test API server serves them, and they keep every field of a
//! policy the parser takes (the API server silently prunes what a schema
//! does not know: a field missing there would change a policy's meaning).

use std::path::PathBuf;

use ciliate_agent::k8s::crds::{CRDS, GROUP, VERSION, definition, manifest};
use serde_json::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn crds_yaml_is_what_the_types_generate() {
    let path = deploy().join("crds.yaml");
    let want = manifest();
    if std::env::var_os("CILIATE_REGENERATE").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is not what the types generate: CILIATE_REGENERATE=1 cargo test -p ciliate-agent --test manifests",
        path.display()
    );
    assert_eq!(yaml_docs(&have).len(), CRDS.len());
}

/// Kubernetes' structural schema rules, as far as the generator could
/// break them: `path` is where.
fn check_structural(s: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(m) = s.as_object() else {
        errs.push(format!("{path}: not a schema object"));
        return;
    };
    let special = m.contains_key("x-kubernetes-int-or-string")
        || m.contains_key("x-kubernetes-preserve-unknown-fields");
    if !special && !m.get("type").is_some_and(Value::is_string) {
        errs.push(format!("{path}: no single type"));
    }
    for k in ["$ref", "anyOf", "oneOf", "allOf", "not", "default", "$schema", "definitions"] {
        if m.contains_key(k) {
            errs.push(format!("{path}: {k}"));
        }
    }
    if m.contains_key("properties") && m.contains_key("additionalProperties") {
        errs.push(format!("{path}: properties and additionalProperties"));
    }
    if let Some(f) = m.get("format").and_then(Value::as_str)
        && !["int32", "int64", "float", "double", "byte", "date", "date-time"].contains(&f)
    {
        errs.push(format!("{path}: format {f}"));
    }
    if let Some(p) = m.get("properties").and_then(Value::as_object) {
        for (k, v) in p {
            check_structural(v, &format!("{path}.{k}"), errs);
        }
    }
    if let Some(i) = m.get("items") {
        check_structural(i, &format!("{path}[]"), errs);
    }
    if let Some(a) = m.get("additionalProperties") {
        check_structural(a, &format!("{path}.*"), errs);
    }
}

#[test]
fn every_crd_schema_is_structural_and_metadata_is_left_to_the_server() {
    let mut errs = Vec::new();
    for crd in CRDS {
        let d = definition(crd);
        let s = &d["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        check_structural(s, crd.kind, &mut errs);
        assert_eq!(s["properties"]["metadata"], serde_json::json!({"type": "object"}));
    }
    assert!(errs.is_empty(), "{errs:#?}");
    // The checker catches what it is for.
    let mut found = Vec::new();
    check_structural(
        &serde_json::json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]},
            "b": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}}}),
        "t",
        &mut found,
    );
    assert_eq!(found.len(), 3, "{found:?}");
}

#[test]
fn the_crds_are_named_as_the_test_api_server_serves_them() {
    for crd in CRDS {
        let r = ciliate_apiserver::resources::RESOURCES
            .iter()
            .find(|r| r.group == GROUP && r.version == VERSION && r.plural == crd.plural)
            .unwrap_or_else(|| panic!("the test API server lacks {}", crd.plural));
        assert_eq!(
            (r.kind, r.singular, r.namespaced, r.status, r.short),
            (crd.kind, crd.singular, crd.namespaced, crd.status, crd.short_names),
            "{}",
            crd.plural
        );
        let d = definition(crd);
        assert_eq!(d["metadata"]["name"], format!("{}.{GROUP}", crd.plural));
        assert_eq!(d["spec"]["scope"], if crd.namespaced { "Namespaced" } else { "Cluster" });
    }
}

/// What the API server would do with `v` under schema `s`: the fields it
/// would prune (not in the schema) and the values of the wrong type.
fn prune(s: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(v.is_i64() || v.is_u64() || v.is_string()) {
            errs.push(format!("{path}: {v} is not a number or a string"));
        }
        return;
    }
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errs.push(format!("{path}: null"));
        }
        return;
    }
    let ok = match s["type"].as_str() {
        Some("object") => {
            if let Some(o) = v.as_object() {
                for (k, x) in o {
                    let p = format!("{path}.{k}");
                    if k == "metadata" && !path.contains('.') {
                        continue; // ObjectMeta: the server's own, never pruned
                    }
                    match (s["properties"].get(k), s.get("additionalProperties")) {
                        (Some(sub), _) | (None, Some(sub)) => prune(sub, x, &p, errs),
                        (None, None) => errs.push(format!("{p}: pruned (not in the schema)")),
                    }
                }
                for r in s["required"].as_array().into_iter().flatten() {
                    if !o.contains_key(r.as_str().unwrap_or_default()) {
                        errs.push(format!("{path}: {r} required"));
                    }
                }
                true
            } else {
                false
            }
        }
        Some("array") => {
            for (i, x) in v.as_array().into_iter().flatten().enumerate() {
                prune(&s["items"], x, &format!("{path}[{i}]"), errs);
            }
            v.is_array()
        }
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        other => {
            errs.push(format!("{path}: schema type {other:?}"));
            true
        }
    };
    if !ok {
        errs.push(format!("{path}: {v} is not of type {}", s["type"]));
    }
}

fn crd_schema(kind: &str) -> Option<Value> {
    let crd = CRDS.iter().find(|c| c.kind == kind)?;
    Some(definition(crd)["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
}

#[test]
fn example_policies_parse_and_lose_nothing_to_the_crd_schemas() {
    let dir = deploy().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        ciliate_agent::policy::parse(&text)
            .unwrap_or_else(|e| panic!("{}: the parser refuses it: {e}", path.display()));
        for doc in yaml_docs(&text) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let Some(schema) = crd_schema(&kind) else { continue };
            let mut errs = Vec::new();
            prune(&schema, &doc, &kind, &mut errs);
            assert!(errs.is_empty(), "{}: {errs:#?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 3, "the examples hold CNPs and a CCNP ({checked} checked)");
    // A field the schema lacks is caught (a typo the API server would
    // drop; the parser refuses it too).
    let cnp = crd_schema("CiliumNetworkPolicy").unwrap();
    let doc: Value = serde_json::json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "x"}, "spec": {"endpointSelector": {}, "ingres": [],
        "egress": [{"toPorts": [{"ports": [{"port": true}]}]}]}});
    let mut errs = Vec::new();
    prune(&cnp, &doc, "CNP", &mut errs);
    assert_eq!(
        errs,
        [
            "CNP.spec.egress[0].toPorts[0].ports[0].port: true is not a number or a string",
            "CNP.spec.ingres: pruned (not in the schema)"
        ]
    );
}

#[test]
fn what_the_agent_publishes_fits_its_crds() {
    use ciliate_agent::{cluster::NodeRecord, k8s::publish};
    let ep: ciliate_api::models::Endpoint = serde_json::from_value(serde_json::json!({
        "id": 7, "container_id": "c1", "netns": "/run/netns/x", "ifname": "eth0",
        "host_ifname": "lxc1", "host_ifindex": 9, "host_mac": "02:00:00:00:00:01",
        "ip": "10.200.0.9", "mac": "02:00:00:00:00:02", "pod_name": "shop/api-1",
        "labels": {"k8s:app": "api"}, "identity": 300, "state": "ready",
        "ingress_enforcement": "Enabled", "egress_enforcement": "Disabled",
    }))
    .unwrap_or_else(|e| panic!("an endpoint: {e}"));
    let cep = serde_json::json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": {"name": "api-1"}, "status": publish::endpoint_status(&ep, Some("192.168.0.2".parse().unwrap()))});
    let node = publish::node_object(
        &NodeRecord {
            name: "n1".into(),
            ip: "192.168.0.2".parse().unwrap(),
            pod_cidr: "10.200.0.0/24".into(),
            routing: ciliate_agent::cluster::Routing::Tunnel,
            health_ip: Some("10.200.0.2".parse().unwrap()),
        },
        Some("10.200.0.1".parse().unwrap()),
    );
    for (kind, doc) in [("CiliumEndpoint", cep), ("CiliumNode", node)] {
        let mut errs = Vec::new();
        prune(&crd_schema(kind).unwrap(), &doc, kind, &mut errs);
        assert!(errs.is_empty(), "{doc}: {errs:#?}");
    }
}

fn manifest_docs() -> Vec<Value> {
    yaml_docs(&std::fs::read_to_string(deploy().join("ciliate.yaml")).unwrap())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/ciliate.yaml has no {kind} {name}"))
}

fn args_of(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_deployment_manifest_gives_the_binaries_what_they_take() {
    use clap::Parser as _;
    let docs = manifest_docs();
    // The agent: its flags and the ConfigMap's config file resolve (in the
    // cluster the in-cluster configuration stands for the kubeconfig).
    let ds = find(&docs, "DaemonSet", "ciliate");
    let mut flags = ciliate_agent::config::Flags::try_parse_from(
        std::iter::once("ciliate-agent".to_string()).chain(args_of(ds)),
    )
    .unwrap_or_else(|e| panic!("the DaemonSet's agent arguments: {e}"));
    flags.config = None;
    flags.k8s_kubeconfig_path = Some("/in-cluster".into());
    let cm = find(&docs, "ConfigMap", "ciliate-config");
    let cfg = flags
        .resolve_text(cm["data"]["config.json"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the ConfigMap's config.json: {e}"));
    assert!(cfg.crd_mode);
    assert_eq!(cfg.ipam, ciliate_agent::k8s::ipam::IpamMode::ClusterPool);
    assert_eq!(ds["spec"]["template"]["spec"]["serviceAccountName"], "ciliate");
    // The CNI configuration the init container writes names the agent's
    // socket.
    let install =
        ds["spec"]["template"]["spec"]["initContainers"][0]["command"][2].as_str().unwrap();
    assert!(
        install.contains(r#""agent_socket": "/run/ciliate/agent.sock""#)
            && args_of(ds).contains(&"--socket=/run/ciliate/agent.sock".to_string()),
        "{install}"
    );
    // The operator: its arguments parse (it then fails on the missing
    // kubeconfig, not on an argument).
    let op = find(&docs, "Deployment", "ciliate-operator");
    assert_eq!(op["spec"]["template"]["spec"]["serviceAccountName"], "ciliate-operator");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ciliate-operator"))
        .args(args_of(op).iter().map(|a| a.replace("$(POD_NAME)", "op-0")))
        .args(["--k8s-kubeconfig-path", "/nonexistent/kubeconfig"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Kubernetes configuration"), "{err}");
}
