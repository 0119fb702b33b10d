//! The libvirt backend: the target regions named in `[failover.libvirt]`
//! get real VMs. Records and disk images are the local inventory's (the
//! images are raw files the hypervisor host reads at the same path); on
//! top of them each network's subnets become isolated libvirt networks on
//! every host of the region, each VM a persistent domain on one host
//! (placed apart from its availability set's other VMs), each NIC a DHCP
//! host entry that gives it its private IP. Regions not named stay in the
//! local inventory alone.
//!
//! Every operation is idempotent, as job steps are: defining what exists
//! redefines it, deleting what is gone is done.

mod virsh;
pub mod xml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_runtime::Refused;
use serde::Deserialize;

use crate::error::FailoverError;
use crate::inventory::{Backend, LocalBackend, Network, Run, TargetVm};
pub use virsh::Virsh;

type Result<T> = std::result::Result<T, FailoverError>;

/// The `[failover.libvirt]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Hosts per target region, by libvirt connection URI
    /// (`qemu:///system`, `qemu+ssh://host/system`).
    pub regions: BTreeMap<String, Vec<String>>,
    /// The domain type: `kvm`, or `qemu` for software emulation.
    pub domain_type: String,
    /// How long start-vm waits for a VM to be ready, in seconds.
    pub start_timeout_secs: u64,
    /// The virsh program.
    pub virsh: PathBuf,
    /// How long one virsh call may take, in seconds.
    pub call_timeout_secs: u64,
    /// Where failover-svc serves recovery points over NBD to the VMs an
    /// instant failover starts (on loopback: the hosts are this machine);
    /// empty: instant failover is off. The port must stay the same across
    /// restarts: overlays name it.
    pub nbd_listen: String,
    /// The qemu-img program (overlays for instant failover).
    pub qemu_img: PathBuf,
    /// Caps hydration (the background copy of an instant failover's
    /// disks), in MiB/s per disk; 0 for no cap.
    pub hydrate_mib_per_sec: u64,
    /// A listener bound by the caller (tests bind 127.0.0.1:0), used
    /// instead of `nbd_listen`.
    #[serde(skip)]
    pub nbd_listener: Option<std::sync::Arc<std::net::TcpListener>>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            regions: BTreeMap::new(),
            domain_type: "kvm".into(),
            start_timeout_secs: 300,
            virsh: "virsh".into(),
            call_timeout_secs: 60,
            nbd_listen: "127.0.0.1:10809".into(),
            qemu_img: "qemu-img".into(),
            hydrate_mib_per_sec: 0,
            nbd_listener: None,
        }
    }
}

/// Why a libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("libvirt host {uri}: {what} did not answer within {after:?}")]
    Timeout {
        uri: String,
        what: String,
        after: Duration,
    },
    #[error("libvirt host {uri}: {what} failed: {message}")]
    Failed {
        uri: String,
        what: String,
        message: String,
    },
}

impl LibvirtError {
    /// Whether libvirt said the object is not there (so deleting it is
    /// done).
    fn is_missing(&self) -> bool {
        matches!(self, LibvirtError::Failed { message, .. }
            if ["not found", "no network with matching name", "no domain with matching name",
                "failed to get domain", "failed to get network"]
                .iter()
                .any(|m| message.contains(m)))
    }

    /// Whether libvirt said the object is not running (so stopping it is
    /// done).
    fn is_inactive(&self) -> bool {
        matches!(self, LibvirtError::Failed { message, .. }
            if message.contains("not running") || message.contains("is not active"))
    }
}

/// Ferry's names in libvirt: `ferry.` and the parts, each a path name
/// (letters, digits, '-', '_' escapes), joined by '.', which no part
/// holds: two different VMs or subnets never share a name.
pub mod names {
    use ferry_proto::ids::path_name;

    fn join(parts: &[&str]) -> String {
        let mut name = String::from("ferry");
        for p in parts {
            name.push('.');
            name.push_str(&path_name(p));
        }
        name
    }

    /// A VM's domain.
    pub fn domain(region: &str, resource_group: &str, vm: &str) -> String {
        join(&[region, resource_group, vm])
    }

    /// A subnet's network.
    pub fn network(region: &str, network: &str, subnet: &str) -> String {
        join(&[region, network, subnet])
    }
}

