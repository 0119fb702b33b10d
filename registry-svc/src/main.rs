//! The registry-svc binary: flags, telemetry and signals; the rest is the library.

ferry_runtime::service_main!(
    "registry-svc",
    "registry",
    registry_svc,
    "Ferry's control plane: VMs, policies, network mappings, replication groups and protected items"
);
