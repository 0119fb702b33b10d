//! The one way Ferry retries: exponential backoff with full jitter (each
//! wait is uniform in `[0, min(max, base · 2^attempt)]`, so peers that lost
//! the same server do not come back in step), cancellation-aware, with an
//! is-permanent predicate that stops retrying what cannot succeed.
//!
//! Two shapes: [`retry`] runs one operation until it succeeds; [`Backoff`]
//! paces a reconnect loop that owns its own control flow (a stream that
//! runs for hours between failures calls `reset` once it is established).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How to back off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryParams {
    /// The cap of the first wait.
    pub base: Duration,
    /// No wait is longer than this.
    pub max: Duration,
    /// Give up after this many attempts; None for never.
    pub max_attempts: Option<u32>,
}

impl RetryParams {
    /// Reconnecting to a peer: 100 ms doubling to 5 s, forever.
    pub const RECONNECT: RetryParams = RetryParams {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
        max_attempts: None,
    };

    /// Reporting to a peer that may be restarting: 200 ms doubling to 10 s.
    pub const REPORT: RetryParams = RetryParams {
        base: Duration::from_millis(200),
        max: Duration::from_secs(10),
        max_attempts: None,
    };

    /// The cap of the wait after `attempt` failures (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

impl Default for RetryParams {
    fn default() -> Self {
        RetryParams::RECONNECT
    }
}

/// Paces a loop's retries: `wait` after a failure, `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    params: RetryParams,
    attempt: u32,
}

impl Backoff {
    /// A backoff that has seen no failure yet.
    pub fn new(params: RetryParams) -> Backoff {
        Backoff { params, attempt: 0 }
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Whether the attempts are used up.
    pub fn exhausted(&self) -> bool {
        self.params.max_attempts.is_some_and(|m| self.attempt >= m)
    }

    /// Forgets the failures: the next wait is short again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait (full jitter), counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.params.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        jitter(ceiling)
    }

    /// Waits the next delay. False when `cancel` fired first: the caller
    /// stops.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub enum RetryError<E> {
    /// The predicate called this error permanent.
    Permanent(E),
    /// `max_attempts` ran out; the last error.
    Exhausted(E),
    /// Cancelled before success.
    Cancelled,
}

impl<E: std::fmt::Display> std::fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryError::Permanent(e) => write!(f, "{e}"),
            RetryError::Exhausted(e) => write!(f, "{e} (gave up retrying)"),
            RetryError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for RetryError<E> {}

/// Runs `op` until it succeeds, fails permanently (`is_permanent`), runs
/// out of attempts, or `cancel` fires (also while an attempt runs).
/// `what` names the operation in the log line of each retry.
pub async fn retry<T, E, Fut>(
    params: RetryParams,
    cancel: &CancellationToken,
    what: &str,
    is_permanent: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Fut,
) -> Result<T, RetryError<E>>
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(params);
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return Err(RetryError::Cancelled),
            outcome = op() => outcome,
        };
        match outcome {
            Ok(value) => return Ok(value),
            Err(e) if is_permanent(&e) => return Err(RetryError::Permanent(e)),
            Err(e) => {
                if params
                    .max_attempts
                    .is_some_and(|m| backoff.attempts() + 1 >= m)
                {
                    return Err(RetryError::Exhausted(e));
                }
                tracing::warn!(error = %e, attempt = backoff.attempts() + 1, "{what} failed; retrying");
                if !backoff.wait(cancel).await {
                    return Err(RetryError::Cancelled);
                }
            }
        }
    }
}

/// Uniform in `[0, ceiling]`, from the OS's generator (a failed read gives
/// the ceiling: plain exponential backoff).
fn jitter(ceiling: Duration) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    match getrandom::u64() {
        Ok(r) => Duration::from_nanos(r % nanos.saturating_add(1)),
        Err(_) => ceiling,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const FAST: RetryParams = RetryParams {
        base: Duration::from_millis(1),
        max: Duration::from_millis(4),
        max_attempts: None,
    };

    #[test]
    fn waits_double_up_to_the_cap_and_jitter_stays_under_it() {
        let p = RetryParams::RECONNECT;
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
        assert_eq!(p.ceiling(3), Duration::from_millis(800));
        assert_eq!(p.ceiling(10), Duration::from_secs(5));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(5));
        let mut b = Backoff::new(p);
        let mut distinct = std::collections::BTreeSet::new();
        for attempt in 0..40 {
            let d = b.next_delay();
            assert!(d <= p.ceiling(attempt), "{d:?} at {attempt}");
            distinct.insert(d);
        }
        assert!(distinct.len() > 20, "jitter varies the waits: {distinct:?}");
        b.reset();
        assert!(b.next_delay() <= p.base);
    }

    #[tokio::test]
    async fn retries_until_success() {
        let calls = AtomicU32::new(0);
        let got = retry(
            FAST,
            &CancellationToken::new(),
            "op",
            |_: &String| false,
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(format!("fail {n}"))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn a_permanent_error_stops_at_once() {
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry(
            FAST,
            &CancellationToken::new(),
            "op",
            |e: &String| e == "no",
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("no".to_string()) }
            },
        )
        .await;
        assert_eq!(got, Err(RetryError::Permanent("no".into())));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn attempts_run_out() {
        let params = RetryParams {
            max_attempts: Some(3),
            ..FAST
        };
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry(
            params,
            &CancellationToken::new(),
            "op",
            |_: &String| false,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("again".to_string()) }
            },
        )
        .await;
        assert_eq!(got, Err(RetryError::Exhausted("again".into())));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn cancellation_ends_a_wait_and_an_attempt() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut slow = Backoff::new(RetryParams {
            base: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            max_attempts: None,
        });
        slow.next_delay();
        assert!(!slow.wait(&cancel).await);
        let got: Result<(), RetryError<String>> = retry(
            FAST,
            &cancel,
            "op",
            |_| false,
            std::future::pending::<Result<(), String>>,
        )
        .await;
        assert_eq!(got, Err(RetryError::Cancelled));
    }
}
