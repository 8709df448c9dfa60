//! The XDP prefilter's deny list (`ciliate prefilter`, Cilium's `cilium
//! prefilter`): source CIDRs whose packets the native devices drop at XDP.
//!
//! Each CIDR has a counter slot in the datapath; a new CIDR takes the
//! lowest free slot, zeroed before the CIDR goes in, so a CIDR's counts
//! start with it and survive agent restarts (the maps are pinned; the list
//! and its slots are kept in `prefilter.json` in the state directory).
//! Changes are all or nothing: every CIDR is checked before anything is
//! written, and a write or a save that fails midway is undone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use ciliate_api::models::{
    Prefilter as PrefilterView, PrefilterCounter, PrefilterDevice, PrefilterSpec,
};
use serde::{Deserialize, Serialize};

/// A denied prefix.
pub type Cidr = (Ipv4Addr, u8);

/// The prefilter's maps (kernel, or memory in tests).
pub trait PrefilterDatapath: Send {
    fn insert(&mut self, cidr: Cidr, slot: u32) -> Result<(), String>;
    fn remove(&mut self, cidr: Cidr) -> Result<(), String>;
    /// Start slot `slot`'s counters from zero.
    fn zero(&mut self, slot: u32) -> Result<(), String>;
    /// Packets and bytes slot `slot` counted.
    fn stats(&self, slot: u32) -> Result<(u64, u64), String>;
    /// The prefixes the datapath holds.
    fn list(&self) -> Result<Vec<Cidr>, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "revision {asked} is not the current one ({current}): list the prefilter again and retry"
    )]
    Conflict { asked: u64, current: u64 },
    #[error("{0} is not in the deny list (nothing was removed)")]
    NotFound(String),
    #[error("the deny list holds at most {max} CIDRs: {have} now, {adding} more would not fit")]
    Full { max: u32, have: usize, adding: usize },
    #[error("the XDP prefilter is off on this node: start the agent with --enable-xdp-prefilter")]
    Off,
    #[error("{0}")]
    Datapath(String),
}

impl PrefilterError {
    /// The API status.
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::NotFound(_) => 404,
            Self::Conflict { .. } => 409,
            Self::Off => 501,
            Self::Full { .. } => 507,
            Self::Datapath(_) => 500,
        }
    }
}

/// What `prefilter.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    revision: u64,
    /// "10.9.0.0/16" → counter slot.
    cidrs: BTreeMap<String, u32>,
}

struct Inner {
    revision: u64,
    cidrs: BTreeMap<Cidr, u32>,
    dp: Box<dyn PrefilterDatapath>,
}

/// The deny list of one node.
pub struct Prefilter {
    inner: Mutex<Inner>,
    devices: Vec<PrefilterDevice>,
    state: Option<PathBuf>,
    max: u32,
}

fn show((net, len): Cidr) -> String {
    format!("{net}/{len}")
}

/// Parse the CIDRs of a request (an address alone is a /32), each once.
fn parse_all(deny: &[String]) -> Result<BTreeSet<Cidr>, PrefilterError> {
    if deny.is_empty() {
        return Err(PrefilterError::Invalid("deny: no CIDR given".into()));
    }
    deny.iter()
        .map(|c| crate::policy::parse_cidr(c.trim()).map_err(PrefilterError::Invalid))
        .collect()
}

