//! The cache-svc binary: flags, telemetry and signals; the rest is the library.

ferry_runtime::service_main!(
    "cache-svc",
    "cache",
    cache_svc,
    "Ferry's cache service: the source-region cache of every VM's write stream"
);
