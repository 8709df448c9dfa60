//! `ciliate-relay`: the cluster's flows through one observer API (Hubble
//! Relay's role, on its port 4245). See `ciliate_agent::relay`.

use std::time::Duration;

use anyhow::Context as _;
use ciliate_agent::relay::{Peers, Relay};
use ciliate_hubble::observer::observer_server::ObserverServer;
use clap::Parser;

/// Ciliate's relay: every node's flows through one Hubble observer API
#[derive(Parser)]
#[command(name = "ciliate-relay", version)]
struct Args {
    /// A node's observer whose peer service lists the cluster's observers:
    /// unix:///path or host:port
    #[arg(long)]
    peer_service: Option<String>,
    /// Find the observers in the cluster's store instead: "local" (a file) or "etcd"
    #[arg(long)]
    kvstore: Option<String>,
    /// The local store's file (with --kvstore local)
    #[arg(long)]
    kvstore_path: Option<std::path::PathBuf>,
    /// etcd endpoints, host:port,... (with --kvstore etcd)
    #[arg(long)]
    etcd_endpoints: Option<String>,
    /// etcd configuration file, as Cilium's (with --kvstore etcd)
    #[arg(long)]
    etcd_config: Option<std::path::PathBuf>,
    /// The observers' port on the nodes the store names
    #[arg(long, default_value_t = ciliate_agent::hubble::DEFAULT_PORT)]
    peer_port: u16,
    /// Observers to use besides (or instead of) those: name=address,...
    #[arg(long, value_delimiter = ',')]
    static_peers: Vec<String>,
    /// TCP address to serve on, [host]:port, or "" for none
    #[arg(long, default_value = ":4245")]
    listen_address: String,
    /// A unix socket to serve on as well
    #[arg(long)]
    listen_socket: Option<std::path::PathBuf>,
    /// Seconds between attempts to reach a node that is down
    #[arg(long, default_value_t = 2)]
    retry_interval: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let a = Args::parse();
    if a.peer_service.is_none() && a.static_peers.is_empty() && a.kvstore.is_none() {
        anyhow::bail!("no observers to relay: give --peer-service, --kvstore or --static-peers");
    }
    let listen = ciliate_agent::metrics::parse_addr(&a.listen_address)
        .map_err(|e| anyhow::anyhow!("--listen-address: {e}"))?;
    if listen.is_none() && a.listen_socket.is_none() {
        anyhow::bail!("nothing to serve on: give --listen-address or --listen-socket");
    }
    let peers = Peers::new();
    for p in &a.static_peers {
        let (name, addr) =
            p.split_once('=').with_context(|| format!("static peer {p:?}: name=address"))?;
        peers.add(name, addr);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if let Some(ps) = a.peer_service.clone() {
            tokio::spawn(peers.clone().follow_peer_service(ps));
        }
        if let Some(kind) = a.kvstore.as_deref() {
            let kv = ciliate_agent::config::KvConfig::from_options(
                kind,
                a.kvstore_path.clone(),
                a.etcd_endpoints.clone(),
                a.etcd_config.clone(),
            )?
            .open()
            .await?;
            tokio::spawn(peers.clone().follow_kvstore(kv, a.peer_port));
        }
        tokio::spawn(peers.clone().keep_connected(Duration::from_secs(a.retry_interval.max(1))));
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        let router =
            tonic::transport::Server::builder().add_service(ObserverServer::new(Relay { peers }));
        let router = ciliate_agent::hubble::common_services(router).await?;
        tracing::info!(listen = ?listen, socket = ?a.listen_socket, "relaying flows");
        ciliate_agent::hubble::serve_on(router, a.listen_socket, listen, stop).await
    })
}
