//! The gRPC face of the registry: validates requests into domain types, calls
//! [`Registry`], and turns results back into protobuf.

use std::sync::Arc;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_server::Registry as RegistryApi;
use ferry_runtime::security::audit::{self, Target};
use ferry_runtime::security::Caller;
use ferry_runtime::time::{from_duration, from_timestamp};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::enrollment::Proof;
use crate::lifecycle::State;
use crate::model::{
    check_name, role_from_proto, role_to_proto, EnableRequest, Health, NetworkMapping, Policy, Vm,
};
use crate::registry::{Change, HealthUpdate, Registry, Transition};

/// Events buffered per watcher before the registry waits for it.
const WATCH_BUFFER: usize = 64;

/// The tonic service.
#[derive(Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl RegistryService {
    /// Whether the caller is the agent of a VM in the same replication
    /// group as `vm`.
    fn same_group(&self, caller: &Caller, vm: &str) -> bool {
        let Caller::Known(ferry_runtime::security::Principal::Agent { vm: own }) = caller else {
            return false;
        };
        let group_of = |name: &str| self.registry.get_item(name).ok().and_then(|i| i.group);
        matches!((group_of(own.as_str()), group_of(vm)), (Some(a), Some(b)) if a == b)
    }

    pub fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        RegistryService { registry, shutdown }
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

fn name(field: &str, value: &str) -> std::result::Result<(), Status> {
    check_name(field, value).map_err(Status::from)?;
    if field == "VM name" {
        ferry_runtime::trace_context::record_vm(value);
    }
    Ok(())
}

