//! The skeleton every service's `serve` shares: a host for its gRPC name
//! (health NOT_SERVING, reflection), its data directory checked, its peers
//! resolved from the configuration; then its routes; then serving, with
//! health turned SERVING once every peer serves and the service's own
//! readiness work is done, and NOT_SERVING on shutdown.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

use std::sync::Arc;

use crate::config::ServiceConfig;
use crate::host::{Host, HostError};
use crate::peers::{connect, Credentials, PeerChannel};
use crate::readiness::{prepare_data_dir, wait_for_peers, Peer};
use crate::security::{Access, Checks, ServiceKind, TokenVerifier};

/// A peer service, by what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Registry,
    Cache,
    Processor,
}

impl Role {
    /// The peer in `config`, or a configuration error naming the flag.
    pub fn peer(self, config: &ServiceConfig) -> Result<Peer, HostError> {
        let (role, url, service) = match self {
            Role::Registry => (
                "registry",
                config.registry.as_ref(),
                "ferry.registry.v1.Registry",
            ),
            Role::Cache => ("cache", config.cache.as_ref(), "ferry.cache.v1.Cache"),
            Role::Processor => (
                "processor",
                config.processor.as_ref(),
                "ferry.processor.v1.Processor",
            ),
        };
        Peer::required(role, url, service)
    }
}

/// A service being started.
pub struct Service {
    label: String,
    host: Host,
    peers: Vec<(Role, Peer)>,
    credentials: Credentials,
}

impl Service {
    /// Starts service `kind` serving the gRPC service `grpc_name`: checks
    /// every peer in `needs` is configured and the data directory is
    /// writable (a fsynced probe) before anything opens.
    pub async fn start(
        kind: ServiceKind,
        grpc_name: &'static str,
        config: &ServiceConfig,
        needs: &[Role],
    ) -> Result<Service, HostError> {
        let label = format!("{kind}-svc");
        let credentials = config.security.credentials(kind);
        let peers = needs
            .iter()
            .map(|role| Ok((*role, role.peer(config)?)))
            .collect::<Result<Vec<_>, HostError>>()?;
        let mut host = Host::new(&[grpc_name]).await?;
        prepare_data_dir(&config.data_dir).map_err(|source| HostError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        host.keep_audit(&config.data_dir, &config.limits)?;
        Ok(Service {
            label,
            host,
            peers,
            credentials,
        })
    }

    /// A channel to the peer in `role`, carrying this service's credentials.
    pub fn channel(&self, role: Role) -> Result<PeerChannel, HostError> {
        connect(self.url(role)?, &self.credentials)
    }

    /// A channel to `url`, carrying this service's credentials.
    pub fn connect(&self, url: &str) -> Result<PeerChannel, HostError> {
        connect(url, &self.credentials)
    }

    /// The URL of a peer named in `start`'s `needs`.
    pub fn url(&self, role: Role) -> Result<&str, HostError> {
        self.peers
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.url.as_str())
            .ok_or_else(|| HostError::Peer {
                url: String::new(),
                message: format!("{} did not declare it needs {role:?}", self.label),
            })
    }

    /// The routes, to add the service's generated servers to.
    pub fn routes(&mut self) -> &mut RoutesBuilder {
        self.host.routes()
    }

    /// Serves on `listener` until `shutdown`, checking callers as the
    /// configuration says (operator tokens with `tokens`). Once every peer
    /// serves, `prepare` runs (resuming work, say), health turns SERVING,
    /// and then `serving` runs for as long as it likes (following registry,
    /// say).
    pub async fn serve<P, S>(
        self,
        listener: TcpListener,
        config: &ServiceConfig,
        shutdown: CancellationToken,
        tokens: Arc<dyn TokenVerifier>,
        prepare: P,
        serving: S,
    ) -> Result<(), HostError>
    where
        P: Future<Output = ()> + Send + 'static,
        S: Future<Output = ()> + Send + 'static,
    {
        let access = access(config, tokens);
        let health = self.host.health();
        if let Some(addr) = config.health_listen {
            crate::health_port::serve(addr, &health, shutdown.clone()).await?;
        }
        if let Some(addr) = config.metrics_listen {
            crate::metrics::serve(addr, shutdown.clone()).await?;
        }
        let credentials = self.credentials.clone();
        let ready = shutdown.clone();
        let peers: Vec<Peer> = self.peers.into_iter().map(|(_, p)| p).collect();
        let label = self.label;
        tokio::spawn(async move {
            if wait_for_peers(&peers, &credentials, &ready).await.is_err() || ready.is_cancelled() {
                return;
            }
            prepare.await;
            if ready.is_cancelled() {
                return;
            }
            health.serving().await;
            tracing::info!("{label} serving");
            serving.await;
        });
        self.host
            .serve(
                listener,
                &config.limits,
                config.security.tls.as_ref(),
                access,
                shutdown,
            )
            .await
    }
}

/// The checks a server with `config` makes, operator tokens by `tokens`.
pub fn access(config: &ServiceConfig, tokens: Arc<dyn TokenVerifier>) -> Access {
    if config.security.enforce {
        Access::Enforced(Arc::new(Checks {
            tokens,
            secret: config.security.cluster_secret.clone(),
        }))
    } else {
        // Only an in-process embedding (`Security::in_process`) gets here:
        // a binary's configuration always enforces.
        Access::Unchecked
    }
}

/// Why a service stopped with an error: its own (`E`) or its host's.
#[derive(Debug, thiserror::Error)]
pub enum ServeError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Service(E),
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Opens a service's storage (`open`, blocking) off the async threads.
pub async fn open_storage<T, E>(
    open: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ServeError<E>>
where
    T: Send + 'static,
    E: std::error::Error + Send + 'static,
{
    match tokio::task::spawn_blocking(open).await {
        Ok(opened) => opened.map_err(ServeError::Service),
        Err(e) => Err(ServeError::Host(HostError::Storage(e.to_string()))),
    }
}
