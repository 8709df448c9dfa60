//! What the benchmarks share: servers in a namespace, and the median
//! request/response rate, connection rate and throughput of a client,
//! pinned with its server to core 0 (a 2-vCPU VM: cross-CPU wake-ups would
//! hide the datapath's cost).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::{Netns, node::Binaries};

/// The port of the benchmarks' echo server.
pub const PORT: &str = "9000";

/// The value after option `name` on a benchmark's command line: a positive
/// number, at most `max`.
pub fn positive<'a>(
    args: &mut impl Iterator<Item = &'a String>,
    name: &str,
    max: u64,
) -> Result<u64, String> {
    args.next()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .map(|v: u64| v.min(max))
        .ok_or_else(|| format!("{name} takes a positive number"))
}

/// The p-th percentile (0..1) of `v` (sorted here; `v` is not empty).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// The resident memory of process `pid` in MiB (0 when it is gone).
pub fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The machine's busy CPU time so far, every CPU summed, in seconds
/// (`/proc/stat`: user, nice, system, irq, softirq, steal): the cost of a
/// run whose work spreads over both cores (softirqs land where their
/// queue was scheduled, not where the sender runs).
pub fn busy_cpu_seconds() -> Result<f64, String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line =
        stat.lines().next().filter(|l| l.starts_with("cpu ")).ok_or("/proc/stat: no cpu line")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    if f.len() < 8 {
        return Err(format!("/proc/stat: {line:?}"));
    }
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(busy as f64 / hz as f64)
}

fn per_second(out: &str) -> f64 {
    out.trim().trim_end_matches("/s").parse().unwrap_or(0.0)
}

/// Median over `runs` of 1-byte request/response per second, connections
/// per second and iperf3 Gbit/s from `client` to `server_ip`, each run
/// `seconds` long.
pub fn measure(
    client: &Netns,
    server_ip: &str,
    bins: &Binaries,
    runs: usize,
    seconds: u64,
) -> Result<[f64; 3], String> {
    let [rr, crr, tput] = measure_all(&[(client, server_ip)], bins, runs, seconds)?.remove(0);
    Ok([median(rr), median(crr), median(tput)])
}

/// Every run of one variant: request/response per second, connections per
/// second, Gbit/s.
pub type Runs = [Vec<f64>; 3];

/// The runs of several variants (client, server address), interleaved
/// (run 1 of each, then run 2 of each, ...) so that a machine that slows
/// down or speeds up meanwhile weighs on all of them alike.
pub fn measure_all(
    variants: &[(&Netns, &str)],
    bins: &Binaries,
    runs: usize,
    seconds: u64,
) -> Result<Vec<Runs>, String> {
    let v: Vec<_> = variants.iter().map(|(c, s)| (*c, *s, None)).collect();
    measure_all_in(&v, bins, runs, seconds)
}

/// `args` run in `ns`, inside cgroup `cgroup` when one is given (a lab
/// node's: where its socket programs see the process): stdout.
fn exec_in(ns: &Netns, cgroup: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = ns.command(args[0]);
    cmd.args(&args[1..]).stdin(std::process::Stdio::null());
    if let Some(c) = cgroup {
        crate::node::in_cgroup(&mut cmd, c);
    }
    crate::netns::run(&mut cmd).map_err(|e| e.to_string())
}

/// [`measure_all`] with clients (and their servers, see [`servers_in`])
/// in a cgroup where one is given.
pub fn measure_all_in(
    variants: &[(&Netns, &str, Option<&Path>)],
    bins: &Binaries,
    runs: usize,
    seconds: u64,
) -> Result<Vec<Runs>, String> {
    let echo = bins.echo.to_string_lossy();
    let secs = seconds.to_string();
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new()]; variants.len()];
    for _ in 0..runs {
        for ((client, server_ip, cgroup), [rr, crr, tput]) in variants.iter().zip(&mut samples) {
            let target = format!("{server_ip}:{PORT}");
            for (mode, out) in [("rr", &mut *rr), ("crr", &mut *crr)] {
                let o =
                    exec_in(client, *cgroup, &["taskset", "-c", "0", &echo, mode, &target, &secs])?;
                out.push(per_second(&o));
            }
            let o = exec_in(client, *cgroup, &["iperf3", "-c", server_ip, "-t", &secs, "-J"])?;
            let j: serde_json::Value =
                serde_json::from_str(&o).map_err(|e| format!("iperf3 output: {e}"))?;
            tput.push(j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9);
        }
    }
    Ok(samples)
}

