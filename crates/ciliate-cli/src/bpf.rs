//! `ciliate bpf ...`: read the datapath's pinned BPF maps.

use std::path::PathBuf;

use anyhow::Context as _;
use ciliate_common::{drop, metrics};
use ciliate_datapath::maps::MetricsMap;
use ciliate_lab::node;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{
    lab::{DEFAULT_LAB, Output},
    table::Table,
};

#[derive(Subcommand)]
pub enum BpfCommand {
    /// Datapath metrics
    #[command(subcommand)]
    Metrics(MetricsCommand),
}

#[derive(Subcommand)]
pub enum MetricsCommand {
    /// Packets and bytes per reason and direction (reason "Success" = forwarded)
    List {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// Which node's maps to read.
#[derive(Args)]
pub struct NodeArgs {
    /// The node's pin directory (default: the node of --lab)
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Read the node of this lab
    #[arg(long, default_value = DEFAULT_LAB)]
    lab: String,
}

impl NodeArgs {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.pin_dir {
            return Ok(d.clone());
        }
        let state = node::load_state(&self.lab)?
            .with_context(|| format!("no lab named {} is up; pass --pin-dir", self.lab))?;
        Ok(state.pins_dir)
    }
}

impl BpfCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            BpfCommand::Metrics(MetricsCommand::List { node, output }) => {
                metrics_list(&node, output)
            }
        }
    }
}

#[derive(Serialize)]
struct MetricRow {
    reason: u8,
    reason_text: &'static str,
    direction: &'static str,
    packets: u64,
    bytes: u64,
}

fn metrics_list(node: &NodeArgs, output: Output) -> anyhow::Result<()> {
    let dir = node.dir()?;
    let map = MetricsMap::from_pin_dir(&dir)
        .with_context(|| format!("reading metrics of {}", dir.display()))?;
    let rows: Vec<MetricRow> = map
        .dump()?
        .into_iter()
        .map(|(k, v)| MetricRow {
            reason: k.reason,
            reason_text: drop::reason_name(k.reason),
            direction: metrics::dir_name(k.dir),
            packets: v.packets,
            bytes: v.bytes,
        })
        .collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => {
            let mut t = Table::new(&["REASON", "DIRECTION", "PACKETS", "BYTES"]);
            for r in rows {
                t.row(vec![
                    r.reason_text.into(),
                    r.direction.into(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}
