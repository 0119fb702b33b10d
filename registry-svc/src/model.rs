//! Domain types of the registry, apart from the prost types: requests are
//! validated on receipt in `TryFrom<proto::X>` and answers built with
//! `From<domain> for proto::X`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ferry_proto::ids::MacAddr;
use ferry_proto::registry::v1 as pb;
use ferry_runtime::security::OperatorRole;
use ferry_runtime::time::{from_duration, to_duration, to_timestamp};
use serde::{Deserialize, Serialize};

use crate::error::RegistryError;

/// Longest name of any object.
pub use ferry_proto::ids::MAX_NAME_LEN;

/// Checks a name ([`ferry_proto::ids::check_name`]): 1 to 64 ASCII letters,
/// digits, '-', '_', '.', starting with a letter or digit.
pub fn check_name(field: &str, value: &str) -> Result<(), RegistryError> {
    ferry_proto::ids::check_name(field, value).map_err(|e| RegistryError::invalid(e.0))
}

fn optional_name(field: &str, value: String) -> Result<Option<String>, RegistryError> {
    if value.is_empty() {
        Ok(None)
    } else {
        check_name(field, &value)?;
        Ok(Some(value))
    }
}

/// The largest disk a VM may register: 64 TiB, Azure's largest managed
/// disk. Every part sizes maps, chunk indexes and ranges by a disk's size;
/// sizes near u64::MAX overflowed that arithmetic downstream.
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// OS or data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskRole {
    Os,
    Data,
}

/// Managed or unmanaged disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskStorage {
    Managed,
    Unmanaged,
}

/// A source disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: String,
    pub size_bytes: u64,
    pub role: DiskRole,
    pub storage: DiskStorage,
    pub source_path: String,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub private_ip: IpAddr,
    /// None: failover derives one from the VM's and NIC's names.
    #[serde(default)]
    pub mac_address: Option<MacAddr>,
}

/// How a VM's firmware starts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// Direct kernel boot: files on the target hypervisor host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// A VM's size and how it boots (see `VmShape` in registry.proto).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub firmware: Firmware,
    pub kernel_boot: Option<KernelBoot>,
    pub ready_marker: Option<String>,
}

impl Shape {
    pub const DEFAULT_VCPUS: u32 = 1;
    pub const MAX_VCPUS: u32 = 256;
    pub const DEFAULT_MEMORY_MIB: u64 = 512;
    pub const MIN_MEMORY_MIB: u64 = 16;
    pub const MAX_MEMORY_MIB: u64 = 4 << 20;
    /// Longest ready marker, kernel command line and boot file path.
    pub const MAX_TEXT: usize = 4096;
}

/// VMs registered before shapes: the defaults.
impl Default for Shape {
    fn default() -> Shape {
        Shape {
            vcpus: Shape::DEFAULT_VCPUS,
            memory_mib: Shape::DEFAULT_MEMORY_MIB,
            firmware: Firmware::Bios,
            kernel_boot: None,
            ready_marker: None,
        }
    }
}

/// A registered source VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub source_region: String,
    pub resource_group: String,
    pub virtual_network: String,
    pub subnet: String,
    pub availability_set: Option<String>,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    pub registered_at: SystemTime,
    #[serde(default)]
    pub shape: Shape,
}

impl TryFrom<pb::Disk> for Disk {
    type Error = RegistryError;
    fn try_from(d: pb::Disk) -> Result<Self, Self::Error> {
        check_name("disk id", &d.id)?;
        if d.size_bytes == 0 {
            return Err(RegistryError::invalid(format!(
                "disk {:?} has size 0; a disk needs at least 512 bytes",
                d.id
            )));
        }
        if d.size_bytes > MAX_DISK_BYTES {
            return Err(RegistryError::invalid(format!(
                "disk {:?} has size {} bytes; at most {MAX_DISK_BYTES} (64 TiB) are allowed",
                d.id, d.size_bytes
            )));
        }
        if !d.size_bytes.is_multiple_of(512) {
            return Err(RegistryError::invalid(format!(
                "disk {:?} has size {} bytes, which is not a multiple of 512",
                d.id, d.size_bytes
            )));
        }
        let role = match pb::DiskRole::try_from(d.role) {
            Ok(pb::DiskRole::Os) => DiskRole::Os,
            Ok(pb::DiskRole::Data) => DiskRole::Data,
            _ => {
                return Err(RegistryError::invalid(format!(
                    "disk {:?} needs a role: DISK_ROLE_OS or DISK_ROLE_DATA",
                    d.id
                )))
            }
        };
        let storage = match pb::DiskStorage::try_from(d.storage) {
            Ok(pb::DiskStorage::Managed) => DiskStorage::Managed,
            Ok(pb::DiskStorage::Unmanaged) => DiskStorage::Unmanaged,
            _ => {
                return Err(RegistryError::invalid(format!(
                    "disk {:?} needs a storage kind: {}",
                    d.id, "DISK_STORAGE_MANAGED or DISK_STORAGE_UNMANAGED"
                )))
            }
        };
        if d.source_path.trim().is_empty() || d.source_path.contains('\0') {
            return Err(RegistryError::invalid(format!(
                "disk {:?} needs a source_path: where the agent finds the source image",
                d.id
            )));
        }
        Ok(Disk {
            id: d.id,
            size_bytes: d.size_bytes,
            role,
            storage,
            source_path: d.source_path,
        })
    }
}

