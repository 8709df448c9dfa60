//! Commands answered by the agent: `status`, `endpoint list|get|config`,
//! `identity list|get`, `config`.

use anyhow::Context as _;
use ciliate_api::models::{Endpoint, Identity, Status};
use clap::{Args, Subcommand};

use crate::{
    table::{Output, Table},
    target::Target,
};

#[derive(Args)]
pub struct StatusArgs {
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

pub fn status(t: &Target, a: &StatusArgs) -> anyhow::Result<()> {
    let client = t.client()?;
    let s: Status = client.get("/v1/status").context("asking the agent for its status")?;
    if let Output::Json = a.output {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let rows = [
        ("KVStore", if s.kvstore.is_empty() { "Disabled".to_owned() } else { s.kvstore.clone() }),
        ("Cluster", format!("{} nodes, routing {}", s.cluster_nodes, s.routing)),
        (
            "Cluster health",
            if s.unreachable_nodes.is_empty() {
                format!("{0}/{0} reachable", s.cluster_nodes)
            } else {
                format!(
                    "{}/{} reachable (unreachable: {})",
                    s.cluster_nodes.saturating_sub(s.unreachable_nodes.len()),
                    s.cluster_nodes,
                    s.unreachable_nodes.join(", ")
                )
            },
        ),
        ("Node", s.node.clone()),
        ("Ciliate", format!("Ok   {} (up {}s)", s.version, s.uptime)),
        ("API", client.socket().display().to_string()),
        ("Pod CIDR", format!("{} (router {})", s.pod_cidr, s.router_ip)),
        ("IPAM", format!("IPv4: {}/{} allocated", s.ipam_used, s.ipam_used + s.ipam_free)),
        ("Endpoints", format!("{} ({} restored at start)", s.endpoints, s.restored_endpoints)),
        ("Identities", format!("{} allocated", s.identities)),
        ("BPF maps", s.pin_dir.clone()),
        ("Acceleration", {
            let a = &s.acceleration;
            let on = |b: bool| if b { "Enabled" } else { "Disabled" };
            let np = if a.node_port.is_empty() { "disabled" } else { a.node_port.as_str() };
            let mode = if a.node_port_mode.is_empty() { "snat" } else { &a.node_port_mode };
            format!(
                "XDP prefilter {}, NodePort {np} (mode {mode}), socket-layer (sockops) {}",
                on(a.xdp_prefilter),
                on(a.sockops)
            )
        }),
        (
            "Monitor",
            format!(
                "{} subscribers, {} events, lost {} (ring buffer full), {} (subscribers too slow)",
                s.monitor.subscribers,
                s.monitor.events,
                s.monitor.lost_in_datapath,
                s.monitor.lost_by_subscribers
            ),
        ),
    ];
    for (k, v) in rows {
        println!("{:<16}{v}", format!("{k}:"));
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// All endpoints of the node
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One endpoint, in full (JSON)
    Get { id: u16 },
    /// Show or switch an endpoint's options, as `cilium endpoint config`: Debug=true|false
    /// (its packets' datapath decisions become debug events: `ciliate monitor -v`)
    Config {
        id: u16,
        /// OPTION=VALUE
        options: Vec<String>,
    },
}

/// `Debug=true`-style options: (option, value), checked. Only `Debug` is
/// known; values true/false, enabled/disabled, on/off.
pub fn parse_options(options: &[String]) -> anyhow::Result<Option<bool>> {
    let mut debug = None;
    for o in options {
        let (k, v) = o
            .split_once('=')
            .with_context(|| format!("option {o:?}: OPTION=VALUE (Debug=true)"))?;
        if !k.eq_ignore_ascii_case("debug") {
            anyhow::bail!("option {k:?} is not known: Debug is");
        }
        debug = Some(match v.to_ascii_lowercase().as_str() {
            "true" | "enabled" | "on" => true,
            "false" | "disabled" | "off" => false,
            _ => anyhow::bail!("option {k}={v:?}: true or false"),
        });
    }
    Ok(debug)
}

/// `k8s:app=web` style labels of an endpoint, sorted.
fn endpoint_labels(e: &Endpoint) -> Vec<String> {
    let mut l = ciliate_api::models::label_set(&e.labels);
    if l.is_empty() {
        l.push("no labels".into());
    }
    l
}

impl EndpointCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        match self {
            EndpointCommand::List { output } => {
                let eps: Vec<Endpoint> = client.get("/v1/endpoint").context("listing endpoints")?;
                if let Output::Json = output {
                    println!("{}", serde_json::to_string_pretty(&eps)?);
                    return Ok(());
                }
                let mut tb = Table::new(&[
                    "ENDPOINT",
                    "POLICY (ingress) ENFORCEMENT",
                    "POLICY (egress) ENFORCEMENT",
                    "IDENTITY",
                    "LABELS (source:key[=value])",
                    "IPv6",
                    "IPv4",
                    "STATUS",
                ]);
                for e in &eps {
                    let labels = endpoint_labels(e);
                    tb.row(vec![
                        e.id.to_string(),
                        e.ingress_enforcement.clone(),
                        e.egress_enforcement.clone(),
                        e.identity.to_string(),
                        labels[0].clone(),
                        String::new(),
                        e.ip.to_string(),
                        e.state.clone(),
                    ]);
                    for l in &labels[1..] {
                        let mut row = vec![String::new(); 8];
                        row[4] = l.clone();
                        tb.row(row);
                    }
                }
                print!("{}", tb.render());
            }
            EndpointCommand::Get { id } => {
                let e: Endpoint = client
                    .get(&format!("/v1/endpoint/{id}"))
                    .with_context(|| format!("endpoint {id}"))?;
                println!("{}", serde_json::to_string_pretty(&e)?);
            }
            EndpointCommand::Config { id, options } => {
                let change =
                    ciliate_api::models::EndpointConfigChange { debug: parse_options(&options)? };
                let e: Endpoint = client
                    .call(
                        ciliate_api::client::method::PATCH,
                        &format!("/v1/endpoint/{id}/config"),
                        Some(&change),
                    )
                    .with_context(|| format!("endpoint {id}"))?;
                println!("Debug  {}", if e.debug { "Enabled" } else { "Disabled" });
            }
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct ConfigArgs {
    /// OPTION=VALUE to switch (Debug=true|false: datapath debugging for the whole node);
    /// none: show the options
    options: Vec<String>,
}

/// `ciliate config [Debug=true]`, as `cilium config`.
pub fn config(t: &Target, a: &ConfigArgs) -> anyhow::Result<()> {
    let client = t.client()?;
    let cfg: ciliate_api::models::AgentConfig = if a.options.is_empty() {
        client.get("/v1/config")?
    } else {
        let change = ciliate_api::models::AgentConfigChange { debug: parse_options(&a.options)? };
        client.call(ciliate_api::client::method::PATCH, "/v1/config", Some(&change))?
    };
    println!("{:<22}{}", "Debug", if cfg.debug { "Enabled" } else { "Disabled" });
    println!("{:<22}{}", "MonitorAggregation", cfg.monitor_aggregation);
    Ok(())
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// All identities: reserved ones, then those allocated for labels
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One identity
    Get {
        id: u32,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn print_identities(ids: &[Identity], output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(ids)?);
        return Ok(());
    }
    let mut tb = Table::new(&["ID", "LABELS"]);
    for i in ids {
        for (n, l) in i.labels.iter().enumerate() {
            let id = if n == 0 { i.id.to_string() } else { String::new() };
            tb.row(vec![id, l.clone()]);
        }
    }
    print!("{}", tb.render());
    Ok(())
}

impl IdentityCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        match self {
            IdentityCommand::List { output } => {
                let ids: Vec<Identity> =
                    client.get("/v1/identity").context("listing identities")?;
                print_identities(&ids, output)
            }
            IdentityCommand::Get { id, output } => {
                let i: Identity = client
                    .get(&format!("/v1/identity/{id}"))
                    .with_context(|| format!("identity {id}"))?;
                print_identities(&[i], output)
            }
        }
    }
}
