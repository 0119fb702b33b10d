//! Security every service shares: who a caller is ([`principal`]), and how a
//! certificate names one. See docs/security.md for the threat model.

pub mod pki;
pub mod principal;

pub use principal::{OperatorRole, Principal, ServiceKind, TRUST_DOMAIN};
