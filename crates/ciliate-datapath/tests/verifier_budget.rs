//! Loads every program of every object the eBPF crate builds and checks the
//! verifier's processed-instruction count against the budget: at most half
//! of the kernel's 1,000,000-instruction limit, so a change that doubles a
//! program's complexity is caught here and not on a user's kernel.
//!
//! The counts are recorded in `verifier-budget.txt` beside this crate's
//! Cargo.toml. The test fails when a program is missing from the file or
//! the file names a program that no longer exists, and when a count grew
//! by more than 20%; smaller drift is printed. `CILIATE_BLESS=1 cargo test --test verifier_budget` rewrites it.
//! Needs root; CI runs as root.

use std::{collections::BTreeMap, path::PathBuf};

use ciliate_common::config::HostConfig;
use ciliate_datapath::{loader, objects, testrun::ScratchNode};

const KERNEL_LIMIT: u32 = 1_000_000;
const BUDGET: u32 = KERNEL_LIMIT / 2;

fn record_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("verifier-budget.txt")
}

fn host_config() -> HostConfig {
    HostConfig {
        ifindex: 3,
        router_ip: [10, 0, 0, 1],
        mac: [2, 0, 0, 0, 0, 2],
        ..Default::default()
    }
}

fn parse_record(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let key = format!("{} {}", f.next()?, f.next()?);
            Some((key, f.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn every_program_loads_within_half_the_verifier_limit() {
    let node = ScratchNode::new("verifier").unwrap();
    let mut measured = BTreeMap::new();
    for object in objects::all() {
        // The host object with a configuration, as in use: its block is
        // read-only data the verifier knows, so an unconfigured program
        // would only have its "no configuration" drop path verified. The
        // lxc object reads each endpoint's configuration from a map: every
        // path is verified, once per node.
        let mut loaded = match object.name {
            "lxc" => loader::load_lxc(&node.pins).unwrap(),
            "host" => loader::load_host(&node.pins, &host_config()).unwrap(),
            "sock" => loader::load_sock(&node.pins).unwrap(),
            // No configuration: it reads only its maps.
            "xdp" | "sockops" => loader::load_with(object, &node.pins, |_| {}).unwrap(),
            other => panic!("object {other}: add its configuration to this test"),
        };
        let costs = loaded.load_all().unwrap_or_else(|e| panic!("{e}"));
        assert!(!costs.is_empty(), "object {} has no programs", object.name);
        for c in costs {
            assert!(c.processed_insns > 0, "{}/{}: no verifier count", c.object, c.program);
            assert!(
                c.processed_insns <= BUDGET,
                "{}/{}: {} processed instructions, budget {BUDGET}",
                c.object,
                c.program,
                c.processed_insns
            );
            measured.insert(format!("{} {}", c.object, c.program), c.processed_insns);
        }
    }

    let mut text = String::from(
        "# object program processed-instructions (verifier), budget 500000\n\
         # regenerate: CILIATE_BLESS=1 cargo test -p ciliate-datapath --test verifier_budget\n",
    );
    for (k, v) in &measured {
        text.push_str(&format!("{k} {v}\n"));
    }
    if std::env::var_os("CILIATE_BLESS").is_some() {
        std::fs::write(record_path(), &text).unwrap();
        return;
    }
    let recorded = parse_record(&std::fs::read_to_string(record_path()).unwrap_or_default());
    for (k, v) in &measured {
        match recorded.get(k) {
            // A program that grew by more than a fifth is a regression to
            // look at (then bless); smaller drift is only reported.
            Some(r) if u64::from(*v) * 5 > u64::from(*r) * 6 => panic!(
                "{k}: {v} processed instructions, {r} recorded: more than 20% growth \
                 (rerun with CILIATE_BLESS=1 if it is meant)"
            ),
            Some(r) if r != v => println!("verifier count drift: {k}: recorded {r}, now {v}"),
            Some(_) => {}
            None => panic!(
                "{k} ({v} insns) is not recorded in verifier-budget.txt; rerun with CILIATE_BLESS=1"
            ),
        }
    }
    for k in recorded.keys() {
        assert!(measured.contains_key(k), "verifier-budget.txt names {k}, which no object has");
    }
}
