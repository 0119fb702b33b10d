//! Agent enrollment: what an agent must show to register for a VM.
//!
//! Holding a VM's agent certificate (or agent token) says "I am an agent of
//! VM A" but not "I may take VM A's replication over": a registration fences
//! the running agent. So where callers are checked, RegisterAgent also needs
//! one of:
//! - the credential of the VM's current registration: the same agent
//!   restarting (it keeps its credential; only the epoch rises);
//! - a one-time enrollment token an operator issued for the VM
//!   (`ferry agent enroll VM`, or the one `ferry enable` prints): a new
//!   credential is issued and the old one retired.
//!
//! A token reads `fye1.<64 hex digits>`; registry keeps per VM (`enroll/<vm>`)
//! its SHA-256 and expiry, removes it when used, and a new token replaces an
//! unused earlier one.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::RegistryError;
use crate::model::AgentRecord;
use crate::tokens::constant_time_eq;

/// The format version every enrollment token starts with.
pub const ENROLLMENT_PREFIX: &str = "fye1";
/// How long a token is valid unless the request says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest lifetime a token may have.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const SECRET_BYTES: usize = 32;

/// What registry keeps of a VM's outstanding enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    pub vm_name: String,
    pub token_sha256: String,
    pub expires_at: SystemTime,
}

/// A fresh token for `vm` valid for `ttl` from `now`, and the record to keep.
pub fn issue(
    vm: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<(String, EnrollmentRecord), RegistryError> {
    if ttl > MAX_TTL {
        return Err(RegistryError::invalid(format!(
            "an enrollment token may be valid for at most 7 days ({} s); {} s asked",
            MAX_TTL.as_secs(),
            ttl.as_secs()
        )));
    }
    let ttl = if ttl.is_zero() { DEFAULT_TTL } else { ttl };
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret).map_err(|e| {
        RegistryError::Internal(format!("no randomness for an enrollment token: {e}"))
    })?;
    let token = format!("{ENROLLMENT_PREFIX}.{}", hex::encode(secret));
    let record = EnrollmentRecord {
        vm_name: vm.to_string(),
        token_sha256: sha256(&token),
        expires_at: now + ttl,
    };
    Ok((token, record))
}

/// What an agent showed to register.
#[derive(Default)]
pub struct Proof {
    /// The credential of its previous registration, if any.
    pub credential: Option<String>,
    /// A one-time enrollment token, if any.
    pub enrollment_token: Option<String>,
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proof")
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "enrollment_token",
                &self.enrollment_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How a registration is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The current registration's own agent: it keeps its credential.
    Renewed,
    /// A valid enrollment token, used up now: a new credential.
    Enrolled,
    /// Nothing is checked (an in-process registry): a new credential.
    Unchecked,
}

/// Decides whether `proof` admits a registration for `vm` at `now`, given
/// the VM's current registration and outstanding enrollment token. The
/// stored credential is tried first, so that an agent restarted with the
/// token it enrolled with (already used) still gets in on its credential.
pub fn admit(
    vm: &str,
    proof: &Proof,
    current: Option<&AgentRecord>,
    outstanding: Option<&EnrollmentRecord>,
    required: bool,
    now: SystemTime,
) -> Result<Admission, RegistryError> {
    if let (Some(credential), Some(record)) = (&proof.credential, current) {
        if constant_time_eq(
            sha256(credential).as_bytes(),
            record.credential_sha256.as_bytes(),
        ) {
            return Ok(Admission::Renewed);
        }
    }
    if let Some(token) = &proof.enrollment_token {
        match outstanding {
            Some(record)
                if constant_time_eq(sha256(token).as_bytes(), record.token_sha256.as_bytes()) =>
            {
                if now >= record.expires_at {
                    return Err(RegistryError::PermissionDenied(format!(
                        "the enrollment token for VM {vm:?} has expired; issue a new one with \
                         `ferry agent enroll {vm}`"
                    )));
                }
                return Ok(Admission::Enrolled);
            }
            _ if required => {
                return Err(RegistryError::PermissionDenied(format!(
                    "the enrollment token presented for VM {vm:?} is not valid: it was used \
                     already, replaced by a newer one, or made for another VM; issue a new one \
                     with `ferry agent enroll {vm}`"
                )))
            }
            _ => {}
        }
    }
    if !required {
        return Ok(Admission::Unchecked);
    }
    Err(RegistryError::PermissionDenied(
        if proof.credential.is_some() {
            format!(
                "the credential presented for VM {vm:?} is no longer its registration's: \
                 another agent enrolled for the VM since. Enroll this agent again with a \
                 one-time token from `ferry agent enroll {vm}`"
            )
        } else {
            format!(
                "an agent registers for VM {vm:?} with a one-time enrollment token (from \
                 `ferry agent enroll {vm}`, or the one `ferry enable` printed) or with the \
                 credential of the VM's current registration; it showed neither"
            )
        },
    ))
}