impl TryFrom<pb::Vm> for Vm {
    type Error = RegistryError;
    fn try_from(v: pb::Vm) -> Result<Self, Self::Error> {
        check_name("VM name", &v.name)?;
        check_name("source region", &v.source_region)?;
        check_name("resource group", &v.resource_group)?;
        check_name("virtual network", &v.virtual_network)?;
        check_name("subnet", &v.subnet)?;
        let availability_set = optional_name("availability set", v.availability_set)?;
        if v.nics.is_empty() {
            return Err(RegistryError::invalid(format!(
                "VM {:?} has no network interface; give at least one",
                v.name
            )));
        }
        let mut nic_names = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let mut macs = BTreeSet::new();
        let mut nics = Vec::with_capacity(v.nics.len());
        for nic in v.nics {
            check_name("NIC name", &nic.name)?;
            let ip: IpAddr = nic.private_ip.parse().map_err(|_| {
                RegistryError::invalid(format!(
                    "NIC {:?} has private IP {:?}, which is not an IPv4 or IPv6 address",
                    nic.name, nic.private_ip
                ))
            })?;
            if !nic_names.insert(nic.name.clone()) {
                return Err(RegistryError::invalid(format!(
                    "NIC name {:?} appears twice",
                    nic.name
                )));
            }
            if !ips.insert(ip) {
                return Err(RegistryError::invalid(format!(
                    "private IP {ip} is given to two NICs"
                )));
            }
            let mac_address = if nic.mac_address.is_empty() {
                None
            } else {
                let field = format!("NIC {:?} MAC address", nic.name);
                Some(
                    MacAddr::parse(&field, &nic.mac_address)
                        .map_err(|e| RegistryError::invalid(e.0))?,
                )
            };
            if let Some(mac) = mac_address {
                if !macs.insert(mac) {
                    return Err(RegistryError::invalid(format!(
                        "MAC address {mac} is given to two NICs"
                    )));
                }
            }
            nics.push(Nic {
                name: nic.name,
                private_ip: ip,
                mac_address,
            });
        }
        if v.disks.is_empty() {
            return Err(RegistryError::invalid(format!(
                "VM {:?} has no disk; give at least one",
                v.name
            )));
        }
        let mut disk_ids = BTreeSet::new();
        let mut disks = Vec::with_capacity(v.disks.len());
        for disk in v.disks {
            let disk = Disk::try_from(disk)?;
            if !disk_ids.insert(disk.id.clone()) {
                return Err(RegistryError::invalid(format!(
                    "disk id {:?} appears twice",
                    disk.id
                )));
            }
            disks.push(disk);
        }
        if disks.iter().filter(|d| d.role == DiskRole::Os).count() > 1 {
            return Err(RegistryError::invalid(format!(
                "VM {:?} has more than one OS disk",
                v.name
            )));
        }
        Ok(Vm {
            name: v.name,
            source_region: v.source_region,
            resource_group: v.resource_group,
            virtual_network: v.virtual_network,
            subnet: v.subnet,
            availability_set,
            nics,
            disks,
            registered_at: SystemTime::now(),
            shape: v
                .shape
                .map(Shape::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// Text of the shape: at most [`Shape::MAX_TEXT`] bytes, no NUL or line
/// break (each ends up in a domain definition or a console match).
fn shape_text(field: &str, value: &str) -> Result<(), RegistryError> {
    if value.len() > Shape::MAX_TEXT || value.contains(['\0', '\n', '\r']) {
        return Err(RegistryError::invalid(format!(
            "{field} must be one line of at most {} bytes",
            Shape::MAX_TEXT
        )));
    }
    Ok(())
}

fn boot_path(field: &str, value: &str) -> Result<(), RegistryError> {
    shape_text(field, value)?;
    if !value.starts_with('/') {
        return Err(RegistryError::invalid(format!(
            "{field} {value:?} must be an absolute path on the target host"
        )));
    }
    Ok(())
}

impl TryFrom<pb::VmShape> for Shape {
    type Error = RegistryError;
    fn try_from(s: pb::VmShape) -> Result<Self, Self::Error> {
        let vcpus = match s.vcpus {
            0 => Shape::DEFAULT_VCPUS,
            n if n > Shape::MAX_VCPUS => {
                return Err(RegistryError::invalid(format!(
                    "vcpus is {n}; at most {} are allowed",
                    Shape::MAX_VCPUS
                )))
            }
            n => n,
        };
        let memory_mib = match s.memory_mib {
            0 => Shape::DEFAULT_MEMORY_MIB,
            n if !(Shape::MIN_MEMORY_MIB..=Shape::MAX_MEMORY_MIB).contains(&n) => {
                return Err(RegistryError::invalid(format!(
                    "memory_mib is {n}; it must be between {} and {}",
                    Shape::MIN_MEMORY_MIB,
                    Shape::MAX_MEMORY_MIB
                )))
            }
            n => n,
        };
        let firmware = match pb::Firmware::try_from(s.firmware) {
            Ok(pb::Firmware::Unspecified | pb::Firmware::Bios) => Firmware::Bios,
            Ok(pb::Firmware::Uefi) => Firmware::Uefi,
            Err(_) => {
                return Err(RegistryError::invalid(format!(
                    "firmware {} is unknown: FIRMWARE_BIOS or FIRMWARE_UEFI",
                    s.firmware
                )))
            }
        };
        let kernel_boot = if s.kernel.is_empty() {
            if !s.initrd.is_empty() || !s.cmdline.is_empty() {
                return Err(RegistryError::invalid(
                    "initrd and cmdline need a kernel: give the kernel's path too",
                ));
            }
            None
        } else {
            boot_path("kernel", &s.kernel)?;
            if !s.initrd.is_empty() {
                boot_path("initrd", &s.initrd)?;
            }
            shape_text("cmdline", &s.cmdline)?;
            Some(KernelBoot {
                kernel: s.kernel,
                initrd: (!s.initrd.is_empty()).then_some(s.initrd),
                cmdline: s.cmdline,
            })
        };
        shape_text("ready_marker", &s.ready_marker)?;
        Ok(Shape {
            vcpus,
            memory_mib,
            firmware,
            kernel_boot,
            ready_marker: (!s.ready_marker.is_empty()).then_some(s.ready_marker),
        })
    }
}

impl From<&Shape> for pb::VmShape {
    fn from(s: &Shape) -> Self {
        let boot = s.kernel_boot.as_ref();
        pb::VmShape {
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            firmware: match s.firmware {
                Firmware::Bios => pb::Firmware::Bios,
                Firmware::Uefi => pb::Firmware::Uefi,
            } as i32,
            kernel: boot.map(|b| b.kernel.clone()).unwrap_or_default(),
            initrd: boot.and_then(|b| b.initrd.clone()).unwrap_or_default(),
            cmdline: boot.map(|b| b.cmdline.clone()).unwrap_or_default(),
            ready_marker: s.ready_marker.clone().unwrap_or_default(),
        }
    }
}

impl From<&Disk> for pb::Disk {
    fn from(d: &Disk) -> Self {
        pb::Disk {
            id: d.id.clone(),
            size_bytes: d.size_bytes,
            role: match d.role {
                DiskRole::Os => pb::DiskRole::Os,
                DiskRole::Data => pb::DiskRole::Data,
            } as i32,
            storage: storage_to_pb(d.storage) as i32,
            source_path: d.source_path.clone(),
        }
    }
}

fn storage_to_pb(s: DiskStorage) -> pb::DiskStorage {
    match s {
        DiskStorage::Managed => pb::DiskStorage::Managed,
        DiskStorage::Unmanaged => pb::DiskStorage::Unmanaged,
    }
}

impl From<&Vm> for pb::Vm {
    fn from(v: &Vm) -> Self {
        pb::Vm {
            name: v.name.clone(),
            source_region: v.source_region.clone(),
            resource_group: v.resource_group.clone(),
            virtual_network: v.virtual_network.clone(),
            subnet: v.subnet.clone(),
            availability_set: v.availability_set.clone().unwrap_or_default(),
            nics: v
                .nics
                .iter()
                .map(|n| pb::Nic {
                    name: n.name.clone(),
                    private_ip: n.private_ip.to_string(),
                    mac_address: n.mac_address.map(|m| m.to_string()).unwrap_or_default(),
                })
                .collect(),
            disks: v.disks.iter().map(pb::Disk::from).collect(),
            registered_at: Some(to_timestamp(v.registered_at)),
            shape: Some(pb::VmShape::from(&v.shape)),
        }
    }
}

/// A replication policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub retention: Duration,
    pub crash_consistent_interval: Duration,
    /// Zero: no app-consistent points.
    pub app_consistent_frequency: Duration,
    pub multi_vm_consistency: bool,
    pub multi_vm_interval: Duration,
    pub keep_all_points_for: Duration,
    pub thinned_point_spacing: Duration,
    pub created_at: SystemTime,
}

const HOUR: Duration = Duration::from_secs(3600);

impl Policy {
    /// Name of the policy that always exists.
    pub const DEFAULT_NAME: &'static str = "default";
    /// Longest retention.
    pub const MAX_RETENTION: Duration = Duration::from_secs(15 * 24 * 3600);

    /// The default policy: 24 h retention, a crash-consistent point every 5 s,
    /// an app-consistent one every 4 h, all points for 2 h then one an hour.
    pub fn default_policy() -> Policy {
        Policy {
            name: Self::DEFAULT_NAME.into(),
            retention: 24 * HOUR,
            crash_consistent_interval: Duration::from_secs(5),
            app_consistent_frequency: 4 * HOUR,
            multi_vm_consistency: false,
            multi_vm_interval: Duration::from_secs(10),
            keep_all_points_for: 2 * HOUR,
            thinned_point_spacing: HOUR,
            created_at: SystemTime::now(),
        }
    }
}

fn duration_field(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, RegistryError> {
    match value {
        None => Ok(None),
        Some(d) => from_duration(&d).map(Some).ok_or_else(|| {
            RegistryError::invalid(format!("{field} is negative or malformed: {d:?}"))
        }),
    }
}

fn within(field: &str, d: Duration, min: Duration, max: Duration) -> Result<(), RegistryError> {
    if d < min || d > max {
        return Err(RegistryError::invalid(format!(
            "{field} is {d:?}; it must be between {min:?} and {max:?}"
        )));
    }
    Ok(())
}

impl TryFrom<pb::ReplicationPolicy> for Policy {
    type Error = RegistryError;
    fn try_from(p: pb::ReplicationPolicy) -> Result<Self, Self::Error> {
        check_name("policy name", &p.name)?;
        let defaults = Policy::default_policy();
        let crash = duration_field("crash_consistent_interval", p.crash_consistent_interval)?
            .unwrap_or(defaults.crash_consistent_interval);
        within(
            "crash_consistent_interval",
            crash,
            Duration::from_secs(1),
            HOUR,
        )?;
        let retention = duration_field("recovery_point_retention", p.recovery_point_retention)?
            .unwrap_or(defaults.retention);
        within(
            "recovery_point_retention",
            retention,
            crash,
            Policy::MAX_RETENTION,
        )?;
        let app = duration_field("app_consistent_frequency", p.app_consistent_frequency)?
            .unwrap_or(defaults.app_consistent_frequency.min(retention));
        if !app.is_zero() {
            within("app_consistent_frequency", app, crash, retention)?;
        }
        let multi_vm_interval = duration_field("multi_vm_interval", p.multi_vm_interval)?
            .unwrap_or(defaults.multi_vm_interval);
        within(
            "multi_vm_interval",
            multi_vm_interval,
            Duration::from_secs(1),
            HOUR,
        )?;
        let keep_all = duration_field("keep_all_points_for", p.keep_all_points_for)?
            .unwrap_or(defaults.keep_all_points_for.min(retention));
        within("keep_all_points_for", keep_all, Duration::ZERO, retention)?;
        let spacing = duration_field("thinned_point_spacing", p.thinned_point_spacing)?
            .unwrap_or(defaults.thinned_point_spacing);
        within(
            "thinned_point_spacing",
            spacing,
            crash,
            Policy::MAX_RETENTION,
        )?;
        Ok(Policy {
            name: p.name,
            retention,
            crash_consistent_interval: crash,
            app_consistent_frequency: app,
            multi_vm_consistency: p.multi_vm_consistency,
            multi_vm_interval,
            keep_all_points_for: keep_all,
            thinned_point_spacing: spacing,
            created_at: SystemTime::now(),
        })
    }
}

impl From<&Policy> for pb::ReplicationPolicy {
    fn from(p: &Policy) -> Self {
        pb::ReplicationPolicy {
            name: p.name.clone(),
            recovery_point_retention: Some(to_duration(p.retention)),
            crash_consistent_interval: Some(to_duration(p.crash_consistent_interval)),
            app_consistent_frequency: Some(to_duration(p.app_consistent_frequency)),
            multi_vm_consistency: p.multi_vm_consistency,
            multi_vm_interval: Some(to_duration(p.multi_vm_interval)),
            keep_all_points_for: Some(to_duration(p.keep_all_points_for)),
            thinned_point_spacing: Some(to_duration(p.thinned_point_spacing)),
            created_at: Some(to_timestamp(p.created_at)),
        }
    }
}

/// A mapping of a network in one region to a network in another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMapping {
    pub source_region: String,
    pub source_network: String,
    pub target_region: String,
    pub target_network: String,
    pub created_at: SystemTime,
}

impl NetworkMapping {
    /// The id of the mapping of `network` in `region` into `target_region`.
    pub fn id_of(region: &str, network: &str, target_region: &str) -> String {
        format!("{region}/{network}->{target_region}")
    }

    /// This mapping's id.
    pub fn id(&self) -> String {
        Self::id_of(
            &self.source_region,
            &self.source_network,
            &self.target_region,
        )
    }

    /// The mapping the other way.
    pub fn reverse(&self) -> NetworkMapping {
        NetworkMapping {
            source_region: self.target_region.clone(),
            source_network: self.target_network.clone(),
            target_region: self.source_region.clone(),
            target_network: self.source_network.clone(),
            created_at: self.created_at,
        }
    }
}

impl TryFrom<pb::CreateNetworkMappingRequest> for NetworkMapping {
    type Error = RegistryError;
    fn try_from(r: pb::CreateNetworkMappingRequest) -> Result<Self, Self::Error> {
        check_name("source region", &r.source_region)?;
        check_name("source network", &r.source_network)?;
        check_name("target region", &r.target_region)?;
        check_name("target network", &r.target_network)?;
        Ok(NetworkMapping {
            source_region: r.source_region,
            source_network: r.source_network,
            target_region: r.target_region,
            target_network: r.target_network,
            created_at: SystemTime::now(),
        })
    }
}

impl From<&NetworkMapping> for pb::NetworkMapping {
    fn from(m: &NetworkMapping) -> Self {
        pb::NetworkMapping {
            id: m.id(),
            source_region: m.source_region.clone(),
            source_network: m.source_network.clone(),
            target_region: m.target_region.clone(),
            target_network: m.target_network.clone(),
            created_at: Some(to_timestamp(m.created_at)),
        }
    }
}

/// A replication group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub policy: String,
    pub target_region: Option<String>,
    pub members: BTreeSet<String>,
    pub coordinator: Option<String>,
    pub created_at: SystemTime,
    /// What the members sign rounds with over plaintext group ports; empty
    /// for a group stored before groups had one (made at its next
    /// heartbeat).
    #[serde(default)]
    pub secret: GroupSecret,
}

/// A replication group's secret: 32 random bytes, hex in the store, handed
/// only to the group's members' agents, never printed.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupSecret(String);

impl GroupSecret {
    /// A fresh random secret.
    pub fn generate() -> Result<GroupSecret, RegistryError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| {
            RegistryError::Internal(format!("no randomness for a group secret: {e}"))
        })?;
        Ok(GroupSecret(hex::encode(bytes)))
    }

    /// Whether there is none yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The secret's bytes, as members receive them.
    pub fn bytes(&self) -> Vec<u8> {
        hex::decode(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for GroupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() {
            "GroupSecret(none)"
        } else {
            "GroupSecret(<redacted>)"
        })
    }
}

impl From<&Group> for pb::ReplicationGroup {
    fn from(g: &Group) -> Self {
        pb::ReplicationGroup {
            name: g.name.clone(),
            policy_name: g.policy.clone(),
            target_region: g.target_region.clone().unwrap_or_default(),
            members: g.members.iter().cloned().collect(),
            coordinator: g.coordinator.clone().unwrap_or_default(),
            created_at: Some(to_timestamp(g.created_at)),
        }
    }
}

/// Target resources the caller chose; `None` means derive it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub resource_group: Option<String>,
    pub virtual_network: Option<String>,
    pub subnet: Option<String>,
    pub availability_set: Option<String>,
    pub cache_storage: Option<String>,
    pub target_storage_account: Option<String>,
    pub replica_disk_names: BTreeMap<String, String>,
}

