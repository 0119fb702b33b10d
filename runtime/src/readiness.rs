//! Readiness of a service: its storage opened and its peers serving.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::host::HostError;
use crate::peers::{wait_serving, Credentials};

/// A peer a service needs before it can serve: its URL and gRPC service name.
#[derive(Debug, Clone)]
pub struct Peer {
    /// e.g. "registry"
    pub role: &'static str,
    /// e.g. "http://127.0.0.1:7101"
    pub url: String,
    /// e.g. "ferry.registry.v1.Registry"
    pub service: &'static str,
}

impl Peer {
    /// The peer `role` at `url`, or a configuration error naming the flag.
    pub fn required(
        role: &'static str,
        url: Option<&String>,
        service: &'static str,
    ) -> Result<Peer, HostError> {
        let url = url.ok_or_else(|| HostError::Peer {
            url: String::new(),
            message: format!("no {role} URL: give --{role} URL (or FERRY_{} / [peers] {role} in the config file)", role.to_uppercase()),
        })?;
        Ok(Peer {
            role,
            url: url.clone(),
            service,
        })
    }
}

/// Waits until every peer reports SERVING (or shutdown).
pub async fn wait_for_peers(
    peers: &[Peer],
    credentials: &Credentials,
    shutdown: &CancellationToken,
) -> Result<(), HostError> {
    for peer in peers {
        wait_serving(&peer.url, peer.service, credentials, shutdown).await?;
        tracing::info!(role = peer.role, url = %peer.url, "peer serving");
    }
    Ok(())
}

/// Creates the data directory and checks it is writable with a fsynced probe.
pub fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".ferry-write-probe");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"ok")?;
        f.sync_all()?;
    }
    std::fs::remove_file(probe)
}
