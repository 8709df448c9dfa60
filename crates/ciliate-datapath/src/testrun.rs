//! The BPF_PROG_TEST_RUN harness: run a loaded tc program on packet bytes
//! and get back its verdict and the packet as the program left it.

use aya::{
    TestRun, TestRunOptions,
    programs::{ProgramError, SchedClassifier, TestRunResult, Xdp},
};

use crate::error::{DatapathError, Result};

/// Room for programs that grow the packet (encapsulation, ICMP errors).
const HEADROOM: usize = 256;

/// What one run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcRun {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: i32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
}

/// tc verdicts, for assertions.
pub mod verdict {
    pub const OK: i32 = 0;
    pub const SHOT: i32 = 2;
    pub const REDIRECT: i32 = 7;
}

/// Run `prog` (named `name` in errors) once on `packet`.
pub fn run_tc(prog: &SchedClassifier, name: &str, packet: &[u8]) -> Result<TcRun> {
    run(prog, name, packet, None)
}

/// XDP verdicts (`XDP_*`), for assertions.
pub mod xdp {
    pub const DROP: i32 = 1;
    pub const PASS: i32 = 2;
    pub const TX: i32 = 3;
    pub const REDIRECT: i32 = 4;
}

/// The node's XDP program (object `xdp`), loaded (or found pinned) for
/// `pins`, to test-run.
pub fn xdp_entry(pins: &crate::bpffs::NodePins) -> Result<Xdp> {
    use crate::objects::programs::XDP_ENTRY;
    let obj = crate::loader::node_object(
        pins,
        "xdp",
        None::<(&str, &ciliate_common::config::HostConfig)>,
    )?;
    Xdp::from_pin(obj.path(XDP_ENTRY), aya_obj::programs::XdpAttachType::Interface)
        .map_err(|e| DatapathError::program("opening the pinned", XDP_ENTRY, e))
}

/// Run XDP program `prog` (named `name` in errors) once on `packet`; the
/// verdict is an `XDP_*` ([`xdp`]).
pub fn run_xdp(prog: &Xdp, name: &str, packet: &[u8]) -> Result<TcRun> {
    run(prog, name, packet, None)
}

/// [`run_xdp`] as if the frame arrived on device `ifindex` (which must
/// exist in the calling thread's network namespace: the FIB lookups of the
/// program start there).
pub fn run_xdp_on(prog: &Xdp, name: &str, packet: &[u8], ifindex: u32) -> Result<TcRun> {
    let ctx = xdp_ctx(packet.len(), ifindex);
    run_n(prog, name, packet, Some(&ctx), 1).map(|(r, _)| r)
}

/// Run `prog` once on `packet` as if it arrived on device `ifindex` (which
/// must exist in the calling thread's network namespace: see
/// [`own_netns_with_devices`]). from-container reads its endpoint's
/// configuration by that ifindex.
pub fn run_tc_on(prog: &SchedClassifier, name: &str, packet: &[u8], ifindex: u32) -> Result<TcRun> {
    run(prog, name, packet, Some(ifindex))
}

/// Nanoseconds one run of `prog` (named `name` in errors) takes on
/// `packet` (with context `ctx` when given: [`skb_ctx`], [`xdp_ctx`]):
/// the mean, over `runs` test runs, of the time the kernel measures around
/// the program (its own cost, without the stack around it). Each run gets
/// a fresh copy of `packet`: the kernel's `repeat` would run the program
/// again on the packet it rewrote (a DNAT'ed packet is no longer for the
/// service, an ARP request has become a reply). Also the last run's
/// verdict and packet, to check the path was the one meant.
pub fn time_run<P>(
    prog: &P,
    name: &str,
    packet: &[u8],
    ctx: Option<&[u8]>,
    runs: u32,
) -> Result<(TcRun, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut total = 0.0;
    let mut last = None;
    for _ in 0..runs.max(1) {
        let (r, ns) = run_n(prog, name, packet, ctx, 1)?;
        total += ns;
        last = Some(r);
    }
    let last = last.expect("at least one run");
    Ok((last, total / f64::from(runs.max(1))))
}

/// Nanoseconds one run of `prog` takes on `packet`, as the kernel times
/// `repeat` runs back to back (BPF_PROG_TEST_RUN's own `repeat`: no clock
/// read per run). Only for a path that leaves the packet as it came (a
/// drop, a pass): each run sees what the run before left. Fails naming the
/// program when the packet changed.
pub fn time_repeat<P>(prog: &P, name: &str, packet: &[u8], repeat: u32) -> Result<(TcRun, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (r, ns) = run_n(prog, name, packet, None, repeat.max(1))?;
    if r.packet != packet {
        return Err(DatapathError::BadValue {
            what: format!("timing {name} with the kernel's repeat"),
            reason: "the program changed the packet: time it with time_run".into(),
        });
    }
    Ok((r, ns))
}

/// Size of the kernel's `struct __sk_buff` and the offsets of its
/// `ingress_ifindex` and `ifindex` (the only fields set in a test run's
/// context).
const SKB_CTX_SIZE: usize = 192;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;

