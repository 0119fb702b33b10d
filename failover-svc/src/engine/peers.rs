//! What the engine asks of its peers — registry, processor-svc and the
//! source region's cache (optional) — as one trait over domain types, so
//! the engine never builds a proto request and can be tested with a fake.
//! [`Tonic`] is the real one, over the gRPC clients. A peer's refusal comes
//! back as [`FailoverError::Peer`] with the peer's status, so the engine
//! can tell NOT_FOUND from the rest.

use std::pin::Pin;

use bytes::Bytes;
use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::ids::{JobId, MacAddr, UnixNanos, VmName};
use ferry_proto::processor::v1 as proc;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::{PeerChannel, Refused};
use tokio_stream::{Stream, StreamExt};

/// Registry's lifecycle states: the generated enum itself (a Rust enum,
/// checked on receipt; an unknown number is refused), not a raw i32.
pub use reg::ReplicationState;

use crate::error::FailoverError;
use crate::inventory::{Firmware, KernelBoot, Shape};

type Result<T> = std::result::Result<T, FailoverError>;

/// Where a protected VM fails over to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetResources {
    pub region: String,
    pub resource_group: String,
    pub virtual_network: String,
    pub subnet: String,
    pub availability_set: String,
    /// Each replica disk's name, by source disk id.
    pub replica_disks: Vec<(String, String)>,
}

/// A NIC of the source VM.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceNic {
    pub name: String,
    pub private_ip: String,
    /// None: derived from the VM's and NIC's names at failover.
    pub mac_address: Option<MacAddr>,
}

/// A protected VM as registry has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub vm_name: VmName,
    pub state: ReplicationState,
    /// Empty when the VM is in no group.
    pub replication_group: String,
    pub target: TargetResources,
    /// The source VM's disk ids, in its order.
    pub source_disks: Vec<String>,
    pub source_nics: Vec<SourceNic>,
    /// The source's OS disk, if it names one.
    pub os_disk: Option<String>,
    /// Its size and how it boots.
    pub shape: Shape,
    /// Which enabling of replication this is (registry's incarnation).
    pub incarnation: u64,
    /// The source disks' sizes and images, in its order.
    pub disks: Vec<SourceDisk>,
    /// Set on an item made by re-protect.
    pub reprotection: Option<Reprotection>,
}

/// A source disk: its id, size and image (on its host).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDisk {
    pub id: String,
    pub size_bytes: u64,
    pub path: std::path::PathBuf,
}

/// What a re-protected item replicates back to.
#[derive(Debug, Clone, PartialEq)]
pub struct Reprotection {
    /// The committed incarnation it turned around.
    pub from_incarnation: u64,
    /// The region the VM ran in before that failover: the target now.
    pub original_region: String,
    /// The disks it ran from there, by id.
    pub original_disks: Vec<(String, std::path::PathBuf)>,
    /// The reverse replica holds its seed.
    pub seed_complete: bool,
    /// The re-protect job.
    pub job_id: String,
    /// What the original side wrote after the fence (disk, offset,
    /// length): sent again whatever the digests say.
    pub distrusted: Vec<(String, u64, u64)>,
}

/// Bytes of an original disk, for a reverse replica's seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedChunk {
    pub disk_id: String,
    pub offset: u64,
    pub data: Bytes,
}

/// A replication group.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub members: Vec<String>,
}

/// A disk of a point.
#[derive(Debug, Clone, PartialEq)]
pub struct PointDisk {
    pub disk_id: String,
    pub size_bytes: u64,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: String,
    pub vm_name: String,
    pub time: UnixNanos,
    pub sequence_cut: u64,
    pub disks: Vec<PointDisk>,
    /// The bookmark (or planned job's final marker) it was cut at, if any.
    pub bookmark_id: String,
}

/// Which points to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointKind {
    Any,
    AppConsistent,
    MultiVm,
}

/// A multi-VM point: one point per member at a bookmark.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPoint {
    pub bookmark_id: String,
    pub points: Vec<Point>,
}

/// A piece of a disk as read from a point: its data, or a hole (None).
#[derive(Debug, Clone, PartialEq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub data: Option<Bytes>,
    pub crc32c: u32,
}

/// A disk's extents, in order.
pub type Extents = Pin<Box<dyn Stream<Item = Result<Extent>> + Send>>;

/// A disk's digest at a point, as the processor computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Digest {
    pub algorithm: String,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub sha256: Vec<u8>,
}

