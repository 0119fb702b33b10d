//! The processor-svc binary.

use clap::Parser;

/// Ferry's processor service.
#[derive(Parser)]
#[command(name = "processor-svc", version)]
struct Args {
    #[command(flatten)]
    common: ferry_runtime::CommonArgs,
}

#[tokio::main]
async fn main() -> Result<(), ferry_runtime::binary::BinaryError> {
    let args = Args::parse();
    ferry_runtime::binary::run(
        "processor-svc",
        "processor",
        processor_svc::DEFAULT_PORT,
        &args.common,
        |config, _: processor_svc::Settings, listener, shutdown| {
            processor_svc::serve(config, listener, shutdown)
        },
    )
    .await
}
