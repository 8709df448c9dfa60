//! Typed map wrappers: the only place that turns map bytes into domain
//! types. Each wrapper can be opened from a loaded object or from the node's
//! pin directory (the CLI and a restarted agent do the latter).

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, RingBuf, lpm_trie::Key};
use ciliate_common::{
    ct::{self, CtEntry, CtKey4},
    endpoint::{self, EndpointInfo, EndpointKey},
    event::{LOST_NAME, RINGBUF_NAME},
    ipcache::{self, IpcacheEntry, IpcacheKey, STATIC_PREFIX},
    metrics::{self, MetricsKey, MetricsValue},
    policy::{self, PolicyEntry, PolicyKey},
};

use crate::{
    error::{DatapathError, Result},
    events::Event,
    loader::Loaded,
};

pub(crate) fn map_err(
    action: &str,
    map: &str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let (action, map) = (action.to_owned(), map.to_owned());
    move |source| DatapathError::Map { action, map, source: Box::new(source) }
}

/// Map writes and deletes by this process: (map, operation, outcome) →
/// count, for `cilium_bpf_map_ops_total`.
static OPS: std::sync::Mutex<
    std::collections::BTreeMap<(&'static str, &'static str, &'static str), u64>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

pub(crate) const UPDATE: &str = "update";
pub(crate) const DELETE: &str = "delete";

/// Count a map operation's outcome as it passes.
pub(crate) trait Counted {
    fn counted(self, op: &'static str, map: &'static str) -> Self;
}

impl<T> Counted for std::result::Result<T, MapError> {
    fn counted(self, op: &'static str, map: &'static str) -> Self {
        let outcome = match &self {
            Ok(_) => "success",
            // A delete of what is not there is not a failure.
            Err(MapError::KeyNotFound) if op == DELETE => "success",
            Err(MapError::SyscallError(e))
                if op == DELETE && e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                "success"
            }
            Err(_) => "fail",
        };
        *OPS.lock().unwrap_or_else(|e| e.into_inner()).entry((map, op, outcome)).or_default() += 1;
        self
    }
}

/// Every (map, operation, outcome) this process counted, with its count.
pub fn map_ops() -> Vec<(&'static str, &'static str, &'static str, u64)> {
    OPS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(&(m, o, r), &n)| (m, o, r, n))
        .collect()
}

fn from_pin(dir: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(dir.join(name)).map_err(map_err("opening pinned", name))
}

fn take(loaded: &mut Loaded, name: &str) -> Result<Map> {
    loaded
        .ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::NoMap { object: loaded.name.into(), map: name.into() })
}

/// `CILIATE_METRICS`: packets and bytes per (reason, direction).
pub struct MetricsMap(PerCpuHashMap<MapData, MetricsKey, MetricsValue>);

impl MetricsMap {
    pub fn from_loaded(loaded: &mut Loaded) -> Result<Self> {
        Self::new(take(loaded, metrics::MAP_NAME)?)
    }

    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        Self::new(Map::PerCpuHashMap(from_pin(dir, metrics::MAP_NAME)?))
    }

    fn new(map: Map) -> Result<Self> {
        PerCpuHashMap::try_from(map).map(Self).map_err(map_err("opening", metrics::MAP_NAME))
    }

    /// Sum over CPUs of one counter; zero when it was never hit.
    pub fn get(&self, reason: u8, dir: u8) -> Result<MetricsValue> {
        match self.0.get(&MetricsKey::new(reason, dir), 0) {
            Ok(per_cpu) => Ok(sum(per_cpu.iter())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(MetricsValue::default()),
            Err(e) => Err(map_err("reading", metrics::MAP_NAME)(e)),
        }
    }

    /// Every counter, summed over CPUs, ordered by key.
    pub fn dump(&self) -> Result<Vec<(MetricsKey, MetricsValue)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, per_cpu) = item.map_err(map_err("iterating", metrics::MAP_NAME))?;
            out.push((k, sum(per_cpu.iter())));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a MetricsValue>) -> MetricsValue {
    values.fold(MetricsValue::default(), |acc, v| MetricsValue {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
    })
}

/// `CILIATE_EVENTS`: the node's event ring buffer.
pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub fn from_loaded(loaded: &mut Loaded) -> Result<Self> {
        Self::new(take(loaded, RINGBUF_NAME)?)
    }

    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        Self::new(Map::RingBuf(from_pin(dir, RINGBUF_NAME)?))
    }

    fn new(map: Map) -> Result<Self> {
        RingBuf::try_from(map).map(Self).map_err(map_err("opening", RINGBUF_NAME))
    }

    /// Every event waiting in the ring, oldest first.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.0.next() {
            out.push(Event::decode(&item));
        }
        out
    }
}

/// The ring's file descriptor polls readable when events wait (for an
/// event loop's reactor).
impl std::os::fd::AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// `ciliate_events_lost`: events the datapath had no ring room for.
pub struct EventsLost(aya::maps::PerCpuArray<MapData, u64>);

impl EventsLost {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, LOST_NAME, Map::PerCpuArray).map(Self)
    }

    /// Events lost so far, all CPUs together.
    pub fn total(&self) -> Result<u64> {
        let per_cpu = self.0.get(&0, 0).map_err(map_err("reading", LOST_NAME))?;
        Ok(per_cpu.iter().sum())
    }
}

