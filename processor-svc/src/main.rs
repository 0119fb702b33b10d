//! The processor-svc binary: flags, telemetry and signals; the rest is the library.

ferry_runtime::service_main!(
    "processor-svc",
    "processor",
    processor_svc,
    "Ferry's processor service: the target-region processor of replica disks and recovery points"
);
