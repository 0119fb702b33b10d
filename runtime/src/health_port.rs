//! An optional second, plaintext port that answers grpc.health.v1 only
//! (`--health-listen`), for probes that cannot speak TLS: Kubernetes' gRPC
//! probes, load balancers. It reports the same status as the main port and
//! serves nothing else, so it gives away no data and takes no calls.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::host::{Health, HostError};

/// Binds `addr` now (an unusable address stops start-up) and serves
/// `health` there until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    health: &Health,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HostError::HealthPort { addr, source })?;
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.reporter()),
    );
    tracing::info!(%addr, "health port serving (grpc.health.v1 only, plaintext)");
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
            .await;
        if let Err(e) = served {
            tracing::error!(%addr, error = %e, "health port stopped");
        }
    });
    Ok(())
}
