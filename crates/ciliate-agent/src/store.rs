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

/// Make sure `dir` is the agent's own: created (mode 0700) when missing;
/// refused when another user owns it or when its group or others may
/// write to it (they could plant endpoint, policy or identity state, or
/// swap the API socket). The error names the directory and what is wrong.
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let err = |what, reason: String| StoreError { what, path: dir.to_owned(), reason };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err("creating", e.to_string()))?;
    }
    let m = std::fs::metadata(dir).map_err(|e| err("checking", e.to_string()))?;
    if !m.is_dir() {
        return Err(err("checking", "not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(err(
            "refusing",
            format!("owned by uid {}, not by this agent (uid {me})", m.uid()),
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(err(
            "refusing",
            format!(
                "writable by its group or by others (mode {:04o}): `chmod go-w` it",
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_state_directory_others_could_write_to_is_refused_naming_why() {
        let base = std::env::temp_dir().join(format!("ciliate-perm-{}", std::process::id()));
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _gone = Gone(base.clone());
        // Made when missing, the agent's only.
        let fresh = base.join("state");
        private_dir(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // World- and group-writable: refused, saying so.
        for bad in [0o777, 0o775, 0o1777] {
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = private_dir(&fresh).unwrap_err().to_string();
            assert!(e.contains("writable by its group or by others") && e.contains("state"), "{e}");
        }
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&fresh).unwrap();
        // Another user's: refused (root may chown; others skip this part).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
        // A file is no directory.
        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(private_dir(&file).unwrap_err().to_string().contains("not a directory"));
    }
}
