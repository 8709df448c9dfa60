//! bpffs: mounted at `/sys/fs/bpf` when it is not; every node gets its own
//! directory `/sys/fs/bpf/ciliate/<node>/` for its maps, programs and links.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use crate::error::{DatapathError, Result};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Is `path` the root of a mounted bpffs?
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mount bpffs at `path` unless it is mounted there already.
pub fn ensure_mounted(path: &Path) -> Result<()> {
    // Threads of one process (parallel tests) must not both mount it.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if is_bpffs(path) {
        return Ok(());
    }
    let err = |source| DatapathError::MountBpffs { path: path.to_owned(), source };
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // Another process may remove an empty parent (a lab going down removes
    // the labs' directory when it is empty) between our mkdir and mount:
    // then the directory is made again.
    let mut attempt = 0;
    loop {
        let e = match std::fs::create_dir_all(path) {
            Err(e) => e,
            Ok(()) => {
                // SAFETY: mount(2) with static NUL-terminated strings and a
                // checked target.
                let rc = unsafe {
                    libc::mount(
                        c"bpffs".as_ptr(),
                        target.as_ptr(),
                        c"bpf".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
                std::io::Error::last_os_error()
            }
        };
        attempt += 1;
        if e.kind() != std::io::ErrorKind::NotFound || attempt >= 5 {
            return Err(err(e));
        }
    }
}

/// Unmount whatever is mounted at `path` (lazily: pins still open elsewhere
/// go when their last user does). Not mounted is fine.
pub fn unmount(path: &Path) -> Result<()> {
    if !is_bpffs(path) {
        return Ok(());
    }
    let err =
        |source| DatapathError::Io { what: "unmounting bpffs at", path: path.to_owned(), source };
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: umount2(2) on a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A bpffs of its own, mounted at a directory this guard creates, and
/// unmounted and removed when it is dropped (pinned maps and links inside
/// go with it). Tests and labs use one so they never leave pins behind in
/// the machine's `/sys/fs/bpf`.
#[derive(Debug)]
pub struct PrivateBpffs {
    pub root: PathBuf,
    keep: bool,
}

impl PrivateBpffs {
    pub fn mount(root: &Path) -> Result<Self> {
        ensure_mounted(root)?;
        Ok(Self { root: root.to_owned(), keep: false })
    }

    /// Leave it mounted when this guard goes (a kept lab).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Unmount and remove the directory now.
    pub fn remove(root: &Path) -> Result<()> {
        unmount(root)?;
        match std::fs::remove_dir(root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Io {
                what: "removing bpffs mount point",
                path: root.to_owned(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if !self.keep {
            let _ = Self::remove(&self.root);
        }
    }
}

/// The pin directory of one node: `<root>/ciliate/<node>`, and the
/// capacities its maps are made with.
#[derive(Clone, Debug)]
pub struct NodePins {
    pub dir: PathBuf,
    /// Map name → capacity, where it is not the compiled one (the agent's
    /// `--bpf-*-max` options). Part of what a node's programs were loaded
    /// for: a change makes them load anew and the maps migrate.
    pub capacities: std::collections::BTreeMap<String, u32>,
    /// Entries of a Maglev table (`--bpf-lb-maglev-table-size`; the
    /// programs' load-time global, and part of what they were loaded for).
    pub maglev_size: u32,
}

impl NodePins {
    /// Mount bpffs at `root` if needed and create the node's directory.
    pub fn create(root: &Path, node: &str) -> Result<Self> {
        ensure_mounted(root)?;
        let dir = root.join("ciliate").join(node);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
            what: "creating pin directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            capacities: Default::default(),
            maglev_size: ciliate_common::lb::MAGLEV_DEFAULT_SIZE,
        })
    }

    /// Where the link of `program` on `device` is pinned. (bpffs refuses
    /// names with a '.', hence the '_'.)
    pub fn link_path(&self, device: &str, program: &str) -> PathBuf {
        self.dir.join("links").join(format!("{device}_{program}"))
    }

    /// Remove everything pinned for this node (maps, links). Links removed
    /// here detach their programs.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Io {
                what: "removing pin directory",
                path: self.dir.clone(),
                source,
            }),
        }
    }
}
