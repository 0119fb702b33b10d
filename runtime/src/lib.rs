//! What every Ferry service shares: the configuration scheme, gRPC hosting
//! (health, reflection, limits, graceful shutdown), telemetry, W3C trace-context
//! propagation and connections to peers.

pub mod batch_trace;
pub mod binary;
pub mod config;
pub mod disk_lock;
pub mod durable;
pub mod follow;
pub mod health_port;
pub mod host;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod peers;
pub mod readiness;
pub mod refusal;
pub mod retry;
pub mod script;
pub mod security;
pub mod service;
pub mod shutdown;
pub mod space;
pub mod sparse;
pub mod telemetry;
pub mod time;
pub mod trace_context;

pub use config::{CommonArgs, ConfigError, Limits, ServiceConfig};
pub use host::{Health, Host, HostError, LIVENESS_SERVICE};
pub use names::path_name;
pub use peers::{connect, wait_serving, PeerChannel};
pub use readiness::Peer;
pub use refusal::{Refusal, Refused};
pub use retry::{Backoff, RetryParams};
pub use service::{Role, Service};
pub use shutdown::shutdown_token;
pub use tokio_util::sync::CancellationToken;
