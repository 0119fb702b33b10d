//! App-consistent points: at the policy's app-consistent frequency the agent
//! runs the pre script (quiesce: fsfreeze, a database flush), puts an
//! APP_CONSISTENT marker into the stream behind every write completed so
//! far, and runs the post script (thaw). The processor cuts an
//! app-consistent point at the marker. A pre script that fails or outlives
//! its timeout is killed, the post script still runs, no marker is placed
//! (the VM keeps its crash-consistent points) and registry hears a warning
//! in the VM's agent health until a later quiesce succeeds.

use std::path::PathBuf;
use std::time::Duration;

use ferry_proto::cache::v1::MarkerKind;
use ferry_proto::registry::v1 as reg;
use tokio_util::sync::CancellationToken;

use crate::capture::Capture;
use crate::health::Conditions;

/// The scripts and their bound.
#[derive(Debug, Clone)]
pub struct Scripts {
    /// Quiesces the applications; exit 0 when they are.
    pub pre: PathBuf,
    /// Thaws them; runs after every pre script, whatever its outcome.
    pub post: Option<PathBuf>,
    /// How long each script may run before it is killed.
    pub timeout: Duration,
}

/// The default script timeout.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `script` with the VM and its last completed sequence in the
/// environment (`FERRY_VM`, `FERRY_SEQUENCE`, `FERRY_PHASE`); an error that
/// says what went wrong.
async fn run_script(
    script: &std::path::Path,
    phase: &str,
    vm: &str,
    sequence: u64,
    timeout: Duration,
) -> Result<(), String> {
    let env = [
        ("FERRY_VM", vm.to_string()),
        ("FERRY_SEQUENCE", sequence.to_string()),
        ("FERRY_PHASE", phase.to_string()),
    ];
    ferry_runtime::script::run(script, &env, timeout, &format!("{phase} script")).await
}

/// One quiesce: pre script, marker, post script. The marker's sequence, or
/// why there is none (or why the thaw failed).
pub async fn quiesce(capture: &Capture, vm: &str, scripts: &Scripts) -> Result<u64, String> {
    let sequence = capture.stream().last().await;
    let pre = run_script(&scripts.pre, "pre", vm, sequence, scripts.timeout).await;
    let marked = match pre {
        Ok(()) => {
            let id = format!("app-{:x}", ferry_runtime::time::unix_nanos_now());
            match capture.marker("", MarkerKind::AppConsistent, &id).await {
                0 => Err("the stream is tracking changed chunks: no app-consistent marker".into()),
                seq => Ok(seq),
            }
        }
        Err(e) => Err(e),
    };
    let sequence = capture.stream().last().await;
    let post = match &scripts.post {
        Some(post) => run_script(post, "post", vm, sequence, scripts.timeout).await,
        None => Ok(()),
    };
    match (marked, post) {
        (Ok(seq), Ok(())) => Ok(seq),
        (Ok(_), Err(e)) => Err(format!("the point is app-consistent but {e}")),
        (Err(e), _) => Err(e),
    }
}

/// Quiesces every `frequency` until `stop`; each outcome becomes the
/// "scripts" condition of the agent's health report.
pub async fn run(
    capture: &Capture,
    conditions: &Conditions,
    vm: &str,
    scripts: &Scripts,
    frequency: Duration,
    stop: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(frequency) => {}
        }
        let outcome = quiesce(capture, vm, scripts).await;
        match &outcome {
            Ok(seq) => {
                tracing::info!(vm, seq, "app-consistent marker");
                conditions.set("scripts", None);
            }
            Err(e) => {
                tracing::warn!(vm, error = %e, "no app-consistent point this time");
                conditions.set(
                    "scripts",
                    Some((
                        reg::ReplicationHealth::Warning,
                        format!("app-consistent points failing, crash-consistent only: {e}"),
                    )),
                );
            }
        }
    }
}
