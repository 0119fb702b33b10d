//! A refusal a service answers a request with: one of the gRPC codes a
//! caller can act on, and a message for a person. Each service's error enum
//! holds one as a variant, so the table of refusal kinds and their codes
//! lives here once instead of in every service.

use tonic::{Code, Status};

/// Why a request is refused, as far as the caller needs to know to react.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A malformed request or record; nothing of it was done.
    InvalidArgument,
    /// Something named does not exist (or no longer does).
    NotFound,
    /// Something of that name exists already, differently.
    AlreadyExists,
    /// The request does not fit the current state.
    FailedPrecondition,
    /// A credential that is not recognised or does not match.
    PermissionDenied,
    /// No credential at all.
    Unauthenticated,
    /// A position outside what is held.
    OutOfRange,
    /// The exchange no longer fits the state: start it again.
    Aborted,
    /// A quota is reached: back off and try again.
    ResourceExhausted,
    /// Stored data does not match its checksum.
    DataLoss,
    /// A peer could not be asked.
    Unavailable,
    /// The request took longer than it may.
    DeadlineExceeded,
}

impl Refusal {
    /// The gRPC code a caller sees.
    pub fn code(self) -> Code {
        match self {
            Refusal::InvalidArgument => Code::InvalidArgument,
            Refusal::NotFound => Code::NotFound,
            Refusal::AlreadyExists => Code::AlreadyExists,
            Refusal::FailedPrecondition => Code::FailedPrecondition,
            Refusal::PermissionDenied => Code::PermissionDenied,
            Refusal::Unauthenticated => Code::Unauthenticated,
            Refusal::OutOfRange => Code::OutOfRange,
            Refusal::Aborted => Code::Aborted,
            Refusal::ResourceExhausted => Code::ResourceExhausted,
            Refusal::DataLoss => Code::DataLoss,
            Refusal::Unavailable => Code::Unavailable,
            Refusal::DeadlineExceeded => Code::DeadlineExceeded,
        }
    }
}

/// A refused request: its kind and the message, shown exactly as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: Refusal,
    pub message: String,
}

impl Refused {
    pub fn new(kind: Refusal, message: impl Into<String>) -> Self {
        Refused {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Refused::new(Refusal::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Refused::new(Refusal::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Refused::new(Refusal::AlreadyExists, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Refused::new(Refusal::FailedPrecondition, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Refused::new(Refusal::PermissionDenied, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Refused::new(Refusal::Unauthenticated, message)
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        Refused::new(Refusal::OutOfRange, message)
    }

    pub fn aborted(message: impl Into<String>) -> Self {
        Refused::new(Refusal::Aborted, message)
    }

    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Refused::new(Refusal::ResourceExhausted, message)
    }

    pub fn data_loss(message: impl Into<String>) -> Self {
        Refused::new(Refusal::DataLoss, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Refused::new(Refusal::Unavailable, message)
    }

    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Refused::new(Refusal::DeadlineExceeded, message)
    }
}

impl From<Refused> for Status {
    fn from(refused: Refused) -> Status {
        Status::new(refused.kind.code(), refused.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constructor, as the table below names them.
    type Make = fn(&'static str) -> Refused;

    /// Each kind, its constructor and the code clients have always seen.
    fn table() -> Vec<(Refusal, Make, Code)> {
        vec![
            (
                Refusal::InvalidArgument,
                Refused::invalid_argument,
                Code::InvalidArgument,
            ),
            (Refusal::NotFound, Refused::not_found, Code::NotFound),
            (
                Refusal::AlreadyExists,
                Refused::already_exists,
                Code::AlreadyExists,
            ),
            (
                Refusal::FailedPrecondition,
                Refused::failed_precondition,
                Code::FailedPrecondition,
            ),
            (
                Refusal::PermissionDenied,
                Refused::permission_denied,
                Code::PermissionDenied,
            ),
            (
                Refusal::Unauthenticated,
                Refused::unauthenticated,
                Code::Unauthenticated,
            ),
            (Refusal::OutOfRange, Refused::out_of_range, Code::OutOfRange),
            (Refusal::Aborted, Refused::aborted, Code::Aborted),
            (
                Refusal::ResourceExhausted,
                Refused::resource_exhausted,
                Code::ResourceExhausted,
            ),
            (Refusal::DataLoss, Refused::data_loss, Code::DataLoss),
            (
                Refusal::Unavailable,
                Refused::unavailable,
                Code::Unavailable,
            ),
            (
                Refusal::DeadlineExceeded,
                Refused::deadline_exceeded,
                Code::DeadlineExceeded,
            ),
        ]
    }

    #[test]
    fn every_kind_maps_to_its_own_grpc_code() {
        let table = table();
        assert_eq!(table.len(), 12);
        for (kind, make, code) in table {
            assert_eq!(kind.code(), code, "{kind:?}");
            let refused = make("m");
            assert_eq!(refused.kind, kind);
            assert_eq!(Status::from(refused).code(), code, "{kind:?}");
        }
    }

    #[test]
    fn the_message_reaches_the_client_unchanged() {
        let message = "vm \"web-1\" is not protected: add it to a group first";
        for (kind, make, _) in table() {
            let refused = make(message);
            assert_eq!(refused.to_string(), message, "{kind:?}");
            assert_eq!(Status::from(refused).message(), message, "{kind:?}");
        }
    }
}
