//! The real [`Datapath`]: endpoints go into the node's pinned maps and get
//! their from-container attached, in the agent's own network namespace.

use std::net::Ipv4Addr;

use ciliate_datapath::{
    bpffs::NodePins,
    node::{self, Attached, EndpointSpec},
};

use ciliate_api::models::{Endpoint, EndpointCreate};

use ciliate_common::ipcache::IpcacheEntry;
use ciliate_common::policy::{DIR_EGRESS, DIR_INGRESS};
use std::collections::BTreeMap;

use ciliate_datapath::maps::{
    IpcacheMap, LxcMap, PolicyCapacity, PolicyEntries, PolicyMap, add_policy_batch,
    sync_policy_batch,
};

use crate::{
    endpoint::{Datapath, EndpointError, Endpoints, HEALTH_CONTAINER},
    policy::{Prefix, Resolved},
};

pub struct KernelDatapath {
    pub pins: NodePins,
    /// The node's from-container: loaded and verified once (at start, or
    /// found pinned by a restarted agent), attached to every endpoint.
    program: node::EndpointProgram,
    /// The policy map and what it holds per endpoint, read once (on the
    /// first policy write) and kept in step by every write after.
    policy: Option<(PolicyMap, BTreeMap<u16, PolicyEntries>)>,
    /// Entries one endpoint's policy may hold (`--bpf-policy-map-max`);
    /// the map holds what its pin says.
    pub policy_per_endpoint: usize,
    /// Where each endpoint's policy entries are published after a write
    /// (its pressure metric).
    pub policy_fill: Option<std::sync::Arc<std::sync::Mutex<crate::metrics::PolicyFill>>>,
}

impl KernelDatapath {
    /// The node's datapath for endpoints: loads (or finds pinned) the
    /// node's from-container.
    pub fn new(pins: NodePins) -> Result<Self, ciliate_datapath::DatapathError> {
        let program = node::endpoint_program(&pins)?;
        let per_endpoint = ciliate_common::policy::MAX_ENTRIES as usize;
        Ok(Self {
            pins,
            program,
            policy: None,
            policy_per_endpoint: per_endpoint,
            policy_fill: None,
        })
    }

    /// Whether the endpoint program was loaded and verified by this agent
    /// (not found pinned).
    pub fn verified_now(&self) -> bool {
        self.program.fresh
    }

    /// After a policy write: connections accelerated at the socket layer
    /// that the policy now in force would not let in go back to the normal
    /// path, where the datapath decides. (Nothing to do without
    /// `--sockops-enable`.)
    fn revoke_accelerated(&self) {
        match ciliate_datapath::sockops::revoke_denied(&self.pins.dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                subsystem = "sockops",
                connections = n,
                "policy change: accelerated connections back on the normal path"
            ),
            Err(e) => tracing::warn!(
                subsystem = "sockops",
                error = %e,
                "cannot check accelerated connections against the new policy"
            ),
        }
    }
}

