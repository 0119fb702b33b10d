//! Disk roots: the directories under which the agent opens source images.
//!
//! Registry hands the agent each disk's `source_path`; whoever can register
//! a VM could otherwise make the agent open (create, size, export, copy to
//! the cache) any file the agent can reach. The agent opens an image only
//! when its real path (symlinks and `..` resolved) lies inside one of its
//! roots, and checks again what it actually opened.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::capture::{CaptureError, SourceDisk};

/// Why the disk roots themselves are unusable.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("no disk root: the agent opens source images only under --disk-root DIR (give at least one)")]
    None,
    #[error("disk root {path}: {source} (--disk-root must name an existing directory)")]
    Unusable {
        path: String,
        source: std::io::Error,
    },
    #[error("disk root {path} is not a directory")]
    NotADirectory { path: String },
}

/// Why one disk's image was not opened.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The image's real path is outside every root.
    #[error("disk {disk}: source_path {path} is outside the agent's disk roots ({roots}); start the agent with --disk-root covering it")]
    Outside {
        disk: String,
        path: String,
        roots: String,
    },
    /// The path cannot be resolved (a parent missing, a loop, not absolute).
    #[error("disk {disk}: source_path {path} cannot be resolved: {why}")]
    Unresolvable {
        disk: String,
        path: String,
        why: String,
    },
    /// The image could not be opened.
    #[error("disk {disk}: {source}")]
    Open { disk: String, source: CaptureError },
    /// A writer holds the image to itself (a failback into the original
    /// disks): serving it now would show the VM a disk being rewritten.
    #[error("disk {disk}: {path} is being written by a failback into the original disks; it is not served: start the agent again once that failover has ended")]
    InUse { disk: String, path: String },
}

/// The agent's disk roots, resolved.
#[derive(Debug, Clone)]
pub struct DiskRoots {
    roots: Vec<PathBuf>,
}

impl DiskRoots {
    /// Resolves `dirs` (each must be an existing directory). An empty list
    /// is refused: an agent with no root could open nothing.
    pub fn new(dirs: &[PathBuf]) -> Result<DiskRoots, RootsError> {
        if dirs.is_empty() {
            return Err(RootsError::None);
        }
        let mut roots = Vec::new();
        for dir in dirs {
            let path = dir.display().to_string();
            let real = dir.canonicalize().map_err(|source| RootsError::Unusable {
                path: path.clone(),
                source,
            })?;
            if !real.is_dir() {
                return Err(RootsError::NotADirectory { path });
            }
            roots.push(real);
        }
        Ok(DiskRoots { roots })
    }

    /// The roots, resolved.
    pub fn paths(&self) -> &[PathBuf] {
        &self.roots
    }

    fn covers(&self, real: &Path) -> bool {
        self.roots.iter().any(|r| real.starts_with(r))
    }

    fn listed(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The real path of `path` if it lies inside a root. A missing image
    /// (the agent creates it) resolves through its parent directory.
    pub fn resolve(&self, disk: &str, path: &Path) -> Result<PathBuf, Refused> {
        let unresolvable = |why: String| Refused::Unresolvable {
            disk: disk.to_string(),
            path: path.display().to_string(),
            why,
        };
        if !path.is_absolute() {
            return Err(unresolvable("not an absolute path".into()));
        }
        let real = match path.canonicalize() {
            Ok(real) => real,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(path).is_ok() =>
            {
                return Err(unresolvable(
                    "a symlink to a file that does not exist".into(),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Missing: its parent must resolve; the name itself must be
                // a plain name (not `..`), and is opened without following
                // a symlink (a dangling one is refused at the open).
                let (Some(parent), Some(Component::Normal(name))) =
                    (path.parent(), path.components().next_back())
                else {
                    return Err(unresolvable("no file name".into()));
                };
                parent
                    .canonicalize()
                    .map_err(|e| unresolvable(format!("its directory: {e}")))?
                    .join(name)
            }
            Err(e) => return Err(unresolvable(e.to_string())),
        };
        if !self.covers(&real) {
            return Err(Refused::Outside {
                disk: disk.to_string(),
                path: path.display().to_string(),
                roots: self.listed(),
            });
        }
        Ok(real)
    }

    /// Opens disk `disk`'s image at `path` (creating and sizing it if
    /// missing) if it lies inside a root. The real path is opened without
    /// following a symlink in its last component, and what was opened is
    /// checked again (/proc/self/fd), so a path swapped after the check
    /// cannot lead outside.
    pub fn open(&self, disk: &str, path: &Path, size: u64) -> Result<SourceDisk, Refused> {
        let real = self.resolve(disk, path)?;
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&real)
            .map_err(|source| match source.raw_os_error() {
                // A symlink put where the checked path was: not followed.
                Some(libc::ELOOP) => Refused::Outside {
                    disk: disk.to_string(),
                    path: path.display().to_string(),
                    roots: self.listed(),
                },
                _ => Refused::Open {
                    disk: disk.to_string(),
                    source: CaptureError::Io {
                        path: real.display().to_string(),
                        source,
                    },
                },
            })?;
        if let Some(actual) = opened_path(&opened) {
            if !self.covers(&actual) {
                return Err(Refused::Outside {
                    disk: disk.to_string(),
                    path: path.display().to_string(),
                    roots: self.listed(),
                });
            }
        }
        // Held while the agent serves it, so that a failback does not
        // write under it.
        match ferry_runtime::disk_lock::hold_served(&opened) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Refused::InUse {
                    disk: disk.to_string(),
                    path: path.display().to_string(),
                })
            }
            Err(e) => tracing::warn!(disk, path = %path.display(), error = %e,
                "the image cannot be locked (its filesystem has no OFD locks?): a failback \
                 cannot tell that this agent serves it"),
        }
        SourceDisk::from_file(disk, &real, opened, size).map_err(|source| Refused::Open {
            disk: disk.to_string(),
            source,
        })
    }
}

/// The path the kernel has for an open file, where /proc tells.
fn opened_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dot_dot_out_of_a_root_is_outside() {
        let dir = std::env::temp_dir().join(format!("ferry-roots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let roots = DiskRoots::new(std::slice::from_ref(&root)).unwrap();
        assert!(roots.resolve("d", &root.join("a.raw")).is_ok());
        let escape = root.join("..").join("b.raw");
        assert!(matches!(
            roots.resolve("d", &escape),
            Err(Refused::Outside { .. })
        ));
        assert!(matches!(
            roots.resolve("d", Path::new("rel.raw")),
            Err(Refused::Unresolvable { .. })
        ));
        assert!(matches!(DiskRoots::new(&[]), Err(RootsError::None)));
        // A dangling symlink inside the root: refused, never followed.
        let dangling = root.join("dangling.raw");
        std::os::unix::fs::symlink(dir.join("nowhere.raw"), &dangling).unwrap();
        assert!(matches!(
            roots.open("d", &dangling, 4096),
            Err(Refused::Unresolvable { .. })
        ));
        assert!(!dir.join("nowhere.raw").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
