//! The failover-svc binary: flags, telemetry and signals; the rest is the library.

ferry_runtime::service_main!(
    "failover-svc",
    "failover",
    failover_svc,
    "Ferry's failover service: failover, test failover and commit"
);