/// Open pinned map `name` of a node as the wrapper type `T`.
pub(crate) fn open_pinned<T>(dir: &Path, name: &str, kind: fn(MapData) -> Map) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(kind(from_pin(dir, name)?)).map_err(map_err("opening", name))
}

/// `Ok(())` for a delete of something already gone.
/// Remove every entry of `map` (named `name`) that `gone` picks; how many
/// went. Entries that vanish meanwhile (LRU eviction) are fine.
pub(crate) fn remove_where<V: aya::Pod>(
    map: &mut HashMap<MapData, CtKey4, V>,
    name: &'static str,
    gone: impl Fn(&CtKey4, &V) -> bool,
) -> Result<usize> {
    let mut doomed = Vec::new();
    for item in map.iter() {
        let (k, v) = item.map_err(map_err("iterating", name))?;
        if gone(&k, &v) {
            doomed.push(k);
        }
    }
    for k in &doomed {
        ignore_missing(map.remove(k), name)?;
    }
    Ok(doomed.len())
}

pub(crate) fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<()> {
    let r = r.counted(DELETE, name);
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err("deleting from", name)(e)),
    }
}

fn v4(ip: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])
}

/// Seconds of CLOCK_MONOTONIC: the clock of conntrack expiries
/// (`bpf_ktime_get_ns` in the datapath).
pub fn monotonic_secs() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// The node's policy generation (`ciliate_common::policy::GEN_MAP`), moved
/// after every write that can change a policy decision (policy entries,
/// identities of addresses): the datapath looks an established connection
/// up again only when it moved. Absent (pins of a build before it) it is
/// not moved: those programs look every packet up.
pub struct PolicyGen(Option<aya::maps::Array<MapData, u32>>);

impl PolicyGen {
    pub fn open(dir: &Path) -> Self {
        Self(open_pinned(dir, policy::GEN_MAP, Map::Array).ok())
    }

    /// The generation now.
    pub fn get(&self) -> u32 {
        self.0.as_ref().and_then(|m| m.get(&0, 0).ok()).unwrap_or(0)
    }

    /// Move the generation (after the write it follows).
    pub fn bump(&mut self) -> Result<()> {
        let Some(m) = self.0.as_mut() else { return Ok(()) };
        let next = m.get(&0, 0).map_err(map_err("reading", policy::GEN_MAP))?.wrapping_add(1);
        m.set(0, next, 0)
            .counted(UPDATE, policy::GEN_MAP)
            .map_err(map_err("writing", policy::GEN_MAP))
    }
}

/// `CILIATE_LXC`: local endpoints by IP.
pub struct LxcMap(HashMap<MapData, EndpointKey, EndpointInfo>, PolicyGen);

impl LxcMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        let m = open_pinned(dir, endpoint::MAP_NAME, Map::HashMap)?;
        Ok(Self(m, PolicyGen::open(dir)))
    }

    pub fn upsert(&mut self, ip: Ipv4Addr, info: &EndpointInfo) -> Result<()> {
        self.0
            .insert(EndpointKey::v4(ip.octets()), info, 0)
            .counted(crate::maps::UPDATE, endpoint::MAP_NAME)
            .map_err(map_err(&format!("inserting {ip} into"), endpoint::MAP_NAME))?;
        self.1.bump()
    }

    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<()> {
        ignore_missing(self.0.remove(&EndpointKey::v4(ip.octets())), endpoint::MAP_NAME)?;
        self.1.bump()
    }

    pub fn get(&self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>> {
        match self.0.get(&EndpointKey::v4(ip.octets()), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", endpoint::MAP_NAME)(e)),
        }
    }

    /// Every entry, ordered by address.
    pub fn dump(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item.map_err(map_err("iterating", endpoint::MAP_NAME))?;
            out.push((v4(&k.ip), v));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }
}

/// `CILIATE_IPCACHE`: prefix → identity, longest prefix wins.
pub struct IpcacheMap(LpmTrie<MapData, IpcacheKey, IpcacheEntry>, PolicyGen);

