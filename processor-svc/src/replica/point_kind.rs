//! What a recovery point is consistent to: the domain type stored in each
//! point, apart from the wire's `ferry.processor.v1.PointKind` (an `i32`
//! with an UNSPECIFIED that no stored point has).
//!
//! Stored by name (`"crash_consistent"`). Points stored before this type
//! hold the proto's number (1, 2, 3): read as the kind it names. Any other
//! value is an error (the index entry is Corrupt), never a default kind.

use std::fmt;

use ferry_proto::processor::v1 as pb;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A recovery point's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// Holds exactly the writes up to its sequence cut, on every disk.
    CrashConsistent,
    /// Cut at an app-consistent marker: the applications were quiesced.
    AppConsistent,
    /// Cut at a replication group bookmark, consistent across the group.
    MultiVm,
}

const NAMES: &[&str] = &["crash_consistent", "app_consistent", "multi_vm"];

impl PointKind {
    /// The kind of a legacy stored number (the proto's), if it is one.
    fn from_legacy(n: u64) -> Option<PointKind> {
        match n {
            1 => Some(PointKind::CrashConsistent),
            2 => Some(PointKind::AppConsistent),
            3 => Some(PointKind::MultiVm),
            _ => None,
        }
    }
}

impl From<PointKind> for pb::PointKind {
    fn from(kind: PointKind) -> pb::PointKind {
        match kind {
            PointKind::CrashConsistent => pb::PointKind::CrashConsistent,
            PointKind::AppConsistent => pb::PointKind::AppConsistent,
            PointKind::MultiVm => pb::PointKind::MultiVm,
        }
    }
}

/// A point kind received that names no kind of point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unspecified;

impl TryFrom<pb::PointKind> for PointKind {
    type Error = Unspecified;
    fn try_from(kind: pb::PointKind) -> Result<PointKind, Unspecified> {
        match kind {
            pb::PointKind::Unspecified => Err(Unspecified),
            pb::PointKind::CrashConsistent => Ok(PointKind::CrashConsistent),
            pb::PointKind::AppConsistent => Ok(PointKind::AppConsistent),
            pb::PointKind::MultiVm => Ok(PointKind::MultiVm),
        }
    }
}

impl<'de> Deserialize<'de> for PointKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PointKind, D::Error> {
        struct Kind;
        impl Visitor<'_> for Kind {
            type Value = PointKind;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a point kind (a name, or the legacy number 1, 2 or 3)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PointKind, E> {
                match v {
                    "crash_consistent" => Ok(PointKind::CrashConsistent),
                    "app_consistent" => Ok(PointKind::AppConsistent),
                    "multi_vm" => Ok(PointKind::MultiVm),
                    _ => Err(E::unknown_variant(v, NAMES)),
                }
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PointKind, E> {
                PointKind::from_legacy(v)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PointKind, E> {
                u64::try_from(v)
                    .ok()
                    .and_then(PointKind::from_legacy)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(Kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<PointKind, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_kind_is_stored_by_name_and_read_back() {
        for kind in [
            PointKind::CrashConsistent,
            PointKind::AppConsistent,
            PointKind::MultiVm,
        ] {
            let stored = serde_json::to_string(&kind).unwrap();
            assert!(stored.starts_with('"'), "{stored}");
            assert_eq!(read(&stored).unwrap(), kind);
            let wire = pb::PointKind::from(kind);
            assert_eq!(PointKind::try_from(wire), Ok(kind));
        }
        assert_eq!(
            PointKind::try_from(pb::PointKind::Unspecified),
            Err(Unspecified)
        );
    }

    #[test]
    fn a_legacy_number_reads_as_its_kind_and_an_unknown_value_is_refused() {
        // As points were stored before: the proto's number.
        assert_eq!(read("1").unwrap(), PointKind::CrashConsistent);
        assert_eq!(read("2").unwrap(), PointKind::AppConsistent);
        assert_eq!(read("3").unwrap(), PointKind::MultiVm);
        for bad in ["0", "4", "-1", "\"crash\"", "null", "1.5"] {
            assert!(read(bad).is_err(), "{bad} read as a kind");
        }
    }
}
