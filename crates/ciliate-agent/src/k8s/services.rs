//! Services from the Kubernetes API (kube-proxy replacement: Cilium's
//! Service and EndpointSlice watchers): every Service and EndpointSlice
//! reflected, and after every change the services the datapath serves made
//! what the API says, writing only what differs:
//! - one service per frontend and port: the ClusterIP, a NodePort
//!   (0.0.0.0:nodePort, every node address) for NodePort and LoadBalancer
//!   Services, each LoadBalancer ingress IP (with
//!   `loadBalancerSourceRanges`) and each external IP;
//! - backends from the Service's EndpointSlices (`kubernetes.io/service-name`),
//!   the slice's port of the Service port's name (so named target ports
//!   come resolved): ready endpoints active, serving-but-terminating ones
//!   `terminating` (kept for the flows they have, given no new ones),
//!   others left out;
//! - `sessionAffinity: ClientIP` with its timeout (default 10800 s),
//!   `internalTrafficPolicy: Local` on the ClusterIP,
//!   `externalTrafficPolicy: Local` on the others;
//! - headless and ExternalName Services are not served.
//!
//! These services carry source "k8s": the agent's API refuses to replace
//! or delete them (the API server owns them). Their IDs are taken from
//! the top of the ID space down, and kept while the frontend stays.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ciliate_api::models::{BackendSpec, BackendState, L4Addr, Protocol, ServiceKind, ServiceSpec};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::mpsc;

use crate::{api::AppState, endpoint::Datapath};

/// The source of the services derived here.
pub const SOURCE: &str = "k8s";

/// Cilium's (and Kubernetes') default ClientIP affinity timeout.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::TCP),
        "UDP" => Some(Protocol::UDP),
        _ => None,
    }
}

/// The backends of Service port (`name`, `proto`) in `slices`.
fn backends(slices: &[Arc<EndpointSlice>], name: &str, proto: Protocol) -> Vec<BackendSpec> {
    let mut out: BTreeMap<(std::net::Ipv4Addr, u16), BackendState> = BTreeMap::new();
    for s in slices.iter().filter(|s| s.address_type == "IPv4") {
        let Some(port) = s.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == name
                && protocol(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else { continue };
        for e in &s.endpoints {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if ready && !terminating {
                BackendState::Active
            } else if serving && terminating {
                BackendState::Terminating
            } else {
                continue;
            };
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    // One address in two slices: the better state wins.
                    let s = out.entry((ip, port)).or_insert(state);
                    if state == BackendState::Active {
                        *s = state;
                    }
                }
            }
        }
    }
    out.into_iter().map(|((ip, port), state)| BackendSpec { ip, port, state }).collect()
}

/// The services (without IDs) a Service and its slices stand for.
pub fn desired(svc: &Service, slices: &[Arc<EndpointSlice>]) -> Vec<ServiceSpec> {
    let Some(spec) = &svc.spec else { return vec![] };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if kind == "ExternalName" || cluster_ip == "None" {
        return vec![];
    }
    let name = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    );
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let lb_ips: Vec<std::net::Ipv4Addr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect();
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(proto) = protocol(p.protocol.as_deref()) else { continue };
        let Ok(port) = u16::try_from(p.port) else { continue };
        let backends = backends(slices, p.name.as_deref().unwrap_or(""), proto);
        let make = |ip: std::net::Ipv4Addr,
                    port: u16,
                    kind: ServiceKind,
                    local: bool,
                    ranges: Vec<String>| ServiceSpec {
            id: 0,
            frontend: L4Addr { ip, port, protocol: proto },
            kind,
            backends: backends.clone(),
            affinity_timeout: affinity,
            traffic_policy_local: local,
            source_ranges: ranges,
            algorithm: None,
            name: name.clone(),
            source: SOURCE.into(),
        };
        if let Ok(ip) = cluster_ip.parse() {
            out.push(make(ip, port, ServiceKind::ClusterIP, internal_local, vec![]));
        }
        if (kind == "NodePort" || kind == "LoadBalancer")
            && let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok())
        {
            out.push(make(
                std::net::Ipv4Addr::UNSPECIFIED,
                np,
                ServiceKind::NodePort,
                external_local,
                vec![],
            ));
        }
        if kind == "LoadBalancer" {
            let ranges = spec.load_balancer_source_ranges.clone().unwrap_or_default();
            for ip in &lb_ips {
                out.push(make(
                    *ip,
                    port,
                    ServiceKind::LoadBalancer,
                    external_local,
                    ranges.clone(),
                ));
            }
        }
        for ip in spec.external_ips.iter().flatten().filter_map(|i| i.parse().ok()) {
            out.push(make(ip, port, ServiceKind::ExternalIPs, external_local, vec![]));
        }
    }
    out
}

/// A service's identity across changes: its Service, kind and frontend.
fn key(s: &ServiceSpec) -> (String, &'static str, String) {
    (s.name.clone(), s.kind.name(), s.frontend.to_string())
}

