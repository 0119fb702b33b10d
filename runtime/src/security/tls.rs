//! TLS material: a certificate and key to serve and to present as a client,
//! and the CA that every peer's certificate must chain to. Read once at
//! start-up; a missing or unreadable file is a configuration error naming it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::ConfigError;

/// The three files of a TLS set-up, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA every peer's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// TLS material loaded from [`TlsFiles`].
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    identity: Identity,
    ca: Certificate,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Invalid {
        setting,
        value: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::Invalid {
            setting,
            value: path.display().to_string(),
            reason: "not a PEM file (no -----BEGIN line)".into(),
        });
    }
    Ok(bytes)
}

impl Tls {
    /// Reads the three files.
    pub fn load(files: TlsFiles) -> Result<Tls, ConfigError> {
        let cert = read_pem("tls_cert", &files.cert)?;
        let key = read_pem("tls_key", &files.key)?;
        let ca = read_pem("tls_ca", &files.ca)?;
        Ok(Tls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            files,
        })
    }

    /// The files it was read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Server side: present our certificate; verify a client certificate
    /// against the CA when one is offered. A client without one still
    /// connects (operators may use bearer tokens); the authorization layer
    /// decides what each caller may do.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(true)
    }

    /// Client side: verify the server against the CA, present our
    /// certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

/// A client's TLS: the CA to trust, and a certificate to present if it has
/// one (operators may authenticate with a token instead).
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    /// Reads the CA and, when both are given, the client certificate and key.
    pub fn load(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<ClientTls, ConfigError> {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem("tls_ca", ca)?));
        match (cert, key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_pem("tls_cert", cert)?,
                    read_pem("tls_key", key)?,
                ));
            }
            (None, None) => {}
            (Some(cert), None) | (None, Some(cert)) => {
                return Err(ConfigError::Invalid {
                    setting: "tls_cert/tls_key",
                    value: cert.display().to_string(),
                    reason: "a client certificate needs both --tls-cert and --tls-key".into(),
                })
            }
        }
        Ok(ClientTls { config })
    }

    /// The tonic configuration.
    pub fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }
}

impl From<&Tls> for ClientTls {
    fn from(tls: &Tls) -> Self {
        ClientTls {
            config: tls.client(),
        }
    }
}
