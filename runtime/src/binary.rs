//! The shared body of every service binary's `main`: resolve the
//! configuration, start telemetry, bind, wire SIGTERM/SIGINT, serve.

use std::future::Future;

use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{CommonArgs, ServiceConfig};

/// An error a binary prints before exiting non-zero.
pub type BinaryError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a service binary. `key` names the service's table in the config file
/// and its default data directory; `serve` is the service library's entry.
pub async fn run<S, F, Fut, E>(
    name: &'static str,
    key: &str,
    default_port: u16,
    common: &CommonArgs,
    serve: F,
) -> Result<(), BinaryError>
where
    S: DeserializeOwned + Default,
    F: FnOnce(ServiceConfig, S, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    // Said as a sentence (the error's Display), not as the enum's Debug.
    let (config, settings) = common
        .resolve::<S>(key, default_port)
        .map_err(|e| format!("{name}: {e}"))?;
    let _telemetry = crate::telemetry::init_with(
        name,
        &config.log,
        config.otlp_endpoint.as_deref(),
        config.log_format,
    )?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("{name}: cannot listen on {}: {e}", config.listen))?;
    if config.security.tls.is_none() {
        tracing::info!(
            listen = %config.listen,
            "{name}: plaintext, as --insecure asks: every call is authenticated (service \
             and agent tokens from the cluster secret, operator tokens), nothing is encrypted"
        );
    }
    let shutdown = crate::shutdown::shutdown_token();
    serve(config, settings, listener, shutdown)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(())
}

/// A binary's exit: an error is printed as the sentence it is (its
/// Display), not as a debug dump, and the status is 1.
pub fn exit(outcome: Result<(), BinaryError>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole `main.rs` of a service binary. The library `$lib` provides
/// `DEFAULT_PORT`, a `Settings` type for its config-file table and
/// `run(ServiceConfig, Settings, TcpListener, CancellationToken)`.
#[macro_export]
macro_rules! service_main {
    ($name:literal, $key:literal, $lib:ident, $about:literal) => {
        #[derive(clap::Parser)]
        #[command(name = $name, version, about = $about)]
        struct Args {
            #[command(flatten)]
            common: $crate::CommonArgs,
        }

        fn main() -> std::process::ExitCode {
            $crate::memory::limit_malloc_arenas();
            let args = <Args as clap::Parser>::parse();
            $crate::binary::exit($crate::memory::runtime().map_err(Into::into).and_then(
                |runtime| {
                    runtime.block_on($crate::binary::run(
                        $name,
                        $key,
                        $lib::DEFAULT_PORT,
                        &args.common,
                        $lib::run,
                    ))
                },
            ))
        }
    };
}

/// For a command-line tool whose output goes into a pipe: a reader that
/// stops early (`ferry points | head`) ends it quietly, as it ends `ls`,
/// instead of a panic in `println!` (Rust ignores SIGPIPE by default). Not
/// for servers: a client going away must not kill them.
pub fn exit_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal; no handler
    // of ours is involved and no memory is read or written.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