/// Make the agent's "k8s" services what the stores say. Errors name the
/// Service; the others still go in.
async fn reconcile<D: Datapath + 'static>(
    st: &AppState<D>,
    svcs: &reflector::Store<Service>,
    slices: &reflector::Store<EndpointSlice>,
) {
    let mut by_service: BTreeMap<(String, String), Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for s in slices.state() {
        let owner =
            s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).cloned();
        if let Some(owner) = owner {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            by_service.entry((ns, owner)).or_default().push(s);
        }
    }
    let mut want: BTreeMap<(String, &'static str, String), ServiceSpec> = BTreeMap::new();
    for svc in svcs.state() {
        let k = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        for s in desired(&svc, by_service.get(&k).map(Vec::as_slice).unwrap_or(&[])) {
            want.insert(key(&s), s);
        }
    }
    let now = st.services.snapshot();
    let have: BTreeMap<(String, &'static str, String), ServiceSpec> = now
        .values()
        .filter(|s| s.spec.source == SOURCE)
        .map(|s| (key(&s.spec), s.spec.clone()))
        .collect();
    let mut used: BTreeSet<u16> = now.keys().copied().collect();
    let mut next_free = || {
        let id = (1..=u16::MAX).rev().find(|i| !used.contains(i))?;
        used.insert(id);
        Some(id)
    };
    let local = crate::api::local_ips(&st.endpoints.snapshot());
    for (k, mut spec) in want.clone() {
        spec.id = match have.get(&k) {
            Some(h) => {
                let mut same = spec.clone();
                same.id = h.id;
                if same == *h {
                    continue;
                }
                h.id
            }
            None => match next_free() {
                Some(id) => id,
                None => {
                    tracing::warn!(subsystem = "k8s", service = %spec.name, "no free service ID");
                    continue;
                }
            },
        };
        let (name, fe) = (spec.name.clone(), spec.frontend);
        let local = local.clone();
        match st.services.write(move |s| s.update(spec, &local), |s| s.view()).await {
            Ok(Ok(_)) => {
                tracing::debug!(subsystem = "k8s", service = %name, frontend = %fe, "service from the API in force")
            }
            Ok(Err(e)) => {
                tracing::warn!(subsystem = "k8s", service = %name, frontend = %fe, error = %e, "service from the API refused")
            }
            Err(e) => {
                tracing::warn!(subsystem = "k8s", service = %name, error = %e, "service from the API")
            }
        }
    }
    for (k, h) in have {
        if want.contains_key(&k) {
            continue;
        }
        let (id, name) = (h.id, h.name.clone());
        if let Ok(Err(e)) = st.services.write(move |s| s.delete(id), |s| s.view()).await {
            tracing::warn!(subsystem = "k8s", service = %name, error = %e, "removing a service gone from the API");
        }
    }
}

/// Follow Services and EndpointSlices (every namespace) into the
/// datapath's services until the watches end.
pub async fn follow_services<D: Datapath + 'static>(st: Arc<AppState<D>>, client: Client) {
    let (svcs, svc_w) = reflector::store::<Service>();
    let (slices, slice_w) = reflector::store::<EndpointSlice>();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let svc_tx = tx.clone();
    tokio::spawn(
        reflector(svc_w, watcher(Api::<Service>::all(client.clone()), watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .for_each(move |r| {
                match r {
                    Ok(_) => {
                        let _ = svc_tx.send(());
                    }
                    Err(e) => tracing::warn!(subsystem = "k8s", error = %e, "watching services"),
                }
                async {}
            }),
    );
    tokio::spawn(
        reflector(slice_w, watcher(Api::<EndpointSlice>::all(client), watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .for_each(move |r| {
                match r {
                    Ok(_) => {
                        let _ = tx.send(());
                    }
                    Err(e) => {
                        tracing::warn!(subsystem = "k8s", error = %e, "watching endpoint slices")
                    }
                }
                async {}
            }),
    );
    // Nothing is removed before both lists are in (a restarted agent keeps
    // serving what it restored meanwhile).
    if svcs.wait_until_ready().await.is_err() || slices.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        reconcile(&st, &svcs, &slices).await;
        if rx.recv().await.is_none() {
            return;
        }
        // A burst of changes is one pass.
        while rx.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(ports: serde_json::Value, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "s", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_service_and_its_slices_become_frontends_with_backends() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.7"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080, "targetPort": "web"},
                          {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                          {"name": "sctp", "port": 9, "protocol": "SCTP"}],
                "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local",
                "loadBalancerSourceRanges": ["198.51.100.0/24"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}
        }))
        .unwrap();
        let slices = vec![slice(
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.0.0.4"]}
            ]),
        )];
        let got = desired(&svc, &slices);
        let fes: Vec<String> =
            got.iter().map(|s| format!("{} {}", s.kind.name(), s.frontend)).collect();
        assert_eq!(
            fes,
            [
                "ClusterIP 10.96.0.10:80/TCP",
                "NodePort 0.0.0.0:30080/TCP",
                "LoadBalancer 203.0.113.5:80/TCP",
                "ExternalIPs 192.0.2.7:80/TCP",
                "ClusterIP 10.96.0.10:53/UDP",
                "NodePort 0.0.0.0:30053/UDP",
                "LoadBalancer 203.0.113.5:53/UDP",
                "ExternalIPs 192.0.2.7:53/UDP",
            ],
            "SCTP is not served"
        );
        let http = &got[0];
        // The named target port comes resolved in the slice; a terminating
        // but serving endpoint stays (for its flows), the others go.
        let b: Vec<String> = http
            .backends
            .iter()
            .map(|b| format!("{}:{} {}", b.ip, b.port, b.state.name()))
            .collect();
        assert_eq!(
            b,
            ["10.0.0.1:8080 active", "10.0.0.2:8080 terminating", "10.0.0.4:8080 active"]
        );
        assert_eq!(got[4].backends[0].port, 5353);
        assert_eq!(http.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert!(!http.traffic_policy_local, "internalTrafficPolicy is Cluster");
        assert!(
            got[1].traffic_policy_local && got[2].traffic_policy_local,
            "externalTrafficPolicy Local"
        );
        assert_eq!(got[2].source_ranges, ["198.51.100.0/24"]);
        assert!(got.iter().all(|s| s.name == "shop/web" && s.source == SOURCE));
        // Headless and ExternalName: nothing.
        let mut headless = svc.clone();
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        headless.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(desired(&headless, &slices).is_empty());
        let mut ext = svc.clone();
        ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(desired(&ext, &slices).is_empty());
    }
}
