//! Named network namespaces, made and removed as `ip netns` does (a bind
//! mount of a namespace under `/run/netns`), without spawning it; and
//! entering one for a spawned process (instead of `nsenter` or `ip netns
//! exec`).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
};

use crate::error::{DatapathError, Result};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Io { what, path, source }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io("a path without NUL", p)(std::io::ErrorKind::InvalidInput.into()))
}

/// The path of named namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Make `/run/netns` a shared mount point, as iproute2 does, so unmounting
/// a namespace there reaches every mount namespace.
fn shared_netns_dir() -> Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let c = cpath(dir)?;
    // SAFETY: mount(2) with NUL-terminated strings; flags only.
    unsafe {
        if libc::mount(
            c"".as_ptr(),
            c.as_ptr(),
            c"none".as_ptr(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        ) == 0
        {
            return Ok(());
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io("making shared", dir)(std::io::Error::last_os_error()));
        }
        // Not a mount point yet: bind it onto itself, then share it.
        if libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(io("bind-mounting", dir)(std::io::Error::last_os_error()));
        }
        if libc::mount(
            c"".as_ptr(),
            c.as_ptr(),
            c"none".as_ptr(),
            libc::MS_SHARED | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(io("making shared", dir)(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Create named network namespace `name` (`/run/netns/<name>`); it must
/// not exist.
pub fn create_named(name: &str) -> Result<PathBuf> {
    shared_netns_dir()?;
    let path = path_of(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io("creating network namespace file", &path))?;
    let target = cpath(&path)?;
    // A thread of its own moves into a new namespace and pins it on the
    // file; the thread (and nothing else) ever runs in it.
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace, then a
            // bind mount of it; both with checked, NUL-terminated paths.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target.as_ptr(),
                    c"none".as_ptr(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        return Err(io("creating network namespace", &path)(e));
    }
    Ok(path)
}

/// Remove named network namespace `name` (gone already is fine). The
/// namespace itself goes when its last process does.
pub fn delete_named(name: &str) -> Result<()> {
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    let c = cpath(&path)?;
    // SAFETY: umount2(2) on a NUL-terminated path; failure is checked.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(io("unmounting network namespace", &path)(e));
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io("removing network namespace file", &path)(e))
        }
        _ => Ok(()),
    }
}

/// The inode of the namespace at `path` (to compare namespaces).
fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Pids of the processes whose network namespace is the one at `path`.
pub fn pids_in(path: &Path) -> Vec<i32> {
    let Some(want) = inode(path) else { return Vec::new() };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| inode(&Path::new("/proc").join(pid.to_string()).join("ns/net")) == Some(want))
        .collect()
}

/// Make `cmd` run inside the network namespace at `path` (it enters it
/// between fork and exec).
pub fn enter_on_spawn(cmd: &mut std::process::Command, path: &Path) -> Result<()> {
    let file = File::open(path).map_err(io("opening network namespace", path))?;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setns(2), which is async-signal-safe, on an fd it owns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
