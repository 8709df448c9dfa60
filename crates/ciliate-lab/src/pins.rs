//! What a node has pinned, read with bpftool (the ecosystem's own reader,
//! not the project's): every pinned file under a node's pin directory and
//! every map's entries, for tests that check that nothing changed or
//! nothing leaked.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

/// Every file under `dir`, sorted.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The entries of the pinned map at `path` as `bpftool map dump` prints
/// them (JSON), or `None` for a pin that is no map bpftool can dump (a
/// program, a link, the event ring).
pub fn map_dump(path: &Path) -> Option<serde_json::Value> {
    let out =
        Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.is_array().then_some(v)
}

/// Every map pinned under `dir` by file name, with its entries.
pub fn maps(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    files(dir)
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some((name, map_dump(p)?))
        })
        .collect()
}
