//! Target resources derived from the source VM, one naming convention for all:
//! a derived name is the name it comes from plus [`SUFFIX`]. Every one can be
//! overridden by the caller. See docs/naming.md.

use std::time::SystemTime;

use crate::error::RegistryError;
use crate::model::{check_name, DiskStorage, NetworkMapping, Overrides, ReplicaDisk, Targets, Vm};

/// The suffix of every derived name.
pub const SUFFIX: &str = "-ferry";

fn derived(field: &str, base: &str) -> Result<String, RegistryError> {
    let name = format!("{base}{SUFFIX}");
    check_name(field, &name).map_err(|_| {
        RegistryError::invalid(format!(
            "the derived {field} {name:?} is longer than 64 characters; name one in the request"
        ))
    })?;
    Ok(name)
}

/// The derived targets, and the network mappings that must be created for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Derivation {
    pub targets: Targets,
    pub new_mappings: Vec<NetworkMapping>,
}

/// Derives every target resource of `vm` replicated into `target_region`.
/// `mapping` looks up an existing network mapping by id.
pub fn derive_targets(
    vm: &Vm,
    target_region: &str,
    overrides: &Overrides,
    mapping: impl Fn(&str) -> Result<Option<NetworkMapping>, RegistryError>,
) -> Result<Derivation, RegistryError> {
    for disk_id in overrides.replica_disk_names.keys() {
        if !vm.disks.iter().any(|d| &d.id == disk_id) {
            return Err(RegistryError::invalid(format!(
                "replica_disk_names names disk {disk_id:?}, which VM {:?} does not have",
                vm.name
            )));
        }
    }
    let has_unmanaged = vm.disks.iter().any(|d| d.storage == DiskStorage::Unmanaged);
    if overrides.target_storage_account.is_some() && !has_unmanaged {
        return Err(RegistryError::invalid(format!(
            "target_storage_account is given but VM {:?} has no unmanaged disk",
            vm.name
        )));
    }

    let resource_group = match &overrides.resource_group {
        Some(name) => name.clone(),
        None => derived("target resource group", &vm.resource_group)?,
    };
    let availability_set = match (&overrides.availability_set, &vm.availability_set) {
        (Some(name), _) => Some(name.clone()),
        (None, Some(source)) => Some(derived("target availability set", source)?),
        (None, None) => None,
    };
    let cache_storage = match &overrides.cache_storage {
        Some(name) => name.clone(),
        None => derived("cache storage", &format!("{}-cache", vm.source_region))?,
    };
    let target_storage_account = match (&overrides.target_storage_account, has_unmanaged) {
        (Some(name), _) => Some(name.clone()),
        (None, true) => Some(derived(
            "target storage account",
            &format!("{}-storage", vm.resource_group),
        )?),
        (None, false) => None,
    };
    let mut replica_disks = Vec::with_capacity(vm.disks.len());
    for disk in &vm.disks {
        let name = match overrides.replica_disk_names.get(&disk.id) {
            Some(name) => name.clone(),
            None => derived("replica disk name", &format!("{}-{}", vm.name, disk.id))?,
        };
        replica_disks.push(ReplicaDisk {
            disk_id: disk.id.clone(),
            name,
            storage: disk.storage,
            storage_account: match disk.storage {
                DiskStorage::Managed => None,
                DiskStorage::Unmanaged => target_storage_account.clone(),
            },
            size_bytes: disk.size_bytes,
        });
    }

    // The network: an existing mapping of the source network into the target
    // region is reused; otherwise one is created, with its reverse.
    let forward_id = NetworkMapping::id_of(&vm.source_region, &vm.virtual_network, target_region);
    let mut new_mappings = Vec::new();
    let now = SystemTime::now();
    let virtual_network = match mapping(&forward_id)? {
        Some(existing) => {
            if let Some(wanted) = &overrides.virtual_network {
                if *wanted != existing.target_network {
                    return Err(RegistryError::precondition(format!(
                        "network {:?} of region {:?} is already mapped to {:?} in {target_region:?} \
                         (mapping {forward_id:?}); omit the virtual_network override or delete \
                         that mapping first",
                        vm.virtual_network, vm.source_region, existing.target_network
                    )));
                }
            }
            existing.target_network
        }
        None => {
            let target_network = match &overrides.virtual_network {
                Some(name) => name.clone(),
                None => derived("target virtual network", &vm.virtual_network)?,
            };
            new_mappings.push(NetworkMapping {
                source_region: vm.source_region.clone(),
                source_network: vm.virtual_network.clone(),
                target_region: target_region.to_string(),
                target_network: target_network.clone(),
                created_at: now,
            });
            target_network
        }
    };
    let reverse_id = NetworkMapping::id_of(target_region, &virtual_network, &vm.source_region);
    match mapping(&reverse_id)? {
        Some(existing) if existing.target_network != vm.virtual_network => {
            return Err(RegistryError::precondition(format!(
                "network {virtual_network:?} of region {target_region:?} already maps back to \
                 {:?}, not to {:?} (mapping {reverse_id:?}); choose another target \
                 virtual_network",
                existing.target_network, vm.virtual_network
            )));
        }
        Some(_) => {}
        None => new_mappings.push(NetworkMapping {
            source_region: target_region.to_string(),
            source_network: virtual_network.clone(),
            target_region: vm.source_region.clone(),
            target_network: vm.virtual_network.clone(),
            created_at: now,
        }),
    }

    Ok(Derivation {
        targets: Targets {
            region: target_region.to_string(),
            resource_group,
            virtual_network,
            subnet: overrides
                .subnet
                .clone()
                .unwrap_or_else(|| vm.subnet.clone()),
            availability_set,
            cache_storage,
            target_storage_account,
            replica_disks,
            network_mapping: forward_id,
            reverse_network_mapping: reverse_id,
        },
        new_mappings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Disk, DiskRole, Nic};
    use std::collections::BTreeMap;

    fn vm(avset: Option<&str>, unmanaged: bool) -> Vm {
        Vm {
            name: "web1".into(),
            source_region: "eastus".into(),
            resource_group: "prod-rg".into(),
            virtual_network: "prod-vnet".into(),
            subnet: "frontend".into(),
            availability_set: avset.map(String::from),
            nics: vec![Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".parse().unwrap(),
                mac_address: None,
            }],
            disks: vec![
                Disk {
                    id: "os".into(),
                    size_bytes: 1 << 30,
                    role: DiskRole::Os,
                    storage: DiskStorage::Managed,
                    source_path: "/img/os.raw".into(),
                },
                Disk {
                    id: "data0".into(),
                    size_bytes: 1 << 20,
                    role: DiskRole::Data,
                    storage: if unmanaged {
                        DiskStorage::Unmanaged
                    } else {
                        DiskStorage::Managed
                    },
                    source_path: "/img/data0.raw".into(),
                },
            ],
            registered_at: SystemTime::now(),
            shape: Default::default(),
        }
    }

    fn none(_: &str) -> Result<Option<NetworkMapping>, RegistryError> {
        Ok(None)
    }

    #[test]
    fn defaults_follow_the_convention() {
        let d = derive_targets(
            &vm(Some("web-avset"), true),
            "westus",
            &Overrides::default(),
            none,
        )
        .unwrap();
        let t = &d.targets;
        assert_eq!(t.region, "westus");
        assert_eq!(t.resource_group, "prod-rg-ferry");
        assert_eq!(t.virtual_network, "prod-vnet-ferry");
        assert_eq!(t.subnet, "frontend");
        assert_eq!(t.availability_set.as_deref(), Some("web-avset-ferry"));
        assert_eq!(t.cache_storage, "eastus-cache-ferry");
        assert_eq!(
            t.target_storage_account.as_deref(),
            Some("prod-rg-storage-ferry")
        );
        assert_eq!(t.replica_disks[0].name, "web1-os-ferry");
        assert_eq!(t.replica_disks[0].storage, DiskStorage::Managed);
        assert_eq!(t.replica_disks[0].storage_account, None);
        assert_eq!(t.replica_disks[1].name, "web1-data0-ferry");
        assert_eq!(
            t.replica_disks[1].storage_account.as_deref(),
            Some("prod-rg-storage-ferry")
        );
        assert_eq!(t.replica_disks[1].size_bytes, 1 << 20);
        assert_eq!(t.network_mapping, "eastus/prod-vnet->westus");
        assert_eq!(t.reverse_network_mapping, "westus/prod-vnet-ferry->eastus");
        assert_eq!(d.new_mappings.len(), 2);
        assert_eq!(d.new_mappings[1], d.new_mappings[0].reverse());
    }

    #[test]
    fn managed_only_and_no_avset_get_none() {
        let d = derive_targets(&vm(None, false), "westus", &Overrides::default(), none).unwrap();
        assert_eq!(d.targets.availability_set, None);
        assert_eq!(d.targets.target_storage_account, None);
    }

    #[test]
    fn every_override_wins() {
        let o = Overrides {
            resource_group: Some("dr-rg".into()),
            virtual_network: Some("dr-vnet".into()),
            subnet: Some("dr-sub".into()),
            availability_set: Some("dr-av".into()),
            cache_storage: Some("mycache".into()),
            target_storage_account: Some("drstore".into()),
            replica_disk_names: BTreeMap::from([("data0".to_string(), "d0".to_string())]),
        };
        let d = derive_targets(&vm(None, true), "westus", &o, none).unwrap();
        let t = &d.targets;
        assert_eq!(t.resource_group, "dr-rg");
        assert_eq!(t.virtual_network, "dr-vnet");
        assert_eq!(t.subnet, "dr-sub");
        assert_eq!(t.availability_set.as_deref(), Some("dr-av"));
        assert_eq!(t.cache_storage, "mycache");
        assert_eq!(t.target_storage_account.as_deref(), Some("drstore"));
        assert_eq!(t.replica_disks[0].name, "web1-os-ferry");
        assert_eq!(t.replica_disks[1].name, "d0");
        assert_eq!(
            t.replica_disks[1].storage_account.as_deref(),
            Some("drstore")
        );
        assert_eq!(d.new_mappings[0].target_network, "dr-vnet");
    }

    #[test]
    fn an_existing_mapping_is_reused_and_guarded() {
        let existing = NetworkMapping {
            source_region: "eastus".into(),
            source_network: "prod-vnet".into(),
            target_region: "westus".into(),
            target_network: "shared-dr".into(),
            created_at: SystemTime::now(),
        };
        let reverse = existing.reverse();
        let lookup = |id: &str| -> Result<Option<NetworkMapping>, RegistryError> {
            Ok([existing.clone(), reverse.clone()]
                .into_iter()
                .find(|m| m.id() == id))
        };
        let d = derive_targets(&vm(None, false), "westus", &Overrides::default(), lookup).unwrap();
        assert_eq!(d.targets.virtual_network, "shared-dr");
        assert!(d.new_mappings.is_empty());

        let o = Overrides {
            virtual_network: Some("other".into()),
            ..Default::default()
        };
        assert!(matches!(
            derive_targets(&vm(None, false), "westus", &o, lookup),
            Err(RegistryError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn bad_overrides_are_refused() {
        let o = Overrides {
            replica_disk_names: BTreeMap::from([("nope".to_string(), "x".to_string())]),
            ..Default::default()
        };
        assert!(derive_targets(&vm(None, false), "westus", &o, none).is_err());
        let o = Overrides {
            target_storage_account: Some("s".into()),
            ..Default::default()
        };
        assert!(derive_targets(&vm(None, false), "westus", &o, none).is_err());
        let mut long = vm(None, false);
        long.resource_group = "r".repeat(64);
        assert!(matches!(
            derive_targets(&long, "westus", &Overrides::default(), none),
            Err(RegistryError::InvalidArgument(m)) if m.contains("longer than 64")
        ));
    }
}
