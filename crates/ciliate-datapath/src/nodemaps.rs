//! The node configuration map (`CILIATE_NODE`), the masquerading map
//! (`CILIATE_SNAT4`), fragments (`CILIATE_IPV4_FRAG`) and the XDP
//! prefilter's maps; layouts in `ciliate_common::node`, `::nat`, `::frag`
//! and `::prefilter`.

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{Array, HashMap, Map, MapData};
use ciliate_common::{
    ct::CtKey4,
    frag::{self, FragKey, FragPorts},
    nat::{self, NatEntry},
    node::{self, NodeConfig},
};

use crate::maps::Counted as _;
use crate::{
    error::{DatapathError, Result},
    maps::{map_err, open_pinned},
};

/// `CILIATE_NODE`: one entry.
pub struct NodeConfigMap(Array<MapData, NodeConfig>);

impl NodeConfigMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, node::MAP_NAME, Map::Array).map(Self)
    }

    pub fn get(&self) -> Result<NodeConfig> {
        self.0.get(&0, 0).map_err(map_err("reading", node::MAP_NAME))
    }

    pub fn set(&mut self, cfg: &NodeConfig) -> Result<()> {
        self.0
            .set(0, cfg, 0)
            .counted(crate::maps::UPDATE, node::MAP_NAME)
            .map_err(map_err("writing", node::MAP_NAME))
    }
}

/// `ciliate_ep_config`: each endpoint's configuration, by the ifindex of
/// its host-side device (what the node's one from-container reads).
pub struct EndpointConfigMap(HashMap<MapData, u32, ciliate_common::config::EndpointConfig>);

impl EndpointConfigMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        use ciliate_common::config::ENDPOINT_CONFIG_MAP;
        open_pinned(dir, ENDPOINT_CONFIG_MAP, Map::HashMap).map(Self)
    }

    /// Write the configuration of the endpoint on device `ifindex` (marked
    /// configured).
    pub fn set(&mut self, cfg: &ciliate_common::config::EndpointConfig) -> Result<()> {
        use ciliate_common::config::{ENDPOINT_CONFIG_MAP, ENDPOINT_F_CONFIGURED};
        let cfg = ciliate_common::config::EndpointConfig {
            flags: cfg.flags | ENDPOINT_F_CONFIGURED,
            ..*cfg
        };
        self.0
            .insert(cfg.ifindex, cfg, 0)
            .counted(crate::maps::UPDATE, ENDPOINT_CONFIG_MAP)
            .map_err(map_err("writing", ENDPOINT_CONFIG_MAP))
    }

    pub fn remove(&mut self, ifindex: u32) -> Result<()> {
        let name = ciliate_common::config::ENDPOINT_CONFIG_MAP;
        crate::maps::ignore_missing(self.0.remove(&ifindex), name)
    }

    pub fn get(&self, ifindex: u32) -> Result<Option<ciliate_common::config::EndpointConfig>> {
        match self.0.get(&ifindex, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", ciliate_common::config::ENDPOINT_CONFIG_MAP)(e)),
        }
    }
}

/// `CILIATE_NOMASQ`: destinations never masqueraded.
pub struct NoMasqMap(aya::maps::LpmTrie<MapData, ciliate_common::node::NoMasqKey, u8>);

impl NoMasqMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, node::NOMASQ_MAP, Map::LpmTrie).map(Self)
    }

    /// Make the map exactly `cidrs` (new ones first, then the stale).
    pub fn set(&mut self, cidrs: &[(Ipv4Addr, u8)]) -> Result<()> {
        use aya::maps::lpm_trie::Key;
        let key = |(a, l): &(Ipv4Addr, u8)| {
            Key::new(u32::from(*l), ciliate_common::node::NoMasqKey { addr: a.octets() })
        };
        let mut old = Vec::new();
        for k in self.0.keys() {
            let k = k.map_err(map_err("iterating", node::NOMASQ_MAP))?;
            old.push((Ipv4Addr::from(k.data().addr), k.prefix_len() as u8));
        }
        for c in cidrs {
            self.0
                .insert(&key(c), 1, 0)
                .counted(crate::maps::UPDATE, node::NOMASQ_MAP)
                .map_err(map_err("inserting into", node::NOMASQ_MAP))?;
        }
        for c in old.iter().filter(|c| !cidrs.contains(c)) {
            crate::maps::ignore_missing(self.0.remove(&key(c)), node::NOMASQ_MAP)?;
        }
        Ok(())
    }
}