/// A prefix whose host bits are set, or whose length is over 32: refused
/// before anything is written.
fn check_prefix(net: Ipv4Addr, len: u8) -> Result<()> {
    let bad = |reason: String| DatapathError::BadPrefix { prefix: format!("{net}/{len}"), reason };
    if len > 32 {
        return Err(bad("prefix length over 32".into()));
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    if u32::from(net) & !mask != 0 {
        return Err(bad(format!(
            "host bits set (network is {})",
            Ipv4Addr::from(u32::from(net) & mask)
        )));
    }
    Ok(())
}

fn lpm_key(net: Ipv4Addr, len: u8) -> Key<IpcacheKey> {
    Key::new(STATIC_PREFIX + u32::from(len), IpcacheKey::v4(net.octets()))
}

impl IpcacheMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        let m = open_pinned(dir, ipcache::MAP_NAME, Map::LpmTrie)?;
        Ok(Self(m, PolicyGen::open(dir)))
    }

    pub fn upsert(&mut self, net: Ipv4Addr, len: u8, entry: &IpcacheEntry) -> Result<()> {
        check_prefix(net, len)?;
        self.0
            .insert(&lpm_key(net, len), entry, 0)
            .counted(crate::maps::UPDATE, ipcache::MAP_NAME)
            .map_err(map_err(&format!("inserting {net}/{len} into"), ipcache::MAP_NAME))?;
        self.1.bump()
    }

    pub fn remove(&mut self, net: Ipv4Addr, len: u8) -> Result<()> {
        check_prefix(net, len)?;
        ignore_missing(self.0.remove(&lpm_key(net, len)), ipcache::MAP_NAME)?;
        self.1.bump()
    }

    /// The entry of the longest prefix covering `ip`, as the datapath sees it.
    pub fn lookup(&self, ip: Ipv4Addr) -> Result<Option<IpcacheEntry>> {
        match self.0.get(&lpm_key(ip, 32), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", ipcache::MAP_NAME)(e)),
        }
    }

    /// Every prefix, ordered by address then length.
    pub fn dump(&self) -> Result<Vec<(Ipv4Addr, u8, IpcacheEntry)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item.map_err(map_err("iterating", ipcache::MAP_NAME))?;
            let len = k.prefix_len().saturating_sub(STATIC_PREFIX) as u8;
            out.push((v4(&k.data().ip), len, v));
        }
        out.sort_by_key(|(ip, len, _)| (*ip, *len));
        Ok(out)
    }
}

/// What a conntrack sweep found: entries left and removed per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub tcp_alive: usize,
    pub tcp_deleted: usize,
    pub any_alive: usize,
    pub any_deleted: usize,
}

impl Sweep {
    pub fn removed(&self) -> usize {
        self.tcp_deleted + self.any_deleted
    }
}

/// How full a map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

/// The kind of a map, for counting its keys.
#[derive(Clone, Copy)]
enum Kind {
    Hash,
    Lru,
    Lpm,
    PerCpu,
}

/// Entries and capacity of pinned map `name` (keys `K`, values `V`).
fn fill_of<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
    kind: Kind,
) -> Result<MapFill> {
    let data = from_pin(dir, name)?;
    let max_entries = data.info().map_err(map_err("reading the info of", name))?.max_entries();
    let entries = match kind {
        Kind::Lpm => {
            let m: LpmTrie<MapData, K, V> =
                LpmTrie::try_from(Map::LpmTrie(data)).map_err(map_err("opening", name))?;
            m.keys().filter(|k| k.is_ok()).count()
        }
        Kind::Hash | Kind::Lru => {
            let data =
                if matches!(kind, Kind::Lru) { Map::LruHashMap(data) } else { Map::HashMap(data) };
            let m: HashMap<MapData, K, V> =
                HashMap::try_from(data).map_err(map_err("opening", name))?;
            m.keys().filter(|k| k.is_ok()).count()
        }
        Kind::PerCpu => {
            let m: PerCpuHashMap<MapData, K, V> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
                .map_err(map_err("opening", name))?;
            m.keys().filter(|k| k.is_ok()).count()
        }
    };
    Ok(MapFill { name, entries, max_entries })
}

/// How full the node's maps are, each read key by key: every map with
/// entries but the conntrack and NAT tables (their sweep counts them) and
/// the arrays (program arrays, the node configuration: always full).
pub fn map_fill(dir: &Path) -> Vec<MapFill> {
    use Kind::*;
    use ciliate_common::{
        config::{ENDPOINT_CONFIG_MAP, EndpointConfig},
        frag, lb, node, prefilter,
    };
    let all = [
        fill_of::<EndpointKey, EndpointInfo>(dir, endpoint::MAP_NAME, Hash),
        fill_of::<u32, EndpointConfig>(dir, ENDPOINT_CONFIG_MAP, Hash),
        fill_of::<IpcacheKey, IpcacheEntry>(dir, ipcache::MAP_NAME, Lpm),
        fill_of::<PolicyKey, PolicyEntry>(dir, policy::MAP_NAME, Lpm),
        fill_of::<lb::LbKey, lb::LbService>(dir, lb::SERVICES_MAP, Hash),
        fill_of::<u32, lb::LbBackend>(dir, lb::BACKENDS_MAP, Hash),
        fill_of::<u16, lb::RevNat>(dir, lb::REVNAT_MAP, Hash),
        fill_of::<lb::AffinityKey, lb::AffinityValue>(dir, lb::AFFINITY_MAP, Lru),
        fill_of::<lb::MaglevKey, lb::MaglevChunk>(dir, lb::MAGLEV_MAP, Hash),
        fill_of::<lb::SrcRangeKey, u8>(dir, lb::SRC_RANGE_MAP, Lpm),
        fill_of::<lb::SockRevNatKey, lb::SockRevNatValue>(dir, lb::SOCK_REVNAT_MAP, Lru),
        fill_of::<frag::FragKey, frag::FragPorts>(dir, frag::MAP_NAME, Lru),
        fill_of::<node::NoMasqKey, u8>(dir, node::NOMASQ_MAP, Lpm),
        fill_of::<prefilter::PrefilterKey, u32>(dir, prefilter::MAP_NAME, Lpm),
        fill_of::<MetricsKey, MetricsValue>(dir, metrics::MAP_NAME, PerCpu),
    ];
    all.into_iter().filter_map(|r| r.ok()).collect()
}

