//! App-consistent points from the agent's pre and post scripts: the point
//! holds exactly what the application wrote before it was quiesced; a
//! hanging script is killed at its timeout, the VM keeps crash-consistent
//! points and its health says why.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::quiesce::Scripts;
use ferry_proto::processor::v1 as proc;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::time::to_duration;
use ferry_testkit::points::{list_points, read_disk};
use ferry_testkit::{protect_vm_with, protected_item, wait_for, Cluster};

use common::{chain_prefix, image, slot_write, DISK};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A policy with crash-consistent points every second and app-consistent
/// ones every `app` (a day of retention).
async fn app_policy(registry: &str, name: &str, app: Duration) {
    let day = Duration::from_secs(86400);
    let mut r = RegistryClient::connect(registry.to_string()).await.unwrap();
    r.create_policy(reg::CreatePolicyRequest {
        policy: Some(reg::ReplicationPolicy {
            name: name.into(),
            crash_consistent_interval: Some(to_duration(Duration::from_secs(1))),
            app_consistent_frequency: Some(to_duration(app)),
            keep_all_points_for: Some(to_duration(day)),
            thinned_point_spacing: Some(to_duration(day)),
            recovery_point_retention: Some(to_duration(day)),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_consistent_point_holds_exactly_what_was_written_before_the_quiesce() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    app_policy(&registry, "app", Duration::from_secs(1)).await;
    let source = image(dir.path(), "db");
    protect_vm_with(&registry, "db", &[("os", DISK, &source)], "app").await;
    // The pre script asks the application to quiesce and waits until it has;
    // the post script lets it go on.
    let pre = script(
        dir.path(),
        "pre.sh",
        &format!(
            "echo \"$FERRY_SEQUENCE\" >> {d}/sequences\ntouch {d}/frozen\n\
             while [ ! -f {d}/paused ]; do sleep 0.01; done"
        ),
    );
    let post = script(
        dir.path(),
        "post.sh",
        &format!("rm -f {d}/paused {d}/frozen"),
    );
    let (agent, _) = common::protected_agent_with(
        &registry,
        "db",
        &dir.path().join("state"),
        Some(Scripts {
            pre,
            post: Some(post),
            timeout: Duration::from_secs(30),
        }),
    )
    .await;

    // The application: a chain of writes that stops at each quiesce and
    // notes how many iterations it had completed.
    let paused_at = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let app = {
        let (capture, paused_at, stop, dir) = (
            agent.capture.clone(),
            paused_at.clone(),
            stop.clone(),
            dir.path().to_path_buf(),
        );
        tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if dir.join("frozen").exists() {
                    paused_at.lock().unwrap().push(k);
                    std::fs::write(dir.join("paused"), k.to_string()).unwrap();
                    // Quiesced until the post script thaws it (or the test ends).
                    wait_for("the post script's thaw", Duration::from_secs(60), || {
                        let (dir, stop) = (dir.clone(), stop.clone());
                        async move {
                            (!dir.join("frozen").exists() || stop.load(Ordering::Relaxed))
                                .then_some(())
                        }
                    })
                    .await;
                    continue;
                }
                let (offset, data) = slot_write(k);
                capture.write("os", offset, data).await.unwrap();
                k += 1;
            }
        })
    };
    let points = wait_for("3 app-consistent points", Duration::from_secs(60), || {
        let processor = processor.clone();
        async move {
            let points: Vec<proc::RecoveryPoint> = list_points(&processor, "db")
                .await
                .into_iter()
                .filter(|p| p.kind == proc::PointKind::AppConsistent as i32)
                .collect();
            (points.len() >= 3).then_some(points)
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    app.await.unwrap();
    let paused_at = paused_at.lock().unwrap().clone();
    let sequences: Vec<u64> = std::fs::read_to_string(dir.path().join("sequences"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    for point in &points {
        let n = chain_prefix(&read_disk(&processor, "db", point, "os").await);
        assert!(
            n > 0 && paused_at.contains(&n),
            "point {} holds {n} iterations; the application paused at {paused_at:?}",
            point.id
        );
        // The sequence the pre script saw is inside the point.
        assert!(sequences.iter().any(|s| *s <= point.sequence_cut));
    }
    agent.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_pre_script_times_out_and_health_says_so() {
    let cluster = Cluster::start().await;
    let registry = cluster.registry.url.clone();
    let processor = cluster.processor.url.clone();
    let dir = tempfile::tempdir().unwrap();
    app_policy(&registry, "app", Duration::from_secs(1)).await;
    let source = image(dir.path(), "db");
    protect_vm_with(&registry, "db", &[("os", DISK, &source)], "app").await;
    let pre = script(dir.path(), "pre.sh", "sleep 600");
    let thawed = dir.path().join("thawed");
    let post = script(
        dir.path(),
        "post.sh",
        &format!("touch {}", thawed.display()),
    );
    let (agent, _) = common::protected_agent_with(
        &registry,
        "db",
        &dir.path().join("state"),
        Some(Scripts {
            pre,
            post: Some(post),
            timeout: Duration::from_secs(1),
        }),
    )
    .await;
    let (offset, data) = slot_write(0);
    agent.capture.write("os", offset, data).await.unwrap();
    let report = wait_for("the agent's warning", Duration::from_secs(60), || {
        let registry = registry.clone();
        async move {
            let item = protected_item(&registry, "db").await?;
            item.health_reports.into_iter().find(|r| {
                r.component == "agent" && r.health == reg::ReplicationHealth::Warning as i32
            })
        }
    })
    .await;
    assert!(report.message.contains("timed out"), "{}", report.message);
    assert!(thawed.exists(), "the post script ran after the timeout");
    let item = protected_item(&registry, "db").await.unwrap();
    assert_eq!(item.health, reg::ReplicationHealth::Warning as i32);
    // Crash-consistent points go on; no app-consistent one.
    wait_for("a crash-consistent point", Duration::from_secs(30), || {
        let processor = processor.clone();
        async move {
            let points = list_points(&processor, "db").await;
            (!points.is_empty()).then_some(())
        }
    })
    .await;
    let points = list_points(&processor, "db").await;
    assert!(points
        .iter()
        .all(|p| p.kind == proc::PointKind::CrashConsistent as i32));
    agent.stop(Duration::from_secs(5)).await.unwrap();
}
