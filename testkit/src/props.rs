//! Shared set-up of the decoders' property tests (docs/reliability.md,
//! "Decoders under property tests").
//!
//! CI runs a bounded number of cases from a fixed seed, so a run is
//! reproducible and a red CI is red again locally. `PROPTEST_CASES=100000`
//! makes a longer run and `PROPTEST_RNG_SEED=<n>` explores other inputs;
//! both override what a test asks for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

/// The seed CI runs from.
pub const SEED: u64 = 0x0f0e_7272_0011;

/// A config of `cases` cases from [`SEED`], unless the environment says
/// otherwise.
pub fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    // Failures are kept beside the test file (`tests/x.rs` keeps them in
    // `tests/x.proptest-regressions`), to be checked in.
    if config.failure_persistence.is_some() {
        config.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        )));
    }
    config
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// How many panics tokio's threads (where a server's tasks run) have seen
/// so far. tokio swallows a task's panic (the connection just closes), so a
/// test that must see "zero panics" compares this before and after. Panics
/// of the test's own thread (failed assertions) are not counted.
pub fn panics() -> usize {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("tokio-")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}

/// Flips `mask` (non-zero) into the byte at `at % len` of `bytes`, which
/// must not be empty; returns the position.
pub fn flip(bytes: &mut [u8], at: usize, mask: u8) -> usize {
    let at = at % bytes.len();
    bytes[at] ^= mask.max(1);
    at
}

/// A temporary directory for a case, in RAM (/dev/shm) where there is one:
/// these tests are about decoding, and thousands of cases each fsyncing a
/// real disk would take minutes.
pub fn tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}