impl TryFrom<pb::TargetOverrides> for Overrides {
    type Error = RegistryError;
    fn try_from(o: pb::TargetOverrides) -> Result<Self, Self::Error> {
        let mut replica_disk_names = BTreeMap::new();
        for (disk, name) in o.replica_disk_names {
            check_name("replica disk name", &name)?;
            replica_disk_names.insert(disk, name);
        }
        Ok(Overrides {
            resource_group: optional_name("target resource group", o.resource_group)?,
            virtual_network: optional_name("target virtual network", o.virtual_network)?,
            subnet: optional_name("target subnet", o.subnet)?,
            availability_set: optional_name("target availability set", o.availability_set)?,
            cache_storage: optional_name("cache storage", o.cache_storage)?,
            target_storage_account: optional_name(
                "target storage account",
                o.target_storage_account,
            )?,
            replica_disk_names,
        })
    }
}

/// An enable-replication request, validated.
#[derive(Debug, Clone)]
pub struct EnableRequest {
    pub vm_name: String,
    pub target_region: String,
    pub policy: Option<String>,
    pub group: Option<String>,
    pub overrides: Overrides,
}

impl TryFrom<pb::EnableReplicationRequest> for EnableRequest {
    type Error = RegistryError;
    fn try_from(r: pb::EnableReplicationRequest) -> Result<Self, Self::Error> {
        check_name("VM name", &r.vm_name)?;
        check_name("target region", &r.target_region)?;
        Ok(EnableRequest {
            vm_name: r.vm_name,
            target_region: r.target_region,
            policy: optional_name("policy name", r.policy_name)?,
            group: optional_name("replication group", r.replication_group)?,
            overrides: r
                .overrides
                .map(Overrides::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// The replica of a source disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDisk {
    pub disk_id: String,
    pub name: String,
    pub storage: DiskStorage,
    pub storage_account: Option<String>,
    pub size_bytes: u64,
}

/// Every target resource of a protected item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub region: String,
    pub resource_group: String,
    pub virtual_network: String,
    pub subnet: String,
    pub availability_set: Option<String>,
    pub cache_storage: String,
    pub target_storage_account: Option<String>,
    pub replica_disks: Vec<ReplicaDisk>,
    pub network_mapping: String,
    pub reverse_network_mapping: String,
}

impl From<&Targets> for pb::TargetResources {
    fn from(t: &Targets) -> Self {
        pb::TargetResources {
            region: t.region.clone(),
            resource_group: t.resource_group.clone(),
            virtual_network: t.virtual_network.clone(),
            subnet: t.subnet.clone(),
            availability_set: t.availability_set.clone().unwrap_or_default(),
            cache_storage: t.cache_storage.clone(),
            target_storage_account: t.target_storage_account.clone().unwrap_or_default(),
            replica_disks: t
                .replica_disks
                .iter()
                .map(|r| pb::ReplicaDisk {
                    disk_id: r.disk_id.clone(),
                    name: r.name.clone(),
                    storage: storage_to_pb(r.storage) as i32,
                    storage_account: r.storage_account.clone().unwrap_or_default(),
                    size_bytes: r.size_bytes,
                })
                .collect(),
            network_mapping: t.network_mapping.clone(),
            reverse_network_mapping: t.reverse_network_mapping.clone(),
        }
    }
}

/// How well replication is doing; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    Unknown,
    Normal,
    Warning,
    Critical,
}

impl Health {
    pub fn to_pb(self) -> pb::ReplicationHealth {
        match self {
            Health::Unknown => pb::ReplicationHealth::Unspecified,
            Health::Normal => pb::ReplicationHealth::Normal,
            Health::Warning => pb::ReplicationHealth::Warning,
            Health::Critical => pb::ReplicationHealth::Critical,
        }
    }

    pub fn from_pb(value: i32) -> Option<Health> {
        match pb::ReplicationHealth::try_from(value).ok()? {
            pb::ReplicationHealth::Unspecified => None,
            pb::ReplicationHealth::Normal => Some(Health::Normal),
            pb::ReplicationHealth::Warning => Some(Health::Warning),
            pb::ReplicationHealth::Critical => Some(Health::Critical),
        }
    }
}

/// One component's latest health report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub health: Health,
    pub message: String,
    pub reported_at: SystemTime,
}

/// Components that report health.
/// "group" is the replication group's coordinator, about multi-VM points.
pub const COMPONENTS: [&str; 5] = ["agent", "cache", "processor", "failover", "group"];

/// A protected item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedItem {
    pub vm_name: String,
    pub source: Vm,
    pub policy: String,
    pub group: Option<String>,
    pub target: Targets,
    pub state: crate::lifecycle::State,
    pub state_reason: String,
    pub percent: u32,
    pub health_reports: BTreeMap<String, HealthReport>,
    /// The RPO as the processor last reported it, at `rpo_reported_at`.
    pub rpo: Option<Duration>,
    /// When that report arrived (this host's clock); see [`Self::rpo_at`].
    #[serde(default)]
    pub rpo_reported_at: Option<SystemTime>,
    pub last_recovery_point: Option<SystemTime>,
    pub epoch: u64,
    pub backlog_bytes: u64,
    pub backlog_records: u64,
    pub revision: u64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// Set once the item has reached FAILED_OVER: the target side has run,
    /// so the source may never replicate over it again (only re-protect may
    /// bring it back).
    #[serde(default)]
    pub failed_over: bool,
    /// Which enabling of replication this is (see `Registry::enable`): a
    /// disable then enable of the same VM gets a new, higher one, so no
    /// cache log or replica of the old item is ever taken for the new one.
    #[serde(default)]
    pub incarnation: u64,
    /// The cache-svc its agent streams to, placed when enabled (its source
    /// region's); None: registry's default.
    #[serde(default)]
    pub cache_endpoint: Option<String>,
    /// The processor-svc that applies it (its target region's); None: any
    /// processor that names none.
    #[serde(default)]
    pub processor_endpoint: Option<String>,
    /// Set on an item made by re-protect: what it replicates back to.
    #[serde(default)]
    pub reprotection: Option<Reprotection>,
    /// What the fenced source wrote after the fence, as its agent last
    /// reported.
    #[serde(default)]
    pub fenced_writes: Vec<ChangedRange>,
}

