//! Prometheus metrics, scraped over HTTP as Prometheus does: the real
//! registry-svc binary's per-VM series from what registry knows, gRPC calls
//! by method and code, process figures, and nothing else on that port;
//! processor-svc's view of a replicating VM.

mod common;

use std::time::Duration;

use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::security::ServiceKind;
use ferry_testkit::cluster::{Cluster, Options};
use ferry_testkit::scrape::sample;
use ferry_testkit::{bin_path, free_addr, wait_for, wait_serving, Insecure, ServiceProcess};

/// `method path` on `addr`: (status line, headers and body).
async fn get(addr: &str, method: &str, path: &str) -> (String, String) {
    ferry_testkit::scrape::http(addr, method, path)
        .await
        .expect("the metrics port answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_per_vm_grpc_and_process_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let insecure = Insecure::new();
    let metrics = free_addr().to_string();
    let registry = ServiceProcess::start(
        &insecure,
        bin_path("registry-svc"),
        dir.path().join("r"),
        &["--metrics-listen", &metrics],
    );
    let url = registry.url();
    wait_serving(&url).await;
    let day = Duration::from_secs(86400);
    ferry_testkit::create_policy(
        insecure.at(&url),
        "p7",
        Duration::from_secs(7),
        day,
        day,
        day,
    )
    .await;
    let image = dir.path().join("os.raw");
    ferry_testkit::protect_vm_with(insecure.at(&url), "web-1", &[("os", 1 << 30, &image)], "p7")
        .await;
    let mut admin = RegistryClient::new(insecure.at(&url).admin());
    let missing = admin
        .get_vm(reg::GetVmRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The processor reports an RPO of 2.5 s and a backlog.
    let mut processor = RegistryClient::new(insecure.at(&url).as_service(ServiceKind::Processor));
    processor
        .report_health(reg::ReportHealthRequest {
            vm_name: "web-1".into(),
            component: "processor".into(),
            health: reg::ReplicationHealth::Warning as i32,
            message: "behind".into(),
            rpo: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            backlog_bytes: Some(4096),
            backlog_records: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();

    let (status, body) = get(&metrics, "GET", "/metrics").await;
    assert!(status.ends_with("200 OK"), "{status}");
    assert!(
        body.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{body}"
    );
    let vm = r#"{vm="web-1"}"#;
    assert_eq!(
        sample(&body, &format!("ferry_vm_rpo_seconds{vm}")),
        Some(2.5),
        "{body}"
    );
    assert_eq!(
        sample(&body, &format!("ferry_vm_point_interval_seconds{vm}")),
        Some(7.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, &format!("ferry_vm_cache_backlog_bytes{vm}")),
        Some(4096.0)
    );
    assert_eq!(
        sample(&body, &format!("ferry_vm_cache_backlog_records{vm}")),
        Some(3.0)
    );
    assert_eq!(
        sample(&body, r#"ferry_vm_health{vm="web-1",health="WARNING"}"#),
        Some(1.0),
        "{body}"
    );
    let item = ferry_testkit::protected_item(insecure.at(&url), "web-1")
        .await
        .unwrap();
    let state = item
        .state()
        .as_str_name()
        .trim_start_matches("REPLICATION_STATE_");
    assert_eq!(
        sample(
            &body,
            &format!(r#"ferry_vm_replication_state{{vm="web-1",state="{state}"}}"#)
        ),
        Some(1.0),
        "{body}"
    );
    // Calls by method and code; latency by method.
    assert_eq!(
        sample(
            &body,
            r#"ferry_grpc_server_handled_total{method="ferry.registry.v1.Registry/GetVm",code="NotFound"}"#
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            r#"ferry_grpc_server_handling_seconds_count{method="ferry.registry.v1.Registry/ReportHealth"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            sample(&body, name).is_some_and(|v| v > 0.0),
            "{name}: {body}"
        );
    }
    assert!(body.trim_end().ends_with("# EOF"), "{body}");

    // Disabling the VM takes its series away.
    admin
        .disable_replication(reg::DisableReplicationRequest {
            vm_name: "web-1".into(),
        })
        .await
        .unwrap();
    let gone = ferry_testkit::wait_for("web-1's series to go", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            let (_, body) = get(&metrics, "GET", "/metrics").await;
            (!body.contains(r#"vm="web-1""#)).then_some(body)
        }
    })
    .await;
    assert!(gone.contains("ferry_grpc_server_handled_total"), "{gone}");

    // Only GET /metrics is served.
    let (status, _) = get(&metrics, "GET", "/").await;
    assert!(status.contains(" 404 "), "{status}");
    let (status, _) = get(&metrics, "POST", "/metrics").await;
    assert!(status.contains(" 405 "), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_metrics_address_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let insecure = Insecure::new();
    let mut args = insecure.args(&bin_path("registry-svc"));
    args.extend(
        [
            "--listen",
            &free_addr().to_string(),
            "--data-dir",
            &dir.path().display().to_string(),
            "--metrics-listen",
            &addr,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let out = tokio::process::Command::new(bin_path("registry-svc"))
        .args(&args)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("registry-svc exits")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_cache_and_failover_serve_their_view_of_each_vm() {
    let (metrics, cache_metrics, failover_metrics) = (free_addr(), free_addr(), free_addr());
    let cluster = Cluster::start_options(Options {
        processor_metrics: Some(metrics),
        cache_metrics: Some(cache_metrics),
        failover_metrics: Some(failover_metrics),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent =
        common::fast_protected_vm(&cluster.registry.url, dir.path(), Default::default()).await;
    let seq = agent
        .capture
        .write("os", 0, vec![7u8; 65536])
        .await
        .unwrap();
    let metrics = metrics.to_string();
    // A point holding the write, then its figures.
    let body = wait_for("a point in the metrics", Duration::from_secs(60), || {
        let metrics = metrics.clone();
        async move {
            let (_, body) = get(&metrics, "GET", "/metrics").await;
            sample(
                &body,
                r#"ferry_processor_points{vm="vm",kind="CRASH_CONSISTENT"}"#,
            )
            .is_some_and(|n| n >= 1.0)
            .then_some(body)
        }
    })
    .await;
    assert!(seq >= 1);
    let vm = r#"{vm="vm"}"#;
    assert!(
        sample(&body, &format!("ferry_processor_retained_bytes{vm}")).is_some_and(|b| b >= 65536.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            &format!("ferry_processor_newest_point_age_seconds{vm}")
        )
        .is_some_and(|s| (0.0..600.0).contains(&s)),
        "{body}"
    );
    assert!(
        sample(&body, &format!("ferry_processor_apply_lag_records{vm}")).is_some(),
        "{body}"
    );
    assert_eq!(
        sample(&body, &format!("ferry_processor_pipeline_failing{vm}")),
        Some(0.0),
        "{body}"
    );

    let (_, cache) = get(&cache_metrics.to_string(), "GET", "/metrics").await;
    assert!(
        sample(&cache, &format!("ferry_cache_log_bytes{vm}")).is_some(),
        "{cache}"
    );
    assert!(
        sample(&cache, &format!("ferry_cache_unapplied_records{vm}")).is_some(),
        "{cache}"
    );
    let quota = cache_svc::Settings::default().vm_quota_bytes as f64;
    assert_eq!(
        sample(&cache, "ferry_cache_vm_quota_bytes"),
        Some(quota),
        "{cache}"
    );
    assert!(sample(&cache, "ferry_cache_total_quota_bytes").is_some_and(|q| q >= quota));
    assert!(
        sample(
            &cache,
            r#"ferry_grpc_server_handled_total{method="ferry.cache.v1.Cache/Ingest",code="Ok"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{cache}"
    );

    // An unplanned failover: one ended job of its kind, with its duration.
    use ferry_proto::failover::v1 as fo;
    common::succeed(
        &cluster.failover.url,
        fo::StartFailoverRequest {
            target: Some(fo::start_failover_request::Target::VmName("vm".into())),
            kind: fo::FailoverKind::Unplanned as i32,
            point: Some(fo::PointChoice {
                choice: Some(fo::point_choice::Choice::LatestProcessed(true)),
            }),
            test_network: String::new(),
            request_id: String::new(),
            instant: false,
            alternate_location: false,
        },
    )
    .await;
    let (_, jobs) = get(&failover_metrics.to_string(), "GET", "/metrics").await;
    let test = r#"{kind="failover-unplanned",outcome="succeeded"}"#;
    assert_eq!(
        sample(&jobs, &format!("ferry_failover_jobs_ended_total{test}")),
        Some(1.0),
        "{jobs}"
    );
    assert_eq!(
        sample(
            &jobs,
            r#"ferry_failover_job_duration_seconds_count{kind="failover-unplanned"}"#
        ),
        Some(1.0),
        "{jobs}"
    );
    agent.stop(Duration::from_secs(10)).await.unwrap();
    cluster.stop().await;
}
