//! Operator bearer tokens: created, listed, revoked and checked here, kept
//! in registry's sled tree (`token/<name>`), never their secret.
//!
//! A token reads `fy1.<name>.<secret>`: the format version, the token's name
//! (a registry name, which may hold '.', '_' and '-') and 64 lowercase hex
//! digits of secret (32 random bytes). The secret never holds a '.', so the
//! last '.' splits name from secret without ambiguity. Registry stores per
//! name the role, the SHA-256 of the secret and the creation time; checking
//! a token looks its name up and compares the hashes in constant time.
//!
//! The bootstrap token (`fy1.bootstrap.<secret>`, role admin) comes from a
//! file named by `bootstrap_token_file`; see [`Tokens::bootstrap`] and
//! docs/tokens.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ferry_runtime::security::OperatorRole;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tonic::Status;

use crate::error::RegistryError;
use crate::model::{check_name, BootstrapMarker, TokenRecord};
use crate::store::{Kind, Store, Writes};

/// The format version every token starts with.
pub const TOKEN_PREFIX: &str = "fy1";
/// The name of the token installed from the bootstrap file.
pub const BOOTSTRAP_NAME: &str = "bootstrap";
/// Random bytes in a secret; it is written as twice as many hex digits.
const SECRET_BYTES: usize = 32;

/// Why a token was refused or a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is malformed, unknown or revoked. The message never holds
    /// the token.
    #[error("{0}")]
    Unauthenticated(String),
    /// Registry failed (storage, randomness) or the request was bad.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<TokenError> for Status {
    fn from(err: TokenError) -> Status {
        match err {
            TokenError::Unauthenticated(message) => Status::unauthenticated(message),
            TokenError::Registry(e) => e.into(),
        }
    }
}

/// Why the bootstrap token could not be set up; registry-svc does not start.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The file could not be read or written.
    #[error("bootstrap token file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds something else than a bootstrap token.
    #[error(
        "bootstrap token file {path} does not hold a bootstrap token: expected one line \
         {TOKEN_PREFIX}.{BOOTSTRAP_NAME}.<64 lowercase hex digits>; restore it, or delete it so \
         that registry-svc writes a new one (only if no bootstrap token was installed before)"
    )]
    Malformed { path: PathBuf },
    /// Registry's storage failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// What [`Tokens::bootstrap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The file did not exist: a new token was written to it and installed.
    Generated,
    /// The file's token was installed.
    Installed,
    /// A bootstrap token was installed before and still is; nothing changed.
    Kept,
    /// A bootstrap token was installed before and has been revoked; it is
    /// not installed again.
    Revoked,
}

/// A fresh token for `name`: `fy1.<name>.<64 hex digits>`. Nothing is
/// stored; `ferry serve` uses it to make a bootstrap token to hand over.
pub fn generate_token(name: &str) -> Result<String, RegistryError> {
    check_name("token name", name)?;
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret)
        .map_err(|e| RegistryError::Internal(format!("no randomness for a token: {e}")))?;
    Ok(format!("{TOKEN_PREFIX}.{name}.{}", hex::encode(secret)))
}

/// A token's name and secret, if it is well formed.
fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?.strip_prefix('.')?;
    let (name, secret) = rest.rsplit_once('.')?;
    let secret_ok = secret.len() == 2 * SECRET_BYTES
        && secret
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !secret_ok || check_name("token name", name).is_err() {
        return None;
    }
    Some((name, secret))
}

fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equality whose time depends on the lengths only, not on where the bytes
/// differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token store. Clones share it; [`Registry::tokens`](crate::Registry::tokens)
/// hands one out.
#[derive(Clone)]
pub struct Tokens {
    store: Store,
    /// Token changes are serial (check, then write).
    write: Arc<Mutex<()>>,
}

impl Tokens {
    pub(crate) fn new(store: Store) -> Tokens {
        Tokens {
            store,
            write: Arc::new(Mutex::new(())),
        }
    }

