//! The registry-svc binary: flags, telemetry and signals; the rest is the library.

use std::path::PathBuf;

/// Ferry's control plane: VMs, policies, network mappings, replication groups and protected items
#[derive(clap::Parser)]
#[command(name = "registry-svc", version)]
struct Args {
    #[command(flatten)]
    common: ferry_runtime::CommonArgs,
    /// File holding the bootstrap admin token (fy1.bootstrap.<secret>),
    /// installed at start as token "bootstrap" unless one was ever installed
    /// before; written (mode 0600) with a new token if missing. Overrides
    /// `[registry] bootstrap_token_file`.
    #[arg(long, env = "FERRY_BOOTSTRAP_TOKEN_FILE", value_name = "FILE")]
    bootstrap_token_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = <Args as clap::Parser>::parse();
    let bootstrap = args.bootstrap_token_file;
    ferry_runtime::binary::run(
        "registry-svc",
        "registry",
        registry_svc::DEFAULT_PORT,
        &args.common,
        move |service, mut settings: registry_svc::Settings, listener, shutdown| {
            if bootstrap.is_some() {
                settings.bootstrap_token_file = bootstrap;
            }
            registry_svc::run(service, settings, listener, shutdown)
        },
    )
    .await
}
