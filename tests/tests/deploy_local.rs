//! deploy/local/ferry-local.sh starts the four services as separate processes
//! that serve, and stops them all.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_testkit::{bin_path, is_serving, wait_for};

/// A base port with the three after it free too.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let first = ferry_testkit::free_addr().port();
        if first > u16::MAX - 4 {
            continue;
        }
        if (first..first + 4).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return first;
        }
    }
    panic!("no four consecutive free ports");
}

fn script(action: &str, run_dir: &Path, base: u16) -> std::process::Output {
    let bin_dir = bin_path("registry-svc").parent().unwrap().to_path_buf();
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/ferry-local.sh"))
        .arg(action)
        .env("FERRY_LOCAL_DIR", run_dir)
        .env("FERRY_LOCAL_BASE_PORT", base.to_string())
        .env("FERRY_BIN_DIR", bin_dir)
        .output()
        .unwrap()
}

/// Runs `stop` when the test ends, so that a failing test leaves no
/// processes behind.
struct StopOnDrop<'a>(&'a Path, u16);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = script("stop", self.0, self.1);
    }
}

/// Whether `pid` is a running process (not gone, not a zombie awaiting its
/// reaper).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

const SERVICES: [&str; 4] = ["registry", "cache", "processor", "failover"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_four_serving_processes_and_stops_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let _cleanup = StopOnDrop(dir.path(), base);
    let out = tokio::task::spawn_blocking({
        let run = dir.path().to_path_buf();
        move || script("start", &run, base)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "start: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let urls: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|u| u.starts_with("http://"))
        .map(String::from)
        .collect();
    assert_eq!(urls.len(), 4, "{stdout}");
    for url in &urls {
        assert!(is_serving(url, "").await, "{url} is not SERVING");
    }
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(*url, format!("http://127.0.0.1:{}", base + i as u16));
    }
    let mut pids = Vec::new();
    for service in SERVICES {
        assert!(
            dir.path().join(service).is_dir(),
            "{service} has its own data dir"
        );
        let pid: u32 = std::fs::read_to_string(dir.path().join(format!("{service}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(running(pid), "{service} (pid {pid}) is running");
        pids.push(pid);
    }
    let status = String::from_utf8_lossy(&script("status", dir.path(), base).stdout).into_owned();
    assert_eq!(status.matches(" up").count(), 4, "{status}");

    let out = tokio::task::spawn_blocking({
        let run = dir.path().to_path_buf();
        move || script("stop", &run, base)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM sufficed: nobody needed SIGKILL.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("killing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (service, pid) in SERVICES.iter().zip(&pids) {
        assert!(
            !dir.path().join(format!("{service}.pid")).exists(),
            "{service}'s pid file is removed"
        );
        wait_for(
            &format!("{service} (pid {pid}) to exit"),
            Duration::from_secs(15),
            || async { (!running(*pid)).then_some(()) },
        )
        .await;
    }
    for url in &urls {
        let addr = url.trim_start_matches("http://").to_string();
        wait_for(&format!("{addr} to close"), Duration::from_secs(15), || {
            let addr = addr.clone();
            async move { std::net::TcpStream::connect(&addr).is_err().then_some(()) }
        })
        .await;
    }
    let status = String::from_utf8_lossy(&script("status", dir.path(), base).stdout).into_owned();
    assert_eq!(status.matches(" down").count(), 4, "{status}");
}
