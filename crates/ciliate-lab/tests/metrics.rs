//! The agent's Prometheus endpoint on a live lab: a scrape (curl inside the
//! node's namespace, where the agent serves `:9962`) passes `promtool check
//! metrics` (Debian's prometheus package) and carries Cilium's metrics with
//! what really happened: a drop the policy made, forwarded traffic, the
//! endpoints, the policy change, map pressure (each endpoint's share of the
//! policy map too) and operations, kvstore
//! timings, the process. Needs root; CI runs as root.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use ciliate_api::{client::method, models::PolicyImport};
use ciliate_lab::{
    names::token,
    node::{self, Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};

fn scrape(lab: &NodeLab) -> String {
    lab.node
        .exec(&["curl", "-sf", "--max-time", "10", "http://127.0.0.1:9962/metrics"])
        .expect("scraping the agent")
}

/// The value of the sample `name{labels}` (labels as rendered, in order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_live_scrape_passes_promtool_and_counts_what_happened() {
    let bins = Binaries::beside_current_exe().unwrap();
    let mut config = NodeLabConfig::new(&format!("clt{}", token()), 2, bins);
    // A conntrack sweep every second: its figures and the pressure of the
    // conntrack and NAT tables are in the scrape.
    config.agent_args = vec!["--ct-gc-interval".into(), "1".into()];
    let lab = NodeLab::up(config).unwrap();
    for p in &lab.pods {
        node::wait_listening(&p.ns, ECHO_PORT).unwrap();
    }
    let (p1, p2) = (&lab.pods[0], &lab.pods[1]);
    // pod2 takes only TCP 7 from pod1: a ping is dropped at its ingress.
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: m, namespace: default}\n\
                  spec:\n  endpointSelector: {matchLabels: {app: pod2}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: pod1}}]\n\
                  \x20   toPorts: [{ports: [{port: \"7\", protocol: TCP}]}]\n";
    let _: serde_json::Value = lab
        .client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: policy.into() }))
        .unwrap();
    let denied = p1.ns.exec(&["ping", "-c", "2", "-W", "1", &p2.state.ip.to_string()]);
    assert!(denied.is_err(), "ping (policy: denied) got through");
    let bin = lab.config.bins.echo.to_string_lossy().into_owned();
    let to = format!("{}:{ECHO_PORT}", p2.state.ip);
    assert_eq!(
        p1.ns.exec(&[&bin, "tcp", &to, "hi"]).unwrap().trim(),
        "hi",
        "TCP 7 (policy: allowed)"
    );
    // To the host: out of the pod to the stack (egress).
    p1.ns
        .exec(&["ping", "-c", "1", "-W", "2", &lab.router_ip().to_string()])
        .expect("ping the gateway (allowed)");

    std::thread::sleep(std::time::Duration::from_millis(1500)); // a conntrack sweep ran
    let text = scrape(&lab);
    // The real Prometheus tool accepts it.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt package prometheus; scripts/bootstrap installs it)");
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let at_least = |series: &str, min: f64| {
        let v = sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(v >= min, "{series} = {v}, expected at least {min}");
    };
    at_least(r#"cilium_drop_count_total{direction="INGRESS",reason="Policy denied"}"#, 2.0);
    at_least(r#"cilium_drop_bytes_total{direction="INGRESS",reason="Policy denied"}"#, 2.0 * 98.0);
    at_least(r#"cilium_forward_count_total{direction="INGRESS"}"#, 1.0);
    at_least(r#"cilium_forward_count_total{direction="EGRESS"}"#, 1.0);
    assert_eq!(sample(&text, "cilium_endpoint"), Some(4.0), "host, health, two pods");
    assert_eq!(sample(&text, r#"cilium_endpoint_state{endpoint_state="ready"}"#), Some(4.0));
    assert_eq!(sample(&text, "cilium_policy"), Some(1.0));
    assert_eq!(sample(&text, r#"cilium_policy_change_total{outcome="success"}"#), Some(1.0));
    assert_eq!(
        sample(&text, r#"cilium_policy_endpoint_enforcement_status{enforcement="enabled"}"#),
        Some(1.0)
    );
    at_least(r#"cilium_identity{type="cluster_local"}"#, 2.0);
    at_least(r#"cilium_bpf_map_pressure{map_name="ciliate_lxc"}"#, 4.0 / 65536.0);
    // The TCP connection above is still tracked (closing); NAT holds none.
    at_least(r#"cilium_bpf_map_pressure{map_name="ciliate_ct4_global"}"#, 1.0 / 524288.0);
    assert_eq!(
        sample(&text, r#"cilium_bpf_map_pressure{map_name="ciliate_snat_v4_external"}"#),
        Some(0.0)
    );
    // Every map with entries has its pressure (conntrack and NAT from
    // their sweep, the others counted at the scrape).
    for map in [
        "ciliate_lxc",
        "ciliate_ep_config",
        "ciliate_ipcache",
        "ciliate_policy",
        "ciliate_ct4_global",
        "ciliate_ct_any4_global",
        "ciliate_snat_v4_external",
        "ciliate_lb4_services",
        "ciliate_lb4_backends",
        "ciliate_lb4_reverse_nat",
        "ciliate_lb4_affinity",
        "ciliate_lb4_maglev",
        "ciliate_lb4_source_range",
        "ciliate_lb4_reverse_sk",
        "ciliate_ipv4_frag_datagrams",
        "ciliate_ipmasq_v4",
        "ciliate_metrics",
    ] {
        let series = format!("cilium_bpf_map_pressure{{map_name=\"{map}\"}}");
        let v = sample(&text, &series).unwrap_or_else(|| panic!("no {series}"));
        assert!((0.0..=1.0).contains(&v), "{series} = {v}");
    }
    // Each endpoint's share of the policy map, as Cilium's per-endpoint
    // maps: pod2 holds what the map says it holds, of 16,384.
    let held = ciliate_datapath::maps::PolicyMap::from_pin_dir(&lab.pins_dir)
        .unwrap()
        .entries_by_endpoint()
        .unwrap();
    let n = held[&p2.state.endpoint_id].len();
    assert!(n >= 2, "pod2's policy: a marker and a rule at least, got {n}");
    let series = format!(
        "cilium_bpf_map_pressure{{map_name=\"ciliate_policy_{:05}\"}}",
        p2.state.endpoint_id
    );
    assert_eq!(sample(&text, &series), Some(n as f64 / 16384.0), "{series}");
    at_least(
        r#"cilium_bpf_map_ops_total{map_name="ciliate_policy",operation="update",outcome="success"}"#,
        1.0,
    );
    at_least(
        r#"cilium_endpoint_regeneration_time_stats_seconds_count{scope="total",status="success"}"#,
        3.0,
    );
    assert!(text.contains("cilium_kvstore_operations_duration_seconds_bucket{"), "kvstore timings");
    assert_eq!(sample(&text, "cilium_unreachable_nodes"), Some(0.0));
    // Hubble's flow metrics (the lab enables every group): the same drop,
    // flows by type, the echo connection's SYN and port, the verdicts.
    at_least(r#"hubble_drop_total{reason="POLICY_DENIED",protocol="ICMPv4"}"#, 2.0);
    at_least(r#"hubble_flows_processed_total{type="Drop",subtype="",verdict="DROPPED"}"#, 2.0);
    at_least(r#"hubble_tcp_flags_total{flag="SYN",family="IPv4"}"#, 1.0);
    at_least(r#"hubble_port_distribution_total{protocol="TCP",port="7"}"#, 1.0);
    at_least(
        r#"hubble_policy_verdicts_total{direction="ingress",match="l3-l4",action="forwarded"}"#,
        1.0,
    );
    at_least("process_resident_memory_bytes", 1e6);
    at_least("process_open_fds", 3.0);

    // A refused policy is counted as a failed change, and changes nothing.
    let bad = lab.client().call::<serde_json::Value>(
        method::PUT,
        "/v1/policy",
        Some(&PolicyImport { text: "kind: Nonsense\n".into() }),
    );
    assert!(bad.is_err());
    let text = scrape(&lab);
    assert_eq!(sample(&text, r#"cilium_policy_change_total{outcome="fail"}"#), Some(1.0));
    assert_eq!(sample(&text, "cilium_policy"), Some(1.0));

    // An idle agent sleeps: its own CPU counter barely moves over two
    // seconds (a watcher woken by its own reads spun at 150% here).
    let cpu = |t: &str| sample(t, "process_cpu_seconds_total").expect("process_cpu_seconds_total");
    let before = cpu(&text);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu(&scrape(&lab)) - before;
    assert!(used < 0.5, "the idle agent used {used:.2} s of CPU in 2 s");
}
