//! The one-node lab: a node namespace running `ciliate-agent`, and pods
//! added through the real `ciliate-cni` plugin binary.
//!
//! ```text
//!  pod ns "<lab>-pod<i>"          node ns "<lab>-node1"  (ciliate-agent)
//!  eth0 10.200.0.x/32  ========== lxc<hash>      tc ingress: from-container
//!  routes: gw scope link,        ciliate_host 10.200.0.1/32 (NOARP)
//!          default via gw          tc egress: from-host   <=> ciliate_net
//!                                route 10.200.0.0/24 dev ciliate_host
//! ```
//!
//! The agent is started in the node's network namespace only (not with `ip netns exec`, whose
//! private mount namespace would hide its bpffs pins from everyone else).
//! Each pod's ARP for its gateway is answered by from-container with the
//! MAC of its own lxc device. Pod → pod: from-container delivers straight
//! into the destination pod (peer redirect). Pod → host: the node's stack.
//! Host → pod: routed to `ciliate_host`, where from-host delivers it with
//! the host identity. Pods carry the labels `app=pod<i>` and the
//! namespace label `default`, so each gets its own identity.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ciliate_api::{Client, models::Endpoint};
use ciliate_datapath::{aya_reexport::TcAttachType, bpffs::PrivateBpffs, loader};
use serde::{Deserialize, Serialize};

use crate::{
    error::{LabError, Result},
    netns::{self, Netns},
};

/// Where `ciliate lab up` records what it made, so `down` can remove it.
pub const STATE_DIR: &str = "/run/ciliate/labs";
/// Port of the echo server in lab pods.
pub const ECHO_PORT: u16 = 7;
/// The node's address on its native device `eth0`, and the external host
/// ("the world") on the other end of it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 2);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 100);
/// The node's native device.
pub const NODE_DEV: &str = "eth0";

/// Where the cgroup v2 hierarchy is (the unified mount of a hybrid host,
/// or the root of a pure v2 one).
pub fn cgroup2_root() -> Result<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let c = std::ffi::CString::new(p).expect("no NUL");
        // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
        let ok = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
        };
        if ok {
            return Ok(p.into());
        }
    }
    Err(LabError::Invalid("no cgroup v2 hierarchy at /sys/fs/cgroup[/unified]".into()))
}

/// The cgroup of lab `lab`: the node's socket LB is attached to it and the
/// lab's processes (pods' clients, host clients) run in it, so the lab's
/// services never translate a socket of the machine or of another lab.
fn cgroup_dir(lab: &str) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join(format!("ciliate-lab-{lab}")))
}

/// Remove a lab cgroup: its processes are killed first (rmdir refuses a
/// populated cgroup).
pub(crate) fn remove_cgroup(dir: &Path) {
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        for pid in &pids {
            // SAFETY: kill(2) on a pid; failure (already gone) is fine.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of the `ciliate-agent` processes in namespace `ns`.
pub fn agent_pids_in(ns: &Netns) -> Vec<i32> {
    ns.pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "ciliate-agent")
        })
        .collect()
}

