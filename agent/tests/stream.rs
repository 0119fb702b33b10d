//! Writes through the agent's library API reach cache-svc in order and
//! durable: the cache's log replayed onto copies of the original images gives
//! images identical to the sources, also when cache-svc is killed with SIGKILL
//! mid-stream and the agent reconnects and resends; an overflowing buffer
//! turns into changed-chunk tracking and resync, and the cache's bookmark and
//! resync requests are obeyed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use ferry_testkit::Rng;

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::stream::{self, Stream, StreamLimits};
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::CancellationToken;
use ferry_testkit::replay::{apply, tail_all};
use ferry_testkit::{bin_path, free_addr, start_registry, wait_serving, Insecure, ServiceProcess};

const SIZE: u64 = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replayed_log_equals_the_source_even_across_a_cache_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // The cache checks its callers: the agent presents its token.
    let insecure = Insecure::new();
    let cache_addr = free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let mut r = RegistryClient::connect(registry.url.clone()).await.unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let disks = ["os", "data"];
    r.register_vm(reg::RegisterVmRequest {
        vm: Some(reg::Vm {
            name: "vm".into(),
            source_region: "eastus".into(),
            resource_group: "rg".into(),
            virtual_network: "net".into(),
            subnet: "sub".into(),
            nics: vec![reg::Nic {
                name: "nic0".into(),
                private_ip: "10.0.0.4".into(),
                mac_address: String::new(),
            }],
            disks: disks
                .iter()
                .map(|id| reg::Disk {
                    id: id.to_string(),
                    size_bytes: SIZE,
                    role: if *id == "os" {
                        reg::DiskRole::Os
                    } else {
                        reg::DiskRole::Data
                    } as i32,
                    storage: reg::DiskStorage::Managed as i32,
                    source_path: images.join(format!("{id}.raw")).display().to_string(),
                })
                .collect(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    r.enable_replication(reg::EnableReplicationRequest {
        vm_name: "vm".into(),
        target_region: "westus".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let enrollment = insecure.enroll(&registry.url, "vm").await;
    let assignment = ferry_agent::register(
        &registry.url,
        &insecure.agent("vm"),
        "vm",
        "test",
        "",
        ferry_agent::Admission {
            enrollment_token: Some(&enrollment),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(assignment.cache_endpoint, cache_url);

    let mut cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;

    let limits = StreamLimits {
        buffer_bytes: 64 << 20,
        in_flight_bytes: 1 << 20,
        batch_bytes: 256 * 1024,
        ..StreamLimits::default()
    };
    let s = Stream::new(1, limits);
    let capture = Arc::new(Capture::new(
        disks
            .iter()
            .map(|id| SourceDisk::open(id, &images.join(format!("{id}.raw")), SIZE).unwrap())
            .collect(),
        s.clone(),
    ));
    let shutdown = CancellationToken::new();
    let sender = tokio::spawn(stream::run(
        s.clone(),
        assignment.cache_endpoint.clone(),
        insecure.agent("vm"),
        "vm".into(),
        assignment.epoch,
        assignment.credential().to_string(),
        shutdown.clone(),
    ));

    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut write_some = |n: usize| {
        let capture = capture.clone();
        let ops: Vec<(usize, u64, u64, u8)> = (0..n)
            .map(|_| {
                let disk = (rng.next() % 2) as usize;
                let blocks = 1 + rng.next() % 32;
                let offset = (rng.next() % (SIZE / 512 - blocks)) * 512;
                (disk, offset, blocks * 512, (rng.next() % 5) as u8)
            })
            .collect();
        async move {
            for (disk, offset, len, kind) in ops {
                let id = disks[disk];
                match kind {
                    0 => capture.zero(id, offset, len, true).await.unwrap(),
                    1 => capture.zero(id, offset, len, false).await.unwrap(),
                    k => capture
                        .write(id, offset, vec![(offset as u8) ^ k; len as usize])
                        .await
                        .unwrap(),
                };
            }
        }
    };

    write_some(300).await;
    let first = tokio::time::timeout(Duration::from_secs(30), s.flushed())
        .await
        .expect("the cache acknowledges everything");
    assert_eq!(first, 300);

    // Kill the cache while writes keep completing locally.
    cache.signal_and_wait("KILL");
    write_some(200).await;
    cache.restart();
    wait_serving(&cache_url).await;
    write_some(100).await;
    let last = tokio::time::timeout(Duration::from_secs(60), s.flushed())
        .await
        .expect("the agent reconnects and resends");
    assert_eq!(last, 600);

    let records = tail_all(insecure.at(&cache_url), "vm", 1).await;
    let seqs: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    assert_eq!(
        seqs,
        (1..=600).collect::<Vec<_>>(),
        "every record exactly once, in order"
    );
    let replicas = dir.path().join("replicas");
    std::fs::create_dir_all(&replicas).unwrap();
    let files: HashMap<String, File> = disks
        .iter()
        .map(|id| {
            let f = File::create(replicas.join(format!("{id}.raw"))).unwrap();
            f.set_len(SIZE).unwrap();
            (id.to_string(), f)
        })
        .collect();
    apply(&records, &files);
    for id in disks {
        let source = std::fs::read(images.join(format!("{id}.raw"))).unwrap();
        let replica = std::fs::read(replicas.join(format!("{id}.raw"))).unwrap();
        assert!(
            source == replica,
            "disk {id}: replay differs from the source"
        );
    }
    // A restarted agent resumes after what the cache holds. A stream that
    // finds the cache ahead of it (another agent's last batch landed after
    // it learned where to start) never reuses those numbers and never stops
    // the VM: it numbers on after the cache and checks every chunk by
    // checksum, its own pending write going again as data.
    let next = stream::resume_point(
        &cache_url,
        &insecure.agent("vm"),
        "vm",
        assignment.epoch,
        assignment.credential(),
        &shutdown,
    )
    .await
    .unwrap();
    assert_eq!(next, 601);
    let stale = Stream::new(1, limits);
    stale.set_disks(disks.iter().map(|d| (d.to_string(), SIZE)).collect());
    stale
        .push(
            "os",
            ferry_proto::cache::v1::record::Op::Write(ferry_proto::cache::v1::WriteOp {
                offset: 0,
                data: vec![1u8; 512].into(),
            }),
        )
        .await;
    let stale_stop = CancellationToken::new();
    let stale_run = tokio::spawn(stream::run(
        stale.clone(),
        cache_url.clone(),
        insecure.agent("vm"),
        "vm".into(),
        assignment.epoch,
        assignment.credential().to_string(),
        stale_stop.clone(),
    ));
    ferry_testkit::wait_for(
        "the stale stream to renumber after the cache",
        Duration::from_secs(30),
        || {
            let stale = stale.clone();
            async move { (stale.tracking().await == (true, true)).then_some(()) }
        },
    )
    .await;
    assert_eq!(stale.last().await, 600, "numbering goes on after the cache");
    let unsent = stale.unsent().await;
    assert_eq!(
        unsent.data.chunks("os"),
        vec![0],
        "its own write goes again"
    );
    assert_eq!(
        unsent.verify.count(),
        2 * SIZE / stream::DIRTY_CHUNK,
        "every chunk is checked by checksum"
    );
    assert_eq!(tail_all(insecure.at(&cache_url), "vm", 1).await.len(), 600);
    stale_stop.cancel();
    stale_run.await.unwrap().unwrap();

    shutdown.cancel();
    sender.await.unwrap().unwrap();
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_buffer_resyncs_and_cache_control_messages_are_obeyed() {
    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::MarkerKind;
    use std::collections::HashMap as Map;

    let dir = tempfile::tempdir().unwrap();
    // The cache checks its callers: the agent presents its token.
    let insecure = Insecure::new();
    let cache_addr = free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let image = dir.path().join("os.raw");
    ferry_testkit::protect_vm(&registry.url, "vm", &[("os", SIZE, &image)]).await;
    let mut r = RegistryClient::connect(registry.url.clone()).await.unwrap();
    for to in [
        reg::ReplicationState::InitialReplication,
        reg::ReplicationState::Protected,
    ] {
        r.transition_state(reg::TransitionStateRequest {
            vm_name: "vm".into(),
            to: to as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let enrollment = insecure.enroll(&registry.url, "vm").await;
    let a = ferry_agent::register(
        &registry.url,
        &insecure.agent("vm"),
        "vm",
        "test",
        "",
        ferry_agent::Admission {
            enrollment_token: Some(&enrollment),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // A small buffer, and no cache yet: the buffer overflows.
    let limits = StreamLimits {
        buffer_bytes: 256 * 1024,
        ..StreamLimits::default()
    };
    let s = Stream::new(1, limits);
    let capture = Arc::new(Capture::new(
        vec![SourceDisk::open("os", &image, SIZE).unwrap()],
        s.clone(),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(stream::run(
        s.clone(),
        a.cache_endpoint.clone(),
        insecure.agent("vm"),
        "vm".into(),
        a.epoch,
        a.credential().to_string(),
        shutdown.clone(),
    ));
    let resyncer = {
        let capture = capture.clone();
        let mut registry = RegistryClient::new(
            ferry_runtime::connect(&registry.url, &insecure.agent("vm")).unwrap(),
        );
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            ferry_agent::resync::run(&capture, &mut registry, "vm", &shutdown)
                .await
                .unwrap()
        })
    };

    let mut rng = Rng(0x51ed270b27a3cd91);
    for i in 0..200u64 {
        let offset = (rng.next() % (SIZE / 4096)) * 4096;
        // Writes complete locally although the cache is away.
        tokio::time::timeout(
            Duration::from_secs(5),
            capture.write(
                "os",
                offset,
                vec![(i % 250 + 1) as u8; 8192.min((SIZE - offset) as usize)],
            ),
        )
        .await
        .expect("writes never wait for the cache")
        .unwrap();
    }
    assert!(s.tracking().await.0, "the buffer overflowed into tracking");
    let state = |r: &RegistryClient<tonic::transport::Channel>| {
        let mut r = r.clone();
        async move {
            r.get_protected_item(reg::GetProtectedItemRequest {
                vm_name: "vm".into(),
            })
            .await
            .ok()
            .map(|i| i.into_inner().state())
        }
    };
    ferry_testkit::wait_for("RESYNC_REQUIRED", Duration::from_secs(30), || {
        let st = state(&r);
        async move {
            st.await
                .filter(|s| *s == reg::ReplicationState::ResyncRequired)
        }
    })
    .await;
    // Zeroing through the tracked phase too.
    capture.zero("os", 0, 1 << 20, false).await.unwrap();

    let _cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    ferry_testkit::wait_for("PROTECTED after resync", Duration::from_secs(60), || {
        let st = state(&r);
        async move { st.await.filter(|s| *s == reg::ReplicationState::Protected) }
    })
    .await;
    // Writes go on as records again.
    capture.write("os", 4096, vec![0xee; 4096]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), s.flushed())
        .await
        .unwrap();

    let records = tail_all(insecure.at(&cache_url), "vm", 1).await;
    let markers: Vec<i32> = records
        .iter()
        .filter_map(|r| match &r.op {
            Some(Op::Marker(m)) => Some(m.kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        markers,
        [
            MarkerKind::SyncStarted as i32,
            MarkerKind::SyncCompleted as i32
        ]
    );
    let replica = dir.path().join("replica.raw");
    let f = File::create(&replica).unwrap();
    f.set_len(SIZE).unwrap();
    apply(&records, &Map::from([("os".to_string(), f)]));
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&replica).unwrap(),
        "the resynced replica differs from the source"
    );

    // The cache relays a bookmark request: the marker enters the stream.
    use ferry_proto::cache::v1 as pb;
    use ferry_proto::cache::v1::cache_client::CacheClient;
    use pb::send_control_request::Control;
    let control = |c: Control| {
        let cache_url = cache_url.clone();
        let insecure = insecure.clone();
        async move {
            let mut client = CacheClient::new(
                insecure
                    .at(&cache_url)
                    .as_service(ferry_runtime::security::ServiceKind::Processor),
            );
            let request = pb::SendControlRequest {
                vm_name: "vm".into(),
                control: Some(c),
            };
            client.send_control(request).await.ok().map(|_| ())
        }
    };
    let bookmark = Control::Bookmark(pb::BookmarkRequest { id: "b1".into() });
    ferry_testkit::wait_for(
        "the bookmark request delivered",
        Duration::from_secs(30),
        || control(bookmark.clone()),
    )
    .await;
    let last = ferry_testkit::wait_for("the bookmark in the log", Duration::from_secs(30), || {
        let cache_url = cache_url.clone();
        let insecure = insecure.clone();
        async move {
            let records = tail_all(insecure.at(&cache_url), "vm", 1).await;
            records
                .iter()
                .find(|r| {
                    matches!(&r.op, Some(Op::Marker(m))
                        if m.kind == MarkerKind::Bookmark as i32 && m.id == "b1")
                })
                .map(|r| r.sequence)
        }
    })
    .await;

    // A whole-disk resync request: every chunk is checked by checksum
    // (ChunkDigests records, no data), and the VM goes through RESYNCING back
    // to PROTECTED.
    let resync = Control::Resync(pb::ResyncRequest {
        disk_ids: vec!["os".into()],
        reason: "replica check".into(),
        ranges: Vec::new(),
    });
    control(resync).await.expect("resync request delivered");
    let chunks = SIZE / ferry_agent::stream::DIRTY_CHUNK;
    let after = |records: &[pb::Record], after: u64| -> (u64, usize) {
        let digested = records
            .iter()
            .filter(|r| r.sequence > after)
            .filter_map(|r| match &r.op {
                Some(Op::Digests(d)) => Some(d.crc32c.len() as u64),
                _ => None,
            })
            .sum();
        let data = records
            .iter()
            .filter(|r| r.sequence > after)
            .filter(|r| matches!(r.op, Some(Op::Write(_) | Op::WriteZeroes(_) | Op::Trim(_))))
            .count();
        (digested, data)
    };
    let records = ferry_testkit::wait_for("every chunk checked", Duration::from_secs(60), || {
        let cache_url = cache_url.clone();
        let insecure = insecure.clone();
        async move {
            let records = tail_all(insecure.at(&cache_url), "vm", 1).await;
            (after(&records, last).0 >= chunks).then_some(records)
        }
    })
    .await;
    assert_eq!(
        after(&records, last),
        (chunks, 0),
        "checksums only, each chunk once"
    );
    // The digests are the source's.
    let source = std::fs::read(&image).unwrap();
    for r in records.iter().filter(|r| r.sequence > last) {
        if let Some(Op::Digests(d)) = &r.op {
            for (i, crc) in d.crc32c.iter().enumerate() {
                let at = (d.offset + i as u64 * d.chunk_bytes) as usize;
                assert_eq!(
                    *crc,
                    crc32c::crc32c(&source[at..at + d.chunk_bytes as usize])
                );
            }
        }
    }
    ferry_testkit::wait_for(
        "PROTECTED after the requested check",
        Duration::from_secs(60),
        || {
            let st = state(&r);
            async move { st.await.filter(|s| *s == reg::ReplicationState::Protected) }
        },
    )
    .await;

    // A request for ranges (what a processor asks for when checksums
    // differ): just those chunks travel again, as data.
    let last = records.last().map_or(0, |r| r.sequence);
    let resync = Control::Resync(pb::ResyncRequest {
        disk_ids: Vec::new(),
        reason: "chunks differ".into(),
        ranges: vec![pb::DiskRange {
            disk_id: "os".into(),
            offset: 1 << 20,
            length: 128 << 10,
        }],
    });
    control(resync).await.expect("ranges request delivered");
    let records = ferry_testkit::wait_for("the ranges sent again", Duration::from_secs(60), || {
        let cache_url = cache_url.clone();
        let insecure = insecure.clone();
        async move {
            let records = tail_all(insecure.at(&cache_url), "vm", 1).await;
            (after(&records, last).1 >= 2).then_some(records)
        }
    })
    .await;
    assert_eq!(after(&records, last), (0, 2));
    let f = File::create(&replica).unwrap();
    f.set_len(SIZE).unwrap();
    apply(&records, &Map::from([("os".to_string(), f)]));
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&replica).unwrap());

    shutdown.cancel();
    resyncer.await.unwrap();
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_completed_marker_lost_at_an_overflow_is_sent_again_by_resync() {
    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::MarkerKind;

    let dir = tempfile::tempdir().unwrap();
    // The cache checks its callers: the agent presents its token.
    let insecure = Insecure::new();
    let cache_addr = free_addr();
    let cache_url = format!("http://{cache_addr}");
    let registry = start_registry(dir.path().join("registry"), Some(cache_url.clone())).await;
    wait_serving(&registry.url).await;
    let (a_image, b_image) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    std::fs::write(&a_image, vec![0x61u8; SIZE as usize]).unwrap();
    ferry_testkit::protect_vm(
        &registry.url,
        "vm",
        &[("a", SIZE, &a_image), ("b", SIZE, &b_image)],
    )
    .await;
    let mut r = RegistryClient::connect(registry.url.clone()).await.unwrap();
    r.transition_state(reg::TransitionStateRequest {
        vm_name: "vm".into(),
        to: reg::ReplicationState::InitialReplication as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let enrollment = insecure.enroll(&registry.url, "vm").await;
    let assignment = ferry_agent::register(
        &registry.url,
        &insecure.agent("vm"),
        "vm",
        "test",
        "",
        ferry_agent::Admission {
            enrollment_token: Some(&enrollment),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut cache = ServiceProcess::start_at(
        &insecure,
        cache_addr,
        bin_path("cache-svc"),
        dir.path().join("cache"),
        &["--registry", &registry.url],
    );
    wait_serving(&cache_url).await;
    let limits = StreamLimits {
        buffer_bytes: 1 << 20,
        max_outage: Duration::from_secs(3600),
        ..StreamLimits::default()
    };
    let s = Stream::new(1, limits);
    let capture = Arc::new(Capture::new(
        vec![
            SourceDisk::open("a", &a_image, SIZE).unwrap(),
            SourceDisk::open("b", &b_image, SIZE).unwrap(),
        ],
        s.clone(),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(stream::run(
        s.clone(),
        assignment.cache_endpoint.clone(),
        insecure.agent("vm"),
        "vm".into(),
        assignment.epoch,
        assignment.credential().to_string(),
        shutdown.clone(),
    ));
    {
        let capture = capture.clone();
        let mut registry = RegistryClient::new(
            ferry_runtime::connect(&registry.url, &insecure.agent("vm")).unwrap(),
        );
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            ferry_agent::resync::run(&capture, &mut registry, "vm", &shutdown)
                .await
                .unwrap()
        });
    }
    // Disk a's copy is sent and acknowledged whole...
    capture
        .marker("a", MarkerKind::SyncStarted, "initial")
        .await;
    assert!(capture.copy_chunk("a", 0, 64 * 1024).await.unwrap());
    s.flushed().await;
    let before = tail_all(insecure.at(&cache_url), "vm", 1).await.len();
    // ...then, with the cache away, disk b's writes overflow the buffer, and
    // a's SYNC_COMPLETED falls into the map with nothing of a's chunks.
    assert!(cache.signal_and_wait("TERM").success());
    for i in 0..3u64 {
        capture
            .write("b", i << 19, vec![0x62u8; 512 * 1024])
            .await
            .unwrap();
    }
    assert_eq!(s.overflows().await, 1);
    assert_eq!(
        capture
            .marker("a", MarkerKind::SyncCompleted, "initial")
            .await,
        0,
        "lost to tracking"
    );
    cache.restart();
    wait_serving(&cache_url).await;
    // Resync closes a's sync again, though none of a's chunks changed.
    ferry_testkit::wait_for(
        "a SYNC_COMPLETED of disk a after the overflow",
        Duration::from_secs(30),
        || {
            let cache_url = cache_url.clone();
        let insecure = insecure.clone();
            async move {
                tail_all(insecure.at(&cache_url), "vm", 1)
                    .await
                    .iter()
                    .skip(before)
                    .any(|r| {
                        r.disk_id == "a"
                            && matches!(&r.op, Some(Op::Marker(m)) if m.kind == MarkerKind::SyncCompleted as i32)
                    })
                    .then_some(())
            }
        },
    )
    .await;
    shutdown.cancel();
    registry.stop().await;
}

#[tokio::test]
async fn flushed_does_not_wait_for_records_an_earlier_overflow_dropped() {
    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::WriteOp;

    // No cache: three records wait, then the stream gives up on them
    // (dropped into the map, numbering to restart after the cache's).
    let s = Stream::new(1, StreamLimits::default());
    for _ in 0..3 {
        let write = Op::Write(WriteOp {
            offset: 0,
            data: vec![1u8; 512].into(),
        });
        assert!(s.push("os", write).await > 0);
    }
    s.enter_tracking().await;
    // A resync round calling flushed() now must not wait for sequence 3:
    // the new numbering may never reach it, and the round would hang with
    // the item RESYNCING for good.
    let durable = tokio::time::timeout(Duration::from_secs(10), s.flushed())
        .await
        .expect("flushed() returns: nothing it could wait for is pending");
    assert_eq!(durable, 0);
}
