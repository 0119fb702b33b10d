//! Signed rounds for group ports without TLS.
//!
//! Registry hands each member's agent its group's secret with every
//! GroupHeartbeat answer (and only to members' agents; it changes when a
//! member leaves). Over a plaintext group port the coordinator signs each
//! Prepare, Commit and Abort: the header [`HEADER`] carries
//! `v1.<unix nanos>.<hex HMAC-SHA256>.<coordinator VM>`, the MAC taken with
//! the group secret over the method, the request's fields, the signer and the
//! time, each length-prefixed so that no two messages read alike. A member
//! admits a call only when the MAC is right under its own copy of the secret,
//! the signer is a current member, the time is within [`MAX_AGE`] of its
//! clock, and the same signature has not been seen before (a replayed
//! Prepare would hold the member's writes again).
//!
//! Plaintext still shows the rounds to whoever watches the wire; it no
//! longer lets them start, commit or abort one.

use std::collections::VecDeque;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The metadata key of a round's signature.
pub const HEADER: &str = "x-ferry-group-signature";
/// How far a signature's time may be from the member's clock.
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// Signatures remembered against replays (a few rounds a second at most
/// can be signed within [`MAX_AGE`]).
const REMEMBERED: usize = 256;

/// What a signature covers: one request of the group protocol.
#[derive(Debug, Clone, Copy)]
pub enum Signed<'a> {
    Prepare {
        group: &'a str,
        round_id: &'a str,
        coordinator: &'a str,
        hold_nanos: u128,
    },
    Commit {
        group: &'a str,
        round_id: &'a str,
        time_unix_nanos: u64,
    },
    Abort {
        group: &'a str,
        round_id: &'a str,
    },
}

impl Signed<'_> {
    fn fields(&self) -> Vec<Vec<u8>> {
        match *self {
            Signed::Prepare {
                group,
                round_id,
                coordinator,
                hold_nanos,
            } => vec![
                b"Prepare".to_vec(),
                group.into(),
                round_id.into(),
                coordinator.into(),
                hold_nanos.to_string().into_bytes(),
            ],
            Signed::Commit {
                group,
                round_id,
                time_unix_nanos,
            } => vec![
                b"Commit".to_vec(),
                group.into(),
                round_id.into(),
                time_unix_nanos.to_string().into_bytes(),
            ],
            Signed::Abort { group, round_id } => {
                vec![b"Abort".to_vec(), group.into(), round_id.into()]
            }
        }
    }
}

/// Why a call's signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this group port has no TLS: calls must be signed with the group's secret \
         ({HEADER}); this one is not"
    )]
    Unsigned,
    #[error("the group signature is malformed")]
    Malformed,
    #[error("the group signature does not match the group's secret")]
    BadMac,
    #[error("the group signature is {0:?} away from this member's clock (at most 5 s)")]
    Stale(Duration),
    #[error("the group signature was used before (a replay)")]
    Replayed,
}

/// A group's secret as registry gave it. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupSecret(Vec<u8>);

impl std::fmt::Debug for GroupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupSecret(<redacted>)")
    }
}

impl GroupSecret {
    /// The secret in `bytes`; None if registry gave none.
    pub fn new(bytes: Vec<u8>) -> Option<GroupSecret> {
        (!bytes.is_empty()).then_some(GroupSecret(bytes))
    }

    fn mac(&self, message: &Signed<'_>, signer: &str, at_nanos: u64) -> Option<Vec<u8>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).ok()?;
        let mut fields = message.fields();
        fields.push(signer.as_bytes().to_vec());
        fields.push(at_nanos.to_string().into_bytes());
        for field in fields {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(&field);
        }
        Some(mac.finalize().into_bytes().to_vec())
    }

    /// The signature `signer` sends with `message` at `at_nanos`.
    pub fn sign(&self, message: &Signed<'_>, signer: &str, at_nanos: u64) -> Option<String> {
        let mac = self.mac(message, signer, at_nanos)?;
        Some(format!("v1.{at_nanos}.{}.{signer}", hex::encode(mac)))
    }

