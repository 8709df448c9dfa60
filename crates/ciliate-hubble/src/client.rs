//! A channel to an observer or a relay: `unix:///path` or `host:port`
//! (or an `http://` URL). On a unix socket the authority is `localhost`,
//! as grpc-go sends it.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint, Uri};

/// Connect to `addr`; with `timeout`, every call fails that gets no
/// answer (its response head) in that time.
pub async fn channel(
    addr: &str,
    timeout: Option<Duration>,
) -> Result<Channel, tonic::transport::Error> {
    let with_timeout = |e: Endpoint| {
        let e = e.connect_timeout(Duration::from_secs(2));
        match timeout {
            Some(t) => e.timeout(t),
            None => e,
        }
    };
    match addr.strip_prefix("unix://") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            with_timeout(Endpoint::from_static("http://localhost"))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
        None => {
            let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
            with_timeout(Endpoint::from_shared(url)?).connect().await
        }
    }
}
