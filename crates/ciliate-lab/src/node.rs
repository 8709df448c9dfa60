//! The one-node lab: a node namespace and pods on veth pairs.
//!
//! ```text
//!  pod ns "<lab>-pod<i>"          node ns "<lab>-node1"
//!  eth0 10.200.0.<i+1>/32 ====== lxc<hash>      tc ingress: from-container
//!  routes: gw scope link,        ciliate_host 10.200.0.1/32 (NOARP)
//!          default via gw          tc egress: from-host   <=> ciliate_net
//!                                route 10.200.0.0/24 dev ciliate_host
//! ```
//!
//! Each pod's ARP for its gateway is answered by from-container with the
//! MAC of its own lxc device. Pod → pod: from-container delivers straight
//! into the destination pod (peer redirect). Pod → host: the node's stack.
//! Host → pod: routed to `ciliate_host`, where from-host delivers it with
//! the host identity. The lab fills the lxc map and the ipcache itself and
//! gives pod i the identity 256 + i, until the agent does this with real
//! label-based identities.

use std::{net::Ipv4Addr, path::PathBuf};

use ciliate_common::identity;
use ciliate_datapath::{
    aya_reexport::TcAttachType,
    bpffs::{DEFAULT_ROOT, NodePins},
    loader,
    node::{self as dpnode, EndpointSpec, HostSetup, format_mac},
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{LabError, Result},
    names,
    netns::{self, Netns, link_info},
};

/// Where `ciliate lab up` records what it made, so `down` can remove it.
pub const STATE_DIR: &str = "/run/ciliate/labs";

#[derive(Clone, Debug)]
pub struct NodeLabConfig {
    /// Prefix of every namespace of the lab.
    pub lab: String,
    pub pods: usize,
    /// The node's pod CIDR; the router IP is its first address.
    pub pod_cidr: Ipv4Addr,
    pub pod_cidr_len: u8,
    pub mtu: u32,
    pub bpffs_root: PathBuf,
    /// The `ciliate-echo` binary to run in every pod (TCP and UDP echo on
    /// [`ECHO_PORT`]), if any.
    pub echo: Option<PathBuf>,
}

/// Port of the echo server in lab pods.
pub const ECHO_PORT: u16 = 7;

impl NodeLabConfig {
    pub fn new(lab: &str, pods: usize) -> Self {
        Self {
            lab: lab.to_owned(),
            pods,
            pod_cidr: Ipv4Addr::new(10, 200, 0, 0),
            pod_cidr_len: 24,
            mtu: 1500,
            bpffs_root: PathBuf::from(DEFAULT_ROOT),
            echo: None,
        }
    }

    pub fn router_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr) + 1)
    }

    fn pod_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr) + 2 + i as u32)
    }

    fn validate(&self) -> Result<()> {
        let lab = &self.lab;
        if lab.is_empty()
            || lab.len() > 24
            || !lab.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(LabError::Invalid(format!(
                "lab name {lab:?}: 1-24 characters of letters, digits and '-'"
            )));
        }
        let hosts = (1u64 << (32 - u32::from(self.pod_cidr_len))).saturating_sub(3);
        if self.pods == 0 || self.pods as u64 > hosts.min(250) {
            return Err(LabError::Invalid(format!(
                "{} pods: between 1 and {} fit in /{}",
                self.pods,
                hosts.min(250),
                self.pod_cidr_len
            )));
        }
        Ok(())
    }
}

/// What `ciliate lab status` and `down` need to know about a lab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    pub lab: String,
    pub node_ns: String,
    pub pins_dir: PathBuf,
    pub router_ip: Ipv4Addr,
    pub pods: Vec<PodState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub lxc: String,
    pub lxc_mac: String,
    pub mac: String,
    pub endpoint_id: u16,
    pub identity: u32,
}

pub struct Pod {
    pub state: PodState,
    // Dropped before `ns`, whose guard kills the echo server.
    pub echo: Option<std::process::Child>,
    pub ns: Netns,
}