/// `virsh blockjob --info --raw`'s `cur=` and `end=`; None when it shows
/// no job.
fn job_progress(info: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        info.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse::<u64>().ok())
    };
    Some((field("cur=")?, field("end=")?))
}

/// The local inventory plus libvirt hosts.
pub struct LibvirtBackend {
    local: LocalBackend,
    settings: Settings,
    virsh: Virsh,
    consoles: PathBuf,
}

impl LibvirtBackend {
    /// `consoles` is where the domains' serial consoles are written.
    pub fn new(local: LocalBackend, settings: Settings, consoles: &Path) -> Result<LibvirtBackend> {
        for (region, hosts) in &settings.regions {
            if hosts.is_empty() {
                return Err(Refused::invalid_argument(format!(
                    "[failover.libvirt.regions] {region} names no host"
                ))
                .into());
            }
        }
        ferry_runtime::durable::create_dir_all(consoles)
            .map_err(|e| FailoverError::io(consoles, e))?;
        let virsh = Virsh::new(
            settings.virsh.clone(),
            Duration::from_secs(settings.call_timeout_secs.max(1)),
        );
        Ok(LibvirtBackend {
            local,
            settings,
            virsh,
            consoles: consoles.to_path_buf(),
        })
    }

    fn hosts(&self, region: &str) -> Option<&[String]> {
        self.settings.regions.get(region).map(Vec::as_slice)
    }

    fn virsh(&self, uri: &str, args: &[&str]) -> Result<String> {
        Ok(self.virsh.run(uri, args)?)
    }

