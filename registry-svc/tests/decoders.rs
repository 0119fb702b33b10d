//! Property tests of every `TryFrom<proto>` of registry-svc's domain (what
//! the API validates on receipt), over messages of any field values: huge,
//! negative, empty, unknown enum numbers, names of any characters. Each is
//! accepted exactly when its rules say so, or refused with INVALID_ARGUMENT,
//! never a panic; what is accepted comes back the same through its `From`.
//! Bounded for CI; `PROPTEST_CASES=100000` runs longer (docs/reliability.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::collections::HashMap;
use std::time::Duration;

use ferry_proto::registry::v1 as pb;
use ferry_testkit::props;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use registry_svc::lifecycle::State;
use registry_svc::model::{
    check_name, Disk, EnableRequest, Health, NetworkMapping, Overrides, Policy, Vm, MAX_DISK_BYTES,
    MAX_NAME_LEN,
};
use registry_svc::RegistryError;

/// Names: mostly valid ones, and every way of being invalid.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9][a-zA-Z0-9._-]{0,12}",
        1 => Just(String::new()),
        1 => Just("x".repeat(MAX_NAME_LEN)),
        1 => Just("x".repeat(MAX_NAME_LEN + 1)),
        1 => "[-._ /][a-z]{0,4}",
        1 => "\\PC{0,70}",
    ]
}

/// What a name's rules say, independently of `check_name`.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Mostly valid names, so that whole messages are accepted often enough.
fn mostly_valid_name() -> impl Strategy<Value = String> {
    prop_oneof![24 => "[a-zA-Z0-9][a-zA-Z0-9._-]{0,12}", 1 => name()]
}

fn enum_int() -> impl Strategy<Value = i32> {
    prop_oneof![
        0i32..12,
        Just(-1),
        Just(i32::MAX),
        Just(i32::MIN),
        any::<i32>()
    ]
}

fn disk() -> impl Strategy<Value = pb::Disk> {
    let size = prop_oneof![
        12 => (1u64..1 << 20).prop_map(|s| s * 512),
        1 => Just(0u64),
        1 => Just(512),
        1 => Just(511),
        1 => Just(513),
        1 => Just(MAX_DISK_BYTES),
        1 => Just(MAX_DISK_BYTES + 512),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 512 * 512),
        1 => any::<u64>(),
    ];
    let path = prop_oneof![
        12 => Just("/images/os.raw".to_string()),
        1 => Just(String::new()),
        1 => Just(" \t".to_string()),
        1 => Just("a\0b".to_string()),
        1 => "\\PC{0,20}",
    ];
    let role = prop_oneof![12 => 1i32..=2, 1 => enum_int()];
    let storage = prop_oneof![12 => 1i32..=2, 1 => enum_int()];
    (mostly_valid_name(), size, role, storage, path).prop_map(
        |(id, size_bytes, role, storage, source_path)| pb::Disk {
            id,
            size_bytes,
            role,
            storage,
            source_path,
        },
    )
}

fn disk_ok(d: &pb::Disk) -> bool {
    name_ok(&d.id)
        && d.size_bytes > 0
        && d.size_bytes <= MAX_DISK_BYTES
        && d.size_bytes.is_multiple_of(512)
        && (1..=2).contains(&d.role)
        && (1..=2).contains(&d.storage)
        && !d.source_path.trim().is_empty()
        && !d.source_path.contains('\0')
}

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string()),
        4 => any::<[u8; 16]>().prop_map(|o| std::net::Ipv6Addr::from(o).to_string()),
        1 => Just("10.0.0.4".to_string()),
        1 => Just("010.0.0.4".to_string()),
        1 => Just("0:0::1".to_string()),
        1 => Just("256.0.0.1".to_string()),
        1 => "\\PC{0,16}",
    ]
}