/// `CILIATE_CT4_TCP` and `CILIATE_CT4_ANY`: the connection tracking tables.
pub struct CtMaps {
    tcp: HashMap<MapData, CtKey4, CtEntry>,
    any: HashMap<MapData, CtKey4, CtEntry>,
}

impl CtMaps {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            tcp: open_pinned(dir, ct::TCP_MAP_NAME, Map::LruHashMap)?,
            any: open_pinned(dir, ct::ANY_MAP_NAME, Map::LruHashMap)?,
        })
    }

    fn table(&self, proto: u8) -> (&HashMap<MapData, CtKey4, CtEntry>, &'static str) {
        if proto == 6 { (&self.tcp, ct::TCP_MAP_NAME) } else { (&self.any, ct::ANY_MAP_NAME) }
    }

    pub fn get(&self, key: &CtKey4) -> Result<Option<CtEntry>> {
        let (map, name) = self.table(key.proto);
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", name)(e)),
        }
    }

    /// Delete every entry whose expiry (seconds of CLOCK_MONOTONIC, see
    /// [`monotonic_secs`]) is before `now`. Entries that vanish meanwhile
    /// (LRU eviction, a racing sweep) are fine.
    pub fn sweep(&mut self, now: u32) -> Result<Sweep> {
        let mut out = Sweep::default();
        for (map, name, alive, deleted) in [
            (&mut self.tcp, ct::TCP_MAP_NAME, &mut out.tcp_alive, &mut out.tcp_deleted),
            (&mut self.any, ct::ANY_MAP_NAME, &mut out.any_alive, &mut out.any_deleted),
        ] {
            let mut expired = Vec::new();
            for item in map.iter() {
                let (k, e) = item.map_err(map_err("iterating", name))?;
                if e.expires < now {
                    expired.push(k);
                } else {
                    *alive += 1;
                }
            }
            for k in expired {
                ignore_missing(map.remove(&k), name)?;
                *deleted += 1;
            }
        }
        Ok(out)
    }

    /// Remove every connection of address `ip` (a deleted endpoint's: a
    /// pod that gets the address next must not inherit its connections,
    /// which would let replies of old flows past its policy). How many
    /// went.
    pub fn scrub(&mut self, ip: Ipv4Addr) -> Result<usize> {
        let a = ip.octets();
        let of = |k: &CtKey4, _: &CtEntry| k.saddr == a || k.daddr == a;
        Ok(remove_where(&mut self.tcp, ct::TCP_MAP_NAME, of)?
            + remove_where(&mut self.any, ct::ANY_MAP_NAME, of)?)
    }

    /// Entries in each table: (TCP, other).
    pub fn counts(&self) -> (usize, usize) {
        (self.tcp.keys().count(), self.any.keys().count())
    }

    /// The backends that service flows (`DIR_SERVICE` entries not yet
    /// expired at `now`) are pinned to: a backend that left its service is
    /// kept in the backends map until no flow uses it.
    pub fn service_backends(&self, now: u32) -> Result<std::collections::BTreeSet<u32>> {
        let mut out = std::collections::BTreeSet::new();
        for (map, name) in [(&self.tcp, ct::TCP_MAP_NAME), (&self.any, ct::ANY_MAP_NAME)] {
            for item in map.iter() {
                let (k, e) = item.map_err(map_err("iterating", name))?;
                if k.dir == ct::DIR_SERVICE && e.expires >= now {
                    out.insert(e.backend_id);
                }
            }
        }
        Ok(out)
    }

    /// Every entry of both tables, TCP first, each ordered by key.
    pub fn dump(&self) -> Result<Vec<(CtKey4, CtEntry)>> {
        let mut out = Vec::new();
        for (map, name) in [(&self.tcp, ct::TCP_MAP_NAME), (&self.any, ct::ANY_MAP_NAME)] {
            let mut part = Vec::new();
            for item in map.iter() {
                part.push(item.map_err(map_err("iterating", name))?);
            }
            part.sort_by_key(|(k, _)| *k);
            out.extend(part);
        }
        Ok(out)
    }
}

/// The ports `start..=end` as the fewest (port, prefix bits) blocks, for
/// an LPM key whose port is the last 16 bits.
pub fn port_range_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut bits = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while bits > 0 && lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out.push((lo as u16, (16 - bits) as u8));
        lo += 1 << bits;
    }
    out
}

/// One policy decision to write: endpoint, direction, remote identity
/// (`policy::ANY_IDENTITY` for any), protocol (`policy::ANY_PROTO` with no
/// ports for any), ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRule {
    pub endpoint_id: u16,
    pub dir: u8,
    pub identity: u32,
    pub proto: u8,
    /// Inclusive port (or ICMP type) range; `None` for all.
    pub ports: Option<(u16, u16)>,
    pub deny: bool,
}