/// Everything the engine asks of other services.
#[tonic::async_trait]
pub trait Peers: Send + Sync {
    /// A protected VM.
    async fn item(&self, vm: &VmName) -> Result<Item>;
    /// Moves a VM to `to`, raising its epoch if `bump_epoch` (fencing).
    async fn transition(
        &self,
        vm: &VmName,
        to: ReplicationState,
        bump_epoch: bool,
        reason: &str,
    ) -> Result<()>;
    /// A replication group.
    async fn group(&self, name: &str) -> Result<Group>;
    /// A point of a VM.
    async fn point(&self, vm: &VmName, id: &str) -> Result<Point>;
    /// A VM's points, newest first; `limit` 0 for all.
    async fn points(&self, vm: &VmName, kind: PointKind, limit: u32) -> Result<Vec<Point>>;
    /// Cuts a point now (the cache's latest).
    async fn cut_point(&self, vm: &VmName) -> Result<Point>;
    /// A group's multi-VM points, newest first.
    async fn group_points(&self, group: &str) -> Result<Vec<GroupPoint>>;
    /// Pins a point for `holder` (retention keeps it).
    async fn pin(&self, vm: &VmName, point: &str, holder: &JobId) -> Result<()>;
    /// Unpins it.
    async fn unpin(&self, vm: &VmName, point: &str, holder: &JobId) -> Result<()>;
    /// `length` bytes of a disk of a point from `offset` (a multiple of
    /// 512); length 0: to the end.
    async fn read_disk(
        &self,
        vm: &VmName,
        point: &str,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<Extents>;
    /// A disk's digest at a point.
    async fn disk_digest(&self, vm: &VmName, point: &str, disk: &str) -> Result<Digest>;
    /// Whether the source region's cache is known (planned failovers need it).
    fn has_cache(&self) -> bool;
    /// Asks the source agent (through the cache) to stop taking writes and
    /// send everything up to a FINAL marker named `marker`.
    async fn drain(&self, vm: &VmName, reason: &str, marker: &JobId) -> Result<()>;
    /// Turns the committed item (at `incarnation`) around: the new source
    /// is the failed-over VM's `disks` (id, image); the new item.
    async fn reprotect(
        &self,
        vm: &VmName,
        incarnation: u64,
        disks: &[(String, std::path::PathBuf)],
        job: &JobId,
    ) -> Result<Item>;
    /// The re-protected item's reverse replica holds its seed.
    async fn complete_seed(&self, vm: &VmName, incarnation: u64, summary: &str) -> Result<()>;
    /// Seeds the re-protected item's reverse replica (on its processor)
    /// with `chunks`; `distrusted` (disk, offset, length) are compared as
    /// differing whatever their digest. The data bytes stored.
    async fn seed_replica(
        &self,
        vm: &VmName,
        incarnation: u64,
        distrusted: Vec<(String, u64, u64)>,
        chunks: tokio::sync::mpsc::Receiver<SeedChunk>,
    ) -> Result<u64>;
}

/// The peers over gRPC. Each VM's processor and cache are those registry
/// placed its item on (learnt from every `item` call, which each job's
/// first step makes), else the configured ones.
pub struct Tonic {
    pub registry: RegistryClient<PeerChannel>,
    pub processor: ProcessorClient<PeerChannel>,
    pub cache: Option<CacheClient<PeerChannel>>,
    /// A channel to a peer by URL, with failover-svc's credentials.
    pub connect: Connect,
    /// The largest message read from a processor.
    pub max_message_bytes: usize,
    /// Each VM's (and group's) placed processor and cache, by name.
    pub placements: std::sync::Mutex<std::collections::HashMap<String, Placement>>,
    /// Channels to placed peers, by URL: one each, reused.
    pub channels: std::sync::Mutex<std::collections::HashMap<String, PeerChannel>>,
}

/// Makes a channel to a peer by URL.
pub type Connect = Box<dyn Fn(&str) -> std::result::Result<PeerChannel, String> + Send + Sync>;

/// Where registry placed an item: URLs, empty for the configured default.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub processor: String,
    pub cache: String,
}

