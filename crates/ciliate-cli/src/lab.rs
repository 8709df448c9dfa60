//! `ciliate lab up|down|status`: local labs on network namespaces.

use anyhow::Context as _;
use ciliate_api::{
    client::method,
    models::{BackendSpec, BackendState, Service, ServiceKind, ServiceSpec},
};
use ciliate_lab::{
    netns,
    node::{self, Binaries, ECHO_PORT, EXTERNAL_IP, LabState, NODE_IP, NodeLab, NodeLabConfig},
};
use clap::Subcommand;

use crate::table::Table;

pub const DEFAULT_LAB: &str = "ciliate";

pub use crate::table::Output;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Bring up a lab: nodes with pods, services and checks (replaces a lab of the same name)
    Up {
        /// Lab name: prefix of its namespaces (<name>-node1, <name>-pod1, ...)
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        /// Number of pods (per node with --nodes above 1)
        #[arg(long, default_value_t = 3)]
        pods: usize,
        /// Number of nodes: above 1, nodes on an underlay bridge with an external host and a
        /// shared store
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// How nodes reach each other's pods (with --nodes above 1): tunnel or native
        #[arg(long, default_value = "tunnel")]
        routing: String,
        /// The cluster's store (with --nodes above 1): local (a file the agents share) or
        /// etcd (started for the lab)
        #[arg(long, default_value = "local")]
        kvstore: String,
        /// Run a Kubernetes API server (ciliate-apiserver) in the lab that the agents
        /// follow: pods, the echo Service with its EndpointSlice and the policy are API
        /// objects (with --nodes above 1)
        #[arg(long)]
        k8s: bool,
    },
    /// Remove a lab: its namespaces, pinned maps and links
    Down {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Show running labs, their pods and whether their namespaces are alive
    Status {
        /// Only this lab
        #[arg(long)]
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

impl LabCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            LabCommand::Up { nodes: 1, k8s: true, .. } => anyhow::bail!(
                "--k8s needs --nodes 2 or more (the API server runs on the lab's underlay)"
            ),
            LabCommand::Up { name, pods, nodes: 1, .. } => up(&name, pods),
            LabCommand::Up { name, pods, nodes, routing, kvstore, k8s } => {
                crate::lab_cluster::up(&name, nodes, pods, &routing, &kvstore, k8s)
            }
            LabCommand::Down { name } => down(&name),
            LabCommand::Status { name, output } => status(name.as_deref(), output),
        }
    }
}

pub fn say(msg: impl AsRef<str>) {
    println!("[lab] {}", msg.as_ref());
}

/// The lab's echo service.
pub const CLUSTER_IP: &str = "10.96.0.10";
pub const NODE_PORT: u16 = 30007;

/// Declare the lab's echo service on the agent of `client`: ClusterIP
/// 10.96.0.10:7 over TCP and UDP and NodePort 30007, backends `ips`:7.
pub fn echo_services(
    client: &ciliate_api::Client,
    ips: &[std::net::Ipv4Addr],
) -> anyhow::Result<()> {
    let backends: Vec<BackendSpec> = ips
        .iter()
        .map(|ip| BackendSpec { ip: *ip, port: ECHO_PORT, state: BackendState::Active })
        .collect();
    let services = [
        (1, format!("{CLUSTER_IP}:{ECHO_PORT}/TCP"), ServiceKind::ClusterIP),
        (2, format!("{CLUSTER_IP}:{ECHO_PORT}/UDP"), ServiceKind::ClusterIP),
        (3, format!("0.0.0.0:{NODE_PORT}/TCP"), ServiceKind::NodePort),
    ];
    for (id, fe, kind) in services {
        let spec = ServiceSpec {
            id,
            frontend: fe.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            kind,
            backends: backends.clone(),
            affinity_timeout: None,
            traffic_policy_local: false,
            source_ranges: vec![],
            algorithm: None,
            name: "default/echo".into(),
            source: Default::default(),
        };
        let svc: Service = client
            .call(method::PUT, "/v1/service", Some(&spec))
            .with_context(|| format!("creating service {id}"))?;
        let fes: Vec<String> = svc.frontends.iter().map(|f| f.address.to_string()).collect();
        say(format!(
            "service {id} ({}) {} → {} backends",
            kind.name(),
            fes.join(", "),
            backends.len()
        ));
    }
    Ok(())
}

pub fn result(ok: bool) -> String {
    if ok { "ok" } else { "FAILED" }.into()
}

