//! Pinned maps across builds. aya reuses a map pinned under a map's name
//! whatever its definition, so a build that changed a map's capacity would
//! keep the old one, and one that changed its layout would fail to load.
//! Before an object is loaded, [`set_aside`] renames every pin whose
//! definition (type, key and value size, capacity, flags) differs from
//! what the object declares to `old/<name>`; the load then creates and
//! pins the map anew, and [`finish`] copies the old entries across:
//! - same key and value layout (a capacity or flags change): every entry,
//!   as long as the new map has room (what does not fit is counted, never
//!   dropped silently);
//! - a changed layout: through a converter for that map and old layout
//!   ([`converter`]: Maglev tables before chunks), or, without one, the old map is
//!   kept aside as `unmigrated/<name>` and reported.
//!
//! (bpffs refuses names with dots: the old pins go to directories.)
//!
//! Program arrays are refilled by the loader and the event ring holds
//! only events in flight: their old pins just go. What the agent writes at
//! start (endpoints, ipcache, policy, services) is written again anyway;
//! the migration matters for what only the datapath knows: conntrack,
//! NAT, affinity and socket-LB state. Each migration is recorded for the
//! agent to log ([`take_report`]).

use std::{path::Path, sync::Mutex};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap};
use ciliate_common::{
    config::EndpointConfig,
    ct::{CtEntry, CtKey4},
    endpoint::{EndpointInfo, EndpointKey},
    frag::{FragKey, FragPorts},
    ipcache::{IpcacheEntry, IpcacheKey},
    lb,
    metrics::{MetricsKey, MetricsValue},
    nat::NatEntry,
    node::{NoMasqKey, NodeConfig},
    policy::{PolicyEntry, PolicyKey},
};

use crate::{
    error::{DatapathError, Result},
    maps::map_err,
};

/// A map's definition as a build declares it or the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B capacity {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// One map carried from an older pin to a new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub map: String,
    pub from: MapDef,
    pub to: MapDef,
    /// Entries copied into the new map.
    pub copied: usize,
    /// Entries that did not fit (or a converter dropped).
    pub lost: usize,
    /// What happened, in words.
    pub outcome: String,
}

static REPORT: Mutex<Vec<Migration>> = Mutex::new(Vec::new());

/// The migrations done since the last call (for the agent's log).
pub fn take_report() -> Vec<Migration> {
    std::mem::take(&mut *REPORT.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The maps `object` (ELF bytes) pins by name, with their definitions
/// (capacities as `capacities` overrides them).
pub fn declared(
    object: &[u8],
    capacities: &std::collections::BTreeMap<String, u32>,
) -> Result<Vec<(String, MapDef)>> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DatapathError::Load {
        object: "(parsing for map definitions)".into(),
        source: Box::new(aya::EbpfError::ParseError(e)),
    })?;
    Ok(obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| {
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: capacities.get(name).copied().unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            };
            (name.clone(), def)
        })
        .collect())
}

