//! `ciliate service update|list|get|delete` (through the agent) and
//! `ciliate bpf lb list|maglev list` (the maps, read directly), as
//! `cilium service ...` and `cilium bpf lb ...`.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use ciliate_api::{
    client::method,
    models::{BackendSpec, BackendState, L4Addr, LbAlgorithm, Service, ServiceKind, ServiceSpec},
};
use ciliate_common::lb;
use ciliate_datapath::lbmaps::LbMaps;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{
    bpf::emit,
    table::{Output, proto_name},
    target::Target,
};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create or replace a service (one frontend and its backends)
    Update(UpdateArgs),
    /// All services
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One service
    Get {
        id: u16,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a service (or all with --all)
    Delete {
        id: Option<u16>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

#[derive(Args)]
pub struct UpdateArgs {
    /// Service ID (1-65535)
    #[arg(long)]
    id: u16,
    /// Frontend IP:port[/TCP|UDP]; 0.0.0.0 for a NodePort or HostPort on every node address
    #[arg(long)]
    frontend: L4Addr,
    /// Backends IP:port,... (their protocol is the frontend's)
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Backend states, in the order of --backends: active, terminating, quarantined,
    /// maintenance
    #[arg(long, value_delimiter = ',')]
    states: Vec<String>,
    /// A NodePort frontend
    #[arg(long, group = "kind")]
    k8s_node_port: bool,
    /// An ExternalIPs frontend
    #[arg(long, group = "kind")]
    k8s_external: bool,
    /// A LoadBalancer frontend
    #[arg(long, group = "kind")]
    k8s_load_balancer: bool,
    /// A HostPort frontend
    #[arg(long, group = "kind")]
    k8s_host_port: bool,
    /// A ClusterIP frontend (the default)
    #[arg(long, group = "kind")]
    k8s_cluster_internal: bool,
    /// externalTrafficPolicy / internalTrafficPolicy: Cluster or Local
    #[arg(long, default_value = "Cluster")]
    k8s_traffic_policy: String,
    /// sessionAffinity ClientIP with this timeout in seconds
    #[arg(long)]
    affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges: CIDR,...
    #[arg(long, value_delimiter = ',')]
    source_ranges: Vec<String>,
    /// Backend selection: random or maglev (default: the agent's)
    #[arg(long)]
    lb_algorithm: Option<String>,
    /// namespace/name, for display
    #[arg(long, default_value = "")]
    name: String,
}

fn parse_state(s: &str) -> anyhow::Result<BackendState> {
    Ok(match s {
        "active" => BackendState::Active,
        "terminating" => BackendState::Terminating,
        "quarantined" => BackendState::Quarantined,
        "maintenance" => BackendState::Maintenance,
        other => anyhow::bail!(
            "backend state {other:?}: active, terminating, quarantined or maintenance"
        ),
    })
}

impl UpdateArgs {
    fn spec(&self) -> anyhow::Result<ServiceSpec> {
        if !self.states.is_empty() && self.states.len() != self.backends.len() {
            anyhow::bail!(
                "{} states for {} backends: give one state per backend",
                self.states.len(),
                self.backends.len()
            );
        }
        let mut backends = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            let a: L4Addr = b.parse().map_err(|e: String| anyhow::anyhow!("backend {e}"))?;
            let state = match self.states.get(i) {
                Some(s) => parse_state(s)?,
                None => BackendState::Active,
            };
            backends.push(BackendSpec { ip: a.ip, port: a.port, state });
        }
        let kind = if self.k8s_node_port {
            ServiceKind::NodePort
        } else if self.k8s_external {
            ServiceKind::ExternalIPs
        } else if self.k8s_load_balancer {
            ServiceKind::LoadBalancer
        } else if self.k8s_host_port {
            ServiceKind::HostPort
        } else {
            ServiceKind::ClusterIP
        };
        let traffic_policy_local = match self.k8s_traffic_policy.as_str() {
            "Local" => true,
            "Cluster" => false,
            other => anyhow::bail!("traffic policy {other:?}: Cluster or Local"),
        };
        let algorithm = match self.lb_algorithm.as_deref() {
            None => None,
            Some("random") => Some(LbAlgorithm::Random),
            Some("maglev") => Some(LbAlgorithm::Maglev),
            Some(other) => anyhow::bail!("lb algorithm {other:?}: random or maglev"),
        };
        Ok(ServiceSpec {
            id: self.id,
            frontend: self.frontend,
            kind,
            backends,
            affinity_timeout: self.affinity_timeout,
            traffic_policy_local,
            source_ranges: self.source_ranges.clone(),
            algorithm,
            name: self.name.clone(),
            source: Default::default(),
        })
    }
}

fn print_services(svcs: &[Service], output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(svcs)?);
        return Ok(());
    }
    println!("{:<5}{:<26}{:<14}BACKEND", "ID", "FRONTEND", "SERVICE TYPE");
    for s in svcs {
        let fes: Vec<String> = s.frontends.iter().map(|f| f.address.to_string()).collect();
        let mut kind = s.spec.kind.name().to_owned();
        if s.spec.traffic_policy_local {
            kind.push_str(" Local");
        }
        let lines: Vec<String> = s
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!(
                    "{} => {}:{}/{:?} ({})",
                    i + 1,
                    b.ip,
                    b.port,
                    s.spec.frontend.protocol,
                    b.state.name()
                )
            })
            .collect();
        let rows = fes.len().max(lines.len()).max(1);
        for i in 0..rows {
            let id = if i == 0 { s.spec.id.to_string() } else { String::new() };
            let k = if i == 0 { kind.as_str() } else { "" };
            println!(
                "{:<5}{:<26}{:<14}{}",
                id,
                fes.get(i).map(String::as_str).unwrap_or(""),
                k,
                lines.get(i).map(String::as_str).unwrap_or("")
            );
        }
    }
    Ok(())
}

