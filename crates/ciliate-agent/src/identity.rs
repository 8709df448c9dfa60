//! Security identities: a set of labels → a number. The same labels always
//! get the same identity; cluster identities start at 256 and the reserved
//! ones (1-8) are Cilium's. Persisted, so identities survive restarts.
//! Cluster identities are released by the cluster's garbage collection
//! when no endpoint of a live node had them for the heartbeat timeout
//! ([`Identities::forget`]); CIDR identities with the last rule that names
//! them.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use ciliate_api::models::Identity;
use ciliate_common::identity as reserved;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{IdView, Prefix, cidr_labels, parse_cidr},
    store::{self, StoreError},
};

/// Labels of an endpoint as `source:key=value`, sorted: the identity key.
pub type LabelSet = Vec<String>;

pub use ciliate_api::models::label_set;

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    ids: BTreeMap<u32, LabelSet>,
}

pub struct Identities {
    by_labels: BTreeMap<LabelSet, u32>,
    by_id: BTreeMap<u32, LabelSet>,
    /// Local (CIDR) identities by the prefix they stand for.
    local: BTreeMap<Prefix, u32>,
    /// [`Identities::view`], built on first use after a change.
    view: std::sync::OnceLock<Arc<IdView>>,
    path: Option<PathBuf>,
}

impl Identities {
    pub fn open(path: Option<PathBuf>) -> Result<Self, StoreError> {
        let p: Persisted = match &path {
            Some(p) => store::load(p)?.unwrap_or_default(),
            None => Persisted::default(),
        };
        let by_labels = p.ids.iter().map(|(id, l)| (l.clone(), *id)).collect();
        // A local identity stands for the longest prefix its labels name.
        let local = p
            .ids
            .iter()
            .filter(|(id, _)| **id & reserved::LOCAL_FLAG != 0)
            .filter_map(|(id, labels)| {
                let longest = labels
                    .iter()
                    .filter_map(|l| l.strip_prefix("cidr:").and_then(|c| parse_cidr(c).ok()))
                    .max_by_key(|p| p.1)?;
                Some((longest, *id))
            })
            .collect();
        Ok(Self { by_labels, by_id: p.ids, local, view: std::sync::OnceLock::new(), path })
    }

    /// The identity of `labels`, allocating the lowest free cluster
    /// identity for a new set (in a cluster, the API allocates it through
    /// the store first and hands it to [`Identities::learn`]).
    /// A set that is exactly one reserved label (`reserved:health`) has
    /// that reserved identity.
    pub fn allocate(&mut self, labels: &LabelSet) -> Result<u32, StoreError> {
        if let [only] = labels.as_slice()
            && let Some(name) = only.strip_prefix("reserved:")
            && let Some(id) =
                (1..reserved::MIN_CLUSTER).find(|id| reserved::reserved_name(*id) == Some(name))
        {
            return Ok(id);
        }
        if let Some(id) = self.by_labels.get(labels) {
            return Ok(*id);
        }
        let mut id = reserved::MIN_CLUSTER;
        while self.by_id.contains_key(&id) {
            id += 1;
        }
        self.by_id.insert(id, labels.clone());
        self.by_labels.insert(labels.clone(), id);
        self.view = std::sync::OnceLock::new();
        if let Err(e) = self.save() {
            self.by_id.remove(&id);
            self.by_labels.remove(labels);
            self.view = std::sync::OnceLock::new();
            return Err(e);
        }
        Ok(id)
    }