fn vm() -> impl Strategy<Value = pb::Vm> {
    (
        vec(mostly_valid_name(), 6),
        prop_oneof![8 => vec((mostly_valid_name(), ip()), 1..3), 1 => Just(Vec::new())],
        prop_oneof![8 => vec(disk(), 1..3), 1 => Just(Vec::new())],
    )
        .prop_map(|(names, nics, disks)| pb::Vm {
            name: names[0].clone(),
            source_region: names[1].clone(),
            resource_group: names[2].clone(),
            virtual_network: names[3].clone(),
            subnet: names[4].clone(),
            availability_set: names[5].clone(),
            nics: nics
                .into_iter()
                .map(|(name, private_ip)| pb::Nic {
                    name,
                    private_ip,
                    mac_address: String::new(),
                })
                .collect(),
            disks,
            registered_at: None,
            shape: None,
        })
}

fn vm_ok(v: &pb::Vm) -> bool {
    let names = [
        &v.name,
        &v.source_region,
        &v.resource_group,
        &v.virtual_network,
        &v.subnet,
    ];
    let mut nic_names = std::collections::BTreeSet::new();
    let mut ips = std::collections::BTreeSet::new();
    let nics_ok = v.nics.iter().all(|n| {
        let ip = n.private_ip.parse::<std::net::IpAddr>();
        name_ok(&n.name) && ip.is_ok() && nic_names.insert(&n.name) && ips.insert(ip.ok())
    });
    let mut ids = std::collections::BTreeSet::new();
    let disks_ok = v.disks.iter().all(|d| disk_ok(d) && ids.insert(&d.id));
    names.iter().all(|n| name_ok(n))
        && (v.availability_set.is_empty() || name_ok(&v.availability_set))
        && !v.nics.is_empty()
        && nics_ok
        && !v.disks.is_empty()
        && disks_ok
        && v.disks.iter().filter(|d| d.role == 1).count() <= 1
}

/// A duration field: unset, a plausible value in `plausible` seconds, or
/// anything at all (negative, huge, nanos out of range).
fn duration(
    plausible: std::ops::RangeInclusive<i64>,
) -> impl Strategy<Value = Option<prost_types::Duration>> {
    let seconds = prop_oneof![
        Just(0i64),
        1i64..5,
        Just(15 * 24 * 3600),
        Just(15 * 24 * 3600 + 1),
        Just(-1),
        Just(i64::MAX),
        Just(i64::MIN),
        any::<i64>(),
    ];
    let nanos = prop_oneof![
        Just(0i32),
        Just(999_999_999),
        Just(1_000_000_000),
        Just(-1),
        any::<i32>(),
    ];
    let wild =
        (seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos });
    let plausible = plausible.prop_map(|seconds| prost_types::Duration { seconds, nanos: 0 });
    prop_oneof![
        3 => Just(None),
        8 => plausible.prop_map(Some),
        1 => wild.prop_map(Some),
    ]
}

fn policy() -> impl Strategy<Value = pb::ReplicationPolicy> {
    (
        mostly_valid_name(),
        (
            duration(3600..=15 * 24 * 3600),
            duration(1..=60),
            duration(0..=3600),
            duration(1..=3600),
            duration(0..=3600),
            duration(60..=86400),
        ),
        any::<bool>(),
    )
        .prop_map(|(name, d, multi_vm_consistency)| pb::ReplicationPolicy {
            name,
            recovery_point_retention: d.0,
            crash_consistent_interval: d.1,
            app_consistent_frequency: d.2,
            multi_vm_consistency,
            multi_vm_interval: d.3,
            keep_all_points_for: d.4,
            thinned_point_spacing: d.5,
            created_at: None,
        })
}

fn overrides() -> impl Strategy<Value = pb::TargetOverrides> {
    (
        vec(prop_oneof![3 => Just(String::new()), 1 => name()], 6),
        hash_map("\\PC{0,8}", name(), 0..3),
    )
        .prop_map(|(n, replica_disk_names)| pb::TargetOverrides {
            resource_group: n[0].clone(),
            virtual_network: n[1].clone(),
            subnet: n[2].clone(),
            availability_set: n[3].clone(),
            cache_storage: n[4].clone(),
            target_storage_account: n[5].clone(),
            replica_disk_names: replica_disk_names.into_iter().collect::<HashMap<_, _>>(),
        })
}