/// The definition of the map pinned at `path`.
pub fn pinned(path: &Path) -> Result<MapDef> {
    let err = |e: aya::maps::MapError| DatapathError::Map {
        action: "reading the definition of".into(),
        map: path.display().to_string(),
        source: Box::new(e),
    };
    let data = MapData::from_pin(path).map_err(err)?;
    let info = data.info().map_err(err)?;
    Ok(MapDef {
        map_type: info.map_type().map_err(err)? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

fn old_path(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join("old").join(name)
}

/// Before loading `object` with its maps pinned in `dir`: set aside every
/// pin whose definition differs from the object's (see the module
/// comment). Returns the names set aside.
pub fn set_aside(
    object: &[u8],
    dir: &Path,
    capacities: &std::collections::BTreeMap<String, u32>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, want) in declared(object, capacities)? {
        let path = dir.join(&name);
        if !path.exists() {
            continue;
        }
        let have = pinned(&path)?;
        if have == want {
            continue;
        }
        let old = old_path(dir, &name);
        if old.exists() {
            // An earlier migration did not finish: that pin is the older
            // state; this one was made by the interrupted load.
            std::fs::remove_file(&path).map_err(|source| DatapathError::Io {
                what: "removing a half-made map pin",
                path: path.clone(),
                source,
            })?;
        } else {
            std::fs::create_dir_all(dir.join("old")).map_err(|source| DatapathError::Io {
                what: "creating the directory of set-aside maps",
                path: dir.join("old"),
                source,
            })?;
            std::fs::rename(&path, &old).map_err(|source| DatapathError::Io {
                what: "setting aside a pinned map",
                path: path.clone(),
                source,
            })?;
        }
        out.push(name);
    }
    Ok(out)
}

/// After a load: carry every set-aside map whose new pin now exists into
/// it, and remove the old pin (or keep it as `unmigrated/<name>`).
pub fn finish(dir: &Path) -> Result<Vec<Migration>> {
    let mut done = Vec::new();
    let entries: Vec<_> =
        std::fs::read_dir(dir.join("old")).into_iter().flatten().flatten().collect();
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let name = name.as_str();
        let new_path = dir.join(name);
        if !new_path.exists() {
            continue; // declared by an object not loaded yet
        }
        let (from, to) = (pinned(&e.path())?, pinned(&new_path)?);
        let old = MapData::from_pin(e.path()).map_err(map_err("opening", name))?;
        let new = MapData::from_pin(&new_path).map_err(map_err("opening", name))?;
        let same_layout = from.key_size == to.key_size
            && from.value_size == to.value_size
            && from.map_type == to.map_type;
        let (copied, lost, outcome) = if !carried(name) {
            (0, 0, "not carried (refilled or in flight)".to_string())
        } else if same_layout {
            let (c, l) = copy(name, old, new)?;
            (c, l, format!("copied {c} entries ({l} did not fit)"))
        } else if let Some(convert) = converter(name, &from, &to) {
            let (c, l) = convert(old, new)?;
            (c, l, format!("converted {c} entries ({l} dropped by the converter)"))
        } else {
            let kept = dir.join("unmigrated").join(name);
            let _ = std::fs::create_dir_all(dir.join("unmigrated"));
            let _ = std::fs::remove_file(&kept);
            std::fs::rename(e.path(), &kept).map_err(|source| DatapathError::Io {
                what: "keeping an unmigrated map",
                path: kept.clone(),
                source,
            })?;
            let m = Migration {
                map: name.to_owned(),
                from,
                to,
                copied: 0,
                lost: 0,
                outcome: format!(
                    "layout changed and no converter: the new map starts empty; the old one is kept at {}",
                    kept.display()
                ),
            };
            done.push(m);
            continue;
        };
        std::fs::remove_file(e.path()).map_err(|source| DatapathError::Io {
            what: "removing a migrated map's old pin",
            path: e.path(),
            source,
        })?;
        done.push(Migration { map: name.to_owned(), from, to, copied, lost, outcome });
    }
    let _ = std::fs::remove_dir(dir.join("old")); // when empty
    REPORT.lock().unwrap_or_else(|e| e.into_inner()).extend(done.iter().cloned());
    Ok(done)
}

/// Maps whose entries are state to keep (not program arrays, the ring or
/// its lost counter).
fn carried(name: &str) -> bool {
    !matches!(
        name,
        "ciliate_events"
            | "ciliate_events_lost"
            | "ciliate_calls"
            | "ciliate_calls_dbg"
            | "ciliate_host_dbg"
    )
}

/// A converter from an older layout of map `name` to the current one:
/// written when a layout changes.
type Convert = fn(MapData, MapData) -> Result<(usize, usize)>;
fn converter(name: &str, from: &MapDef, _to: &MapDef) -> Option<Convert> {
    match (name, from.key_size, from.value_size) {
        (lb::MAGLEV_MAP, 2, v) if v as usize == 4 * MAGLEV_V1_SIZE => Some(maglev_v1),
        _ => None,
    }
}

/// Maglev tables before chunks: reverse-NAT index → the whole table of
/// 16381 entries (the size every node had).
const MAGLEV_V1_SIZE: usize = 16381;

/// One whole table per frontend → its chunks (an entry per chunk).
fn maglev_v1(old: MapData, new: MapData) -> Result<(usize, usize)> {
    let name = lb::MAGLEV_MAP;
    let old: HashMap<MapData, u16, [u32; MAGLEV_V1_SIZE]> =
        HashMap::try_from(Map::HashMap(old)).map_err(map_err("opening", name))?;
    let mut new: HashMap<MapData, lb::MaglevKey, lb::MaglevChunk> =
        HashMap::try_from(Map::HashMap(new)).map_err(map_err("opening", name))?;
    let chunks = old.iter().flat_map(|item| {
        let (index, table) = match item {
            Ok(t) => t,
            Err(e) => return vec![Err(e)],
        };
        table
            .chunks(lb::MAGLEV_CHUNK)
            .enumerate()
            .map(|(i, part)| {
                let mut chunk = [0; lb::MAGLEV_CHUNK];
                chunk[..part.len()].copy_from_slice(part);
                Ok((lb::MaglevKey { rev_nat_index: index, chunk: i as u16 }, chunk))
            })
            .collect()
    });
    carry(name, chunks, |(k, v)| new.insert(k, v, 0))
}

/// Copy every entry of `old` into `new` (the same layout), by the map's
/// key and value types: (copied, did not fit).
fn copy(name: &str, old: MapData, new: MapData) -> Result<(usize, usize)> {
    match name {
        "ciliate_lxc" => hash::<EndpointKey, EndpointInfo>(name, old, new, false),
        "ciliate_ct4_global" | "ciliate_ct_any4_global" => {
            hash::<CtKey4, CtEntry>(name, old, new, true)
        }
        "ciliate_snat_v4_external" => hash::<CtKey4, NatEntry>(name, old, new, true),
        "ciliate_ipv4_frag_datagrams" => hash::<FragKey, FragPorts>(name, old, new, true),
        "ciliate_lb4_services" => hash::<lb::LbKey, lb::LbService>(name, old, new, false),
        "ciliate_lb4_backends" => hash::<u32, lb::LbBackend>(name, old, new, false),
        "ciliate_lb4_reverse_nat" => hash::<u16, lb::RevNat>(name, old, new, false),
        "ciliate_lb4_affinity" => hash::<lb::AffinityKey, lb::AffinityValue>(name, old, new, true),
        "ciliate_lb4_maglev" => hash::<lb::MaglevKey, lb::MaglevChunk>(name, old, new, false),
        "ciliate_lb4_reverse_sk" => {
            hash::<lb::SockRevNatKey, lb::SockRevNatValue>(name, old, new, true)
        }
        "ciliate_ep_config" => hash::<u32, EndpointConfig>(name, old, new, false),
        "ciliate_ipcache" => lpm::<IpcacheKey, IpcacheEntry>(name, old, new),
        "ciliate_policy" => lpm::<PolicyKey, PolicyEntry>(name, old, new),
        "ciliate_lb4_source_range" => lpm::<lb::SrcRangeKey, u8>(name, old, new),
        "ciliate_ipmasq_v4" => lpm::<NoMasqKey, u8>(name, old, new),
        "ciliate_node_config" => array::<NodeConfig>(name, old, new),
        "ciliate_metrics" => per_cpu_hash::<MetricsKey, MetricsValue>(name, old, new),
        other => Err(DatapathError::Map {
            action: "migrating (no entry types known for it)".into(),
            map: other.into(),
            source: Box::new(aya::maps::MapError::InvalidName { name: other.into() }),
        }),
    }
}

/// Put every item of `old` into the new map with `put`: (copied, did not
/// fit). A read error ends the copy.
fn carry<T>(
    name: &str,
    old: impl Iterator<Item = std::result::Result<T, aya::maps::MapError>>,
    mut put: impl FnMut(T) -> std::result::Result<(), aya::maps::MapError>,
) -> Result<(usize, usize)> {
    let (mut copied, mut lost) = (0, 0);
    for item in old {
        match put(item.map_err(map_err("reading", name))?) {
            Ok(()) => copied += 1,
            Err(_) => lost += 1,
        }
    }
    Ok((copied, lost))
}

fn hash<K: aya::Pod, V: aya::Pod>(
    name: &str,
    old: MapData,
    new: MapData,
    lru: bool,
) -> Result<(usize, usize)> {
    let wrap = |d| if lru { Map::LruHashMap(d) } else { Map::HashMap(d) };
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(wrap(old)).map_err(map_err("opening", name))?;
    let mut new: HashMap<MapData, K, V> =
        HashMap::try_from(wrap(new)).map_err(map_err("opening", name))?;
    carry(name, old.iter(), |(k, v)| new.insert(k, v, 0))
}

fn lpm<K: aya::Pod, V: aya::Pod>(name: &str, old: MapData, new: MapData) -> Result<(usize, usize)> {
    let old: LpmTrie<MapData, K, V> =
        LpmTrie::try_from(Map::LpmTrie(old)).map_err(map_err("opening", name))?;
    let mut new: LpmTrie<MapData, K, V> =
        LpmTrie::try_from(Map::LpmTrie(new)).map_err(map_err("opening", name))?;
    carry(name, old.iter(), |(k, v)| new.insert(&k, v, 0))
}

fn array<V: aya::Pod>(name: &str, old: MapData, new: MapData) -> Result<(usize, usize)> {
    let old: Array<MapData, V> =
        Array::try_from(Map::Array(old)).map_err(map_err("opening", name))?;
    let mut new: Array<MapData, V> =
        Array::try_from(Map::Array(new)).map_err(map_err("opening", name))?;
    let items = (0..old.len()).map(|i| old.get(&i, 0).map(|v| (i, v)));
    carry(name, items, |(i, v)| new.set(i, v, 0))
}

fn per_cpu_hash<K: aya::Pod, V: aya::Pod>(
    name: &str,
    old: MapData,
    new: MapData,
) -> Result<(usize, usize)> {
    let old: PerCpuHashMap<MapData, K, V> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(old)).map_err(map_err("opening", name))?;
    let mut new: PerCpuHashMap<MapData, K, V> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(new)).map_err(map_err("opening", name))?;
    carry(name, old.iter(), |(k, v)| new.insert(k, v, 0))
}
