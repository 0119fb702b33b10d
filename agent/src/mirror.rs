//! Capture by active mirror: a VM that runs already, on its own disks,
//! is protected without a restart. Through QEMU's monitor (QMP) the agent
//! mirrors each protected drive into its own NBD export
//! (`blockdev-mirror`, `copy-mode=write-blocking`): QEMU writes the
//! guest's own disk first, then the same bytes to the agent, and completes
//! the guest's write only then, so every write reaches the agent in order.
//! The agent keeps what arrives in its own copy of the disk (the disk's
//! registered source path: a sparse image it owns) and streams it as
//! always.
//!
//! The mirror's full sync is the initial replication: the agent starts
//! with its sync gate closed, so its initial replication (or crash
//! resync) round stays open, and no point is cut of a partial copy, until
//! QEMU says every job is ready. An agent that comes back (after a crash,
//! on the same copy) does the same again: the writes of the new full sync
//! that change nothing in its copy are dropped
//! (`Capture::skip_unchanged`), so only what the guest wrote while the
//! agent was away crosses to the cache.
//!
//! If the agent goes away, QEMU's write to it fails, the job ends and the
//! guest runs on its own disk: a mirror never holds the guest's writes on
//! a dead agent (`on-target-error=report`, no reconnect delay).
//! `ferry-agent detach` ends the jobs cleanly.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

use crate::capture::Capture;
use crate::qmp::{is_not_found, Monitor, QmpError, Session};

/// How often a job's progress is looked at.
const POLL: Duration = Duration::from_millis(200);

/// One protected drive: QEMU's block node and the disk id it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    pub node: String,
    pub disk: String,
}

impl std::str::FromStr for Drive {
    type Err = String;
    /// `NODE=DISK`.
    fn from_str(s: &str) -> Result<Drive, String> {
        let (node, disk) = s
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| format!("{s:?}: give NODE=DISK (QEMU's node name, the disk id)"))?;
        Ok(Drive {
            node: node.to_string(),
            disk: disk.to_string(),
        })
    }
}

/// Why attaching or detaching failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the mirror of drive {node} ended before it was ready: {why}")]
    Ended { node: String, why: String },
    #[error("disk {0} is not one of the VM's disks")]
    UnknownDisk(String),
    #[error("QEMU has no block node, drive or device {0:?}: give a node name (query-named-block-nodes) or a device id or alias (libvirt's virtio-disk0)")]
    UnknownDrive(String),
}

/// The node and job the agent names for a disk: `ferry-<disk>` when that
/// is a valid QEMU node name (a letter first, at most 31 characters of
/// letters, digits, '-', '.', '_'), else `ferry-` and a hash of the id.
pub fn node_name(disk: &str) -> String {
    let plain = format!("ferry-{disk}");
    if plain.len() <= 31
        && plain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return plain;
    }
    let digest = sha2::Sha256::digest(disk.as_bytes());
    format!("ferry-{}", hex::encode(&digest[..8]))
}

/// Mirrors each drive into the agent's export on `socket` and waits until
/// every mirror is ready. A job or node left by an earlier agent is ended
/// first.
pub async fn attach(
    capture: &Capture,
    monitor: &Monitor,
    drives: &[Drive],
    target: &NbdTarget,
) -> Result<(), MirrorError> {
    let mut qmp = monitor.connect().await?;
    for d in drives {
        capture
            .disk(&d.disk)
            .map_err(|_| MirrorError::UnknownDisk(d.disk.clone()))?;
    }
    capture.skip_unchanged(true);
    for d in drives {
        let name = node_name(&d.disk);
        end_job(&mut qmp, &name).await?;
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "nbd",
                "node-name": name,
                "server": target.server(),
                "export": d.disk,
            }),
        )
        .await?;
        let node = resolve(&mut qmp, &d.node).await?;
        qmp.execute(
            "blockdev-mirror",
            json!({
                "job-id": name,
                "device": node,
                "target": name,
                "sync": "full",
                "copy-mode": "write-blocking",
                "on-source-error": "report",
                "on-target-error": "report",
            }),
        )
        .await?;
        tracing::info!(node = %d.node, disk = %d.disk, job = %name, "mirroring the drive into the agent's export");
    }
    for d in drives {
        let name = node_name(&d.disk);
        wait_ready(&mut qmp, &name, &d.node).await?;
        tracing::info!(node = %d.node, disk = %d.disk, "mirror ready: every guest write reaches the agent");
    }
    Ok(())
}

/// Where QEMU reaches the agent's export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    /// Its Unix socket (`--nbd-socket`).
    Unix(std::path::PathBuf),
    /// Its TCP address (`--nbd-listen`, plaintext on loopback): for a QEMU
    /// that runs as another user (libvirt's), which cannot open the
    /// agent's socket (mode 0600).
    Tcp(std::net::SocketAddr),
}

impl NbdTarget {
    fn server(&self) -> Value {
        match self {
            NbdTarget::Unix(path) => json!({ "type": "unix", "path": path.to_string_lossy() }),
            NbdTarget::Tcp(addr) => json!({
                "type": "inet",
                "host": addr.ip().to_string(),
                "port": addr.port().to_string(),
            }),
        }
    }
}

/// QEMU's node for a drive named by the user: a node name as it is, else
/// the device (a `-drive` id, or a device alias such as libvirt's
/// `virtio-disk0`) whose inserted medium's node it is.
async fn resolve(qmp: &mut Session, name: &str) -> Result<String, MirrorError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({})).await?;
    if nodes
        .as_array()
        .is_some_and(|n| n.iter().any(|n| n["node-name"] == name))
    {
        return Ok(name.to_string());
    }
    let blocks = qmp.execute("query-block", json!({})).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b["device"] == name
                || b["qdev"]
                    .as_str()
                    .is_some_and(|q| q == name || q.contains(&format!("/{name}/")))
        })
        .and_then(|b| b["inserted"]["node-name"].as_str().map(str::to_string))
        .ok_or_else(|| MirrorError::UnknownDrive(name.to_string()))
}