/// One masquerading entry, as listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NatRow {
    /// "OUT" (original → translated), "IN" (reply → pod) or "DSR" (a DSR
    /// backend's reply → the frontend it leaves from).
    pub direction: &'static str,
    pub proto: u8,
    pub source: String,
    pub destination: String,
    /// What the OUT and DSR entries' source becomes, or the IN entry's
    /// destination.
    pub translated: String,
    pub created: u32,
}

/// `CILIATE_IPV4_FRAG`: first fragments' ports (see `ciliate_common::frag`).
pub struct FragMap(HashMap<MapData, FragKey, FragPorts>);

impl FragMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, frag::MAP_NAME, Map::LruHashMap).map(Self)
    }

    /// Every entry, ordered by key.
    pub fn dump(&self) -> Result<Vec<(FragKey, FragPorts)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            out.push(item.map_err(map_err("iterating", frag::MAP_NAME))?);
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }
}

/// `CILIATE_SNAT4`.
pub struct NatMap(HashMap<MapData, CtKey4, NatEntry>);

fn ep(a: [u8; 4], port: u16) -> String {
    format!("{}:{}", Ipv4Addr::from(a), u16::from_be(port))
}

impl NatMap {
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, nat::MAP_NAME, Map::LruHashMap).map(Self)
    }

    pub fn get(&self, key: &CtKey4) -> Result<Option<NatEntry>> {
        match self.0.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("reading", nat::MAP_NAME)(e)),
        }
    }

    /// Remove the translations of address `ip` (a deleted endpoint's), in
    /// both directions; how many went.
    pub fn scrub(&mut self, ip: Ipv4Addr) -> Result<usize> {
        let a = ip.octets();
        crate::maps::remove_where(&mut self.0, nat::MAP_NAME, |k, e| {
            k.saddr == a || k.daddr == a || e.addr == a
        })
    }

    /// How many entries it holds.
    pub fn count(&self) -> usize {
        self.0.keys().count()
    }

    /// Every entry, OUT before IN, each ordered by key.
    pub fn dump(&self) -> Result<Vec<(CtKey4, NatEntry)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            out.push(item.map_err(map_err("iterating", nat::MAP_NAME))?);
        }
        out.sort_by_key(|(k, _)| (k.dir, *k));
        Ok(out)
    }

    pub fn rows(&self) -> Result<Vec<NatRow>> {
        Ok(self
            .dump()?
            .into_iter()
            .map(|(k, e)| NatRow {
                direction: match k.dir {
                    nat::DIR_OUT => "OUT",
                    nat::DIR_DSR => "DSR",
                    _ => "IN",
                },
                proto: k.proto,
                source: ep(k.saddr, k.sport),
                destination: ep(k.daddr, k.dport),
                translated: ep(e.addr, e.port),
                created: e.created,
            })
            .collect())
    }
}

/// The XDP prefilter's maps (`ciliate_common::prefilter`): denied source
/// prefixes with their counter slots, and the per-CPU counters.
pub struct PrefilterMaps {
    cidrs: aya::maps::LpmTrie<MapData, ciliate_common::prefilter::PrefilterKey, u32>,
    stats: aya::maps::PerCpuArray<MapData, ciliate_common::prefilter::PrefilterStats>,
}

