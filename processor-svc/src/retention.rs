//! Which recovery points a policy keeps: every point younger than
//! `keep_all_for`; older ones thinned to the oldest of each
//! `thinned_spacing` slot (per kind, so app-consistent points survive beside
//! crash-consistent ones); none older than the retention. The newest point
//! is always kept, so an idle VM never ends up without one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_proto::registry::v1::ReplicationPolicy;
use ferry_runtime::time::from_duration;

use crate::replica::Point;

/// A policy's point spacing and retention.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Spacing of crash-consistent points.
    pub interval: Duration,
    /// How long points are kept.
    pub retention: Duration,
    /// Every point younger than this is kept.
    pub keep_all_for: Duration,
    /// Beyond `keep_all_for`, one point per slot of this length.
    pub thinned_spacing: Duration,
}

impl Default for Retention {
    /// ASR's defaults: points every 5 s, kept 24 h, all of them for 2 h, then
    /// one an hour.
    fn default() -> Self {
        Retention {
            interval: Duration::from_secs(5),
            retention: Duration::from_secs(24 * 3600),
            keep_all_for: Duration::from_secs(2 * 3600),
            thinned_spacing: Duration::from_secs(3600),
        }
    }
}

impl Retention {
    /// A registry policy's values; unset or zero ones take the defaults.
    pub fn from_policy(p: &ReplicationPolicy) -> Retention {
        let d = Retention::default();
        let get = |v: &Option<prost_types::Duration>, default: Duration| {
            v.as_ref()
                .and_then(from_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(default)
        };
        Retention {
            interval: get(&p.crash_consistent_interval, d.interval),
            retention: get(&p.recovery_point_retention, d.retention),
            keep_all_for: get(&p.keep_all_points_for, d.keep_all_for),
            thinned_spacing: get(&p.thinned_point_spacing, d.thinned_spacing),
        }
    }
}

/// The intervals of the points `policy` no longer keeps at `now` (Unix ns).
/// `points` is oldest first.
pub fn expired(points: &[Point], now: u64, policy: &Retention) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Some(newest) = points.last().map(|p| p.interval) else {
        return out;
    };
    let nanos = |d: Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
    let spacing = nanos(policy.thinned_spacing).max(1);
    let mut slots: BTreeMap<(crate::replica::PointKind, u64), u64> = BTreeMap::new();
    for p in points {
        if p.interval == newest {
            continue;
        }
        let age = now.saturating_sub(p.time_nanos.get());
        if age > nanos(policy.retention) {
            out.insert(p.interval);
        } else if age > nanos(policy.keep_all_for) {
            let slot = (p.kind, p.time_nanos.get() / spacing);
            if let std::collections::btree_map::Entry::Vacant(e) = slots.entry(slot) {
                e.insert(p.interval);
            } else {
                out.insert(p.interval);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::PointKind;

    fn point(interval: u64, secs: u64, kind: u8) -> Point {
        let kind = match kind {
            1 => PointKind::CrashConsistent,
            _ => PointKind::AppConsistent,
        };
        Point {
            interval,
            sequence_cut: ferry_proto::ids::Sequence(interval),
            kind,
            time_nanos: ferry_proto::ids::UnixNanos(secs * 1_000_000_000),
            created_nanos: ferry_proto::ids::UnixNanos(secs * 1_000_000_000),
            disks: vec![],
            pinned_by: vec![],
            bookmark_id: String::new(),
            group: String::new(),
            damaged: None,
        }
    }

    #[test]
    fn recent_points_stay_older_ones_thin_out_and_expire() {
        let policy = Retention {
            interval: Duration::from_secs(1),
            retention: Duration::from_secs(100),
            keep_all_for: Duration::from_secs(10),
            thinned_spacing: Duration::from_secs(20),
        };
        // One point a second from t=0 to t=119; now is t=120.
        let points: Vec<Point> = (0..120).map(|s| point(s + 1, s, 1)).collect();
        let gone = expired(&points, 120_000_000_000, &policy);
        let kept: Vec<u64> = points
            .iter()
            .map(|p| p.interval)
            .filter(|i| !gone.contains(i))
            .collect();
        // Older than 100 s: gone (t < 20). Between 10 s and 100 s old (t in
        // 20..=109): the oldest of each 20 s slot (t = 20, 40, 60, 80, 100).
        // Younger than 10 s (t >= 110): all.
        let mut expected: Vec<u64> = vec![21, 41, 61, 81, 101];
        expected.extend(111..=120);
        assert_eq!(kept, expected);
    }

    #[test]
    fn kinds_thin_apart_and_the_newest_point_always_stays() {
        let policy = Retention {
            interval: Duration::from_secs(1),
            retention: Duration::from_secs(5),
            keep_all_for: Duration::from_secs(1),
            thinned_spacing: Duration::from_secs(100),
        };
        let points = vec![point(1, 10, 1), point(2, 11, 2), point(3, 12, 1)];
        assert_eq!(expired(&points, 14_000_000_000, &policy), BTreeSet::new());
        let points = vec![point(1, 10, 1), point(2, 11, 1), point(3, 12, 1)];
        assert_eq!(
            expired(&points, 14_000_000_000, &policy),
            BTreeSet::from([2])
        );
        // An idle VM: its only point is far past retention and stays.
        assert_eq!(
            expired(&[point(7, 0, 1)], u64::MAX, &policy),
            BTreeSet::new()
        );
    }
}
