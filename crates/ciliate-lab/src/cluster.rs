//! The multi-node lab: N node namespaces joined by an underlay bridge, an
//! external host ("the world") on the same underlay, a store shared by the
//! agents (the local store's file, or an etcd started for the lab in the
//! underlay namespace), an agent per node with a pod CIDR from the cluster
//! pool, and pods spread over the nodes through the real CNI plugin.
//!
//! ```text
//!  <lab>-node1 eth0 192.168.200.2 ─┐
//!  <lab>-node2 eth0 192.168.200.3 ─┤  <lab>-ul1: br0 192.168.200.1 (etcd :2379, API :6443)
//!  ...                             ├─
//!  <lab>-ext1  eth0 192.168.200.100┘  (no route to the pods: the world)
//! ```

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use ciliate_api::{Client, models::Status};
use ciliate_datapath::bpffs::PrivateBpffs;

use crate::{
    error::{LabError, Result},
    netns::{self, Netns},
    node::{self, Binaries, NodeHandle, Pod, STATE_DIR, cgroup2_root, spawn_agent, wait_listening},
};

pub const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 1);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 100);
pub const CLUSTER_POOL: &str = "10.200.0.0/16";
pub const ETCD_PORT: u16 = 2379;
/// The lab's Kubernetes API server (`ciliate-apiserver`, with `k8s`).
pub const APISERVER_PORT: u16 = 6443;

/// The address of node `i` (1-based) on the underlay.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 200, 1 + i as u8)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// The local store's file, shared by the lab's agents.
    Local,
    /// An etcd in the underlay namespace.
    Etcd,
}

#[derive(Clone, Debug)]
pub struct ClusterLabConfig {
    pub lab: String,
    pub nodes: usize,
    pub pods_per_node: usize,
    /// "tunnel" or "native".
    pub routing: String,
    pub store: Store,
    pub bins: Binaries,
    pub socket_lb: bool,
    /// More agent options, for every node.
    pub agent_args: Vec<OsString>,
    /// An XDP program (Ciliate's, passing everything: nothing is denied and
    /// nothing accelerated there) on the underlay's ports to the nodes: a
    /// veth hands the frames its peer sends with `XDP_TX`/`XDP_REDIRECT` on
    /// only when it runs XDP itself (NodePort acceleration). Off by
    /// default: it changes how the underlay receives every packet.
    pub xdp_underlay: bool,
    /// A Kubernetes API server (`ciliate-apiserver`) in the underlay
    /// namespace that every agent follows (`--k8s-kubeconfig-path`); pods
    /// are created there (with their labels) before the CNI adds them, as
    /// a kubelet sees them.
    pub k8s: bool,
}

impl ClusterLabConfig {
    pub fn new(lab: &str, nodes: usize, pods_per_node: usize, bins: Binaries) -> Self {
        Self {
            lab: lab.into(),
            nodes,
            pods_per_node,
            routing: "tunnel".into(),
            store: Store::Local,
            bins,
            socket_lb: true,
            agent_args: Vec::new(),
            xdp_underlay: false,
            k8s: false,
        }
    }

    pub fn mtu(&self) -> u32 {
        // VXLAN adds 50 bytes on a 1500-byte underlay.
        if self.routing == "tunnel" { 1450 } else { 1500 }
    }
}

pub struct ClusterNode {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub socket: PathBuf,
    pub work_dir: PathBuf,
    pub cgroup: PathBuf,
    pub pins_dir: PathBuf,
}

impl ClusterNode {
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }
    pub fn log(&self) -> PathBuf {
        self.work_dir.join("agent.log")
    }
}

pub struct ClusterPod {
    pub pod: Pod,
    /// Index into [`ClusterLab::nodes`].
    pub node: usize,
}

/// A running multi-node lab; dropping it removes everything it made.
pub struct ClusterLab {
    // Drop order: pods, nodes (agents), external, underlay (etcd).
    pub pods: Vec<ClusterPod>,
    pub nodes: Vec<ClusterNode>,
    pub external: Netns,
    pub underlay: Netns,
    pub config: ClusterLabConfig,
    pub work_dir: PathBuf,
    bpffs: Option<PrivateBpffs>,
    keep: bool,
}