/// A tc test run's context: the packet came in on device `ifindex`.
pub fn skb_ctx(ifindex: u32) -> [u8; SKB_CTX_SIZE] {
    let mut ctx = [0u8; SKB_CTX_SIZE];
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Size of the kernel's `struct xdp_md` and the offsets of the fields a
/// test run's context sets.
const XDP_CTX_SIZE: usize = 24;
const XDP_DATA_END: usize = 4;
const XDP_INGRESS_IFINDEX: usize = 12;

/// An XDP test run's context: a frame of `len` bytes that arrived on
/// device `ifindex`.
pub fn xdp_ctx(len: usize, ifindex: u32) -> [u8; XDP_CTX_SIZE] {
    let mut ctx = [0u8; XDP_CTX_SIZE];
    ctx[XDP_DATA_END..XDP_DATA_END + 4].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[XDP_INGRESS_IFINDEX..XDP_INGRESS_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn run<P>(prog: &P, name: &str, packet: &[u8], ifindex: Option<u32>) -> Result<TcRun>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let ctx = ifindex.map(skb_ctx);
    run_n(prog, name, packet, ctx.as_ref().map(|c| &c[..]), 1).map(|(r, _)| r)
}

fn run_n<P>(
    prog: &P,
    name: &str,
    packet: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
) -> Result<(TcRun, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; packet.len() + HEADROOM];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..Default::default()
    };
    let res = prog.test_run(opts).map_err(|source| match source {
        ProgramError::SyscallError(ref e) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
            DatapathError::TestRunOutput { program: name.into(), size: packet.len() + HEADROOM }
        }
        source => DatapathError::program("test-running", name, source),
    })?;
    out.truncate(res.data_size_out as usize);
    let ns = res.duration.as_nanos() as f64;
    Ok((TcRun { verdict: res.return_value as i32, packet: out }, ns))
}

/// Move the calling thread into a network namespace of its own (it goes
/// when the thread ends) holding a veth device with each of `ifindexes`
/// (their peers: the same plus 100,000), for [`run_tc_on`].
pub fn own_netns_with_devices(ifindexes: &[u32]) -> Result<()> {
    let err = |what: String| DatapathError::Device { name: "test netns".into(), reason: what };
    // SAFETY: unshare(2) of the calling thread's network namespace only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(err(format!("unshare: {}", std::io::Error::last_os_error())));
    }
    let nl = crate::netlink::Netlink::here()?;
    for i in ifindexes {
        nl.add_veth_indexed(&format!("t{i}"), *i, &format!("p{i}"), i + 100_000)?;
    }
    Ok(())
}

/// A bpffs and a pin directory of its own for one test, unmounted and
/// removed when dropped (also when the test panics), so tests run in
/// parallel and twice in a row and leave nothing in `/sys/fs/bpf`.
pub struct ScratchNode {
    pub pins: crate::bpffs::NodePins,
    /// The test's bpffs; unmounted in `drop`.
    mount: Option<crate::bpffs::PrivateBpffs>,
}

/// Where scratch nodes mount their bpffs.
pub const SCRATCH_ROOT: &str = "/run/ciliate/test-bpffs";

impl ScratchNode {
    pub fn new(tag: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "test-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let root = std::path::Path::new(SCRATCH_ROOT).join(&name);
        let mount = crate::bpffs::PrivateBpffs::mount(&root)?;
        let pins = crate::bpffs::NodePins::create(&root, &name)?;
        Ok(Self { pins, mount: Some(mount) })
    }
}

impl ScratchNode {
    pub fn metrics(&self) -> Result<crate::maps::MetricsMap> {
        crate::maps::MetricsMap::from_pin_dir(&self.pins.dir)
    }
    pub fn events(&self) -> Result<crate::maps::EventRing> {
        crate::maps::EventRing::from_pin_dir(&self.pins.dir)
    }
    pub fn lxc(&self) -> Result<crate::maps::LxcMap> {
        crate::maps::LxcMap::from_pin_dir(&self.pins.dir)
    }
    pub fn ipcache(&self) -> Result<crate::maps::IpcacheMap> {
        crate::maps::IpcacheMap::from_pin_dir(&self.pins.dir)
    }
    pub fn policy(&self) -> Result<crate::maps::PolicyMap> {
        crate::maps::PolicyMap::from_pin_dir(&self.pins.dir)
    }
    pub fn lb(&self) -> Result<crate::lbmaps::LbMaps> {
        crate::lbmaps::LbMaps::from_pin_dir(&self.pins.dir)
    }
    pub fn node_config(&self) -> Result<crate::nodemaps::NodeConfigMap> {
        crate::nodemaps::NodeConfigMap::from_pin_dir(&self.pins.dir)
    }
    pub fn no_masq(&self) -> Result<crate::nodemaps::NoMasqMap> {
        crate::nodemaps::NoMasqMap::from_pin_dir(&self.pins.dir)
    }
    pub fn nat(&self) -> Result<crate::nodemaps::NatMap> {
        crate::nodemaps::NatMap::from_pin_dir(&self.pins.dir)
    }
    pub fn fragments(&self) -> Result<crate::nodemaps::FragMap> {
        crate::nodemaps::FragMap::from_pin_dir(&self.pins.dir)
    }
    pub fn ct(&self) -> Result<crate::maps::CtMaps> {
        crate::maps::CtMaps::from_pin_dir(&self.pins.dir)
    }
    pub fn endpoint_config(&self) -> Result<crate::nodemaps::EndpointConfigMap> {
        crate::nodemaps::EndpointConfigMap::from_pin_dir(&self.pins.dir)
    }
}

impl Drop for ScratchNode {
    fn drop(&mut self) {
        drop(self.mount.take());
        // The parents too, when nothing else uses them (remove_dir refuses
        // a non-empty directory).
        let root = std::path::Path::new(SCRATCH_ROOT);
        let _ = std::fs::remove_dir(root);
        let _ = std::fs::remove_dir(root.parent().unwrap_or(root));
    }
}