/// A range of a disk that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedRange {
    pub disk_id: String,
    pub offset: u64,
    pub length: u64,
}

impl From<&ChangedRange> for pb::ChangedRange {
    fn from(r: &ChangedRange) -> Self {
        pb::ChangedRange {
            disk_id: r.disk_id.clone(),
            offset: r.offset,
            length: r.length,
        }
    }
}

impl TryFrom<pb::ChangedRange> for ChangedRange {
    type Error = RegistryError;
    fn try_from(r: pb::ChangedRange) -> Result<Self, Self::Error> {
        check_name("disk id", &r.disk_id)?;
        if r.length == 0 || r.offset.checked_add(r.length).is_none() {
            return Err(RegistryError::invalid(format!(
                "range {}+{} of disk {:?} is empty or overflows",
                r.offset, r.length, r.disk_id
            )));
        }
        Ok(ChangedRange {
            disk_id: r.disk_id,
            offset: r.offset,
            length: r.length,
        })
    }
}

/// A disk of a VM by id, at a path on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAt {
    pub disk_id: String,
    pub path: String,
}

impl TryFrom<pb::DiskAt> for DiskAt {
    type Error = RegistryError;
    fn try_from(d: pb::DiskAt) -> Result<Self, Self::Error> {
        check_name("disk id", &d.disk_id)?;
        if !d.path.starts_with('/') || d.path.contains('\0') {
            return Err(RegistryError::invalid(format!(
                "disk {:?} needs an absolute path, got {:?}",
                d.disk_id, d.path
            )));
        }
        Ok(DiskAt {
            disk_id: d.disk_id,
            path: d.path,
        })
    }
}

