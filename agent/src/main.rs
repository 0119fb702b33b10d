//! The ferry-agent binary.

use clap::Parser;

/// Ferry's agent: captures a VM's disk writes and streams them to the cache.
#[derive(Parser)]
#[command(name = "ferry-agent", version)]
struct Args {
    /// URL of registry-svc.
    #[arg(long, env = "FERRY_REGISTRY", value_name = "URL")]
    registry: String,
    /// The VM this agent replicates.
    #[arg(long, env = "FERRY_VM", value_name = "NAME")]
    vm: String,
    /// Where the NBD export of the VM's disks listens (used from issue 3).
    #[arg(
        long,
        env = "FERRY_NBD_LISTEN",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:10809"
    )]
    nbd_listen: String,
    /// The replication group port (ASR's 20004).
    #[arg(
        long,
        env = "FERRY_GROUP_LISTEN",
        value_name = "HOST:PORT",
        default_value = "0.0.0.0:20004"
    )]
    group_listen: String,
    /// Log filter.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = Args::parse();
    let _telemetry = ferry_runtime::telemetry::init("ferry-agent", &args.log, None)?;
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    let assignment =
        ferry_agent::register(&args.registry, &args.vm, &hostname, &args.group_listen).await?;
    tracing::info!(
        vm = %args.vm,
        cache = %assignment.cache_endpoint,
        epoch = assignment.epoch,
        disks = assignment.disks.len(),
        nbd = %args.nbd_listen,
        "registered; write capture and streaming arrive with the agent/cache release"
    );
    ferry_runtime::shutdown_token().cancelled().await;
    Ok(())
}
