//! `ciliate`: the command-line tool. The clap tree lives here; each command
//! group has its own file and is dispatched through `Command::run`.

mod bpf;
mod lab;
mod table;

use clap::{Parser, Subcommand};

/// Ciliate: eBPF container networking, security and load balancing.
#[derive(Parser)]
#[command(name = "ciliate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Local labs on network namespaces: a node with pods behind the datapath.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Read the datapath's BPF maps directly.
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
}

impl Command {
    fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Lab(c) => c.run(),
            Command::Bpf(c) => c.run(),
        }
    }
}

fn main() {
    // Die quietly when the reader of our output goes away (`| head`), as
    // command-line tools do, instead of panicking on the write.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(e) = cli.command.run() {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
