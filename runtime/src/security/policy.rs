//! Who may call what: one table, method → the callers allowed. The
//! authorization layer ([`super::layer`]) looks every request up here; a
//! method missing from the table is refused to everyone (a test walks the
//! proto descriptors and fails when an RPC has no entry).
//!
//! An agent is allowed a method only for its own VM: the layer lets an
//! agent through to the methods marked `agent`, and the handler checks the
//! VM the request names against the agent's ([`super::Caller::check_vm`]).

use crate::security::principal::{OperatorRole, Principal, ServiceKind};

use OperatorRole::{Admin, Operator, Reader};
use ServiceKind::{Cache, Failover, Processor, Registry};

/// The callers one method accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    /// Operators with at least this role; `None`: no operator.
    pub role: Option<OperatorRole>,
    /// These services.
    pub services: &'static [ServiceKind],
    /// The agent of the VM the request names.
    pub agent: bool,
    /// Anyone, authenticated or not (health, reflection).
    pub public: bool,
    /// The method changes state: the audit trail records it (see
    /// [`super::audit`]).
    pub mutates: bool,
    /// Called many times a second by services and agents (reports,
    /// streams, heartbeats): recorded only when refused, so that the trail
    /// is not flooded.
    pub frequent: bool,
}

const fn role(role: OperatorRole) -> Allow {
    Allow {
        role: Some(role),
        services: &[],
        agent: false,
        public: false,
        mutates: false,
        frequent: false,
    }
}

const fn services(services: &'static [ServiceKind]) -> Allow {
    Allow {
        role: None,
        services,
        agent: false,
        public: false,
        mutates: false,
        frequent: false,
    }
}

impl Allow {
    const fn and(self, services: &'static [ServiceKind]) -> Allow {
        Allow { services, ..self }
    }

    const fn and_agent(self) -> Allow {
        Allow {
            agent: true,
            ..self
        }
    }

    /// The method changes state (recorded in the audit trail).
    const fn mutating(self) -> Allow {
        Allow {
            mutates: true,
            ..self
        }
    }

    /// A mutating method services or agents call at a high rate: recorded
    /// only when refused.
    const fn frequent(self) -> Allow {
        Allow {
            mutates: true,
            frequent: true,
            ..self
        }
    }

    /// Whether the audit trail records an allowed call.
    pub fn audited_when_allowed(&self) -> bool {
        self.mutates && !self.frequent
    }

    /// Whether `principal` may call the method.
    pub fn admits(&self, principal: &Principal) -> bool {
        match principal {
            Principal::Service { service } => self.services.contains(service),
            Principal::Agent { .. } => self.agent,
            Principal::Operator { role, .. } => self.role.is_some_and(|needed| *role >= needed),
        }
    }

    /// Who the method is for, as a refusal says it.
    pub fn describe(&self) -> String {
        let mut who = Vec::new();
        if let Some(role) = self.role {
            who.push(match role {
                Admin => "an admin".to_string(),
                Operator => "an operator or admin".to_string(),
                Reader => "any operator role (reader, operator, admin)".to_string(),
            });
        }
        if !self.services.is_empty() {
            let names: Vec<&str> = self.services.iter().map(|s| s.as_str()).collect();
            who.push(format!("the {} service", names.join("/")));
        }
        if self.agent {
            who.push("the VM's own agent".to_string());
        }
        if who.is_empty() {
            "no one".to_string()
        } else {
            who.join(" or ")
        }
    }
}

/// Health and reflection.
pub const PUBLIC: Allow = Allow {
    role: None,
    services: &[],
    agent: false,
    public: true,
    mutates: false,
    frequent: false,
};

const ALL_SERVICES: &[ServiceKind] = &[Registry, Cache, Processor, Failover];