    /// The local (CIDR) identities of `prefixes` (`(prefix, in the
    /// cluster)`): bit 24 set, one per prefix, labelled by
    /// [`cidr_labels`]; allocated when new, relabelled when their labels
    /// changed (an older state, or a new cluster CIDR). Saved once for the
    /// whole batch, so naming 10,000 CIDRs costs one write.
    pub fn allocate_locals(
        &mut self,
        prefixes: &[(Prefix, bool)],
    ) -> Result<BTreeMap<Prefix, u32>, StoreError> {
        let before = (self.by_id.clone(), self.by_labels.clone(), self.local.clone());
        let mut out = BTreeMap::new();
        let mut changed = false;
        let mut next = reserved::LOCAL_FLAG | 1;
        for &(p, in_cluster) in prefixes {
            let labels = cidr_labels(p, in_cluster);
            let id = match self.local.get(&p) {
                Some(&id) => {
                    if self.by_id.get(&id) != Some(&labels) {
                        if let Some(old) = self.by_id.insert(id, labels.clone()) {
                            self.by_labels.remove(&old);
                        }
                        self.by_labels.insert(labels, id);
                        changed = true;
                    }
                    id
                }
                None => {
                    while self.by_id.contains_key(&next) {
                        next += 1;
                    }
                    self.by_id.insert(next, labels.clone());
                    self.by_labels.insert(labels, next);
                    self.local.insert(p, next);
                    changed = true;
                    next
                }
            };
            out.insert(p, id);
        }
        if changed {
            self.view = std::sync::OnceLock::new();
            if let Err(e) = self.save() {
                (self.by_id, self.by_labels, self.local) = before;
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Release every local (CIDR) identity whose prefix is not in `keep`
    /// (no policy names it any more). Returns the released identities.
    pub fn release_locals_except(
        &mut self,
        keep: &std::collections::BTreeSet<Prefix>,
    ) -> Result<Vec<u32>, StoreError> {
        let gone: Vec<(Prefix, u32)> =
            self.local.iter().filter(|(p, _)| !keep.contains(p)).map(|(p, id)| (*p, *id)).collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let before = (self.by_id.clone(), self.by_labels.clone(), self.local.clone());
        for (p, id) in &gone {
            self.local.remove(p);
            if let Some(labels) = self.by_id.remove(id) {
                self.by_labels.remove(&labels);
            }
        }
        self.view = std::sync::OnceLock::new();
        if let Err(e) = self.save() {
            (self.by_id, self.by_labels, self.local) = before;
            return Err(e);
        }
        Ok(gone.into_iter().map(|(_, id)| id).collect())
    }

    /// Local (CIDR) identities by prefix.
    pub fn locals(&self) -> &BTreeMap<Prefix, u32> {
        &self.local
    }

    /// Every identity's labels, reserved ones included, indexed for
    /// resolution; shared until the identities change.
    pub fn view(&self) -> Arc<IdView> {
        self.view
            .get_or_init(|| {
                Arc::new(IdView::new(self.list().into_iter().map(|i| (i.id, i.labels)).collect()))
            })
            .clone()
    }

    fn save(&self) -> Result<(), StoreError> {
        match &self.path {
            Some(p) => store::save(p, &Persisted { ids: self.by_id.clone() }),
            None => Ok(()),
        }
    }

    /// Take cluster identities as the cluster's store has them (allocated
    /// here or by other nodes): the store is right, so an ID released and
    /// allocated again for other labels is relabelled, and a label set the
    /// store gave another ID moves to it. Whether anything changed.
    pub fn learn(&mut self, ids: Vec<(u32, LabelSet)>) -> Result<bool, StoreError> {
        let before = (self.by_id.clone(), self.by_labels.clone());
        let mut changed = false;
        for (id, labels) in ids {
            if !reserved::is_cluster(id) {
                continue;
            }
            if self.by_id.get(&id) == Some(&labels) {
                continue;
            }
            if let Some(old) = self.by_id.remove(&id) {
                self.by_labels.remove(&old);
            }
            if let Some(old_id) = self.by_labels.remove(&labels) {
                self.by_id.remove(&old_id);
            }
            self.by_id.insert(id, labels.clone());
            self.by_labels.insert(labels, id);
            changed = true;
        }
        if changed {
            self.view = std::sync::OnceLock::new();
            if let Err(e) = self.save() {
                (self.by_id, self.by_labels) = before;
                self.view = std::sync::OnceLock::new();
                return Err(e);
            }
        }
        Ok(changed)
    }

    /// Cluster identities known here but not in `store` (all the store
    /// has), leaving out those in `keep`.
    pub fn missing_from(
        &self,
        store: &BTreeMap<u32, LabelSet>,
        keep: &std::collections::BTreeSet<u32>,
    ) -> Vec<u32> {
        self.by_id
            .keys()
            .filter(|id| reserved::is_cluster(**id))
            .filter(|id| !store.contains_key(id) && !keep.contains(id))
            .copied()
            .collect()
    }

    /// Forget cluster identities the cluster released; whether any was
    /// known. (Reserved and local CIDR identities are not the cluster's.)
    pub fn forget(&mut self, ids: &[u32]) -> Result<bool, StoreError> {
        let before = (self.by_id.clone(), self.by_labels.clone());
        let mut gone = false;
        for id in ids.iter().filter(|id| reserved::is_cluster(**id)) {
            if let Some(labels) = self.by_id.remove(id) {
                self.by_labels.remove(&labels);
                gone = true;
            }
        }
        if gone {
            self.view = std::sync::OnceLock::new();
            if let Err(e) = self.save() {
                (self.by_id, self.by_labels) = before;
                self.view = std::sync::OnceLock::new();
                return Err(e);
            }
        }
        Ok(gone)
    }

    /// The ID label set `labels` has here, if any.
    pub fn id_of(&self, labels: &LabelSet) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    pub fn get(&self, id: u32) -> Option<Identity> {
        if let Some(name) = reserved::reserved_name(id) {
            return Some(Identity { id, labels: vec![format!("reserved:{name}")], reserved: true });
        }
        self.by_id.get(&id).map(|l| Identity { id, labels: l.clone(), reserved: false })
    }

    /// Reserved identities first, then the allocated ones, by number.
    pub fn list(&self) -> Vec<Identity> {
        (1..reserved::MIN_CLUSTER)
            .filter_map(|id| reserved::reserved_name(id).and_then(|_| self.get(id)))
            .chain(self.by_id.keys().filter_map(|id| self.get(*id)))
            .collect()
    }

    /// Cluster identities allocated (not counting local CIDR ones).
    pub fn allocated(&self) -> usize {
        self.by_id.keys().filter(|id| **id & reserved::LOCAL_FLAG == 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> LabelSet {
        label_set(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn the_same_labels_get_the_same_identity_in_any_order() {
        let mut ids = Identities::open(None).unwrap();
        let a = ids.allocate(&labels(&[("app", "web"), ("tier", "fe")])).unwrap();
        let b = ids.allocate(&labels(&[("tier", "fe"), ("app", "web")])).unwrap();
        let c = ids.allocate(&labels(&[("app", "db")])).unwrap();
        assert_eq!(a, b);
        assert_eq!((a, c), (256, 257));
        assert_eq!(ids.get(a).unwrap().labels, ["k8s:app=web", "k8s:tier=fe"]);
    }

    #[test]
    fn a_reserved_label_set_has_its_reserved_identity() {
        let mut ids = Identities::open(None).unwrap();
        assert_eq!(ids.allocate(&labels(&[("reserved:health", "")])).unwrap(), 4);
        assert_eq!(ids.allocate(&labels(&[("reserved:host", "")])).unwrap(), 1);
        assert_eq!(ids.allocated(), 0, "nothing allocated for them");
        assert_eq!(ids.allocate(&labels(&[("reserved:health", ""), ("app", "x")])).unwrap(), 256);
    }

    #[test]
    fn reserved_identities_are_listed_first_with_their_names() {
        let mut ids = Identities::open(None).unwrap();
        ids.allocate(&labels(&[("app", "x")])).unwrap();
        let list = ids.list();
        assert_eq!(list[0].labels, ["reserved:host"]);
        assert_eq!(list.iter().find(|i| i.id == 4).unwrap().labels, ["reserved:health"]);
        assert_eq!(list.last().unwrap().id, 256);
        assert!(list.iter().filter(|i| i.reserved).count() == 8);
    }

    #[test]
    fn identities_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("ciliate-ids-{}", std::process::id()));
        let path = dir.join("identities.json");
        let a = Identities::open(Some(path.clone()))
            .unwrap()
            .allocate(&labels(&[("app", "web")]))
            .unwrap();
        let mut again = Identities::open(Some(path)).unwrap();
        assert_eq!(again.allocate(&labels(&[("app", "web")])).unwrap(), a);
        assert_eq!(again.allocate(&labels(&[("app", "new")])).unwrap(), a + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_store_is_right_about_reused_ids_and_identities_it_no_longer_has() {
        let mut ids = Identities::open(None).unwrap();
        let (a, b, c) = (labels(&[("app", "a")]), labels(&[("app", "b")]), labels(&[("app", "c")]));
        assert!(ids.learn(vec![(300, a.clone()), (301, b.clone())]).unwrap());
        assert!(!ids.learn(vec![(300, a.clone())]).unwrap(), "nothing new");
        // 300 was released and given to c: relabelled, a is gone.
        assert!(ids.learn(vec![(300, c.clone())]).unwrap());
        assert_eq!(ids.get(300).unwrap().labels, c);
        assert_eq!(ids.view().find(&a), None);
        // b moved to 302 in the store: 301 goes.
        assert!(ids.learn(vec![(302, b.clone())]).unwrap());
        assert!(ids.get(301).is_none());
        // The store has only 302; 300 is kept while an endpoint has it.
        let store = BTreeMap::from([(302, b)]);
        let keep = std::collections::BTreeSet::from([300]);
        assert!(ids.missing_from(&store, &keep).is_empty());
        assert_eq!(ids.missing_from(&store, &Default::default()), vec![300]);
        assert!(ids.forget(&[300, 1]).unwrap());
        assert!(ids.get(1).is_some(), "reserved identities are never forgotten");
        assert_eq!(ids.allocated(), 1);
    }
}
