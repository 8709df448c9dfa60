//! Loading objects with their load-time configuration, and attaching them.
//!
//! Maps are pinned by name in the node's pin directory, so every object of a
//! node shares them and a restarted agent reuses them. tc programs attach
//! through tcx links that are pinned too: the datapath keeps forwarding
//! while no agent runs.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions},
};
use ciliate_common::config::{ENDPOINT_F_CONFIGURED, HOST_CONFIG_SYMBOL, HostConfig};

use crate::{
    bpffs::NodePins,
    error::{DatapathError, Result},
    objects::{self, Object},
};

/// A loaded object: aya's handle plus the name used in errors.
pub struct Loaded {
    pub name: &'static str,
    pub ebpf: Ebpf,
}

/// Load `object`, pinning its maps under `pins`, after `configure` has set
/// its globals.
pub fn load_with<'a>(
    object: &Object,
    pins: &'a NodePins,
    configure: impl FnOnce(&mut EbpfLoader<'a>),
) -> Result<Loaded> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&pins.dir);
    for (name, max) in &pins.capacities {
        loader.map_max_entries(name, *max);
    }
    // Only the objects that balance have the global.
    loader.override_global(ciliate_common::lb::MAGLEV_SIZE_SYMBOL, &pins.maglev_size, false);
    configure(&mut loader);
    // Pins an older build (or other capacities) made with another
    // definition are set aside, made anew by the load, and their entries
    // carried over (see `migrate`).
    crate::migrate::set_aside(object.bytes, &pins.dir, &pins.capacities)?;
    let ebpf = loader
        .load(object.bytes)
        .map_err(|e| DatapathError::Load { object: object.name.to_owned(), source: Box::new(e) })?;
    crate::migrate::finish(&pins.dir)?;
    Ok(Loaded { name: object.name, ebpf })
}

/// Load embedded object `name` with `cfg` as its configuration global
/// `symbol`.
fn load_configured<T: aya::Pod>(
    pins: &NodePins,
    name: &str,
    symbol: &'static str,
    cfg: &T,
) -> Result<Loaded> {
    let object = objects::by_name(name).expect("every object this crate names is built");
    load_with(object, pins, |l| {
        l.override_global(symbol, cfg, true);
    })
}

/// Load the lxc object (the node's from-container and its tail calls, in
/// the node's pinned call map). It serves every endpoint of the node:
/// each one's configuration is its entry in `ciliate_ep_config`.
pub fn load_lxc(pins: &NodePins) -> Result<Loaded> {
    let object = objects::by_name("lxc").expect("every object this crate names is built");
    let mut l = load_with(object, pins, |_| {})?;
    l.fill_calls(objects::programs::LXC_CALLS_MAP, &objects::programs::LXC_CALLS)?;
    l.fill_calls(objects::programs::LXC_DEBUG_MAP, &objects::programs::LXC_DEBUG)?;
    Ok(l)
}

/// Load the host object (programs of `ciliate_host`) with its configuration.
pub fn load_host(pins: &NodePins, cfg: &HostConfig) -> Result<Loaded> {
    let cfg = HostConfig { flags: cfg.flags | ENDPOINT_F_CONFIGURED, ..*cfg };
    let mut l = load_configured(pins, "host", HOST_CONFIG_SYMBOL, &cfg)?;
    l.fill_calls(objects::programs::HOST_DEBUG_MAP, &objects::programs::HOST_DEBUG)?;
    Ok(l)
}

/// Load the socket-LB object (no configuration: it only reads the maps).
pub fn load_sock(pins: &NodePins) -> Result<Loaded> {
    let object = objects::by_name("sock").expect("every object this crate names is built");
    load_with(object, pins, |_| {})
}

/// FNV-1a (64 bit) over `parts`, in hex: what a node's programs were
/// loaded from.
fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The raw bytes of a configuration block.
fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` is plain `#[repr(C)]` data with explicit padding;
    // reading its bytes is reading initialised memory of its size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The programs of one object on a node, loaded and verified once and
/// pinned in `<pins>/progs/<object>-<fingerprint>/<program>`, where the
/// fingerprint is that of the object's bytes and its configuration: a
/// restarted agent with the same binary (and configuration) finds them
/// there and verifies nothing; a new binary loads anew.
#[derive(Clone, Debug)]
pub struct NodeObject {
    pub dir: std::path::PathBuf,
    /// Loaded (and verified) by this call, not found pinned.
    pub fresh: bool,
}

