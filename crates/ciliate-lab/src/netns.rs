//! A network namespace with a guard.
//!
//! Dropping a [`Netns`] kills every process inside it and deletes it, so a
//! test that panics leaves nothing behind. [`Netns::keep`] hands the
//! namespace over to a longer-lived owner (`ciliate lab up`).

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::error::{LabError, Result};

/// Run a command to completion; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn { cmd: shown.clone(), source })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the namespace of the calling process.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Does a named namespace `name` exist?
pub fn exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}

/// Every named namespace.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Create namespace `name`; fails if it exists. Loopback is brought up.
    pub fn create(name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.len() > 64 {
            return Err(LabError::Invalid(format!("bad namespace name {name:?}")));
        }
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_owned(), keep: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Take ownership of an existing namespace (to delete it).
    pub fn adopt(name: &str) -> Self {
        Self { name: name.to_owned(), keep: false }
    }

    /// A handle on an existing namespace that never deletes it.
    pub fn existing(name: &str) -> Self {
        Self { name: name.to_owned(), keep: true }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Do not delete the namespace when this guard is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `args` inside the namespace; stdout, or an error with stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) =
            args.split_first().ok_or_else(|| LabError::Invalid("empty command".into()))?;
        run(self.command(program).args(rest))
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Set a sysctl inside the namespace (never in the root namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Start a long-running process inside the namespace. It is killed when
    /// the namespace is dropped.
    pub fn spawn(&self, args: &[&str]) -> Result<Child> {
        self.spawn_with(args, false)
    }

    /// Like [`Netns::spawn`], with stdin, stdout and stderr on /dev/null: for
    /// servers that outlive the command that started them (so they hold no
    /// pipe of their parent's open).
    pub fn spawn_detached(&self, args: &[&str]) -> Result<Child> {
        self.spawn_with(args, true)
    }

    fn spawn_with(&self, args: &[&str], detached: bool) -> Result<Child> {
        let (program, rest) =
            args.split_first().ok_or_else(|| LabError::Invalid("empty command".into()))?;
        let mut cmd = self.command(program);
        cmd.args(rest).stdin(Stdio::null());
        if detached {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        cmd.spawn().map_err(|source| LabError::Spawn { cmd: format!("{cmd:?}"), source })
    }

    /// Run `f` on a thread that has entered this namespace, so netlink and
    /// BPF attach calls made by `f` act inside it.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let file = File::open(self.path())
            .map_err(|source| LabError::Enter { ns: self.name.clone(), source })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this
                // thread, which ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(LabError::Enter {
                        ns: self.name.clone(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        ip(&["netns", "pids", &self.name])
            .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kill everything inside and delete the namespace now.
    pub fn delete(mut self) -> Result<()> {
        self.keep = true;
        self.destroy()
    }

    fn destroy(&self) -> Result<()> {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a pid; failure (already gone) is fine.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !exists(&self.name) {
            return Ok(());
        }
        ip(&["netns", "del", &self.name]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = self.destroy()
        {
            eprintln!("removing namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair: `a_dev` in `a`, `b_dev` in `b`, both up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    a.ip(&["link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name()])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

/// MAC address and ifindex of `dev` in `ns`.
pub fn link_info(ns: &Netns, dev: &str) -> Result<([u8; 6], u32)> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| LabError::Invalid(format!("ip -j link show {dev}: {e}")))?;
    let entry = &v[0];
    let ifindex = entry["ifindex"].as_u64().unwrap_or(0) as u32;
    let mac = ciliate_datapath::node::parse_mac(entry["address"].as_str().unwrap_or(""))
        .ok_or_else(|| LabError::Invalid(format!("{dev} has no MAC address")))?;
    Ok((mac, ifindex))
}
