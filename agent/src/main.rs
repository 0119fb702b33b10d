//! The ferry-agent binary.

use std::path::Path;
use std::sync::Arc;

use clap::Parser;
use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::stream::{Stream, StreamLimits};
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::registry::v1::ReplicationState;

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
    /// Where the NBD export of the VM's disks listens.
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
    let mut disks = Vec::new();
    for d in &assignment.disks {
        disks.push(SourceDisk::open(
            &d.id,
            Path::new(&d.source_path),
            d.size_bytes,
        )?);
    }
    let shutdown = ferry_runtime::shutdown_token();
    // Sequences continue after what the cache holds. Writes a previous agent
    // had not yet streamed are not known here: resync covers them.
    let next = ferry_agent::stream::resume_point(
        &assignment.cache_endpoint,
        &args.vm,
        assignment.epoch,
        assignment.credential(),
        &shutdown,
    )
    .await?;
    let stream = Stream::new(next, StreamLimits::default());
    let capture = Arc::new(Capture::new(disks, stream.clone()));
    let listener = tokio::net::TcpListener::bind(&args.nbd_listen)
        .await
        .map_err(|e| format!("cannot listen for NBD on {}: {e}", args.nbd_listen))?;
    tracing::info!(
        vm = %args.vm,
        cache = %assignment.cache_endpoint,
        epoch = assignment.epoch,
        disks = assignment.disks.len(),
        nbd = %args.nbd_listen,
        "replicating; exports are the disk ids"
    );
    tokio::spawn(ferry_agent::nbd::serve(
        listener,
        capture.clone(),
        shutdown.clone(),
    ));
    {
        let capture = capture.clone();
        let mut registry = RegistryClient::new(ferry_runtime::connect(&args.registry)?);
        let (vm, shutdown) = (args.vm.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = ferry_agent::resync::run(&capture, &mut registry, &vm, &shutdown).await
            {
                tracing::error!(vm, error = %e, "resync stopped");
            }
        });
    }
    if matches!(
        assignment.state,
        ReplicationState::Enabling | ReplicationState::InitialReplication
    ) {
        let mut registry = RegistryClient::new(ferry_runtime::connect(&args.registry)?);
        let vm = args.vm.clone();
        tokio::spawn(async move {
            if let Err(e) = ferry_agent::initial::replicate(&capture, &mut registry, &vm).await {
                tracing::error!(vm, error = %e, "initial replication failed");
            }
        });
    }
    ferry_agent::stream::run(
        stream,
        assignment.cache_endpoint.clone(),
        args.vm.clone(),
        assignment.epoch,
        assignment.credential().to_string(),
        shutdown,
    )
    .await?;
    Ok(())
}