fn bpffs_root(lab: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(lab).join("bpffs")
}

fn cgroup_of(lab: &str, i: usize) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join(format!("ciliate-lab-{lab}-node{i}")))
}

/// Make `dev` (in the underlay) a port of its bridge `br0`.
fn enslave(underlay: &Netns, dev: &str) -> Result<()> {
    underlay.netlink(|nl| nl.set_master(nl.need(dev)?.index, nl.need("br0")?.index))
}

impl ClusterLab {
    pub fn up(config: ClusterLabConfig) -> Result<Self> {
        node::NodeLabConfig::validate(&config.lab, config.nodes * config.pods_per_node)?;
        if !(1..=8).contains(&config.nodes) {
            return Err(LabError::Invalid(format!("{} nodes: 1 to 8", config.nodes)));
        }
        if config.routing != "tunnel" && config.routing != "native" {
            return Err(LabError::Invalid(format!(
                "routing {:?}: tunnel or native",
                config.routing
            )));
        }
        let lab = config.lab.clone();
        let work_dir = PathBuf::from(STATE_DIR).join(&lab);
        let root = bpffs_root(&lab);
        let _ = PrivateBpffs::remove(&root);
        let _ = std::fs::remove_dir_all(&work_dir);
        let bpffs = PrivateBpffs::mount(&root)
            .map_err(|source| LabError::Datapath { ns: lab.clone(), source })?;
        let underlay = Netns::create(&format!("{lab}-ul1"))?;
        // A fixed MAC: a bridge otherwise takes the lowest MAC of its ports
        // and changes it as nodes join, and the neighbours' ARP entries
        // for the underlay address (etcd) go stale.
        underlay.netlink(|nl| {
            nl.add_bridge("br0", [0x02, 0, 0xc0, 0xa8, 0xc8, 0x01])?;
            let br = nl.need("br0")?.index;
            nl.replace_address(br, UNDERLAY_IP, 24)?;
            nl.set_up(br, true)
        })?;
        let external = Netns::create(&format!("{lab}-ext1"))?;
        netns::veth(&external, "eth0", &underlay, "x1")?;
        if config.xdp_underlay {
            // As from a machine on a wire: whole checksums. A veth hands
            // its peer TCP/UDP checksums only partly computed (offload),
            // which XDP, with no skb to say so, cannot tell from whole ones.
            external.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        enslave(&underlay, "x1")?;
        external.add_address("eth0", EXTERNAL_IP, 24)?;
        let mut this = Self {
            pods: Vec::new(),
            nodes: Vec::new(),
            external,
            underlay,
            config,
            work_dir,
            bpffs: Some(bpffs),
            keep: false,
        };
        if this.config.store == Store::Etcd {
            this.start_etcd()?;
        }
        if this.config.k8s {
            this.start_apiserver()?;
        }
        for i in 1..=this.config.nodes {
            let ns = Netns::create(&format!("{lab}-node{i}"))?;
            let dev = format!("n{i}");
            netns::veth(&ns, node::NODE_DEV, &this.underlay, &dev)?;
            enslave(&this.underlay, &dev)?;
            if this.config.xdp_underlay {
                // Pinned in the lab's own bpffs: gone with it.
                let (root, dev) = (root.clone(), dev.clone());
                let ns = this.underlay.name().to_owned();
                this.underlay
                    .run(move || {
                        let pins = ciliate_datapath::bpffs::NodePins::create(&root, &ns)?;
                        ciliate_datapath::node::attach_xdp(&pins, &[dev])
                    })?
                    .map_err(|source| LabError::Datapath {
                        ns: this.underlay.name().into(),
                        source,
                    })?;
            }
            ns.add_address(node::NODE_DEV, node_ip(i), 24)?;
            let node_dir = this.work_dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)
                .map_err(|e| LabError::Invalid(format!("{}: {e}", node_dir.display())))?;
            let cgroup = cgroup_of(&lab, i)?;
            std::fs::create_dir_all(&cgroup)
                .map_err(|e| LabError::Invalid(format!("creating {}: {e}", cgroup.display())))?;
            let pins_dir = root.join("ciliate").join(ns.name());
            this.nodes.push(ClusterNode {
                ip: node_ip(i),
                socket: node_dir.join("agent.sock"),
                work_dir: node_dir,
                cgroup,
                pins_dir,
                ns,
            });
            if this.config.k8s {
                this.k8s_node(i - 1)?;
            }
            this.start_agent(i - 1)?;
        }
        let mut k = 0;
        for n in 0..this.config.nodes {
            for _ in 0..this.config.pods_per_node {
                k += 1;
                let name = format!("pod{k}");
                if this.config.k8s {
                    this.k8s_pod(n, &name)?;
                }
                let pod = this.handle(n).add_pod_in(&name, "default", &[("app", &name)])?;
                this.pods.push(ClusterPod { pod, node: n });
            }
        }
        this.wait_converged(Duration::from_secs(20))?;
        Ok(this)
    }

