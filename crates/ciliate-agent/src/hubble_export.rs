//! The flow exporter: every flow (and every lost-events notice) the
//! observer makes, as one JSON line (a `GetFlowsResponse`, as Hubble's
//! exporter writes it) in `--hubble-export-file-path`, rotated by size with
//! a bounded number of backups, filtered by allow and deny lists and cut to
//! a field mask. The files outlive the ring and the agent: `GetFlows` with a
//! `since` older than the ring reads them back ([`read_back`]).

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use ciliate_hubble::{
    filter::FlowFilters,
    flow::{Flow, FlowFilter},
    observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
};
use pbjson_types::Timestamp;
use tokio::sync::broadcast;

use crate::hubble::{Item, Observer};

/// The exporter's settings (Cilium's `--hubble-export-*` options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub path: PathBuf,
    /// Rotate when the file would pass this many bytes.
    pub max_size: u64,
    /// Rotated files kept (the oldest go first).
    pub max_backups: usize,
    /// JSON flow filters, as given: a flow is written if it passes one of
    /// `allow` (or `allow` is empty) and none of `deny`.
    pub allow: String,
    pub deny: String,
    pub field_mask: Vec<String>,
}

/// Default rotation size (Cilium's `--hubble-export-file-max-size-mb`).
pub const DEFAULT_MAX_SIZE_MB: u64 = 10;
/// Default backups kept (Cilium's `--hubble-export-file-max-backups`).
pub const DEFAULT_MAX_BACKUPS: usize = 5;

/// Flow filters written as JSON objects, alone, separated by commas or in
/// a JSON array: `{"verdict":["DROPPED"]},{"source_pod":["kube-system/"]}`.
pub fn parse_filters(s: &str) -> Result<Vec<FlowFilter>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(vec![]);
    }
    let json = if s.starts_with('[') { s.to_owned() } else { format!("[{s}]") };
    let filters: Vec<FlowFilter> =
        serde_json::from_str(&json).map_err(|e| format!("flow filters {s:?}: {e}"))?;
    FlowFilters::new(&filters, &[]).map_err(|e| format!("flow filters {s:?}: {e}"))?;
    Ok(filters)
}

/// A field mask list, comma or space separated.
pub fn parse_field_mask(s: &str) -> Result<Vec<String>, String> {
    let paths: Vec<String> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if !paths.is_empty() {
        crate::hubble::mask(&Flow::default(), &paths).map_err(|e| e.message().to_owned())?;
    }
    Ok(paths)
}

impl ExportConfig {
    fn filters(&self) -> Result<FlowFilters, String> {
        FlowFilters::new(&parse_filters(&self.allow)?, &parse_filters(&self.deny)?)
            .map_err(|e| e.to_string())
    }
}

/// The backups of `path` (`events.log` → `events-<time>.log`), oldest first.
fn backups(path: &Path) -> Vec<PathBuf> {
    let (stem, ext) = stem_ext(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = format!("{stem}-");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && n.ends_with(&ext) && n.len() > prefix.len() + ext.len()
            })
        })
        .collect();
    // The names hold the time of the rotation: their order is the files'.
    found.sort();
    found
}

fn stem_ext(path: &Path) -> (String, String) {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("events").to_owned();
    let ext =
        path.extension().and_then(|s| s.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
    (stem, ext)
}

/// The file being written, and its size.
struct Writer {
    cfg: ExportConfig,
    out: std::io::BufWriter<std::fs::File>,
    size: u64,
}

impl Writer {
    fn open(cfg: ExportConfig) -> std::io::Result<Self> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&cfg.path)?;
        let size = f.metadata()?.len();
        Ok(Self { cfg, out: std::io::BufWriter::new(f), size })
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let n = line.len() as u64 + 1;
        if self.size > 0 && self.size + n > self.cfg.max_size {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.size += n;
        Ok(())
    }

    /// Close the file as a backup named for now, start a new one, and keep
    /// `max_backups` backups.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let (stem, ext) = stem_ext(&self.cfg.path);
        let now = humantime::format_rfc3339_nanos(SystemTime::now()).to_string().replace(':', "-");
        let to = self.cfg.path.with_file_name(format!("{stem}-{now}{ext}"));
        std::fs::rename(&self.cfg.path, &to)?;
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.cfg.path)?;
        self.out = std::io::BufWriter::new(f);
        self.size = 0;
        let old = backups(&self.cfg.path);
        for p in old.iter().take(old.len().saturating_sub(self.cfg.max_backups)) {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }
}

