//! Directory entries made durable: a file or directory just created, or a
//! file renamed into place, survives a crash only once its parent directory
//! is fsynced too.

use std::path::Path;

/// Fsyncs the directory `dir` (its entries: files created, renamed, removed).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing the parent of every
/// directory it created, so that the whole path survives a crash.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn creates_every_level_once() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        super::create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        super::create_dir_all(&deep).unwrap();
    }
}