    /// Creates a token; returns it (the only time its secret exists outside
    /// the caller) and what is kept of it. ALREADY_EXISTS if the name is taken.
    pub async fn create(
        &self,
        name: &str,
        role: OperatorRole,
    ) -> Result<(String, TokenRecord), RegistryError> {
        let token = generate_token(name)?;
        let _guard = self.write.lock().await;
        if self.get(name)?.is_some() {
            return Err(RegistryError::AlreadyExists {
                kind: "token",
                name: name.to_string(),
            });
        }
        let record = self.install(&token, role).await?;
        tracing::info!(name, %role, "operator token created");
        Ok((token, record))
    }

    /// Stores a well-formed token (the write lock held, its name free).
    async fn install(&self, token: &str, role: OperatorRole) -> Result<TokenRecord, RegistryError> {
        let (name, secret) = parse(token).ok_or_else(|| {
            RegistryError::Internal("a token registry made is malformed".to_string())
        })?;
        let record = TokenRecord {
            name: name.to_string(),
            role,
            secret_sha256: secret_sha256(secret),
            created_at: SystemTime::now(),
        };
        let mut writes = Writes::new();
        writes.put(Kind::Token, name, &record)?;
        if name == BOOTSTRAP_NAME {
            writes.put(
                Kind::Marker,
                BOOTSTRAP_NAME,
                &BootstrapMarker {
                    installed_at: record.created_at,
                },
            )?;
        }
        self.store.commit(writes).await?;
        Ok(record)
    }

    fn get(&self, name: &str) -> Result<Option<TokenRecord>, RegistryError> {
        self.store.get(Kind::Token, name)
    }

    /// Every token, by name.
    pub fn list(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        self.store.list(Kind::Token)
    }

    /// Revokes a token. NOT_FOUND if there is none of that name.
    pub async fn revoke(&self, name: &str) -> Result<(), RegistryError> {
        check_name("token name", name)?;
        let _guard = self.write.lock().await;
        if self.get(name)?.is_none() {
            return Err(RegistryError::not_found("token", name));
        }
        let mut writes = Writes::new();
        writes.remove(Kind::Token, name);
        self.store.commit(writes).await?;
        tracing::info!(name, "operator token revoked");
        Ok(())
    }

    /// Whose `token` is: its name and role. `Unauthenticated` if it is
    /// malformed, unknown or revoked, with a message that never holds it.
    pub fn authenticate(&self, token: &str) -> Result<(String, OperatorRole), TokenError> {
        let Some((name, secret)) = parse(token) else {
            return Err(TokenError::Unauthenticated(format!(
                "the bearer token is malformed: expected {TOKEN_PREFIX}.<name>.<64 hex digits>, \
                 as `ferry token create` prints it"
            )));
        };
        let presented = secret_sha256(secret);
        match self.get(name)? {
            Some(record)
                if constant_time_eq(record.secret_sha256.as_bytes(), presented.as_bytes()) =>
            {
                Ok((record.name, record.role))
            }
            _ => Err(TokenError::Unauthenticated(format!(
                "the bearer token named {name:?} is unknown, revoked or wrong; ask an admin for \
                 a new one (`ferry token create`)"
            ))),
        }
    }