impl PolicyRule {
    pub fn match_type(&self) -> u8 {
        match (self.identity == policy::ANY_IDENTITY, self.proto == policy::ANY_PROTO) {
            (true, true) => policy::MATCH_ALL,
            (true, false) => policy::MATCH_L4_ONLY,
            (false, true) => policy::MATCH_L3_ONLY,
            (false, false) => policy::MATCH_L3_L4,
        }
    }

    /// The LPM keys of this rule; an error names what is wrong with it.
    fn keys(&self) -> Result<Vec<Key<PolicyKey>>> {
        let bad = |reason: String| DatapathError::BadPolicy { rule: format!("{self:?}"), reason };
        if self.dir != policy::DIR_INGRESS && self.dir != policy::DIR_EGRESS {
            return Err(bad(format!("direction {} is neither ingress nor egress", self.dir)));
        }
        let key = |proto, dport: u16| PolicyKey {
            endpoint_id: self.endpoint_id,
            dir: self.dir,
            _pad0: 0,
            identity: self.identity,
            proto,
            _pad1: 0,
            dport: dport.to_be(),
        };
        Ok(match (self.proto, self.ports) {
            (policy::ANY_PROTO, None) => vec![Key::new(policy::PREFIX_L3, key(0, 0))],
            (policy::ANY_PROTO, Some(_)) => return Err(bad("ports need a protocol".into())),
            (p, None) => vec![Key::new(policy::PREFIX_PROTO, key(p, 0))],
            (_, Some((s, e))) if s > e => return Err(bad(format!("port range {s}-{e} is empty"))),
            (p, Some((s, e))) => port_range_prefixes(s, e)
                .into_iter()
                .map(|(port, bits)| Key::new(policy::PREFIX_PROTO + u32::from(bits), key(p, port)))
                .collect(),
        })
    }
}

/// The policy map entries of one endpoint: (key, prefix length) → value.
pub type PolicyEntries = std::collections::BTreeMap<(PolicyKey, u32), PolicyEntry>;

/// The entries that hold `rules` for `endpoint_id` with the directions in
/// `enforced` (`(policy::DIR_*, on)`) enforced: each rule's keys and one
/// marker per enforced direction. A bad rule is an error naming it.
pub fn policy_entries(
    endpoint_id: u16,
    enforced: &[(u8, bool)],
    rules: &[PolicyRule],
) -> Result<PolicyEntries> {
    let mut desired = PolicyEntries::new();
    for r in rules {
        let entry = PolicyEntry {
            flags: if r.deny { policy::F_DENY } else { 0 },
            match_type: r.match_type(),
            ..Default::default()
        };
        for k in r.keys()? {
            desired.insert((k.data(), k.prefix_len()), entry);
        }
    }
    let marker = PolicyEntry { flags: policy::F_MARKER, ..Default::default() };
    for (dir, on) in enforced {
        if *on {
            let k = marker_key(endpoint_id, *dir);
            desired.insert((k.data(), k.prefix_len()), marker);
        }
    }
    Ok(desired)
}

/// Check that the map (of `capacity` entries, holding `held`) can take
/// `batch` (endpoint → its new entries) written in order, each endpoint's
/// additions before its removals: the most entries it holds at any moment
/// must fit. Returns that number.
pub fn plan_policy(
    held: &std::collections::BTreeMap<u16, PolicyEntries>,
    batch: &[(u16, PolicyEntries)],
    capacity: PolicyCapacity,
) -> Result<usize> {
    plan(held, batch, capacity, true)
}

/// [`plan_policy`], with each endpoint's entries not in its `batch`
/// entries removed (`remove`) or kept.
fn plan(
    held: &std::collections::BTreeMap<u16, PolicyEntries>,
    batch: &[(u16, PolicyEntries)],
    capacity: PolicyCapacity,
    remove: bool,
) -> Result<usize> {
    let in_use: usize = held.values().map(|w| w.len()).sum();
    let (mut now, mut peak) = (in_use, in_use);
    let empty = PolicyEntries::new();
    for (ep, desired) in batch {
        let written = held.get(ep).unwrap_or(&empty);
        let added = desired.keys().filter(|k| !written.contains_key(k)).count();
        // This endpoint's own share, at its fullest (its additions go in
        // before its removals).
        if written.len() + added > capacity.per_endpoint {
            return Err(DatapathError::EndpointPolicyFull {
                endpoint: *ep,
                needed: written.len() + added,
                capacity: capacity.per_endpoint,
            });
        }
        now += added;
        peak = peak.max(now);
        if remove {
            now -= written.keys().filter(|k| !desired.contains_key(k)).count();
        }
    }
    if peak > capacity.total {
        return Err(DatapathError::MapFull {
            map: policy::MAP_NAME.into(),
            needed: peak,
            in_use,
            capacity: capacity.total,
        });
    }
    Ok(peak)
}

/// What the policy map may hold: in all, and per endpoint (the map is
/// shared; each endpoint has its own share, as each has its own map in
/// Cilium).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCapacity {
    pub total: usize,
    pub per_endpoint: usize,
}

impl Default for PolicyCapacity {
    /// The compiled map, every endpoint allowed all of it.
    fn default() -> Self {
        let total = policy::MAX_ENTRIES as usize;
        Self { total, per_endpoint: total }
    }
}

