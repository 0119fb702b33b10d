//! The registry's operations on domain types, independent of gRPC.
//!
//! Every change runs under one write lock, is stored as one atomic batch and
//! flushed before it is acknowledged, then published to watchers in commit
//! order. The lock makes concurrent updates of one VM serial, so none is lost;
//! registry is a control plane and its write rate is small.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, Mutex};

mod reprotect;

pub use reprotect::ReprotectRequest;

use crate::derive::derive_targets;
use crate::enrollment::{self, Admission, EnrollmentRecord, Proof};
use crate::error::RegistryError;
use crate::lifecycle::State;
use crate::model::{
    AgentRecord, EnableRequest, Group, GroupSecret, Health, HealthReport, NetworkMapping, Policy,
    ProtectedItem, RegionServices, Vm, COMPONENTS,
};
use crate::store::{Kind, Store, Writes};
use crate::tokens::{constant_time_eq, Tokens};

/// A change of a protected item, as watchers see it.
#[derive(Debug, Clone)]
pub enum Change {
    Upserted(ProtectedItem),
    Removed(ProtectedItem),
}

impl Change {
    pub fn item(&self) -> &ProtectedItem {
        match self {
            Change::Upserted(item) | Change::Removed(item) => item,
        }
    }
}

/// The counter of incarnations issued.
const INCARNATION: &str = "incarnation";

/// What a watcher starts from: every item, the last incarnation issued, and
/// the changes after them.
pub struct Subscription {
    pub items: Vec<ProtectedItem>,
    pub last_incarnation: u64,
    pub changes: broadcast::Receiver<Change>,
}

/// How many changes a slow watcher may fall behind before it is re-sent a
/// snapshot.
const CHANGE_BUFFER: usize = 1024;

/// A state move asked for by another service.
#[derive(Debug, Clone)]
pub struct Transition {
    pub to: State,
    pub expected: Option<State>,
    pub reason: String,
    pub bump_epoch: bool,
}

/// A health report from a component.
#[derive(Debug, Clone)]
pub struct HealthUpdate {
    pub component: String,
    pub health: Health,
    pub message: String,
    pub rpo: Option<Duration>,
    pub last_recovery_point: Option<SystemTime>,
    pub backlog_bytes: Option<u64>,
    pub backlog_records: Option<u64>,
}

/// What an agent gets at registration.
pub struct AgentGrant {
    pub item: ProtectedItem,
    pub credential: String,
    pub epoch: u64,
}

/// What a group member's agent gets from a heartbeat.
pub struct GroupView {
    pub group: Group,
    /// Every member: (VM, group address, alive).
    pub members: Vec<(String, String, bool)>,
    pub multi_vm_interval: Duration,
    pub lease: Duration,
}

/// The default coordinator lease.
pub const COORDINATOR_LEASE: Duration = Duration::from_secs(3);

/// The registry.
pub struct Registry {
    store: Store,
    /// Operator tokens, in the same database.
    tokens: Tokens,
    write: Mutex<()>,
    changes: broadcast::Sender<Change>,
    regions: BTreeSet<String>,
    cache_endpoint: Option<String>,
    /// Group members' agents: when each last said it is alive, and its group
    /// address. In memory: after a restart every agent gets a fresh lease.
    heartbeats: std::sync::Mutex<std::collections::HashMap<String, (Instant, String)>>,
    started: Instant,
    lease: Duration,
    /// When each VM's agent was last heard (a health report, a group
    /// heartbeat, a registration). In memory: after a restart every agent
    /// gets `agent_timeout` to be heard again.
    agents_heard: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    agent_timeout: Duration,
    /// Whether RegisterAgent needs the current credential or an enrollment
    /// token (wherever callers are checked).
    enrollment_required: bool,
}

/// How often an unchanged agent report is written again, so that its time
/// stays recent for people.
const REPORT_REFRESH: Duration = Duration::from_secs(60);

/// The default time an agent may stay silent before its VM is CRITICAL.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How an agent's silence reads in its VM's health; the report is replaced
/// by the agent's own once it speaks again.
const SILENT_AGENT: &str = "agent not heard from for";

impl Registry {
    /// Opens the registry under `dir`: creates the default policy if missing
    /// and finishes any disable a crash interrupted.
    pub async fn open(
        dir: &Path,
        regions: BTreeSet<String>,
        cache_endpoint: Option<String>,
    ) -> Result<Registry, RegistryError> {
        let store = Store::open(dir)?;
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let registry = Registry {
            tokens: Tokens::new(store.clone()),
            store,
            write: Mutex::new(()),
            changes,
            regions,
            cache_endpoint,
            heartbeats: std::sync::Mutex::new(std::collections::HashMap::new()),
            started: Instant::now(),
            lease: COORDINATOR_LEASE,
            agents_heard: std::sync::Mutex::new(std::collections::HashMap::new()),
            agent_timeout: AGENT_TIMEOUT,
            enrollment_required: true,
        };
        let _guard = registry.write.lock().await;
        let mut writes = Writes::new();
        if registry
            .store
            .get::<Policy>(Kind::Policy, Policy::DEFAULT_NAME)?
            .is_none()
        {
            writes.put(
                Kind::Policy,
                Policy::DEFAULT_NAME,
                &Policy::default_policy(),
            )?;
        }
        for item in registry.store.list::<ProtectedItem>(Kind::Item)? {
            if item.state == State::Disabling {
                tracing::info!(vm = %item.vm_name, "finishing an interrupted disable");
                writes.remove(Kind::Item, &item.vm_name);
                writes.remove(Kind::Agent, &item.vm_name);
                writes.remove(Kind::Enrollment, &item.vm_name);
            }
        }
        registry.store.commit(writes).await?;
        drop(_guard);
        Ok(registry)
    }

