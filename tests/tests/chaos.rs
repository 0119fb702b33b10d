//! Chaos in CI: registry-svc, cache-svc, processor-svc, failover-svc and
//! ferry-agent as real processes, `FaultProxy` on the agent's and the
//! processor's links to the cache and on every link to registry, qemu-io
//! writing seeded data through the agent's NBD export; 22 SIGKILLs with
//! restarts and 6 cuts or stalls, drawn from one seed, while it writes.
//! Healed, the VM is PROTECTED again and a planned failover's disks equal
//! the source images, which hold every write qemu-io saw complete.
//! `ferry-loadgen chaos --minutes N` runs the same for longer
//! (`ferry_testkit::chaos`).

use ferry_testkit::chaos::{self, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_sigkills_and_partitions_and_a_planned_failover_is_exact() {
    let seed = chaos::seed_from_env(0xc4a0_5eed_0011);
    println!("seed {seed:#x} (FERRY_TEST_SEED={seed:x} repeats it)");
    let report = chaos::run(ChaosOptions::ci(seed)).await;
    println!("{report}");
    assert!(report.total_kills() >= 20, "{report}");
    assert!(report.total_faults() >= 5, "{report}");
    assert!(
        report.writes_completed > 0 && report.batches_ok > 0,
        "the VM wrote: {report}"
    );
}
