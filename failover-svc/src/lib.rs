//! failover-svc: brings protected VMs up in their target region from any
//! retained recovery point. Test failover (into an isolated network, while
//! replication goes on) and its cleanup, unplanned failover (the source
//! fenced; a change of point before commit), and commit run as persisted,
//! resumable, idempotent jobs with a progress stream. The target regions'
//! networks and VMs are kept by an inventory backend.

pub mod differ;
pub mod engine;
pub mod error;
pub mod group;
pub mod inventory;
pub mod jobs;
pub mod libvirt;
pub mod metrics;
pub mod overlay;
pub mod plan_run;
pub mod plans;
pub mod point_exports;
pub mod reprotect;
pub mod requests;
pub mod service;
pub mod verify;

use std::sync::Arc;

use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::failover::v1::failover_server::FailoverServer;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::service::open_storage;
use ferry_runtime::{CancellationToken, Role, Service, ServiceConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::FailoverError;

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.failover.v1.Failover";
/// The default port.
pub const DEFAULT_PORT: u16 = 7104;

/// The `[failover]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Caps how fast disks are written while materializing, in MiB/s, so a
    /// failover does not starve the target storage; 0 for no cap.
    pub materialize_mib_per_sec: u64,
    /// Target regions whose VMs run on libvirt hosts; absent: every region
    /// is in the local inventory alone.
    pub libvirt: Option<libvirt::Settings>,
    /// Where recovery plans' script actions are (an action names a file
    /// here); empty: `<data dir>/plan-scripts`.
    pub plan_scripts_dir: Option<std::path::PathBuf>,
}

/// Serves recovery points over NBD for instant failover, on the caller's
/// listener or `nbd_listen`; None when neither is set.
async fn serve_points(
    settings: &libvirt::Settings,
    peers: &Arc<dyn engine::peers::Peers>,
    shutdown: &CancellationToken,
) -> Result<Option<point_exports::InstantFailover>, FailoverError> {
    let bind_error = |what: &str, e: std::io::Error| {
        FailoverError::from(ferry_runtime::Refused::failed_precondition(format!(
            "[failover.libvirt] nbd_listen {what}: {e}"
        )))
    };
    let listener = match &settings.nbd_listener {
        Some(l) => {
            let l = l.try_clone().map_err(|e| bind_error("(given)", e))?;
            l.set_nonblocking(true)
                .map_err(|e| bind_error("(given)", e))?;
            TcpListener::from_std(l).map_err(|e| bind_error("(given)", e))?
        }
        None if settings.nbd_listen.is_empty() => return Ok(None),
        None => TcpListener::bind(&settings.nbd_listen)
            .await
            .map_err(|e| bind_error(&settings.nbd_listen, e))?,
    };
    let address = listener
        .local_addr()
        .map_err(|e| bind_error(&settings.nbd_listen, e))?;
    let exports = Arc::new(point_exports::PointExports::new(
        peers.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(ferry_runtime::nbd::serve(
        listener,
        exports.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%address, "serving recovery points over NBD for instant failover");
    Ok(Some(point_exports::InstantFailover {
        exports,
        address,
        qemu_img: overlay::QemuImg::new(settings.qemu_img.clone()),
        hydrate_mib_per_sec: settings.hydrate_mib_per_sec,
    }))
}

/// Why failover-svc stopped with an error.
pub type ServeError = ferry_runtime::service::ServeError<FailoverError>;

/// Serves failover-svc on `listener` until `shutdown`. Health turns SERVING
/// once its records are open, unfinished jobs are resumed and registry and
/// processor-svc serve.
pub async fn run(
    config: ServiceConfig,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let needs = [Role::Registry, Role::Processor];
    let mut service = Service::start(ServiceKind::Failover, SERVICE_NAME, &config, &needs).await?;
    let dir = config.data_dir.clone();
    let libvirt = settings.libvirt.clone();
    let scripts = settings
        .plan_scripts_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("plan-scripts"));
    let (backend, jobs, plans) = open_storage(move || {
        let db = sled::Config::new().path(dir.join("index")).open()?;
        let local = inventory::LocalBackend::new(&db, &dir.join("regions"))?;
        let backend: Arc<dyn inventory::Backend> = match libvirt {
            Some(l) => Arc::new(libvirt::LibvirtBackend::new(
                local,
                l,
                &dir.join("consoles"),
            )?),
            None => Arc::new(local),
        };
        let jobs = jobs::Jobs::open(&db)?;
        let plans = plans::Plans::open(&db, &scripts)?;
        Ok::<_, FailoverError>((backend, jobs, plans))
    })
    .await?;
    let start_timeout = std::time::Duration::from_secs(
        settings
            .libvirt
            .as_ref()
            .map_or(300, |l| l.start_timeout_secs.max(1)),
    );
    let jobs = Arc::new(jobs);
    if config.metrics_listen.is_some() {
        ferry_runtime::metrics::register_collector(Box::new(metrics::JobMetrics::new(&jobs)));
    }
    let limits = &config.limits;
    // The source region's cache is optional: only planned failovers use it.
    let cache = match &config.cache {
        Some(url) => Some(CacheClient::new(service.connect(url)?)),
        None => None,
    };
    let credentials = config.security.credentials(ServiceKind::Failover);
    let peers: Arc<dyn engine::peers::Peers> = Arc::new(engine::peers::Tonic {
        registry: RegistryClient::new(service.channel(Role::Registry)?),
        processor: ProcessorClient::new(service.channel(Role::Processor)?)
            .max_decoding_message_size(limits.max_message_bytes),
        cache,
        connect: Box::new(move |url: &str| {
            ferry_runtime::connect(url, &credentials).map_err(|e| e.to_string())
        }),
        max_message_bytes: limits.max_message_bytes,
        placements: Default::default(),
        channels: Default::default(),
    });
    let instant = match &settings.libvirt {
        Some(l) => serve_points(l, &peers, &shutdown)
            .await
            .map_err(ferry_runtime::service::ServeError::Service)?,
        None => None,
    };
    let engine = engine::Engine::new(
        peers,
        backend,
        jobs,
        Arc::new(plans),
        engine::Tuning {
            write_rate: (settings.materialize_mib_per_sec > 0)
                .then_some(settings.materialize_mib_per_sec << 20),
            start_timeout,
            instant,
        },
        shutdown.clone(),
    );
    service.routes().add_service(
        FailoverServer::new(service::FailoverService::new(
            engine.clone(),
            shutdown.clone(),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes),
    );
    let stopping = engine.clone();
    // Unfinished jobs resume before health turns SERVING.
    let resume = async move {
        match engine.resume() {
            Ok(n) if n > 0 => tracing::info!(jobs = n, "unfinished jobs resumed"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot resume jobs"),
        }
    };
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
            resume,
            std::future::ready(()),
        )
        .await?;
    // Jobs stop at shutdown; a backend call they made may still run.
    stopping.stopped(std::time::Duration::from_secs(30)).await;
    Ok(())
}
