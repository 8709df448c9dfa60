//! A network namespace with a guard.
//!
//! Dropping a [`Netns`] kills every process inside it and deletes it, so a
//! test that panics leaves nothing behind. [`Netns::keep`] hands the
//! namespace over to a longer-lived owner (`ciliate lab up`).
//!
//! Namespaces, devices, addresses, routes and sysctls go through netlink
//! (`ciliate_datapath::netlink`/`netns`); processes enter a namespace
//! between fork and exec. [`Netns::ip`] remains for tests that look at or
//! change a namespace the way an operator would.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use ciliate_datapath::{
    netlink::{Netlink, Route, in_netns},
    netns,
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
        netns::create_named(name).map_err(|e| dp(name, e))?;
        let ns = Self { name: name.to_owned(), keep: false };
        ns.netlink(|nl| nl.set_up(nl.need("lo")?.index, true))?;
        Ok(ns)
    }

    /// Run `f` with a netlink connection inside this namespace (on a
    /// thread that entered it).
    pub fn netlink<T: Send>(
        &self,
        f: impl FnOnce(&Netlink) -> ciliate_datapath::error::Result<T> + Send,
    ) -> Result<T> {
        in_netns(&self.path(), f).map_err(|e| dp(&self.name, e))
    }

    /// Add address `ip/len` to device `dev`.
    pub fn add_address(&self, dev: &str, ip: Ipv4Addr, len: u8) -> Result<()> {
        self.netlink(|nl| nl.replace_address(nl.need(dev)?.index, ip, len))
    }

    /// Route `dst/len` via `gateway`.
    pub fn add_route_via(&self, dst: Ipv4Addr, len: u8, gateway: Ipv4Addr) -> Result<()> {
        self.netlink(|nl| {
            nl.replace_route(&Route { gateway: Some(gateway), ..Route::to(dst, len) })
        })
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

    /// A command that runs inside the namespace (it enters it between fork
    /// and exec).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        if let Err(e) = netns::enter_on_spawn(&mut c, &self.path()) {
            // The spawn then fails with this error instead of running outside.
            c = Command::new(format!("/nonexistent/cannot-enter-{}: {e}", self.name));
        }
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
        self.netlink(|_| ciliate_datapath::netlink::sysctl(key, value))
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
        netns::pids_in(&self.path())
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
        netns::delete_named(&self.name).map_err(|e| dp(&self.name, e))
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
    let b_path = b.path();
    a.netlink(|nl| {
        nl.add_veth(a_dev, b_dev, 1500, Some(&b_path))?;
        nl.set_up(nl.need(a_dev)?.index, true)
    })?;
    b.netlink(|nl| nl.set_up(nl.need(b_dev)?.index, true))
}

/// MAC address and ifindex of `dev` in `ns`.
pub fn link_info(ns: &Netns, dev: &str) -> Result<([u8; 6], u32)> {
    ns.netlink(|nl| nl.need(dev).map(|l| (l.mac, l.index)))
}

fn dp(ns: &str, source: ciliate_datapath::DatapathError) -> LabError {
    LabError::Datapath { ns: ns.to_owned(), source }
}