/// Start the servers of a variant in `ns`: the echo server pinned to core
/// 0 and an iperf3 server. They die with the namespace.
pub fn servers(ns: &Netns, bins: &Binaries) -> Result<(), String> {
    servers_in(ns, bins, None)
}

/// [`servers`] inside cgroup `cgroup` when one is given.
pub fn servers_in(ns: &Netns, bins: &Binaries, cgroup: Option<&Path>) -> Result<(), String> {
    let echo = bins.echo.to_string_lossy();
    for args in [&["taskset", "-c", "0", &echo, "serve", PORT][..], &["iperf3", "-s"]] {
        let mut cmd = ns.command(args[0]);
        cmd.args(&args[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(c) = cgroup {
            crate::node::in_cgroup(&mut cmd, c);
        }
        // It dies with the namespace.
        drop(cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ns
        .exec(&["ss", "-Hltn", "sport", "=", &format!(":{PORT}")])
        .map_err(|e| e.to_string())?
        .is_empty()
        || ns.exec(&["ss", "-Hltn", "sport", "=", ":5201"]).map_err(|e| e.to_string())?.is_empty()
    {
        if Instant::now() > deadline {
            return Err(format!("servers in {} did not start", ns.name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Print interleaved runs (see [`measure_all`]): each variant's median,
/// and as its ratio the median of its runs' ratios to the anchor's (the
/// first row's) run of the same round. A VM whose speed wanders between
/// rounds moves a variant and its anchor together; a ratio of medians
/// taken from different rounds would not cancel that.
pub fn print_paired(rows: &[(String, Runs)]) {
    let Some((_, anchor)) = rows.first() else { return };
    println!(
        "{:<34} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7}",
        "VARIANT", "RR/s", "ratio", "CONN/s", "ratio", "Gbit/s", "ratio"
    );
    for (name, runs) in rows {
        let [rr, crr, tput] = runs;
        let [r0, r1, r2] = paired_ratios(runs, anchor);
        println!(
            "{:<34} {:>12.0} {:>7.3} {:>12.0} {:>7.3} {:>12.2} {:>7.3}",
            name,
            median(rr.clone()),
            r0,
            median(crr.clone()),
            r1,
            median(tput.clone()),
            r2
        );
    }
}

/// The median of each round's ratio of `runs` to `base` (RR,
/// connections, throughput): see [`print_paired`].
pub fn paired_ratios(runs: &Runs, base: &Runs) -> [f64; 3] {
    let ratio = |v: &[f64], a: &[f64]| {
        median(v.iter().zip(a).map(|(v, a)| if *a > 0.0 { v / a } else { 0.0 }).collect())
    };
    [ratio(&runs[0], &base[0]), ratio(&runs[1], &base[1]), ratio(&runs[2], &base[2])]
}

/// Print the rows with their ratios to the first one (the anchor).
pub fn print_table(rows: &[(String, [f64; 3])]) {
    let Some((_, anchor)) = rows.first() else { return };
    println!(
        "{:<26} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7}",
        "VARIANT", "RR/s", "ratio", "CONN/s", "ratio", "Gbit/s", "ratio"
    );
    for (name, [rr, crr, tput]) in rows {
        println!(
            "{:<26} {:>12.0} {:>7.3} {:>12.0} {:>7.3} {:>12.2} {:>7.3}",
            name,
            rr,
            rr / anchor[0],
            crr,
            crr / anchor[1],
            tput,
            tput / anchor[2]
        );
    }
}