impl From<&DiskAt> for pb::DiskAt {
    fn from(d: &DiskAt) -> Self {
        pb::DiskAt {
            disk_id: d.disk_id.clone(),
            path: d.path.clone(),
        }
    }
}

/// What a re-protected item replicates back to (see
/// `Registry::reprotect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reprotection {
    /// The incarnation that was failed over and committed.
    pub from_incarnation: u64,
    /// The region it was failed over from: the item's target region now.
    pub original_region: String,
    /// The disks the VM ran from there: the seed of the reverse replica,
    /// and where failback writes while they exist.
    pub original_disks: Vec<DiskAt>,
    /// The reverse replica holds its seed: the agent may register.
    pub seed_complete: bool,
    pub seed_summary: String,
    pub job_id: String,
    /// What the original side wrote after it was fenced: sent again
    /// whatever the digests say.
    #[serde(default)]
    pub distrusted: Vec<ChangedRange>,
}

impl From<&Reprotection> for pb::Reprotection {
    fn from(r: &Reprotection) -> Self {
        pb::Reprotection {
            from_incarnation: r.from_incarnation,
            original_region: r.original_region.clone(),
            original_disks: r.original_disks.iter().map(pb::DiskAt::from).collect(),
            seed_complete: r.seed_complete,
            seed_summary: r.seed_summary.clone(),
            job_id: r.job_id.clone(),
            distrusted: r.distrusted.iter().map(pb::ChangedRange::from).collect(),
        }
    }
}

