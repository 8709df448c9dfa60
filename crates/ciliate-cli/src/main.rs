//! `ciliate`: the command-line tool. The clap tree lives here; each command
//! group has its own file and is dispatched through `Command::run`.

mod agent;
mod bpf;
mod cluster;
mod lab;
mod lab_cluster;
mod map;
mod monitor;
mod observe;
mod policy;
mod prefilter;
mod service;
mod table;
mod target;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Ciliate: eBPF container networking, security and load balancing.
///
/// Commands that talk to an agent use --socket, or the agent of --lab, or
/// the agent of the lab "ciliate" when it is up, or /run/ciliate/<hostname>/agent.sock.
#[derive(Parser)]
#[command(name = "ciliate", version, about, long_about = None)]
struct Cli {
    /// The agent's API socket
    #[arg(long, global = true, env = "CILIATE_SOCKET")]
    socket: Option<PathBuf>,
    /// Talk to the node of this lab
    #[arg(long, global = true, env = "CILIATE_LAB")]
    lab: Option<String>,
    /// The node's bpffs pin directory (for `bpf` and `map`; default: asked from the agent)
    #[arg(long, global = true)]
    pin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The agent's state: kvstore, cluster, node, pod CIDR, endpoints, identities, IPAM
    Status(agent::StatusArgs),
    /// Endpoints of the node
    #[command(subcommand)]
    Endpoint(agent::EndpointCommand),
    /// The agent's run-time options: show, or switch (Debug=true: datapath debugging)
    Config(agent::ConfigArgs),
    /// Security identities
    #[command(subcommand)]
    Identity(agent::IdentityCommand),
    /// Network policy: import, get, delete, wait
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Services (kube-proxy replacement): update, list, get, delete
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// The XDP prefilter: source CIDRs dropped on the native devices (list, update, delete)
    #[command(subcommand)]
    Prefilter(prefilter::PrefilterCommand),
    /// The nodes of the cluster
    #[command(subcommand)]
    Node(cluster::NodeCommand),
    /// The cluster's key-value store (local or etcd), for debugging
    #[command(subcommand)]
    Kvstore(cluster::KvstoreCommand),
    /// The node's BPF maps
    #[command(subcommand)]
    Map(map::MapCommand),
    /// Read the datapath's BPF maps directly
    #[command(subcommand)]
    Bpf(bpf::BpfCommand),
    /// Datapath events as they happen: traces, drops, policy verdicts; debug and capture
    /// events while debugging (-v)
    Monitor(monitor::MonitorArgs),
    /// Flows from the node's Hubble-compatible observer (hubble observe's flags and formats)
    Observe(Box<observe::ObserveArgs>),
    /// The flow observer: status, nodes
    #[command(subcommand)]
    Hubble(observe::HubbleCommand),
    /// Local labs on network namespaces: nodes with pods, services and policy
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

impl Command {
    fn run(self, t: &target::Target) -> anyhow::Result<()> {
        match self {
            Command::Status(a) => agent::status(t, &a),
            Command::Endpoint(c) => c.run(t),
            Command::Config(a) => agent::config(t, &a),
            Command::Identity(c) => c.run(t),
            Command::Policy(c) => c.run(t),
            Command::Service(c) => c.run(t),
            Command::Prefilter(c) => c.run(t),
            Command::Node(c) => c.run(t),
            Command::Kvstore(c) => c.run(t),
            Command::Map(c) => c.run(t),
            Command::Bpf(c) => c.run(t),
            Command::Monitor(a) => monitor::run(t, &a),
            Command::Observe(a) => observe::observe(t, &a),
            Command::Hubble(c) => observe::hubble(t, &c),
            Command::Lab(c) => c.run(),
        }
    }
}

fn main() {
    // Die quietly when the reader of our output goes away (`| head`), as
    // command-line tools do, instead of panicking on the write.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    use clap::{CommandFactory as _, FromArgMatches as _};
    let m = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&m).unwrap_or_else(|e| e.exit());
    // `--not` negates the flag after it: where flags stood is in the matches.
    if let (Command::Observe(a), Some(om)) = (&mut cli.command, m.subcommand_matches("observe"))
        && let Err(e) = observe::negate(a, om)
    {
        eprintln!("Error: {e:#}");
        std::process::exit(2);
    }
    let t = target::Target { socket: cli.socket, lab: cli.lab, pin_dir: cli.pin_dir };
    if let Err(e) = cli.command.run(&t) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