    /// Sets up the bootstrap admin token from `path`, once:
    ///
    /// - if a token named "bootstrap" was ever installed (by this or by
    ///   `ferry token create`), nothing is installed: a revoked bootstrap
    ///   token stays revoked (with a warning);
    /// - else, if the file exists, its token is installed (it must read
    ///   `fy1.bootstrap.<secret>`);
    /// - else a new token is written to it (mode 0600, fsynced) and
    ///   installed.
    ///
    /// The file's path is logged, never the token.
    pub async fn bootstrap(&self, path: &Path) -> Result<Bootstrap, BootstrapError> {
        let io = |source| BootstrapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let _guard = self.write.lock().await;
        let file_token = match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim().to_string();
                match parse(&token) {
                    Some((BOOTSTRAP_NAME, _)) => Some(token),
                    _ => {
                        return Err(BootstrapError::Malformed {
                            path: path.to_path_buf(),
                        })
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let file = path.display().to_string();
        if self
            .store
            .get::<BootstrapMarker>(Kind::Marker, BOOTSTRAP_NAME)?
            .is_some()
        {
            return Ok(match self.get(BOOTSTRAP_NAME)? {
                Some(record) => {
                    let differs =
                        file_token
                            .as_deref()
                            .and_then(parse)
                            .is_some_and(|(_, secret)| {
                                !constant_time_eq(
                                    record.secret_sha256.as_bytes(),
                                    secret_sha256(secret).as_bytes(),
                                )
                            });
                    if differs {
                        tracing::warn!(
                            file,
                            "the bootstrap token file holds another token than the one installed; the \
                             file is ignored, and the installed bootstrap token stays valid until \
                             `ferry token revoke bootstrap`"
                        );
                    }
                    Bootstrap::Kept
                }
                None => {
                    tracing::warn!(
                        file,
                        "the bootstrap token was revoked; it is not installed again (remove \
                         bootstrap_token_file from the configuration, or delete the file)"
                    );
                    Bootstrap::Revoked
                }
            });
        }
        let outcome = match file_token {
            Some(token) => {
                warn_if_readable(path);
                self.install(&token, OperatorRole::Admin).await?;
                tracing::info!(file, "bootstrap admin token installed from its file");
                Bootstrap::Installed
            }
            None => {
                let token = generate_token(BOOTSTRAP_NAME)?;
                // The file first: a crash before the install leaves a file
                // the next start installs, never an installed token nobody has.
                write_secret_file(path, &token).map_err(io)?;
                self.install(&token, OperatorRole::Admin).await?;
                tracing::info!(
                    file,
                    "bootstrap admin token generated, written to its file (mode 0600) and installed"
                );
                Bootstrap::Generated
            }
        };
        Ok(outcome)
    }
}

/// Warns when others than the owner may read the token file.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:o}"),
                "the bootstrap token file is readable by others than its owner; chmod 600 it"
            );
        }
    }
}

/// Writes `token` to `path` as one line, mode 0600: to a temporary file in
/// the same directory, fsynced, renamed into place, the directory fsynced.
fn write_secret_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ferry_runtime::durable::create_dir_all(&dir)?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    ferry_runtime::durable::sync_dir(&dir)
}

/// Registry checks operator tokens against its own store, in-process.
impl ferry_runtime::security::TokenVerifier for Tokens {
    fn verify(
        &self,
        token: String,
    ) -> ferry_runtime::security::layer::BoxFuture<Result<ferry_runtime::security::Principal, Status>>
    {
        let answer = self
            .authenticate(&token)
            .map(|(name, role)| ferry_runtime::security::Principal::Operator { name, role })
            .map_err(Status::from);
        Box::pin(std::future::ready(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_unambiguously() {
        let t = generate_token("ops.team_1-a").unwrap();
        let (name, secret) = parse(&t).unwrap();
        assert_eq!(name, "ops.team_1-a");
        assert_eq!(secret.len(), 64);
        assert_ne!(generate_token("a").unwrap(), generate_token("a").unwrap());
        let hex64 = "0".repeat(64);
        for bad in [
            String::new(),
            format!("fy1.a.{}", "0".repeat(63)),
            format!("fy1.a.{}", "A".repeat(64)),
            format!("fy2.a.{hex64}"),
            format!("fy1..{hex64}"),
            format!("fy1.-a.{hex64}"),
            format!("fy1.{hex64}"),
            format!("fy1a.{hex64}"),
            format!("fy1.a b.{hex64}"),
        ] {
            assert!(parse(&bad).is_none(), "{bad}");
        }
        assert!(generate_token("a b").is_err());
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
