//! Re-protect's seed: before the agent of a re-protected item streams, its
//! replica is filled with the original disks (what the VM ran from before
//! the failover), so that the agent's digest comparison finds, and the
//! stream carries, only the chunks that differ. Ranges the original side
//! wrote after it was fenced are distrusted: their digests count as
//! differing whatever they say.

use std::collections::BTreeSet;

use super::apply::RESYNC_UNIT;
use super::interval::Meta;
use super::{Result, VmReplica};
use crate::error::ProcessorError;

/// Whether `offset..offset + length` of `disk` covers a distrusted unit;
/// such units are forgotten (the chunk is asked for now).
pub(super) fn take_distrusted(meta: &mut Meta, disk: &str, offset: u64, length: u64) -> bool {
    let Some(units) = meta.distrusted.get_mut(disk) else {
        return false;
    };
    let first = offset / RESYNC_UNIT;
    let last = (offset + length.max(1) - 1) / RESYNC_UNIT;
    let hit: Vec<u64> = units.range(first..=last).copied().collect();
    for u in &hit {
        units.remove(u);
    }
    if units.is_empty() {
        meta.distrusted.remove(disk);
    }
    !hit.is_empty()
}

impl VmReplica {
    /// Whether anything was ever put in: applied from a stream or seeded.
    pub fn is_blank(&self) -> Result<bool> {
        let w = self.writer()?;
        let m = &w.meta;
        Ok(m.applied.get() == 0
            && m.lineage == 0
            && m.last_point_sequence.get() == 0
            && !m.seeded
            && w.dirty.is_empty())
    }

    /// Starts a seed: `distrusted` (disk, offset, length) replaces what was
    /// distrusted before.
    pub fn begin_seed(&self, distrusted: &[(String, u64, u64)]) -> Result<()> {
        let mut w = self.writer()?;
        w.meta.seeded = true;
        w.meta.distrusted.clear();
        for (disk, offset, length) in distrusted {
            let size = *w.meta.disks.get(disk).ok_or_else(|| {
                ferry_runtime::Refused::invalid_argument(format!(
                    "distrusted range names disk {disk:?}, which VM {:?} does not have",
                    self.vm
                ))
            })?;
            let end = offset.saturating_add(*length).min(size);
            if *offset >= end {
                continue;
            }
            let units: BTreeSet<u64> = (offset / RESYNC_UNIT..=(end - 1) / RESYNC_UNIT).collect();
            w.meta
                .distrusted
                .entry(disk.clone())
                .or_default()
                .extend(units);
        }
        Ok(())
    }

    /// Puts `data` at `offset` of `disk` into the open interval, as a
    /// stream write would.
    pub fn seed(&self, disk: &str, offset: u64, data: &[u8]) -> Result<()> {
        if !offset.is_multiple_of(512) || !(data.len() as u64).is_multiple_of(512) {
            return Err(ferry_runtime::Refused::invalid_argument(format!(
                "seed data at {offset} ({} bytes) of disk {disk:?} is not sector aligned",
                data.len()
            ))
            .into());
        }
        let mut w = self.writer()?;
        if !w.meta.disks.contains_key(disk) {
            return Err(ferry_runtime::Refused::invalid_argument(format!(
                "seed data names disk {disk:?}, which VM {:?} does not have",
                self.vm
            ))
            .into());
        }
        self.apply_range(&mut w, disk, offset, data.len() as u64, Some(data))
            .map_err(|e| match e {
                ProcessorError::DataLoss(m) => ferry_runtime::Refused::invalid_argument(m).into(),
                other => other,
            })
    }
}