/// One record as the line the exporter writes, or `None` if the filters
/// leave it out.
fn line(
    node: &str,
    item: &Item,
    filters: &FlowFilters,
    mask: &[String],
) -> Option<serde_json::Result<Vec<u8>>> {
    let mut r = crate::hubble::response(node, item);
    if let Some(ResponseTypes::Flow(f)) = &r.response_types {
        if !filters.passes(f) {
            return None;
        }
        if !mask.is_empty() {
            let masked = crate::hubble::mask(f, mask).ok()?;
            r.response_types = Some(ResponseTypes::Flow(masked));
        }
    }
    Some(serde_json::to_vec(&r))
}

/// Start the exporter on a thread of its own (file writes block); it ends
/// when the observer is dropped.
pub fn start(obs: &Arc<Observer>, cfg: ExportConfig) -> Result<(), String> {
    let filters = cfg.filters()?;
    let mut w = Writer::open(cfg.clone())
        .map_err(|e| format!("opening the flow export file {}: {e}", cfg.path.display()))?;
    let mut rx = obs.subscribe();
    let node = obs.node().to_owned();
    std::thread::Builder::new()
        .name("hubble-export".into())
        .spawn(move || {
            loop {
                let item = match rx.try_recv() {
                    Ok(i) => i,
                    Err(broadcast::error::TryRecvError::Empty) => {
                        // A batch is written: flush it, then wait.
                        if let Err(e) = w.out.flush() {
                            tracing::warn!(subsystem = "hubble", error = %e, "writing the flow export file");
                        }
                        match rx.blocking_recv() {
                            Ok(i) => i,
                            Err(broadcast::error::RecvError::Lagged(n)) => lost(n),
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                    Err(broadcast::error::TryRecvError::Lagged(n)) => lost(n),
                    Err(broadcast::error::TryRecvError::Closed) => return,
                };
                let Some(l) = line(&node, &item, &filters, &w.cfg.field_mask) else { continue };
                if let Err(e) = l.map_err(std::io::Error::other).and_then(|l| w.write(&l)) {
                    tracing::warn!(subsystem = "hubble", error = %e, "writing the flow export file");
                }
            }
        })
        .map_err(|e| format!("starting the flow exporter: {e}"))?;
    Ok(())
}

/// The exporter fell behind by `n` records: said in the file.
fn lost(n: u64) -> Item {
    Item::Lost(ciliate_hubble::flow::LostEvent {
        source: ciliate_hubble::flow::LostEventSource::HubbleRingBuffer as i32,
        num_events_lost: n,
        cpu: None,
    })
}

fn key(t: &Timestamp) -> (i64, i32) {
    (t.seconds, t.nanos)
}

/// The exported flows (backups oldest first, then the file being written)
/// with a time in [since, until] and before `before`, that pass `filters`.
/// Lines that do not parse (one being written) are skipped.
pub fn read_back(
    path: &Path,
    since: Option<&Timestamp>,
    until: Option<&Timestamp>,
    before: Option<&Timestamp>,
    filters: &FlowFilters,
) -> Vec<Arc<Flow>> {
    let mut out = Vec::new();
    let files = backups(path).into_iter().chain(std::iter::once(path.to_path_buf()));
    for p in files {
        let Ok(f) = std::fs::File::open(&p) else { continue };
        for l in std::io::BufReader::new(f).lines() {
            let Ok(l) = l else { break };
            let Ok(r) = serde_json::from_str::<GetFlowsResponse>(&l) else { continue };
            let Some(ResponseTypes::Flow(flow)) = r.response_types else { continue };
            let Some(t) = flow.time.as_ref().map(key) else { continue };
            if since.is_some_and(|s| t < key(s))
                || until.is_some_and(|u| t > key(u))
                || before.is_some_and(|b| t >= key(b))
                || !filters.passes(&flow)
            {
                continue;
            }
            out.push(Arc::new(flow));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciliate_hubble::flow::Verdict;

    fn flow(secs: i64, verdict: Verdict, pod: &str) -> Flow {
        Flow {
            time: Some(Timestamp { seconds: secs, nanos: 0 }),
            verdict: verdict as i32,
            source: Some(ciliate_hubble::flow::Endpoint {
                namespace: "default".into(),
                pod_name: pod.into(),
                ..Default::default()
            }),
            node_name: "n1".into(),
            ..Default::default()
        }
    }

    fn cfg(dir: &Path, max_size: u64) -> ExportConfig {
        ExportConfig {
            path: dir.join("events.log"),
            max_size,
            max_backups: 2,
            allow: r#"{"verdict":["DROPPED"]}"#.into(),
            deny: r#"{"source_pod":["default/noisy"]}"#.into(),
            field_mask: vec![],
        }
    }

    #[test]
    fn filters_and_masks_are_checked_and_name_what_is_wrong() {
        assert_eq!(parse_filters("").unwrap(), vec![]);
        let two = parse_filters(r#"{"verdict":["DROPPED"]},{"source_pod":["kube-system/"]}"#);
        assert_eq!(two.unwrap().len(), 2);
        assert_eq!(parse_filters(r#"[{"sourcePod":["a/"]}]"#).unwrap()[0].source_pod, ["a/"]);
        let e = parse_filters(r#"{"verdict":["MAYBE"]}"#).unwrap_err();
        assert!(e.contains("MAYBE"), "{e}");
        let e = parse_filters(r#"{"http_path":["(("]}"#).unwrap_err();
        assert!(e.contains("(("), "{e}");
        assert_eq!(parse_field_mask("time, verdict source.pod_name").unwrap().len(), 3);
        let e = parse_field_mask("time,colour").unwrap_err();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn the_file_rotates_keeps_its_backups_and_reads_back_in_order() {
        let dir = std::env::temp_dir().join(format!("ciliate-export-{}", uuid::Uuid::new_v4()));
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _gone = Gone(dir.clone());
        let c = cfg(&dir, 600);
        let filters = c.filters().unwrap();
        let mut w = Writer::open(c.clone()).unwrap();
        let mut written = 0;
        for i in 0..40 {
            let (v, pod) = match i % 4 {
                0 => (Verdict::Forwarded, "web"),
                1 => (Verdict::Dropped, "noisy"),
                _ => (Verdict::Dropped, "web"),
            };
            let item = Item::Flow(Arc::new(flow(1000 + i, v, pod)));
            if let Some(l) = line("n1", &item, &filters, &[]) {
                w.write(&l.unwrap()).unwrap();
                written += 1;
            }
        }
        w.out.flush().unwrap();
        assert_eq!(written, 20, "allowed DROPPED, denied the noisy pod");
        let b = backups(&c.path);
        assert_eq!(b.len(), 2, "backups beyond max_backups are removed: {b:?}");
        for p in b.iter().chain([&c.path]) {
            assert!(std::fs::metadata(p).unwrap().len() <= 600, "{} over the size", p.display());
        }
        let all = read_back(&c.path, None, None, None, &FlowFilters::new(&[], &[]).unwrap());
        let times: Vec<i64> = all.iter().map(|f| f.time.unwrap().seconds).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {times:?}");
        assert_eq!(times.last(), Some(&1039), "the newest flow is read back");
        assert!(times.len() < 20, "the oldest backups were removed");
        let since = Timestamp { seconds: 1030, nanos: 0 };
        let before = Timestamp { seconds: 1038, nanos: 0 };
        let some = read_back(&c.path, Some(&since), None, Some(&before), &filters);
        let times: Vec<i64> = some.iter().map(|f| f.time.unwrap().seconds).collect();
        assert_eq!(times, [1030, 1031, 1034, 1035], "window [since, before)");
    }
}
