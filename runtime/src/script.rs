//! Running an operator's script, bounded: its own process group (a timeout
//! kills everything it started), stdin and stdout closed, stderr kept for
//! the error. The agent's quiesce scripts and recovery plans' script
//! actions both run through it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Runs `script` with `env` added to the environment; `what` names it in
/// errors ("pre script"). An error says what went wrong, stderr included.
pub async fn run(
    script: &Path,
    env: &[(&str, String)],
    timeout: Duration,
    what: &str,
) -> Result<(), String> {
    let mut command = tokio::process::Command::new(script);
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{what} {} cannot start: {e}", script.display()))?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a negative pid signals that process
                // group; it touches no memory of ours.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            Err(format!(
                "{what} {} timed out after {timeout:?} and was killed",
                script.display()
            ))
        }
        Ok(Err(e)) => Err(format!("{what} {}: {e}", script.display())),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(format!(
                "{what} {} failed ({}): {}",
                script.display(),
                out.status,
                stderr.trim()
            ))
        }
    }
}
