//! The target regions' inventory: virtual networks with subnets, and the VMs
//! failovers create with their NICs and disks. Orchestration goes through
//! [`Backend`]; [`LocalBackend`] keeps records in sled and disks as sparse
//! raw images under `<data>/regions/<region>/<resource group>/` and starts
//! nothing. [`crate::libvirt::LibvirtBackend`] keeps the same records and
//! images and makes them real on libvirt hosts: networks, domains, DHCP
//! host entries.

use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ferry_proto::ids::MacAddr;
use ferry_runtime::Refused;
use serde::{Deserialize, Serialize};

use crate::error::FailoverError;

type Result<T> = std::result::Result<T, FailoverError>;

/// A subnet: name and IPv4 CIDR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subnet {
    pub name: String,
    pub address_prefix: String,
}

/// A virtual network of a target region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub region: String,
    pub resource_group: String,
    pub name: String,
    pub subnets: Vec<Subnet>,
}

/// A NIC of a created VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub subnet: String,
    pub private_ip: String,
    /// None only in records written before MACs were kept.
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

/// Direct kernel boot: files on the hypervisor host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// The VM's size and how it boots, as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub firmware: Firmware,
    pub kernel_boot: Option<KernelBoot>,
    /// Console text that says the guest is ready; None: running is ready.
    pub ready_marker: Option<String>,
}

/// Registry's defaults, for records written before shapes.
impl Default for Shape {
    fn default() -> Shape {
        Shape {
            vcpus: 1,
            memory_mib: 512,
            firmware: Firmware::Bios,
            kernel_boot: None,
            ready_marker: None,
        }
    }
}

/// How a disk's image is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    /// A sparse raw image (materialized).
    #[default]
    Raw,
    /// A qcow2 overlay (instant failover), on the point while `backing`.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk of a created VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub disk_id: String,
    pub name: String,
    pub size_bytes: u64,
    pub path: PathBuf,
    /// The source VM's OS disk: the one it boots from.
    #[serde(default)]
    pub os: bool,
    #[serde(default)]
    pub format: DiskFormat,
    /// The NBD URL of the point an overlay reads what it does not hold
    /// yet; None once hydrated (and for raw images).
    #[serde(default)]
    pub backing: Option<String>,
}

/// A VM a failover created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetVm {
    pub region: String,
    pub resource_group: String,
    pub name: String,
    pub source_vm: String,
    pub virtual_network: String,
    pub availability_set: String,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    pub point_id: String,
    pub test: bool,
    pub job_id: String,
    pub created_nanos: u64,
    #[serde(default)]
    pub shape: Shape,
    /// Where it runs: a libvirt connection URI; empty in the local
    /// inventory.
    #[serde(default)]
    pub host: String,
    /// Its libvirt domain; empty in the local inventory.
    #[serde(default)]
    pub domain: String,
    /// Its first serial port's file on the host; empty in the local
    /// inventory.
    #[serde(default)]
    pub console_path: String,
}

/// Where a started VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// The backend starts nothing (the local inventory).
    Nothing,
    /// It runs.
    Running,
    /// It is not running: the hypervisor's word for its state.
    Stopped(String),
}