impl Tonic {
    fn channel(&self, url: &str) -> std::result::Result<PeerChannel, String> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| "channel lock".to_string())?;
        if let Some(c) = channels.get(url) {
            return Ok(c.clone());
        }
        let c = (self.connect)(url)?;
        channels.insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// Where registry placed `vm`'s item (and its group), for the calls
    /// that follow.
    fn learn_placement(&self, vm: &VmName, answer: &reg::ProtectedItem) {
        let placement = Placement {
            processor: answer.processor_endpoint.clone(),
            cache: answer.cache_endpoint.clone(),
        };
        if let Ok(mut p) = self.placements.lock() {
            if !answer.replication_group.is_empty() {
                p.insert(
                    format!("group:{}", answer.replication_group),
                    placement.clone(),
                );
            }
            p.insert(vm.to_string(), placement);
        }
    }

    fn placement(&self, name: &str) -> Placement {
        self.placements
            .lock()
            .ok()
            .and_then(|p| p.get(name).cloned())
            .unwrap_or_default()
    }

    /// The processor of `name` (a VM, or `group:<name>`).
    fn processor_of(&self, name: &str) -> Result<ProcessorClient<PeerChannel>> {
        match self.placement(name).processor.as_str() {
            "" => Ok(self.processor.clone()),
            url => self
                .channel(url)
                .map(|c| ProcessorClient::new(c).max_decoding_message_size(self.max_message_bytes))
                .map_err(|e| Refused::unavailable(format!("{name}'s processor {url}: {e}")).into()),
        }
    }

    /// The cache of VM `name`, if any.
    fn cache_of(&self, name: &str) -> Result<Option<CacheClient<PeerChannel>>> {
        match self.placement(name).cache.as_str() {
            "" => Ok(self.cache.clone()),
            url => self
                .channel(url)
                .map(|c| Some(CacheClient::new(c)))
                .map_err(|e| Refused::unavailable(format!("{name}'s cache {url}: {e}")).into()),
        }
    }
}

fn point(p: proc::RecoveryPoint) -> Point {
    Point {
        time: p
            .time
            .as_ref()
            .and_then(UnixNanos::from_timestamp)
            .unwrap_or_default(),
        id: p.id,
        vm_name: p.vm_name,
        sequence_cut: p.sequence_cut,
        disks: p
            .disks
            .into_iter()
            .map(|d| PointDisk {
                disk_id: d.disk_id,
                size_bytes: d.size_bytes,
            })
            .collect(),
        bookmark_id: p.bookmark_id,
    }
}

fn item(i: reg::ProtectedItem) -> Result<Item> {
    let state = reg::ReplicationState::try_from(i.state).map_err(|_| {
        Refused::unavailable(format!(
            "registry has VM {:?} in unknown state {}",
            i.vm_name, i.state
        ))
    })?;
    let vm_name = VmName::parse(i.vm_name)
        .map_err(|e| Refused::unavailable(format!("registry's item: {e}")))?;
    let t = i.target.unwrap_or_default();
    let source = i.source.unwrap_or_default();
    Ok(Item {
        state,
        replication_group: i.replication_group,
        target: TargetResources {
            region: t.region,
            resource_group: t.resource_group,
            virtual_network: t.virtual_network,
            subnet: t.subnet,
            availability_set: t.availability_set,
            replica_disks: t
                .replica_disks
                .into_iter()
                .map(|d| (d.disk_id, d.name))
                .collect(),
        },
        os_disk: source
            .disks
            .iter()
            .find(|d| d.role == reg::DiskRole::Os as i32)
            .map(|d| d.id.clone()),
        source_disks: source.disks.iter().map(|d| d.id.clone()).collect(),
        disks: source
            .disks
            .into_iter()
            .map(|d| SourceDisk {
                id: d.id,
                size_bytes: d.size_bytes,
                path: d.source_path.into(),
            })
            .collect(),
        incarnation: i.incarnation,
        reprotection: i.reprotection.map(|r| Reprotection {
            from_incarnation: r.from_incarnation,
            original_region: r.original_region,
            original_disks: r
                .original_disks
                .into_iter()
                .map(|d| (d.disk_id, d.path.into()))
                .collect(),
            seed_complete: r.seed_complete,
            job_id: r.job_id,
            distrusted: r
                .distrusted
                .into_iter()
                .map(|d| (d.disk_id, d.offset, d.length))
                .collect(),
        }),
        source_nics: source
            .nics
            .into_iter()
            .map(|n| {
                let mac_address = match n.mac_address.as_str() {
                    "" => None,
                    mac => Some(MacAddr::parse("registry's NIC MAC", mac).map_err(|e| {
                        Refused::unavailable(format!("registry's item {:?}: {}", vm_name, e.0))
                    })?),
                };
                Ok(SourceNic {
                    name: n.name,
                    private_ip: n.private_ip,
                    mac_address,
                })
            })
            .collect::<Result<_>>()?,
        shape: shape(source.shape.unwrap_or_default()),
        vm_name,
    })
}