/// Wait up to 5 s until something in `ns` listens on TCP `port`.
pub fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let sport = format!(":{port}");
    while ns.exec(&["ss", "-Hltn", "sport", "=", &sport])?.is_empty() {
        if Instant::now() > deadline {
            return Err(LabError::Invalid(format!("nothing listens on {port} in {}", ns.name())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Make `cmd`'s process join the cgroup `dir` before it runs.
pub fn in_cgroup(cmd: &mut Command, dir: &Path) {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("no NUL in a cgroup path");
    // SAFETY: between fork and exec only open/write/close are called, on
    // memory prepared before the fork: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The programs a lab runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub agent: PathBuf,
    pub cni: PathBuf,
    pub echo: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, checked to exist.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let b = Self {
            agent: dir.join("ciliate-agent"),
            cni: dir.join("ciliate-cni"),
            echo: dir.join("ciliate-echo"),
        };
        for p in [&b.agent, &b.cni, &b.echo] {
            if !p.exists() {
                return Err(LabError::Invalid(format!(
                    "{} is missing: build the workspace first (cargo build)",
                    p.display()
                )));
            }
        }
        Ok(b)
    }

    /// The binaries built beside the running executable (a test binary in
    /// `target/*/deps` looks one directory up).
    pub fn beside_current_exe() -> Result<Self> {
        let exe =
            std::env::current_exe().map_err(|e| LabError::Invalid(format!("current exe: {e}")))?;
        let mut dir = exe.parent().unwrap_or(Path::new("/")).to_owned();
        if dir.ends_with("deps") {
            dir.pop();
        }
        Self::in_dir(&dir)
    }
}

#[derive(Clone, Debug)]
pub struct NodeLabConfig {
    /// Prefix of every namespace of the lab.
    pub lab: String,
    pub pods: usize,
    /// The node's pod CIDR; the router IP is its first address.
    pub pod_cidr: Ipv4Addr,
    pub pod_cidr_len: u8,
    pub mtu: u32,
    pub bins: Binaries,
    /// Socket load balancing in the node (the agent's `--socket-lb`).
    pub socket_lb: bool,
    /// A services file for the agent's `--services`.
    pub services: Option<PathBuf>,
    /// More agent options.
    pub agent_args: Vec<std::ffi::OsString>,
}

impl NodeLabConfig {
    pub fn new(lab: &str, pods: usize, bins: Binaries) -> Self {
        Self {
            lab: lab.to_owned(),
            pods,
            pod_cidr: Ipv4Addr::new(10, 200, 0, 0),
            pod_cidr_len: 24,
            mtu: 1500,
            bins,
            socket_lb: true,
            services: None,
            agent_args: vec![],
        }
    }

    pub fn router_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_cidr) + 1)
    }

    pub fn validate(lab: &str, pods: usize) -> Result<()> {
        if lab.is_empty()
            || lab.len() > 24
            || !lab.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(LabError::Invalid(format!(
                "lab name {lab:?}: 1-24 characters of letters, digits and '-'"
            )));
        }
        if pods > 250 {
            return Err(LabError::Invalid(format!("{pods} pods: at most 250 fit in the /24")));
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
    pub agent_socket: PathBuf,
    pub agent_log: PathBuf,
    pub pods: Vec<PodState>,
    /// The external host ("the world") and the node's address it sees.
    #[serde(default)]
    pub external_ns: String,
    #[serde(default = "node_ip")]
    pub node_ip: Ipv4Addr,
    #[serde(default)]
    pub cgroup: PathBuf,
    /// Every node of a multi-node lab (the fields above are node1's).
    #[serde(default)]
    pub nodes: Vec<LabNodeState>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabNodeState {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub agent_socket: PathBuf,
    pub pins_dir: PathBuf,
}

fn node_ip() -> Ipv4Addr {
    NODE_IP
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub ns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub lxc: String,
    pub lxc_mac: String,
    pub mac: String,
    pub endpoint_id: u16,
    pub identity: u32,
}

pub struct Pod {
    pub state: PodState,
    pub ns: Netns,
}

/// A running one-node lab. Dropping it removes everything it made (pods,
/// agent, node, pinned maps and links, state) unless [`NodeLab::keep`] was
/// called.
pub struct NodeLab {
    // Field order is drop order: pods before the node (whose guard kills
    // the agent).
    pub pods: Vec<Pod>,
    /// The external host, joined to the node's `eth0`.
    pub external: Netns,
    pub node: Netns,
    pub config: NodeLabConfig,
    /// The lab's cgroup (see [`cgroup_dir`]); removed on drop.
    pub cgroup: PathBuf,
    pub pins_dir: PathBuf,
    pub socket: PathBuf,
    pub work_dir: PathBuf,
    /// The lab's own bpffs (`<work_dir>/bpffs`): its pins never touch the
    /// machine's `/sys/fs/bpf`, and unmounting it removes them all.
    bpffs: Option<PrivateBpffs>,
    keep: bool,
}

/// Remove `/run/ciliate/labs` and `/run/ciliate` when nothing is left in
/// them (remove_dir refuses a non-empty directory).
pub(crate) fn remove_empty_state_dirs() {
    let labs = Path::new(STATE_DIR);
    let _ = std::fs::remove_dir(labs);
    let _ = std::fs::remove_dir(labs.parent().unwrap_or(labs));
}

/// The bpffs mount point of lab `lab`.
fn bpffs_root(lab: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(lab).join("bpffs")
}

/// Start `ciliate-agent` in node namespace `ns` (entering only its network namespace,
/// see the module comment) as node `ns.name()` on device `eth0`, with
/// `socket`, logging to `log`, plus `args`; wait until it answers.
pub fn spawn_agent(
    ns: &Netns,
    bins: &Binaries,
    socket: &Path,
    log: &Path,
    args: &[std::ffi::OsString],
) -> Result<()> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::Invalid(format!("agent log: {e}")))?;
    let mut cmd = ns.command(&bins.agent.to_string_lossy());
    // Labs show every Hubble metric group (an agent's default is none).
    cmd.args(["--node", ns.name(), "--devices", NODE_DEV])
        .args(["--hubble-metrics", "drop,tcp,flow,port-distribution,policy"])
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().map_err(|e| LabError::Invalid(e.to_string()))?)
        .stderr(logf);
    cmd.spawn().map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Up and done restoring (healthz says "restoring" until then).
        let health = Client::new(socket).get::<serde_json::Value>("/v1/healthz");
        if health.is_ok_and(|h| h["status"] == "ok") {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(LabError::Invalid(format!("the agent did not come up; its log:\n{log}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One node of a lab as its pods see it: its namespace, agent socket,
/// the CNI plugin, and the pods' MTU.
pub struct NodeHandle<'a> {
    pub ns: &'a Netns,
    pub bins: &'a Binaries,
    pub socket: &'a Path,
    pub mtu: u32,
    /// Prefix of pod namespaces.
    pub lab: &'a str,
}

impl NodeHandle<'_> {
    pub fn client(&self) -> Client {
        Client::new(self.socket)
    }

    /// The network configuration the lab hands to the CNI plugin.
    pub fn cni_config(&self, labels: &[(&str, &str)]) -> String {
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "ciliate",
            "type": "ciliate-cni",
            "agent_socket": self.socket,
            "mtu": self.mtu,
            "args": {"labels": labels},
        })
        .to_string()
    }

    /// Run the CNI plugin in the node namespace for a pod of Kubernetes
    /// namespace `namespace`: (stdout, success).
    pub fn cni_in(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        config: &str,
        namespace: &str,
    ) -> Result<(String, bool)> {
        let mut cmd = self.ns.command(&self.bins.cni.to_string_lossy());
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.bins.cni.parent().unwrap_or(Path::new("/")))
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={container}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            cmd.spawn().map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })?;
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), out.status.success()))
    }

    /// Create a pod namespace named `<lab>-<name>`, add it through the CNI
    /// plugin with `labels` in Kubernetes namespace `namespace`, and start
    /// its echo server.
    pub fn add_pod_in(&self, name: &str, namespace: &str, labels: &[(&str, &str)]) -> Result<Pod> {
        let ns = Netns::create(&format!("{}-{name}", self.lab))?;
        let container = ns.name().to_owned();
        let netns = ns.path().display().to_string();
        let (out, ok) =
            self.cni_in("ADD", &container, &netns, &self.cni_config(labels), namespace)?;
        if !ok {
            return Err(LabError::Invalid(format!("CNI ADD of {name} failed: {out}")));
        }
        let eps: Vec<Endpoint> =
            self.client().get("/v1/endpoint").map_err(|e| LabError::Invalid(e.to_string()))?;
        let ep = eps
            .into_iter()
            .find(|e| e.container_id == container)
            .ok_or_else(|| LabError::Invalid(format!("no endpoint for {container} after ADD")))?;
        let echo = self.bins.echo.to_string_lossy().into_owned();
        // Children of the guard: killed with the namespace.
        drop(ns.spawn_detached(&[&echo, "serve", &ECHO_PORT.to_string()])?);
        let state = PodState {
            name: name.to_owned(),
            ns: container.clone(),
            container_id: container,
            ip: ep.ip,
            lxc: ep.host_ifname,
            lxc_mac: ep.host_mac,
            mac: ep.mac,
            endpoint_id: ep.id,
            identity: ep.identity,
        };
        Ok(Pod { state, ns })
    }
}