    /// Checks `signature` on `message` at `now_nanos`; the signer's VM.
    /// Does not check replays (see [`Replays`]) nor membership.
    pub fn verify(
        &self,
        signature: &str,
        message: &Signed<'_>,
        now_nanos: u64,
    ) -> Result<String, Refusal> {
        let mut parts = signature.splitn(4, '.');
        let (Some("v1"), Some(at), Some(mac), Some(signer)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let at: u64 = at.parse().map_err(|_| Refusal::Malformed)?;
        let presented = hex::decode(mac).map_err(|_| Refusal::Malformed)?;
        let expected = self.mac(message, signer, at).ok_or(Refusal::Malformed)?;
        let same = presented.len() == expected.len()
            && presented
                .iter()
                .zip(&expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(Refusal::BadMac);
        }
        let off = Duration::from_nanos(at.abs_diff(now_nanos));
        if off > MAX_AGE {
            return Err(Refusal::Stale(off));
        }
        Ok(signer.to_string())
    }
}

/// The signatures a member admitted recently, so that none is admitted
/// twice. Older than twice [`MAX_AGE`] they are refused as stale anyway.
#[derive(Debug, Default)]
pub struct Replays {
    seen: VecDeque<(u64, String)>,
}

impl Replays {
    /// Records `signature` made at `at_nanos`; `Replayed` if it was seen.
    pub fn admit(&mut self, signature: &str, now_nanos: u64) -> Result<(), Refusal> {
        let horizon = now_nanos.saturating_sub(2 * MAX_AGE.as_nanos() as u64);
        while self
            .seen
            .front()
            .is_some_and(|(at, _)| *at < horizon || self.seen.len() > REMEMBERED)
        {
            self.seen.pop_front();
        }
        if self.seen.iter().any(|(_, s)| s == signature) {
            return Err(Refusal::Replayed);
        }
        self.seen.push_back((now_nanos, signature.to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000_000_000;

    fn commit(time: u64) -> Signed<'static> {
        Signed::Commit {
            group: "shop",
            round_id: "shop-1",
            time_unix_nanos: time,
        }
    }

    #[test]
    fn only_the_secret_signs_and_every_field_counts() {
        let secret = GroupSecret::new(vec![7; 32]).unwrap();
        let other = GroupSecret::new(vec![8; 32]).unwrap();
        let signature = secret.sign(&commit(NOW), "web.1", NOW).unwrap();
        assert_eq!(
            secret.verify(&signature, &commit(NOW), NOW).unwrap(),
            "web.1"
        );
        assert_eq!(
            other.verify(&signature, &commit(NOW), NOW),
            Err(Refusal::BadMac)
        );
        // Another time, another round, another method, another signer.
        assert_eq!(
            secret.verify(&signature, &commit(NOW + 1), NOW),
            Err(Refusal::BadMac)
        );
        let abort = Signed::Abort {
            group: "shop",
            round_id: "shop-1",
        };
        assert_eq!(secret.verify(&signature, &abort, NOW), Err(Refusal::BadMac));
        let forged = signature.replace(".web.1", ".web.2");
        assert_eq!(
            secret.verify(&forged, &commit(NOW), NOW),
            Err(Refusal::BadMac)
        );
        // Fields do not run into each other.
        let a = Signed::Abort {
            group: "ab",
            round_id: "c",
        };
        let b = Signed::Abort {
            group: "a",
            round_id: "bc",
        };
        let signed = secret.sign(&a, "web-1", NOW).unwrap();
        assert_eq!(secret.verify(&signed, &b, NOW), Err(Refusal::BadMac));
        for junk in ["", "v1", "v2.1.00.web-1", "v1.x.00.web-1", "v1.1.zz.web-1"] {
            assert_eq!(
                secret.verify(junk, &commit(NOW), NOW),
                Err(Refusal::Malformed),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn old_signatures_and_replays_are_refused() {
        let secret = GroupSecret::new(vec![7; 32]).unwrap();
        let late = NOW + 6_000_000_000;
        let signature = secret.sign(&commit(NOW), "web-1", NOW).unwrap();
        assert!(matches!(
            secret.verify(&signature, &commit(NOW), late),
            Err(Refusal::Stale(_))
        ));
        let mut replays = Replays::default();
        replays.admit(&signature, NOW).unwrap();
        assert_eq!(replays.admit(&signature, NOW + 1), Err(Refusal::Replayed));
        let next = secret.sign(&commit(NOW + 1), "web-1", NOW + 1).unwrap();
        replays.admit(&next, NOW + 1).unwrap();
    }

    #[test]
    fn no_secret_no_group_secret_and_debug_hides_it() {
        assert!(GroupSecret::new(Vec::new()).is_none());
        let shown = format!("{:?}", GroupSecret::new(vec![0xab; 32]).unwrap());
        assert!(!shown.contains("ab"), "{shown}");
    }
}
