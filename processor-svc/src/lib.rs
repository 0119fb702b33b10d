//! processor-svc: the target-region processor: replica disks and recovery points (issue 4 fills it).
//!
//! Until its issue lands it serves health and reflection only: it opens its
//! data directory, waits for its peers, then reports SERVING.

use ferry_runtime::{CancellationToken, HostError, Peer, ServiceConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.processor.v1.Processor";
/// The default port.
pub const DEFAULT_PORT: u16 = 7103;

/// The `[processor]` table of the config file (no settings yet).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {}

/// The binary's entry: serves with the config file's `Settings`.
pub async fn run(
    config: ServiceConfig,
    _settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    serve(config, listener, shutdown).await
}

/// Serves processor-svc on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: ServiceConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let peers = vec![
        Peer::required(
            "registry",
            config.registry.as_ref(),
            "ferry.registry.v1.Registry",
        )?,
        Peer::required("cache", config.cache.as_ref(), "ferry.cache.v1.Cache")?,
    ];
    ferry_runtime::placeholder::serve(&config, SERVICE_NAME, peers, listener, shutdown).await
}