/// Waits until the job is ready; an error if it ends first.
async fn wait_ready(qmp: &mut Session, job: &str, node: &str) -> Result<(), MirrorError> {
    loop {
        let jobs = qmp.execute("query-block-jobs", json!({})).await?;
        let Some(j) = find_job(&jobs, job) else {
            let why = qmp
                .take_events()
                .into_iter()
                .filter(|e| e["data"]["device"] == job || e["data"]["id"] == job)
                .filter_map(|e| e["data"]["error"].as_str().map(str::to_string))
                .next_back()
                .unwrap_or_else(|| "the job is gone".into());
            return Err(MirrorError::Ended {
                node: node.to_string(),
                why,
            });
        };
        if j["ready"] == true {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

fn find_job<'a>(jobs: &'a Value, job: &str) -> Option<&'a Value> {
    jobs.as_array()?
        .iter()
        .find(|j| j["device"] == job || j["id"] == job)
}

/// Cancels the agent's job for a node (if any) and deletes its target
/// node (if any): a ready mirror cancelled leaves the guest on its own
/// disk, as it always was.
async fn end_job(qmp: &mut Session, name: &str) -> Result<(), MirrorError> {
    let jobs = qmp.execute("query-block-jobs", json!({})).await?;
    if find_job(&jobs, name).is_some() {
        match qmp
            .execute("block-job-cancel", json!({ "device": name, "force": true }))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        for _ in 0..300 {
            let jobs = qmp.execute("query-block-jobs", json!({})).await?;
            if find_job(&jobs, name).is_none() {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    match qmp
        .execute("blockdev-del", json!({ "node-name": name }))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A mirror that ran this long before it ended starts again at once.
const STEADY: Duration = Duration::from_secs(60);

/// Keeps the drives mirrored into the agent's export while the agent
/// runs. The agent starts with its sync gate closed (`attached`): its
/// initial replication or crash resync, the sync round that brackets the
/// mirror's copy, completes only once every mirror is ready and the gate
/// opens. When a job ends (QEMU restarted it, a target error) the gate
/// closes, a resync round of the drives' disks is asked for (their writes
/// meanwhile reached only the guest's images), and the mirror starts
/// again. A failure is logged and retried with backoff; the guest never
/// waits on it.
pub async fn supervise(
    capture: std::sync::Arc<Capture>,
    vm: String,
    monitor: Monitor,
    drives: Vec<Drive>,
    target: NbdTarget,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    let disks: Vec<String> = drives.iter().map(|d| d.disk.clone()).collect();
    let mut first = true;
    loop {
        if !first {
            capture.set_sync_gate(false);
            capture
                .stream()
                .request_resync(&disks, &[], "the active mirror ended; it starts again")
                .await;
        }
        first = false;
        let attempt = async {
            attach(&capture, &monitor, &drives, &target)
                .await
                .map_err(|e| e.to_string())?;
            capture.set_sync_gate(true);
            let mirrored = tokio::time::Instant::now();
            // Watched until a job ends, a connection per look: QEMU serves
            // one QMP client per socket at a time, and others (a person,
            // `ferry-agent detach`) may need it.
            loop {
                tokio::time::sleep(POLL * 10).await;
                let mut qmp = monitor.connect().await.map_err(|e| e.to_string())?;
                let jobs = qmp
                    .execute("query-block-jobs", json!({}))
                    .await
                    .map_err(|e| e.to_string())?;
                drop(qmp);
                if let Some(gone) = drives
                    .iter()
                    .find(|d| find_job(&jobs, &node_name(&d.disk)).is_none())
                {
                    // A mirror that ran a while ended by chance (QEMU
                    // restarted it); one that keeps ending soon (a hung disk
                    // under the export, each stall closing its connection)
                    // is tried ever less often, so the guest's writes wait
                    // on it ever more rarely.
                    if mirrored.elapsed() >= STEADY {
                        backoff = Duration::from_secs(1);
                    }
                    return Err::<(), String>(format!("the mirror of drive {} ended", gone.node));
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            ended = attempt => {
                if let Err(why) = ended {
                    tracing::warn!(vm = %vm, monitor = %monitor, error = %why, retry_in = ?backoff,
                        "the active mirror is not running; the guest runs on its own disks, attaching again");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Ends the agent's mirrors of `disks` (`ferry-agent detach`): the guest
/// goes on on its own disks, unaware.
pub async fn detach(monitor: &Monitor, disks: &[String]) -> Result<Vec<String>, MirrorError> {
    let mut qmp = monitor.connect().await?;
    let mut ended = Vec::new();
    for disk in disks {
        let name = node_name(disk);
        end_job(&mut qmp, &name).await?;
        ended.push(name);
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_valid_and_never_alias() {
        assert_eq!(node_name("os"), "ferry-os");
        let long = node_name("a-very-long-disk-identifier-beyond-31");
        assert!(long.len() <= 31 && long.starts_with("ferry-"), "{long}");
        assert_ne!(long, node_name("a-very-long-disk-identifier-beyond-32"));
        // A character QEMU refuses goes by hash too.
        assert!(!node_name("d:1").contains(':'));
        assert!("vda=os".parse::<Drive>().is_ok());
        assert!("vda".parse::<Drive>().is_err());
        assert!("=os".parse::<Drive>().is_err());
    }
}