impl Datapath for KernelDatapath {
    fn attach(&mut self, spec: &EndpointSpec) -> Result<Attached, String> {
        node::attach_endpoint(&self.pins, &mut self.program, spec).map_err(|e| e.to_string())
    }
    fn detach(&mut self, ip: Ipv4Addr, lxc: &str) -> Result<(), String> {
        node::detach_endpoint(&self.pins, ip, lxc).map_err(|e| e.to_string())
    }
    fn configure(&mut self, spec: &EndpointSpec) -> Result<(), String> {
        node::configure_endpoint(&self.pins, spec).map(|_| ()).map_err(|e| e.to_string())
    }
    fn set_node_debug(&mut self, on: bool) -> Result<(), String> {
        node::set_node_debug(&self.pins, on).map_err(|e| e.to_string())
    }
    fn device_exists(&self, lxc: &str) -> bool {
        node::device_exists(lxc)
    }
    fn clear_leftovers(&mut self, ip: Option<Ipv4Addr>, lxc: &str) -> Result<(), String> {
        match ip {
            Some(ip) => node::detach_endpoint(&self.pins, ip, lxc).map_err(|e| e.to_string()),
            None => node::clear_device(&self.pins, lxc).map_err(|e| e.to_string()),
        }
    }
    fn sweep(&mut self, keep: &[&str]) -> Result<Vec<String>, String> {
        let gone: Vec<String> = node::endpoint_devices(&self.pins.dir)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|d| !keep.contains(&d.as_str()))
            .collect();
        for d in &gone {
            node::clear_device(&self.pins, d).map_err(|e| e.to_string())?;
        }
        Ok(gone)
    }
    fn sync_cidrs(
        &mut self,
        cidrs: &std::collections::BTreeMap<Prefix, u32>,
    ) -> Result<(), String> {
        let mut ipc = IpcacheMap::from_pin_dir(&self.pins.dir).map_err(|e| e.to_string())?;
        let existing = ipc.dump().map_err(|e| e.to_string())?;
        let local = |id: u32| id & ciliate_common::identity::LOCAL_FLAG != 0;
        for (&(net, len), &identity) in cidrs {
            match existing.iter().find(|(n, l, _)| *n == net && *l == len) {
                // An endpoint's or the host's own entry wins.
                Some((_, _, e)) if !local(e.identity) || e.identity == identity => continue,
                _ => {}
            }
            let entry = IpcacheEntry { identity, ..Default::default() };
            ipc.upsert(net, len, &entry).map_err(|e| e.to_string())?;
        }
        for (net, len, e) in existing {
            if local(e.identity) && !cidrs.contains_key(&(net, len)) {
                ipc.remove(net, len).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
    fn sync_policies(
        &mut self,
        batch: &[(u16, Resolved)],
    ) -> Result<(), ciliate_datapath::DatapathError> {
        self.write_batch(batch, false)
    }

    fn add_policies(
        &mut self,
        batch: &[(u16, Resolved)],
    ) -> Result<(), ciliate_datapath::DatapathError> {
        self.write_batch(batch, true)
    }
    fn policy_holders(&mut self) -> Result<std::collections::BTreeSet<u16>, String> {
        let (_, held) = self.policy_map().map_err(|e| e.to_string())?;
        Ok(held.keys().copied().collect())
    }
    fn check(&mut self, ep: &Endpoint) -> Result<(), String> {
        crate::api::Probe::check(&self.probe()?, ep)
    }
}

impl KernelDatapath {
    /// Make each endpoint's entries in the map exactly those of `entries`
    /// (see `sync_policy_batch`), or add them (`add`: see
    /// `add_policy_batch`), and publish what every endpoint holds.
    /// Write resolved policies (all of each endpoint's, or `add`itions
    /// only), then take out accelerated connections they no longer let in.
    fn write_batch(
        &mut self,
        batch: &[(u16, Resolved)],
        add: bool,
    ) -> Result<(), ciliate_datapath::DatapathError> {
        let entries = crate::endpoint::batch_entries(batch)?;
        self.write_policies(&entries, add)?;
        self.revoke_accelerated();
        Ok(())
    }

    fn write_policies(
        &mut self,
        entries: &[(u16, PolicyEntries)],
        add: bool,
    ) -> Result<(), ciliate_datapath::DatapathError> {
        let per_endpoint = self.policy_per_endpoint;
        let fill = self.policy_fill.clone();
        let (map, held) = self.policy_map()?;
        let capacity = PolicyCapacity { total: map.capacity()?, per_endpoint };
        let r = if add {
            add_policy_batch(map, held, entries, capacity).map(drop)
        } else {
            sync_policy_batch(map, held, entries, capacity).map(drop)
        };
        // Refused or not, `held` is what the map holds.
        if let Some(fill) = fill {
            let counts = held.iter().map(|(id, e)| (*id, e.len())).collect();
            let mut f = fill.lock().unwrap_or_else(|e| e.into_inner());
            *f = crate::metrics::PolicyFill { held: counts, share: per_endpoint };
        }
        r
    }

    /// A probe of this node's endpoints, for readers outside the endpoint
    /// manager.
    pub fn probe(&self) -> Result<KernelProbe, String> {
        Ok(KernelProbe {
            pins_dir: self.pins.dir.clone(),
            program: self.program.id().map_err(|e| e.to_string())?,
        })
    }
}

/// Checks an endpoint's datapath read-only: its device (the ifindex it was
/// attached to), the node's from-container at its ingress, its lxc and
/// ipcache entries, and its policy enforcement markers. Usable from any
/// thread while the endpoint manager works.
pub struct KernelProbe {
    pins_dir: std::path::PathBuf,
    /// The node's from-container program id.
    program: u32,
}

impl crate::api::Probe for KernelProbe {
    fn check(&self, ep: &Endpoint) -> Result<(), String> {
        let ifindex = ifindex_of(&ep.host_ifname)
            .ok_or_else(|| format!("host device {} is gone", ep.host_ifname))?;
        if ifindex != ep.host_ifindex {
            return Err(format!(
                "host device {} was replaced (ifindex {ifindex}, attached to {})",
                ep.host_ifname, ep.host_ifindex
            ));
        }
        let nl = ciliate_datapath::netlink::Netlink::here().map_err(|e| e.to_string())?;
        let filters = nl.ingress_bpf_filters(ifindex).map_err(|e| e.to_string())?;
        if !filters.iter().any(|(id, _)| *id == self.program) {
            return Err(format!("from-container is not attached to {}", ep.host_ifname));
        }
        let lxc = LxcMap::from_pin_dir(&self.pins_dir).map_err(|e| e.to_string())?;
        match lxc.get(ep.ip).map_err(|e| e.to_string())? {
            Some(i) if i.ifindex == ifindex && i.identity == ep.identity => {}
            Some(i) => {
                return Err(format!(
                    "lxc entry of {} says ifindex {} identity {}",
                    ep.ip, i.ifindex, i.identity
                ));
            }
            None => return Err(format!("no lxc entry for {}", ep.ip)),
        }
        let ipc = IpcacheMap::from_pin_dir(&self.pins_dir).map_err(|e| e.to_string())?;
        match ipc.lookup(ep.ip).map_err(|e| e.to_string())? {
            Some(e) if e.identity == ep.identity => {}
            other => {
                return Err(format!(
                    "ipcache says identity {} for {}",
                    other.map_or(0, |e| e.identity),
                    ep.ip
                ));
            }
        }
        let policy = PolicyMap::from_pin_dir(&self.pins_dir).map_err(|e| e.to_string())?;
        for (dir, name, column) in [
            (DIR_INGRESS, "ingress", &ep.ingress_enforcement),
            (DIR_EGRESS, "egress", &ep.egress_enforcement),
        ] {
            if policy.enforced(ep.id, dir).map_err(|e| e.to_string())? != (column == "Enabled") {
                return Err(format!("{name} policy enforcement is not as resolved ({column})"));
            }
        }
        Ok(())
    }
}

/// The ifindex of `dev` in the agent's network namespace.
fn ifindex_of(dev: &str) -> Option<u32> {
    let name = std::ffi::CString::new(dev).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

impl KernelDatapath {
    /// The policy map and what it holds per endpoint, read once (on first
    /// use) and kept in step by every write after.
    fn policy_map(
        &mut self,
    ) -> Result<(&mut PolicyMap, &mut BTreeMap<u16, PolicyEntries>), ciliate_datapath::DatapathError>
    {
        if self.policy.is_none() {
            let map = PolicyMap::from_pin_dir(&self.pins.dir)?;
            let held = map.entries_by_endpoint()?;
            self.policy = Some((map, held));
        }
        let Some((map, held)) = &mut self.policy else { unreachable!("set above") };
        Ok((map, held))
    }
}

/// Where a cgroup v2 hierarchy is mounted: the unified mount of a hybrid
/// host, the root of a pure v2 host, or one the agent mounts itself under
/// `/run/ciliate/cgroupv2` (as Cilium does under /run/cilium).
pub fn ensure_cgroup2() -> std::io::Result<std::path::PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    let is_cgroup2 = |p: &str| {
        let Ok(c) = std::ffi::CString::new(p) else { return false };
        // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
        }
    };
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/run/ciliate/cgroupv2"] {
        if is_cgroup2(p) {
            return Ok(p.into());
        }
    }
    let target = "/run/ciliate/cgroupv2";
    std::fs::create_dir_all(target)?;
    // SAFETY: mount(2) with static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/run/ciliate/cgroupv2".as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(target.into())
}