/// Where policy entries are written: the kernel's map ([`PolicyMap`]), or
/// memory in the agent's tests; [`sync_policy_batch`] works on either.
pub trait PolicyWriter {
    fn insert_entry(&mut self, key: &(PolicyKey, u32), value: PolicyEntry) -> Result<()>;
    /// Removing an entry that is not there is fine.
    fn remove_entry(&mut self, key: &(PolicyKey, u32)) -> Result<()>;
    /// A change (a batch of writes, whole or undone) is over: decisions
    /// may differ now (the kernel map moves the node's policy generation).
    fn changed(&mut self) -> Result<()> {
        Ok(())
    }
}

/// `r`, after telling `w` its change is over (the change's own error
/// first).
fn after_change<W: PolicyWriter, T>(w: &mut W, r: Result<T>) -> Result<T> {
    let changed = w.changed();
    let out = r?;
    changed?;
    Ok(out)
}

impl PolicyWriter for PolicyMap {
    fn insert_entry(&mut self, (k, len): &(PolicyKey, u32), value: PolicyEntry) -> Result<()> {
        self.0
            .insert(&Key::new(*len, *k), value, 0)
            .counted(crate::maps::UPDATE, policy::MAP_NAME)
            .map_err(map_err("writing a rule into", policy::MAP_NAME))
    }
    fn remove_entry(&mut self, (k, len): &(PolicyKey, u32)) -> Result<()> {
        ignore_missing(self.0.remove(&Key::new(*len, *k)), policy::MAP_NAME)
    }
    fn changed(&mut self) -> Result<()> {
        self.1.bump()
    }
}

/// Make one endpoint's entries (`written`, kept true after every single
/// write) exactly `desired`. Additions (rules, then markers) go before
/// removals (markers, then rules), so traffic a change does not touch is
/// not disturbed and a direction is enforced only once its rules are in;
/// `removals_first` reverses the order, for a rollback into a full map.
/// Returns (written, removed) entries.
pub fn apply_entries<W: PolicyWriter>(
    w: &mut W,
    desired: &PolicyEntries,
    written: &mut PolicyEntries,
    removals_first: bool,
) -> Result<(usize, usize)> {
    let is_marker = |e: &PolicyEntry| e.flags & policy::F_MARKER != 0;
    let same =
        |a: &PolicyEntry, b: &PolicyEntry| a.flags == b.flags && a.match_type == b.match_type;
    let (mut added, mut removed) = (0, 0);
    for adding in if removals_first { [false, true] } else { [true, false] } {
        if adding {
            for markers in [false, true] {
                for (k, v) in desired.iter().filter(|(_, v)| is_marker(v) == markers) {
                    if written.get(k).is_some_and(|e| same(e, v)) {
                        continue;
                    }
                    w.insert_entry(k, *v)?;
                    written.insert(*k, *v);
                    added += 1;
                }
            }
        } else {
            for markers in [true, false] {
                let gone: Vec<(PolicyKey, u32)> = written
                    .iter()
                    .filter(|(k, v)| is_marker(v) == markers && !desired.contains_key(k))
                    .map(|(k, _)| *k)
                    .collect();
                for k in gone {
                    w.remove_entry(&k)?;
                    written.remove(&k);
                    removed += 1;
                }
            }
        }
    }
    Ok((added, removed))
}

/// Write the policies of several endpoints as one change. `held` is what
/// the map holds, by endpoint (kept true). The change is planned first
/// ([`plan_policy`]): when the map could not hold it at its fullest moment,
/// nothing is written ([`DatapathError::MapFull`]). When a write fails
/// midway, every endpoint touched goes back to what it held before
/// ([`DatapathError::RolledBack`]). Returns (written, removed) entries.
pub fn sync_policy_batch<W: PolicyWriter>(
    w: &mut W,
    held: &mut std::collections::BTreeMap<u16, PolicyEntries>,
    batch: &[(u16, PolicyEntries)],
    capacity: PolicyCapacity,
) -> Result<(usize, usize)> {
    plan_policy(held, batch, capacity)?;
    let r = sync_planned(w, held, batch);
    after_change(w, r)
}

fn sync_planned<W: PolicyWriter>(
    w: &mut W,
    held: &mut std::collections::BTreeMap<u16, PolicyEntries>,
    batch: &[(u16, PolicyEntries)],
) -> Result<(usize, usize)> {
    let mut before: Vec<(u16, PolicyEntries)> = Vec::new();
    let (mut added, mut removed) = (0, 0);
    for (ep, desired) in batch {
        let written = held.entry(*ep).or_default();
        before.push((*ep, written.clone()));
        match apply_entries(w, desired, written, false) {
            Ok((a, r)) => {
                added += a;
                removed += r;
            }
            Err(e) => {
                for (ep, old) in before.iter().rev() {
                    let written = held.entry(*ep).or_default();
                    // Best effort: `held` stays true to the map whatever
                    // happens, and the error says what failed.
                    let _ = apply_entries(w, old, written, true);
                }
                held.retain(|_, w| !w.is_empty());
                return Err(DatapathError::RolledBack {
                    what: format!("writing the policy of endpoint {ep}"),
                    source: Box::new(e),
                });
            }
        }
    }
    held.retain(|_, w| !w.is_empty());
    Ok((added, removed))
}

