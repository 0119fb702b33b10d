//! The open interval and its cut: the VM's meta, the chunks changed in the
//! interval (in memory until written), and the recovery point that closes
//! it.

use std::collections::{BTreeMap, BTreeSet};

use ferry_proto::ids::{Incarnation, PointId, Sequence, UnixNanos};
use ferry_runtime::Refused;
use serde::{Deserialize, Serialize};

use super::keys::{json, pkey, unjson};
use super::patch::Patch;
use super::point_kind::PointKind;
use super::{Result, VmReplica};
use crate::error::ProcessorError;

/// A recovery point as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The interval it closed; its versions are those `<= interval`.
    pub interval: u64,
    /// It holds exactly the records with sequence `<=` this.
    pub sequence_cut: Sequence,
    /// What it is consistent to.
    pub kind: PointKind,
    /// When the newest write it holds completed at the agent.
    pub time_nanos: UnixNanos,
    /// When it was cut.
    pub created_nanos: UnixNanos,
    /// The disks and their sizes.
    pub disks: Vec<(String, u64)>,
    /// Who pinned it; never pruned while non-empty.
    pub pinned_by: Vec<String>,
    /// The bookmark id of a multi-VM point.
    pub bookmark_id: String,
    /// The replication group of a multi-VM point.
    #[serde(default)]
    pub group: String,
    /// Why its data is known damaged (a blob it reads failed its checksum
    /// on a read or in the scrub); such a point is never served. Not
    /// stored: worked out from the replica's damage record when read.
    #[serde(skip)]
    pub damaged: Option<String>,
}

impl Point {
    /// Its id, unique per VM: the interval it closed.
    pub fn id(&self) -> PointId {
        PointId(self.interval)
    }
}

/// The error of a point `id` (as received) that `vm` does not have.
pub fn missing_point(vm: &str, id: &str) -> ProcessorError {
    Refused::not_found(format!(
        "VM {vm:?} has no recovery point {id:?} (unknown or expired); list its points"
    ))
    .into()
}

/// What the index keeps of a VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    /// Every record up to this sequence is in the replica (durably once
    /// saved).
    pub applied: Sequence,
    /// The open interval; the next point closes it.
    pub interval: u64,
    /// Disks whose initial replication completed.
    pub synced: BTreeSet<String>,
    /// Disks in initial replication or resync now.
    pub syncing: BTreeSet<String>,
    /// Disk sizes.
    pub disks: BTreeMap<String, u64>,
    /// When the newest applied record (a write or a marker) was captured
    /// at the agent (Unix ns): the replica holds the source up to then.
    pub last_time_nanos: UnixNanos,
    /// The id the next segment file gets.
    pub next_segment: u64,
    /// The sequence cut of the newest point (0 if none).
    pub last_point_sequence: Sequence,
    /// Ranges (offset, length) per disk whose checksum differed from the
    /// source's in a checksum-based resync; no point until data for each
    /// has arrived.
    pub mismatched: BTreeMap<String, BTreeSet<(u64, u64)>>,
    /// The protected item's incarnation (registry) this replica belongs
    /// to; 0 for replicas from before incarnations.
    pub incarnation: Incarnation,
    /// The lineage of the cache log that `applied` counts in (0: none
    /// yet). Records of another lineage do not follow those applied.
    pub lineage: u64,
    /// Disks that must be checked whole against the source before any
    /// point: records between what was applied and what comes next were
    /// lost (the cache's log was trimmed past this replica, or lost and
    /// started again). Cleared per disk by a "resync:full" round.
    pub gap: BTreeSet<String>,
    /// Why the gap is there, for people.
    pub gap_reason: String,
    /// Re-protect: the replica was seeded from the original disks.
    pub seeded: bool,
    /// Re-protect: units (of the agent's resync unit) of each disk the
    /// original side wrote after it was fenced: a digest compared over one
    /// counts as differing whatever it says, so the agent sends it again.
    pub distrusted: BTreeMap<String, BTreeSet<u64>>,
}

/// The SYNC_STARTED id of a resync round that covers every chunk of its
/// disk (cache.proto): only such a round closes a gap.
pub const FULL_RESYNC: &str = "resync:full";