    /// The operator token store (a handle; clones share it).
    pub fn tokens(&self) -> Tokens {
        self.tokens.clone()
    }

    /// Sets how long a silent coordinator keeps its role.
    pub fn with_coordinator_lease(mut self, lease: Duration) -> Registry {
        self.lease = lease;
        self
    }

    /// Sets how long an agent may stay silent before its VM is CRITICAL.
    pub fn with_agent_timeout(mut self, timeout: Duration) -> Registry {
        self.agent_timeout = timeout;
        self
    }

    /// Whether RegisterAgent needs the VM's current credential or a
    /// one-time enrollment token (the default). Off only where no caller is
    /// checked at all (a registry embedded in one process).
    pub fn with_enrollment_required(mut self, required: bool) -> Registry {
        self.enrollment_required = required;
        self
    }

    /// How long the VM's agent has been silent at `now` (since registry
    /// started, if it has not been heard since).
    fn agent_silence(&self, vm: &str, now: Instant) -> Duration {
        let heard = self
            .agents_heard
            .lock()
            .ok()
            .and_then(|h| h.get(vm).copied())
            .unwrap_or(self.started);
        now.duration_since(heard)
    }

    fn heard_agent(&self, vm: &str) {
        if let Ok(mut heard) = self.agents_heard.lock() {
            heard.insert(vm.to_string(), Instant::now());
        }
    }

    /// Turns the health of every replicating VM whose agent has been silent
    /// past the agent timeout CRITICAL, saying for how long; runs until
    /// `shutdown`. Only VMs whose agent has registered count: before that
    /// there is nobody to miss.
    pub async fn watch_agents(
        self: std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let tick =
            (self.agent_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            if let Err(e) = self.mark_silent_agents().await {
                tracing::warn!(error = %e, "cannot check agents' liveness");
            }
        }
    }

