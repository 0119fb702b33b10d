//! The registry-svc binary.

use clap::Parser;

/// Ferry's control plane: VMs, policies, network mappings, replication groups
/// and protected items.
#[derive(Parser)]
#[command(name = "registry-svc", version)]
struct Args {
    #[command(flatten)]
    common: ferry_runtime::CommonArgs,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = Args::parse();
    ferry_runtime::binary::run(
        "registry-svc",
        "registry",
        registry_svc::DEFAULT_PORT,
        &args.common,
        |service, settings, listener, shutdown| async move {
            let config = registry_svc::Config::new(service, settings)?;
            registry_svc::serve(config, listener, shutdown).await
        },
    )
    .await
}
