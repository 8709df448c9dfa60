//! `ciliate-policy-bench [--rules N] [--identities N] [--endpoints N]`:
//! time and memory to resolve N rules over N identities for N endpoints
//! (the agent's policy computation, no kernel). Prints the time, the
//! resolved map entries, and the process's peak RSS.

use std::{collections::BTreeMap, time::Instant};

use ciliate_agent::policy::{IdView, Rule, parse, resolve};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let (n_rules, n_ids, n_eps) =
        (arg("--rules", 1000), arg("--identities", 10000), arg("--endpoints", 100));
    // Identities: app=a<i % 1000>, tier=t<i % 7>, namespace ns<i % 10>.
    let ids: BTreeMap<u32, Vec<String>> = (0..n_ids)
        .map(|i| {
            let mut l = vec![
                format!("k8s:app=a{}", i % 1000),
                format!("k8s:tier=t{}", i % 7),
                format!("k8s:io.kubernetes.pod.namespace=ns{}", i % 10),
            ];
            l.sort();
            (256 + i as u32, l)
        })
        .collect();
    // Rules: rule k selects app=a<k> and allows tier t<k % 7> of its
    // namespace on a port and a range.
    let mut text = String::new();
    for k in 0..n_rules {
        text.push_str(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: r{k}, namespace: ns{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: t{}}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}, {{port: \"8000\", endPort: 8100, protocol: TCP}}]}}]\n---\n",
            k % 10,
            k % 1000,
            k % 7
        ));
    }
    let t = Instant::now();
    let rules: Vec<Rule> = parse(&text).expect("generated policy parses");
    let parse_ms = t.elapsed().as_secs_f64() * 1000.0;
    let view = IdView::new(ids.clone());
    let t = Instant::now();
    let mut entries = 0;
    for (n, labels) in ids.values().take(n_eps).enumerate() {
        let r = resolve(&rules, n as u16 + 1, labels, &view);
        entries += r.rules.len();
    }
    let resolve_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{n_rules} rules, {n_ids} identities, {n_eps} endpoints: parse {parse_ms:.0} ms, resolve {resolve_ms:.0} ms \
         ({:.1} ms per endpoint), {entries} map entries, peak RSS {:.1} MiB",
        resolve_ms / n_eps.max(1) as f64,
        peak_rss_mib()
    );
}
