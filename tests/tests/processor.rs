//! agent → cache → processor end to end. Writes go through the agent's NBD
//! export (qemu-io) or its library API; every recovery point read back
//! through ReadDisk equals the source image as it was at the point's
//! sequence cut. processor-svc as a real process survives SIGKILL mid-apply
//! with no record lost or applied twice, and the cache trims only below
//! what is durably applied.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use ferry_proto::cache::v1 as cache;
use ferry_proto::cache::v1::cache_client::CacheClient;
use ferry_proto::processor::v1 as pb;
use ferry_proto::processor::v1::processor_client::ProcessorClient;
use ferry_proto::registry::v1 as reg;
use ferry_runtime::security::ServiceKind;
use ferry_runtime::{CancellationToken, ServiceConfig};
use ferry_testkit::points::{cut_latest, list_points, read_disk};
use ferry_testkit::{
    bin_path, create_policy, identical_images, protect_vm_with, protected_item, run_tool,
    start_registry, wait_for, wait_serving, Cluster, Insecure, Rng, Running, ServiceProcess,
};

const SIZE: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_cut_during_nbd_writes_read_back_as_the_source_at_their_cut() {
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("os.raw");
    let s = source.to_str().unwrap().to_string();
    run_tool("qemu-img", &["create", "-f", "raw", &s, &SIZE.to_string()]);
    run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x42 1M 3M", &s]);
    common::policy(&cluster.registry.url, "fast", Duration::from_secs(1)).await;
    protect_vm_with(
        &cluster.registry.url,
        "vm",
        &[("os", SIZE, &source)],
        "fast",
    )
    .await;
    let (agent, nbd) =
        common::protected_agent(&cluster.registry.url, "vm", &dir.path().join("agent")).await;

    let mut rng = Rng(0x853c49e6748fea9b);
    let mut shadows: Vec<(pb::RecoveryPoint, PathBuf)> = Vec::new();
    for round in 0..6 {
        // A burst of random writes, zeroes and discards through NBD.
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for _ in 0..24 {
            let len = (1 + rng.next() % 256) * 512;
            let offset = (rng.next() % ((SIZE - len) / 512)) * 512;
            let command = match rng.next() % 5 {
                0 => format!("write -z {offset} {len}"),
                1 => format!("discard {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", 1 + rng.next() % 254),
            };
            args.extend(["-c".to_string(), command]);
        }
        args.push(format!("{nbd}/os"));
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool("qemu-io", &args)
        })
        .await
        .unwrap();
        // The source as it is now, and a point at exactly this sequence.
        let last = agent.stream.flushed().await;
        let shadow = dir.path().join(format!("shadow-{round}.raw"));
        std::fs::copy(&source, &shadow).unwrap();
        let point = cut_latest(&cluster.processor.url, "vm").await.unwrap();
        assert_eq!(point.sequence_cut, last, "latest holds everything written");
        assert_eq!(point.kind, pb::PointKind::CrashConsistent as i32);
        shadows.push((point, shadow));
    }

    for (point, shadow) in &shadows {
        let replica = dir.path().join(format!("{}.raw", point.id));
        std::fs::write(
            &replica,
            read_disk(&cluster.processor.url, "vm", point, "os").await,
        )
        .unwrap();
        assert!(
            identical_images(shadow, &replica),
            "point {} (cut {}) differs from the source at its cut",
            point.id,
            point.sequence_cut
        );
    }
    // An app-consistent marker in the stream gets a point of its own, cut
    // exactly at the marker.
    let marker = agent
        .capture
        .marker(
            "",
            ferry_proto::cache::v1::MarkerKind::AppConsistent,
            "app-1",
        )
        .await;
    let app = wait_for(
        "the app-consistent point",
        Duration::from_secs(30),
        || async {
            list_points(&cluster.processor.url, "vm")
                .await
                .into_iter()
                .find(|p| p.kind == pb::PointKind::AppConsistent as i32)
        },
    )
    .await;
    assert_eq!(app.sequence_cut, marker);
    // Listing filters by kind and limits from the newest.
    let mut p = ProcessorClient::connect(cluster.processor.url.clone())
        .await
        .unwrap();
    let list = |kind: pb::PointKind, limit: u32| pb::ListRecoveryPointsRequest {
        vm_name: "vm".into(),
        kind: kind as i32,
        limit,
        ..Default::default()
    };
    let apps = p
        .list_recovery_points(list(pb::PointKind::AppConsistent, 0))
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(
        apps.iter().map(|p| &p.id).collect::<Vec<_>>(),
        vec![&app.id]
    );
    let newest = p
        .list_recovery_points(list(pb::PointKind::Unspecified, 1))
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(newest.len(), 1);
    assert!(newest[0].sequence_cut >= app.sequence_cut);

    // Timer points were cut besides: every 1 s while writes changed things.
    let points = list_points(&cluster.processor.url, "vm").await;
    assert!(points.len() >= 6, "{} points", points.len());

    // The pipeline's view, and registry's.
    let status = ProcessorClient::connect(cluster.processor.url.clone())
        .await
        .unwrap()
        .get_pipeline_status(pb::GetPipelineStatusRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.applied_sequence, marker);
    assert!(status.syncing_disks.is_empty());
    wait_for(
        "the processor's health report",
        Duration::from_secs(30),
        || async {
            let item = protected_item(&cluster.registry.url, "vm").await?;
            let reported = item
                .health_reports
                .iter()
                .any(|r| r.component == "processor");
            (reported && item.rpo.is_some() && item.last_recovery_point_time.is_some())
                .then_some(())
        },
    )
    .await;

    // Bad input gets its status.
    let mut p = ProcessorClient::connect(cluster.processor.url.clone())
        .await
        .unwrap();
    let point = &shadows[0].0;
    let read = |vm: &str, id: &str, disk: &str, offset: u64, length: u64| pb::ReadDiskRequest {
        vm_name: vm.into(),
        point_id: id.into(),
        disk_id: disk.into(),
        offset,
        length,
    };
    for (request, code) in [
        (read("nope", &point.id, "os", 0, 0), tonic::Code::NotFound),
        (read("vm", "rp-999999", "os", 0, 0), tonic::Code::NotFound),
        (read("vm", "garbage", "os", 0, 0), tonic::Code::NotFound),
        (read("vm", &point.id, "data", 0, 0), tonic::Code::NotFound),
        (
            read("vm", &point.id, "os", 100, 0),
            tonic::Code::InvalidArgument,
        ),
        (
            read("vm", &point.id, "os", SIZE, 512),
            tonic::Code::OutOfRange,
        ),
        (
            read("", &point.id, "os", 0, 0),
            tonic::Code::InvalidArgument,
        ),
    ] {
        let err = p
            .read_disk(request.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{request:?} accepted"));
        assert_eq!(err.code(), code, "{request:?}: {err}");
    }
    let err = p
        .pin_recovery_point(pb::PinRecoveryPointRequest {
            vm_name: "vm".into(),
            point_id: point.id.clone(),
            holder: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

/// One write the test made, for replaying the source at any sequence.
struct Op {
    seq: u64,
    offset: u64,
    data: Option<Vec<u8>>,
    length: u64,
}

fn source_at(ops: &[Op], cut: u64) -> Vec<u8> {
    let mut image = vec![0u8; SIZE as usize];
    for op in ops.iter().filter(|o| o.seq <= cut) {
        let range = op.offset as usize..(op.offset + op.length) as usize;
        match &op.data {
            Some(d) => image[range].copy_from_slice(d),
            None => image[range].fill(0),
        }
    }
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_processor_resumes_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // registry and cache in-process; small cache segments so trimming
    // happens; processor-svc as a real process.
    let cache_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cache_url = format!("http://{}", cache_listener.local_addr().unwrap());
    let registry: Running =
        start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    let mut config = ServiceConfig::in_process(dir.path().join("cache"));
    config.registry = Some(registry.url.clone());
    let cache_shutdown = CancellationToken::new();
    let settings = cache_svc::Settings {
        segment_bytes: 256 * 1024,
        ..Default::default()
    };
    tokio::spawn(cache_svc::run(
        config,
        settings,
        cache_listener,
        cache_shutdown.clone(),
    ));
    wait_serving(&cache_url).await;
    // processor-svc checks its callers: the test calls as failover-svc.
    let insecure = Insecure::new();
    let mut processor = ServiceProcess::start(
        &insecure,
        bin_path("processor-svc"),
        dir.path().join("processor"),
        &["--registry", &registry.url, "--cache", &cache_url],
    );
    wait_serving(&processor.url()).await;

    let source = dir.path().join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    common::policy(&registry.url, "fast", Duration::from_secs(1)).await;
    protect_vm_with(&registry.url, "vm", &[("os", SIZE, &source)], "fast").await;
    let (agent, _) = common::protected_agent(&registry.url, "vm", &dir.path().join("agent")).await;

    // Writes through the library API go on while processor-svc is killed
    // twice; each write's sequence is known, so the source at any cut is too.
    let capture = agent.capture.clone();
    let stop = CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x9e3779b97f4a7c15);
            let mut ops = Vec::new();
            while !stop.is_cancelled() {
                let length = (1 + rng.next() % 64) * 512;
                let offset = (rng.next() % ((SIZE - length) / 512)) * 512;
                let (seq, data) = if rng.next().is_multiple_of(7) {
                    (
                        capture.zero("os", offset, length, false).await.unwrap(),
                        None,
                    )
                } else {
                    let data = vec![(rng.next() % 255 + 1) as u8; length as usize];
                    (
                        capture.write("os", offset, data.clone()).await.unwrap(),
                        Some(data),
                    )
                };
                ops.push(Op {
                    seq,
                    offset,
                    data,
                    length,
                });
                if ops.len().is_multiple_of(50) {
                    tokio::task::yield_now().await;
                }
            }
            ops
        })
    };
    let applied = |url: String| {
        let insecure = insecure.clone();
        async move {
            let mut p = ProcessorClient::new(insecure.at(&url).as_service(ServiceKind::Failover));
            p.get_pipeline_status(pb::GetPipelineStatusRequest {
                vm_name: "vm".into(),
            })
            .await
            .ok()
            .map(|s| s.into_inner().applied_sequence)
        }
    };
    for kill in 0..2 {
        // Killed once it has applied something new.
        let before = applied(processor.url()).await.unwrap_or(0);
        wait_for(
            "the processor to apply more",
            Duration::from_secs(60),
            || {
                let url = processor.url();
                async move { applied(url).await.filter(|a| *a > before + 100) }
            },
        )
        .await;
        assert!(!processor.signal_and_wait("KILL").success(), "kill {kill}");
        processor.restart();
        wait_serving(&processor.url()).await;
    }
    wait_for("a few more points", Duration::from_secs(60), || {
        let url = processor.url();
        let insecure = insecure.clone();
        async move { (list_points(insecure.at(&url), "vm").await.len() >= 8).then_some(()) }
    })
    .await;
    stop.cancel();
    let ops = writer.await.unwrap();
    let last = agent.stream.flushed().await;
    let processor_url = processor.url();
    let at = insecure.at(&processor_url);
    let latest = cut_latest(at, "vm").await.unwrap();
    assert_eq!(latest.sequence_cut, last);

    // Every point equals the source at its cut: nothing lost, nothing
    // applied twice (a duplicate replay of an older write would show).
    let points = list_points(at, "vm").await;
    assert!(points.len() >= 8, "{} points", points.len());
    let mut cuts: Vec<u64> = points.iter().map(|p| p.sequence_cut).collect();
    cuts.dedup();
    assert_eq!(cuts.len(), points.len(), "cuts are distinct and ascending");
    for point in &points {
        let got = read_disk(at, "vm", point, "os").await;
        assert!(
            got == source_at(&ops, point.sequence_cut),
            "point {} (cut {}) differs from the source at its cut",
            point.id,
            point.sequence_cut
        );
    }

    // The cache trimmed, but only below what the processor applied.
    let info: cache::LogInfo = CacheClient::connect(cache_url.clone())
        .await
        .unwrap()
        .get_log_info(cache::GetLogInfoRequest {
            vm_name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.first_sequence > 1,
        "whole segments were trimmed: {info:?}"
    );
    assert!(info.first_sequence <= info.applied_sequence + 1, "{info:?}");
    assert!(info.applied_sequence <= last, "{info:?}");

    agent.stop(Duration::from_secs(5)).await.unwrap();
    cache_shutdown.cancel();
    registry.stop().await;
}