    fn start_etcd(&self) -> Result<()> {
        let dir = self.work_dir.join("etcd");
        let client = format!("http://{UNDERLAY_IP}:{ETCD_PORT}");
        let args: Vec<String> = vec![
            "etcd".into(),
            "--name".into(),
            "lab".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-cluster".into(),
            "lab=http://127.0.0.1:2380".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // A child of the underlay's guard: killed with the namespace.
        drop(self.underlay.spawn_detached(&args)?);
        wait_listening(&self.underlay, ETCD_PORT)
    }

    /// The kubeconfig of the lab's API server (with `k8s`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.work_dir.join("kubeconfig")
    }

    /// The kubeconfig of `component` ("ciliate" for the agents,
    /// "ciliate-operator"): its requests carry its service account's name
    /// as the bearer token, so the API server's request log tells what
    /// each one needs its role to allow.
    pub fn kubeconfig_of(&self, component: &str) -> PathBuf {
        self.work_dir.join(format!("kubeconfig-{component}"))
    }

    fn start_apiserver(&self) -> Result<()> {
        let bin = self.config.bins.agent.with_file_name("ciliate-apiserver");
        let listen = format!("{UNDERLAY_IP}:{APISERVER_PORT}");
        let url = format!("http://{listen}");
        for (path, token) in [
            (self.kubeconfig_of("ciliate"), Some("ciliate")),
            (self.kubeconfig_of("ciliate-operator"), Some("ciliate-operator")),
        ] {
            std::fs::write(&path, ciliate_apiserver::kubeconfig_as(&url, token))
                .map_err(|e| LabError::Invalid(format!("{}: {e}", path.display())))?;
        }
        // A child of the underlay's guard: killed with the namespace. It
        // writes the lab's own (admin) kubeconfig.
        drop(self.underlay.spawn_detached(&[
            &bin.to_string_lossy(),
            "--listen",
            &listen,
            "--kubeconfig",
            &self.kubeconfig().display().to_string(),
        ])?);
        wait_listening(&self.underlay, APISERVER_PORT)?;
        // The operator beside it (leader-elected garbage collection, and
        // the nodes' pod CIDRs from the lab's pool in their CiliumNodes).
        let op = self.config.bins.agent.with_file_name("ciliate-operator");
        let log = std::fs::File::create(self.work_dir.join("operator.log"))
            .map_err(|e| LabError::Invalid(format!("operator log: {e}")))?;
        let mut cmd = self.underlay.command(&op.to_string_lossy());
        cmd.args([
            "--k8s-kubeconfig-path",
            &self.kubeconfig_of("ciliate-operator").display().to_string(),
            "--id",
            "lab-operator",
            // Garbage within seconds (an identity unused for 10 s goes),
            // so the lab shows it; Cilium's defaults are 15 and 30 min.
            "--identity-gc-interval",
            "5s",
            "--identity-heartbeat-timeout",
            "10s",
            "--cluster-pool-ipv4-cidr",
            CLUSTER_POOL,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| LabError::Invalid(e.to_string()))?)
        .stderr(log);
        // A child of the underlay's guard: killed with the namespace.
        drop(cmd.spawn().map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })?);
        Ok(())
    }

    /// Register node `n` as a kubelet does (a Node object with its address).
    fn k8s_node(&self, n: usize) -> Result<()> {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.nodes[n].ns.name(), "labels": {"kubernetes.io/hostname": self.nodes[n].ns.name()}},
            "spec": {},
            "status": {"addresses": [{"type": "InternalIP", "address": self.nodes[n].ip.to_string()}]},
        });
        self.k8s_post("/api/v1/nodes", &node).map(|_| ())
    }

    /// POST `body` to `path` of the lab's API server: the object created.
    pub fn k8s_post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let file = self.work_dir.join(format!("k8s-post-{}.json", crate::names::token()));
        std::fs::write(&file, body.to_string())
            .map_err(|e| LabError::Invalid(format!("{}: {e}", file.display())))?;
        let url = format!("http://{UNDERLAY_IP}:{APISERVER_PORT}{path}");
        let data = format!("@{}", file.display());
        let out = netns::run(self.underlay.command("curl").args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
            &url,
        ]));
        let _ = std::fs::remove_file(&file);
        let out = out?;
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        if !code.starts_with('2') {
            return Err(LabError::Invalid(format!("POST {path}: {code} {body}")));
        }
        serde_json::from_str(body).map_err(|e| LabError::Invalid(format!("POST {path}: {e}")))
    }

    /// Create pod `<lab>-<name>` (label app=<name>) of node `n` in the API.
    fn k8s_pod(&self, n: usize, name: &str) -> Result<()> {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{}-{name}", self.config.lab), "namespace": "default",
                "labels": {"app": name}},
            "spec": {"nodeName": self.nodes[n].ns.name(),
                "containers": [{"name": "echo", "image": "ciliate-echo"}]},
        });
        self.k8s_post("/api/v1/namespaces/default/pods", &pod).map(|_| ())
    }

    /// Stop the lab's etcd (every process of the underlay namespace).
    pub fn stop_etcd(&self) {
        for pid in self.underlay.pids() {
            // SAFETY: kill(2) on a process of the lab's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.underlay.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the lab's etcd again (same data directory).
    pub fn restart_etcd(&self) -> Result<()> {
        self.start_etcd()
    }

    /// Start (or restart) the agent of node `n` (0-based).
    pub fn start_agent(&self, n: usize) -> Result<()> {
        self.start_agent_with(n, &self.config.bins)
    }

    /// [`Self::start_agent`] with another build's agent (an upgrade or a
    /// downgrade: `bins.agent` is run, everything else stays).
    pub fn start_agent_with(&self, n: usize, bins: &Binaries) -> Result<()> {
        let node = &self.nodes[n];
        let mut args: Vec<OsString> = vec![
            "--state-dir".into(),
            node.work_dir.join("state").into(),
            "--bpffs".into(),
            bpffs_root(&self.config.lab).into(),
            "--cgroup-root".into(),
            node.cgroup.clone().into(),
            "--socket-lb".into(),
            self.config.socket_lb.to_string().into(),
            "--cluster-pool".into(),
            CLUSTER_POOL.into(),
            "--routing".into(),
            self.config.routing.clone().into(),
        ];
        match self.config.store {
            Store::Local => args.extend([
                "--kvstore".into(),
                "local".into(),
                "--kvstore-path".into(),
                self.work_dir.join("kvstore.json").into(),
            ]),
            Store::Etcd => args.extend([
                "--kvstore".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                format!("{UNDERLAY_IP}:{ETCD_PORT}").into(),
            ]),
        }
        if self.config.k8s {
            args.extend(["--k8s-kubeconfig-path".into(), self.kubeconfig_of("ciliate").into()]);
        }
        args.extend(self.config.agent_args.iter().cloned());
        spawn_agent(&node.ns, bins, &node.socket, &node.log(), &args)
    }

    /// Pids of the agent of node `n`.
    pub fn agent_pids(&self, n: usize) -> Vec<i32> {
        node::agent_pids_in(&self.nodes[n].ns)
    }

    pub fn handle(&self, n: usize) -> NodeHandle<'_> {
        NodeHandle {
            ns: &self.nodes[n].ns,
            bins: &self.config.bins,
            socket: &self.nodes[n].socket,
            mtu: self.config.mtu(),
            lab: &self.config.lab,
        }
    }

    /// Wait until every node's agent counts every node.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let counts: Vec<usize> = self
                .nodes
                .iter()
                .map(|n| {
                    n.client().get::<Status>("/v1/status").map(|s| s.cluster_nodes).unwrap_or(0)
                })
                .collect();
            if counts.iter().all(|c| *c == self.nodes.len()) {
                // One more round for the endpoints' ipcache entries.
                std::thread::sleep(Duration::from_millis(1200));
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Invalid(format!(
                    "the nodes did not find each other: {counts:?} of {}",
                    self.nodes.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `ciliate-echo` command in `ns`, in node `n`'s cgroup when given.
    pub fn echo(&self, ns: &Netns, cgroup_of_node: Option<usize>) -> std::process::Command {
        let mut cmd = ns.command(&self.config.bins.echo.to_string_lossy());
        if let Some(n) = cgroup_of_node {
            node::in_cgroup(&mut cmd, &self.nodes[n].cgroup);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Run `ciliate-echo <args>` in `ns`: stdout, or an error with stderr.
    pub fn run_echo(
        &self,
        ns: &Netns,
        cgroup_of_node: Option<usize>,
        args: &[&str],
    ) -> Result<String> {
        netns::run(self.echo(ns, cgroup_of_node).args(args))
    }
}

impl ClusterLab {
    /// What `ciliate lab status|down` and `--lab` need: node1 as the lab's
    /// node, every node in `nodes`.
    pub fn state(&self) -> node::LabState {
        let n1 = &self.nodes[0];
        node::LabState {
            lab: self.config.lab.clone(),
            node_ns: n1.ns.name().to_owned(),
            pins_dir: n1.pins_dir.clone(),
            router_ip: n1
                .client()
                .get::<Status>("/v1/status")
                .map(|s| s.router_ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            agent_socket: n1.socket.clone(),
            agent_log: n1.log(),
            pods: self.pods.iter().map(|p| p.pod.state.clone()).collect(),
            external_ns: self.external.name().to_owned(),
            node_ip: n1.ip,
            cgroup: n1.cgroup.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| node::LabNodeState {
                    ns: n.ns.name().to_owned(),
                    ip: n.ip,
                    agent_socket: n.socket.clone(),
                    pins_dir: n.pins_dir.clone(),
                })
                .collect(),
        }
    }

    /// Leave the lab running after this guard is gone and record its state.
    pub fn keep(mut self) -> Result<node::LabState> {
        let state = self.state();
        node::save_state(&state)?;
        self.keep = true;
        for p in &mut self.pods {
            p.pod.ns.keep();
        }
        for n in &mut self.nodes {
            n.ns.keep();
        }
        self.external.keep();
        self.underlay.keep();
        if let Some(b) = &mut self.bpffs {
            b.keep();
        }
        Ok(state)
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.pods.clear();
        for n in self.nodes.drain(..) {
            let health = format!("{}-health", n.ns.name());
            let _ = n.ns.delete();
            if netns::exists(&health) {
                let _ = Netns::adopt(&health).delete();
            }
            node::remove_cgroup(&n.cgroup);
        }
        let ext = std::mem::replace(&mut self.external, Netns::existing(""));
        let _ = ext.delete();
        let ul = std::mem::replace(&mut self.underlay, Netns::existing(""));
        let _ = ul.delete();
        drop(self.bpffs.take());
        let _ = std::fs::remove_dir_all(&self.work_dir);
        node::remove_empty_state_dirs();
    }
}

/// Remove the cgroups of every node of lab `lab` (a kept cluster lab).
pub fn remove_cgroups(lab: &str) {
    let Ok(root) = cgroup2_root() else { return };
    let prefix = format!("ciliate-lab-{lab}-node");
    if let Ok(dir) = std::fs::read_dir(&root) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_prefix(&prefix).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit())) {
                node::remove_cgroup(&e.path());
            }
        }
    }
}