impl ProtectedItem {
    /// The RPO at `now`: while the item replicates, the reported RPO plus
    /// the time since it was reported, so it grows while no report comes
    /// (the processor down or cut off from registry) instead of showing the
    /// last good figure. Measured on this host's clock only: the
    /// processor's clock may differ from registry's.
    pub fn rpo_at(&self, now: SystemTime) -> Option<Duration> {
        use crate::lifecycle::State;
        let rpo = self.rpo?;
        let replicating = matches!(
            self.state,
            State::Protected | State::ResyncRequired | State::Resyncing
        );
        match self.rpo_reported_at {
            Some(at) if replicating => Some(rpo + now.duration_since(at).unwrap_or(Duration::ZERO)),
            _ => Some(rpo),
        }
    }

    /// The worst reported health.
    pub fn health(&self) -> Health {
        self.health_reports
            .values()
            .map(|r| r.health)
            .max()
            .unwrap_or(Health::Unknown)
    }
}

impl From<&ProtectedItem> for pb::ProtectedItem {
    fn from(i: &ProtectedItem) -> Self {
        pb::ProtectedItem {
            vm_name: i.vm_name.clone(),
            source: Some(pb::Vm::from(&i.source)),
            policy_name: i.policy.clone(),
            replication_group: i.group.clone().unwrap_or_default(),
            target: Some(pb::TargetResources::from(&i.target)),
            state: i.state.to_pb() as i32,
            state_reason: i.state_reason.clone(),
            initial_replication_percent: i.percent,
            health: i.health().to_pb() as i32,
            health_reports: i
                .health_reports
                .iter()
                .map(|(component, r)| pb::HealthReport {
                    component: component.clone(),
                    health: r.health.to_pb() as i32,
                    message: r.message.clone(),
                    reported_at: Some(to_timestamp(r.reported_at)),
                })
                .collect(),
            rpo: i.rpo_at(SystemTime::now()).map(to_duration),
            last_recovery_point_time: i.last_recovery_point.map(to_timestamp),
            epoch: i.epoch,
            backlog_bytes: i.backlog_bytes,
            backlog_records: i.backlog_records,
            revision: i.revision,
            created_at: Some(to_timestamp(i.created_at)),
            updated_at: Some(to_timestamp(i.updated_at)),
            incarnation: i.incarnation,
            cache_endpoint: i.cache_endpoint.clone().unwrap_or_default(),
            processor_endpoint: i.processor_endpoint.clone().unwrap_or_default(),
            reprotection: i.reprotection.as_ref().map(pb::Reprotection::from),
            fenced_writes: i.fenced_writes.iter().map(pb::ChangedRange::from).collect(),
        }
    }
}

