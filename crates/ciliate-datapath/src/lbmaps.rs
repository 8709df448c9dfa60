//! The service maps (layout: `ciliate_common::lb`): typed writes in the
//! order that never leaves a frontend without backends, and dumps for the
//! CLI.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key};
use ciliate_common::lb::{
    self, AffinityKey, AffinityValue, LbBackend, LbKey, LbService, MAGLEV_CHUNK, MAGLEV_SIZES,
    MaglevChunk, MaglevKey, RevNat, SRC_RANGE_STATIC_PREFIX, SrcRangeKey,
};

use crate::maps::Counted as _;
use crate::{
    error::{DatapathError, Result},
    maps::{ignore_missing, map_err, open_pinned},
};

/// A frontend: address, port (host order) and IP protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl Frontend {
    pub fn key(&self, slot: u16) -> LbKey {
        LbKey {
            addr: self.addr.octets(),
            dport: self.port.to_be(),
            slot,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    pub fn of_key(k: &LbKey) -> Self {
        Self { addr: Ipv4Addr::from(k.addr), port: u16::from_be(k.dport), proto: k.proto }
    }
}

/// A backend as the maps hold it, in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

impl Backend {
    fn raw(&self) -> LbBackend {
        LbBackend {
            addr: self.addr.octets(),
            port: self.port.to_be(),
            proto: self.proto,
            state: self.state,
        }
    }
    fn of_raw(b: &LbBackend) -> Self {
        Self {
            addr: Ipv4Addr::from(b.addr),
            port: u16::from_be(b.port),
            proto: b.proto,
            state: b.state,
        }
    }
}

/// A frontend's master entry and the backend IDs of its slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub master: LbService,
    pub slots: Vec<u32>,
}

pub struct LbMaps {
    services: HashMap<MapData, LbKey, LbService>,
    backends: HashMap<MapData, u32, LbBackend>,
    revnat: HashMap<MapData, u16, RevNat>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

fn get<K: aya::Pod, V: aya::Pod>(
    m: &HashMap<MapData, K, V>,
    k: &K,
    name: &str,
) -> Result<Option<V>> {
    match m.get(k, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err("reading", name)(e)),
    }
}

fn src_key(rev_nat_index: u16, net: Ipv4Addr, len: u8) -> Key<SrcRangeKey> {
    Key::new(
        SRC_RANGE_STATIC_PREFIX + u32::from(len),
        SrcRangeKey { rev_nat_index, _pad: 0, addr: net.octets() },
    )
}

