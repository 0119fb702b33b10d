//! What this `ferry` process presents to the services: a bearer token
//! and/or a client certificate, and the CA it trusts. Set once from the
//! global flags before any command runs.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use ferry_runtime::peers::Credentials;
use ferry_runtime::security::ClientTls;

use crate::args::Cli;

static CREDENTIALS: OnceLock<Credentials> = OnceLock::new();

/// Reads the credentials the flags name.
pub fn init(cli: &Cli) -> Result<()> {
    let tls = match &cli.tls_ca {
        Some(ca) => Some(
            ClientTls::load(ca, cli.tls_cert.as_deref(), cli.tls_key.as_deref())
                .context("TLS settings")?,
        ),
        None if cli.tls_cert.is_some() || cli.tls_key.is_some() => {
            anyhow::bail!(
                "--tls-cert/--tls-key need --tls-ca, the CA that signed the services' certificates"
            )
        }
        None => None,
    };
    let credentials = Credentials {
        tls,
        bearer: cli.token.clone().filter(|t| !t.trim().is_empty()),
    };
    // Set once; a second call keeps the first.
    let _ = CREDENTIALS.set(credentials);
    Ok(())
}

/// The credentials every client of this process uses.
pub fn get() -> Credentials {
    CREDENTIALS.get().cloned().unwrap_or_default()
}