    /// Runs `args`; "not there" counts as done.
    fn virsh_gone(&self, uri: &str, args: &[&str]) -> Result<()> {
        match self.virsh.run(uri, args) {
            Ok(_) => Ok(()),
            Err(e) if e.is_missing() || e.is_inactive() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Defines `xml` from a file beside the consoles (virsh reads it).
    fn define(&self, uri: &str, verb: &str, name: &str, xml: &str) -> Result<()> {
        let path = self.consoles.join(format!(".{name}.xml"));
        std::fs::write(&path, xml).map_err(|e| FailoverError::io(&path, e))?;
        let defined = self.virsh(uri, &[verb, &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        defined.map(|_| ())
    }

    /// The subnet's network exists and runs on `uri`.
    fn ensure_network(&self, uri: &str, name: &str, cidr: &str) -> Result<()> {
        let xml = xml::network(name, cidr).ok_or_else(|| {
            Refused::invalid_argument(format!(
                "subnet {cidr} cannot be a libvirt network: an IPv4 CIDR of /29 or larger is needed"
            ))
        })?;
        let active = match self.virsh.run(uri, &["net-info", name]) {
            Ok(info) => info
                .lines()
                .any(|l| l.starts_with("Active:") && l.contains("yes")),
            Err(e) if e.is_missing() => {
                self.define(uri, "net-define", name, &xml)?;
                false
            }
            Err(e) => return Err(e.into()),
        };
        if !active {
            self.virsh(uri, &["net-start", name])?;
        }
        self.virsh(uri, &["net-autostart", name])?;
        Ok(())
    }

    /// The host for a new VM: the region's host with the fewest VMs of its
    /// availability set (the set's VMs spread over hosts), then the fewest
    /// VMs; the first such in the config's order.
    fn place(&self, vm: &TargetVm, hosts: &[String]) -> Result<String> {
        let vms = self.local.vms()?;
        let count = |host: &str, same_set: bool| {
            vms.iter()
                .filter(|v| v.host == host && v.region == vm.region)
                .filter(|v| {
                    !same_set
                        || (!vm.availability_set.is_empty()
                            && v.availability_set == vm.availability_set)
                })
                .count()
        };
        hosts
            .iter()
            .min_by_key(|h| (count(h, true), count(h, false)))
            .cloned()
            .ok_or_else(|| Refused::failed_precondition("no libvirt host").into())
    }

    /// Removes the VM's DHCP host entries (each by MAC and address).
    fn forget_addresses(&self, vm: &TargetVm) -> Result<()> {
        for nic in &vm.nics {
            let Some(mac) = nic.mac_address else { continue };
            let network = names::network(&vm.region, &vm.virtual_network, &nic.subnet);
            let entry = xml::dhcp_host(&mac.to_string(), &nic.private_ip);
            match self.virsh.run(
                &vm.host,
                &[
                    "net-update",
                    &network,
                    "delete",
                    "ip-dhcp-host",
                    &entry,
                    "--live",
                    "--config",
                ],
            ) {
                Ok(_) => {}
                Err(e) if e.is_missing() => {}
                Err(LibvirtError::Failed { message, .. })
                    if message.contains("couldn't locate a matching dhcp host entry") =>
                {
                    // Already gone.
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Backend for LibvirtBackend {
    fn create_network(&self, network: Network) -> Result<Network> {
        if let Some(hosts) = self.hosts(&network.region) {
            // Checked before the record: a subnet libvirt cannot serve is
            // refused with nothing made.
            for s in &network.subnets {
                if xml::network("check", &s.address_prefix).is_none() {
                    return Err(Refused::invalid_argument(format!(
                        "subnet {} ({}) cannot be a libvirt network: an IPv4 CIDR of /29 or \
                         larger is needed",
                        s.name, s.address_prefix
                    ))
                    .into());
                }
            }
            let created = self.local.create_network(network)?;
            for host in hosts {
                for s in &created.subnets {
                    let name = names::network(&created.region, &created.name, &s.name);
                    self.ensure_network(host, &name, &s.address_prefix)?;
                }
            }
            return Ok(created);
        }
        self.local.create_network(network)
    }

    fn network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        self.local.network(region, name)
    }

    fn networks(&self, region: Option<&str>) -> Result<Vec<Network>> {
        self.local.networks(region)
    }

    fn disk_path(&self, region: &str, resource_group: &str, name: &str) -> PathBuf {
        self.local.disk_path(region, resource_group, name)
    }

    fn prepare_disk(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
        size: u64,
    ) -> Result<PathBuf> {
        self.local.prepare_disk(region, resource_group, name, size)
    }

    fn delete_network(&self, region: &str, name: &str) -> Result<Option<Network>> {
        let Some(hosts) = self.hosts(region) else {
            return self.local.delete_network(region, name);
        };
        let Some(net) = self.local.network(region, name)? else {
            return Ok(None);
        };
        // Refused while a VM is in it, before libvirt is touched.
        if self
            .local
            .vms()?
            .iter()
            .any(|v| v.region == region && v.virtual_network == name)
        {
            return self.local.delete_network(region, name);
        }
        for host in hosts {
            for s in &net.subnets {
                let libvirt_name = names::network(region, name, &s.name);
                self.virsh_gone(host, &["net-destroy", &libvirt_name])?;
                self.virsh_gone(host, &["net-undefine", &libvirt_name])?;
            }
        }
        self.local.delete_network(region, name)
    }

    fn put_vm(&self, mut vm: TargetVm) -> Result<TargetVm> {
        let Some(hosts) = self.hosts(&vm.region) else {
            return self.local.put_vm(vm);
        };
        // A VM keeps the host it was placed on.
        let earlier = self.local.vm(&vm.region, &vm.resource_group, &vm.name)?;
        vm.host = match earlier.as_ref().filter(|e| hosts.contains(&e.host)) {
            Some(e) => e.host.clone(),
            None => self.place(&vm, hosts)?,
        };
        vm.domain = names::domain(&vm.region, &vm.resource_group, &vm.name);
        vm.console_path = self
            .consoles
            .join(format!("{}.log", vm.domain))
            .to_string_lossy()
            .into_owned();
        // Its NICs' networks exist on its host (a network created before
        // this region was configured for libvirt included).
        let net = self
            .local
            .network(&vm.region, &vm.virtual_network)?
            .ok_or_else(|| {
                Refused::failed_precondition(format!(
                    "network {} is not in {}",
                    vm.virtual_network, vm.region
                ))
            })?;
        let mut networks = Vec::new();
        for nic in &vm.nics {
            let subnet = net
                .subnets
                .iter()
                .find(|s| s.name == nic.subnet)
                .ok_or_else(|| {
                    Refused::failed_precondition(format!(
                        "network {} has no subnet {}",
                        net.name, nic.subnet
                    ))
                })?;
            let name = names::network(&vm.region, &net.name, &subnet.name);
            self.ensure_network(&vm.host, &name, &subnet.address_prefix)?;
            networks.push(name);
        }
        // Entries of an earlier run (a resumed step, another address) go
        // first, then this VM's.
        if let Some(e) = &earlier {
            if e.host == vm.host {
                self.forget_addresses(e)?;
            }
        }
        self.forget_addresses(&vm)?;
        for (nic, network) in vm.nics.iter().zip(&networks) {
            let Some(mac) = nic.mac_address else { continue };
            let entry = xml::dhcp_host(&mac.to_string(), &nic.private_ip);
            self.virsh(
                &vm.host,
                &[
                    "net-update",
                    network,
                    "add-last",
                    "ip-dhcp-host",
                    &entry,
                    "--live",
                    "--config",
                ],
            )?;
        }
        // The console starts empty: a ready marker from an earlier boot
        // must not pass for this one.
        match std::fs::remove_file(&vm.console_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FailoverError::io(Path::new(&vm.console_path), e)),
        }
        let domain = xml::domain(&vm, &self.settings.domain_type, &networks);
        // A running domain of an earlier run is stopped so it boots anew
        // from this run's disks.
        self.virsh_gone(&vm.host, &["destroy", &vm.domain])?;
        self.define(&vm.host, "define", &vm.domain, &domain)?;
        self.local.put_vm(vm)
    }

    fn start_vm(&self, vm: &TargetVm) -> Result<Run> {
        if vm.host.is_empty() {
            return Ok(Run::Nothing);
        }
        if self.run_state(vm)? == Run::Running {
            return Ok(Run::Running);
        }
        self.virsh(&vm.host, &["start", &vm.domain])?;
        Ok(Run::Running)
    }

    fn run_state(&self, vm: &TargetVm) -> Result<Run> {
        if vm.host.is_empty() {
            return Ok(Run::Nothing);
        }
        let state = self.virsh(&vm.host, &["domstate", &vm.domain])?;
        let state = state.trim();
        Ok(if state == "running" {
            Run::Running
        } else {
            Run::Stopped(state.to_string())
        })
    }

    fn starts_vms(&self, region: &str) -> bool {
        self.hosts(region).is_some()
    }

    fn record_vm(&self, vm: TargetVm) -> Result<TargetVm> {
        self.local.put_vm(vm)
    }

    fn start_pull(&self, vm: &TargetVm, index: usize, bandwidth_mib: u64) -> Result<()> {
        if vm.host.is_empty() {
            return Err(Refused::failed_precondition(format!(
                "VM {} does not run on a libvirt host",
                vm.name
            ))
            .into());
        }
        let disk = xml::disk_target(index);
        let bandwidth = bandwidth_mib.to_string();
        let mut args = vec!["blockpull", vm.domain.as_str(), disk.as_str()];
        if bandwidth_mib > 0 {
            args.extend(["--bandwidth", bandwidth.as_str()]);
        }
        self.virsh(&vm.host, &args).map(|_| ())
    }

    fn pull_progress(&self, vm: &TargetVm, index: usize) -> Result<Option<(u64, u64)>> {
        if vm.host.is_empty() {
            return Ok(None);
        }
        let disk = xml::disk_target(index);
        let info = self.virsh(
            &vm.host,
            &["blockjob", &vm.domain, &disk, "--info", "--raw"],
        )?;
        Ok(job_progress(&info))
    }

    fn vms(&self) -> Result<Vec<TargetVm>> {
        self.local.vms()
    }

    fn delete_vm(
        &self,
        region: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Option<TargetVm>> {
        let Some(vm) = self.local.vm(region, resource_group, name)? else {
            return Ok(None);
        };
        if !vm.host.is_empty() {
            self.virsh_gone(&vm.host, &["destroy", &vm.domain])?;
            self.virsh_gone(&vm.host, &["undefine", "--nvram", &vm.domain])?;
            self.forget_addresses(&vm)?;
            match std::fs::remove_file(&vm.console_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FailoverError::io(Path::new(&vm.console_path), e)),
            }
        }
        self.local.delete_vm(region, resource_group, name)
    }
}
