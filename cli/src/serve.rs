//! `ferry serve`: the four services in this process, plaintext on loopback
//! with every call checked. The cluster secret and the first admin token
//! live in the data directory (mode 0600); the token is printed the first
//! time only.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use ferry_runtime::security::ClusterSecret;

use crate::args::ServeArgs;
use crate::embedded::{Embedded, Guard};

/// The cluster secret's file in the data directory.
pub const SECRET_FILE: &str = "cluster-secret";
/// The bootstrap admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Whether `host` is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a listen address beyond loopback unless asked for: the services
/// speak plaintext here.
fn check_host(host: &str, insecure: bool) -> Result<()> {
    if !is_loopback(host) && !insecure {
        bail!(
            "`ferry serve` speaks plaintext, so it listens on loopback only; {host} is not. \
             Run the service binaries with --tls-cert/--tls-key/--tls-ca to serve beyond this \
             host (docs/security.md), or add --insecure to send tokens unencrypted anyway"
        );
    }
    Ok(())
}

pub async fn run(a: ServeArgs) -> Result<()> {
    check_host(&a.listen_host, a.insecure)?;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create {}", a.data_dir.display()))?;
    let (secret, _) = ClusterSecret::load_or_create(&a.data_dir.join(SECRET_FILE))?;
    let token_file = a.data_dir.join(ADMIN_TOKEN_FILE);
    let first_start = !token_file.exists();
    let shutdown = ferry_runtime::shutdown_token();
    let services = Embedded::start(
        &a.data_dir,
        &a.listen_host,
        a.base_port,
        shutdown.clone(),
        Guard::Checked {
            secret,
            bootstrap_token_file: token_file.clone(),
        },
    )
    .await?;
    println!("Ferry is running (data in {}):", a.data_dir.display());
    for (name, url) in services.urls() {
        println!("  {name:<10} {url}");
    }
    if is_loopback(&a.listen_host) {
        println!(
            "Plaintext on loopback ({}): every call is checked, nothing is encrypted.",
            a.listen_host
        );
    } else {
        println!(
            "Plaintext beyond loopback on {}, as --insecure asks: every call is checked, \
             nothing is encrypted.",
            a.listen_host
        );
    }
    if first_start {
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("cannot read {}", token_file.display()))?;
        println!(
            "Admin token (shown this once; kept in {}, mode 0600):\n  {}",
            token_file.display(),
            token.trim()
        );
    } else {
        println!(
            "Admin token: in {} (or a token made with `ferry token create`).",
            token_file.display()
        );
    }
    println!(
        "Use it with: export FERRY_TOKEN=$(cat {})",
        token_file.display()
    );
    println!("Stop with Ctrl-C or SIGTERM.");
    shutdown.cancelled().await;
    services.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_stays_on_loopback_unless_asked() {
        for host in ["127.0.0.1", "::1", "localhost"] {
            assert!(check_host(host, false).is_ok(), "{host}");
        }
        let err = check_host("0.0.0.0", false).unwrap_err().to_string();
        assert!(
            err.contains("--insecure") && err.contains("--tls-cert"),
            "{err}"
        );
        assert!(check_host("0.0.0.0", true).is_ok());
    }
}