/// The registered shape; registry checked it, and unset fields get its
/// defaults.
fn shape(s: reg::VmShape) -> Shape {
    let default = Shape::default();
    Shape {
        vcpus: if s.vcpus == 0 { default.vcpus } else { s.vcpus },
        memory_mib: if s.memory_mib == 0 {
            default.memory_mib
        } else {
            s.memory_mib
        },
        firmware: match reg::Firmware::try_from(s.firmware) {
            Ok(reg::Firmware::Uefi) => Firmware::Uefi,
            _ => Firmware::Bios,
        },
        kernel_boot: (!s.kernel.is_empty()).then(|| KernelBoot {
            kernel: s.kernel,
            initrd: (!s.initrd.is_empty()).then_some(s.initrd),
            cmdline: s.cmdline,
        }),
        ready_marker: (!s.ready_marker.is_empty()).then_some(s.ready_marker),
    }
}

fn extent(e: proc::DiskExtent) -> Extent {
    Extent {
        offset: e.offset,
        length: e.length,
        data: match e.content {
            Some(proc::disk_extent::Content::Data(d)) => Some(d),
            _ => None,
        },
        crc32c: e.crc32c,
    }
}

#[tonic::async_trait]
impl Peers for Tonic {
    async fn item(&self, vm: &VmName) -> Result<Item> {
        let answer = self
            .registry
            .clone()
            .get_protected_item(reg::GetProtectedItemRequest {
                vm_name: vm.to_string(),
            })
            .await
            .map_err(|s| FailoverError::peer("registry", s))?
            .into_inner();
        self.learn_placement(vm, &answer);
        item(answer)
    }

