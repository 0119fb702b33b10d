//! Hosting a service's gRPC endpoints: health (grpc.health.v1), reflection (v1
//! and v1alpha), the audit trail (ferry.audit.v1), request limits, trace
//! context and graceful shutdown.

use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::config::Limits;
use crate::security::audit::{AuditLog, AuditService};
use crate::security::{Access, AuthLayer, Tls};
use crate::trace_context::TraceContextLayer;

/// Why a service could not be hosted.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A peer URL is unusable.
    #[error("peer {url}: {message}")]
    Peer { url: String, message: String },
    /// The data directory is not usable.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Shutdown was requested while waiting.
    #[error("opening storage failed: {0}")]
    Storage(String),
    #[error("shut down while waiting for {0}")]
    Cancelled(String),
    /// The health port's address cannot be listened on.
    #[error("cannot listen for health checks on {addr}: {source}")]
    HealthPort {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The audit trail cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::security::audit::AuditError),
    /// The metrics port's address cannot be listened on.
    #[error(transparent)]
    MetricsPort(#[from] crate::metrics::MetricsPortError),
}

/// The gRPC name of the audit service every server hosts.
pub const AUDIT_SERVICE: &str = "ferry.audit.v1.Audit";

/// The health of one hosted service. Starts NOT_SERVING; the service turns it
/// SERVING once its storage and peers are ready; the host turns it back to
/// NOT_SERVING when shutdown begins.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<String>,
}

/// The health service name that reports the process alive (SERVING while it
/// answers at all), for liveness probes; "" and the API's own names report
/// readiness.
pub const LIVENESS_SERVICE: &str = "liveness";

impl Health {
    async fn set(&self, status: ServingStatus) {
        // "" is the server as a whole, as grpc-health-probe asks by default.
        self.reporter.set_service_status("", status).await;
        for name in &self.services {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Reports SERVING for the server and each of its services.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Reports NOT_SERVING for the server and each of its services.
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    /// The reporter, for a second port answering the same statuses.
    pub fn reporter(&self) -> HealthReporter {
        self.reporter.clone()
    }
}

/// A gRPC server under construction: health and reflection are in from the
/// start; the service adds its own API with [`Host::add_service`].
pub struct Host {
    routes: RoutesBuilder,
    health: Health,
    audit: Option<AuditLog>,
}

impl Host {
    /// A host for the named gRPC services (e.g. "ferry.registry.v1.Registry").
    /// Reflection lists them, health, and reflection itself; health reports
    /// NOT_SERVING for each until [`Health::serving`].
    pub async fn new(services: &[&str]) -> Result<Self, HostError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        health.not_serving().await;
        // Liveness, apart from readiness: SERVING whenever the server
        // answers at all, peers or no peers, so a liveness probe restarts
        // only a process that no longer answers (a TCP probe would pass a
        // wedged one: the kernel accepts for it).
        health
            .reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;

        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .include_reflection_service(false)
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
                .with_service_name(AUDIT_SERVICE);
            for name in services {
                builder = builder.with_service_name(*name);
            }
            builder
        };
        let mut routes = RoutesBuilder::default();
        routes
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        Ok(Host {
            routes,
            health,
            audit: None,
        })
    }

    /// Keeps the audit trail in `<data_dir>/audit` for
    /// `limits.audit_retention_days` days: mutating calls are recorded and
    /// ListAuditRecords answers from it. Without it ListAuditRecords is
    /// FAILED_PRECONDITION and nothing is recorded.
    pub fn keep_audit(
        &mut self,
        data_dir: &std::path::Path,
        limits: &Limits,
    ) -> Result<(), HostError> {
        self.audit = Some(AuditLog::open(
            &data_dir.join("audit"),
            limits.audit_retention_days,
        )?);
        Ok(())
    }

    /// The audit trail, if kept.
    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// The health handle to turn SERVING once ready.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The routes, to add the service's own generated servers to.
    pub fn routes(&mut self) -> &mut RoutesBuilder {
        &mut self.routes
    }

    /// Serves on `listener` until `shutdown` is cancelled, then reports
    /// NOT_SERVING, stops accepting and waits for calls in flight (streaming
    /// handlers end themselves on the same token).
    /// Every request passes the authorization layer (`access`); with `tls`
    /// the server speaks only TLS.
    pub async fn serve(
        self,
        listener: TcpListener,
        limits: &Limits,
        tls: Option<&Tls>,
        access: Access,
        shutdown: CancellationToken,
    ) -> Result<(), HostError> {
        let health = self.health.clone();
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            if let Ok(stream) = &conn {
                // Small control messages must not wait for Nagle.
                let _ = stream.set_nodelay(true);
            }
            conn
        });
        let grace = Duration::from_secs(limits.shutdown_grace_secs);
        let stopping = shutdown.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.server())?;
        }
        let mut routes = self.routes;
        routes.add_service(ferry_proto::audit::v1::audit_server::AuditServer::new(
            AuditService::new(self.audit.clone()),
        ));
        let server = builder
            .timeout(limits.request_timeout())
            .initial_stream_window_size(Some(crate::peers::STREAM_WINDOW))
            .initial_connection_window_size(Some(crate::peers::CONNECTION_WINDOW))
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(TraceContextLayer)
            .layer(crate::metrics::GrpcMetricsLayer)
            .layer(AuthLayer::with_audit(access, self.audit))
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.concurrency_limit.max(1),
            ))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.cancelled().await;
                health.not_serving().await;
            });
        tokio::select! {
            served = server => served?,
            _ = async {
                stopping.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "calls still open after the shutdown grace period; stopping anyway");
            }
        }
        Ok(())
    }
}