/// A running one-node lab. Dropping it removes everything it made (pods,
/// node, pinned maps and links) unless [`NodeLab::keep`] was called.
pub struct NodeLab {
    // Field order is drop order: pods before the node.
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub pins: NodePins,
    pub config: NodeLabConfig,
    keep: bool,
}

impl NodeLab {
    pub fn up(config: NodeLabConfig) -> Result<Self> {
        config.validate()?;
        let node_name = format!("{}-node1", config.lab);
        let node = Netns::create(&node_name)?;
        let pins = NodePins::create(&config.bpffs_root, &node_name)
            .map_err(|source| LabError::Datapath { ns: node_name.clone(), source })?;
        let mut lab = Self { pods: Vec::new(), node, pins, config, keep: false };
        lab.setup_node()?;
        for i in 0..lab.config.pods {
            let pod = lab.add_pod(i)?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }

    fn dp(&self) -> impl Fn(ciliate_datapath::DatapathError) -> LabError + '_ {
        |source| LabError::Datapath { ns: self.node.name().to_owned(), source }
    }

    fn setup_node(&self) -> Result<()> {
        let setup = HostSetup {
            pod_cidr: self.config.pod_cidr,
            pod_cidr_len: self.config.pod_cidr_len,
            router: self.config.router_ip(),
        };
        self.node.run(|| dpnode::setup_host(&self.pins, &setup))?.map_err(self.dp())
    }

    fn add_pod(&self, i: usize) -> Result<Pod> {
        let name = format!("pod{}", i + 1);
        let ns = Netns::create(&format!("{}-{name}", self.config.lab))?;
        let lxc = names::lxc_name(ns.name());
        netns::veth(&self.node, &lxc, &ns, "eth0")?;
        let ip = self.config.pod_ip(i);
        let gw = self.config.router_ip().to_string();
        let mtu = self.config.mtu.to_string();
        ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        self.node.ip(&["link", "set", &lxc, "mtu", &mtu])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0", "mtu", &mtu])?;
        let (mac, _) = link_info(&ns, "eth0")?;
        let spec = EndpointSpec {
            ip,
            lxc: lxc.clone(),
            mac,
            endpoint_id: (i + 1) as u16,
            identity: identity::MIN_CLUSTER + i as u32,
        };
        let attached =
            self.node.run(|| dpnode::attach_endpoint(&self.pins, &spec))?.map_err(self.dp())?;
        let echo = match &self.config.echo {
            Some(bin) => Some(ns.spawn_detached(&[
                &bin.to_string_lossy(),
                "serve",
                &ECHO_PORT.to_string(),
            ])?),
            None => None,
        };
        let state = PodState {
            name,
            ns: ns.name().to_owned(),
            ip,
            lxc,
            lxc_mac: format_mac(&attached.lxc_mac),
            mac: format_mac(&mac),
            endpoint_id: spec.endpoint_id,
            identity: spec.identity,
        };
        Ok(Pod { state, echo, ns })
    }

    pub fn router_ip(&self) -> Ipv4Addr {
        self.config.router_ip()
    }

    /// The tcx ingress programs on a pod's lxc device.
    pub fn lxc_programs(&self, lxc: &str) -> Result<Vec<String>> {
        attached_programs(self.node.name(), lxc)
    }

    pub fn state(&self) -> LabState {
        LabState {
            lab: self.config.lab.clone(),
            node_ns: self.node.name().to_owned(),
            pins_dir: self.pins.dir.clone(),
            router_ip: self.router_ip(),
            pods: self.pods.iter().map(|p| p.state.clone()).collect(),
        }
    }

    /// Leave the lab running after this guard is gone and record its state
    /// for `ciliate lab status|down`.
    pub fn keep(mut self) -> Result<LabState> {
        let state = self.state();
        save_state(&state)?;
        self.keep = true;
        self.node.keep();
        for p in &mut self.pods {
            p.ns.keep();
        }
        Ok(state)
    }
}

