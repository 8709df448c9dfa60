//! Following an agent's events in a test: subscribe first, make traffic,
//! then wait for the event that should have come.

use std::time::{Duration, Instant};

use ciliate_api::{
    client::{Client, LineStream},
    models::MonitorEvent,
};

use crate::error::{LabError, Result};

/// A subscription to `GET /v1/events` of one agent.
pub struct Events {
    stream: LineStream,
}

impl Events {
    /// Subscribe (`query`: e.g. `type=drop`); events from the moment this
    /// returns on are seen.
    pub fn subscribe(client: &Client, query: &str) -> Result<Self> {
        let target =
            if query.is_empty() { "/v1/events".to_owned() } else { format!("/v1/events?{query}") };
        let stream = client
            .stream(&target)
            .map_err(|e| LabError::Invalid(format!("subscribing to events: {e}")))?;
        Ok(Self { stream })
    }

    /// The first event (within `timeout`) that `pred` accepts; on timeout
    /// the error lists what came instead.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&MonitorEvent) -> bool,
    ) -> std::result::Result<MonitorEvent, Vec<MonitorEvent>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Ok(Some(line)) = self.stream.next_line(Some(deadline)) {
            let Ok(ev) = serde_json::from_slice::<MonitorEvent>(&line) else { continue };
            if pred(&ev) {
                return Ok(ev);
            }
            seen.push(ev);
        }
        Err(seen)
    }
}
