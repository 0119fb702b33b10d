//! Connections to peer services.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::host::HostError;
use crate::retry::{Backoff, RetryParams};
use crate::trace_context::TraceInterceptor;

/// A channel to a peer that carries the caller's trace context.
pub type PeerChannel = InterceptedService<Channel, TraceInterceptor>;

/// HTTP/2 flow-control window per stream, for clients and servers.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// A lazily connecting channel to `url` that injects trace context. Calls made
/// while the peer is down fail with UNAVAILABLE and reconnect on the next call.
pub fn connect(url: &str) -> Result<PeerChannel, HostError> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| HostError::Peer {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Bulk streams (ingest, tail, disk reads) need more than HTTP/2's
        // default 64 KiB window to go at disk speed.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, TraceInterceptor))
}

/// Waits until the peer at `url` reports `service` SERVING over grpc.health.v1,
/// retrying with backoff (jittered, 100 ms doubling to 2 s). Returns early with
/// [`HostError::Cancelled`] when `shutdown` is cancelled.
pub async fn wait_serving(
    url: &str,
    service: &str,
    shutdown: &CancellationToken,
) -> Result<(), HostError> {
    let mut client = HealthClient::new(connect(url)?);
    let mut backoff = Backoff::new(RetryParams {
        max: Duration::from_secs(2),
        ..RetryParams::RECONNECT
    });
    loop {
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        match client.check(request).await {
            Ok(resp) if resp.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
            Ok(_) => tracing::info!(%url, %service, "peer not serving yet"),
            Err(status) => tracing::info!(%url, %service, %status, "peer unreachable"),
        }
        if !backoff.wait(shutdown).await {
            return Err(HostError::Cancelled(format!("{service} at {url}")));
        }
    }
}
