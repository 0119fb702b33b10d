//! libvirt's own client, `virsh`, run once per call against one host's
//! connection URI. Decision (docs/libvirt.md): Ferry drives libvirt
//! through virsh rather than linking libvirt's C library: no C library to
//! build against on machines that never use libvirt, no LGPL code linked
//! into failover-svc, and every call is one a person can replay by hand.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::LibvirtError;

/// Runs virsh.
#[derive(Debug, Clone)]
pub struct Virsh {
    program: PathBuf,
    timeout: Duration,
}

impl Virsh {
    pub fn new(program: PathBuf, timeout: Duration) -> Virsh {
        Virsh { program, timeout }
    }

    /// `virsh -c uri args...`; its standard output, or why it failed (its
    /// standard error, as virsh said it).
    pub fn run(&self, uri: &str, args: &[&str]) -> Result<String, LibvirtError> {
        let what = args.first().copied().unwrap_or_default().to_string();
        let mut child = Command::new(&self.program)
            .arg("-q")
            .arg("-c")
            .arg(uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LibvirtError::Spawn {
                program: self.program.clone(),
                source: e,
            })?;
        // Both pipes are drained on their own threads, so a chatty virsh
        // never blocks on a full pipe; the wait is bounded, so a wedged
        // libvirtd cannot hold a job forever.
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = String::new();
            let mut stderr = String::new();
            let reader = std::thread::spawn(move || {
                if let Some(e) = err.as_mut() {
                    let _ = e.read_to_string(&mut stderr);
                }
                stderr
            });
            if let Some(o) = out.as_mut() {
                let _ = o.read_to_string(&mut stdout);
            }
            let stderr = reader.join().unwrap_or_default();
            let status = child.wait();
            let _ = tx.send((status, stdout, stderr));
        });
        let (status, stdout, stderr) =
            rx.recv_timeout(self.timeout)
                .map_err(|_| LibvirtError::Timeout {
                    uri: uri.to_string(),
                    what: what.clone(),
                    after: self.timeout,
                })?;
        let status = status.map_err(|e| LibvirtError::Spawn {
            program: self.program.clone(),
            source: e,
        })?;
        if status.success() {
            Ok(stdout)
        } else {
            Err(LibvirtError::Failed {
                uri: uri.to_string(),
                what,
                message: one_line(&stderr),
            })
        }
    }
}

/// virsh's error text on one line, its "error: " prefixes dropped.
fn one_line(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| l.trim().trim_start_matches("error: ").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