fn overrides_ok(o: &pb::TargetOverrides) -> bool {
    [
        &o.resource_group,
        &o.virtual_network,
        &o.subnet,
        &o.availability_set,
        &o.cache_storage,
        &o.target_storage_account,
    ]
    .iter()
    .all(|n| n.is_empty() || name_ok(n))
        && o.replica_disk_names.values().all(|n| name_ok(n))
}

/// A refusal is INVALID_ARGUMENT, as the API answers it.
fn invalid(e: RegistryError) -> Result<(), TestCaseError> {
    prop_assert!(matches!(e, RegistryError::InvalidArgument(_)), "{:?}", e);
    prop_assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    Ok(())
}

proptest! {
    #![proptest_config(props::config(1000))]

    #[test]
    fn names_are_checked_by_their_rules(n in name()) {
        match check_name("n", &n) {
            Ok(()) => prop_assert!(name_ok(&n)),
            Err(e) => {
                prop_assert!(!name_ok(&n));
                invalid(e)?;
            }
        }
    }

    #[test]
    fn a_disk_is_accepted_exactly_by_its_rules_and_round_trips(d in disk()) {
        match Disk::try_from(d.clone()) {
            Ok(disk) => {
                prop_assert!(disk_ok(&d), "accepted {:?}", d);
                prop_assert_eq!(pb::Disk::from(&disk), d);
            }
            Err(e) => {
                prop_assert!(!disk_ok(&d), "refused {:?}", d);
                invalid(e)?;
            }
        }
    }

    #[test]
    fn a_vm_is_accepted_exactly_by_its_rules_and_round_trips(v in vm()) {
        match Vm::try_from(v.clone()) {
            Ok(vm) => {
                prop_assert!(vm_ok(&v), "accepted {:?}", v);
                let back = Vm::try_from(pb::Vm::from(&vm));
                prop_assert!(back.is_ok(), "{:?}", back);
                let back = Vm {
                    registered_at: vm.registered_at,
                    ..back.unwrap()
                };
                prop_assert_eq!(back, vm);
            }
            Err(e) => {
                prop_assert!(!vm_ok(&v), "refused {:?}", v);
                invalid(e)?;
            }
        }
    }

    #[test]
    fn a_policy_is_within_its_bounds_or_refused_and_round_trips(p in policy()) {
        match Policy::try_from(p.clone()) {
            Ok(policy) => {
                prop_assert!(name_ok(&p.name));
                let crash = policy.crash_consistent_interval;
                prop_assert!(crash >= Duration::from_secs(1) && crash <= Duration::from_secs(3600));
                prop_assert!(policy.retention >= crash && policy.retention <= Policy::MAX_RETENTION);
                let app = policy.app_consistent_frequency;
                prop_assert!(app.is_zero() || (app >= crash && app <= policy.retention));
                prop_assert!(policy.keep_all_points_for <= policy.retention);
                prop_assert!(policy.thinned_point_spacing >= crash);
                let back = Policy::try_from(pb::ReplicationPolicy::from(&policy));
                prop_assert!(back.is_ok(), "{:?}", back);
                let back = Policy {
                    created_at: policy.created_at,
                    ..back.unwrap()
                };
                prop_assert_eq!(back, policy);
            }
            Err(e) => invalid(e)?,
        }
    }

    #[test]
    fn a_network_mapping_is_accepted_exactly_by_its_rules(names in vec(name(), 4)) {
        let req = pb::CreateNetworkMappingRequest {
            source_region: names[0].clone(),
            source_network: names[1].clone(),
            target_region: names[2].clone(),
            target_network: names[3].clone(),
        };
        match NetworkMapping::try_from(req) {
            Ok(m) => {
                prop_assert!(names.iter().all(|n| name_ok(n)));
                let pb = pb::NetworkMapping::from(&m);
                prop_assert_eq!(
                    [pb.source_region, pb.source_network, pb.target_region, pb.target_network],
                    [names[0].clone(), names[1].clone(), names[2].clone(), names[3].clone()]
                );
                prop_assert_eq!(pb.id, NetworkMapping::id_of(&names[0], &names[1], &names[2]));
            }
            Err(e) => {
                prop_assert!(!names.iter().all(|n| name_ok(n)));
                invalid(e)?;
            }
        }
    }

    #[test]
    fn an_enable_request_is_accepted_exactly_by_its_rules(
        names in vec(name(), 2),
        policy in prop_oneof![Just(String::new()), name()],
        group in prop_oneof![Just(String::new()), name()],
        o in proptest::option::of(overrides()),
    ) {
        let req = pb::EnableReplicationRequest {
            vm_name: names[0].clone(),
            target_region: names[1].clone(),
            policy_name: policy.clone(),
            replication_group: group.clone(),
            overrides: o.clone(),
        };
        let ok = names.iter().all(|n| name_ok(n))
            && (policy.is_empty() || name_ok(&policy))
            && (group.is_empty() || name_ok(&group))
            && o.as_ref().is_none_or(overrides_ok);
        match EnableRequest::try_from(req) {
            Ok(r) => {
                prop_assert!(ok);
                prop_assert_eq!(r.policy, (!policy.is_empty()).then_some(policy));
                prop_assert_eq!(r.group, (!group.is_empty()).then_some(group));
                if let Some(o) = o {
                    prop_assert_eq!(r.overrides.replica_disk_names.len(), o.replica_disk_names.len());
                }
            }
            Err(e) => {
                prop_assert!(!ok);
                invalid(e)?;
            }
        }
    }

    #[test]
    fn overrides_are_accepted_exactly_by_their_rules(o in overrides()) {
        match Overrides::try_from(o.clone()) {
            Ok(_) => prop_assert!(overrides_ok(&o)),
            Err(e) => {
                prop_assert!(!overrides_ok(&o));
                invalid(e)?;
            }
        }
    }

    /// Enum numbers of any value: a known one round-trips, an unknown one
    /// (or UNSPECIFIED) is None.
    #[test]
    fn enum_numbers_of_any_value_never_panic(n in enum_int()) {
        match State::from_pb(n) {
            Some(s) => prop_assert_eq!(s.to_pb() as i32, n),
            None => prop_assert!(!(1..=9).contains(&n)),
        }
        match Health::from_pb(n) {
            Some(h) => prop_assert_eq!(h.to_pb() as i32, n),
            None => prop_assert!(!(1..=3).contains(&n)),
        }
    }
}