/// A chunk changed in the open interval, not yet written.
#[derive(Debug, Clone)]
pub(super) enum Dirty {
    Zero,
    /// The whole chunk.
    Data(Vec<u8>),
    /// Extents over the chunk's previous version (partial writes).
    Patch(Patch),
}

pub(super) fn dirty_len(d: &Dirty) -> usize {
    match d {
        Dirty::Zero => 0,
        Dirty::Data(v) => v.len(),
        Dirty::Patch(p) => p.data_bytes(),
    }
}

pub(super) fn not_cuttable(meta: &Meta) -> Option<String> {
    if !meta.gap.is_empty() {
        let disks: Vec<&str> = meta.gap.iter().map(String::as_str).collect();
        return Some(format!(
            "disk(s) {} must be checked whole against the source ({}); no recovery point \
             until that resync",
            disks.join(", "),
            meta.gap_reason
        ));
    }
    if let Some((disk, ranges)) = meta.mismatched.iter().next() {
        return Some(format!(
            "disk {disk} has {} range(s) that differ from the source after a checksum \
             resync; no recovery point until they arrive",
            ranges.len()
        ));
    }
    if !meta.syncing.is_empty() {
        let disks: Vec<&str> = meta.syncing.iter().map(String::as_str).collect();
        return Some(format!(
            "disk(s) {} are in initial replication or resync; no recovery point until they finish",
            disks.join(", ")
        ));
    }
    let missing: Vec<&str> = meta
        .disks
        .keys()
        .filter(|d| !meta.synced.contains(*d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "disk(s) {} have not completed initial replication; no recovery point yet",
            missing.join(", ")
        ));
    }
    None
}

impl VmReplica {
    /// Why no point may be cut now, if that is so.
    pub fn not_cuttable(&self) -> Result<Option<String>> {
        let w = self.writer()?;
        Ok(not_cuttable(&w.meta))
    }

    /// Cuts a point of `kind` at the applied sequence: writes the interval's
    /// changed chunks and the point, and opens the next interval.
    pub fn cut(&self, kind: PointKind, bookmark_id: &str, now_nanos: u64) -> Result<Point> {
        self.cut_inner(kind, bookmark_id, "", None, now_nanos)
    }

    /// Cuts a multi-VM point at a group bookmark: its time is the round's,
    /// the same on every member.
    pub fn cut_bookmark(
        &self,
        id: &str,
        group: &str,
        round_nanos: u64,
        now_nanos: u64,
    ) -> Result<Point> {
        self.cut_inner(PointKind::MultiVm, id, group, Some(round_nanos), now_nanos)
    }

    pub(super) fn cut_inner(
        &self,
        kind: PointKind,
        bookmark_id: &str,
        group: &str,
        time: Option<u64>,
        now_nanos: u64,
    ) -> Result<Point> {
        let mut w = self.writer()?;
        if let Some(why) = not_cuttable(&w.meta) {
            return Err(Refused::failed_precondition(why).into());
        }
        let point = Point {
            interval: w.meta.interval,
            sequence_cut: w.meta.applied,
            kind,
            time_nanos: time.map(UnixNanos).unwrap_or(w.meta.last_time_nanos),
            created_nanos: UnixNanos(now_nanos),
            disks: w.meta.disks.iter().map(|(d, s)| (d.clone(), *s)).collect(),
            pinned_by: Vec::new(),
            bookmark_id: bookmark_id.to_string(),
            group: group.to_string(),
            damaged: None,
        };
        w.meta.interval += 1;
        w.meta.last_point_sequence = point.sequence_cut;
        self.checkpoint_locked(&mut w, Some(&point))?;
        Ok(point)
    }

    /// Every point, oldest first.
    pub fn points(&self) -> Result<Vec<Point>> {
        self.tree
            .scan_prefix(b"p")
            .map(|kv| self.with_damage(unjson(&kv?.1)?))
            .collect()
    }

    /// One point by id.
    pub fn point(&self, id: PointId) -> Result<Point> {
        match self.tree.get(pkey(id.0))? {
            Some(b) => self.with_damage(unjson(&b)?),
            None => Err(missing_point(&self.vm, &id.to_string())),
        }
    }

