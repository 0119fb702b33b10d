//! processor-svc: the target-region processor. For every VM whose
//! replication is enabled it tails cache-svc, applies the records to replica
//! disks kept as versioned chunks, cuts recovery points every few seconds
//! (and at app-consistent markers), thins and expires them by the policy,
//! and serves any retained point's disks.

pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod replica;
pub mod retention;
pub mod seeding;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::processor::v1::processor_server::ProcessorServer;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::service::open_storage;
use ferry_runtime::{CancellationToken, Refused, Role, Service, ServiceConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::ProcessorError;

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.processor.v1.Processor";
/// The default port.
pub const DEFAULT_PORT: u16 = 7103;

/// The `[processor]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Replica chunk size in bytes (a multiple of 512). Fixed once a VM's
    /// replica exists.
    pub chunk_bytes: u64,
    /// Replica segment files roll past this many bytes.
    pub segment_bytes: u64,
    /// Changed-chunk bytes held in memory before they are written without
    /// waiting for the next point.
    pub flush_bytes: usize,
    /// Bytes compaction moves per step (one step per point interval).
    pub compact_bytes: u64,
    /// How long CutRecoveryPoint waits for everything pending to be applied.
    pub cut_timeout_secs: u64,
    /// Blob bytes the background scrub reads and checks per step (one step
    /// per point interval); 0 turns the scrub off.
    pub scrub_bytes: u64,
    /// Bytes kept free on the data directory's filesystem for the index:
    /// replica data that would leave less is not written, and the pipeline
    /// pauses (health CRITICAL) until space returns.
    pub reserve_bytes: u64,
    /// Bytes of the replica index (sled) kept in memory; the index of
    /// small random writes grows past any fixed memory otherwise.
    pub index_cache_bytes: u64,
    /// The URL registry knows this processor by (`[registry.services]`):
    /// it applies the items placed on it. Empty: the items placed on no
    /// processor (the embedded default, one processor for every region).
    pub endpoint: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk_bytes: 64 * 1024,
            segment_bytes: 64 << 20,
            flush_bytes: 64 << 20,
            compact_bytes: 16 << 20,
            cut_timeout_secs: 120,
            scrub_bytes: 4 << 20,
            reserve_bytes: 64 << 20,
            index_cache_bytes: replica::INDEX_CACHE_BYTES,
            endpoint: String::new(),
        }
    }
}

/// Why processor-svc stopped with an error.
pub type ServeError = ferry_runtime::service::ServeError<ProcessorError>;

/// Serves processor-svc on `listener` until `shutdown`. Health turns SERVING
/// once the replicas are open and registry and cache-svc serve.
pub async fn run(
    config: ServiceConfig,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if settings.chunk_bytes == 0 || !settings.chunk_bytes.is_multiple_of(512) {
        return Err(ServeError::Service(
            Refused::invalid_argument(format!(
                "[processor] chunk_bytes {} must be a non-zero multiple of 512",
                settings.chunk_bytes
            ))
            .into(),
        ));
    }
    let needs = [Role::Registry, Role::Cache];
    let mut service = Service::start(ServiceKind::Processor, SERVICE_NAME, &config, &needs).await?;
    let dir = config.data_dir.clone();
    let (chunk, segment) = (settings.chunk_bytes, settings.segment_bytes.max(1 << 20));
    let cache = settings.index_cache_bytes.max(1 << 20);
    let replicas =
        open_storage(move || replica::Replicas::open_with(&dir, chunk, segment, cache)).await?;
    let limits = &config.limits;
    let cache_client = CacheClient::new(service.channel(Role::Cache)?)
        .max_decoding_message_size(limits.max_message_bytes);
    let registry_client = RegistryClient::new(service.channel(Role::Registry)?);
    let pipelines = pipeline::Pipelines::new(
        Arc::new(replicas),
        cache_client,
        registry_client,
        pipeline::Tuning {
            flush_bytes: settings.flush_bytes.max(chunk as usize),
            compact_bytes: settings.compact_bytes.max(chunk),
            scrub_bytes: settings.scrub_bytes,
            room: pipeline::Room(ferry_runtime::space::Room::new(
                config.data_dir.clone(),
                settings.reserve_bytes,
            )),
        },
        (!settings.endpoint.is_empty()).then(|| settings.endpoint.clone()),
        {
            let credentials = config.security.credentials(ServiceKind::Processor);
            let max = limits.max_message_bytes;
            Box::new(move |url: &str| {
                ferry_runtime::connect(url, &credentials)
                    .map(|c| CacheClient::new(c).max_decoding_message_size(max))
                    .map_err(|e| e.to_string())
            })
        },
        shutdown.clone(),
    );
    service.routes().add_service(
        ProcessorServer::new(service::ProcessorService::new(
            pipelines.clone(),
            shutdown.clone(),
            limits.max_message_bytes,
            Duration::from_secs(settings.cut_timeout_secs.max(1)),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes),
    );
    if config.metrics_listen.is_some() {
        ferry_runtime::metrics::register_collector(Box::new(metrics::PipelineMetrics::new(
            &pipelines,
        )));
    }
    // Replication follows registry once the peers serve.
    let following = pipelines.follow_registry();
    // Operator tokens are checked with registry.
    let tokens = std::sync::Arc::new(ferry_runtime::security::RemoteTokens::new(
        RegistryClient::new(service.channel(Role::Registry)?),
    ));
    service
        .serve(
            listener,
            &config,
            shutdown,
            tokens,
            std::future::ready(()),
            following,
        )
        .await?;
    Ok(())
}
