//! The Ciliate node agent. Its subsystems (identity, ipcache, endpoints,
//! policy, services, nodes, conntrack, observer, api) arrive with the
//! single-node issue; see ARCHITECTURE.md section 4. Until then it says so
//! and exits non-zero rather than pretending to run.

use clap::Parser;

/// The Ciliate node agent (not built yet: the lab runs the datapath itself).
#[derive(Parser)]
#[command(name = "ciliate-agent", version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!(
        "ciliate-agent: the agent is not implemented yet; `ciliate lab up` loads the datapath directly"
    );
    std::process::exit(2);
}
