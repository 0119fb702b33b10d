//! The cache-svc binary.

use clap::Parser;

/// Ferry's cache service.
#[derive(Parser)]
#[command(name = "cache-svc", version)]
struct Args {
    #[command(flatten)]
    common: ferry_runtime::CommonArgs,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = Args::parse();
    ferry_runtime::binary::run(
        "cache-svc",
        "cache",
        cache_svc::DEFAULT_PORT,
        &args.common,
        |config, _: cache_svc::Settings, listener, shutdown| {
            cache_svc::serve(config, listener, shutdown)
        },
    )
    .await
}