/// Add each endpoint's entries of `batch` to what it holds (`held`, kept
/// true), removing nothing (identities new to a policy in force). Only
/// entries it does not hold as they are are written, rules before
/// enforcement markers; the change is planned first as
/// [`sync_policy_batch`]'s, and a write that fails midway puts back what
/// was there ([`DatapathError::RolledBack`]). Returns the entries written.
/// (Its cost is that of the additions, not of what the endpoints hold.)
pub fn add_policy_batch<W: PolicyWriter>(
    w: &mut W,
    held: &mut std::collections::BTreeMap<u16, PolicyEntries>,
    batch: &[(u16, PolicyEntries)],
    capacity: PolicyCapacity,
) -> Result<usize> {
    let same =
        |a: &PolicyEntry, b: &PolicyEntry| a.flags == b.flags && a.match_type == b.match_type;
    let fresh: Vec<(u16, PolicyEntries)> = batch
        .iter()
        .map(|(ep, add)| {
            let written = held.get(ep);
            let new = add
                .iter()
                .filter(|(k, v)| !written.and_then(|w| w.get(*k)).is_some_and(|e| same(e, v)))
                .map(|(k, v)| (*k, *v))
                .collect();
            (*ep, new)
        })
        .collect();
    plan(held, &fresh, capacity, false)?;
    let r = add_planned(w, held, &fresh);
    after_change(w, r)
}

fn add_planned<W: PolicyWriter>(
    w: &mut W,
    held: &mut std::collections::BTreeMap<u16, PolicyEntries>,
    fresh: &[(u16, PolicyEntries)],
) -> Result<usize> {
    let is_marker = |e: &PolicyEntry| e.flags & policy::F_MARKER != 0;
    let mut done: Vec<(u16, (PolicyKey, u32), Option<PolicyEntry>)> = Vec::new();
    for markers in [false, true] {
        for (ep, add) in fresh {
            for (k, v) in add.iter().filter(|(_, v)| is_marker(v) == markers) {
                let written = held.entry(*ep).or_default();
                let old = written.get(k).copied();
                if let Err(e) = w.insert_entry(k, *v) {
                    // Best effort, last first: `held` stays true to the map.
                    for (ep, k, old) in done.into_iter().rev() {
                        let written = held.entry(ep).or_default();
                        let _ = match old {
                            Some(o) => w.insert_entry(&k, o).map(|()| written.insert(k, o)),
                            None => w.remove_entry(&k).map(|()| written.remove(&k)),
                        };
                    }
                    held.retain(|_, w| !w.is_empty());
                    return Err(DatapathError::RolledBack {
                        what: format!("adding to the policy of endpoint {ep}"),
                        source: Box::new(e),
                    });
                }
                written.insert(*k, *v);
                done.push((*ep, *k, old));
            }
        }
    }
    Ok(done.len())
}

/// `CILIATE_POLICY`: every endpoint's policy (reading rules:
/// `ciliate_common::policy`).
pub struct PolicyMap(LpmTrie<MapData, PolicyKey, PolicyEntry>, PolicyGen);

fn marker_key(endpoint_id: u16, dir: u8) -> Key<PolicyKey> {
    Key::new(policy::PREFIX_ENFORCED, PolicyKey { endpoint_id, dir, ..Default::default() })
}

