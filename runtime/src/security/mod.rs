//! Security every service shares: who a caller is ([`principal`]), TLS
//! material ([`tls`]), service tokens for deployments without TLS
//! ([`cluster_secret`]), the identities certificates carry ([`pki`]), who may call what ([`policy`]) and the layer that
//! enforces it on every server ([`layer`]), which also keeps the audit trail
//! ([`audit`]). See docs/security.md.

pub mod audit;
pub mod cluster_secret;
pub mod layer;
pub mod pki;
pub mod policy;
pub mod principal;
pub mod remote_tokens;
pub mod tls;

pub use audit::{AuditLog, Target};
pub use cluster_secret::ClusterSecret;
pub use layer::{Access, AuthLayer, Caller, Checks, NoOperatorTokens, TokenVerifier};
pub use principal::{OperatorRole, Principal, ServiceKind, TRUST_DOMAIN};
pub use remote_tokens::RemoteTokens;
pub use tls::{ClientTls, Tls, TlsFiles};
