//! cache-svc: the source-region cache. Each VM's agent streams its ordered
//! writes here; every record is validated (VM, disk, range, sequence, epoch,
//! checksum), appended to the VM's durable log and fsynced before it is
//! acknowledged; the processor tails the log from any retained sequence and
//! reports what it applied, below which whole segments are deleted.

pub mod control;
pub mod error;
pub mod frame;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod model;
pub mod service;
pub mod store;
pub mod tail;

use std::sync::Arc;

use ferry_proto::cache::v1::cache_server::CacheServer;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::retry::{retry, RetryError, RetryParams};
use ferry_runtime::security::ServiceKind;
use ferry_runtime::service::open_storage;
use ferry_runtime::{CancellationToken, Role, Service, ServiceConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::CacheError;

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.cache.v1.Cache";
/// The default port.
pub const DEFAULT_PORT: u16 = 7102;

/// The `[cache]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// A segment file rolls over past this many bytes.
    pub segment_bytes: u64,
    /// Log bytes one VM may have waiting (acknowledged, not yet applied).
    pub vm_quota_bytes: u64,
    /// Log bytes all VMs together may have waiting.
    pub total_quota_bytes: u64,
    /// Bytes kept free on the data directory's filesystem for the index:
    /// a batch that would leave less is refused like one past a quota.
    pub reserve_bytes: u64,
    /// The URL registry knows this cache by (`[registry.services.<region>]
    /// cache`): it takes the streams of the items placed on it. Empty: of
    /// the items placed on no cache (the embedded default).
    pub endpoint: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            segment_bytes: 64 * 1024 * 1024,
            vm_quota_bytes: 16 << 30,
            total_quota_bytes: 128 << 30,
            reserve_bytes: 64 << 20,
            endpoint: String::new(),
        }
    }
}

/// Why cache-svc stopped with an error.
pub type ServeError = ferry_runtime::service::ServeError<CacheError>;

/// Serves cache-svc on `listener` until `shutdown` is cancelled. Health turns
/// SERVING once the logs are open and registry serves.
pub async fn run(
    config: ServiceConfig,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let mut service =
        Service::start(ServiceKind::Cache, SERVICE_NAME, &config, &[Role::Registry]).await?;
    let data_dir = config.data_dir.clone();
    let room = ingest::Room::new(config.data_dir.clone(), settings.reserve_bytes);
    let segment_bytes = settings.segment_bytes.max(4096);
    // A quota below two full messages could refuse a single batch forever.
    let floor = 2 * config.limits.max_message_bytes as u64;
    let quotas = store::Quotas {
        per_vm_bytes: settings.vm_quota_bytes.max(floor),
        total_bytes: settings.total_quota_bytes.max(floor),
    };
    let store = open_storage(move || store::Store::open(&data_dir, segment_bytes, quotas)).await?;
    let client = RegistryClient::new(service.channel(Role::Registry)?);
    let limits = &config.limits;
    let store = Arc::new(store);
    if config.metrics_listen.is_some() {
        ferry_runtime::metrics::register_collector(Box::new(metrics::LogMetrics::new(&store)));
    }
    let sessions = Arc::new(control::Sessions::default());
    tokio::spawn(report_damaged(
        client.clone(),
        store.damaged(),
        store.take_reports(),
        shutdown.clone(),
    ));
    tokio::spawn(control::watch_registry(
        client.clone(),
        sessions.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    service.routes().add_service(
        CacheServer::new(service::CacheService::new(
            store,
            sessions,
            client,
            room,
            shutdown.clone(),
            limits.max_message_bytes,
            (!settings.endpoint.is_empty()).then(|| settings.endpoint.clone()),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes),
    );
    // Nothing to prepare once registry serves, nothing to run after.
    let nothing = || std::future::ready(());
    // Operator tokens are checked with registry.
    let tokens = std::sync::Arc::new(ferry_runtime::security::RemoteTokens::new(
        RegistryClient::new(service.channel(Role::Registry)?),
    ));
    service
        .serve(listener, &config, shutdown, tokens, nothing(), nothing())
        .await?;
    Ok(())
}

/// Tells registry (component "cache", CRITICAL) of every VM whose log is
/// damaged, found at open (`damaged`) or later (`later`), retrying until
/// registry has heard each or `shutdown`.
async fn report_damaged(
    registry: RegistryClient<ferry_runtime::PeerChannel>,
    damaged: Vec<(String, String)>,
    mut later: Option<tokio::sync::mpsc::Receiver<(String, String)>>,
    shutdown: CancellationToken,
) {
    use ferry_proto::registry::v1 as reg;
    let mut queue: std::collections::VecDeque<(String, String)> = damaged.into();
    loop {
        let (vm, why) = match queue.pop_front() {
            Some(next) => next,
            None => {
                let Some(rx) = later.as_mut() else { return };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = rx.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                }
            }
        };
        let report = reg::ReportHealthRequest {
            vm_name: vm.clone(),
            component: "cache".into(),
            health: reg::ReplicationHealth::Critical as i32,
            message: format!("the cache's log of this VM is damaged: {why}"),
            ..Default::default()
        };
        // NOT_FOUND: registry no longer knows the VM; nobody to tell.
        let sent = retry(
            RetryParams::REPORT,
            &shutdown,
            "reporting a damaged log",
            |s: &tonic::Status| s.code() == tonic::Code::NotFound,
            || {
                let mut registry = registry.clone();
                let report = report.clone();
                async move { registry.report_health(report).await }
            },
        )
        .await;
        if let Err(RetryError::Cancelled) = sent {
            return;
        }
    }
}