/// The health endpoint, as Cilium's: a namespace `<node>-health` with an
/// address from IPAM and the reserved identity `health` (4), plumbed like a
/// pod. Created when missing (also when its namespace vanished while the
/// agent was down: restore dropped the endpoint then).
pub fn ensure_health_endpoint<D: Datapath>(
    eps: &mut Endpoints<D>,
    node: &str,
) -> Result<Endpoint, EndpointError> {
    if let Some(ep) = eps.by_container(HEALTH_CONTAINER) {
        return Ok(ep.clone());
    }
    let internal = |e: String| EndpointError::Internal(format!("health endpoint: {e}"));
    let ns = format!("{node}-health");
    let netns = format!("/run/netns/{ns}");
    if !std::path::Path::new(&netns).exists() {
        ciliate_datapath::netns::create_named(&ns).map_err(|e| internal(e.to_string()))?;
        ciliate_datapath::netlink::in_netns(std::path::Path::new(&netns), |nl| {
            nl.set_up(nl.need("lo")?.index, true)
        })
        .map_err(|e| internal(e.to_string()))?;
    }
    let ip = eps.ipam.allocate(HEALTH_CONTAINER).map_err(|e| internal(e.to_string()))?;
    let lxc = node::lxc_name(HEALTH_CONTAINER, node);
    let link = node::PodLink {
        netns: &netns,
        ifname: "eth0",
        lxc: &lxc,
        ip,
        gateway: eps.ipam.cidr.router(),
        mtu: 1500,
    };
    let mac = node::create_pod_link(&link).map_err(|e| internal(e.to_string()))?;
    eps.create_any(EndpointCreate {
        container_id: HEALTH_CONTAINER.into(),
        netns,
        ifname: "eth0".into(),
        host_ifname: lxc,
        ip,
        mac,
        labels: [("reserved:health".to_string(), String::new())].into(),
        pod_name: String::new(),
        named_ports: Default::default(),
    })
}