impl NodeObject {
    /// The pinned tc program `name`.
    pub fn classifier(&self, name: &str) -> Result<SchedClassifier> {
        SchedClassifier::from_pin(self.dir.join(name))
            .map_err(|source| DatapathError::program("opening the pinned", name, source))
    }

    /// The path of pinned program `name`.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }
}

/// Make sure the programs of `object` (with configuration global `global`,
/// when it has one) are loaded and pinned for this node; see
/// [`NodeObject`]. The pins of other versions go (programs still attached
/// stay loaded through their links until those are replaced).
pub fn node_object<T: aya::Pod>(
    pins: &NodePins,
    object: &str,
    global: Option<(&'static str, &T)>,
) -> Result<NodeObject> {
    let obj = objects::by_name(object).expect("every object this crate names is built");
    let config = global.map(|(_, c)| bytes_of(c)).unwrap_or(&[]);
    let progs = pins.dir.join("progs");
    let capacities: Vec<u8> = pins
        .capacities
        .iter()
        .flat_map(|(n, m)| n.bytes().chain(m.to_le_bytes()))
        .chain(pins.maglev_size.to_le_bytes())
        .collect();
    let dir = progs.join(format!("{object}-{}", fingerprint(&[obj.bytes, config, &capacities])));
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::Io { what, path, source }
    };
    // Complete when every program of the object is pinned there.
    let pinned = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    let fresh = pinned == 0 || pinned < programs_of(object).len();
    if fresh {
        let _ = std::fs::remove_dir_all(&dir);
        let mut loaded = match (object, global) {
            ("lxc", _) => load_lxc(pins)?,
            (_, Some((symbol, cfg))) => {
                let mut l = load_configured(pins, object, symbol, cfg)?;
                if object == "host" {
                    use objects::programs::{HOST_DEBUG, HOST_DEBUG_MAP};
                    l.fill_calls(HOST_DEBUG_MAP, &HOST_DEBUG)?;
                }
                l
            }
            (_, None) => load_with(obj, pins, |_| {})?,
        };
        loaded.load_all()?;
        std::fs::create_dir_all(&dir).map_err(io("creating program pin directory", &dir))?;
        for (name, prog) in loaded.ebpf.programs_mut() {
            prog.pin(dir.join(name)).map_err(|source| DatapathError::Pin {
                what: format!("program {name}"),
                path: dir.join(name),
                source: Box::new(source),
            })?;
        }
    }
    for e in std::fs::read_dir(&progs).into_iter().flatten().flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&format!("{object}-")) && e.path() != dir {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(NodeObject { dir, fresh })
}

/// The programs of each object (what [`node_object`] pins).
fn programs_of(object: &str) -> &'static [&'static str] {
    use objects::programs::*;
    match object {
        "lxc" => {
            &[FROM_CONTAINER, LXC_CALLS[0], LXC_CALLS[1], LXC_DEBUG[0], LXC_DEBUG[1], LXC_DEBUG[2]]
        }
        "host" => &[
            FROM_HOST,
            FROM_NETDEV,
            TO_NETDEV,
            FROM_OVERLAY,
            HOST_DEBUG[0],
            HOST_DEBUG[1],
            HOST_DEBUG[2],
            HOST_DEBUG[3],
        ],
        "sock" => &SOCK,
        "xdp" => &[XDP_ENTRY],
        "sockops" => &[SOCKOPS, SK_MSG],
        _ => &[],
    }
}

/// What the verifier reported for one loaded program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifierCost {
    pub object: &'static str,
    pub program: String,
    /// Instructions the verifier processed (`verified_insns` of the
    /// program's info: the "processed N insns" of the verifier log).
    pub processed_insns: u32,
}

