//! The agent's state file: the changed-chunk map that survives a restart.
//!
//! While the agent runs, the file says "running". At a clean stop, once no
//! write can reach the disks any more, it holds every chunk not yet durable
//! in the cache and says "clean". At the next start a clean map is resynced
//! chunk by chunk; a file that still says "running" (the agent crashed, so
//! writes it had buffered are gone), a damaged file, or none at all for a VM
//! that was already replicating means the map is lost, and every chunk of
//! every disk is sent again (full resync).
//!
//! Layout (little-endian): magic `FERRYDM3`, u32 flags (bit 0 = clean), u32
//! CRC-32C of the flags and the body, u64 body length, then the body (the
//! flags are under the checksum since one flipped bit of them would turn a
//! crashed run's file into a clean, empty map): two maps (chunks to
//! send as data, then chunks to check by checksum), each a u32 disk count
//! and per disk u16 id length, the id, u32 word count, the u64 words of its
//! bit set. Written to a temporary file, fsynced, renamed, directory fsynced.
//! A file of another layout counts as damaged (so: full checksum resync).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::stream::{Dirty, ResyncSet};

const MAGIC: &[u8; 8] = b"FERRYDM3";
const CLEAN: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("agent state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent state {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
}

/// What a previous run left.
#[derive(Debug, Clone, PartialEq)]
pub enum Saved {
    /// Stopped cleanly; these chunks were not yet durable in the cache.
    Clean(ResyncSet),
    /// Did not stop cleanly: what it had buffered is unknown.
    Unclean,
}

/// One VM's state file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file of `vm` under `dir` (created if missing).
    pub fn open(dir: &Path, vm: &str) -> Result<StateFile, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = ferry_runtime::path_name(vm);
        Ok(StateFile {
            path: dir.join(format!("{name}.state")),
        })
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the previous run left, or None if there is no file.
    pub fn load(&self) -> Result<Option<Saved>, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let damaged = |why: &str| StateError::Damaged {
            path: self.path.clone(),
            why: why.to_string(),
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(damaged("not an agent state file"));
        }
        let flags = u32_at(&bytes, 8);
        let crc = u32_at(&bytes, 12);
        let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        let body = &bytes[HEADER..];
        if body.len() as u64 != len || checksum(flags, body) != crc {
            return Err(damaged("checksum or length mismatch"));
        }
        if flags & CLEAN == 0 {
            return Ok(Some(Saved::Unclean));
        }
        let mut rest = body;
        let data = decode(&mut rest).ok_or_else(|| damaged("truncated body"))?;
        let verify = decode(&mut rest).ok_or_else(|| damaged("truncated body"))?;
        if !rest.is_empty() {
            return Err(damaged("trailing bytes"));
        }
        Ok(Some(Saved::Clean(ResyncSet {
            data,
            verify,
            close: Default::default(),
        })))
    }

    /// Marks the agent running: until [`StateFile::save_clean`], a restart
    /// finds the map lost.
    pub fn mark_running(&self) -> Result<(), StateError> {
        self.write(0, &ResyncSet::default())
    }

    /// Saves the chunks not yet durable in the cache at a clean stop.
    pub fn save_clean(&self, set: &ResyncSet) -> Result<(), StateError> {
        self.write(CLEAN, set)
    }

    fn write(&self, flags: u32, set: &ResyncSet) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut body = encode(&set.data);
        body.extend_from_slice(&encode(&set.verify));
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&checksum(flags, &body).to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let tmp = self.path.with_extension("state.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

/// The CRC-32C of the flags (LE) and the body.
fn checksum(flags: u32, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&flags.to_le_bytes()), body)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

fn encode(dirty: &Dirty) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(dirty.disks.len() as u32).to_le_bytes());
    for (id, words) in &dirty.disks {
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&(words.len() as u32).to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

fn decode(body: &mut &[u8]) -> Option<Dirty> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if body.len() < n {
            return None;
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Some(head)
    }
    let mut dirty = Dirty::default();
    let disks = u32::from_le_bytes(take(body, 4)?.try_into().ok()?);
    for _ in 0..disks {
        let id_len = u16::from_le_bytes(take(body, 2)?.try_into().ok()?);
        let id = String::from_utf8(take(body, id_len as usize)?.to_vec()).ok()?;
        let count = u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize;
        let raw = take(body, count.checked_mul(8)?)?;
        let words = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        dirty.disks.insert(id, words);
    }
    Some(dirty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_whose_names_differ_only_in_punctuation_keep_their_own_maps() {
        let dir = tempfile::tempdir().unwrap();
        let dotted = StateFile::open(dir.path(), "web.1").unwrap();
        let underscored = StateFile::open(dir.path(), "web_1").unwrap();
        assert_ne!(dotted.path(), underscored.path());
        dotted.mark_running().unwrap();
        assert_eq!(
            underscored.load().unwrap(),
            None,
            "the other VM's map is its own"
        );
    }

    #[test]
    fn a_clean_map_round_trips_and_running_means_lost() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path(), "vm/1").unwrap();
        assert_eq!(state.load().unwrap(), None);
        state.mark_running().unwrap();
        assert_eq!(state.load().unwrap(), Some(Saved::Unclean));
        let mut set = ResyncSet::default();
        set.data.mark("os", 3 << 16, 1);
        set.data.mark("data", 1 << 30, 1 << 17);
        set.verify.mark("data", 0, 1 << 20);
        state.save_clean(&set).unwrap();
        assert_eq!(state.load().unwrap(), Some(Saved::Clean(set)));
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(dir.path(), "vm").unwrap();
        let mut set = ResyncSet::default();
        set.data.mark("os", 0, 1 << 20);
        state.save_clean(&set).unwrap();
        let mut bytes = fs::read(state.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(state.path(), &bytes).unwrap();
        assert!(matches!(state.load(), Err(StateError::Damaged { .. })));
        fs::write(state.path(), b"short").unwrap();
        assert!(matches!(state.load(), Err(StateError::Damaged { .. })));
    }
}
