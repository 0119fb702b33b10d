//! qcow2 overlays for instant failover, through qemu-img: made on a
//! point's NBD export (the VM writes into the overlay, reads what it does
//! not hold from the point), asked whether they still have that backing,
//! and flattened offline when the VM is not running to pull them live.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_runtime::Refused;

use crate::error::FailoverError;

type Result<T> = std::result::Result<T, FailoverError>;

/// qemu-img, by program path.
#[derive(Debug, Clone)]
pub struct QemuImg {
    program: PathBuf,
}

impl QemuImg {
    pub fn new(program: PathBuf) -> QemuImg {
        QemuImg { program }
    }

    fn run(&self, what: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|e| {
                Refused::failed_precondition(format!(
                    "cannot run {} for {what}: {e} (install qemu-utils, or set \
                     [failover.libvirt] qemu_img)",
                    self.program.display()
                ))
            })?;
        if !out.status.success() {
            return Err(Refused::unavailable(format!(
                "{} ({what}) failed: {}",
                self.program.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A fresh overlay of `size` bytes at `path` on the raw image at
    /// `backing` (an NBD URL), replacing what was there. The backing is not
    /// opened (`-u`): its size is the point's, given.
    pub fn create(&self, path: &Path, size: u64, backing: &str) -> Result<()> {
        if let Some(dir) = path.parent() {
            ferry_runtime::durable::create_dir_all(dir).map_err(|e| FailoverError::io(dir, e))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FailoverError::io(path, e)),
        }
        let size = size.to_string();
        self.run(
            "an overlay",
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-u".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "raw".as_ref(),
                "-b".as_ref(),
                backing.as_ref(),
                path.as_os_str(),
                size.as_ref(),
            ],
        )?;
        if let Some(dir) = path.parent() {
            ferry_runtime::durable::sync_dir(dir).map_err(|e| FailoverError::io(dir, e))?;
        }
        Ok(())
    }

    /// The overlay's backing file as its header names it; None once it has
    /// none (hydrated). Read with `-U`: the running VM holds the image.
    pub fn backing(&self, path: &Path) -> Result<Option<String>> {
        let info = self.run(
            "an overlay's backing",
            &[
                "info".as_ref(),
                "-U".as_ref(),
                "--output=json".as_ref(),
                path.as_os_str(),
            ],
        )?;
        let info: serde_json::Value = serde_json::from_str(&info).map_err(|e| {
            FailoverError::Corrupt(format!("qemu-img info of {}: {e}", path.display()))
        })?;
        Ok(info
            .get("backing-filename")
            .and_then(|b| b.as_str())
            .map(str::to_string))
    }

    /// Copies what the overlay does not hold from its backing into it and
    /// drops the backing (`rebase -b ""`), for a VM that is not running.
    pub fn flatten(&self, path: &Path) -> Result<()> {
        self.run(
            "hydrating an overlay offline",
            &[
                "rebase".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-b".as_ref(),
                "".as_ref(),
                path.as_os_str(),
            ],
        )
        .map(|_| ())
    }
}
