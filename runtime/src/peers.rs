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
use crate::security::ClientTls;
use crate::trace_context::TraceInterceptor;

/// A channel to a peer that carries the caller's trace context and
/// credentials.
pub type PeerChannel = InterceptedService<Channel, PeerInterceptor>;

/// What a client presents to the servers it calls.
#[derive(Clone, Default)]
pub struct Credentials {
    /// TLS: the CA to trust and, if it has one, our certificate. `None`:
    /// plaintext (http:// URLs).
    pub tls: Option<ClientTls>,
    /// A bearer token sent with every call (operator, service or agent
    /// token). Never logged.
    pub bearer: Option<String>,
}

/// Never the token itself.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("bearer", &self.bearer.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Credentials {
    /// Plaintext, no credentials (a service embedded in-process with
    /// nothing checked, or health probes).
    pub fn none() -> Credentials {
        Credentials::default()
    }
}

/// Adds trace context and the bearer token to each call.
#[derive(Clone)]
pub struct PeerInterceptor {
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for PeerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerInterceptor")
            .field("bearer", &self.bearer.as_ref().map(|_| ".."))
            .finish()
    }
}

impl tonic::service::Interceptor for PeerInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = TraceInterceptor.call(request)?;
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// HTTP/2 flow-control window per stream, for clients and servers.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// A lazily connecting channel to `url` that injects trace context and
/// `credentials`. Calls made while the peer is down fail with UNAVAILABLE
/// and reconnect on the next call. An https:// URL needs TLS credentials
/// and an http:// one plaintext, so a caller never sends a token in the
/// clear by mistake.
pub fn connect(url: &str, credentials: &Credentials) -> Result<PeerChannel, HostError> {
    let peer_error = |message: String| HostError::Peer {
        url: url.to_string(),
        message,
    };
    let mut endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|e| peer_error(e.to_string()))?;
    match (&credentials.tls, endpoint.uri().scheme_str()) {
        (Some(tls), Some("https")) => {
            endpoint = endpoint
                .tls_config(tls.config())
                .map_err(|e| peer_error(format!("TLS: {e}")))?;
        }
        (None, Some("http")) => {}
        (Some(_), _) => {
            return Err(peer_error(
                "TLS is configured: use an https:// URL for this peer".into(),
            ))
        }
        (None, _) => {
            return Err(peer_error(
                "an https:// URL needs TLS: give --tls-ca (and a certificate or token)".into(),
            ))
        }
    }
    let bearer = match &credentials.bearer {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| peer_error("the token holds characters a header cannot".into()))?,
        ),
        None => None,
    };
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
    Ok(InterceptedService::new(channel, PeerInterceptor { bearer }))
}

/// Waits until the peer at `url` reports `service` SERVING over grpc.health.v1,
/// retrying with backoff (jittered, 100 ms doubling to 2 s). Returns early with
/// [`HostError::Cancelled`] when `shutdown` is cancelled.
pub async fn wait_serving(
    url: &str,
    service: &str,
    credentials: &Credentials,
    shutdown: &CancellationToken,
) -> Result<(), HostError> {
    let mut client = HealthClient::new(connect(url, credentials)?);
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

/// Whether a service that names itself `me` (its `endpoint` setting;
/// None: it names none) serves what registry placed on `placed` (empty: on
/// no particular one): the same URL, a trailing '/' aside, or both none.
pub fn serves(me: Option<&str>, placed: &str) -> bool {
    let placed = placed.trim_end_matches('/');
    match me {
        Some(me) => !placed.is_empty() && me.trim_end_matches('/') == placed,
        None => placed.is_empty(),
    }
}

#[cfg(test)]
mod placement_tests {
    use super::serves;

    #[test]
    fn a_service_serves_what_is_placed_on_it_and_nothing_else() {
        assert!(serves(None, ""));
        assert!(!serves(None, "http://p1:7103"));
        assert!(serves(Some("http://p1:7103"), "http://p1:7103/"));
        assert!(serves(Some("http://p1:7103/"), "http://p1:7103"));
        assert!(!serves(Some("http://p1:7103"), "http://p2:7103"));
        assert!(!serves(Some("http://p1:7103"), ""));
    }
}