fn sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(credential: &str) -> AgentRecord {
        AgentRecord {
            vm_name: "vm1".into(),
            hostname: String::new(),
            group_address: String::new(),
            epoch: 1,
            credential_sha256: sha256(credential),
            registered_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn proof(credential: Option<&str>, token: Option<&str>) -> Proof {
        Proof {
            credential: credential.map(str::to_string),
            enrollment_token: token.map(str::to_string),
        }
    }

    #[test]
    fn a_registration_needs_the_current_credential_or_a_live_token() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (token, record) = issue("vm1", Duration::ZERO, now).unwrap();
        assert!(token.starts_with("fye1."));
        assert_eq!(record.expires_at, now + DEFAULT_TTL);
        let current = agent("cred");
        let admit =
            |p: &Proof, outstanding, at| admit("vm1", p, Some(&current), outstanding, true, at);

        assert_eq!(
            admit(&proof(Some("cred"), None), None, now).unwrap(),
            Admission::Renewed
        );
        // A used token beside a good credential: the credential wins.
        assert_eq!(
            admit(&proof(Some("cred"), Some(&token)), None, now).unwrap(),
            Admission::Renewed
        );
        assert_eq!(
            admit(&proof(None, Some(&token)), Some(&record), now).unwrap(),
            Admission::Enrolled
        );
        assert_eq!(
            admit(&proof(Some("old"), Some(&token)), Some(&record), now).unwrap(),
            Admission::Enrolled
        );
        for (p, outstanding, at, says) in [
            (proof(None, None), Some(&record), now, "showed neither"),
            (
                proof(Some("old"), None),
                Some(&record),
                now,
                "another agent enrolled",
            ),
            (proof(None, Some(&token)), None, now, "not valid"),
            (
                proof(None, Some("fye1.00")),
                Some(&record),
                now,
                "not valid",
            ),
            (
                proof(None, Some(&token)),
                Some(&record),
                now + DEFAULT_TTL,
                "expired",
            ),
        ] {
            let err = admit(&p, outstanding, at).unwrap_err();
            assert!(
                matches!(&err, RegistryError::PermissionDenied(m) if m.contains(says)),
                "{p:?}: {err}"
            );
        }
    }

    #[test]
    fn an_unchecked_registry_admits_any_registration() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            admit("vm1", &proof(None, None), None, None, false, now).unwrap(),
            Admission::Unchecked
        );
        assert_eq!(
            admit("vm1", &proof(None, Some("junk")), None, None, false, now).unwrap(),
            Admission::Unchecked
        );
    }

    #[test]
    fn lifetimes_are_bounded() {
        let now = SystemTime::UNIX_EPOCH;
        assert!(issue("vm1", MAX_TTL, now).is_ok());
        let err = issue("vm1", MAX_TTL + Duration::from_secs(1), now).unwrap_err();
        assert!(matches!(err, RegistryError::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn proofs_do_not_print_their_secrets() {
        let shown = format!("{:?}", proof(Some("sekrit"), Some("fye1.sekrit")));
        assert!(!shown.contains("sekrit"), "{shown}");
    }
}
