//! Security identities: a set of labels → a number. The same labels always
//! get the same identity; cluster identities start at 256 and the reserved
//! ones (1-8) are Cilium's. Persisted, so identities survive restarts.
//! (Identities are never released here; GC of unused identities comes with
//! the kvstore, where several nodes share them.)

use std::{collections::BTreeMap, path::PathBuf};

use ciliate_api::models::Identity;
use ciliate_common::identity as reserved;
use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError};

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
    path: Option<PathBuf>,
    /// The cluster's store: cluster identities are allocated there, so
    /// every node gives the same labels the same identity. Without it
    /// (tests), allocation is local.
    pub cluster: Option<std::sync::Arc<dyn crate::kvstore::KvStore>>,
}

impl Identities {
    pub fn open(path: Option<PathBuf>) -> Result<Self, StoreError> {
        let p: Persisted = match &path {
            Some(p) => store::load(p)?.unwrap_or_default(),
            None => Persisted::default(),
        };
        let by_labels = p.ids.iter().map(|(id, l)| (l.clone(), *id)).collect();
        Ok(Self { by_labels, by_id: p.ids, path, cluster: None })
    }

    /// The identity of `labels`, allocating the lowest free cluster
    /// identity for a new set.
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
        let id = match &self.cluster {
            Some(kv) => {
                crate::cluster::allocate_identity(kv.as_ref(), labels, reserved::MIN_CLUSTER)
                    .map_err(|e| StoreError {
                        what: "allocating an identity in",
                        path: kv.describe().into(),
                        reason: e.to_string(),
                    })?
            }
            None => {
                let mut id = reserved::MIN_CLUSTER;
                while self.by_id.contains_key(&id) {
                    id += 1;
                }
                id
            }
        };
        self.by_id.insert(id, labels.clone());
        self.by_labels.insert(labels.clone(), id);
        if let Some(p) = &self.path {
            let saved = store::save(p, &Persisted { ids: self.by_id.clone() });
            if let Err(e) = saved {
                self.by_id.remove(&id);
                self.by_labels.remove(labels);
                return Err(e);
            }
        }
        Ok(id)
    }

    /// The local (CIDR) identity of `label` (`cidr:10.0.0.0/8`): bit 24
    /// set, allocated once, persisted like the others.
    pub fn allocate_local(&mut self, label: &str) -> Result<u32, StoreError> {
        let labels = vec![label.to_owned()];
        if let Some(id) = self.by_labels.get(&labels) {
            return Ok(*id);
        }
        let mut id = reserved::LOCAL_FLAG | 1;
        while self.by_id.contains_key(&id) {
            id += 1;
        }
        self.by_id.insert(id, labels.clone());
        self.by_labels.insert(labels.clone(), id);
        if let Some(p) = &self.path
            && let Err(e) = store::save(p, &Persisted { ids: self.by_id.clone() })
        {
            self.by_id.remove(&id);
            self.by_labels.remove(&labels);
            return Err(e);
        }
        Ok(id)
    }

    /// Remember cluster identities allocated elsewhere (other nodes);
    /// whether any was new.
    pub fn learn(&mut self, ids: Vec<(u32, LabelSet)>) -> Result<bool, StoreError> {
        let mut new = false;
        for (id, labels) in ids {
            if self.by_id.contains_key(&id) || self.by_labels.contains_key(&labels) {
                continue;
            }
            self.by_id.insert(id, labels.clone());
            self.by_labels.insert(labels, id);
            new = true;
        }
        if new && let Some(p) = &self.path {
            store::save(p, &Persisted { ids: self.by_id.clone() })?;
        }
        Ok(new)
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
}
