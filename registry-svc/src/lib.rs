//! registry-svc: Ferry's control plane. Source VMs are registered here and
//! their replication enabled; target resources are derived; policies, network
//! mappings, replication groups and each protected item's state and health are
//! kept in sled and published on a watch stream.

pub mod derive;
pub mod enrollment;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod service;
pub mod store;
pub mod tokens;

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_proto::registry::v1::registry_server::RegistryServer;
use ferry_runtime::{CancellationToken, Host, ServiceConfig};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use error::RegistryError;
pub use registry::Registry;
pub use tokens::{generate_token, Bootstrap, BootstrapError, TokenError, Tokens};

/// The gRPC service name, for health and reflection.
pub const SERVICE_NAME: &str = "ferry.registry.v1.Registry";
/// The default port.
pub const DEFAULT_PORT: u16 = 7101;

/// Regions known when the config file names none.
pub const DEFAULT_REGIONS: &[&str] = &[
    "australiaeast",
    "brazilsouth",
    "canadacentral",
    "centralindia",
    "centralus",
    "eastasia",
    "eastus",
    "eastus2",
    "francecentral",
    "germanywestcentral",
    "japaneast",
    "northeurope",
    "southeastasia",
    "swedencentral",
    "uksouth",
    "ukwest",
    "westeurope",
    "westus",
    "westus2",
];

/// The `[registry]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The known regions; [`DEFAULT_REGIONS`] when empty.
    pub regions: Vec<String>,
    /// Seconds a group coordinator's agent may stay silent before registry
    /// passes the role on; 0 for the default (3).
    pub coordinator_lease_secs: u64,
    /// Seconds an agent may stay silent (no health report, heartbeat or
    /// registration) before its VM's health turns CRITICAL; 0 for the
    /// default (15: three of the agent's default 5 s heartbeats).
    pub agent_timeout_secs: u64,
    /// File holding the bootstrap admin token (`fy1.bootstrap.<secret>`);
    /// written (mode 0600) if missing. None: no bootstrap token.
    pub bootstrap_token_file: Option<std::path::PathBuf>,
    /// Regions with services of their own (`[registry.services.westus]`),
    /// set at every start (SetRegionServices changes them meanwhile).
    pub services: std::collections::BTreeMap<String, ServicesSettings>,
}

/// A `[registry.services.<region>]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesSettings {
    /// The cache-svc its VMs' agents stream to; empty for the default.
    pub cache: String,
    /// The processor-svc applying the items replicating into it, as it
    /// names itself (`[processor] endpoint`); empty for any that names none.
    pub processor: String,
}

/// registry-svc's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The common settings. `cache` is the cache endpoint handed to agents.
    pub service: ServiceConfig,
    /// The known regions.
    pub regions: BTreeSet<String>,
    /// How long a silent group coordinator keeps its role.
    pub coordinator_lease: std::time::Duration,
    /// How long an agent may stay silent before its VM is CRITICAL.
    pub agent_timeout: std::time::Duration,
    /// Where the bootstrap admin token is read from (or written to).
    pub bootstrap_token_file: Option<std::path::PathBuf>,
    /// The regions' own services, from the config file.
    pub services: Vec<model::RegionServices>,
}

impl Config {
    /// A configuration from the common settings and the `[registry]` table.
    pub fn new(service: ServiceConfig, settings: Settings) -> Result<Config, RegistryError> {
        let regions: BTreeSet<String> = if settings.regions.is_empty() {
            DEFAULT_REGIONS.iter().map(|r| r.to_string()).collect()
        } else {
            settings.regions.into_iter().collect()
        };
        for region in &regions {
            model::check_name("region", region)?;
        }
        let coordinator_lease = match settings.coordinator_lease_secs {
            0 => registry::COORDINATOR_LEASE,
            secs => std::time::Duration::from_secs(secs),
        };
        let agent_timeout = match settings.agent_timeout_secs {
            0 => registry::AGENT_TIMEOUT,
            secs => std::time::Duration::from_secs(secs),
        };
        let mut services = Vec::new();
        for (region, s) in settings.services {
            if !regions.contains(&region) {
                return Err(RegistryError::invalid(format!(
                    "[registry.services.{region}]: {region:?} is not a known region"
                )));
            }
            let field = |name: &str| format!("[registry.services.{region}] {name}");
            services.push(model::RegionServices {
                cache: model::endpoint(&field("cache"), &s.cache)?,
                processor: model::endpoint(&field("processor"), &s.processor)?,
                region,
            });
        }
        Ok(Config {
            service,
            regions,
            coordinator_lease,
            agent_timeout,
            bootstrap_token_file: settings.bootstrap_token_file,
            services,
        })
    }
}

/// Why registry-svc stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Host(#[from] ferry_runtime::HostError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The binary's entry: builds the configuration, then serves.
pub async fn run(
    service: ServiceConfig,
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve(Config::new(service, settings)?, listener, shutdown).await
}

/// Serves registry-svc on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let mut host = Host::new(&[SERVICE_NAME]).await?;
    let health = host.health();
    let data_dir = &config.service.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    host.keep_audit(data_dir, &config.service.limits)?;
    let registry = Arc::new(
        Registry::open(
            data_dir,
            config.regions.clone(),
            config.service.cache.clone(),
        )
        .await?
        .with_coordinator_lease(config.coordinator_lease)
        .with_agent_timeout(config.agent_timeout)
        // Where no caller is checked, an enrollment token would protect
        // nothing: anyone may call anything.
        .with_enrollment_required(config.service.security.enforce),
    );
    // The operator token store; `tokens.authenticate(bearer)` checks a token
    // in-process.
    for services in &config.services {
        registry.set_region_services(services.clone()).await?;
    }
    let tokens = registry.tokens();
    if let Some(path) = &config.bootstrap_token_file {
        tokens.bootstrap(path).await?;
    }
    tokio::spawn(registry.clone().watch_agents(shutdown.clone()));
    let limits = &config.service.limits;
    host.routes().add_service(
        RegistryServer::new(service::RegistryService::new(
            registry.clone(),
            shutdown.clone(),
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes),
    );
    if let Some(addr) = config.service.health_listen {
        ferry_runtime::health_port::serve(addr, &health, shutdown.clone()).await?;
    }
    if let Some(addr) = config.service.metrics_listen {
        ferry_runtime::metrics::register_collector(Box::new(metrics::ItemMetrics::new(&registry)));
        ferry_runtime::metrics::serve(addr, shutdown.clone())
            .await
            .map_err(ferry_runtime::HostError::from)?;
    }
    // Storage is open and registry has no peers to wait for.
    health.serving().await;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "registry-svc serving");
    // Operator tokens are checked against registry's own store.
    let access = ferry_runtime::service::access(&config.service, Arc::new(tokens));
    host.serve(
        listener,
        limits,
        config.service.security.tls.as_ref(),
        access,
        shutdown,
    )
    .await?;
    tracing::info!("registry-svc stopped");
    Ok(())
}
