//! `ferry`: every operation on Ferry from the command line, and the embedded
//! default (`ferry serve`, `ferry demo`) running all four services in one
//! process.

mod args;
mod commands;
mod demo;
mod embedded;
mod output;
mod watch;

use anyhow::Result;
use clap::Parser;

use args::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli).await {
        eprintln!("ferry: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let _telemetry = ferry_runtime::telemetry::init("ferry", "info", None)?;
            let shutdown = ferry_runtime::shutdown_token();
            let services = embedded::Embedded::start(
                &a.data_dir,
                &a.listen_host,
                a.base_port,
                shutdown.clone(),
            )
            .await?;
            println!("Ferry is running (data in {}):", a.data_dir.display());
            for (name, url) in services.urls() {
                println!("  {name:<10} {url}");
            }
            println!("Stop with Ctrl-C or SIGTERM.");
            shutdown.cancelled().await;
            services.stop().await
        }
        Command::Demo { data_dir } => {
            let _telemetry = ferry_runtime::telemetry::init("ferry", "warn", None)?;
            demo::run(data_dir).await
        }
        command => commands::run(&cli.registry, cli.output, command).await,
    }
}