impl PolicyMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        let m = open_pinned(dir, policy::MAP_NAME, Map::LpmTrie)?;
        Ok(Self(m, PolicyGen::open(dir)))
    }

    /// The map's capacity, as the kernel made it.
    pub fn capacity(&self) -> Result<usize> {
        use aya::maps::IterableMap as _;
        let info =
            self.0.map().info().map_err(map_err("reading the definition of", policy::MAP_NAME))?;
        Ok(info.max_entries() as usize)
    }

    /// Turn enforcement of `dir` on for `endpoint_id`: from now on only what
    /// a rule allows passes.
    pub fn enforce(&mut self, endpoint_id: u16, dir: u8) -> Result<()> {
        let marker = PolicyEntry { flags: policy::F_MARKER, ..Default::default() };
        self.0
            .insert(&marker_key(endpoint_id, dir), marker, 0)
            .counted(crate::maps::UPDATE, policy::MAP_NAME)
            .map_err(map_err(&format!("enforcing endpoint {endpoint_id} in"), policy::MAP_NAME))?;
        self.1.bump()
    }

    /// Is `dir` enforced for `endpoint_id` (its marker is in the map)?
    pub fn enforced(&self, endpoint_id: u16, dir: u8) -> Result<bool> {
        match self.0.get(&marker_key(endpoint_id, dir), 0) {
            Ok(e) => Ok(e.flags & policy::F_MARKER != 0),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err("reading", policy::MAP_NAME)(e)),
        }
    }

    /// The entry the datapath's lookup of `key` (a packet's: endpoint,
    /// direction, peer identity, protocol, port) finds: the longest prefix
    /// that matches (the endpoint's enforcement marker when no rule does).
    pub fn matching(&self, key: &PolicyKey) -> Result<Option<PolicyEntry>> {
        match self.0.get(&Key::new(policy::PREFIX_FULL, *key), 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", policy::MAP_NAME)(e)),
        }
    }

    /// Turn enforcement of `dir` off for `endpoint_id` (its rules stay).
    pub fn unenforce(&mut self, endpoint_id: u16, dir: u8) -> Result<()> {
        ignore_missing(self.0.remove(&marker_key(endpoint_id, dir)), policy::MAP_NAME)?;
        self.1.bump()
    }

    /// Write `rule`. All its keys are checked before the first is written.
    pub fn upsert(&mut self, rule: &PolicyRule) -> Result<()> {
        let keys = rule.keys()?;
        let entry = PolicyEntry {
            flags: if rule.deny { policy::F_DENY } else { 0 },
            match_type: rule.match_type(),
            ..Default::default()
        };
        for k in &keys {
            self.0
                .insert(k, entry, 0)
                .counted(crate::maps::UPDATE, policy::MAP_NAME)
                .map_err(map_err("inserting a rule into", policy::MAP_NAME))?;
        }
        self.1.bump()
    }

    pub fn remove(&mut self, rule: &PolicyRule) -> Result<()> {
        for k in &rule.keys()? {
            ignore_missing(self.0.remove(k), policy::MAP_NAME)?;
        }
        self.1.bump()
    }

    /// Make the map hold exactly `rules` for `endpoint_id`, with the
    /// directions in `enforced` (`(policy::DIR_*, on)`) enforced. `written`
    /// is what the map holds for the endpoint now (from
    /// [`PolicyMap::entries_by_endpoint`], or a previous call); it follows
    /// every single write, so it stays true even when a write fails midway.
    /// Only what changes is written, so traffic that a change does not
    /// touch is not disturbed; rules go in before a direction is enforced
    /// and out after it stops being enforced. Returns (written, removed)
    /// entries.
    pub fn sync_endpoint(
        &mut self,
        endpoint_id: u16,
        enforced: &[(u8, bool)],
        rules: &[PolicyRule],
        written: &mut PolicyEntries,
    ) -> Result<(usize, usize)> {
        let desired = policy_entries(endpoint_id, enforced, rules)?;
        let r = apply_entries(self, &desired, written, false);
        after_change(self, r)
    }

    /// What the map holds, by endpoint.
    pub fn entries_by_endpoint(&self) -> Result<std::collections::BTreeMap<u16, PolicyEntries>> {
        let mut out: std::collections::BTreeMap<u16, PolicyEntries> = Default::default();
        for (k, len, v) in self.dump()? {
            out.entry(k.endpoint_id).or_default().insert((k, len), v);
        }
        Ok(out)
    }

    /// Every entry: key, prefix length, value.
    pub fn dump(&self) -> Result<Vec<(PolicyKey, u32, PolicyEntry)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item.map_err(map_err("iterating", policy::MAP_NAME))?;
            out.push((k.data(), k.prefix_len(), v));
        }
        out.sort_by_key(|(k, len, _)| (*k, *len));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_the_fewest_aligned_prefixes() {
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(8000, 8100).len(), 4, "64 + 32 + 4 + 1 ports");
        // Every port of the range is covered once, nothing outside it.
        for (s, e) in [(8000u16, 8100u16), (1, 1023), (65534, 65535), (3, 3)] {
            let blocks = port_range_prefixes(s, e);
            let covered: Vec<u32> = blocks
                .iter()
                .flat_map(|(p, bits)| {
                    let size = 1u32 << (16 - u32::from(*bits));
                    u32::from(*p)..u32::from(*p) + size
                })
                .collect();
            assert_eq!(covered, (u32::from(s)..=u32::from(e)).collect::<Vec<_>>(), "{s}-{e}");
        }
    }

    #[test]
    fn bad_rules_are_refused_before_anything_is_written() {
        let r =
            PolicyRule { endpoint_id: 1, dir: 3, identity: 0, proto: 6, ports: None, deny: false };
        assert!(r.keys().err().unwrap().to_string().contains("neither ingress nor egress"));
        let r = PolicyRule { dir: 1, proto: 0, ports: Some((1, 2)), ..r };
        assert!(r.keys().err().unwrap().to_string().contains("ports need a protocol"));
        let r = PolicyRule { proto: 6, ports: Some((9, 2)), ..r };
        assert!(r.keys().err().unwrap().to_string().contains("9-2 is empty"));
    }

    #[test]
    fn prefixes_with_host_bits_or_too_long_are_refused() {
        assert!(check_prefix(Ipv4Addr::new(10, 0, 0, 0), 8).is_ok());
        assert!(check_prefix(Ipv4Addr::UNSPECIFIED, 0).is_ok());
        assert!(check_prefix(Ipv4Addr::new(10, 0, 0, 5), 32).is_ok());
        let e = check_prefix(Ipv4Addr::new(10, 0, 0, 5), 24).unwrap_err().to_string();
        assert!(e.contains("10.0.0.5/24") && e.contains("10.0.0.0"), "{e}");
        let e = check_prefix(Ipv4Addr::new(10, 0, 0, 0), 33).unwrap_err().to_string();
        assert!(e.contains("over 32"), "{e}");
    }
}