    async fn mark_silent_agents(&self) -> Result<(), RegistryError> {
        let now = Instant::now();
        for item in self.list_items()? {
            if !item.state.source_active() {
                continue;
            }
            let registered = self
                .store
                .get::<AgentRecord>(Kind::Agent, &item.vm_name)?
                .is_some_and(|a| a.epoch == item.epoch);
            if !registered {
                continue;
            }
            let silent = self.agent_silence(&item.vm_name, now);
            if silent < self.agent_timeout {
                continue;
            }
            let marked = item.health_reports.get("agent").is_some_and(|r| {
                r.health == Health::Critical && r.message.starts_with(SILENT_AGENT)
            });
            if marked {
                continue;
            }
            tracing::warn!(vm = %item.vm_name, silent_secs = silent.as_secs(), "agent silent: replication health CRITICAL");
            let message = format!(
                "{SILENT_AGENT} {} s: it is down or cut off from registry, and the VM's \
                 writes may not be replicated",
                silent.as_secs()
            );
            let vm = item.vm_name.clone();
            let outcome = self
                .update_item(&vm, |item| {
                    // The agent may have spoken since the list was read.
                    if self.agent_silence(&item.vm_name, Instant::now()) < self.agent_timeout {
                        return Ok(false);
                    }
                    item.health_reports.insert(
                        "agent".into(),
                        HealthReport {
                            health: Health::Critical,
                            message: message.clone(),
                            reported_at: SystemTime::now(),
                        },
                    );
                    Ok(true)
                })
                .await;
            match outcome {
                Ok(_) | Err(RegistryError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The known regions.
    pub fn regions(&self) -> &BTreeSet<String> {
        &self.regions
    }

    /// Every region's own services, by region.
    pub fn region_services(&self) -> Result<Vec<RegionServices>, RegistryError> {
        self.store.list(Kind::Region)
    }

    /// Sets a region's services (none of either: the region has none of
    /// its own, and its record goes). Items enabled afterwards are placed
    /// on them; items placed already keep their services.
    pub async fn set_region_services(
        &self,
        services: RegionServices,
    ) -> Result<RegionServices, RegistryError> {
        self.check_region("region", &services.region)?;
        let _guard = self.write.lock().await;
        let mut writes = Writes::new();
        if services.cache.is_none() && services.processor.is_none() {
            writes.remove(Kind::Region, &services.region);
        } else {
            writes.put(Kind::Region, &services.region, &services)?;
        }
        self.store.commit(writes).await?;
        tracing::info!(region = %services.region, cache = ?services.cache,
            processor = ?services.processor, "region services set");
        Ok(services)
    }

    /// The cache an item's agent streams to: where it was placed, else
    /// registry's default.
    pub fn item_cache(&self, item: &ProtectedItem) -> Result<String, RegistryError> {
        match &item.cache_endpoint {
            Some(url) => Ok(url.clone()),
            None => self.cache_endpoint(),
        }
    }

    fn check_region(&self, field: &str, region: &str) -> Result<(), RegistryError> {
        if self.regions.contains(region) {
            return Ok(());
        }
        let known: Vec<&str> = self.regions.iter().map(String::as_str).collect();
        Err(RegistryError::invalid(format!(
            "unknown {field} {region:?}; known regions: {}",
            known.join(", ")
        )))
    }

    fn publish(&self, change: Change) {
        // No receiver is fine: nobody watches.
        let _ = self.changes.send(change);
    }

    // ---- VMs ---------------------------------------------------------------

    pub async fn register_vm(&self, vm: Vm) -> Result<Vm, RegistryError> {
        self.check_region("source region", &vm.source_region)?;
        let _guard = self.write.lock().await;
        if self.store.get::<Vm>(Kind::Vm, &vm.name)?.is_some() {
            return Err(RegistryError::AlreadyExists {
                kind: "VM",
                name: vm.name,
            });
        }
        let mut writes = Writes::new();
        writes.put(Kind::Vm, &vm.name, &vm)?;
        self.store.commit(writes).await?;
        tracing::info!(vm = %vm.name, region = %vm.source_region, disks = vm.disks.len(), "VM registered");
        Ok(vm)
    }

    pub fn get_vm(&self, name: &str) -> Result<Vm, RegistryError> {
        self.store
            .get(Kind::Vm, name)?
            .ok_or_else(|| RegistryError::not_found("VM", name))
    }

    pub fn list_vms(&self) -> Result<Vec<Vm>, RegistryError> {
        self.store.list(Kind::Vm)
    }

    pub async fn unregister_vm(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        self.get_vm(name)?;
        if let Some(item) = self.store.get::<ProtectedItem>(Kind::Item, name)? {
            return Err(RegistryError::precondition(format!(
                "VM {name:?} has replication enabled (state {}); disable replication first",
                item.state.name()
            )));
        }
        let mut writes = Writes::new();
        writes.remove(Kind::Vm, name);
        self.store.commit(writes).await
    }

    // ---- Protected items ---------------------------------------------------

    /// The target disks a VM's failovers create: its replica disks, and
    /// their `-test` copies for test failover. Two VMs in one target
    /// resource group must never share one (a failover would overwrite the
    /// other VM's disk): ALREADY_EXISTS, naming the override that fixes it.
    fn check_disk_names(
        &self,
        vm: &str,
        targets: &crate::model::Targets,
    ) -> Result<(), RegistryError> {
        let uses = |t: &crate::model::Targets| -> Vec<(String, String)> {
            t.replica_disks
                .iter()
                .flat_map(|d| {
                    [
                        (d.disk_id.clone(), d.name.clone()),
                        (d.disk_id.clone(), format!("{}-test", d.name)),
                    ]
                })
                .collect()
        };
        let mine = uses(targets);
        let mut seen = std::collections::BTreeMap::new();
        for (disk, name) in &mine {
            if let Some(other) = seen.insert(name.clone(), disk.clone()) {
                if other != *disk {
                    return Err(RegistryError::AlreadyExists {
                        kind: "target disk",
                        name: format!(
                            "{name} (disks {other:?} and {disk:?} of VM {vm:?} both map to it; \
                             give one of them replica_disk_names)"
                        ),
                    });
                }
            }
        }
        for item in self.store.list::<ProtectedItem>(Kind::Item)? {
            if item.vm_name == vm
                || item.target.region != targets.region
                || item.target.resource_group != targets.resource_group
            {
                continue;
            }
            for (_, theirs) in uses(&item.target) {
                if let Some(disk) = seen.get(&theirs) {
                    return Err(RegistryError::AlreadyExists {
                        kind: "target disk",
                        name: format!(
                            "{theirs} in {}/{} (VM {:?} uses it; disk {disk:?} of VM {vm:?} \
                             would map to it: give it replica_disk_names)",
                            targets.region, targets.resource_group, item.vm_name
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    pub async fn enable(&self, req: EnableRequest) -> Result<ProtectedItem, RegistryError> {
        self.check_region("target region", &req.target_region)?;
        let _guard = self.write.lock().await;
        let vm = self.get_vm(&req.vm_name)?;
        if req.target_region == vm.source_region {
            return Err(RegistryError::invalid(format!(
                "target region {:?} is VM {:?}'s source region; choose another region",
                req.target_region, vm.name
            )));
        }
        if let Some(item) = self.store.get::<ProtectedItem>(Kind::Item, &vm.name)? {
            return Err(RegistryError::AlreadyExists {
                kind: "protected item",
                name: format!("{} (state {})", item.vm_name, item.state.name()),
            });
        }

        let mut group = match &req.group {
            Some(name) => Some(
                self.store
                    .get::<Group>(Kind::Group, name)?
                    .ok_or_else(|| RegistryError::not_found("replication group", name))?,
            ),
            None => None,
        };
        let policy_name = match (&group, &req.policy) {
            (Some(g), Some(p)) if *p != g.policy => {
                return Err(RegistryError::invalid(format!(
                    "replication group {:?} uses policy {:?}; omit policy_name or give that one",
                    g.name, g.policy
                )))
            }
            (Some(g), _) => g.policy.clone(),
            (None, Some(p)) => p.clone(),
            (None, None) => Policy::DEFAULT_NAME.to_string(),
        };
        self.store
            .get::<Policy>(Kind::Policy, &policy_name)?
            .ok_or_else(|| RegistryError::not_found("policy", &policy_name))?;
        if let Some(g) = &group {
            if let Some(region) = &g.target_region {
                if !g.members.is_empty() && *region != req.target_region {
                    return Err(RegistryError::precondition(format!(
                        "replication group {:?} replicates into {region:?}; its members share one \
                         target region",
                        g.name
                    )));
                }
            }
        }

        let derivation = derive_targets(&vm, &req.target_region, &req.overrides, |id| {
            self.store.get::<NetworkMapping>(Kind::Mapping, id)
        })?;
        self.check_disk_names(&vm.name, &derivation.targets)?;

        let incarnation = self.last_incarnation()? + 1;
        let now = SystemTime::now();
        // Placed on the source region's cache and the target region's
        // processor, where they have their own.
        let source_services = self
            .store
            .get::<RegionServices>(Kind::Region, &vm.source_region)?;
        let target_services = self
            .store
            .get::<RegionServices>(Kind::Region, &req.target_region)?;
        let item = ProtectedItem {
            cache_endpoint: source_services.and_then(|s| s.cache),
            processor_endpoint: target_services.and_then(|s| s.processor),
            vm_name: vm.name.clone(),
            source: vm,
            policy: policy_name,
            group: req.group.clone(),
            target: derivation.targets,
            state: State::Enabling,
            state_reason: "replication enabled".into(),
            percent: 0,
            health_reports: Default::default(),
            rpo: None,
            rpo_reported_at: None,
            last_recovery_point: None,
            epoch: 0,
            backlog_bytes: 0,
            backlog_records: 0,
            revision: 1,
            created_at: now,
            updated_at: now,
            failed_over: false,
            incarnation,
            reprotection: None,
            fenced_writes: Vec::new(),
        };
        let mut writes = Writes::new();
        writes.put(Kind::Item, &item.vm_name, &item)?;
        writes.put(Kind::Counter, INCARNATION, &incarnation)?;
        for mapping in &derivation.new_mappings {
            writes.put(Kind::Mapping, &mapping.id(), mapping)?;
        }
        if let Some(g) = &mut group {
            g.members.insert(item.vm_name.clone());
            g.target_region = Some(req.target_region.clone());
            if g.coordinator.is_none() {
                g.coordinator = Some(item.vm_name.clone());
            }
            writes.put(Kind::Group, &g.name, g)?;
        }
        self.store.commit(writes).await?;
        tracing::info!(vm = %item.vm_name, target = %item.target.region, policy = %item.policy, "replication enabled");
        self.publish(Change::Upserted(item.clone()));
        Ok(item)
    }

    pub fn get_item(&self, vm: &str) -> Result<ProtectedItem, RegistryError> {
        self.store
            .get(Kind::Item, vm)?
            .ok_or_else(|| RegistryError::not_found("protected item", vm))
    }

    pub fn list_items(&self) -> Result<Vec<ProtectedItem>, RegistryError> {
        self.store.list(Kind::Item)
    }

    /// Moves the item to DISABLING (published), then removes it (published).
    pub async fn disable(&self, vm: &str) -> Result<ProtectedItem, RegistryError> {
        let _guard = self.write.lock().await;
        let mut item = self.get_item(vm)?;
        if !item.state.can_move_to(State::Disabling) {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is {}; replication can be disabled from ENABLING, INITIAL_REPLICATION, \
                 PROTECTED, RESYNC_REQUIRED, RESYNCING or COMMITTED",
                item.state.name()
            )));
        }
        item.state = State::Disabling;
        item.state_reason = "replication disabled".into();
        item.revision += 1;
        item.updated_at = SystemTime::now();
        let mut writes = Writes::new();
        writes.put(Kind::Item, vm, &item)?;
        self.store.commit(writes).await?;
        self.publish(Change::Upserted(item.clone()));

        let mut writes = Writes::new();
        writes.remove(Kind::Item, vm);
        writes.remove(Kind::Agent, vm);
        writes.remove(Kind::Enrollment, vm);
        if let Some(name) = &item.group {
            if let Some(mut group) = self.store.get::<Group>(Kind::Group, name)? {
                group.members.remove(vm);
                // The VM's agent knew the secret; the rest get a new one.
                group.secret = GroupSecret::generate()?;
                if group.coordinator.as_deref() == Some(vm) {
                    group.coordinator = group.members.iter().next().cloned();
                }
                if group.members.is_empty() {
                    group.target_region = None;
                }
                writes.put(Kind::Group, name, &group)?;
            }
        }
        self.store.commit(writes).await?;
        tracing::info!(vm, "replication disabled");
        self.publish(Change::Removed(item.clone()));
        Ok(item)
    }

    /// Loads an item, lets `f` change it (returning whether it did), and
    /// stores and publishes the result.
    async fn update_item(
        &self,
        vm: &str,
        f: impl FnOnce(&mut ProtectedItem) -> Result<bool, RegistryError>,
    ) -> Result<ProtectedItem, RegistryError> {
        let _guard = self.write.lock().await;
        let mut item = self.get_item(vm)?;
        if !f(&mut item)? {
            return Ok(item);
        }
        item.revision += 1;
        item.updated_at = SystemTime::now();
        let mut writes = Writes::new();
        writes.put(Kind::Item, vm, &item)?;
        self.store.commit(writes).await?;
        self.publish(Change::Upserted(item.clone()));
        Ok(item)
    }

    pub async fn transition(
        &self,
        vm: &str,
        t: Transition,
    ) -> Result<ProtectedItem, RegistryError> {
        if t.to == State::Disabling {
            return Err(RegistryError::invalid(
                "use DisableReplication to disable replication",
            ));
        }
        self.update_item(vm, |item| {
            if let Some(expected) = t.expected {
                if item.state != expected {
                    return Err(RegistryError::precondition(format!(
                        "VM {vm:?} is {}, not {}",
                        item.state.name(),
                        expected.name()
                    )));
                }
            }
            if !item.state.can_move_to(t.to) {
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} cannot move from {} to {}",
                    item.state.name(),
                    t.to.name()
                )));
            }
            if item.failed_over && t.to.source_active() {
                // FAILED_OVER -> FAILOVER_IN_PROGRESS -> PROTECTED would
                // re-activate a fenced source over a replica that has run.
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} has been failed over; its source cannot replicate again \
                     (from {} only FAILED_OVER or COMMITTED)",
                    item.state.name()
                )));
            }
            if item.state == t.to && !t.bump_epoch {
                return Ok(false);
            }
            if item.state != t.to {
                tracing::info!(vm, from = item.state.name(), to = t.to.name(), reason = %t.reason, "state change");
                item.percent = match t.to {
                    State::InitialReplication | State::Resyncing => 0,
                    State::Protected => 100,
                    _ => item.percent,
                };
                item.state = t.to;
                item.state_reason = t.reason;
                if t.to == State::FailedOver {
                    item.failed_over = true;
                }
            }
            if t.bump_epoch {
                item.epoch += 1;
            }
            Ok(true)
        })
        .await
    }