impl NodeLab {
    pub fn up(config: NodeLabConfig) -> Result<Self> {
        NodeLabConfig::validate(&config.lab, config.pods)?;
        let node_name = format!("{}-node1", config.lab);
        let node = Netns::create(&node_name)?;
        let work_dir = PathBuf::from(STATE_DIR).join(&config.lab);
        let root = bpffs_root(&config.lab);
        let _ = PrivateBpffs::remove(&root);
        let _ = std::fs::remove_dir_all(&work_dir);
        let bpffs = PrivateBpffs::mount(&root)
            .map_err(|source| LabError::Datapath { ns: node_name.clone(), source })?;
        let cgroup = cgroup_dir(&config.lab)?;
        remove_cgroup(&cgroup);
        std::fs::create_dir_all(&cgroup)
            .map_err(|e| LabError::Invalid(format!("creating {}: {e}", cgroup.display())))?;
        let external = Netns::create(&format!("{}-ext1", config.lab))?;
        netns::veth(&node, NODE_DEV, &external, "eth0")?;
        node.add_address(NODE_DEV, NODE_IP, 24)?;
        external.add_address("eth0", EXTERNAL_IP, 24)?;
        external.add_route_via(config.pod_cidr, config.pod_cidr_len, NODE_IP)?;
        let mut lab = Self {
            pods: Vec::new(),
            external,
            cgroup,
            pins_dir: root.join("ciliate").join(&node_name),
            socket: work_dir.join("agent.sock"),
            node,
            config,
            work_dir,
            bpffs: Some(bpffs),
            keep: false,
        };
        lab.start_agent()?;
        for i in 0..lab.config.pods {
            let pod =
                lab.add_pod(&format!("pod{}", i + 1), &[("app", &format!("pod{}", i + 1))])?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }

    pub fn agent_log(&self) -> PathBuf {
        self.work_dir.join("agent.log")
    }

    /// Start (or restart) the agent in the node namespace and wait until it
    /// answers.
    pub fn start_agent(&self) -> Result<()> {
        let cidr = format!("{}/{}", self.config.pod_cidr, self.config.pod_cidr_len);
        let mut args: Vec<std::ffi::OsString> = vec!["--pod-cidr".into(), cidr.into()];
        args.extend(["--state-dir".into(), self.work_dir.join("state").into_os_string()]);
        args.extend(["--bpffs".into(), bpffs_root(&self.config.lab).into_os_string()]);
        args.extend(["--socket-lb".into(), self.config.socket_lb.to_string().into()]);
        args.extend(["--cgroup-root".into(), self.cgroup.clone().into_os_string()]);
        if let Some(f) = &self.config.services {
            args.extend(["--services".into(), f.clone().into_os_string()]);
        }
        args.extend(self.config.agent_args.iter().cloned());
        spawn_agent(&self.node, &self.config.bins, &self.socket, &self.agent_log(), &args)
    }

    /// How to reach this lab's node: agent socket, CNI, pods.
    pub fn handle(&self) -> NodeHandle<'_> {
        NodeHandle {
            ns: &self.node,
            bins: &self.config.bins,
            socket: &self.socket,
            mtu: self.config.mtu,
            lab: &self.config.lab,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The network configuration the lab hands to the CNI plugin.
    pub fn cni_config(&self, labels: &[(&str, &str)]) -> String {
        self.handle().cni_config(labels)
    }

    /// Run the CNI plugin in the node namespace for a pod of Kubernetes
    /// namespace `default`: (stdout, success).
    pub fn cni(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        config: &str,
    ) -> Result<(String, bool)> {
        self.handle().cni_in(command, container, netns, config, "default")
    }

    /// [`NodeLab::cni`] for a pod of Kubernetes namespace `namespace`.
    pub fn cni_in(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        config: &str,
        namespace: &str,
    ) -> Result<(String, bool)> {
        self.handle().cni_in(command, container, netns, config, namespace)
    }

    /// Create a pod namespace named `<lab>-<name>`, add it through the CNI
    /// plugin with `labels`, and start its echo server.
    pub fn add_pod(&self, name: &str, labels: &[(&str, &str)]) -> Result<Pod> {
        self.handle().add_pod_in(name, "default", labels)
    }

    /// [`NodeLab::add_pod`] in Kubernetes namespace `namespace`.
    pub fn add_pod_in(&self, name: &str, namespace: &str, labels: &[(&str, &str)]) -> Result<Pod> {
        self.handle().add_pod_in(name, namespace, labels)
    }

    pub fn router_ip(&self) -> Ipv4Addr {
        self.config.router_ip()
    }

    /// Does an echo client in `from` get its answer from `to:port` over
    /// `proto` ("tcp" or "udp") within `timeout_ms` (`None`: the client's
    /// default, 3 s)?
    pub fn reaches(
        &self,
        from: &Netns,
        proto: &str,
        to: Ipv4Addr,
        port: u16,
        timeout_ms: Option<u64>,
    ) -> bool {
        let mut cmd = self.echo(from);
        if let Some(ms) = timeout_ms {
            cmd.env("CILIATE_ECHO_TIMEOUT_MS", ms.to_string());
        }
        cmd.args([proto, &format!("{to}:{port}"), "x"]).stdin(Stdio::null());
        cmd.output().is_ok_and(|o| o.status.success())
    }

    /// A `ciliate-echo` command run in namespace `ns` inside the lab's
    /// cgroup (so the node's socket LB sees its sockets).
    pub fn echo(&self, ns: &Netns) -> Command {
        let mut cmd = ns.command(&self.config.bins.echo.to_string_lossy());
        in_cgroup(&mut cmd, &self.cgroup);
        cmd
    }

    /// Run `ciliate-echo <args>` in `ns` (in the lab's cgroup): stdout, or
    /// an error with stderr.
    pub fn run_echo(&self, ns: &Netns, args: &[&str]) -> Result<String> {
        netns::run(self.echo(ns).args(args).stdin(Stdio::null()))
    }

    /// Pids of the agent processes running in the node.
    pub fn agent_pids(&self) -> Vec<i32> {
        agent_pids_in(&self.node)
    }

    /// The tcx ingress programs on a pod's lxc device.
    pub fn lxc_programs(&self, lxc: &str) -> Result<Vec<String>> {
        attached_programs(self.node.name(), lxc)
    }

    pub fn state(&self) -> LabState {
        LabState {
            lab: self.config.lab.clone(),
            node_ns: self.node.name().to_owned(),
            pins_dir: self.pins_dir.clone(),
            router_ip: self.router_ip(),
            agent_socket: self.socket.clone(),
            agent_log: self.agent_log(),
            pods: self.pods.iter().map(|p| p.state.clone()).collect(),
            external_ns: self.external.name().to_owned(),
            node_ip: NODE_IP,
            cgroup: self.cgroup.clone(),
            nodes: Vec::new(),
        }
    }

    /// Leave the lab running after this guard is gone and record its state
    /// for `ciliate lab status|down`.
    pub fn keep(mut self) -> Result<LabState> {
        let state = self.state();
        save_state(&state)?;
        self.keep = true;
        self.node.keep();
        self.external.keep();
        if let Some(b) = &mut self.bpffs {
            b.keep();
        }
        for p in &mut self.pods {
            p.ns.keep();
        }
        Ok(state)
    }
}

impl Drop for NodeLab {
    fn drop(&mut self) {
        if !self.keep {
            // Pods first, then the node (its guard kills the agent), then
            // what lives outside the namespaces.
            self.pods.clear();
            let health = format!("{}-health", self.node.name());
            let node = std::mem::replace(&mut self.node, Netns::existing(""));
            let _ = node.delete();
            let ext = std::mem::replace(&mut self.external, Netns::existing(""));
            let _ = ext.delete();
            if netns::exists(&health) {
                let _ = Netns::adopt(&health).delete();
            }
            remove_cgroup(&self.cgroup);
            // Unmounting the lab's bpffs removes every pin in it.
            drop(self.bpffs.take());
            let _ = std::fs::remove_dir_all(&self.work_dir);
            remove_empty_state_dirs();
        }
    }
}

/// The tcx ingress programs on device `dev` of namespace `ns`.
pub fn attached_programs(ns: &str, dev: &str) -> Result<Vec<String>> {
    Netns::existing(ns).netlink(|nl| {
        let mut names = loader::tcx_programs(dev, TcAttachType::Ingress)?;
        let filters = nl.ingress_bpf_filters(nl.need(dev)?.index)?;
        names.extend(filters.into_iter().map(|(_, n)| n));
        Ok(names)
    })
}

fn state_path(lab: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{lab}.json"))
}

pub(crate) fn save_state(state: &LabState) -> Result<()> {
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
/// state file), its bpffs (pinned maps and links) and its state. Returns the
/// namespaces removed.
pub fn down(lab: &str) -> Result<Vec<String>> {
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
    if let Ok(cg) = cgroup_dir(lab) {
        remove_cgroup(&cg);
    }
    crate::cluster::remove_cgroups(lab);
    PrivateBpffs::remove(&bpffs_root(lab))
        .map_err(|source| LabError::Datapath { ns: lab.to_owned(), source })?;
    let _ = std::fs::remove_file(state_path(lab));
    let _ = std::fs::remove_dir_all(PathBuf::from(STATE_DIR).join(lab));
    remove_empty_state_dirs();
    Ok(removed)
}

/// `<lab>-node<N>`, its health namespace `<lab>-node<N>-health`,
/// `<lab>-pod<N>` or `<lab>-ext<N>` (and not another lab whose name merely starts with this
/// one's).
fn is_lab_ns(name: &str, prefix: &str) -> bool {
    let name = name.strip_suffix("-health").filter(|n| n.contains("-node")).unwrap_or(name);
    name.strip_prefix(prefix).is_some_and(|rest| {
        ["node", "pod", "ext", "ul"].iter().any(|k| {
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
        assert!(is_lab_ns("ciliate-node1-health", "ciliate-"));
        assert!(!is_lab_ns("ciliate-pod1-health", "ciliate-"));
        assert!(!is_lab_ns("ciliate-x-pod1", "ciliate-"));
        assert!(!is_lab_ns("ciliate-pod", "ciliate-"));
        assert!(!is_lab_ns("other-pod1", "ciliate-"));
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let e = NodeLabConfig::validate("bad name!", 2).unwrap_err().to_string();
        assert!(e.contains("lab name"), "{e}");
        let e = NodeLabConfig::validate("ok", 300).unwrap_err().to_string();
        assert!(e.contains("300 pods"), "{e}");
        assert!(NodeLabConfig::validate("ok", 0).is_ok(), "a lab without pods is fine");
    }
}
