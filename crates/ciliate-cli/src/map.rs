//! `ciliate map list|get`: the node's pinned BPF maps by name.

use std::path::Path;

use anyhow::Context as _;
use ciliate_common::{ct, endpoint, ipcache, metrics};
use ciliate_datapath::maps::{CtMaps, IpcacheMap, LxcMap, MetricsMap};
use clap::Subcommand;
use serde::Serialize;

use crate::{
    bpf,
    table::{Output, Table},
    target::Target,
};

#[derive(Subcommand)]
pub enum MapCommand {
    /// The node's maps and how many entries each holds
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The entries of one map (a name from `map list`)
    Get {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Serialize)]
struct MapRow {
    name: &'static str,
    entries: usize,
}

/// The maps `map get` can read, with what `bpf` list shows them.
const MAPS: &[(&str, &str)] = &[
    (endpoint::MAP_NAME, "endpoint"),
    (ipcache::MAP_NAME, "ipcache"),
    (ct::TCP_MAP_NAME, "ct"),
    (ct::ANY_MAP_NAME, "ct"),
    (metrics::MAP_NAME, "metrics"),
];

/// Entries of map `name`; `tcp_ct`: how many of the conntrack entries
/// (`ct_total`) are TCP, read once for both tables.
fn count(dir: &Path, name: &str, tcp_ct: usize, ct_total: usize) -> anyhow::Result<usize> {
    Ok(match name {
        n if n == endpoint::MAP_NAME => LxcMap::from_pin_dir(dir)?.dump()?.len(),
        n if n == ipcache::MAP_NAME => IpcacheMap::from_pin_dir(dir)?.dump()?.len(),
        n if n == ct::TCP_MAP_NAME => tcp_ct,
        n if n == ct::ANY_MAP_NAME => ct_total - tcp_ct,
        _ => MetricsMap::from_pin_dir(dir)?.dump()?.len(),
    })
}

impl MapCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let dir = t.pin_dir()?;
        match self {
            MapCommand::List { output } => {
                let ct = CtMaps::from_pin_dir(&dir)?.dump()?;
                let tcp = ct.iter().filter(|(k, _)| k.proto == 6).count();
                let mut rows = Vec::new();
                for (name, _) in MAPS {
                    let entries = count(&dir, name, tcp, ct.len())
                        .with_context(|| format!("reading {name} in {}", dir.display()))?;
                    rows.push(MapRow { name, entries });
                }
                if let Output::Json = output {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                    return Ok(());
                }
                let mut tb = Table::new(&["Name", "Num entries"]);
                for r in rows {
                    tb.row(vec![r.name.into(), r.entries.to_string()]);
                }
                print!("{}", tb.render());
                Ok(())
            }
            MapCommand::Get { name, output } => {
                let kind = MAPS
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(&name))
                    .map(|(_, k)| *k)
                    .with_context(|| {
                        format!(
                            "no map named {name}; the maps are {}",
                            MAPS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                bpf::list(&dir, kind, output)
            }
        }
    }
}
