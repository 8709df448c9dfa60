//! Typed map wrappers: the only place that turns map bytes into domain
//! types. Each wrapper can be opened from a loaded object or from the node's
//! pin directory (the CLI and a restarted agent do the latter).

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuHashMap, RingBuf};
use ciliate_common::{
    event::RINGBUF_NAME,
    metrics::{self, MetricsKey, MetricsValue},
};

use crate::{
    error::{DatapathError, Result},
    events::Event,
    loader::Loaded,
};

fn map_err(action: &str, map: &str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let (action, map) = (action.to_owned(), map.to_owned());
    move |source| DatapathError::Map {
        action,
        map,
        source: Box::new(source),
    }
}

fn from_pin(dir: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(dir.join(name)).map_err(map_err("opening pinned", name))
}

fn take(loaded: &mut Loaded, name: &str) -> Result<Map> {
    loaded
        .ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::NoMap {
            object: loaded.name.into(),
            map: name.into(),
        })
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
        PerCpuHashMap::try_from(map)
            .map(Self)
            .map_err(map_err("opening", metrics::MAP_NAME))
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
        RingBuf::try_from(map)
            .map(Self)
            .map_err(map_err("opening", RINGBUF_NAME))
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
