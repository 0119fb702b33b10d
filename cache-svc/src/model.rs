//! cache-svc's requests as domain types, converted from protobuf once on
//! receipt (`TryFrom`, INVALID_ARGUMENT on failure): the handlers work with
//! typed names, sequences and epochs, never with raw request fields.
//! Records themselves stay in their wire form: the log stores exactly the
//! bytes the agent checksummed (docs/checksums.md), and `ingest::validate`
//! checks each against the VM's disks.

use ferry_proto::cache::v1 as pb;
use ferry_proto::ids::{Epoch, Incarnation, Sequence, VmName};
use ferry_runtime::Refused;

use crate::control::Control;
use crate::error::CacheError;

/// The VM a request is about; an empty or malformed name is refused, and
/// the request's span is tagged with it.
fn vm(name: String) -> Result<VmName, CacheError> {
    if name.is_empty() {
        return Err(Refused::invalid_argument("vm_name is empty").into());
    }
    let vm = VmName::parse(name).map_err(|e| Refused::invalid_argument(e.0))?;
    ferry_runtime::trace_context::record_vm(vm.as_str());
    Ok(vm)
}

/// The first message of an agent's stream.
#[derive(Debug, Clone)]
pub struct Open {
    pub vm: VmName,
    pub credential: String,
    pub epoch: Epoch,
}

impl TryFrom<pb::IngestOpen> for Open {
    type Error = CacheError;
    fn try_from(open: pb::IngestOpen) -> Result<Open, CacheError> {
        Ok(Open {
            vm: vm(open.vm_name)?,
            credential: open.credential,
            epoch: Epoch(open.epoch),
        })
    }
}

/// A processor's tail: where it resumes and what it already holds.
#[derive(Debug, Clone)]
pub struct TailFrom {
    pub vm: VmName,
    /// The first sequence wanted (at least 1).
    pub from: Sequence,
    /// Keep the stream open for records still to come.
    pub follow: bool,
    /// The largest batch wanted; None for the cache's default.
    pub max_batch_bytes: Option<usize>,
    /// The item's incarnation the reader follows; None for any.
    pub incarnation: Option<Incarnation>,
    /// The log lineage the reader applied from; None for none yet.
    pub lineage: Option<u64>,
}

impl TryFrom<pb::TailRequest> for TailFrom {
    type Error = CacheError;
    fn try_from(req: pb::TailRequest) -> Result<TailFrom, CacheError> {
        Ok(TailFrom {
            vm: vm(req.vm_name)?,
            from: Sequence(req.from_sequence.max(1)),
            follow: req.follow,
            max_batch_bytes: (req.max_batch_bytes != 0).then_some(req.max_batch_bytes as usize),
            incarnation: (req.incarnation != 0).then_some(Incarnation(req.incarnation)),
            lineage: (req.lineage != 0).then_some(req.lineage),
        })
    }
}

/// A processor's report of what it applied durably.
#[derive(Debug, Clone)]
pub struct AppliedReport {
    pub vm: VmName,
    pub applied: Sequence,
    /// The lineage the sequence belongs to (0: the reader's is unknown).
    pub lineage: u64,
}

impl TryFrom<pb::ReportAppliedRequest> for AppliedReport {
    type Error = CacheError;
    fn try_from(req: pb::ReportAppliedRequest) -> Result<AppliedReport, CacheError> {
        Ok(AppliedReport {
            vm: vm(req.vm_name)?,
            applied: Sequence(req.applied_sequence),
            lineage: req.lineage,
        })
    }
}

/// A request about one VM's log.
#[derive(Debug, Clone)]
pub struct LogOf(pub VmName);

impl TryFrom<pb::GetLogInfoRequest> for LogOf {
    type Error = CacheError;
    fn try_from(req: pb::GetLogInfoRequest) -> Result<LogOf, CacheError> {
        Ok(LogOf(vm(req.vm_name)?))
    }
}

/// A control message for the agent streaming a VM.
#[derive(Debug, Clone)]
pub struct ControlFor {
    pub vm: VmName,
    pub control: Control,
}

impl TryFrom<pb::SendControlRequest> for ControlFor {
    type Error = CacheError;
    fn try_from(req: pb::SendControlRequest) -> Result<ControlFor, CacheError> {
        use pb::send_control_request::Control as C;
        let vm = vm(req.vm_name)?;
        let control = match req.control {
            Some(C::Resync(r)) => Control::Resync(r),
            Some(C::Bookmark(b)) if b.id.is_empty() => {
                return Err(Refused::invalid_argument("a bookmark needs an id").into())
            }
            Some(C::Bookmark(b)) => Control::Bookmark(b),
            Some(C::Stop(s)) => Control::Stop(s),
            None => {
                return Err(Refused::invalid_argument(
                    "control is empty: set resync, bookmark or stop",
                )
                .into())
            }
        };
        Ok(ControlFor { vm, control })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_runtime::Refusal;

    #[test]
    fn requests_without_a_valid_vm_are_refused_before_anything_is_looked_up() {
        for name in ["", "a/b", ".hidden"] {
            let tail = TailFrom::try_from(pb::TailRequest {
                vm_name: name.into(),
                ..Default::default()
            });
            assert!(
                matches!(tail, Err(CacheError::Refused(Refused { kind: Refusal::InvalidArgument, ref message })) if message.contains("vm_name")),
                "{name:?}: {tail:?}"
            );
        }
    }

    #[test]
    fn a_tail_from_zero_starts_at_the_first_sequence_and_zero_means_unset() {
        let tail = TailFrom::try_from(pb::TailRequest {
            vm_name: "vm".into(),
            ..Default::default()
        })
        .map(|t| (t.from, t.incarnation, t.lineage, t.max_batch_bytes))
        .ok();
        assert_eq!(tail, Some((Sequence(1), None, None, None)));
    }

    #[test]
    fn a_bookmark_without_an_id_and_an_empty_control_are_refused() {
        let bookmark = pb::send_control_request::Control::Bookmark(pb::BookmarkRequest::default());
        for control in [Some(bookmark), None] {
            let got = ControlFor::try_from(pb::SendControlRequest {
                vm_name: "vm".into(),
                control,
            });
            assert!(
                matches!(
                    got,
                    Err(CacheError::Refused(Refused {
                        kind: Refusal::InvalidArgument,
                        ..
                    }))
                ),
                "{got:?}"
            );
        }
    }
}