    /// Pins a point for `holder` (idempotent).
    pub fn pin(&self, id: PointId, holder: &str) -> Result<Point> {
        let _w = self.writer()?;
        let mut p = self.point(id)?;
        if !p.pinned_by.iter().any(|h| h == holder) {
            p.pinned_by.push(holder.to_string());
            self.tree.insert(pkey(p.interval), json(&p)?)?;
            self.db.flush()?;
        }
        Ok(p)
    }

    /// Releases `holder`'s pin (idempotent).
    pub fn unpin(&self, id: PointId, holder: &str) -> Result<Point> {
        let _w = self.writer()?;
        let mut p = self.point(id)?;
        if p.pinned_by.iter().any(|h| h == holder) {
            p.pinned_by.retain(|h| h != holder);
            self.tree.insert(pkey(p.interval), json(&p)?)?;
            self.db.flush()?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::cache::v1::record::Op;
    use ferry_proto::cache::v1::ZeroOp;

    use super::super::testing::{Fixture, CHUNK, SIZE};
    use super::*;

    #[test]
    fn a_point_stored_before_typed_kinds_reads_and_one_of_no_kind_is_corrupt() {
        let stored = r#"{"interval":7,"sequence_cut":42,"kind":2,"time_nanos":5,
            "created_nanos":6,"disks":[["os",4096]],"pinned_by":["job-1"],
            "bookmark_id":"","group":""}"#;
        let p: Point = unjson(stored.as_bytes()).unwrap();
        assert_eq!(
            (p.id().to_string(), p.kind),
            ("rp-7".into(), PointKind::AppConsistent)
        );
        let unknown = stored.replace(r#""kind":2"#, r#""kind":9"#);
        let err = unjson::<Point>(unknown.as_bytes()).unwrap_err();
        assert!(matches!(err, ProcessorError::Corrupt(_)), "{err}");
    }

    #[test]
    fn a_points_time_is_its_newest_records_capture_time_marker_or_write() {
        // Captured at 1 and 2: the markers of the initial replication. The
        // first point holds the source as of the second, not "never".
        let mut f = Fixture::new(1 << 20);
        assert_eq!(f.cut().time_nanos, UnixNanos(2));
        let mut image = vec![0u8; SIZE as usize];
        f.write_chunks(&mut image, &[0], 1);
        assert_eq!(f.cut().time_nanos, UnixNanos(3));
        // Nothing written since: a marker still moves the point's time.
        f.apply(Op::Marker(ferry_proto::cache::v1::Marker {
            kind: ferry_proto::cache::v1::MarkerKind::AppConsistent as i32,
            id: String::new(),
            time_unix_nanos: 0,
        }));
        assert_eq!(f.cut().time_nanos, UnixNanos(4));
    }

    #[test]
    fn a_cut_point_reads_exactly_what_was_applied_up_to_it() {
        let mut f = Fixture::new(1 << 20);
        let mut image = vec![0u8; SIZE as usize];
        f.write_chunks(&mut image, &[0, 1, 2], 1);
        // Written before the cut by memory pressure: still this interval's.
        f.replica.checkpoint().unwrap();
        f.write_chunks(&mut image, &[1], 2);
        f.apply(Op::WriteZeroes(ZeroOp {
            offset: 2 * CHUNK,
            length: CHUNK,
        }));
        image[(2 * CHUNK) as usize..(3 * CHUNK) as usize].fill(0);
        let first = f.cut();
        assert_eq!(first.sequence_cut, f.replica.applied().unwrap());
        let at_first = image.clone();

        // What comes after the cut, written or not, is not the point's.
        f.write_chunks(&mut image, &[0, 3], 3);
        f.replica.checkpoint().unwrap();
        f.write_chunks(&mut image, &[4], 4);
        assert!(f.read_all(&first) == at_first, "the point reads its cut");
        let second = f.cut();
        assert!(f.read_all(&first) == at_first);
        assert!(f.read_all(&second) == image);
        assert_eq!(second.interval, first.interval + 1);
    }
}
