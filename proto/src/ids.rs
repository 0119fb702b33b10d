//! Typed ids and times: the vocabulary every service shares. The wire
//! carries strings and integers; each service turns them into these types
//! once, on receipt (a malformed one is INVALID_ARGUMENT there), and works
//! with the types inward, so a sequence is never passed where an epoch is
//! expected and a point id is never parsed twice. Records on disk hold
//! these types (serde-transparent: the stored form is the plain value).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The longest name (VM, disk, region, group, network...) registry accepts.
pub const MAX_NAME_LEN: usize = 64;

/// Why a value received is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

/// Checks a name as registry defines one: 1 to [`MAX_NAME_LEN`] ASCII
/// letters, digits, '-', '_' and '.', starting with a letter or digit.
/// `field` names it in the message ("vm_name", "region").
pub fn check_name(field: &str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError(format!("{field} is empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(IdError(format!(
            "{field} {value:?} is {} characters long; at most {MAX_NAME_LEN} are allowed",
            value.len()
        )));
    }
    let first_ok = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(IdError(format!(
            "{field} {value:?} is not a valid name: use ASCII letters, digits, '-', '_' and '.', \
             starting with a letter or digit"
        )));
    }
    Ok(())
}

/// The one way a name becomes a file or directory name. ASCII letters,
/// digits and '-' stay as they are; every other byte (including '_', the
/// escape) becomes `_` and two lowercase hex digits. The encoding is
/// injective (`web.1` and `web_1` get different files), never empty, never
/// contains '/', never starts with '.'.
pub fn path_name(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// A string id: a newtype whose `parse` checks it with [`check_name`].
macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        /// Quoted, as the plain string would be: messages read `VM "web-1"`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl $name {
            /// Checks `value` as a name; the error names the field.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_name($field, &value)?;
                Ok($name(value))
            }

            /// The name as received.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as one safe path component ([`path_name`]).
            pub fn path_component(&self) -> String {
                path_name(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                $name::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_id!(
    /// A source VM's name, unique in registry.
    VmName,
    "vm_name"
);
name_id!(
    /// A disk's id, unique within its VM.
    DiskId,
    "disk_id"
);

/// A number counting up: a newtype over `u64` with the arithmetic it needs.
macro_rules! counter_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The one after this (saturating: `u64::MAX` stays).
            pub fn next(self) -> Self {
                $name(self.0.saturating_add(1))
            }

            /// The plain number, for the wire.
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            fn from(n: u64) -> Self {
                $name(n)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

counter_id!(
    /// A record's place in a VM's stream: gapless from 1; 0 is "none yet".
    Sequence
);
counter_id!(
    /// An agent registration's fencing epoch: a higher one fences the lower.
    Epoch
);
counter_id!(
    /// One enable of replication: unique and increasing across registry.
    Incarnation
);

/// A recovery point: the number of the point interval it closes. On the
/// wire it is `rp-<n>`; [`FromStr`] accepts only that form.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PointId(pub u64);

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rp-{}", self.0)
    }
}

impl FromStr for PointId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<PointId, IdError> {
        s.strip_prefix("rp-")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(PointId)
            .ok_or_else(|| IdError(format!("{s:?} is not a recovery point id (rp-<number>)")))
    }
}

impl From<PointId> for String {
    fn from(id: PointId) -> String {
        id.to_string()
    }
}

/// A failover job's id, as failover-svc made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// An id received: any non-empty string of at most 128 printable ASCII
    /// characters (what failover-svc makes is shorter; this only keeps
    /// garbage out of keys and logs).
    pub fn parse(value: impl Into<String>) -> Result<JobId, IdError> {
        let value = value.into();
        if value.is_empty() {
            return Err(IdError("job_id is empty".into()));
        }
        if value.len() > 128 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdError(format!(
                "job_id {value:?} is not a job id: at most 128 printable ASCII characters"
            )));
        }
        Ok(JobId(value))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

