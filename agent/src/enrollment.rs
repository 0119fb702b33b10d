//! What the agent shows registry to register for its VM (see registry-svc's
//! `enrollment` module): the credential of its own previous registration,
//! kept in the state directory across restarts, or the one-time enrollment
//! token an operator gave it (`ferry agent enroll VM`).
//!
//! The credential file `<vm>.credential` (mode 0600) holds the secret on one
//! line. It is written to a temporary file, fsynced, renamed and the
//! directory fsynced, so a crash leaves the old credential or the new one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the credential file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error(
    "agent credential file {path}: {source} (--state-dir must be a directory the agent can write)"
)]
pub struct CredentialFileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// One VM's stored registration credential.
#[derive(Debug, Clone)]
pub struct CredentialFile {
    path: PathBuf,
}

impl CredentialFile {
    /// The credential file of `vm` under `dir` (created if missing), once
    /// a file can be created there: an enrollment token is good for one
    /// registration, so the agent must know it can keep the credential it
    /// gets for it before it presents the token.
    pub fn open(dir: &Path, vm: &str) -> Result<CredentialFile, CredentialFileError> {
        fs::create_dir_all(dir).map_err(|source| CredentialFileError {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = ferry_runtime::path_name(vm);
        let file = CredentialFile {
            path: dir.join(format!("{name}.credential")),
        };
        let probe = file.tmp_path();
        let _ = fs::remove_file(&probe);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|source| CredentialFileError {
                path: probe.clone(),
                source,
            })?;
        Ok(file)
    }

    fn tmp_path(&self) -> PathBuf {
        self.path.with_extension("credential.tmp")
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored credential, or None if there is none.
    pub fn load(&self) -> Result<Option<String>, CredentialFileError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => {
                let credential = text.trim();
                Ok((!credential.is_empty()).then(|| credential.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(self.error(source)),
        }
    }

    /// Keeps `credential` (replacing the one before).
    pub fn save(&self, credential: &str) -> Result<(), CredentialFileError> {
        let tmp = self.tmp_path();
        let write = || -> std::io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(credential.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|source| self.error(source))
    }

    fn error(&self, source: std::io::Error) -> CredentialFileError {
        CredentialFileError {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_credential_survives_a_reopen_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = CredentialFile::open(dir.path(), "vm-1").unwrap();
        assert_eq!(file.load().unwrap(), None);
        file.save("first").unwrap();
        file.save("second").unwrap();
        let again = CredentialFile::open(dir.path(), "vm-1").unwrap();
        assert_eq!(again.load().unwrap().as_deref(), Some("second"));
        let mode = fs::metadata(again.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another VM's credential is another file.
        let other = CredentialFile::open(dir.path(), "vm.1").unwrap();
        assert_eq!(other.load().unwrap(), None);
    }

    #[test]
    fn a_directory_nothing_can_be_created_in_is_refused_at_open() {
        // Not even root creates files in /proc/self (tests may run as root,
        // whom a read-only mode would not stop).
        let err = CredentialFile::open(Path::new("/proc/self"), "vm-1").unwrap_err();
        assert_eq!(err.path, Path::new("/proc/self/vm-1.credential.tmp"));
    }
}