impl LbMaps {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            services: open_pinned(dir, lb::SERVICES_MAP, Map::HashMap)?,
            backends: open_pinned(dir, lb::BACKENDS_MAP, Map::HashMap)?,
            revnat: open_pinned(dir, lb::REVNAT_MAP, Map::HashMap)?,
            maglev: open_pinned(dir, lb::MAGLEV_MAP, Map::HashMap)?,
            src_ranges: open_pinned(dir, lb::SRC_RANGE_MAP, Map::LpmTrie)?,
            affinity: open_pinned(dir, lb::AFFINITY_MAP, Map::LruHashMap)?,
        })
    }

    pub fn upsert_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        if id == 0 {
            return Err(DatapathError::BadValue {
                what: "backend ID".into(),
                reason: "0 means none".into(),
            });
        }
        self.backends
            .insert(id, b.raw(), 0)
            .counted(crate::maps::UPDATE, lb::BACKENDS_MAP)
            .map_err(map_err(&format!("inserting backend {id} into"), lb::BACKENDS_MAP))
    }

    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id), lb::BACKENDS_MAP)
    }

    pub fn backend(&self, id: u32) -> Result<Option<Backend>> {
        Ok(get(&self.backends, &id, lb::BACKENDS_MAP)?.map(|b| Backend::of_raw(&b)))
    }

    pub fn backends(&self) -> Result<BTreeMap<u32, Backend>> {
        let mut out = BTreeMap::new();
        for item in self.backends.iter() {
            let (k, v) = item.map_err(map_err("iterating", lb::BACKENDS_MAP))?;
            out.insert(k, Backend::of_raw(&v));
        }
        Ok(out)
    }

    pub fn upsert_revnat(&mut self, index: u16, fe: &Frontend) -> Result<()> {
        let v = RevNat { addr: fe.addr.octets(), port: fe.port.to_be(), _pad: 0 };
        self.revnat
            .insert(index, v, 0)
            .counted(crate::maps::UPDATE, lb::REVNAT_MAP)
            .map_err(map_err(&format!("inserting reverse NAT {index} into"), lb::REVNAT_MAP))
    }

    pub fn remove_revnat(&mut self, index: u16) -> Result<()> {
        ignore_missing(self.revnat.remove(&index), lb::REVNAT_MAP)
    }

    /// Write frontend `fe` with `master` and one slot per backend ID, with
    /// no moment at which a reader finds it without backends: the new slots
    /// first, then the master entry with the new count, then the slots past
    /// it that the previous version had.
    pub fn write_frontend(
        &mut self,
        fe: &Frontend,
        master: &LbService,
        slots: &[u32],
    ) -> Result<()> {
        let count = u16::try_from(slots.len()).map_err(|_| DatapathError::BadValue {
            what: format!("frontend {}:{}", fe.addr, fe.port),
            reason: format!("{} backends, at most {}", slots.len(), u16::MAX),
        })?;
        let old = get(&self.services, &fe.key(0), lb::SERVICES_MAP)?.map(|m| m.count).unwrap_or(0);
        for (i, id) in slots.iter().enumerate() {
            let slot = LbService {
                backend_id: *id,
                rev_nat_index: master.rev_nat_index,
                ..Default::default()
            };
            self.services
                .insert(fe.key(i as u16 + 1), slot, 0)
                .counted(crate::maps::UPDATE, lb::SERVICES_MAP)
                .map_err(map_err("inserting a backend slot into", lb::SERVICES_MAP))?;
        }
        let master = LbService { backend_id: 0, count, ..*master };
        self.services
            .insert(fe.key(0), master, 0)
            .counted(crate::maps::UPDATE, lb::SERVICES_MAP)
            .map_err(map_err("inserting a frontend into", lb::SERVICES_MAP))?;
        for slot in count + 1..=old {
            ignore_missing(self.services.remove(&fe.key(slot)), lb::SERVICES_MAP)?;
        }
        Ok(())
    }

    /// Remove frontend `fe`: the master entry first (new flows stop
    /// matching), then its slots.
    pub fn remove_frontend(&mut self, fe: &Frontend) -> Result<()> {
        let Some(m) = get(&self.services, &fe.key(0), lb::SERVICES_MAP)? else { return Ok(()) };
        ignore_missing(self.services.remove(&fe.key(0)), lb::SERVICES_MAP)?;
        for slot in 1..=m.count {
            ignore_missing(self.services.remove(&fe.key(slot)), lb::SERVICES_MAP)?;
        }
        Ok(())
    }

    /// Every frontend with its slots, ordered.
    pub fn frontends(&self) -> Result<BTreeMap<Frontend, FrontendEntry>> {
        let mut masters = BTreeMap::new();
        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        for item in self.services.iter() {
            let (k, v) = item.map_err(map_err("iterating", lb::SERVICES_MAP))?;
            let fe = Frontend::of_key(&k);
            if k.slot == 0 {
                masters.insert(fe, v);
            } else {
                slots.entry(fe).or_default().insert(k.slot, v.backend_id);
            }
        }
        Ok(masters
            .into_iter()
            .map(|(fe, master)| {
                let s = slots.remove(&fe).unwrap_or_default();
                let slots = (1..=master.count).filter_map(|i| s.get(&i).copied()).collect();
                (fe, FrontendEntry { master, slots })
            })
            .collect())
    }

    /// Write the Maglev table of frontend `index`, of one of the sizes a
    /// node may have (`lb::MAGLEV_SIZES`; the programs' size, which the
    /// caller knows), chunk by chunk; chunks a larger table left go.
    pub fn set_maglev(&mut self, index: u16, table: &[u32]) -> Result<()> {
        if !MAGLEV_SIZES.contains(&(table.len() as u32)) {
            return Err(DatapathError::BadValue {
                what: format!("Maglev table of frontend {index}"),
                reason: format!("{} entries, not one of the sizes {MAGLEV_SIZES:?}", table.len()),
            });
        }
        let chunks = table.chunks(MAGLEV_CHUNK);
        let used = chunks.len();
        for (i, part) in chunks.enumerate() {
            let mut chunk: MaglevChunk = [0; MAGLEV_CHUNK];
            chunk[..part.len()].copy_from_slice(part);
            let key = MaglevKey { rev_nat_index: index, chunk: i as u16 };
            self.maglev
                .insert(key, chunk, 0)
                .counted(crate::maps::UPDATE, lb::MAGLEV_MAP)
                .map_err(map_err(
                    &format!("inserting the table of {index} into"),
                    lb::MAGLEV_MAP,
                ))?;
        }
        self.remove_maglev_from(index, used)
    }

    /// Chunks `from..` of frontend `index`'s table, if there are any: a
    /// table's chunks are contiguous from 0, and go last first, so an
    /// interrupted removal leaves them so. (A frontend without a table
    /// costs one lookup.)
    fn remove_maglev_from(&mut self, index: u16, from: usize) -> Result<()> {
        let key = |chunk: usize| MaglevKey { rev_nat_index: index, chunk: chunk as u16 };
        let mut end = from;
        while get(&self.maglev, &key(end), lb::MAGLEV_MAP)?.is_some() {
            end += 1;
        }
        for chunk in (from..end).rev() {
            ignore_missing(self.maglev.remove(&key(chunk)), lb::MAGLEV_MAP)?;
        }
        Ok(())
    }

    pub fn remove_maglev(&mut self, index: u16) -> Result<()> {
        self.remove_maglev_from(index, 0)
    }

    /// Frontend `index`'s table: its chunks in order, without the zeros
    /// (no backend) that pad the last one.
    pub fn maglev(&self, index: u16) -> Result<Option<Vec<u32>>> {
        let mut out = Vec::new();
        for chunk in 0u16.. {
            let key = MaglevKey { rev_nat_index: index, chunk };
            match get(&self.maglev, &key, lb::MAGLEV_MAP)? {
                Some(c) => out.extend_from_slice(&c),
                None if chunk == 0 => return Ok(None),
                None => break,
            }
        }
        while out.last() == Some(&0) {
            out.pop();
        }
        Ok(Some(out))
    }

    pub fn maglev_indexes(&self) -> Result<Vec<u16>> {
        let mut out = Vec::new();
        for k in self.maglev.keys() {
            let k = k.map_err(map_err("iterating", lb::MAGLEV_MAP))?;
            if k.chunk == 0 {
                out.push(k.rev_nat_index);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Make the source ranges of frontend `index` exactly `ranges` (new ones
    /// first, then the ones no longer wanted).
    pub fn set_src_ranges(&mut self, index: u16, ranges: &[(Ipv4Addr, u8)]) -> Result<()> {
        let mut old = Vec::new();
        for k in self.src_ranges.keys() {
            let k = k.map_err(map_err("iterating", lb::SRC_RANGE_MAP))?;
            if k.data().rev_nat_index == index {
                let len = (k.prefix_len() - SRC_RANGE_STATIC_PREFIX) as u8;
                old.push((Ipv4Addr::from(k.data().addr), len));
            }
        }
        for (net, len) in ranges {
            self.src_ranges
                .insert(&src_key(index, *net, *len), 1, 0)
                .counted(crate::maps::UPDATE, lb::SRC_RANGE_MAP)
                .map_err(map_err(&format!("inserting {net}/{len} into"), lb::SRC_RANGE_MAP))?;
        }
        for (net, len) in old.into_iter().filter(|r| !ranges.contains(r)) {
            ignore_missing(self.src_ranges.remove(&src_key(index, net, len)), lb::SRC_RANGE_MAP)?;
        }
        Ok(())
    }

    /// The backend `client` is affine to for frontend `index`, if any.
    pub fn affinity(&self, client: Ipv4Addr, index: u16) -> Result<Option<AffinityValue>> {
        let k = AffinityKey { client: client.octets(), rev_nat_index: index, _pad: 0 };
        get(&self.affinity, &k, lb::AFFINITY_MAP)
    }
}