    pub async fn report_progress(
        &self,
        vm: &str,
        percent: u32,
    ) -> Result<ProtectedItem, RegistryError> {
        if percent > 100 {
            return Err(RegistryError::invalid(format!(
                "percent is {percent}; it must be 0 to 100"
            )));
        }
        self.update_item(vm, |item| {
            if !item.state.reports_progress() {
                return Err(RegistryError::precondition(format!(
                    "VM {vm:?} is {}; progress is reported only in INITIAL_REPLICATION or \
                     RESYNCING",
                    item.state.name()
                )));
            }
            let changed = item.percent != percent;
            item.percent = percent;
            Ok(changed)
        })
        .await
    }

    pub async fn report_health(
        &self,
        vm: &str,
        update: HealthUpdate,
    ) -> Result<ProtectedItem, RegistryError> {
        if !COMPONENTS.contains(&update.component.as_str()) {
            return Err(RegistryError::invalid(format!(
                "unknown component {:?}; one of {}",
                update.component,
                COMPONENTS.join(", ")
            )));
        }
        let from_agent = update.component == "agent";
        if from_agent {
            self.heard_agent(vm);
        }
        self.update_item(vm, |item| {
            if from_agent {
                // A heartbeat that says what the last one said changes
                // nothing but the time it was heard (refreshed each minute).
                let same = item.health_reports.get("agent").is_some_and(|r| {
                    r.health == update.health
                        && r.message == update.message
                        && r.reported_at
                            .elapsed()
                            .is_ok_and(|age| age < REPORT_REFRESH)
                });
                if same {
                    return Ok(false);
                }
            }
            item.health_reports.insert(
                update.component.clone(),
                HealthReport {
                    health: update.health,
                    message: update.message,
                    reported_at: SystemTime::now(),
                },
            );
            if let Some(rpo) = update.rpo {
                item.rpo = Some(rpo);
                item.rpo_reported_at = Some(SystemTime::now());
            }
            if let Some(t) = update.last_recovery_point {
                item.last_recovery_point = Some(t);
            }
            if let Some(b) = update.backlog_bytes {
                item.backlog_bytes = b;
            }
            if let Some(r) = update.backlog_records {
                item.backlog_records = r;
            }
            Ok(true)
        })
        .await
    }