/// A NIC's MAC address: six octets, unicast (the low bit of the first octet
/// clear). Written and read as `aa:bb:cc:dd:ee:ff`, lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A MAC received as text; `field` names it in the message.
    pub fn parse(field: &str, value: &str) -> Result<MacAddr, IdError> {
        let bad = || {
            IdError(format!(
                "{field} {value:?} is not a MAC address: six hex pairs joined by ':'"
            ))
        };
        let mut octets = [0u8; 6];
        let mut parts = value.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if octets[0] & 1 == 1 {
            return Err(IdError(format!(
                "{field} {value:?} is a multicast address; a NIC needs a unicast one"
            )));
        }
        Ok(MacAddr(octets))
    }

    /// A stable locally administered address (QEMU's 52:54:00 prefix) for a
    /// NIC registered without one, from `seed` (the VM's and NIC's names,
    /// and a counter to step past one already taken).
    pub fn derived(seed: &[&str]) -> MacAddr {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in seed {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let d = h.finalize();
        MacAddr([0x52, 0x54, 0x00, d[0], d[1], d[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl TryFrom<String> for MacAddr {
    type Error = IdError;
    fn try_from(s: String) -> Result<MacAddr, IdError> {
        MacAddr::parse("MAC address", &s)
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// A wall-clock time as Unix nanoseconds: what points, reports and
/// markers carry. Times before 1970 or after 2554 do not occur.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixNanos(pub u64);

impl UnixNanos {
    /// Now, by the system clock (0 if the clock is before 1970).
    pub fn now() -> UnixNanos {
        UnixNanos::from(SystemTime::now())
    }

    /// The plain number, for the wire.
    pub fn get(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero if it is not after it.
    pub fn since(self, earlier: UnixNanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: Duration) -> UnixNanos {
        UnixNanos(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// This time minus `d` (saturating at 0).
    pub fn minus(self, d: Duration) -> UnixNanos {
        UnixNanos(
            self.0
                .saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// As a protobuf timestamp.
    pub fn to_timestamp(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: i64::try_from(self.0 / 1_000_000_000).unwrap_or(i64::MAX),
            nanos: i32::try_from(self.0 % 1_000_000_000).unwrap_or(0),
        }
    }

    /// From a protobuf timestamp; None before 1970 or malformed.
    pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<UnixNanos> {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u64::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
        secs.checked_mul(1_000_000_000)?
            .checked_add(nanos)
            .map(UnixNanos)
    }
}

impl From<SystemTime> for UnixNanos {
    fn from(t: SystemTime) -> UnixNanos {
        UnixNanos(
            t.duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        )
    }
}

impl From<UnixNanos> for SystemTime {
    fn from(t: UnixNanos) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(t.0)
    }
}

impl From<u64> for UnixNanos {
    fn from(n: u64) -> UnixNanos {
        UnixNanos(n)
    }
}

impl fmt::Display for UnixNanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn macs_parse_print_and_derive_stably() {
        let m = super::MacAddr::parse("mac", "52:54:00:AB:cd:0f").unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0f0",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(super::MacAddr::parse("mac", bad).is_err(), "{bad}");
        }
        assert!(super::MacAddr::parse("mac", "01:00:5e:00:00:01")
            .unwrap_err()
            .0
            .contains("multicast"));
        let a = super::MacAddr::derived(&["vm1", "nic0"]);
        assert_eq!(a, super::MacAddr::derived(&["vm1", "nic0"]));
        assert_ne!(a, super::MacAddr::derived(&["vm1", "nic1"]));
        // "vm1"+"nic0" and "vm1n"+"ic0" do not alias.
        assert_ne!(a, super::MacAddr::derived(&["vm1n", "ic0"]));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<super::MacAddr>(&json).unwrap(), a);
    }

    use super::*;

    #[test]
    fn names_that_used_to_collide_get_their_own_paths() {
        let names = [
            "web.1", "web_1", "web-1", "web1", "a-b", "a_b", "a.b", "", "_", "..", ".", "a/b",
            "_2e", "web_2e1",
        ];
        let encoded: std::collections::BTreeSet<String> =
            names.iter().map(|n| path_name(n)).collect();
        assert_eq!(encoded.len(), names.len(), "{encoded:?}");
        for e in &encoded {
            assert!(
                !e.is_empty() && !e.contains('/') && !e.starts_with('.'),
                "{e}"
            );
        }
        assert_eq!(path_name("vm-1"), "vm-1", "plain names stay readable");
        assert_eq!(path_name("web.1"), "web_2e1");
    }

    #[test]
    fn names_are_checked_on_receipt() {
        assert!(VmName::parse("web-1").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            let err = VmName::parse(bad).err();
            assert!(
                err.as_ref().is_some_and(|e| e.0.contains("vm_name")),
                "{bad:?}: {err:?}"
            );
        }
        assert_eq!(
            DiskId::parse("os").map(|d| d.path_component()).ok(),
            Some("os".into())
        );
    }

    #[test]
    fn point_ids_round_trip_and_refuse_other_forms() {
        assert_eq!("rp-42".parse::<PointId>(), Ok(PointId(42)));
        assert_eq!(PointId(42).to_string(), "rp-42");
        for bad in [
            "",
            "rp-",
            "42",
            "rp-+1",
            "rp--1",
            "rp-1x",
            "RP-1",
            "rp-99999999999999999999",
        ] {
            assert!(bad.parse::<PointId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_convert_both_ways() {
        let t = UnixNanos(1_700_000_000_000_000_123);
        assert_eq!(UnixNanos::from_timestamp(&t.to_timestamp()), Some(t));
        assert_eq!(UnixNanos::from(SystemTime::from(t)), t);
        assert_eq!(
            t.plus(Duration::from_nanos(7)).since(t),
            Duration::from_nanos(7)
        );
        assert_eq!(t.since(t.plus(Duration::from_secs(1))), Duration::ZERO);
        assert_eq!(
            UnixNanos::from_timestamp(&prost_types::Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }

    #[test]
    fn counters_are_distinct_types_with_plain_wire_values() {
        let s = Sequence(9);
        assert_eq!(s.next(), Sequence(10));
        assert_eq!(Sequence(u64::MAX).next(), Sequence(u64::MAX));
        assert_eq!(u64::from(Epoch(3)), 3);
        assert_eq!(
            serde_json::to_string(&Incarnation(5)).ok(),
            Some("5".into())
        );
    }
}