/// An idle VM's points keep up with the clock: its agent ticks each second
/// while nothing is written, so the newest point holds the source up to a
/// moment ago and registry's RPO stays small instead of aging with the last
/// write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_vms_points_and_rpo_stay_current() {
    let cluster = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent =
        common::fast_protected_vm(&cluster.registry.url, dir.path(), Default::default()).await;
    agent.capture.write("os", 0, vec![7u8; 4096]).await.unwrap();
    let written = std::time::SystemTime::now();
    let processor = cluster.processor.url.clone();
    let point = wait_for(
        "a point 3 s newer than the VM's last write",
        Duration::from_secs(60),
        || {
            let processor = processor.clone();
            async move {
                list_points(processor.as_str(), "vm")
                    .await
                    .into_iter()
                    .find(|p| {
                        p.time.is_some_and(|t| {
                            std::time::SystemTime::try_from(t).unwrap()
                                > written + Duration::from_secs(3)
                        })
                    })
            }
        },
    )
    .await;
    assert!(point.sequence_cut >= 2, "{point:?}");
    let registry = cluster.registry.url.clone();
    wait_for(
        "registry's RPO under 3 s, 5 s after the last write",
        Duration::from_secs(60),
        || {
            let registry = registry.clone();
            async move {
                let item = protected_item(&registry, "vm").await?;
                let rpo = item.rpo?;
                (written.elapsed().ok()? > Duration::from_secs(5) && rpo.seconds < 3).then_some(())
            }
        },
    )
    .await;
    agent.stop(Duration::from_secs(5)).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_policy_thins_and_expires_points_and_reclaims_their_space() {
    // Small replica segments, so that expired versions free whole files.
    let cluster = Cluster::start_with(processor_svc::Settings {
        segment_bytes: 1 << 20,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("os.raw");
    std::fs::File::create(&source)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    // A point a second, all kept for 2 s, then one per 4 s slot, none past 8 s.
    let secs = Duration::from_secs;
    create_policy(
        &cluster.registry.url,
        "short",
        secs(1),
        secs(2),
        secs(4),
        secs(8),
    )
    .await;
    protect_vm_with(
        &cluster.registry.url,
        "vm",
        &[("os", SIZE, &source)],
        "short",
    )
    .await;
    let (agent, _) =
        common::protected_agent(&cluster.registry.url, "vm", &dir.path().join("agent")).await;

    // The same 2 MiB rewritten over and over for 16 s: every point has its
    // own version of it, and only the retained ones may keep theirs.
    let region = 2u64 << 20;
    let started = std::time::Instant::now();
    let mut written = 0u64;
    let mut round = 0u8;
    while started.elapsed() < secs(16) {
        round = round.wrapping_add(1).max(1);
        for piece in 0..8u64 {
            let data = vec![round ^ piece as u8; (region / 8) as usize];
            agent
                .capture
                .write("os", piece * region / 8, data)
                .await
                .unwrap();
        }
        written += region;
        agent.stream.flushed().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = cut_latest(&cluster.processor.url, "vm").await.unwrap();

    // Expired points go (the newest always stays).
    let nanos = |t: &prost_types::Timestamp| t.seconds as u64 * 1_000_000_000 + t.nanos as u64;
    wait_for("points past 8 s to expire", secs(30), || async {
        let now = ferry_runtime::time::unix_nanos_now();
        let points = list_points(&cluster.processor.url, "vm").await;
        points
            .iter()
            .all(|p| {
                p.id == last.id
                    || now - nanos(p.time.as_ref().unwrap()) <= secs(10).as_nanos() as u64
            })
            .then_some(())
    })
    .await;
    // Beyond 2 s (with two seconds of slack), one point per 4 s slot.
    let now = ferry_runtime::time::unix_nanos_now();
    let points = list_points(&cluster.processor.url, "vm").await;
    let old: Vec<u64> = points
        .iter()
        .map(|p| nanos(p.time.as_ref().unwrap()))
        .filter(|t| now - t > secs(4).as_nanos() as u64)
        .collect();
    let mut slots: Vec<u64> = old.iter().map(|t| t / secs(4).as_nanos() as u64).collect();
    let all = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), all, "thinned to one point per slot: {old:?}");
    assert!(
        points.len() < 16,
        "{} points kept of about 16 cut",
        points.len()
    );

    // The space of expired versions is given back: what stays on disk is
    // about one 2 MiB version per retained point (plus the segment being
    // filled), well below one per point ever cut.
    let segments = cluster.processor.data_dir.join("segments").join("vm");
    let cut_ever = points
        .iter()
        .filter_map(|p| p.id.strip_prefix("rp-")?.parse::<u64>().ok())
        .max()
        .unwrap();
    let on_disk = wait_for("expired versions to be reclaimed", secs(30), || {
        let segments = segments.clone();
        let kept = list_points(&cluster.processor.url, "vm");
        async move {
            let kept = kept.await.len() as u64;
            let bytes: u64 = std::fs::read_dir(&segments)
                .unwrap()
                .flatten()
                .map(|e| e.metadata().unwrap().len())
                .sum();
            (bytes <= (kept + 1) * region + (2 << 20)).then_some(bytes)
        }
    })
    .await;
    assert!(written >= 20 * region, "{written} bytes written");
    assert!(
        2 * on_disk < cut_ever * region,
        "{on_disk} bytes on disk after {cut_ever} points of 2 MiB each"
    );
    // Retained points still read correctly: the newest holds the last round.
    let got = read_disk(&cluster.processor.url, "vm", &last, "os").await;
    for piece in 0..8u64 {
        let at = (piece * region / 8) as usize;
        assert_eq!(got[at], round ^ piece as u8);
    }
    agent.stop(Duration::from_secs(5)).await.unwrap();

    // Disabling replication stops the pipeline and deletes the replica.
    ferry_proto::registry::v1::registry_client::RegistryClient::connect(
        cluster.registry.url.clone(),
    )
    .await
    .unwrap()
    .disable_replication(reg::DisableReplicationRequest {
        vm_name: "vm".into(),
    })
    .await
    .unwrap();
    wait_for("the replica to be deleted", secs(30), || async {
        let mut p = ProcessorClient::connect(cluster.processor.url.clone())
            .await
            .ok()?;
        let listed = p
            .list_recovery_points(pb::ListRecoveryPointsRequest {
                vm_name: "vm".into(),
                ..Default::default()
            })
            .await;
        let gone = matches!(listed, Err(s) if s.code() == tonic::Code::NotFound);
        (gone && !segments.exists()).then_some(())
    })
    .await;
    cluster.stop().await;
}
