//! Who is calling: the principals Ferry knows and how a certificate names
//! one. Every certificate Ferry issues (`ferry certs init`) carries one
//! SPIFFE-style URI SAN in the trust domain `ferry`:
//!
//! | principal | URI SAN |
//! |---|---|
//! | a service | `spiffe://ferry/service/<registry\|cache\|processor\|failover>` |
//! | the agent of a VM | `spiffe://ferry/agent/<vm>` |
//! | an operator | `spiffe://ferry/operator/<reader\|operator\|admin>/<name>` |
//!
//! The same principals come from bearer tokens (operators, agents) and
//! service tokens (services, when the deployment runs without TLS).

use std::fmt;
use std::str::FromStr;

use ferry_proto::ids::VmName;
use serde::{Deserialize, Serialize};

/// The trust domain of every Ferry identity URI.
pub const TRUST_DOMAIN: &str = "ferry";

/// An operator's role. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    /// list, show, points, jobs, watch.
    Reader,
    /// test failover, cleanup, failover, commit, enable, disable, resync.
    Operator,
    /// policies, mappings, groups, tokens, unregister.
    Admin,
}

impl OperatorRole {
    /// Every role, weakest first.
    pub const ALL: [OperatorRole; 3] = [
        OperatorRole::Reader,
        OperatorRole::Operator,
        OperatorRole::Admin,
    ];

    /// The role's name as users type it.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Reader => "reader",
            OperatorRole::Operator => "operator",
            OperatorRole::Admin => "admin",
        }
    }
}

impl fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OperatorRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(OperatorRole::Reader),
            "operator" => Ok(OperatorRole::Operator),
            "admin" => Ok(OperatorRole::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected reader, operator or admin"
            )),
        }
    }
}

/// One of Ferry's four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Registry,
    Cache,
    Processor,
    Failover,
}

impl ServiceKind {
    /// Every service.
    pub const ALL: [ServiceKind; 4] = [
        ServiceKind::Registry,
        ServiceKind::Cache,
        ServiceKind::Processor,
        ServiceKind::Failover,
    ];

    /// The service's short name, as in its identity URI and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Registry => "registry",
            ServiceKind::Cache => "cache",
            ServiceKind::Processor => "processor",
            ServiceKind::Failover => "failover",
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown service {s:?}: expected registry, cache, processor or failover")
            })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Principal {
    /// A Ferry service (its certificate or its service token).
    Service { service: ServiceKind },
    /// The agent protecting one VM; it may act for that VM only.
    Agent { vm: VmName },
    /// A person or script with a role.
    Operator { name: String, role: OperatorRole },
}

impl Principal {
    /// The identity URI naming this principal (`spiffe://ferry/...`).
    pub fn uri(&self) -> String {
        match self {
            Principal::Service { service } => format!("spiffe://{TRUST_DOMAIN}/service/{service}"),
            Principal::Agent { vm } => format!("spiffe://{TRUST_DOMAIN}/agent/{}", vm.as_str()),
            Principal::Operator { name, role } => {
                format!("spiffe://{TRUST_DOMAIN}/operator/{role}/{name}")
            }
        }
    }

    /// Parses an identity URI; `None` for a URI outside Ferry's scheme (a
    /// certificate may carry other URIs too).
    pub fn from_uri(uri: &str) -> Option<Principal> {
        let rest = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let parts: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
        match parts.as_slice() {
            ["service", kind] => Some(Principal::Service {
                service: kind.parse().ok()?,
            }),
            ["agent", vm] => Some(Principal::Agent {
                vm: VmName::parse(*vm).ok()?,
            }),
            ["operator", role, name] => {
                ferry_proto::ids::check_name("operator name", name).ok()?;
                Some(Principal::Operator {
                    name: (*name).to_string(),
                    role: role.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// Human form, as audit records and messages show it.
impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Service { service } => write!(f, "service {service}"),
            Principal::Agent { vm } => write!(f, "agent of VM {:?}", vm.as_str()),
            Principal::Operator { name, role } => write!(f, "{role} {name:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip() {
        let all = [
            Principal::Service {
                service: ServiceKind::Processor,
            },
            Principal::Agent {
                vm: VmName::parse("web-1").unwrap(),
            },
            Principal::Operator {
                name: "alice".into(),
                role: OperatorRole::Operator,
            },
        ];
        for p in all {
            assert_eq!(Principal::from_uri(&p.uri()), Some(p.clone()), "{p}");
        }
    }

    #[test]
    fn foreign_or_malformed_uris_are_no_principal() {
        for uri in [
            "spiffe://other/service/registry",
            "spiffe://ferry/service/nope",
            "spiffe://ferry/agent/a/b",
            "spiffe://ferry/agent/",
            "spiffe://ferry/operator/root/alice",
            "spiffe://ferryx/service/cache",
            "https://ferry/service/cache",
        ] {
            assert_eq!(Principal::from_uri(uri), None, "{uri}");
        }
    }

    #[test]
    fn roles_order_from_weakest() {
        assert!(OperatorRole::Reader < OperatorRole::Operator);
        assert!(OperatorRole::Operator < OperatorRole::Admin);
    }
}
