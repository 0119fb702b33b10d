//! deploy/local/ferry-local.sh starts the four services as separate processes
//! that serve over mutual TLS, with every call checked, and stops them all.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_runtime::peers::{connect, Credentials};
use ferry_runtime::security::ClientTls;
use ferry_testkit::{bin_path, wait_for};

/// Whether `url` reports SERVING over TLS verified with `ca`.
async fn serving_tls(url: &str, ca: &Path) -> bool {
    let credentials = Credentials {
        tls: Some(ClientTls::load(ca, None, None).unwrap()),
        bearer: None,
    };
    let Ok(channel) = connect(url, &credentials) else {
        return false;
    };
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    matches!(
        tonic_health::pb::health_client::HealthClient::new(channel).check(request).await,
        Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

/// `ferry` against the deployment's registry with `token`, verifying with `ca`.
fn ferry(url: &str, ca: &Path, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(bin_path("ferry"));
    command
        .args(["--registry", url, "--tls-ca"])
        .arg(ca)
        .env_remove("FERRY_TOKEN")
        .args(args);
    if let Some(token) = token {
        command.env("FERRY_TOKEN", token);
    }
    command.output().unwrap()
}

/// A base port with the three after it free too, and the four metrics
/// ports 2000 above them.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let first = ferry_testkit::free_addr().port();
        if first > u16::MAX - 2004 {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if (first..first + 4).all(|p| free(p) && free(p + 2000)) {
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
        .filter(|u| u.starts_with("https://"))
        .map(String::from)
        .collect();
    assert_eq!(urls.len(), 4, "{stdout}");
    let ca = dir.path().join("pki").join("ca.pem");
    for url in &urls {
        assert!(serving_tls(url, &ca).await, "{url} is not SERVING over TLS");
    }
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(*url, format!("https://127.0.0.1:{}", base + i as u16));
    }
    // Every call is checked: the bootstrap admin token (0600) lets the CLI
    // in; no token, or plaintext, does not.
    use std::os::unix::fs::PermissionsExt;
    let token_file = dir.path().join("admin-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = dir.path().join("pki").join("registry-key.pem");
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let out = ferry(&urls[0], &ca, Some(&token), &["vms"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(&urls[0], &ca, None, &["vms"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    let plain = urls[0].replacen("https://", "http://", 1);
    let out = ferry(&plain, &ca, Some(&token), &["vms"]);
    assert!(!out.status.success(), "plaintext to a TLS port must fail");
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
    // Each serves its metrics on its port + 2000; failover-svc knows the
    // cache (a planned failover drains the source through it).
    for (i, service) in SERVICES.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", base + 2000 + i as u16);
        let mut stream = std::net::TcpStream::connect(&addr)
            .unwrap_or_else(|e| panic!("{service}'s metrics at {addr}: {e}"));
        use std::io::{Read, Write};
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        assert!(
            text.contains("process_resident_memory_bytes"),
            "{service}: {text}"
        );
    }
    let failover = std::fs::read(format!("/proc/{}/cmdline", pids[3])).unwrap();
    let cmdline = String::from_utf8_lossy(&failover).replace('\0', " ");
    assert!(
        cmdline.contains(&format!("--cache https://127.0.0.1:{}", base + 1)),
        "{cmdline}"
    );
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
        let addr = url.trim_start_matches("https://").to_string();
        wait_for(&format!("{addr} to close"), Duration::from_secs(15), || {
            let addr = addr.clone();
            async move { std::net::TcpStream::connect(&addr).is_err().then_some(()) }
        })
        .await;
    }
    let status = String::from_utf8_lossy(&script("status", dir.path(), base).stdout).into_owned();
    assert_eq!(status.matches(" down").count(), 4, "{status}");
}
