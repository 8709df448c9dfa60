//! `ciliate-operator`: leader-elected cluster-pool IPAM and cluster-wide
//! garbage collection of CiliumIdentities, CiliumEndpoints and CiliumNodes
//! (see `ciliate_agent::operator`).

use std::{path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ciliate-operator",
    version,
    about = "Ciliate's operator: leader-elected cluster-pool IPAM (pod CIDRs in CiliumNodes) and garbage collection of CiliumIdentities, CiliumEndpoints and CiliumNodes"
)]
struct Args {
    /// A kubeconfig for the Kubernetes API [default: the in-cluster configuration]
    #[arg(long, alias = "k8s-kubeconfig", env = "CILIATE_K8S_KUBECONFIG_PATH")]
    k8s_kubeconfig_path: Option<PathBuf>,
    /// This operator's name in the leader election Lease [default: hostname-pid]
    #[arg(long)]
    id: Option<String>,
    /// How long a leader's Lease lasts without renewal (Cilium's duration syntax: 15s)
    #[arg(long, default_value = "15s")]
    leader_election_lease_duration: String,
    /// How often the Lease is renewed or tried
    #[arg(long, default_value = "2s")]
    leader_election_retry_period: String,
    /// How often garbage is collected
    #[arg(long, default_value = "15m")]
    identity_gc_interval: String,
    /// How long an identity stays unused before it is deleted
    #[arg(long, default_value = "30m")]
    identity_heartbeat_timeout: String,
    /// Cluster-pool IPAM: the pool each CiliumNode without a pod CIDR gets one from (as the
    /// agents' --cluster-pool) [default: no IPAM]
    #[arg(long)]
    cluster_pool_ipv4_cidr: Option<String>,
    /// Prefix length of each node's pod CIDR
    #[arg(long, default_value_t = 24)]
    cluster_pool_ipv4_mask_size: u8,
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text).map_err(|e| anyhow::anyhow!("--{flag} {text:?}: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let a = Args::parse();
    let src = match a.k8s_kubeconfig_path {
        Some(p) => ciliate_agent::k8s::K8sSource::Kubeconfig(p),
        None => ciliate_agent::k8s::K8sSource::InCluster,
    };
    let cluster_pool = match &a.cluster_pool_ipv4_cidr {
        Some(p) => {
            let pool: ciliate_agent::ipam::Cidr =
                p.parse().map_err(|e| anyhow::anyhow!("--cluster-pool-ipv4-cidr {p:?}: {e}"))?;
            let mask = a.cluster_pool_ipv4_mask_size;
            if mask < pool.len || mask > 30 {
                anyhow::bail!("--cluster-pool-ipv4-mask-size {mask} does not fit in {pool}");
            }
            Some((pool, mask))
        }
        None => None,
    };
    let client = ciliate_agent::k8s::client(&src).await?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cfg = ciliate_agent::operator::OperatorConfig {
        id: a.id.unwrap_or_else(|| format!("{}-{}", host.trim(), std::process::id())),
        lease_duration: duration(
            "leader-election-lease-duration",
            &a.leader_election_lease_duration,
        )?,
        renew_interval: duration("leader-election-retry-period", &a.leader_election_retry_period)?,
        gc_interval: duration("identity-gc-interval", &a.identity_gc_interval)?,
        identity_grace: duration("identity-heartbeat-timeout", &a.identity_heartbeat_timeout)?,
        cluster_pool,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    ciliate_agent::operator::run(client, cfg, rx).await;
    Ok(())
}