impl ServiceCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        match self {
            ServiceCommand::Update(a) => {
                let spec = a.spec()?;
                let s: Service = client
                    .call(method::PUT, "/v1/service", Some(&spec))
                    .with_context(|| format!("updating service {}", spec.id))?;
                let fes: Vec<String> = s.frontends.iter().map(|f| f.address.to_string()).collect();
                println!("Updated service {} with frontends {}", s.spec.id, fes.join(", "));
                Ok(())
            }
            ServiceCommand::List { output } => {
                let svcs: Vec<Service> = client.get("/v1/service").context("listing services")?;
                print_services(&svcs, output)
            }
            ServiceCommand::Get { id, output } => {
                let s: Service = client.get(&format!("/v1/service/{id}"))?;
                print_services(&[s], output)
            }
            ServiceCommand::Delete { id, all } => {
                let ids: Vec<u16> = match (id, all) {
                    (Some(id), _) => vec![id],
                    (None, true) => {
                        let svcs: Vec<Service> = client.get("/v1/service")?;
                        svcs.iter().map(|s| s.spec.id).collect()
                    }
                    (None, false) => anyhow::bail!("give a service ID or --all"),
                };
                for id in ids {
                    let _: Service =
                        client.call(method::DELETE, &format!("/v1/service/{id}"), None::<&()>)?;
                    println!("Deleted service {id}");
                }
                Ok(())
            }
        }
    }
}

#[derive(Subcommand)]
pub enum LbCommand {
    /// Frontends and their backend slots
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Maglev lookup tables
    #[command(subcommand)]
    Maglev(MaglevCommand),
}

#[derive(Subcommand)]
pub enum MaglevCommand {
    /// Each frontend's table: entries per backend and the first entries
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Serialize)]
struct SlotRow {
    frontend: String,
    slot: u16,
    backend_id: u32,
    backend: String,
    rev_nat_index: u16,
    flags: String,
}