    // ---- Agents ------------------------------------------------------------

    /// Registers the agent of `vm` if `proof` admits it (see
    /// [`crate::enrollment`]); a refusal changes nothing.
    pub async fn register_agent(
        &self,
        vm: &str,
        hostname: String,
        group_address: String,
        proof: Proof,
    ) -> Result<AgentGrant, RegistryError> {
        let _guard = self.write.lock().await;
        let mut item = self.get_item(vm)?;
        if !item.state.source_active() {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is {}; its source side is fenced and no agent may replicate it",
                item.state.name()
            )));
        }
        if let Some(r) = item.reprotection.as_ref().filter(|r| !r.seed_complete) {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is being re-protected (job {}): its reverse replica is still being \
                 seeded from the original disks; start the agent once that job has ended",
                r.job_id
            )));
        }
        let current = self.agent(vm)?;
        let outstanding = self.store.get::<EnrollmentRecord>(Kind::Enrollment, vm)?;
        let admission = enrollment::admit(
            vm,
            &proof,
            current.as_ref(),
            outstanding.as_ref(),
            self.enrollment_required,
            SystemTime::now(),
        )?;
        let mut writes = Writes::new();
        let credential = match (admission, proof.credential) {
            (Admission::Renewed, Some(credential)) => credential,
            (admission, _) => {
                if admission == Admission::Enrolled {
                    // One use only.
                    writes.remove(Kind::Enrollment, vm);
                }
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).map_err(|e| {
                    RegistryError::Internal(format!("no randomness for a credential: {e}"))
                })?;
                hex::encode(secret)
            }
        };
        item.epoch += 1;
        item.revision += 1;
        item.updated_at = SystemTime::now();
        let record = AgentRecord {
            vm_name: vm.to_string(),
            hostname,
            group_address,
            epoch: item.epoch,
            credential_sha256: hex::encode(Sha256::digest(credential.as_bytes())),
            registered_at: SystemTime::now(),
        };
        writes.put(Kind::Item, vm, &item)?;
        writes.put(Kind::Agent, vm, &record)?;
        self.store.commit(writes).await?;
        tracing::info!(vm, epoch = item.epoch, host = %record.hostname, how = ?admission, "agent registered");
        self.heard_agent(vm);
        self.publish(Change::Upserted(item.clone()));
        Ok(AgentGrant {
            epoch: item.epoch,
            item,
            credential,
        })
    }

    /// Issues a one-time enrollment token for the agent of `vm`, valid for
    /// `ttl` (zero: the default); it replaces an unused earlier one.
    pub async fn create_enrollment_token(
        &self,
        vm: &str,
        ttl: Duration,
    ) -> Result<(String, EnrollmentRecord), RegistryError> {
        let _guard = self.write.lock().await;
        let item = self.get_item(vm)?;
        if !item.state.source_active() {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is {}; its source side is fenced and no agent may enroll for it",
                item.state.name()
            )));
        }
        let (token, record) = enrollment::issue(vm, ttl, SystemTime::now())?;
        let mut writes = Writes::new();
        writes.put(Kind::Enrollment, vm, &record)?;
        self.store.commit(writes).await?;
        tracing::info!(vm, "agent enrollment token issued");
        Ok((token, record))
    }

    /// Checks an agent's credential and epoch; returns the protected item.
    pub fn verify_agent(
        &self,
        vm: &str,
        credential: &str,
        epoch: u64,
    ) -> Result<ProtectedItem, RegistryError> {
        let item = self.get_item(vm)?;
        let record = self.agent(vm)?;
        let presented = hex::encode(Sha256::digest(credential.as_bytes()));
        match record {
            Some(r) if constant_time_eq(r.credential_sha256.as_bytes(), presented.as_bytes()) => {
                if epoch < item.epoch || r.epoch != epoch {
                    return Err(RegistryError::precondition(format!(
                        "agent epoch {epoch} of VM {vm:?} is stale (current {}): a newer agent \
                         registered or the source was fenced",
                        item.epoch
                    )));
                }
                if !item.state.source_active() {
                    return Err(RegistryError::precondition(format!(
                        "VM {vm:?} is {}; its source side is fenced",
                        item.state.name()
                    )));
                }
                Ok(item)
            }
            _ => Err(RegistryError::PermissionDenied(format!(
                "the credential presented for VM {vm:?} is not the one registry issued to its \
                 agent; register the agent again"
            ))),
        }
    }

    /// The stored record of a VM's agent.
    pub fn agent(&self, vm: &str) -> Result<Option<AgentRecord>, RegistryError> {
        self.store.get(Kind::Agent, vm)
    }

    /// The cache endpoint handed to agents.
    pub fn cache_endpoint(&self) -> Result<String, RegistryError> {
        self.cache_endpoint.clone().ok_or_else(|| {
            RegistryError::precondition(
                "registry has no cache endpoint configured; start registry-svc with --cache URL",
            )
        })
    }

    // ---- Policies ----------------------------------------------------------

    pub async fn create_policy(&self, policy: Policy) -> Result<Policy, RegistryError> {
        let _guard = self.write.lock().await;
        if self
            .store
            .get::<Policy>(Kind::Policy, &policy.name)?
            .is_some()
        {
            return Err(RegistryError::AlreadyExists {
                kind: "policy",
                name: policy.name,
            });
        }
        let mut writes = Writes::new();
        writes.put(Kind::Policy, &policy.name, &policy)?;
        self.store.commit(writes).await?;
        Ok(policy)
    }

    pub fn get_policy(&self, name: &str) -> Result<Policy, RegistryError> {
        self.store
            .get(Kind::Policy, name)?
            .ok_or_else(|| RegistryError::not_found("policy", name))
    }

    pub fn list_policies(&self) -> Result<Vec<Policy>, RegistryError> {
        self.store.list(Kind::Policy)
    }

    pub async fn delete_policy(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        self.get_policy(name)?;
        if name == Policy::DEFAULT_NAME {
            return Err(RegistryError::precondition(
                "the default policy cannot be deleted",
            ));
        }
        if let Some(item) = self.list_items()?.into_iter().find(|i| i.policy == name) {
            return Err(RegistryError::precondition(format!(
                "policy {name:?} is used by protected VM {:?}",
                item.vm_name
            )));
        }
        if let Some(group) = self.list_groups()?.into_iter().find(|g| g.policy == name) {
            return Err(RegistryError::precondition(format!(
                "policy {name:?} is used by replication group {:?}",
                group.name
            )));
        }
        let mut writes = Writes::new();
        writes.remove(Kind::Policy, name);
        self.store.commit(writes).await
    }

    // ---- Network mappings --------------------------------------------------

    pub async fn create_mapping(
        &self,
        mapping: NetworkMapping,
    ) -> Result<(NetworkMapping, NetworkMapping), RegistryError> {
        self.check_region("source region", &mapping.source_region)?;
        self.check_region("target region", &mapping.target_region)?;
        if mapping.source_region == mapping.target_region {
            return Err(RegistryError::invalid(
                "a network mapping joins two different regions",
            ));
        }
        let _guard = self.write.lock().await;
        let reverse = mapping.reverse();
        if let Some(existing) = self
            .store
            .get::<NetworkMapping>(Kind::Mapping, &mapping.id())?
        {
            return Err(RegistryError::AlreadyExists {
                kind: "network mapping",
                name: format!("{} (to {})", existing.id(), existing.target_network),
            });
        }
        if let Some(existing) = self
            .store
            .get::<NetworkMapping>(Kind::Mapping, &reverse.id())?
        {
            return Err(RegistryError::AlreadyExists {
                kind: "network mapping",
                name: format!("{} (to {})", existing.id(), existing.target_network),
            });
        }
        let mut writes = Writes::new();
        writes.put(Kind::Mapping, &mapping.id(), &mapping)?;
        writes.put(Kind::Mapping, &reverse.id(), &reverse)?;
        self.store.commit(writes).await?;
        Ok((mapping, reverse))
    }

    pub fn list_mappings(&self) -> Result<Vec<NetworkMapping>, RegistryError> {
        self.store.list(Kind::Mapping)
    }

    pub async fn delete_mapping(&self, id: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        let mapping = self
            .store
            .get::<NetworkMapping>(Kind::Mapping, id)?
            .ok_or_else(|| RegistryError::not_found("network mapping", id))?;
        let reverse_id = mapping.reverse().id();
        if let Some(item) = self.list_items()?.into_iter().find(|i| {
            i.target.network_mapping == id
                || i.target.reverse_network_mapping == id
                || i.target.network_mapping == reverse_id
                || i.target.reverse_network_mapping == reverse_id
        }) {
            return Err(RegistryError::precondition(format!(
                "network mapping {id:?} is used by protected VM {:?}",
                item.vm_name
            )));
        }
        let mut writes = Writes::new();
        writes.remove(Kind::Mapping, id);
        writes.remove(Kind::Mapping, &reverse_id);
        self.store.commit(writes).await
    }

    // ---- Replication groups ------------------------------------------------

    pub async fn create_group(&self, name: String, policy: String) -> Result<Group, RegistryError> {
        let _guard = self.write.lock().await;
        if self.store.get::<Group>(Kind::Group, &name)?.is_some() {
            return Err(RegistryError::AlreadyExists {
                kind: "replication group",
                name,
            });
        }
        let p = self.get_policy(&policy)?;
        if !p.multi_vm_consistency {
            return Err(RegistryError::precondition(format!(
                "policy {policy:?} has multi-VM consistency off; a replication group needs a \
                 policy with it on"
            )));
        }
        let group = Group {
            name,
            policy,
            target_region: None,
            members: BTreeSet::new(),
            coordinator: None,
            created_at: SystemTime::now(),
            secret: GroupSecret::generate()?,
        };
        let mut writes = Writes::new();
        writes.put(Kind::Group, &group.name, &group)?;
        self.store.commit(writes).await?;
        Ok(group)
    }

    pub fn get_group(&self, name: &str) -> Result<Group, RegistryError> {
        self.store
            .get(Kind::Group, name)?
            .ok_or_else(|| RegistryError::not_found("replication group", name))
    }

    pub fn list_groups(&self) -> Result<Vec<Group>, RegistryError> {
        self.store.list(Kind::Group)
    }

    pub async fn delete_group(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.write.lock().await;
        let group = self.get_group(name)?;
        if !group.members.is_empty() {
            return Err(RegistryError::precondition(format!(
                "replication group {name:?} still has {} member(s); disable their replication first",
                group.members.len()
            )));
        }
        let mut writes = Writes::new();
        writes.remove(Kind::Group, name);
        self.store.commit(writes).await
    }

    /// A group member's agent is alive at `address`: records it and returns
    /// its group, passing the coordinator role on first when the coordinator
    /// has been silent for the lease (to the next live member by name, after
    /// the silent one).
    pub async fn group_heartbeat(
        &self,
        vm: &str,
        credential: &str,
        epoch: u64,
        address: String,
    ) -> Result<GroupView, RegistryError> {
        let item = self.verify_agent(vm, credential, epoch)?;
        let Some(name) = item.group.clone() else {
            return Err(RegistryError::precondition(format!(
                "VM {vm:?} is in no replication group"
            )));
        };
        let now = Instant::now();
        if let Ok(mut beats) = self.heartbeats.lock() {
            beats.insert(vm.to_string(), (now, address));
        }
        self.heard_agent(vm);
        let alive = |member: &str| -> bool {
            self.heartbeats
                .lock()
                .ok()
                .and_then(|b| {
                    b.get(member)
                        .map(|(at, _)| now.duration_since(*at) < self.lease)
                })
                // Before registry has been up a lease, nobody is presumed gone.
                .unwrap_or(now.duration_since(self.started) < self.lease)
        };
        let mut group = self.get_group(&name)?;
        if group.secret.is_empty() {
            // A group stored before groups had secrets.
            let _guard = self.write.lock().await;
            group = self.get_group(&name)?;
            if group.secret.is_empty() {
                group.secret = GroupSecret::generate()?;
                let mut writes = Writes::new();
                writes.put(Kind::Group, &name, &group)?;
                self.store.commit(writes).await?;
            }
        }
        let silent = group.coordinator.as_deref().is_none_or(|c| !alive(c));
        if silent {
            let _guard = self.write.lock().await;
            group = self.get_group(&name)?;
            let current = group.coordinator.clone();
            if current.as_deref().is_none_or(|c| !alive(c)) {
                let after = current.clone().unwrap_or_default();
                let next = group
                    .members
                    .range::<String, _>((
                        std::ops::Bound::Excluded(&after),
                        std::ops::Bound::Unbounded,
                    ))
                    .chain(group.members.iter())
                    .find(|m| alive(m))
                    .cloned();
                if next.is_some() && next != current {
                    tracing::warn!(group = %name, from = ?current, to = ?next, "coordinator silent past its lease; passing the role on");
                    group.coordinator = next;
                    let mut writes = Writes::new();
                    writes.put(Kind::Group, &name, &group)?;
                    self.store.commit(writes).await?;
                }
            }
        }
        let beats = self
            .heartbeats
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        let members = group
            .members
            .iter()
            .map(|m| {
                let address = beats
                    .get(m)
                    .map(|(_, a)| a.clone())
                    .or_else(|| self.agent(m).ok().flatten().map(|r| r.group_address));
                (m.clone(), address.unwrap_or_default(), alive(m))
            })
            .collect();
        let policy = self.get_policy(&group.policy)?;
        Ok(GroupView {
            group,
            members,
            multi_vm_interval: policy.multi_vm_interval,
            lease: self.lease,
        })
    }

    // ---- Watch -------------------------------------------------------------

    /// The current items and a receiver of every later change, taken together
    /// under the write lock so that nothing falls between them.
    pub async fn subscribe(&self) -> Result<Subscription, RegistryError> {
        let _guard = self.write.lock().await;
        let changes = self.changes.subscribe();
        Ok(Subscription {
            items: self.list_items()?,
            last_incarnation: self.last_incarnation()?,
            changes,
        })
    }

    /// The highest incarnation ever issued (0 before the first enable).
    /// Items enabled before incarnations existed count as 0.
    pub fn last_incarnation(&self) -> Result<u64, RegistryError> {
        Ok(self
            .store
            .get::<u64>(Kind::Counter, INCARNATION)?
            .unwrap_or(0))
    }
}
