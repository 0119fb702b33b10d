//! Service tokens for deployments without TLS. Every service of a
//! deployment shares one secret (`--cluster-secret-file`); a service proves
//! who it is with `fysvc.<service>.<mac>`, and an agent (until it enrolls
//! with its own credential) with `fyagent.<vm>.<mac>`, where mac is
//! HMAC-SHA256(secret, the principal's identity URI). Any service can check
//! them without asking another. With TLS, certificates do this instead.

use std::path::Path;

use ferry_proto::ids::VmName;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::ConfigError;
use crate::security::principal::{Principal, ServiceKind};

/// The fewest secret bytes accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// The deployment's shared secret.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Equal secrets (for comparing configurations).
impl PartialEq for ClusterSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl ClusterSecret {
    /// Reads the secret file: at least [`MIN_SECRET_BYTES`] bytes once
    /// surrounding whitespace is trimmed (e.g. `head -c 32 /dev/urandom | xxd -p`).
    pub fn load(path: &Path) -> Result<ClusterSecret, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "cluster_secret_file",
            value: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(invalid(format!(
                "it holds {} bytes; a cluster secret needs at least {MIN_SECRET_BYTES}",
                trimmed.len()
            )));
        }
        Ok(ClusterSecret(trimmed.to_vec()))
    }

    /// The secret in `path`, or a new one written there (hex, mode 0600,
    /// fsynced) if the file does not exist; `true` when it was made now.
    /// Either way the secret is the file's text, as [`ClusterSecret::load`]
    /// reads it, so tokens minted from the file (and every later start)
    /// agree with this one.
    pub fn load_or_create(path: &Path) -> Result<(ClusterSecret, bool), ConfigError> {
        if path.exists() {
            return Ok((ClusterSecret::load(path)?, false));
        }
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "cluster_secret_file",
            value: path.display().to_string(),
            reason,
        };
        let random = ClusterSecret::generate()
            .map_err(|e| invalid(format!("no randomness to make one: {e}")))?;
        let secret = ClusterSecret(hex::encode(&random.0).into_bytes());
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(&secret.0)?;
            file.sync_all()
        };
        write().map_err(|e| invalid(format!("cannot write a new one: {e}")))?;
        // The secret is the file's text, as every later load (and anyone
        // minting a token from the file) reads it, not the bytes it encodes.
        Ok((ClusterSecret::load(path)?, true))
    }

    /// A fresh random secret (for `ferry serve`, which runs every service
    /// in one process).
    pub fn generate() -> Result<ClusterSecret, getrandom::Error> {
        let mut bytes = vec![0u8; MIN_SECRET_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(ClusterSecret(bytes))
    }

    fn mac(&self, principal: &Principal) -> Option<String> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).ok()?;
        mac.update(principal.uri().as_bytes());
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// The token `principal` presents; `None` for operators (their tokens
    /// come from registry).
    pub fn token_for(&self, principal: &Principal) -> Option<String> {
        let (prefix, name) = match principal {
            Principal::Service { service } => ("fysvc", service.as_str()),
            Principal::Agent { vm } => ("fyagent", vm.as_str()),
            Principal::Operator { .. } => return None,
        };
        Some(format!("{prefix}.{name}.{}", self.mac(principal)?))
    }

    /// Whether `token` looks like a service or agent token (so it is checked
    /// here and never sent to registry's operator tokens).
    pub fn is_cluster_token(token: &str) -> bool {
        token.starts_with("fysvc.") || token.starts_with("fyagent.")
    }

    /// The principal a service or agent token proves, if its mac is right.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let (head, mac) = token.rsplit_once('.')?;
        let principal = if let Some(name) = head.strip_prefix("fysvc.") {
            Principal::Service {
                service: name.parse::<ServiceKind>().ok()?,
            }
        } else if let Some(vm) = head.strip_prefix("fyagent.") {
            Principal::Agent {
                vm: VmName::parse(vm).ok()?,
            }
        } else {
            return None;
        };
        let expected = Hmac::<Sha256>::new_from_slice(&self.0).ok().map(|mut m| {
            m.update(principal.uri().as_bytes());
            m
        })?;
        let given = hex::decode(mac).ok()?;
        // Constant time: verify_slice compares without early exit.
        expected.verify_slice(&given).ok()?;
        Some(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_made_now_is_the_one_its_file_gives_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-secret");
        let (made, new) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(new);
        let (again, new) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(!new);
        let agent = Principal::Agent {
            vm: VmName::parse("web1").unwrap(),
        };
        let token = made.token_for(&agent).unwrap();
        assert_eq!(again.token_for(&agent).unwrap(), token);
        assert_eq!(again.verify(&token), Some(agent.clone()));
        assert_eq!(
            ClusterSecret::load(&path)
                .unwrap()
                .token_for(&agent)
                .unwrap(),
            token
        );
    }

    #[test]
    fn tokens_verify_only_under_their_own_secret_and_name() {
        let a = ClusterSecret::generate().unwrap();
        let b = ClusterSecret::generate().unwrap();
        let cache = Principal::Service {
            service: ServiceKind::Cache,
        };
        let agent = Principal::Agent {
            vm: VmName::parse("web.1").unwrap(),
        };
        for p in [&cache, &agent] {
            let token = a.token_for(p).unwrap();
            assert!(ClusterSecret::is_cluster_token(&token));
            assert_eq!(a.verify(&token).as_ref(), Some(p));
            assert_eq!(b.verify(&token), None, "another deployment's secret");
        }
        // The mac of one name does not prove another.
        let token = a.token_for(&cache).unwrap();
        let forged = token.replacen("fysvc.cache.", "fysvc.failover.", 1);
        assert_eq!(a.verify(&forged), None);
        assert_eq!(a.verify("fysvc.cache.zz"), None);
        assert_eq!(a.verify("fysvc.cache"), None);
    }

    #[test]
    fn a_created_secret_is_the_one_its_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let (made, new) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(new);
        assert_eq!(ClusterSecret::load(&path).unwrap(), made);
        let (again, new) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(!new);
        assert_eq!(again, made, "a later start derives the same tokens");
    }

    #[test]
    fn short_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "short\n").unwrap();
        let err = ClusterSecret::load(&path).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        std::fs::write(&path, format!("{}\n", "ab".repeat(16))).unwrap();
        assert!(ClusterSecret::load(&path).is_ok());
    }
}