/// The regression behind MAX_DISK_BYTES: a disk near u64::MAX was accepted,
/// and the processor's chunk arithmetic overflowed on it (a damaged record
/// near its end panicked the pipeline in debug builds, looped in release).
#[test]
fn a_disk_larger_than_64_tib_is_refused() {
    let disk = |size_bytes| pb::Disk {
        id: "os".into(),
        size_bytes,
        role: pb::DiskRole::Os as i32,
        storage: pb::DiskStorage::Managed as i32,
        source_path: "/images/os.raw".into(),
    };
    assert!(Disk::try_from(disk(MAX_DISK_BYTES)).is_ok());
    for size in [MAX_DISK_BYTES + 512, u64::MAX / 512 * 512] {
        assert!(matches!(
            Disk::try_from(disk(size)),
            Err(RegistryError::InvalidArgument(_))
        ));
    }
}

/// The generators reach both outcomes: enough accepted messages for the
/// round trips to mean something, enough refused ones for the refusals.
#[test]
fn the_generators_make_both_accepted_and_refused_messages() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    fn share<T>(strategy: impl Strategy<Value = T>, ok: impl Fn(&T) -> bool) -> f64 {
        let mut runner = TestRunner::new(props::config(1000));
        let n = 1000;
        let accepted = (0..n)
            .filter(|_| ok(&strategy.new_tree(&mut runner).unwrap().current()))
            .count();
        accepted as f64 / n as f64
    }
    let shares = [
        ("disk", share(disk(), |d| Disk::try_from(d.clone()).is_ok())),
        ("vm", share(vm(), |v| Vm::try_from(v.clone()).is_ok())),
        (
            "policy",
            share(policy(), |p| Policy::try_from(p.clone()).is_ok()),
        ),
        (
            "overrides",
            share(overrides(), |o| Overrides::try_from(o.clone()).is_ok()),
        ),
    ];
    for (what, share) in shares {
        assert!((0.1..0.9).contains(&share), "{what}: {share} accepted");
    }
}