/// What orchestration needs of a target region.
pub trait Backend: Send + Sync {
    /// Creates a network; the same again is a no-op, another with the same
    /// name is ALREADY_EXISTS.
    fn create_network(&self, network: Network) -> Result<Network>;
    /// A network by region and name.
    fn network(&self, region: &str, name: &str) -> Result<Option<Network>>;
    /// Every network, or a region's.
    fn networks(&self, region: Option<&str>) -> Result<Vec<Network>>;
    /// Where a disk's image lives.
    fn disk_path(&self, region: &str, resource_group: &str, name: &str) -> PathBuf;
    /// An empty sparse disk image of `size` bytes at the disk's place
    /// (replacing what was there); its path.
    fn prepare_disk(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
        size: u64,
    ) -> Result<PathBuf>;
    /// Deletes a network that no VM is in (FAILED_PRECONDITION while one
    /// is); what it was, None if there was none.
    fn delete_network(&self, region: &str, name: &str) -> Result<Option<Network>>;
    /// Records a VM (replacing one of the same region, group and name) and
    /// defines it where the backend runs VMs, not started; the VM as
    /// recorded (with its host, domain and console when it has them).
    fn put_vm(&self, vm: TargetVm) -> Result<TargetVm>;
    /// Starts a recorded VM; one that runs already is left as it is.
    fn start_vm(&self, _vm: &TargetVm) -> Result<Run> {
        Ok(Run::Nothing)
    }
    /// Where a recorded VM is.
    fn run_state(&self, _vm: &TargetVm) -> Result<Run> {
        Ok(Run::Nothing)
    }
    /// Whether the VMs of `region` run on a hypervisor (an instant
    /// failover needs one to hydrate its disks).
    fn starts_vms(&self, _region: &str) -> bool {
        false
    }
    /// Updates a VM's record alone; where it runs is left as it is.
    fn record_vm(&self, vm: TargetVm) -> Result<TargetVm>;
    /// Starts copying what disk `index`'s overlay does not hold from its
    /// backing into it, at most `bandwidth_mib` MiB/s (0: no cap); the
    /// overlay then has no backing. The VM runs.
    fn start_pull(&self, vm: &TargetVm, _index: usize, _bandwidth_mib: u64) -> Result<()> {
        Err(Refused::failed_precondition(format!(
            "VM {} does not run on a hypervisor: its disks cannot be pulled live",
            vm.name
        ))
        .into())
    }
    /// The pull running on disk `index`: (bytes done, bytes in all); None
    /// when none runs.
    fn pull_progress(&self, _vm: &TargetVm, _index: usize) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// Every VM.
    fn vms(&self) -> Result<Vec<TargetVm>>;
    /// Stops and deletes a VM and its disk images (and, with a hypervisor,
    /// its domain and DHCP entries); what it was.
    fn delete_vm(&self, region: &str, resource_group: &str, name: &str)
        -> Result<Option<TargetVm>>;
}

/// Records in sled, disks as files.
pub struct LocalBackend {
    tree: sled::Tree,
    db: sled::Db,
    root: PathBuf,
}

fn key(kind: &str, parts: &[&str]) -> Vec<u8> {
    let mut k = kind.as_bytes().to_vec();
    for p in parts {
        k.push(0);
        k.extend_from_slice(p.as_bytes());
    }
    k
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

fn unjson<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

fn path_part(s: &str) -> String {
    ferry_runtime::path_name(s)
}

impl LocalBackend {
    pub fn new(db: &sled::Db, root: &Path) -> Result<LocalBackend> {
        fs::create_dir_all(root).map_err(|e| FailoverError::io(root, e))?;
        Ok(LocalBackend {
            tree: db.open_tree("inventory")?,
            db: db.clone(),
            root: root.to_path_buf(),
        })
    }
}

impl Backend for LocalBackend {
    fn create_network(&self, network: Network) -> Result<Network> {
        let k = key("net", &[&network.region, &network.name]);
        if let Some(old) = self.tree.get(&k)? {
            let old: Network = unjson(&old)?;
            if old == network {
                return Ok(old);
            }
            return Err(Refused::already_exists(format!(
                "network {:?} exists in {} with other settings",
                network.name, network.region
            ))
            .into());
        }
        self.tree.insert(k, json(&network)?)?;
        self.db.flush()?;
        Ok(network)
    }

    fn network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        self.tree
            .get(key("net", &[region, name]))?
            .map(|b| unjson(&b))
            .transpose()
    }

    fn networks(&self, region: Option<&str>) -> Result<Vec<Network>> {
        // "net\0<region>\0" for one region, "net\0" for all.
        let prefix = match region {
            Some(r) => key("net", &[r, ""]),
            None => key("net", &[""]),
        };
        self.tree
            .scan_prefix(prefix)
            .map(|kv| unjson(&kv?.1))
            .collect()
    }

    fn disk_path(&self, region: &str, resource_group: &str, name: &str) -> PathBuf {
        self.root
            .join(path_part(region))
            .join(path_part(resource_group))
            .join(format!("{}.raw", path_part(name)))
    }

    fn prepare_disk(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
        size: u64,
    ) -> Result<PathBuf> {
        let path = self.disk_path(region, resource_group, name);
        if let Some(dir) = path.parent() {
            ferry_runtime::durable::create_dir_all(dir).map_err(|e| FailoverError::io(dir, e))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| FailoverError::io(&path, e))?;
        f.set_len(size).map_err(|e| FailoverError::io(&path, e))?;
        if let Some(dir) = path.parent() {
            ferry_runtime::durable::sync_dir(dir).map_err(|e| FailoverError::io(dir, e))?;
        }
        Ok(path)
    }

    fn delete_network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        let Some(net) = self.network(region, name)? else {
            return Ok(None);
        };
        let users: Vec<String> = self
            .vms()?
            .into_iter()
            .filter(|v| v.region == region && v.virtual_network == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "network {name:?} in {region} still has VM {}; clean up or delete {} first",
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            ))
            .into());
        }
        self.tree.remove(key("net", &[region, name]))?;
        self.db.flush()?;
        Ok(Some(net))
    }

    fn put_vm(&self, vm: TargetVm) -> Result<TargetVm> {
        let k = key("vm", &[&vm.region, &vm.resource_group, &vm.name]);
        self.tree.insert(k, json(&vm)?)?;
        self.db.flush()?;
        Ok(vm)
    }

    fn record_vm(&self, vm: TargetVm) -> Result<TargetVm> {
        self.put_vm(vm)
    }

    fn vms(&self) -> Result<Vec<TargetVm>> {
        self.tree
            .scan_prefix(b"vm\0")
            .map(|kv| unjson(&kv?.1))
            .collect()
    }

    fn delete_vm(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Option<TargetVm>> {
        self.delete_record(region, resource_group, name)
    }
}

