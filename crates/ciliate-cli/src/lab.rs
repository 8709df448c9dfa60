//! `ciliate lab up|down|status`: local labs on network namespaces.

use std::path::Path;

use anyhow::Context as _;
use ciliate_datapath::bpffs::DEFAULT_ROOT;
use ciliate_lab::{
    netns,
    node::{self, LabState, NodeLab, NodeLabConfig},
};
use clap::{Subcommand, ValueEnum};

use crate::table::Table;

pub const DEFAULT_LAB: &str = "ciliate";

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Bring up a one-node lab with pods (replaces a lab of the same name)
    Up {
        /// Lab name: prefix of its namespaces (<name>-node1, <name>-pod1, ...)
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        /// Number of pods
        #[arg(long, default_value_t = 3)]
        pods: usize,
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
            LabCommand::Up { name, pods } => up(&name, pods),
            LabCommand::Down { name } => down(&name),
            LabCommand::Status { name, output } => status(name.as_deref(), output),
        }
    }
}

fn say(msg: impl AsRef<str>) {
    println!("[lab] {}", msg.as_ref());
}

fn up(name: &str, pods: usize) -> anyhow::Result<()> {
    let removed = node::down(name, Path::new(DEFAULT_ROOT))?;
    if !removed.is_empty() {
        say(format!("removed the previous lab {name} ({} namespaces)", removed.len()));
    }
    say(format!("creating node {name}-node1 with {pods} pods"));
    let lab = NodeLab::up(NodeLabConfig::new(name, pods))
        .with_context(|| format!("bringing up lab {name}"))?;
    for p in &lab.pods {
        say(format!(
            "pod {} ({}) on {}: from-container attached, gateway MAC {}",
            p.state.name, p.state.ip, p.state.lxc, p.state.lxc_mac
        ));
    }
    say("checking connectivity (ping from every pod to the gateway and the next pod)");
    let mut t = Table::new(&["FROM", "TO", "RESULT"]);
    let mut failed = 0;
    let gw = lab.router_ip();
    for (i, p) in lab.pods.iter().enumerate() {
        let mut targets = vec![("gateway".to_owned(), gw.to_string())];
        if lab.pods.len() > 1 {
            let next = &lab.pods[(i + 1) % lab.pods.len()];
            targets.push((next.state.name.clone(), next.state.ip.to_string()));
        }
        for (label, ip) in targets {
            let ok = p.ns.exec(&["ping", "-c", "1", "-W", "2", &ip]).is_ok();
            failed += usize::from(!ok);
            t.row(vec![
                p.state.name.clone(),
                format!("{label} {ip}"),
                if ok { "ok" } else { "FAILED" }.into(),
            ]);
        }
    }
    print!("{}", t.render());
    let state = lab.keep()?;
    anyhow::ensure!(
        failed == 0,
        "{failed} connectivity checks failed; the lab is left up for inspection"
    );
    say(format!(
        "lab {} is up: enter a pod with `ip netns exec {} bash`; remove it with `ciliate lab down --name {}`",
        state.lab, state.pods[0].ns, state.lab
    ));
    Ok(())
}

fn down(name: &str) -> anyhow::Result<()> {
    let removed = node::down(name, Path::new(DEFAULT_ROOT))?;
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
            "Lab {}: node {} ({}), router {}, pins {}",
            lab.lab,
            lab.node_ns,
            alive(&lab.node_ns),
            lab.router_ip,
            lab.pins_dir.display()
        );
        let mut t = Table::new(&[
            "POD",
            "NAMESPACE",
            "IPv4",
            "DEVICE",
            "GATEWAY MAC",
            "ENDPOINT",
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
                datapath,
                alive(&p.ns).into(),
            ]);
        }
        print!("{}", t.render());
    }
    Ok(())
}