fn item(i: &crate::model::ProtectedItem) -> pb::ProtectedItem {
    pb::ProtectedItem::from(i)
}

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn list_regions(
        &self,
        _: Request<pb::ListRegionsRequest>,
    ) -> Result<pb::ListRegionsResponse> {
        Ok(Response::new(pb::ListRegionsResponse {
            regions: self.registry.regions().iter().cloned().collect(),
            services: self
                .registry
                .region_services()?
                .iter()
                .map(pb::RegionServices::from)
                .collect(),
        }))
    }

    async fn set_region_services(
        &self,
        request: Request<pb::SetRegionServicesRequest>,
    ) -> Result<pb::RegionServices> {
        let services = request
            .into_inner()
            .services
            .ok_or_else(|| Status::invalid_argument("services is missing"))?;
        let services = crate::model::RegionServices::try_from(services)?;
        let set = self.registry.set_region_services(services).await?;
        Ok(Response::new(pb::RegionServices::from(&set)))
    }

    async fn register_vm(&self, request: Request<pb::RegisterVmRequest>) -> Result<pb::Vm> {
        audit::target(
            &request,
            Target::vm(
                request
                    .get_ref()
                    .vm
                    .as_ref()
                    .map(|v| v.name.clone())
                    .unwrap_or_default(),
            ),
        );
        let vm = request
            .into_inner()
            .vm
            .ok_or_else(|| Status::invalid_argument("vm is missing"))?;
        let vm = Vm::try_from(vm)?;
        ferry_runtime::trace_context::record_vm(&vm.name);
        let vm = self.registry.register_vm(vm).await?;
        Ok(Response::new(pb::Vm::from(&vm)))
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<pb::Vm> {
        let req = request.into_inner();
        name("VM name", &req.name)?;
        Ok(Response::new(pb::Vm::from(
            &self.registry.get_vm(&req.name)?,
        )))
    }

    async fn list_vms(&self, _: Request<pb::ListVmsRequest>) -> Result<pb::ListVmsResponse> {
        let vms = self.registry.list_vms()?;
        Ok(Response::new(pb::ListVmsResponse {
            vms: vms.iter().map(pb::Vm::from).collect(),
        }))
    }

    async fn unregister_vm(
        &self,
        request: Request<pb::UnregisterVmRequest>,
    ) -> Result<pb::UnregisterVmResponse> {
        audit::target(&request, Target::vm(&request.get_ref().name));
        let req = request.into_inner();
        name("VM name", &req.name)?;
        self.registry.unregister_vm(&req.name).await?;
        Ok(Response::new(pb::UnregisterVmResponse {}))
    }

    async fn enable_replication(
        &self,
        request: Request<pb::EnableReplicationRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = EnableRequest::try_from(request.into_inner())?;
        ferry_runtime::trace_context::record_vm(&req.vm_name);
        Ok(Response::new(item(&self.registry.enable(req).await?)))
    }

    async fn get_protected_item(
        &self,
        request: Request<pb::GetProtectedItemRequest>,
    ) -> Result<pb::ProtectedItem> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        Ok(Response::new(item(&self.registry.get_item(&req.vm_name)?)))
    }

    async fn list_protected_items(
        &self,
        _: Request<pb::ListProtectedItemsRequest>,
    ) -> Result<pb::ListProtectedItemsResponse> {
        let items = self.registry.list_items()?;
        Ok(Response::new(pb::ListProtectedItemsResponse {
            items: items.iter().map(item).collect(),
        }))
    }

    async fn disable_replication(
        &self,
        request: Request<pb::DisableReplicationRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        Ok(Response::new(item(
            &self.registry.disable(&req.vm_name).await?,
        )))
    }

    type WatchProtectedItemsStream =
        ReceiverStream<std::result::Result<pb::ProtectedItemEvent, Status>>;

    async fn watch_protected_items(
        &self,
        request: Request<pb::WatchProtectedItemsRequest>,
    ) -> Result<Self::WatchProtectedItemsStream> {
        let req = request.into_inner();
        let filter = if req.vm_name.is_empty() {
            None
        } else {
            name("VM name", &req.vm_name)?;
            Some(req.vm_name)
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch(
            self.registry.clone(),
            filter,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn reprotect_item(
        &self,
        request: Request<pb::ReprotectItemRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        let disks = req
            .disks
            .into_iter()
            .map(crate::model::DiskAt::try_from)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let turned = self
            .registry
            .reprotect(crate::registry::ReprotectRequest {
                vm_name: req.vm_name,
                incarnation: req.incarnation,
                disks,
                job_id: req.job_id,
            })
            .await?;
        Ok(Response::new(item(&turned)))
    }

    async fn report_fenced_writes(
        &self,
        request: Request<pb::ReportFencedWritesRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        let ranges = req
            .ranges
            .into_iter()
            .map(crate::model::ChangedRange::try_from)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let reported = self
            .registry
            .report_fenced_writes(&req.vm_name, req.epoch, ranges)
            .await?;
        Ok(Response::new(item(&reported)))
    }

    async fn complete_reprotect_seed(
        &self,
        request: Request<pb::CompleteReprotectSeedRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        let done = self
            .registry
            .complete_reprotect_seed(&req.vm_name, req.incarnation, req.summary)
            .await?;
        Ok(Response::new(item(&done)))
    }

    async fn transition_state(
        &self,
        request: Request<pb::TransitionStateRequest>,
    ) -> Result<pb::ProtectedItem> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        let to = State::from_pb(req.to).ok_or_else(|| {
            Status::invalid_argument(format!("`to` must be a replication state, got {}", req.to))
        })?;
        let expected =
            match req.expected_state {
                0 => None,
                n => Some(State::from_pb(n).ok_or_else(|| {
                    Status::invalid_argument(format!("unknown expected_state {n}"))
                })?),
            };
        let t = Transition {
            to,
            expected,
            reason: req.reason,
            bump_epoch: req.bump_epoch,
        };
        Ok(Response::new(item(
            &self.registry.transition(&req.vm_name, t).await?,
        )))
    }

    async fn report_replication_progress(
        &self,
        request: Request<pb::ReportReplicationProgressRequest>,
    ) -> Result<pb::ProtectedItem> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        Ok(Response::new(item(
            &self
                .registry
                .report_progress(&req.vm_name, req.percent)
                .await?,
        )))
    }

    async fn report_health(
        &self,
        request: Request<pb::ReportHealthRequest>,
    ) -> Result<pb::ProtectedItem> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        if let Err(refused) = caller.check_vm(&req.vm_name) {
            // A group's coordinator reports the group's health on every
            // member; nothing else about another VM.
            if !(req.component == "group" && self.same_group(&caller, &req.vm_name)) {
                return Err(refused.into());
            }
        }
        let health = Health::from_pb(req.health).ok_or_else(|| {
            Status::invalid_argument("health must be NORMAL, WARNING or CRITICAL")
        })?;
        let rpo = req
            .rpo
            .map(|d| {
                from_duration(&d)
                    .ok_or_else(|| Status::invalid_argument("rpo is negative or malformed"))
            })
            .transpose()?;
        let last = req
            .last_recovery_point_time
            .map(|t| {
                from_timestamp(&t).ok_or_else(|| {
                    Status::invalid_argument("last_recovery_point_time is malformed")
                })
            })
            .transpose()?;
        let update = HealthUpdate {
            component: req.component,
            health,
            message: req.message,
            rpo,
            last_recovery_point: last,
            backlog_bytes: req.backlog_bytes,
            backlog_records: req.backlog_records,
        };
        Ok(Response::new(item(
            &self.registry.report_health(&req.vm_name, update).await?,
        )))
    }

    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<pb::RegisterAgentResponse> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        // Known before anything changes: an agent is never registered
        // without a cache to stream to.
        let cache_endpoint = match self.registry.get_item(&req.vm_name) {
            Ok(item) => self.registry.item_cache(&item)?,
            Err(_) => self.registry.cache_endpoint()?,
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let proof = Proof {
            credential: non_empty(req.credential),
            enrollment_token: non_empty(req.enrollment_token),
        };
        let grant = self
            .registry
            .register_agent(&req.vm_name, req.hostname, req.group_address, proof)
            .await?;
        Ok(Response::new(pb::RegisterAgentResponse {
            cache_endpoint,
            disks: grant.item.source.disks.iter().map(pb::Disk::from).collect(),
            epoch: grant.epoch,
            credential: grant.credential,
            item: Some(item(&grant.item)),
        }))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<pb::CreateEnrollmentTokenRequest>,
    ) -> Result<pb::EnrollmentToken> {
        audit::target(&request, Target::vm(&request.get_ref().vm_name));
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        let ttl = std::time::Duration::from_secs(u64::from(req.ttl_seconds));
        let (token, record) = self
            .registry
            .create_enrollment_token(&req.vm_name, ttl)
            .await?;
        Ok(Response::new(pb::EnrollmentToken {
            vm_name: record.vm_name,
            token,
            expires_at: Some(ferry_runtime::time::to_timestamp(record.expires_at)),
        }))
    }

    async fn group_heartbeat(
        &self,
        request: Request<pb::GroupHeartbeatRequest>,
    ) -> Result<pb::GroupHeartbeatResponse> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        caller.check_vm(&req.vm_name)?;
        let view = self
            .registry
            .group_heartbeat(&req.vm_name, &req.credential, req.epoch, req.group_address)
            .await?;
        Ok(Response::new(pb::GroupHeartbeatResponse {
            group: Some(pb::ReplicationGroup::from(&view.group)),
            members: view
                .members
                .into_iter()
                .map(|(vm_name, group_address, alive)| pb::GroupMember {
                    vm_name,
                    group_address,
                    alive,
                })
                .collect(),
            multi_vm_interval: Some(ferry_runtime::time::to_duration(view.multi_vm_interval)),
            coordinator_lease: Some(ferry_runtime::time::to_duration(view.lease)),
            group_secret: view.group.secret.bytes(),
        }))
    }

    async fn verify_agent(
        &self,
        request: Request<pb::VerifyAgentRequest>,
    ) -> Result<pb::ProtectedItem> {
        let req = request.into_inner();
        name("VM name", &req.vm_name)?;
        Ok(Response::new(item(&self.registry.verify_agent(
            &req.vm_name,
            &req.credential,
            req.epoch,
        )?)))
    }

    async fn create_policy(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> Result<pb::ReplicationPolicy> {
        audit::target(
            &request,
            Target::policy(
                request
                    .get_ref()
                    .policy
                    .as_ref()
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
            ),
        );
        let policy = request
            .into_inner()
            .policy
            .ok_or_else(|| Status::invalid_argument("policy is missing"))?;
        let policy = self
            .registry
            .create_policy(Policy::try_from(policy)?)
            .await?;
        Ok(Response::new(pb::ReplicationPolicy::from(&policy)))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<pb::ReplicationPolicy> {
        let req = request.into_inner();
        name("policy name", &req.name)?;
        Ok(Response::new(pb::ReplicationPolicy::from(
            &self.registry.get_policy(&req.name)?,
        )))
    }

    async fn list_policies(
        &self,
        _: Request<pb::ListPoliciesRequest>,
    ) -> Result<pb::ListPoliciesResponse> {
        let policies = self.registry.list_policies()?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: policies.iter().map(pb::ReplicationPolicy::from).collect(),
            default_policy: Policy::DEFAULT_NAME.into(),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<pb::DeletePolicyResponse> {
        audit::target(&request, Target::policy(&request.get_ref().name));
        let req = request.into_inner();
        name("policy name", &req.name)?;
        self.registry.delete_policy(&req.name).await?;
        Ok(Response::new(pb::DeletePolicyResponse {}))
    }

    async fn create_network_mapping(
        &self,
        request: Request<pb::CreateNetworkMappingRequest>,
    ) -> Result<pb::CreateNetworkMappingResponse> {
        audit::target(
            &request,
            Target::mapping(format!(
                "{}/{}",
                request.get_ref().source_region,
                request.get_ref().source_network
            )),
        );
        let mapping = NetworkMapping::try_from(request.into_inner())?;
        let (mapping, reverse) = self.registry.create_mapping(mapping).await?;
        Ok(Response::new(pb::CreateNetworkMappingResponse {
            mapping: Some(pb::NetworkMapping::from(&mapping)),
            reverse: Some(pb::NetworkMapping::from(&reverse)),
        }))
    }

    async fn list_network_mappings(
        &self,
        _: Request<pb::ListNetworkMappingsRequest>,
    ) -> Result<pb::ListNetworkMappingsResponse> {
        let mappings = self.registry.list_mappings()?;
        Ok(Response::new(pb::ListNetworkMappingsResponse {
            mappings: mappings.iter().map(pb::NetworkMapping::from).collect(),
        }))
    }

    async fn delete_network_mapping(
        &self,
        request: Request<pb::DeleteNetworkMappingRequest>,
    ) -> Result<pb::DeleteNetworkMappingResponse> {
        audit::target(&request, Target::mapping(&request.get_ref().id));
        let req = request.into_inner();
        if req.id.is_empty() {
            return Err(Status::invalid_argument("id is empty"));
        }
        self.registry.delete_mapping(&req.id).await?;
        Ok(Response::new(pb::DeleteNetworkMappingResponse {}))
    }

    async fn create_replication_group(
        &self,
        request: Request<pb::CreateReplicationGroupRequest>,
    ) -> Result<pb::ReplicationGroup> {
        audit::target(
            &request,
            Target::group(&request.get_ref().name)
                .and(Target::policy(&request.get_ref().policy_name)),
        );
        let req = request.into_inner();
        name("replication group name", &req.name)?;
        name("policy name", &req.policy_name)?;
        let group = self
            .registry
            .create_group(req.name, req.policy_name)
            .await?;
        Ok(Response::new(pb::ReplicationGroup::from(&group)))
    }

    async fn get_replication_group(
        &self,
        request: Request<pb::GetReplicationGroupRequest>,
    ) -> Result<pb::ReplicationGroup> {
        let req = request.into_inner();
        name("replication group name", &req.name)?;
        Ok(Response::new(pb::ReplicationGroup::from(
            &self.registry.get_group(&req.name)?,
        )))
    }

    async fn list_replication_groups(
        &self,
        _: Request<pb::ListReplicationGroupsRequest>,
    ) -> Result<pb::ListReplicationGroupsResponse> {
        let groups = self.registry.list_groups()?;
        Ok(Response::new(pb::ListReplicationGroupsResponse {
            groups: groups.iter().map(pb::ReplicationGroup::from).collect(),
        }))
    }

    async fn delete_replication_group(
        &self,
        request: Request<pb::DeleteReplicationGroupRequest>,
    ) -> Result<pb::DeleteReplicationGroupResponse> {
        audit::target(&request, Target::group(&request.get_ref().name));
        let req = request.into_inner();
        name("replication group name", &req.name)?;
        self.registry.delete_group(&req.name).await?;
        Ok(Response::new(pb::DeleteReplicationGroupResponse {}))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<pb::CreateTokenResponse> {
        audit::target(&request, Target::token(&request.get_ref().name));
        let req = request.into_inner();
        name("token name", &req.name)?;
        let role = role_from_proto(req.role).ok_or_else(|| {
            Status::invalid_argument("role is missing or unknown: give reader, operator or admin")
        })?;
        let (token, record) = self.registry.tokens().create(&req.name, role).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            info: Some(pb::TokenInfo::from(&record)),
        }))
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<pb::ListTokensResponse> {
        let tokens = self.registry.tokens().list()?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(pb::TokenInfo::from).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<pb::RevokeTokenResponse> {
        audit::target(&request, Target::token(&request.get_ref().name));
        let req = request.into_inner();
        name("token name", &req.name)?;
        self.registry.tokens().revoke(&req.name).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn authenticate_token(
        &self,
        request: Request<pb::AuthenticateTokenRequest>,
    ) -> Result<pb::AuthenticateTokenResponse> {
        let req = request.into_inner();
        let (name, role) = self.registry.tokens().authenticate(&req.token)?;
        Ok(Response::new(pb::AuthenticateTokenResponse {
            name,
            role: role_to_proto(role) as i32,
        }))
    }
}

type EventSender = mpsc::Sender<std::result::Result<pb::ProtectedItemEvent, Status>>;

fn event(
    kind: pb::EventKind,
    item: Option<&crate::model::ProtectedItem>,
    last_incarnation: u64,
) -> pb::ProtectedItemEvent {
    pb::ProtectedItemEvent {
        kind: kind as i32,
        item: item.map(pb::ProtectedItem::from),
        last_incarnation,
    }
}

/// Sends one event unless shutdown comes first; false when the watch is over.
async fn send(tx: &EventSender, ev: pb::ProtectedItemEvent, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        sent = tx.send(Ok(ev)) => sent.is_ok(),
        _ = shutdown.cancelled() => {
            let _ = tx.try_send(Err(Status::unavailable("registry is shutting down; watch again")));
            false
        }
    }
}

/// Feeds one watcher: a snapshot, SYNCED, then live changes. A watcher that
/// falls more than the change buffer behind gets a fresh snapshot.
async fn watch(
    registry: Arc<Registry>,
    filter: Option<String>,
    tx: EventSender,
    shutdown: CancellationToken,
) {
    let wanted = |vm: &str| filter.as_deref().is_none_or(|f| f == vm);
    loop {
        let crate::registry::Subscription {
            items,
            mut last_incarnation,
            mut changes,
        } = match registry.subscribe().await {
            Ok(s) => s,
            Err(err) => {
                let _ = tx.send(Err(Status::from(err))).await;
                return;
            }
        };
        for i in items.iter().filter(|i| wanted(&i.vm_name)) {
            let ev = event(pb::EventKind::Snapshot, Some(i), last_incarnation);
            if !send(&tx, ev, &shutdown).await {
                return;
            }
        }
        let synced = event(pb::EventKind::Synced, None, last_incarnation);
        if !send(&tx, synced, &shutdown).await {
            return;
        }
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tx.try_send(Err(Status::unavailable("registry is shutting down; watch again")));
                    return;
                }
                _ = tx.closed() => return,
                change = changes.recv() => change,
            };
            match change {
                Ok(change) if wanted(&change.item().vm_name) => {
                    let kind = match change {
                        Change::Upserted(_) => pb::EventKind::Upserted,
                        Change::Removed(_) => pb::EventKind::Removed,
                    };
                    last_incarnation = last_incarnation.max(change.item().incarnation);
                    let ev = event(kind, Some(change.item()), last_incarnation);
                    if !send(&tx, ev, &shutdown).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "watcher fell behind; sending a fresh snapshot");
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