impl Prefilter {
    /// The deny list kept in `state_dir` (none: a fresh one in memory),
    /// written again into `dp` (CIDRs the datapath holds that the list does
    /// not go), on `devices` (name, native XDP or not).
    pub fn open(
        mut dp: Box<dyn PrefilterDatapath>,
        state_dir: Option<&Path>,
        devices: &[(String, bool)],
    ) -> Result<Self, PrefilterError> {
        let state = state_dir.map(|d| d.join("prefilter.json"));
        let saved: Saved = match &state {
            Some(p) => crate::store::load(p)
                .map_err(|e| PrefilterError::Datapath(e.to_string()))?
                .unwrap_or_default(),
            None => Saved::default(),
        };
        let mut cidrs = BTreeMap::new();
        for (c, slot) in saved.cidrs {
            let cidr = crate::policy::parse_cidr(&c)
                .map_err(|e| PrefilterError::Datapath(format!("prefilter.json: {e}")))?;
            cidrs.insert(cidr, slot);
        }
        for (c, slot) in &cidrs {
            dp.insert(*c, *slot).map_err(PrefilterError::Datapath)?;
        }
        for c in dp.list().map_err(PrefilterError::Datapath)? {
            if !cidrs.contains_key(&c) {
                dp.remove(c).map_err(PrefilterError::Datapath)?;
            }
        }
        let devices = devices
            .iter()
            .map(|(name, native)| PrefilterDevice {
                name: name.clone(),
                mode: if *native { "native" } else { "generic" }.into(),
            })
            .collect();
        Ok(Self {
            inner: Mutex::new(Inner { revision: saved.revision, cidrs, dp }),
            devices,
            state,
            max: ciliate_common::prefilter::MAX_ENTRIES,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The list, where it runs and what each CIDR dropped.
    pub fn get(&self) -> Result<PrefilterView, PrefilterError> {
        let inner = self.lock();
        let deny: Vec<String> = inner.cidrs.keys().map(|c| show(*c)).collect();
        let mut realized: Vec<Cidr> = inner.dp.list().map_err(PrefilterError::Datapath)?;
        realized.sort();
        let mut counters = Vec::new();
        for (c, slot) in &inner.cidrs {
            let (packets, bytes) = inner.dp.stats(*slot).map_err(PrefilterError::Datapath)?;
            counters.push(PrefilterCounter { cidr: show(*c), packets, bytes });
        }
        Ok(PrefilterView {
            spec: PrefilterSpec { revision: inner.revision, deny },
            status: ciliate_api::models::PrefilterStatus {
                realized: PrefilterSpec {
                    revision: inner.revision,
                    deny: realized.into_iter().map(show).collect(),
                },
                devices: self.devices.clone(),
                counters,
            },
        })
    }

    fn check_revision(inner: &Inner, spec: &PrefilterSpec) -> Result<(), PrefilterError> {
        if spec.revision != 0 && spec.revision != inner.revision {
            return Err(PrefilterError::Conflict { asked: spec.revision, current: inner.revision });
        }
        Ok(())
    }

    /// Save the list as it is now; on failure the caller undoes its change.
    fn save(&self, inner: &Inner) -> Result<(), PrefilterError> {
        let Some(path) = &self.state else { return Ok(()) };
        let saved = Saved {
            revision: inner.revision,
            cidrs: inner.cidrs.iter().map(|(c, s)| (show(*c), *s)).collect(),
        };
        crate::store::save(path, &saved).map_err(|e| PrefilterError::Datapath(e.to_string()))
    }

    /// Deny the CIDRs of `spec` too (those already denied stay as they are).
    pub fn update(&self, spec: &PrefilterSpec) -> Result<PrefilterView, PrefilterError> {
        let asked = parse_all(&spec.deny)?;
        {
            let mut inner = self.lock();
            Self::check_revision(&inner, spec)?;
            let new: Vec<Cidr> =
                asked.into_iter().filter(|c| !inner.cidrs.contains_key(c)).collect();
            if inner.cidrs.len() + new.len() > self.max as usize {
                return Err(PrefilterError::Full {
                    max: self.max,
                    have: inner.cidrs.len(),
                    adding: new.len(),
                });
            }
            if !new.is_empty() {
                let used: BTreeSet<u32> = inner.cidrs.values().copied().collect();
                let slots: Vec<u32> =
                    (0..self.max).filter(|s| !used.contains(s)).take(new.len()).collect();
                let mut written = Vec::new();
                let mut result = Ok(());
                for (c, slot) in new.iter().zip(&slots) {
                    result = inner.dp.zero(*slot).and_then(|()| inner.dp.insert(*c, *slot));
                    if result.is_err() {
                        break;
                    }
                    written.push(*c);
                    inner.cidrs.insert(*c, *slot);
                }
                inner.revision += 1;
                let result =
                    result.map_err(PrefilterError::Datapath).and_then(|()| self.save(&inner));
                if let Err(e) = result {
                    for c in written {
                        let _ = inner.dp.remove(c);
                        inner.cidrs.remove(&c);
                    }
                    inner.revision -= 1;
                    return Err(e);
                }
            }
        }
        self.get()
    }

    /// Stop denying the CIDRs of `spec` (each must be denied now).
    pub fn delete(&self, spec: &PrefilterSpec) -> Result<PrefilterView, PrefilterError> {
        let asked = parse_all(&spec.deny)?;
        {
            let mut inner = self.lock();
            Self::check_revision(&inner, spec)?;
            if let Some(c) = asked.iter().find(|c| !inner.cidrs.contains_key(c)) {
                return Err(PrefilterError::NotFound(show(*c)));
            }
            let mut removed = Vec::new();
            let mut result = Ok(());
            for c in &asked {
                result = inner.dp.remove(*c);
                if result.is_err() {
                    break;
                }
                let slot = inner.cidrs.remove(c).unwrap_or_default();
                removed.push((*c, slot));
            }
            inner.revision += 1;
            let result = result.map_err(PrefilterError::Datapath).and_then(|()| self.save(&inner));
            if let Err(e) = result {
                for (c, slot) in removed {
                    let _ = inner.dp.insert(c, slot);
                    inner.cidrs.insert(c, slot);
                }
                inner.revision -= 1;
                return Err(e);
            }
        }
        self.get()
    }
}

/// The prefilter's maps in memory, for tests without a kernel: one write
/// fails once `fail_after` more have succeeded.
#[derive(Debug, Default)]
pub struct MemoryPrefilter {
    pub cidrs: std::sync::Arc<Mutex<BTreeMap<Cidr, u32>>>,
    pub stats: std::sync::Arc<Mutex<BTreeMap<u32, (u64, u64)>>>,
    pub fail_after: Option<usize>,
}

impl MemoryPrefilter {
    fn write(&mut self) -> Result<(), String> {
        match &mut self.fail_after {
            Some(0) => {
                self.fail_after = None;
                Err("injected map write failure".into())
            }
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl PrefilterDatapath for MemoryPrefilter {
    fn insert(&mut self, cidr: Cidr, slot: u32) -> Result<(), String> {
        self.write()?;
        self.cidrs.lock().unwrap().insert(cidr, slot);
        Ok(())
    }
    fn remove(&mut self, cidr: Cidr) -> Result<(), String> {
        self.write()?;
        self.cidrs.lock().unwrap().remove(&cidr);
        Ok(())
    }
    fn zero(&mut self, slot: u32) -> Result<(), String> {
        self.stats.lock().unwrap().insert(slot, (0, 0));
        Ok(())
    }
    fn stats(&self, slot: u32) -> Result<(u64, u64), String> {
        Ok(self.stats.lock().unwrap().get(&slot).copied().unwrap_or_default())
    }
    fn list(&self) -> Result<Vec<Cidr>, String> {
        Ok(self.cidrs.lock().unwrap().keys().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(revision: u64, deny: &[&str]) -> PrefilterSpec {
        PrefilterSpec { revision, deny: deny.iter().map(|s| s.to_string()).collect() }
    }

    fn open(dir: Option<&Path>, mem: &MemoryPrefilter) -> Prefilter {
        let dp = MemoryPrefilter {
            cidrs: mem.cidrs.clone(),
            stats: mem.stats.clone(),
            fail_after: mem.fail_after,
        };
        Prefilter::open(Box::new(dp), dir, &[("eth0".into(), true)]).unwrap()
    }

    #[test]
    fn update_delete_and_revisions() {
        let mem = MemoryPrefilter::default();
        let p = open(None, &mem);
        let v = p.update(&spec(0, &["10.9.0.0/16", "192.0.2.7"])).unwrap();
        assert_eq!(v.spec.revision, 1);
        assert_eq!(v.spec.deny, ["10.9.0.0/16", "192.0.2.7/32"]);
        assert_eq!(v.status.realized.deny, v.spec.deny);
        assert_eq!(v.status.devices[0].mode, "native");
        // Slots 0 and 1, in CIDR order.
        assert_eq!(mem.cidrs.lock().unwrap().values().copied().collect::<Vec<_>>(), [0, 1]);
        // Already there: nothing changes, not even the revision.
        assert_eq!(p.update(&spec(1, &["10.9.0.0/16"])).unwrap().spec.revision, 1);
        // A stale revision is refused, naming both.
        let e = p.update(&spec(7, &["10.10.0.0/16"])).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("revision 7") && e.to_string().contains("(1)"), "{e}");
        // Delete frees the slot; the next CIDR takes it, from zero.
        mem.stats.lock().unwrap().insert(0, (5, 500));
        let v = p.delete(&spec(1, &["10.9.0.0/16"])).unwrap();
        assert_eq!(
            (v.spec.revision, v.spec.deny.as_slice()),
            (2, &["192.0.2.7/32".to_string()][..])
        );
        let v = p.update(&spec(2, &["198.51.100.0/24"])).unwrap();
        assert_eq!(mem.cidrs.lock().unwrap()[&("198.51.100.0".parse().unwrap(), 24)], 0);
        let c = v.status.counters.iter().find(|c| c.cidr == "198.51.100.0/24").unwrap();
        assert_eq!((c.packets, c.bytes), (0, 0));
    }

    #[test]
    fn bad_input_changes_nothing() {
        let mem = MemoryPrefilter::default();
        let p = open(None, &mem);
        p.update(&spec(0, &["10.9.0.0/16"])).unwrap();
        for (deny, needle) in [
            (vec!["10.9.1.0/16"], "host bits"),
            (vec!["10.1.0.0/16", "300.1.1.1/32"], "300.1.1.1"),
            (vec!["10.1.0.0/33"], "prefix length"),
            (vec!["fd00::/8"], "fd00::/8"),
            (vec![], "no CIDR"),
        ] {
            let e = p.update(&spec(0, &deny)).unwrap_err();
            assert_eq!(e.status(), 400, "{deny:?}");
            assert!(e.to_string().contains(needle), "{deny:?}: {e}");
        }
        // Delete of one not there removes nothing, not even the others.
        let e = p.delete(&spec(0, &["10.9.0.0/16", "10.8.0.0/16"])).unwrap_err();
        assert_eq!((e.status(), e.to_string().contains("10.8.0.0/16")), (404, true), "{e}");
        let v = p.get().unwrap();
        assert_eq!((v.spec.revision, v.spec.deny.len()), (1, 1));
        assert_eq!(mem.cidrs.lock().unwrap().len(), 1);
    }

    #[test]
    fn full_list_refused_whole() {
        let mem = MemoryPrefilter::default();
        let mut p = open(None, &mem);
        p.max = 3;
        p.update(&spec(0, &["10.1.0.0/16", "10.2.0.0/16"])).unwrap();
        let e = p.update(&spec(0, &["10.3.0.0/16", "10.4.0.0/16"])).unwrap_err();
        assert_eq!(e.status(), 507, "{e}");
        assert_eq!(mem.cidrs.lock().unwrap().len(), 2);
    }

    #[test]
    fn failed_write_rolled_back_whole() {
        let mem = MemoryPrefilter { fail_after: Some(3), ..Default::default() };
        let p = open(None, &mem);
        p.update(&spec(0, &["10.1.0.0/16", "10.2.0.0/16"])).unwrap();
        // The third write fails: the one before it is undone.
        let e = p.update(&spec(0, &["10.3.0.0/16", "10.4.0.0/16"])).unwrap_err();
        assert_eq!(e.status(), 500, "{e}");
        let v = p.get().unwrap();
        assert_eq!((v.spec.revision, v.spec.deny.len()), (1, 2));
        assert_eq!(mem.cidrs.lock().unwrap().len(), 2);
    }

    #[test]
    fn restart_keeps_list_slots_and_counts() {
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir =
            Gone(std::env::temp_dir().join(format!("ciliate-prefilter-{}", uuid::Uuid::new_v4())));
        let mem = MemoryPrefilter::default();
        let p = open(Some(&dir.0), &mem);
        p.update(&spec(0, &["10.1.0.0/16", "10.2.0.0/16"])).unwrap();
        p.delete(&spec(0, &["10.1.0.0/16"])).unwrap();
        mem.stats.lock().unwrap().insert(1, (9, 900));
        // A stray entry in the map (written by no list) goes at open.
        mem.cidrs.lock().unwrap().insert(("10.99.0.0".parse().unwrap(), 16), 7);
        drop(p);
        let p = open(Some(&dir.0), &mem);
        let v = p.get().unwrap();
        assert_eq!(v.spec.revision, 2);
        assert_eq!(v.spec.deny, ["10.2.0.0/16"]);
        assert_eq!(v.status.realized.deny, ["10.2.0.0/16"]);
        assert_eq!((v.status.counters[0].packets, v.status.counters[0].bytes), (9, 900));
    }
}