/// The services serving a region: the cache its VMs' agents stream to (as
/// a source region) and the processor that applies the items replicating
/// into it (as a target region). None: the default of each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionServices {
    pub region: String,
    pub cache: Option<String>,
    pub processor: Option<String>,
}

/// An endpoint of a region's service: empty for none, else an http:// or
/// https:// URL with a host.
pub fn endpoint(field: &str, url: &str) -> Result<Option<String>, RegistryError> {
    if url.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| RegistryError::invalid(format!("{field} {url:?}: {why}"));
    let uri: tonic::codegen::http::Uri =
        url.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
        return Err(bad("give an http:// or https:// URL"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(Some(url.trim_end_matches('/').to_string()))
}

impl TryFrom<pb::RegionServices> for RegionServices {
    type Error = RegistryError;

    fn try_from(s: pb::RegionServices) -> Result<Self, RegistryError> {
        check_name("region", &s.region)?;
        Ok(RegionServices {
            cache: endpoint("cache_endpoint", &s.cache_endpoint)?,
            processor: endpoint("processor_endpoint", &s.processor_endpoint)?,
            region: s.region,
        })
    }
}

impl From<&RegionServices> for pb::RegionServices {
    fn from(s: &RegionServices) -> Self {
        pb::RegionServices {
            region: s.region.clone(),
            cache_endpoint: s.cache.clone().unwrap_or_default(),
            processor_endpoint: s.processor.clone().unwrap_or_default(),
        }
    }
}

/// What registry keeps of an agent's registration. The credential itself is
/// never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub vm_name: String,
    pub hostname: String,
    pub group_address: String,
    pub epoch: u64,
    pub credential_sha256: String,
    pub registered_at: SystemTime,
}

/// What registry keeps of an operator token. The secret itself is never
/// stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: OperatorRole,
    pub secret_sha256: String,
    pub created_at: SystemTime,
}

