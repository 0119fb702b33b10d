//! A service's log lines as operators and log shippers read them: no
//! terminal colour codes when stderr is not a terminal, and one JSON object
//! per line with `--log-format json`.

use std::process::Stdio;
use std::time::Duration;

use ferry_testkit::{bin_path, free_addr, Insecure};
use tokio::io::{AsyncBufReadExt, BufReader};

/// registry-svc's first stderr lines, up to the one saying it serves.
async fn first_lines(extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let mut args = insecure.args(&bin_path("registry-svc"));
    let listen = free_addr().to_string();
    let data = dir.path().join("r").display().to_string();
    args.extend(["--listen", &listen, "--data-dir", &data].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut child = tokio::process::Command::new(bin_path("registry-svc"))
        .args(&args)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("registry-svc serving");
            seen.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("registry-svc says it serves within a minute");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_carry_no_colour_codes_off_a_terminal() {
    let lines = first_lines(&[]).await;
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "a colour code in {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let lines = first_lines(&["--log-format", "json"]).await;
    for line in &lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(object["level"].is_string(), "{line}");
        assert!(object["timestamp"].is_string(), "{line}");
        assert!(object["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("registry-svc serving")));
}
