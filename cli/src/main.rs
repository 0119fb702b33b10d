//! `ferry`: every operation on Ferry from the command line, and the embedded
//! default (`ferry serve`, `ferry demo`) running all four services in one
//! process.

mod args;
mod audit;
mod certs;
mod commands;
mod credentials;
mod demo;
mod embedded;
mod enroll;
mod nbd_client;
mod output;
mod plan;
mod recovery;
mod serve;
mod status;
mod tokens;
mod watch;

use anyhow::Result;
use clap::Parser;

use args::{Cli, Command};

fn main() {
    // `ferry serve` runs every service in this process.
    ferry_runtime::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    // `ferry serve` and the demo run the services in this process.
    if !matches!(cli.command, Command::Serve(_) | Command::Demo { .. }) {
        ferry_runtime::binary::exit_quietly_on_closed_pipe();
    }
    let outcome = ferry_runtime::memory::runtime()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    if let Err(err) = outcome {
        eprintln!("ferry: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    credentials::init(&cli)?;
    match cli.command {
        Command::Serve(a) => {
            let _telemetry = ferry_runtime::telemetry::init("ferry", "info", None)?;
            serve::run(a).await
        }
        Command::Demo { data_dir } => {
            // The demo prints what happens; service logs only on request.
            let filter = std::env::var("FERRY_LOG").unwrap_or_else(|_| "off".into());
            let _telemetry = ferry_runtime::telemetry::init("ferry", &filter, None)?;
            demo::run(data_dir).await
        }
        Command::Certs(c) => certs::run(c),
        Command::Status(a) => {
            status::run(&cli.registry, &cli.processor, &cli.failover, cli.output, a).await
        }
        Command::Points(a) => recovery::points(&cli.processor, cli.output, a).await,
        Command::Failover(a) => recovery::failover(&cli.failover, cli.output, a).await,
        Command::Reprotect { vm, no_wait } => {
            recovery::reprotect(&cli.failover, cli.output, vm, no_wait).await
        }
        Command::Jobs(a) => recovery::jobs(&cli.failover, cli.output, a).await,
        Command::Plan(c) => plan::run(&cli.failover, cli.output, c).await,
        Command::Network(c) => recovery::network(&cli.failover, cli.output, c).await,
        Command::TargetVms { vm } => recovery::target_vms(&cli.failover, cli.output, vm).await,
        Command::Token(c) => tokens::run(&cli.registry, cli.output, c).await,
        Command::Agent(c) => enroll::run(&cli.registry, cli.output, c).await,
        Command::Audit(a) => {
            let servers = [
                ("registry", cli.registry.as_str()),
                ("processor", cli.processor.as_str()),
                ("failover", cli.failover.as_str()),
            ];
            audit::run(&servers, cli.output, a).await
        }
        command => commands::run(&cli.registry, cli.output, command).await,
    }
}
