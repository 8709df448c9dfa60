//! Which node a command talks to: its agent's socket and its pin directory.

use std::path::PathBuf;

use anyhow::Context as _;
use ciliate_api::{Client, models::Status};
use ciliate_lab::node::{self, LabState};

use crate::lab::DEFAULT_LAB;

pub struct Target {
    pub socket: Option<PathBuf>,
    pub lab: Option<String>,
    pub pin_dir: Option<PathBuf>,
}

impl Target {
    /// The lab named by --lab (which must exist), or the default lab if up.
    pub fn lab_state(&self) -> anyhow::Result<Option<LabState>> {
        match &self.lab {
            Some(name) => Ok(Some(
                node::load_state(name)?.with_context(|| format!("no lab named {name} is up"))?,
            )),
            None => Ok(node::load_state(DEFAULT_LAB).ok().flatten()),
        }
    }

    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(lab) = self.lab_state()? {
            return Ok(lab.agent_socket);
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(ciliate_api::default_socket(host.trim()))
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(self.socket()?))
    }

    pub fn pin_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.pin_dir {
            return Ok(d.clone());
        }
        if self.socket.is_none()
            && let Some(lab) = self.lab_state()?
        {
            return Ok(lab.pins_dir);
        }
        let status: Status = self
            .client()?
            .get("/v1/status")
            .context("asking the agent for its pin directory (or pass --pin-dir)")?;
        Ok(status.pin_dir.into())
    }
}
