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
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: mount(2) with static NUL-terminated strings and a checked target.
    let rc = unsafe {
        libc::mount(c"bpffs".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The pin directory of one node: `<root>/ciliate/<node>`.
#[derive(Clone, Debug)]
pub struct NodePins {
    pub dir: PathBuf,
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
        Ok(Self { dir })
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
