//! `ciliate-apiserver`: the test Kubernetes API server (see the crate's
//! documentation) on a TCP address, with a kubeconfig for its clients.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use ciliate_apiserver::{
    kubeconfig,
    server::{Options, open_state, serve},
};
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "A Kubernetes API server for tests and the lab (objects in memory, list/watch/write as the real one)"
)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Past versions kept listable and watchable (older ones answer 410).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between BOOKMARK events on watches that ask for them.
    #[arg(long, default_value_t = 5)]
    bookmark_interval: u64,
    /// Keep the objects in this file (written after every change; a restarted server starts
    /// from it at its resourceVersion, older versions answering 410) [default: memory only]
    #[arg(long)]
    state: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(p) = &args.kubeconfig {
        std::fs::write(p, kubeconfig(&format!("http://{addr}")))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("listening on http://{addr}");
    let state = open_state(Options {
        history: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval),
        state: args.state.clone(),
    })
    .map_err(|e| anyhow::anyhow!("the state file {e}"))?;
    tokio::select! {
        r = serve(listener, state) => r.context("serving")?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
