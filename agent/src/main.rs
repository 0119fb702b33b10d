//! The ferry-agent binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::state::{Saved, StateFile};
use ferry_agent::stream::{Dirty, Stream, StreamLimits};
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
    /// Where the changed-chunk map is kept across restarts (one file per VM).
    #[arg(
        long,
        env = "FERRY_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/ferry-agent"
    )]
    state_dir: PathBuf,
    /// At SIGTERM, how long to wait for the cache to take what is buffered
    /// before saving the rest as changed chunks.
    #[arg(
        long,
        env = "FERRY_DRAIN_SECS",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    drain_secs: u64,
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
    let state = StateFile::open(&args.state_dir, &args.vm)?;
    let fresh = matches!(
        assignment.state,
        ReplicationState::Enabling | ReplicationState::InitialReplication
    );
    let sizes: Vec<(String, u64)> = disks.iter().map(|d| (d.id.clone(), d.size)).collect();
    let limits = StreamLimits::default();
    // Initial replication copies everything anyway; otherwise a clean map is
    // resynced as it is, and a lost one means every chunk.
    let stream = match (fresh, state.load()) {
        (true, _) => Stream::new(next, limits),
        (false, Ok(Some(Saved::Clean(dirty)))) if dirty.is_empty() => Stream::new(next, limits),
        (false, Ok(Some(Saved::Clean(dirty)))) => {
            tracing::info!(vm = %args.vm, chunks = dirty.count(), "resyncing the chunks the last run left");
            Stream::with_tracking(
                next,
                limits,
                dirty,
                "the agent restarted with unsent writes",
            )
        }
        (false, loaded) => {
            let why = match loaded {
                Ok(Some(_)) => "the agent did not stop cleanly".to_string(),
                Ok(None) => format!("no changed-chunk map in {}", args.state_dir.display()),
                Err(e) => e.to_string(),
            };
            tracing::warn!(vm = %args.vm, why, "changed-chunk map lost: full resync");
            Stream::with_tracking(
                next,
                limits,
                Dirty::full(&sizes),
                &format!("full resync: {why}"),
            )
        }
    };
    state.mark_running()?;
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
    if fresh {
        let capture = capture.clone();
        let mut registry = RegistryClient::new(ferry_runtime::connect(&args.registry)?);
        let vm = args.vm.clone();
        tokio::spawn(async move {
            if let Err(e) = ferry_agent::initial::replicate(&capture, &mut registry, &vm).await {
                tracing::error!(vm, error = %e, "initial replication failed");
            }
        });
    }
    // The stream outlives the shutdown signal by the drain.
    let stream_stop = tokio_util::sync::CancellationToken::new();
    let mut streaming = tokio::spawn(ferry_agent::stream::run(
        stream.clone(),
        assignment.cache_endpoint.clone(),
        args.vm.clone(),
        assignment.epoch,
        assignment.credential().to_string(),
        stream_stop.clone(),
    ));
    let ended = tokio::select! {
        _ = shutdown.cancelled() => None,
        ended = &mut streaming => Some(ended),
    };
    // No write reaches a disk from here on; what the stream holds is all.
    capture.close().await;
    let ended = match ended {
        Some(ended) => ended,
        None => {
            let drain = std::time::Duration::from_secs(args.drain_secs);
            if tokio::time::timeout(drain, stream.flushed()).await.is_err() {
                tracing::warn!(vm = %args.vm, "the cache did not take everything in time");
            }
            stream_stop.cancel();
            streaming.await
        }
    };
    let unsent = stream.unsent().await;
    state.save_clean(&unsent)?;
    tracing::info!(vm = %args.vm, unsent_chunks = unsent.count(), "stopped; changed-chunk map saved");
    ended.map_err(|e| format!("stream task: {e}"))??;
    Ok(())
}
