//! The failover-svc binary.

use clap::Parser;

/// Ferry's failover service.
#[derive(Parser)]
#[command(name = "failover-svc", version)]
struct Args {
    #[command(flatten)]
    common: ferry_runtime::CommonArgs,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = Args::parse();
    ferry_runtime::binary::run(
        "failover-svc",
        "failover",
        failover_svc::DEFAULT_PORT,
        &args.common,
        |config, _: failover_svc::Settings, listener, shutdown| {
            failover_svc::serve(config, listener, shutdown)
        },
    )
    .await
}