fn up(name: &str, pods: usize) -> anyhow::Result<()> {
    let removed = node::down(name)?;
    if !removed.is_empty() {
        say(format!("removed the previous lab {name} ({} namespaces)", removed.len()));
    }
    let bins = Binaries::beside_current_exe()?;
    let echo = bins.echo.clone();
    say(format!(
        "creating node {name}-node1 (ciliate-agent) and {pods} pods (through ciliate-cni)"
    ));
    let lab = NodeLab::up(NodeLabConfig::new(name, pods, bins))
        .with_context(|| format!("bringing up lab {name}"))?;
    for p in &lab.pods {
        say(format!(
            "pod {} ({}) on {}: endpoint {}, identity {}, gateway MAC {}",
            p.state.name,
            p.state.ip,
            p.state.lxc,
            p.state.endpoint_id,
            p.state.identity,
            p.state.lxc_mac
        ));
    }
    // Services: the echo servers behind a ClusterIP (TCP and UDP) and a
    // NodePort on the node's address.
    let ips: Vec<_> = lab.pods.iter().map(|p| p.state.ip).collect();
    echo_services(&lab.client(), &ips)?;
    // Give the echo servers a moment to listen.
    std::thread::sleep(std::time::Duration::from_millis(200));
    say(
        "checking connectivity: every pod to the gateway (ping) and to the next pod (ping, TCP, UDP echo); the host to every pod (TCP echo)",
    );
    let mut t = Table::new(&["FROM", "TO", "CHECK", "RESULT"]);
    let mut failed = 0;
    let mut check = |from: &str, ns: &ciliate_lab::Netns, to: String, ip: String, kind: &str| {
        let args: Vec<String> = match kind {
            "ping" => ["ping", "-c", "1", "-W", "2", &ip].map(String::from).to_vec(),
            proto => vec![
                echo.display().to_string(),
                proto.to_owned(),
                format!("{ip}:{ECHO_PORT}"),
                "ciliate".into(),
            ],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ok = ns.exec(&args).is_ok();
        failed += usize::from(!ok);
        t.row(vec![from.into(), to, kind.into(), result(ok)]);
    };
    let gw = lab.router_ip().to_string();
    for (i, p) in lab.pods.iter().enumerate() {
        check(&p.state.name, &p.ns, format!("gateway {gw}"), gw.clone(), "ping");
        if lab.pods.len() > 1 {
            let next = &lab.pods[(i + 1) % lab.pods.len()];
            let to = format!("{} {}", next.state.name, next.state.ip);
            for kind in ["ping", "tcp", "udp"] {
                check(&p.state.name, &p.ns, to.clone(), next.state.ip.to_string(), kind);
            }
        }
    }
    for p in &lab.pods {
        let to = format!("{} {}", p.state.name, p.state.ip);
        check("host", &lab.node, to, p.state.ip.to_string(), "tcp");
    }
    // Services: through socket LB (the lab's cgroup) and the external host.
    let cip = format!("service {CLUSTER_IP}:{ECHO_PORT}");
    for p in &lab.pods {
        for proto in ["tcp", "udp"] {
            let ok =
                lab.run_echo(&p.ns, &[proto, &format!("{CLUSTER_IP}:{ECHO_PORT}"), "svc"]).is_ok();
            failed += usize::from(!ok);
            t.row(vec![p.state.name.clone(), cip.clone(), proto.into(), result(ok)]);
        }
    }
    let ok = lab.run_echo(&lab.node, &["tcp", &format!("{CLUSTER_IP}:{ECHO_PORT}"), "svc"]).is_ok();
    failed += usize::from(!ok);
    t.row(vec!["host".into(), cip, "tcp".into(), result(ok)]);
    let np = format!("{NODE_IP}:{NODE_PORT}");
    // The external host is no member of the cluster: not in its cgroup.
    let ok = lab.external.exec(&[&echo.to_string_lossy(), "tcp", &np, "svc"]).is_ok();
    failed += usize::from(!ok);
    t.row(vec![
        format!("external {EXTERNAL_IP}"),
        format!("NodePort {np}"),
        "tcp".into(),
        result(ok),
    ]);
    print!("{}", t.render());
    let state = lab.keep()?;
    anyhow::ensure!(
        failed == 0,
        "{failed} connectivity checks failed; the lab is left up for inspection"
    );
    say(format!(
        "lab {} is up: enter a pod with `ip netns exec {} bash`; look at the datapath with `ciliate bpf ct list`, `ciliate bpf endpoint list`, `ciliate service list`, `ciliate bpf lb list`; the external host is {}; remove it with `ciliate lab down --name {}`",
        state.lab, state.pods[0].ns, state.external_ns, state.lab
    ));
    Ok(())
}

fn down(name: &str) -> anyhow::Result<()> {
    let removed = node::down(name)?;
    if removed.is_empty() {
        say(format!("no lab named {name}"));
    } else {
        say(format!("removed lab {name}: {}", removed.join(" ")));
    }
    Ok(())
}

fn status(name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let labs: Vec<LabState> = match name {
        Some(n) => node::load_state(n)?.into_iter().collect(),
        None => node::list_states(),
    };
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&labs)?);
        return Ok(());
    }
    if labs.is_empty() {
        println!("no labs");
        return Ok(());
    }
    for lab in labs {
        let alive = |ns: &str| if netns::exists(ns) { "up" } else { "MISSING" };
        println!(
            "Lab {}: node {} ({}), router {}, pins {}, agent {} (log {})",
            lab.lab,
            lab.node_ns,
            alive(&lab.node_ns),
            lab.router_ip,
            lab.pins_dir.display(),
            lab.agent_socket.display(),
            lab.agent_log.display()
        );
        let mut t = Table::new(&[
            "POD",
            "NAMESPACE",
            "IPv4",
            "DEVICE",
            "GATEWAY MAC",
            "ENDPOINT",
            "IDENTITY",
            "DATAPATH",
            "STATUS",
        ]);
        for p in &lab.pods {
            let datapath = match node::attached_programs(&lab.node_ns, &p.lxc) {
                Ok(progs) if progs.is_empty() => "NOT ATTACHED".to_owned(),
                Ok(progs) => progs.join(","),
                Err(_) => "unknown".to_owned(),
            };
            t.row(vec![
                p.name.clone(),
                p.ns.clone(),
                p.ip.to_string(),
                p.lxc.clone(),
                p.lxc_mac.clone(),
                p.endpoint_id.to_string(),
                p.identity.to_string(),
                datapath,
                alive(&p.ns).into(),
            ]);
        }
        print!("{}", t.render());
    }
    Ok(())
}
