//! A service whose API has not landed yet: it hosts health and reflection
//! (reflection already lists its API from `proto/`; calls to it answer
//! UNIMPLEMENTED), opens its data directory and waits for its peers.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ServiceConfig;
use crate::host::{Host, HostError};
use crate::readiness::{prepare_data_dir, wait_for_peers, Peer};

/// Serves a placeholder for `service_name` until `shutdown`.
pub async fn serve(
    config: &ServiceConfig,
    service_name: &'static str,
    peers: Vec<Peer>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let host = Host::new(&[service_name]).await?;
    prepare_data_dir(&config.data_dir).map_err(|source| HostError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let health = host.health();
    let ready = shutdown.clone();
    tokio::spawn(async move {
        // Health stays NOT_SERVING until every peer serves.
        if wait_for_peers(&peers, &ready).await.is_ok() && !ready.is_cancelled() {
            health.serving().await;
            tracing::info!(service = service_name, "serving");
        }
    });
    host.serve(listener, &config.limits, shutdown).await
}