/// The node's load-balancer maps, opened on first use.
pub struct KernelLb {
    pub pin_dir: std::path::PathBuf,
    maps: Option<ciliate_datapath::lbmaps::LbMaps>,
}

impl KernelLb {
    pub fn new(pin_dir: std::path::PathBuf) -> Self {
        Self { pin_dir, maps: None }
    }

    fn maps(&mut self) -> Result<&mut ciliate_datapath::lbmaps::LbMaps, String> {
        if self.maps.is_none() {
            let m = ciliate_datapath::lbmaps::LbMaps::from_pin_dir(&self.pin_dir)
                .map_err(|e| e.to_string())?;
            self.maps = Some(m);
        }
        Ok(self.maps.as_mut().expect("set above"))
    }
}

impl crate::services::LbDatapath for KernelLb {
    fn upsert_backend(
        &mut self,
        id: u32,
        b: &ciliate_datapath::lbmaps::Backend,
    ) -> Result<(), String> {
        self.maps()?.upsert_backend(id, b).map_err(|e| e.to_string())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), String> {
        self.maps()?.remove_backend(id).map_err(|e| e.to_string())
    }
    fn write_frontend(
        &mut self,
        fe: &ciliate_datapath::lbmaps::Frontend,
        w: &crate::services::FrontendWrite,
    ) -> Result<(), String> {
        let m = self.maps()?;
        let idx = w.master.rev_nat_index;
        let e = |e: ciliate_datapath::DatapathError| e.to_string();
        m.upsert_revnat(idx, fe).map_err(e)?;
        match &w.maglev {
            Some(t) => m.set_maglev(idx, t).map_err(e)?,
            None => m.remove_maglev(idx).map_err(e)?,
        }
        m.set_src_ranges(idx, &w.ranges).map_err(e)?;
        m.write_frontend(fe, &w.master, &w.slots).map_err(e)
    }
    fn remove_frontend(
        &mut self,
        fe: &ciliate_datapath::lbmaps::Frontend,
        rev_nat_index: u16,
    ) -> Result<(), String> {
        let m = self.maps()?;
        let e = |e: ciliate_datapath::DatapathError| e.to_string();
        m.remove_frontend(fe).map_err(e)?;
        m.remove_maglev(rev_nat_index).map_err(e)?;
        m.set_src_ranges(rev_nat_index, &[]).map_err(e)?;
        m.remove_revnat(rev_nat_index).map_err(e)
    }
    fn pinned_backends(&self) -> Result<std::collections::BTreeSet<u32>, String> {
        let ct = ciliate_datapath::maps::CtMaps::from_pin_dir(&self.pin_dir)
            .map_err(|e| e.to_string())?;
        ct.service_backends(ciliate_datapath::maps::monotonic_secs()).map_err(|e| e.to_string())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Cluster membership in the node's maps and routes.
pub struct KernelCluster {
    pub pin_dir: std::path::PathBuf,
    pub routing: crate::cluster::Routing,
    /// The native device routes to other nodes go through.
    pub device: Option<String>,
    /// The ipcache, opened at the first write (not once per record).
    pub ipcache: Option<IpcacheMap>,
}

impl KernelCluster {
    fn ipcache(&mut self) -> Result<&mut IpcacheMap, String> {
        if self.ipcache.is_none() {
            let m = IpcacheMap::from_pin_dir(&self.pin_dir).map_err(|e| e.to_string())?;
            self.ipcache = Some(m);
        }
        Ok(self.ipcache.as_mut().expect("opened above"))
    }
}

impl crate::cluster::ClusterDatapath for KernelCluster {
    fn upsert_remote_ip(&mut self, r: &crate::cluster::IpRecord) -> Result<(), String> {
        let e = IpcacheEntry {
            identity: r.identity,
            tunnel_endpoint: r.host_ip.octets(),
            ..Default::default()
        };
        self.ipcache()?.upsert(r.ip, 32, &e).map_err(|e| e.to_string())
    }
    fn remove_remote_ip(&mut self, ip: Ipv4Addr) -> Result<(), String> {
        self.ipcache()?.remove(ip, 32).map_err(|e| e.to_string())
    }
    fn upsert_node(&mut self, n: &crate::cluster::NodeRecord) -> Result<(), String> {
        let e =
            IpcacheEntry { identity: ciliate_common::identity::REMOTE_NODE, ..Default::default() };
        let ipc = self.ipcache()?;
        ipc.upsert(n.ip, 32, &e).map_err(|e| e.to_string())?;
        // The node's pod CIDR with the node as tunnel endpoint (Cilium's
        // tunnel map): pods not yet in the ipcache are still reached.
        if let Some(cidr) = n.cidr() {
            let t = IpcacheEntry {
                identity: ciliate_common::identity::WORLD,
                tunnel_endpoint: n.ip.octets(),
                ..Default::default()
            };
            ipc.upsert(cidr.net, cidr.len, &t).map_err(|e| e.to_string())?;
        }
        if self.routing == crate::cluster::Routing::Native {
            let cidr = n.cidr().ok_or_else(|| format!("node {}: bad pod CIDR", n.name))?;
            let dev = match &self.device {
                Some(d) => Some(node::link_info(d).map_err(|e| e.to_string())?.1),
                None => None,
            };
            let r = ciliate_datapath::netlink::Route {
                gateway: Some(n.ip),
                dev,
                ..ciliate_datapath::netlink::Route::to(cidr.net, cidr.len)
            };
            node::replace_route(&r).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn remove_node(&mut self, n: &crate::cluster::NodeRecord) -> Result<(), String> {
        let ipc = self.ipcache()?;
        ipc.remove(n.ip, 32).map_err(|e| e.to_string())?;
        if let Some(cidr) = n.cidr() {
            ipc.remove(cidr.net, cidr.len).map_err(|e| e.to_string())?;
        }
        if self.routing == crate::cluster::Routing::Native
            && let Some(cidr) = n.cidr()
        {
            // Gone already is fine.
            let _ = node::del_route(cidr.net, cidr.len);
        }
        Ok(())
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The XDP prefilter's pinned maps.
pub struct KernelPrefilter(ciliate_datapath::nodemaps::PrefilterMaps);

impl KernelPrefilter {
    /// The maps of the node pinned in `dir` (they exist once XDP was
    /// attached).
    pub fn new(dir: &std::path::Path) -> Result<Self, String> {
        ciliate_datapath::nodemaps::PrefilterMaps::from_pin_dir(dir)
            .map(Self)
            .map_err(|e| e.to_string())
    }
}

impl crate::prefilter::PrefilterDatapath for KernelPrefilter {
    fn insert(&mut self, (net, len): crate::prefilter::Cidr, slot: u32) -> Result<(), String> {
        self.0.insert(net, len, slot).map_err(|e| e.to_string())
    }
    fn remove(&mut self, (net, len): crate::prefilter::Cidr) -> Result<(), String> {
        self.0.remove(net, len).map_err(|e| e.to_string())
    }
    fn zero(&mut self, slot: u32) -> Result<(), String> {
        self.0.zero(slot).map_err(|e| e.to_string())
    }
    fn stats(&self, slot: u32) -> Result<(u64, u64), String> {
        self.0.stats(slot).map_err(|e| e.to_string())
    }
    fn list(&self) -> Result<Vec<crate::prefilter::Cidr>, String> {
        let all = self.0.list().map_err(|e| e.to_string())?;
        Ok(all.into_iter().map(|(net, len, _)| (net, len)).collect())
    }
}
