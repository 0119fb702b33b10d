//! The C allocator's arenas, limited once as a binary starts.
//!
//! glibc's malloc gives each thread that finds the arenas busy one of its
//! own, up to 8 per core, and gives back little of what is freed inside
//! them. Under 4 KiB random writes that held processor-svc's resident
//! memory at two to three times its peak heap (heaptrack: 350 MB of heap,
//! 735–1171 MiB resident), and the agent's at 100 MiB over its buffer
//! (docs/performance-analysis.md). Two arenas keep that retention small;
//! with two cores' worth of threads they are rarely contended.

/// Arenas glibc's malloc may use.
const ARENAS: i32 = 2;

/// Limits glibc's malloc to [`ARENAS`] arenas, unless the environment sets
/// `MALLOC_ARENA_MAX` (glibc's own setting, which then wins). Call it first
/// in `main`, before any thread starts: a thread keeps the arena it first
/// got.
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; it reads
    // no memory of ours and is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// A multi-threaded tokio runtime with every driver, for a binary's main
/// (after [`limit_malloc_arenas`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