/// Kept once a token named "bootstrap" was ever installed, so that a revoked
/// bootstrap token is not installed again from its file at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapMarker {
    pub installed_at: SystemTime,
}

/// A role from the wire; `None` for UNSPECIFIED or an unknown number.
pub fn role_from_proto(value: i32) -> Option<OperatorRole> {
    match pb::Role::try_from(value).ok()? {
        pb::Role::Unspecified => None,
        pb::Role::Reader => Some(OperatorRole::Reader),
        pb::Role::Operator => Some(OperatorRole::Operator),
        pb::Role::Admin => Some(OperatorRole::Admin),
    }
}

/// A role for the wire.
pub fn role_to_proto(role: OperatorRole) -> pb::Role {
    match role {
        OperatorRole::Reader => pb::Role::Reader,
        OperatorRole::Operator => pb::Role::Operator,
        OperatorRole::Admin => pb::Role::Admin,
    }
}

impl From<&TokenRecord> for pb::TokenInfo {
    fn from(t: &TokenRecord) -> Self {
        pb::TokenInfo {
            name: t.name.clone(),
            role: role_to_proto(t.role) as i32,
            created_at: Some(to_timestamp(t.created_at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "vm-1", "A.b_c", &"x".repeat(64)] {
            assert!(check_name("n", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(check_name("n", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_defaults_and_bounds() {
        let p = Policy::try_from(pb::ReplicationPolicy {
            name: "p".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.crash_consistent_interval, Duration::from_secs(5));
        assert_eq!(p.retention, 24 * HOUR);
        assert_eq!(p.keep_all_points_for, 2 * HOUR);

        // A short retention clamps the unset windows instead of refusing.
        let p = Policy::try_from(pb::ReplicationPolicy {
            name: "short".into(),
            recovery_point_retention: Some(to_duration(Duration::from_secs(60))),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.keep_all_points_for, Duration::from_secs(60));
        assert_eq!(p.app_consistent_frequency, Duration::from_secs(60));

        for bad in [
            pb::ReplicationPolicy {
                name: "p".into(),
                crash_consistent_interval: Some(to_duration(Duration::from_millis(10))),
                ..Default::default()
            },
            pb::ReplicationPolicy {
                name: "p".into(),
                recovery_point_retention: Some(to_duration(Duration::from_secs(16 * 86400))),
                ..Default::default()
            },
            pb::ReplicationPolicy {
                name: "p".into(),
                crash_consistent_interval: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                Policy::try_from(bad),
                Err(RegistryError::InvalidArgument(_))
            ));
        }
    }
}