impl Loaded {
    /// Load every program of the object into the kernel and report what the
    /// verifier spent on each. Fails on the first program that does not load.
    pub fn load_all(&mut self) -> Result<Vec<VerifierCost>> {
        use aya::programs::Program;
        let object = self.name;
        let mut out = Vec::new();
        for (name, prog) in self.ebpf.programs_mut() {
            let err = |source| {
                DatapathError::program(
                    format!("loading (object {object})"),
                    name.to_owned(),
                    source,
                )
            };
            match prog {
                // Tail-call targets are loaded with their object already.
                Program::SchedClassifier(p) if p.fd().is_ok() => {}
                Program::SchedClassifier(p) => p.load().map_err(err)?,
                Program::Xdp(p) => p.load().map_err(err)?,
                Program::CgroupSockAddr(p) => p.load().map_err(err)?,
                Program::CgroupSock(p) => p.load().map_err(err)?,
                Program::SockOps(p) => p.load().map_err(err)?,
                Program::SkMsg(p) => p.load().map_err(err)?,
                other => {
                    return Err(DatapathError::UnsupportedProgram {
                        object: object.into(),
                        program: name.into(),
                        kind: format!("{:?}", other.prog_type()),
                    });
                }
            }
            let info = prog.info().map_err(|source| {
                DatapathError::program("reading info of", name.to_owned(), source)
            })?;
            out.push(VerifierCost {
                object,
                program: name.to_owned(),
                processed_insns: info.verified_instruction_count().unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(out)
    }

    /// Load the tc programs `names` and put each at its index in the
    /// object's program array `map`.
    pub fn fill_calls(&mut self, map: &str, names: &[&str]) -> Result<()> {
        let mut fds = Vec::new();
        for name in names {
            let fd = self
                .classifier(name)?
                .fd()
                .map_err(|source| DatapathError::program("reading the fd of", *name, source))?;
            fds.push(fd.try_clone().map_err(|source| DatapathError::Io {
                what: "cloning the fd of program",
                path: (*name).into(),
                source,
            })?);
        }
        let object = self.name;
        let m = self
            .ebpf
            .map_mut(map)
            .ok_or_else(|| DatapathError::NoMap { object: object.into(), map: map.into() })?;
        let mut calls =
            aya::maps::ProgramArray::try_from(m).map_err(|source| DatapathError::Map {
                action: "opening".into(),
                map: map.into(),
                source: Box::new(source),
            })?;
        for (i, fd) in fds.iter().enumerate() {
            calls.set(i as u32, fd, 0).map_err(|source| DatapathError::Map {
                action: format!("setting call {i} of"),
                map: map.into(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Pin map `name` of this object at `path` (replacing what is there):
    /// a program array empties when its last holder in user space goes, so
    /// the calls of an attached program must stay pinned.
    pub fn pin_map(&mut self, name: &str, path: &Path) -> Result<()> {
        let object = self.name;
        let m = self
            .ebpf
            .map(name)
            .ok_or_else(|| DatapathError::NoMap { object: object.into(), map: name.into() })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                what: "creating map pin directory",
                path: dir.to_owned(),
                source,
            })?;
        }
        let _ = std::fs::remove_file(path);
        let data = match m {
            aya::maps::Map::ProgramArray(d) => d,
            _ => {
                return Err(DatapathError::NoMap { object: object.into(), map: name.into() });
            }
        };
        data.pin(path).map_err(|source| DatapathError::Pin {
            what: format!("map {name}"),
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// The tc program `name`, loaded into the kernel.
    pub fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let object = self.name;
        let prog = self.ebpf.program_mut(name).ok_or_else(|| DatapathError::NoProgram {
            object: object.into(),
            program: name.into(),
        })?;
        let prog: &mut SchedClassifier = prog.try_into().map_err(|source| {
            DatapathError::program("expecting a tc classifier in", name, source)
        })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| {
                DatapathError::program(format!("loading (object {object})"), name, source)
            })?;
        }
        Ok(prog)
    }

    /// Attach tc program `name` to `device` (see [`attach_tc`]).
    pub fn attach_tc(
        &mut self,
        name: &str,
        device: &str,
        attach: TcAttachType,
        pin: &Path,
    ) -> Result<()> {
        attach_tc(self.classifier(name)?, name, device, attach, pin)
    }
}

/// Attach tc program `prog` (called `name`) to `device` (in the calling
/// thread's network namespace) through tcx and pin the link at `pin`,
/// replacing what was pinned there: the new program is attached before the
/// old link goes, so no packet passes unprocessed.
pub fn attach_tc(
    prog: &mut SchedClassifier,
    name: &str,
    device: &str,
    attach: TcAttachType,
    pin: &Path,
) -> Result<()> {
    let link_id = prog
        .attach_with_options(device, attach, TcAttachOptions::TcxOrder(Default::default()))
        .map_err(|source| {
            DatapathError::program(format!("attaching to {device} ({attach:?})"), name, source)
        })?;
    let link = prog.take_link(link_id).map_err(|source| {
        DatapathError::program(format!("taking link on {device}"), name, source)
    })?;
    let link: FdLink = link.try_into().map_err(|e| DatapathError::Device {
        name: device.into(),
        reason: format!("tcx link of {name} is not an fd link: {e}"),
    })?;
    replace_pin(link, pin, name)
}

/// Priority and handle of the tc filter (cls_bpf, direct action) through
/// which an endpoint's device runs from-container.
pub const ENDPOINT_FILTER_PRIORITY: u16 = 1;
pub const ENDPOINT_FILTER_HANDLE: u32 = 1;

/// Attach tc program `prog` (called `name`) to `device`'s ingress as a tc
/// filter (clsact + cls_bpf in direct-action mode), replacing the filter
/// of our priority and handle if there is one. A filter lives on its device
/// whatever happens to this process (nothing to pin), and attaching one
/// costs no RCU grace period (tcx's link create does: ~10-20 ms a device
/// on a small VM, the larger part of a CNI ADD).
pub fn attach_tc_filter(
    prog: &mut SchedClassifier,
    name: &str,
    device: &str,
    replace: bool,
) -> Result<()> {
    use aya::programs::tc::{NlOptions, SchedClassifierLink, TcHandle, qdisc_add_clsact};
    let fail = |what: &str, source: aya::programs::ProgramError| {
        DatapathError::program(format!("{what} {device}"), name, source)
    };
    match qdisc_add_clsact(device) {
        Ok(()) => {}
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(fail("adding clsact to", e.into())),
    }
    let handle = TcHandle::from(ENDPOINT_FILTER_HANDLE);
    let id = if replace {
        let link = SchedClassifierLink::attached(
            device,
            TcAttachType::Ingress,
            ENDPOINT_FILTER_PRIORITY,
            handle,
            None,
        )
        .map_err(|e| {
            fail(
                "finding the filter on",
                aya::programs::ProgramError::from(aya::programs::tc::TcError::IoError(e)),
            )
        })?;
        prog.attach_to_link(link).map_err(|e| fail("replacing the filter on", e))?
    } else {
        let opts = NlOptions { priority: ENDPOINT_FILTER_PRIORITY, handle, ..Default::default() };
        prog.attach_with_options(device, TcAttachType::Ingress, TcAttachOptions::Netlink(opts))
            .map_err(|e| fail("attaching to", e))?
    };
    let link = prog.take_link(id).map_err(|e| fail("taking the filter of", e))?;
    // Dropping the link would delete the filter: it belongs to the device.
    std::mem::forget(link);
    Ok(())
}

/// Remove our filter from `device`'s ingress (none is fine).
pub fn detach_tc_filter(device: &str) -> Result<()> {
    use aya::programs::{
        Link as _,
        tc::{SchedClassifierLink, TcHandle},
    };
    let link = match SchedClassifierLink::attached(
        device,
        TcAttachType::Ingress,
        ENDPOINT_FILTER_PRIORITY,
        TcHandle::from(ENDPOINT_FILTER_HANDLE),
        None,
    ) {
        Ok(l) => l,
        // The device is gone: so is its filter.
        Err(_) => return Ok(()),
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(aya::programs::ProgramError::TcError(aya::programs::tc::TcError::NetlinkError(e)))
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(DatapathError::program(format!("detaching from {device}"), "filter", e)),
    }
}

/// Is program `prog` attached (tcx) to `device` in direction `attach`, with
/// its link pinned at `pin`? Then attaching it again would change nothing.
pub fn is_attached(prog: &SchedClassifier, device: &str, attach: TcAttachType, pin: &Path) -> bool {
    let Ok(id) = prog.info().map(|i| i.id()) else { return false };
    pin.exists()
        && SchedClassifier::query_tcx(device, attach)
            .is_ok_and(|(_, infos)| infos.iter().any(|i| i.id() == id))
}

/// Pin `link` (of program `name`) at `pin`, replacing what was pinned
/// there only once the new pin exists.
pub fn replace_pin(link: FdLink, pin: &Path, name: &str) -> Result<()> {
    let dir = pin.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
        what: "creating link pin directory",
        path: dir.to_owned(),
        source,
    })?;
    let mut old = pin.as_os_str().to_owned();
    old.push("_old");
    let old = std::path::PathBuf::from(old);
    let had_old = std::fs::rename(pin, &old).is_ok();
    link.pin(pin).map_err(|source| DatapathError::Pin {
        what: format!("link of {name}"),
        path: pin.to_owned(),
        source: Box::new(source),
    })?;
    if had_old {
        let _ = std::fs::remove_file(&old);
    }
    Ok(())
}

/// Names of the tcx programs attached to `device` (in the calling thread's
/// network namespace) in direction `attach`, in run order.
pub fn tcx_programs(device: &str, attach: TcAttachType) -> Result<Vec<String>> {
    let (_, infos) = SchedClassifier::query_tcx(device, attach).map_err(|source| {
        DatapathError::program(format!("querying tcx on {device}"), "*", source)
    })?;
    Ok(infos.iter().map(|i| i.name_as_str().unwrap_or("?").to_owned()).collect())
}