/// Every Ferry RPC, by its gRPC path without the leading '/'.
pub const TABLE: &[(&str, Allow)] = &[
    // The audit trail every server keeps (admins only).
    ("ferry.audit.v1.Audit/ListAuditRecords", role(Admin)),
    // registry: inventory and protection.
    ("ferry.registry.v1.Registry/ListRegions", role(Reader)),
    (
        "ferry.registry.v1.Registry/RegisterVm",
        role(Operator).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/GetVm",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/ListVms",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/UnregisterVm",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/EnableReplication",
        role(Operator).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/GetProtectedItem",
        role(Reader).and(ALL_SERVICES).and_agent(),
    ),
    (
        "ferry.registry.v1.Registry/ListProtectedItems",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/DisableReplication",
        role(Operator).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/WatchProtectedItems",
        role(Reader).and(ALL_SERVICES),
    ),
    // registry: what services and agents report.
    (
        "ferry.registry.v1.Registry/TransitionState",
        services(&[Cache, Processor, Failover])
            .and_agent()
            .mutating(),
    ),
    // Re-protect: failover-svc's reprotect job only.
    (
        "ferry.registry.v1.Registry/ReprotectItem",
        services(&[Failover]).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/CompleteReprotectSeed",
        services(&[Failover]).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/ReportFencedWrites",
        services(&[]).and_agent().mutating(),
    ),
    (
        "ferry.registry.v1.Registry/ReportReplicationProgress",
        services(&[Processor]).and_agent().frequent(),
    ),
    (
        "ferry.registry.v1.Registry/ReportHealth",
        services(&[Cache, Processor, Failover])
            .and_agent()
            .frequent(),
    ),
    (
        "ferry.registry.v1.Registry/RegisterAgent",
        services(&[]).and_agent().mutating(),
    ),
    (
        "ferry.registry.v1.Registry/CreateEnrollmentToken",
        role(Operator).mutating(),
    ),
    ("ferry.registry.v1.Registry/VerifyAgent", services(&[Cache])),
    (
        "ferry.registry.v1.Registry/GroupHeartbeat",
        services(&[]).and_agent().frequent(),
    ),
    // registry: configuration.
    (
        "ferry.registry.v1.Registry/SetRegionServices",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/CreatePolicy",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/GetPolicy",
        role(Reader).and(ALL_SERVICES).and_agent(),
    ),
    (
        "ferry.registry.v1.Registry/ListPolicies",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/DeletePolicy",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/CreateNetworkMapping",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/ListNetworkMappings",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/DeleteNetworkMapping",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/CreateReplicationGroup",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/GetReplicationGroup",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/ListReplicationGroups",
        role(Reader).and(ALL_SERVICES),
    ),
    (
        "ferry.registry.v1.Registry/DeleteReplicationGroup",
        role(Admin).mutating(),
    ),
    // registry: tokens.
    (
        "ferry.registry.v1.Registry/CreateToken",
        role(Admin).mutating(),
    ),
    ("ferry.registry.v1.Registry/ListTokens", role(Admin)),
    (
        "ferry.registry.v1.Registry/RevokeToken",
        role(Admin).mutating(),
    ),
    (
        "ferry.registry.v1.Registry/AuthenticateToken",
        services(&[Cache, Processor, Failover]),
    ),
    // cache.
    (
        "ferry.cache.v1.Cache/Ingest",
        services(&[]).and_agent().frequent(),
    ),
    ("ferry.cache.v1.Cache/Tail", services(&[Processor])),
    (
        "ferry.cache.v1.Cache/ReportApplied",
        services(&[Processor]).frequent(),
    ),
    (
        "ferry.cache.v1.Cache/GetLogInfo",
        role(Reader).and(&[Processor, Failover]),
    ),
    (
        "ferry.cache.v1.Cache/SendControl",
        services(&[Processor, Failover]).mutating(),
    ),
    // processor.
    (
        "ferry.processor.v1.Processor/ListRecoveryPoints",
        role(Reader).and(&[Failover]),
    ),
    (
        "ferry.processor.v1.Processor/GetRecoveryPoint",
        role(Reader).and(&[Failover]),
    ),
    (
        "ferry.processor.v1.Processor/CutRecoveryPoint",
        role(Operator).and(&[Failover]).mutating(),
    ),
    // A disk's contents leave only for a failover.
    (
        "ferry.processor.v1.Processor/ReadDisk",
        services(&[Failover]),
    ),
    (
        "ferry.processor.v1.Processor/GetDiskDigest",
        role(Operator).and(&[Failover]),
    ),
    (
        "ferry.processor.v1.Processor/PinRecoveryPoint",
        services(&[Failover]).mutating(),
    ),
    (
        "ferry.processor.v1.Processor/UnpinRecoveryPoint",
        services(&[Failover]).mutating(),
    ),
    (
        "ferry.processor.v1.Processor/GetPipelineStatus",
        role(Reader).and(&[Failover]),
    ),
    (
        "ferry.processor.v1.Processor/ListGroupPoints",
        role(Reader).and(&[Failover]),
    ),
    // The original disks go in only for a re-protect.
    (
        "ferry.processor.v1.Processor/SeedReplica",
        services(&[Failover]).mutating(),
    ),
    // failover.
    (
        "ferry.failover.v1.Failover/StartFailover",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/CommitFailover",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/CleanupTestFailover",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/Reprotect",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/CreatePlan",
        role(Operator).mutating(),
    ),
    ("ferry.failover.v1.Failover/GetPlan", role(Reader)),
    ("ferry.failover.v1.Failover/ListPlans", role(Reader)),
    (
        "ferry.failover.v1.Failover/DeletePlan",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/AddPlanGroup",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/AddPlanAction",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/StartPlan",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/ResumePlan",
        role(Operator).mutating(),
    ),
    ("ferry.failover.v1.Failover/GetJob", role(Reader)),
    ("ferry.failover.v1.Failover/ListJobs", role(Reader)),
    ("ferry.failover.v1.Failover/WatchJob", role(Reader)),
    (
        "ferry.failover.v1.Failover/CreateNetwork",
        role(Operator).mutating(),
    ),
    (
        "ferry.failover.v1.Failover/DeleteNetwork",
        role(Operator).mutating(),
    ),
    ("ferry.failover.v1.Failover/ListNetworks", role(Reader)),
    ("ferry.failover.v1.Failover/ListTargetVms", role(Reader)),
    // The agent's group port: members of the group (the handler checks
    // membership).
    (
        "ferry.agent.v1.AgentGroup/Prepare",
        services(&[]).and_agent().mutating(),
    ),
    (
        "ferry.agent.v1.AgentGroup/Commit",
        services(&[]).and_agent().mutating(),
    ),
    (
        "ferry.agent.v1.AgentGroup/Abort",
        services(&[]).and_agent().mutating(),
    ),
];

