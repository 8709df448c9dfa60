//! `ciliate prefilter list|update|delete` (Cilium's `cilium prefilter`):
//! the source CIDRs the XDP prefilter drops on the node's native devices
//! (the agent runs with `--enable-xdp-prefilter`).

use anyhow::Context as _;
use ciliate_api::models::{Prefilter, PrefilterSpec};
use clap::Subcommand;

use crate::{table::Output, target::Target};

#[derive(Subcommand)]
pub enum PrefilterCommand {
    /// The denied CIDRs with the packets and bytes each dropped, and the devices
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Deny source CIDRs (those denied already stay as they are)
    Update {
        /// A source CIDR to deny (repeat for more; an address alone is a /32)
        #[arg(long, required = true)]
        cidr: Vec<String>,
        /// Refuse the change unless the list is at this revision (0: whatever it is)
        #[arg(long, default_value_t = 0)]
        revision: u64,
    },
    /// Stop denying source CIDRs (each must be denied now, or nothing changes)
    Delete {
        #[arg(long, required = true)]
        cidr: Vec<String>,
        #[arg(long, default_value_t = 0)]
        revision: u64,
    },
}

impl PrefilterCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        let (method, deny, revision) = match self {
            PrefilterCommand::List { output } => {
                let p: Prefilter = client.get("/v1/prefilter").context("reading the prefilter")?;
                return print(&p, output);
            }
            PrefilterCommand::Update { cidr, revision } => {
                (ciliate_api::client::method::PATCH, cidr, revision)
            }
            PrefilterCommand::Delete { cidr, revision } => {
                (ciliate_api::client::method::DELETE, cidr, revision)
            }
        };
        let spec = PrefilterSpec { revision, deny };
        let p: Prefilter = client
            .call(method, "/v1/prefilter", Some(&spec))
            .with_context(|| format!("changing the prefilter ({})", spec.deny.join(", ")))?;
        println!("Revision: {}", p.spec.revision);
        Ok(())
    }
}

fn print(p: &Prefilter, output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(p)?);
        return Ok(());
    }
    println!("Revision: {}", p.spec.revision);
    let devices: Vec<String> =
        p.status.devices.iter().map(|d| format!("{} ({})", d.name, d.mode)).collect();
    println!("Devices: {}", devices.join(", "));
    let mut t = crate::table::Table::new(&["CIDR", "PACKETS DROPPED", "BYTES DROPPED"]);
    for c in &p.status.counters {
        t.row(vec![c.cidr.clone(), c.packets.to_string(), c.bytes.to_string()]);
    }
    print!("{}", t.render());
    Ok(())
}