impl Drop for NodeLab {
    fn drop(&mut self) {
        if !self.keep {
            // Namespaces go with their guards; pinned maps and links here.
            let _ = self.pins.remove();
        }
    }
}

/// The tcx ingress programs on device `dev` of namespace `ns`.
pub fn attached_programs(ns: &str, dev: &str) -> Result<Vec<String>> {
    Netns::existing(ns)
        .run(|| loader::tcx_programs(dev, TcAttachType::Ingress))?
        .map_err(|source| LabError::Datapath { ns: ns.to_owned(), source })
}

fn state_path(lab: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{lab}.json"))
}

fn save_state(state: &LabState) -> Result<()> {
    let path = state_path(&state.lab);
    let err = |reason: String| LabError::State { path: path.display().to_string(), reason };
    std::fs::create_dir_all(STATE_DIR).map_err(|e| err(e.to_string()))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| err(e.to_string()))?;
    std::fs::write(&path, json).map_err(|e| err(e.to_string()))
}

/// The recorded state of lab `lab`, if it was brought up and not taken down.
pub fn load_state(lab: &str) -> Result<Option<LabState>> {
    let path = state_path(lab);
    match std::fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| LabError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::State { path: path.display().to_string(), reason: e.to_string() }),
    }
}

/// Every recorded lab.
pub fn list_states() -> Vec<LabState> {
    let Ok(dir) = std::fs::read_dir(STATE_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<LabState> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            load_state(name.strip_suffix(".json")?).ok().flatten()
        })
        .collect();
    out.sort_by(|a, b| a.lab.cmp(&b.lab));
    out
}

/// Remove lab `lab`: its namespaces (also ones a crashed `up` left without a
/// state file), its pinned maps and links, and its state file. Returns the
/// namespaces removed.
pub fn down(lab: &str, bpffs_root: &std::path::Path) -> Result<Vec<String>> {
    let prefix = format!("{lab}-");
    let mut removed = Vec::new();
    let mut names: Vec<String> =
        netns::list().into_iter().filter(|n| is_lab_ns(n, &prefix)).collect();
    names.sort();
    // Pods first, then the node.
    names.sort_by_key(|n| n.contains("-node"));
    for n in names {
        Netns::adopt(&n).delete()?;
        removed.push(n);
    }
    let pins_root = bpffs_root.join("ciliate");
    if let Ok(dir) = std::fs::read_dir(&pins_root) {
        for e in dir.flatten() {
            if e.file_name().to_str().is_some_and(|n| is_lab_ns(n, &prefix)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let _ = std::fs::remove_file(state_path(lab));
    Ok(removed)
}

/// `<lab>-node<N>` or `<lab>-pod<N>` (and not another lab whose name merely
/// starts with this one's).
fn is_lab_ns(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        ["node", "pod"].iter().any(|k| {
            rest.strip_prefix(k)
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_namespaces_are_told_apart_from_other_labs() {
        assert!(is_lab_ns("ciliate-node1", "ciliate-"));
        assert!(is_lab_ns("ciliate-pod12", "ciliate-"));
        assert!(!is_lab_ns("ciliate-x-pod1", "ciliate-"));
        assert!(!is_lab_ns("ciliate-pod", "ciliate-"));
        assert!(!is_lab_ns("other-pod1", "ciliate-"));
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let e = NodeLabConfig::new("bad name!", 2).validate().unwrap_err().to_string();
        assert!(e.contains("lab name"), "{e}");
        let e = NodeLabConfig::new("ok", 0).validate().unwrap_err().to_string();
        assert!(e.contains("0 pods"), "{e}");
        let e = NodeLabConfig::new("ok", 300).validate().unwrap_err().to_string();
        assert!(e.contains("300 pods"), "{e}");
    }
}