impl PrefilterMaps {
    /// The maps exist once the XDP object was loaded on the node.
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        use ciliate_common::prefilter::{MAP_NAME, STATS_MAP};
        Ok(Self {
            cidrs: open_pinned(dir, MAP_NAME, Map::LpmTrie)?,
            stats: open_pinned(dir, STATS_MAP, Map::PerCpuArray)?,
        })
    }

    fn key(
        net: Ipv4Addr,
        len: u8,
    ) -> aya::maps::lpm_trie::Key<ciliate_common::prefilter::PrefilterKey> {
        aya::maps::lpm_trie::Key::new(
            u32::from(len),
            ciliate_common::prefilter::PrefilterKey { addr: net.octets() },
        )
    }

    /// Deny `net/len`, counting into `slot`.
    pub fn insert(&mut self, net: Ipv4Addr, len: u8, slot: u32) -> Result<()> {
        use ciliate_common::prefilter::MAP_NAME;
        self.cidrs
            .insert(&Self::key(net, len), slot, 0)
            .counted(crate::maps::UPDATE, MAP_NAME)
            .map_err(map_err("inserting into", MAP_NAME))
    }

    /// Stop denying `net/len` (gone already is fine).
    pub fn remove(&mut self, net: Ipv4Addr, len: u8) -> Result<()> {
        crate::maps::ignore_missing(
            self.cidrs.remove(&Self::key(net, len)),
            ciliate_common::prefilter::MAP_NAME,
        )
    }

    /// Deny nothing (the counters stay).
    pub fn clear(&mut self) -> Result<()> {
        for (net, len, _) in self.list()? {
            self.remove(net, len)?;
        }
        Ok(())
    }

    /// The denied prefixes and their slots, as the kernel holds them.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, u8, u32)>> {
        use ciliate_common::prefilter::MAP_NAME;
        let mut out = Vec::new();
        for e in self.cidrs.iter() {
            let (k, slot) = e.map_err(map_err("iterating", MAP_NAME))?;
            out.push((Ipv4Addr::from(k.data().addr), k.prefix_len() as u8, slot));
        }
        Ok(out)
    }

    /// Packets and bytes slot `slot` counted, all CPUs together.
    pub fn stats(&self, slot: u32) -> Result<(u64, u64)> {
        use ciliate_common::prefilter::STATS_MAP;
        let v = self.stats.get(&slot, 0).map_err(map_err("reading", STATS_MAP))?;
        Ok(v.iter().fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes)))
    }

    /// Start slot `slot` from zero (before a new CIDR takes it).
    pub fn zero(&mut self, slot: u32) -> Result<()> {
        use ciliate_common::prefilter::{PrefilterStats, STATS_MAP};
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Io {
            what: "counting CPUs for",
            path: STATS_MAP.into(),
            source,
        })?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![PrefilterStats::default(); cpus]).map_err(
                |source| DatapathError::Io { what: "zeroing", path: STATS_MAP.into(), source },
            )?;
        self.stats
            .set(slot, zeros, 0)
            .counted(crate::maps::UPDATE, STATS_MAP)
            .map_err(map_err("zeroing a slot of", STATS_MAP))
    }
}

/// `ciliate_sock_ops`: the sockets of accelerated connections
/// (`ciliate_common::sockops`).
pub struct SockOpsMap(aya::maps::SockHash<MapData, ciliate_common::sockops::SockKey>);

impl SockOpsMap {
    /// The map exists once the sockops object was loaded on the node.
    pub fn from_pin_dir(dir: &Path) -> Result<Self> {
        open_pinned(dir, ciliate_common::sockops::MAP_NAME, Map::SockHash).map(Self)
    }

    /// What an sk_msg program attaches to.
    pub fn fd(&self) -> &aya::maps::sock::SockMapFd {
        self.0.fd()
    }

    /// The keys of the sockets in the map.
    pub fn keys(&self) -> Result<Vec<ciliate_common::sockops::SockKey>> {
        use ciliate_common::sockops::MAP_NAME;
        self.0.keys().map(|k| k.map_err(map_err("iterating", MAP_NAME))).collect()
    }

    /// Take the socket under `key` out (its next send takes the normal
    /// path; gone already is fine).
    pub fn remove(&mut self, key: &ciliate_common::sockops::SockKey) -> Result<()> {
        crate::maps::ignore_missing(self.0.remove(key), ciliate_common::sockops::MAP_NAME)
    }

    /// Take every socket out.
    pub fn clear(&mut self) -> Result<()> {
        for k in self.keys()? {
            self.remove(&k)?;
        }
        Ok(())
    }
}