/// Services every server answers for anyone.
const PUBLIC_SERVICES: &[&str] = &[
    "grpc.health.v1.Health/",
    "grpc.reflection.v1.ServerReflection/",
    "grpc.reflection.v1alpha.ServerReflection/",
];

/// The rule for a request path (`/package.Service/Method`); `None` when the
/// method is not in the table (refused).
pub fn rule_for(path: &str) -> Option<Allow> {
    let method = path.strip_prefix('/').unwrap_or(path);
    if PUBLIC_SERVICES.iter().any(|p| method.starts_with(p)) {
        return Some(PUBLIC);
    }
    TABLE
        .iter()
        .find(|(name, _)| *name == method)
        .map(|(_, allow)| *allow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::FileDescriptorSet;

    /// Every RPC in Ferry's protos has an entry, and every entry is an RPC.
    #[test]
    fn every_rpc_has_exactly_one_entry() {
        let set = FileDescriptorSet::decode(ferry_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut rpcs = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    rpcs.push(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(rpcs.len() > 50, "{rpcs:?}");
        let missing: Vec<&String> = rpcs
            .iter()
            .filter(|rpc| !TABLE.iter().any(|(name, _)| name == rpc))
            .collect();
        assert!(
            missing.is_empty(),
            "RPCs without an authorization entry in runtime/src/security/policy.rs: {missing:?}"
        );
        let stale: Vec<&str> = TABLE
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !rpcs.iter().any(|rpc| rpc == name))
            .collect();
        assert!(
            stale.is_empty(),
            "entries for RPCs that do not exist: {stale:?}"
        );
        let mut names: Vec<&str> = TABLE.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TABLE.len(), "a method is listed twice");
    }

    /// Reads never count as mutating; the calls that create, delete, start,
    /// commit, register, enable, disable or revoke always do.
    #[test]
    fn reads_do_not_mutate_and_changes_do() {
        for (name, allow) in TABLE {
            let method = name.rsplit('/').next().unwrap();
            if [
                "Get",
                "List",
                "Watch",
                "Tail",
                "Read",
                "Verify",
                "Authenticate",
            ]
            .iter()
            .any(|p| method.starts_with(p))
            {
                assert!(!allow.mutates, "{name} reads: it must not be mutating");
            }
            if [
                "Create",
                "Delete",
                "Start",
                "Commit",
                "Register",
                "Unregister",
                "Enable",
                "Disable",
                "Revoke",
                "Cut",
                "Pin",
                "Unpin",
                "Transition",
                "Report",
            ]
            .iter()
            .any(|p| method.starts_with(p))
            {
                assert!(allow.mutates, "{name} changes state: it must be mutating");
            }
            assert!(
                !allow.frequent || allow.mutates,
                "{name}: frequent implies mutating"
            );
        }
        let mutating = TABLE.iter().filter(|(_, a)| a.mutates).count();
        assert!(mutating >= 28, "{mutating}");
        // Operators' calls are all recorded when allowed.
        for (name, allow) in TABLE {
            if allow.mutates && allow.role.is_some() {
                assert!(allow.audited_when_allowed(), "{name}");
            }
        }
        assert!(!rule_for("/grpc.health.v1.Health/Check").unwrap().mutates);
    }

    #[test]
    fn roles_include_the_weaker_ones_and_nothing_else() {
        let op = |role| Principal::Operator {
            name: "x".into(),
            role,
        };
        let rule = rule_for("/ferry.failover.v1.Failover/StartFailover").unwrap();
        assert!(!rule.admits(&op(Reader)));
        assert!(rule.admits(&op(Operator)));
        assert!(rule.admits(&op(Admin)));
        assert!(!rule.admits(&Principal::Service { service: Cache }));
        let read = rule_for("/ferry.processor.v1.Processor/ReadDisk").unwrap();
        assert!(!read.admits(&op(Admin)), "no operator reads disks directly");
        assert!(read.admits(&Principal::Service { service: Failover }));
        assert!(!read.admits(&Principal::Service { service: Cache }));
        assert_eq!(rule_for("/ferry.registry.v1.Registry/Nope"), None);
        assert_eq!(rule_for("/grpc.health.v1.Health/Check"), Some(PUBLIC));
    }
}
