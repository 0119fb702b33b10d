//! Writes in flight, by disk range: a write waits only for earlier writes
//! it overlaps. Overlapping writes reach the image and the stream in the
//! same order (the replica ends as the source does); writes to other
//! ranges reach the image side by side. Concurrent writes that do not
//! overlap may enter the stream in either order: neither was acknowledged
//! to the VM before the other was sent, so every prefix of the stream is
//! still a state the VM's disk could have had at a crash.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// The ranges of the writes in flight.
#[derive(Default)]
pub struct InFlight {
    /// (id, disk, start, end) of each write holding its range.
    held: Mutex<Vec<(u64, String, u64, u64)>>,
    released: Notify,
    next_id: AtomicU64,
}

/// A range held until dropped.
pub struct Held<'a> {
    owner: &'a InFlight,
    id: u64,
}

impl InFlight {
    fn held(&self) -> MutexGuard<'_, Vec<(u64, String, u64, u64)>> {
        // The list stays consistent whatever panicked while holding it.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no write in flight overlaps `start..end` of `disk`, then
    /// holds that range.
    pub async fn hold(&self, disk: &str, start: u64, end: u64) -> Held<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held();
                let overlaps = held
                    .iter()
                    .any(|(_, d, s, e)| d == disk && *s < end && start < *e);
                if !overlaps {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    held.push((id, disk.to_string(), start, end));
                    return Held { owner: self, id };
                }
            }
            released.await;
        }
    }

    /// Writes in flight now.
    pub fn len(&self) -> usize {
        self.held().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.owner.held().retain(|(id, ..)| *id != self.id);
        self.owner.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_waits_for_the_writes_it_overlaps_and_no_other() {
        let f = InFlight::default();
        let a = f.hold("os", 0, 4096).await;
        // Elsewhere on the disk, or on another disk: at once.
        let b = f.hold("os", 4096, 8192).await;
        let c = f.hold("data", 0, 4096).await;
        assert_eq!(f.len(), 3);
        // Overlapping a: waits until a is released.
        let mut d = Box::pin(f.hold("os", 4095, 4097));
        assert!(futures::poll!(d.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(d.as_mut()).is_pending(), "b still overlaps");
        drop(b);
        let d = d.await;
        drop((c, d));
        assert!(f.is_empty());
    }
}
