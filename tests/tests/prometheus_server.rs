//! A real Prometheus server (Debian's package) scrapes registry-svc while a
//! VM replicates, with Ferry's alert rules loaded: the VM's RPO series is
//! there and plausible; cutting the agent from the cache makes FerryRpoHigh
//! fire; healing the link resolves it. The rules are deploy/prometheus's
//! alerts.yml with its durations shortened for a test (2 s instead of
//! 2 min, a 5 s floor instead of 30 s); each shortening is checked to have
//! happened, so the test follows the file.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::stream::StreamLimits;
use ferry_testkit::cluster::{Cluster, Options};
use ferry_testkit::{free_addr, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// Prometheus, killed however the test ends.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// alerts.yml with test durations; panics if a shortening finds nothing to
/// shorten (the file changed: the test must change with it).
fn test_rules() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let mut rules = std::fs::read_to_string(path).unwrap();
    for (from, to) in [
        ("for: 2m", "for: 2s"),
        (
            "clamp_min(4 * ferry_vm_point_interval_seconds, 30)",
            "clamp_min(4 * ferry_vm_point_interval_seconds, 5)",
        ),
    ] {
        assert!(rules.contains(from), "alerts.yml no longer holds {from:?}");
        rules = rules.replace(from, to);
    }
    rules
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from Prometheus's HTTP API (HTTP/1.0: no chunking); its JSON
/// `data`, or None while it does not answer with success.
async fn api(addr: &str, path: &str) -> Option<serde_json::Value> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    (json["status"] == "success").then(|| json["data"].clone())
}

/// The VM's RPO as Prometheus last scraped it.
async fn rpo(addr: &str) -> Option<f64> {
    let query = percent_encode(r#"ferry_vm_rpo_seconds{vm="vm"}"#);
    let data = api(addr, &format!("/api/v1/query?query={query}")).await?;
    data["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The state of FerryRpoHigh for the VM ("pending", "firing"), if any.
async fn rpo_alert(addr: &str) -> Option<String> {
    let data = api(addr, "/api/v1/alerts").await?;
    data["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == "FerryRpoHigh" && a["labels"]["vm"] == "vm")
        .and_then(|a| a["state"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_rpo_and_the_alert_fires_on_a_cut_and_resolves() {
    let registry_metrics = free_addr();
    let (cluster, proxy) = Cluster::start_behind_proxy_options(Options {
        registry_metrics: Some(registry_metrics),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The cache given up on after 2 s: the agent then tracks and says so.
    let limits = StreamLimits {
        max_outage: Duration::from_secs(2),
        ..StreamLimits::default()
    };
    let agent = common::fast_protected_vm(&cluster.registry.url, dir.path(), limits).await;
    // The VM writes 4 KiB every 200 ms throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (capture, stop) = (agent.capture.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let data = vec![(n % 251) as u8 + 1; 4096];
                capture.write("os", 0, data).await.unwrap();
                n += 1;
            }
        })
    };

    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(prom_dir.join("alerts.yml"), test_rules()).unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: ferry-registry\n    static_configs:\n      - targets: [\"{registry_metrics}\"]\n"
        ),
    )
    .unwrap();
    let web = free_addr().to_string();
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom_dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test.sh installs it)"),
    );

    // Scraped, and plausible: points every second while the VM writes.
    let first = wait_for(
        "Prometheus to have the VM's RPO",
        Duration::from_secs(60),
        || rpo(&web),
    )
    .await;
    assert!((0.0..5.0).contains(&first), "RPO {first} s with 1 s points");
    assert_eq!(rpo_alert(&web).await, None);

    proxy.cut();
    wait_for("FerryRpoHigh to fire", Duration::from_secs(90), || async {
        (rpo_alert(&web).await.as_deref() == Some("firing")).then_some(())
    })
    .await;
    let behind = rpo(&web).await.unwrap_or_default();
    assert!(behind > 5.0, "fired with an RPO of {behind} s");

    proxy.restore();
    wait_for(
        "FerryRpoHigh to resolve",
        Duration::from_secs(120),
        || async {
            (rpo_alert(&web).await.is_none() && rpo(&web).await.is_some_and(|r| r < 5.0))
                .then_some(())
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    agent.stop(Duration::from_secs(10)).await.unwrap();
    cluster.stop().await;
}