fn flag_names(flags: u16) -> String {
    let names: Vec<&str> = [
        (lb::SVC_F_CLUSTER_IP, "ClusterIP"),
        (lb::SVC_F_NODE_PORT, "NodePort"),
        (lb::SVC_F_EXTERNAL_IP, "ExternalIPs"),
        (lb::SVC_F_LOAD_BALANCER, "LoadBalancer"),
        (lb::SVC_F_HOST_PORT, "HostPort"),
        (lb::SVC_F_AFFINITY, "sessionAffinity"),
        (lb::SVC_F_SRC_RANGES, "check source-range"),
        (lb::SVC_F_MAGLEV, "Maglev"),
        (lb::SVC_F_LOCAL, "Local"),
    ]
    .iter()
    .filter(|(b, _)| flags & b != 0)
    .map(|(_, n)| *n)
    .collect();
    names.join(", ")
}

impl LbCommand {
    pub fn run(self, dir: &Path) -> anyhow::Result<()> {
        let maps = LbMaps::from_pin_dir(dir)
            .with_context(|| format!("opening the service maps of {}", dir.display()))?;
        match self {
            LbCommand::List { output } => lb_list(&maps, output),
            LbCommand::Maglev(MaglevCommand::List { output }) => maglev_list(&maps, output),
        }
    }
}

fn lb_list(maps: &LbMaps, output: Output) -> anyhow::Result<()> {
    let backends = maps.backends()?;
    let mut rows = Vec::new();
    for (fe, e) in maps.frontends()? {
        let addr = format!("{}:{}/{}", fe.addr, fe.port, proto_name(fe.proto).unwrap_or("?"));
        rows.push(SlotRow {
            frontend: addr.clone(),
            slot: 0,
            backend_id: 0,
            backend: "0.0.0.0:0".into(),
            rev_nat_index: e.master.rev_nat_index,
            flags: flag_names(e.master.flags),
        });
        for (i, id) in e.slots.iter().enumerate() {
            let b = backends
                .get(id)
                .map(|b| format!("{}:{}/{}", b.addr, b.port, proto_name(b.proto).unwrap_or("?")))
                .unwrap_or_else(|| format!("backend {id} missing"));
            rows.push(SlotRow {
                frontend: addr.clone(),
                slot: i as u16 + 1,
                backend_id: *id,
                backend: b,
                rev_nat_index: e.master.rev_nat_index,
                flags: String::new(),
            });
        }
    }
    emit(&rows, output, &["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"], |r| {
        let fe = if r.slot == 0 { r.frontend.clone() } else { String::new() };
        let flags = if r.slot == 0 { format!(" [{}]", r.flags) } else { String::new() };
        vec![fe, format!("{} ({}) ({}){flags}", r.backend, r.rev_nat_index, r.slot)]
    })
}

#[derive(Serialize)]
struct MaglevRow {
    rev_nat_index: u16,
    entries_per_backend: BTreeMap<u32, usize>,
    first: Vec<u32>,
}

fn maglev_list(maps: &LbMaps, output: Output) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for idx in maps.maglev_indexes()? {
        let Some(t) = maps.maglev(idx)? else { continue };
        let mut per = BTreeMap::new();
        for id in &t {
            *per.entry(*id).or_insert(0) += 1;
        }
        rows.push(MaglevRow {
            rev_nat_index: idx,
            entries_per_backend: per,
            first: t[..16].to_vec(),
        });
    }
    emit(
        &rows,
        output,
        &["SVC ID (REVNAT)", "BACKEND ID: ENTRIES", "LOOKUP TABLE (first 16)"],
        |r| {
            let per: Vec<String> =
                r.entries_per_backend.iter().map(|(id, n)| format!("{id}: {n}")).collect();
            let first: Vec<String> = r.first.iter().map(u32::to_string).collect();
            vec![r.rev_nat_index.to_string(), per.join(", "), format!("[{} ...]", first.join(" "))]
        },
    )
}