    async fn transition(
        &self,
        vm: &VmName,
        to: ReplicationState,
        bump_epoch: bool,
        reason: &str,
    ) -> Result<()> {
        self.registry
            .clone()
            .transition_state(reg::TransitionStateRequest {
                vm_name: vm.to_string(),
                to: to as i32,
                bump_epoch,
                reason: reason.to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("registry", s))
    }

    async fn group(&self, name: &str) -> Result<Group> {
        let g = self
            .registry
            .clone()
            .get_replication_group(reg::GetReplicationGroupRequest {
                name: name.to_string(),
            })
            .await
            .map_err(|s| FailoverError::peer("registry", s))?
            .into_inner();
        Ok(Group {
            name: g.name,
            members: g.members,
        })
    }

    async fn point(&self, vm: &VmName, id: &str) -> Result<Point> {
        self.processor_of(vm.as_str())?
            .get_recovery_point(proc::GetRecoveryPointRequest {
                vm_name: vm.to_string(),
                point_id: id.to_string(),
            })
            .await
            .map(|r| point(r.into_inner()))
            .map_err(|s| FailoverError::peer("processor", s))
    }

    async fn points(&self, vm: &VmName, kind: PointKind, limit: u32) -> Result<Vec<Point>> {
        let kind = match kind {
            PointKind::Any => proc::PointKind::Unspecified,
            PointKind::AppConsistent => proc::PointKind::AppConsistent,
            PointKind::MultiVm => proc::PointKind::MultiVm,
        };
        Ok(self
            .processor_of(vm.as_str())?
            .list_recovery_points(proc::ListRecoveryPointsRequest {
                vm_name: vm.to_string(),
                kind: kind as i32,
                limit,
                ..Default::default()
            })
            .await
            .map_err(|s| FailoverError::peer("processor", s))?
            .into_inner()
            .points
            .into_iter()
            .map(point)
            .collect())
    }

    async fn cut_point(&self, vm: &VmName) -> Result<Point> {
        self.processor_of(vm.as_str())?
            .cut_recovery_point(proc::CutRecoveryPointRequest {
                vm_name: vm.to_string(),
            })
            .await
            .map(|r| point(r.into_inner()))
            .map_err(|s| FailoverError::peer("processor (latest)", s))
    }

    async fn group_points(&self, group: &str) -> Result<Vec<GroupPoint>> {
        Ok(self
            .processor_of(&format!("group:{group}"))?
            .list_group_points(proc::ListGroupPointsRequest {
                replication_group: group.to_string(),
                limit: 0,
            })
            .await
            .map_err(|s| FailoverError::peer("processor", s))?
            .into_inner()
            .points
            .into_iter()
            .map(|g| GroupPoint {
                bookmark_id: g.bookmark_id,
                points: g.points.into_iter().map(point).collect(),
            })
            .collect())
    }

    async fn pin(&self, vm: &VmName, point: &str, holder: &JobId) -> Result<()> {
        self.processor_of(vm.as_str())?
            .pin_recovery_point(proc::PinRecoveryPointRequest {
                vm_name: vm.to_string(),
                point_id: point.to_string(),
                holder: holder.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("processor (pin)", s))
    }

    async fn unpin(&self, vm: &VmName, point: &str, holder: &JobId) -> Result<()> {
        self.processor_of(vm.as_str())?
            .unpin_recovery_point(proc::UnpinRecoveryPointRequest {
                vm_name: vm.to_string(),
                point_id: point.to_string(),
                holder: holder.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("processor (unpin)", s))
    }

    async fn read_disk(
        &self,
        vm: &VmName,
        point: &str,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<Extents> {
        let stream = self
            .processor_of(vm.as_str())?
            .read_disk(proc::ReadDiskRequest {
                vm_name: vm.to_string(),
                point_id: point.to_string(),
                disk_id: disk.to_string(),
                offset,
                length,
            })
            .await
            .map_err(|s| FailoverError::peer("processor (read disk)", s))?
            .into_inner();
        Ok(Box::pin(stream.map(|m| {
            m.map(extent)
                .map_err(|s| FailoverError::peer("processor (read disk)", s))
        })))
    }

    async fn disk_digest(&self, vm: &VmName, point: &str, disk: &str) -> Result<Digest> {
        let d = self
            .processor_of(vm.as_str())?
            .get_disk_digest(proc::GetDiskDigestRequest {
                vm_name: vm.to_string(),
                point_id: point.to_string(),
                disk_id: disk.to_string(),
            })
            .await
            .map_err(|s| FailoverError::peer("processor (disk digest)", s))?
            .into_inner();
        Ok(Digest {
            algorithm: d.algorithm,
            size_bytes: d.size_bytes,
            chunk_bytes: d.chunk_bytes,
            sha256: d.sha256.to_vec(),
        })
    }

    fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    async fn drain(&self, vm: &VmName, reason: &str, marker: &JobId) -> Result<()> {
        let mut cache = self.cache_of(vm.as_str())?.ok_or_else(|| {
            Refused::failed_precondition(
                "failover-svc has no --cache and the VM has no cache of its region's",
            )
        })?;
        cache
            .send_control(cache::SendControlRequest {
                vm_name: vm.to_string(),
                control: Some(cache::send_control_request::Control::Stop(cache::Stop {
                    reason: reason.to_string(),
                    final_marker_id: marker.to_string(),
                })),
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("cache (drain)", s))
    }

    async fn reprotect(
        &self,
        vm: &VmName,
        incarnation: u64,
        disks: &[(String, std::path::PathBuf)],
        job: &JobId,
    ) -> Result<Item> {
        let answer = self
            .registry
            .clone()
            .reprotect_item(reg::ReprotectItemRequest {
                vm_name: vm.to_string(),
                incarnation,
                disks: disks
                    .iter()
                    .map(|(id, path)| reg::DiskAt {
                        disk_id: id.clone(),
                        path: path.display().to_string(),
                    })
                    .collect(),
                job_id: job.to_string(),
            })
            .await
            .map_err(|s| FailoverError::peer("registry (re-protect)", s))?
            .into_inner();
        // Placed anew.
        self.learn_placement(vm, &answer);
        item(answer)
    }

    async fn complete_seed(&self, vm: &VmName, incarnation: u64, summary: &str) -> Result<()> {
        self.registry
            .clone()
            .complete_reprotect_seed(reg::CompleteReprotectSeedRequest {
                vm_name: vm.to_string(),
                incarnation,
                summary: summary.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| FailoverError::peer("registry (seed complete)", s))
    }

    async fn seed_replica(
        &self,
        vm: &VmName,
        incarnation: u64,
        distrusted: Vec<(String, u64, u64)>,
        chunks: tokio::sync::mpsc::Receiver<SeedChunk>,
    ) -> Result<u64> {
        use proc::seed_replica_request::Msg;
        let open = proc::SeedReplicaRequest {
            msg: Some(Msg::Open(proc::SeedOpen {
                vm_name: vm.to_string(),
                incarnation,
                distrusted: distrusted
                    .into_iter()
                    .map(|(disk_id, offset, length)| proc::SeedRange {
                        disk_id,
                        offset,
                        length,
                    })
                    .collect(),
            })),
        };
        let data =
            tokio_stream::wrappers::ReceiverStream::new(chunks).map(|c| proc::SeedReplicaRequest {
                msg: Some(Msg::Data(proc::SeedData {
                    crc32c: crc32c::crc32c(&c.data),
                    disk_id: c.disk_id,
                    offset: c.offset,
                    data: c.data,
                })),
            });
        let messages = tokio_stream::once(open).chain(data);
        self.processor_of(vm.as_str())?
            .seed_replica(messages)
            .await
            .map(|r| r.into_inner().bytes_seeded)
            .map_err(|s| FailoverError::peer("processor (seed)", s))
    }
}
