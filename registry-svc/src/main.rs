//! The registry-svc binary: flags, telemetry, signals; the rest is the library.

use anyhow::Context;
use clap::Parser;
use ferry_runtime::CommonArgs;

/// Ferry's control plane: VMs, policies, network mappings, replication groups
/// and protected items.
#[derive(Parser)]
#[command(name = "registry-svc", version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (service, settings) = args
        .common
        .resolve::<registry_svc::Settings>("registry", registry_svc::DEFAULT_PORT)?;
    let _telemetry = ferry_runtime::telemetry::init(
        "registry-svc",
        &service.log,
        service.otlp_endpoint.as_deref(),
    )?;
    let listener = tokio::net::TcpListener::bind(service.listen)
        .await
        .with_context(|| format!("cannot listen on {}", service.listen))?;
    let config = registry_svc::Config::new(service, settings)?;
    let shutdown = ferry_runtime::shutdown_token();
    registry_svc::serve(config, listener, shutdown).await?;
    Ok(())
}