impl LocalBackend {
    /// A VM's record, if any.
    pub fn vm(&self, region: &str, resource_group: &str, name: &str) -> Result<Option<TargetVm>> {
        self.tree
            .get(key("vm", &[region, resource_group, name]))?
            .map(|b| unjson(&b))
            .transpose()
    }

    /// Deletes a VM's disk images and record.
    fn delete_record(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Option<TargetVm>> {
        let k = key("vm", &[region, resource_group, name]);
        let Some(old) = self.tree.get(&k)? else {
            return Ok(None);
        };
        let vm: TargetVm = unjson(&old)?;
        for d in &vm.disks {
            match fs::remove_file(&d.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FailoverError::io(&d.path, e)),
            }
        }
        self.tree.remove(k)?;
        self.db.flush()?;
        Ok(Some(vm))
    }
}

/// Opens a prepared disk image for writing.
pub fn open_disk(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| FailoverError::io(path, e))
}

/// Parses `a.b.c.d/n`.
pub fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if len > 30 {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(ip) & mask, len))
}

/// The address for a NIC in `cidr`: `wanted` when the subnet contains it
/// and it is free, else the lowest free host address (the first four and
/// the last are reserved, as in Azure).
pub fn assign_ip(cidr: &str, wanted: &str, used: &[String]) -> Option<String> {
    let (base, len) = parse_cidr(cidr)?;
    let size = 1u64 << (32 - len);
    let first = u64::from(base) + 4;
    let last = u64::from(base) + size - 2;
    let taken = |ip: u64| {
        used.iter().any(|u| {
            u.parse::<Ipv4Addr>()
                .is_ok_and(|a| u64::from(u32::from(a)) == ip)
        })
    };
    if let Ok(w) = wanted.parse::<Ipv4Addr>() {
        let w = u64::from(u32::from(w));
        if (first..=last).contains(&w) && !taken(w) {
            return Some(Ipv4Addr::from(w as u32).to_string());
        }
    }
    (first..=last)
        .find(|ip| !taken(*ip))
        .map(|ip| Ipv4Addr::from(ip as u32).to_string())
}

/// A /24 around `ip` (the subnet of a network failover creates).
pub fn subnet_around(ip: &str) -> String {
    match ip.parse::<Ipv4Addr>() {
        Ok(a) => {
            let o = a.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Err(_) => "10.0.0.0/24".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_kept_when_the_subnet_holds_them_else_the_next_free_one() {
        assert_eq!(
            assign_ip("10.1.0.0/24", "10.1.0.7", &[]).as_deref(),
            Some("10.1.0.7")
        );
        assert_eq!(
            assign_ip("10.1.0.0/24", "10.1.0.7", &["10.1.0.7".into()]).as_deref(),
            Some("10.1.0.4")
        );
        assert_eq!(
            assign_ip("10.2.0.0/24", "10.1.0.7", &[]).as_deref(),
            Some("10.2.0.4")
        );
        assert_eq!(
            assign_ip("10.2.0.0/24", "10.2.0.1", &[]).as_deref(),
            Some("10.2.0.4")
        );
        let full: Vec<String> = (4..=254).map(|i| format!("10.3.0.{i}")).collect();
        assert_eq!(assign_ip("10.3.0.0/24", "", &full), None);
        assert_eq!(subnet_around("192.168.7.9"), "192.168.7.0/24");
        assert!(parse_cidr("10.0.0.0/33").is_none());
    }
}
