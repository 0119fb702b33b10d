//! Protection never harms the protected VM: a VM write never waits on a
//! dead cache, the NBD export holds bounded memory whatever a client sends
//! (connections per export, payload bytes in flight, zeroing of any
//! length), and a write the source image only partly took (ENOSPC) is
//! failed with the right errno and marked for resync, never left
//! unrecorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::nbd::NbdLimits;
use ferry_agent::stream::{self, Stream, StreamLimits, DIRTY_CHUNK};
use ferry_runtime::CancellationToken;
use ferry_testkit::nbd::{Nbd, Refused, CMD_WRITE};
use ferry_testkit::{wait_for, Rng, SmallFs};

/// A capture of one disk "os" at `path` whose stream goes nowhere (nothing
/// drains it) unless the test runs one.
fn capture_at(path: &std::path::Path, size: u64, limits: StreamLimits) -> Arc<Capture> {
    let stream = Stream::new(1, limits);
    Arc::new(Capture::new(
        vec![SourceDisk::open("os", path, size).unwrap()],
        stream,
    ))
}

/// The NBD export of `capture` on loopback; its address.
async fn export(capture: &Arc<Capture>, limits: NbdLimits, stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(ferry_agent::nbd::serve_with(
        listener,
        capture.clone(),
        limits,
        stop.clone(),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_write_never_waits_for_a_dead_cache_behind_initial_replication() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("os.raw");
    let size = 8u64 << 20;
    let seed = 0x5eed_0011;
    println!("seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..size / 8 {
        f.write_all(&rng.next().to_le_bytes()).unwrap();
    }
    drop(f);
    // A cache that accepts connections and never answers.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    let limits = StreamLimits {
        buffer_bytes: 1 << 20,
        max_outage: Duration::from_secs(3600),
        ..StreamLimits::default()
    };
    let capture = capture_at(&path, size, limits);
    let stop = CancellationToken::new();
    tokio::spawn(stream::run(
        capture.stream().clone(),
        dead_url,
        ferry_runtime::peers::Credentials::none(),
        "vm".into(),
        ferry_proto::ids::Epoch(1),
        "credential".into(),
        stop.clone(),
    ));
    // Initial replication copies until the buffer is half full, then waits.
    let copier = {
        let capture = capture.clone();
        tokio::spawn(async move {
            for chunk in 0..size / DIRTY_CHUNK {
                capture
                    .copy_chunk("os", chunk * DIRTY_CHUNK, DIRTY_CHUNK)
                    .await
                    .unwrap();
            }
        })
    };
    let stream = capture.stream().clone();
    wait_for("the copy to wait for room", Duration::from_secs(30), || {
        let stream = stream.clone();
        async move {
            (stream.pending_bytes().await >= (1 << 20) / 2 - 2 * DIRTY_CHUNK as usize).then_some(())
        }
    })
    .await;
    assert!(!copier.is_finished(), "the copy waits for the dead cache");
    // The VM's write completes now, while the cache is still dead.
    let seq = tokio::time::timeout(
        Duration::from_secs(10),
        capture.write("os", 4096, vec![7u8; 4096]),
    )
    .await
    .expect("a VM write never waits for the cache")
    .unwrap();
    assert!(seq > 0);
    stop.cancel();
    copier.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_takes_a_bounded_number_of_clients() {
    let dir = tempfile::tempdir().unwrap();
    let capture = capture_at(&dir.path().join("os.raw"), 1 << 20, StreamLimits::default());
    let stop = CancellationToken::new();
    let limits = NbdLimits {
        connections_per_export: 2,
        ..NbdLimits::default()
    };
    let addr = export(&capture, limits, &stop).await;
    let probe = addr.clone();
    let first = tokio::task::spawn_blocking(move || {
        let first = Nbd::go(&addr, "os").unwrap();
        let _second = Nbd::go(&addr, "os").unwrap();
        match Nbd::go(&addr, "os") {
            Err(Refused::Reply { kind, message }) => {
                assert_eq!(kind, (1 << 31) + 2, "NBD_REP_ERR_POLICY");
                assert!(message.contains("the most it takes"), "{message}");
            }
            Err(e) => panic!("refused without a reply: {e:?}"),
            Ok(_) => panic!("a third client attached past the limit of 2"),
        }
        first
    })
    .await
    .unwrap();
    // A client that leaves frees its place.
    drop(first);
    wait_for(
        "a freed place on the export",
        Duration::from_secs(10),
        || {
            let probe = probe.clone();
            async move {
                tokio::task::spawn_blocking(move || Nbd::go(&probe, "os").ok())
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_make_the_export_hold_more_than_its_in_flight_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let capture = capture_at(
        &dir.path().join("os.raw"),
        64 << 20,
        StreamLimits::default(),
    );
    let stop = CancellationToken::new();
    let limits = NbdLimits {
        in_flight_bytes: 32 << 20,
        ..NbdLimits::default()
    };
    let addr = export(&capture, limits, &stop).await;
    // Writes cannot complete (a group round's hold, say): every payload the
    // export reads stays in memory until they do.
    let hold = capture.hold_writes().await;
    let sent = tokio::task::spawn_blocking(move || {
        let mut nbd = Nbd::go(&addr, "os").unwrap();
        nbd.socket()
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let payload = vec![0x5au8; 4 << 20];
        let mut sent = 0u64;
        for i in 0..64u64 {
            if nbd
                .send(CMD_WRITE, (i % 16) * (4 << 20), 4 << 20, &payload)
                .is_err()
            {
                break;
            }
            sent += 4 << 20;
        }
        sent
    })
    .await
    .unwrap();
    println!(
        "the client got {} MiB into the export before it pushed back",
        sent >> 20
    );
    assert!(
        sent < 96 << 20,
        "the export read {} MiB of payload with 32 MiB allowed in flight",
        sent >> 20
    );
    drop(hold);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroing_4_gib_unaligned_allocates_nothing_of_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("os.raw");
    let size = 8u64 << 30;
    let capture = capture_at(&path, size, StreamLimits::default());
    let stop = CancellationToken::new();
    let addr = export(&capture, NbdLimits::default(), &stop).await;
    let length = u32::MAX - 1023;
    tokio::task::spawn_blocking(move || {
        let mut nbd = Nbd::go(&addr, "os").unwrap();
        assert_eq!(nbd.write(0, &[1u8; 4096]).unwrap(), 0);
        assert_eq!(nbd.write_zeroes(100, length).unwrap(), 0, "WRITE_ZEROES");
        assert_eq!(
            nbd.read(0, 4096).unwrap(),
            [&[1u8; 100][..], &[0u8; 3996][..]].concat()
        );
    })
    .await
    .unwrap();
    let stream = capture.stream();
    assert_eq!(stream.overflows().await, 0, "no overflow");
    assert_eq!(
        stream.last().await,
        4,
        "the write, then the head sector, the aligned middle, the tail sector"
    );
    assert!(
        stream.pending_bytes().await < 8192,
        "{} bytes buffered for a payload-free zeroing",
        stream.pending_bytes().await
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated <= 1 << 20,
        "the source image allocated {allocated} bytes"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_full_source_disk_took_in_part_is_enospc_and_marked_for_resync() {
    let fs = SmallFs::mount(1 << 20);
    let path = fs.path().join("os.raw");
    let size = 8u64 << 20;
    let capture = capture_at(&path, size, StreamLimits::default());
    let stop = CancellationToken::new();
    let addr = export(&capture, NbdLimits::default(), &stop).await;
    let errno = tokio::task::spawn_blocking(move || {
        let mut nbd = Nbd::go(&addr, "os").unwrap();
        // 2 MiB at 1 MiB onto a filesystem with 1 MiB: part of it lands.
        nbd.write(1 << 20, &vec![0x77u8; 2 << 20]).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(errno, 28, "NBD_ENOSPC");
    let stream = capture.stream();
    assert!(stream.tracking().await.0, "the stream tracks the range");
    let chunks = stream.unsent().await.data.chunks("os");
    let expect: Vec<u64> = ((1 << 20) / DIRTY_CHUNK..(3 << 20) / DIRTY_CHUNK).collect();
    assert_eq!(
        chunks, expect,
        "every chunk the failed write may have changed"
    );
    assert!(
        stream.tracking_reason().await.contains("No space left"),
        "{}",
        stream.tracking_reason().await
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_in_their_handshake_cannot_lock_the_vm_out() {
    let dir = tempfile::tempdir().unwrap();
    let capture = capture_at(&dir.path().join("os.raw"), 1 << 20, StreamLimits::default());
    let stop = CancellationToken::new();
    let limits = NbdLimits {
        connections_per_export: 1,
        handshake_timeout: Duration::from_secs(1),
        ..NbdLimits::default()
    };
    let addr = export(&capture, limits, &stop).await;
    // Every handshake place taken by clients that never answer the greeting.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    // The VM's own client attaches once they have been dropped.
    wait_for("the VM's client to attach", Duration::from_secs(10), || {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || Nbd::go(&addr, "os").ok())
                .await
                .unwrap()
        }
    })
    .await;
    drop(stalled);
    stop.cancel();
}
