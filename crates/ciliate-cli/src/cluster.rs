//! `ciliate node list`, `ciliate kvstore get|list` (through the agent), and
//! `ciliate bpf tunnel list` / `bpf nat list` (the maps, read directly).

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use ciliate_api::models::KvPair;
use ciliate_datapath::{maps::IpcacheMap, nodemaps::NatMap};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::{
    bpf::emit,
    table::{Output, proto_name},
    target::Target,
};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// The nodes of the cluster, as registered in the kvstore
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// A node as the agent reports it (`ciliate_agent::cluster::NodeRecord`).
#[derive(Serialize, Deserialize)]
struct NodeRow {
    name: String,
    ip: Ipv4Addr,
    pod_cidr: String,
    routing: String,
    #[serde(default)]
    health_ip: Option<Ipv4Addr>,
}

impl NodeCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let NodeCommand::List { output } = self;
        let nodes: Vec<NodeRow> = t.client()?.get("/v1/node").context("listing nodes")?;
        emit(&nodes, output, &["Name", "IPv4 Address", "Endpoint CIDR", "Routing", "Health"], |n| {
            vec![
                n.name.clone(),
                n.ip.to_string(),
                n.pod_cidr.clone(),
                n.routing.clone(),
                n.health_ip.map(|i| i.to_string()).unwrap_or_default(),
            ]
        })
    }
}

#[derive(Subcommand)]
pub enum KvstoreCommand {
    /// One key
    Get { key: String },
    /// Every key under a prefix (all when none is given)
    List {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

impl KvstoreCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        match self {
            KvstoreCommand::Get { key } => {
                let kv: Vec<KvPair> = client.get(&format!("/v1/kvstore?key={key}"))?;
                for p in kv {
                    println!("{} => {}", p.key, p.value);
                }
            }
            KvstoreCommand::List { prefix, output } => {
                let kv: Vec<KvPair> = client.get(&format!("/v1/kvstore?prefix={prefix}"))?;
                emit(&kv, output, &["KEY", "VALUE"], |p| vec![p.key.clone(), p.value.clone()])?;
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct TunnelRow {
    prefix: String,
    tunnel_endpoint: Ipv4Addr,
}

/// Pod CIDRs of other nodes → their tunnel endpoint (the ipcache's
/// prefixes that carry one), as `cilium bpf tunnel list`.
pub fn tunnel_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows: Vec<TunnelRow> = IpcacheMap::from_pin_dir(dir)?
        .dump()?
        .into_iter()
        .filter(|(_, len, e)| *len < 32 && e.tunnel_endpoint != [0; 4])
        .map(|(ip, len, e)| TunnelRow {
            prefix: format!("{ip}/{len}"),
            tunnel_endpoint: Ipv4Addr::from(e.tunnel_endpoint),
        })
        .collect();
    emit(&rows, output, &["TUNNEL", "VALUE"], |r| {
        vec![r.prefix.clone(), format!("{}:0", r.tunnel_endpoint)]
    })
}

/// The masquerading map, as `cilium bpf nat list`.
pub fn nat_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows = NatMap::from_pin_dir(dir)?.rows()?;
    if let Output::Json = output {
        return emit(&rows, output, &[], |_| vec![]);
    }
    let now = ciliate_datapath::maps::monotonic_secs();
    for r in rows {
        let proto = proto_name(r.proto).unwrap_or("OTHER");
        let what = if r.direction == "OUT" { "XLATE_SRC" } else { "XLATE_DST" };
        println!(
            "{proto} {} {} -> {} {what} {} Created={}sec ago",
            r.direction,
            r.source,
            r.destination,
            r.translated,
            now.saturating_sub(r.created)
        );
    }
    Ok(())
}
