//! Atomic JSON files: written to a temporary name and renamed over the old
//! one, so a crash of the agent leaves either the old or the new content.
//! They are not synced to disk: what they record (addresses, endpoints)
//! describes pods that do not outlive a crash of the machine either, and a
//! sync per CNI ADD would cost more than the rest of the ADD.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct StoreError {
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// Read `path` as JSON; `None` when it does not exist.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let err = |what, reason: String| StoreError { what, path: path.to_owned(), reason };
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| err("parsing", e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("reading", e.to_string())),
    }
}

/// Write `value` to `path` atomically.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let err = |what, reason: String| StoreError { what, path: path.to_owned(), reason };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err("creating the directory of", e.to_string()))?;
    }
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err("encoding", e.to_string()))?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| err("creating", e.to_string()))?;
    f.write_all(&bytes).map_err(|e| err("writing", e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err("renaming into", e.to_string()))
}

/// Remove `path`; fine if it is already gone.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(StoreError { what: "removing", path: path.to_owned(), reason: e.to_string() })
        }
    }
}
