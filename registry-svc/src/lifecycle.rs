//! The protected-item lifecycle and the moves it allows.

use ferry_proto::registry::v1 as pb;
use serde::{Deserialize, Serialize};

/// A protected item's replication state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Enabling,
    InitialReplication,
    Protected,
    ResyncRequired,
    Resyncing,
    FailoverInProgress,
    FailedOver,
    Committed,
    Disabling,
}

use State::*;

impl State {
    /// Whether the lifecycle allows moving from `self` to `to`. Staying put is
    /// always allowed (and changes nothing).
    pub fn can_move_to(self, to: State) -> bool {
        self == to
            || matches!(
                (self, to),
                (Enabling, InitialReplication | Disabling)
                    | (InitialReplication, Protected | ResyncRequired | Disabling)
                    | (Protected, ResyncRequired | FailoverInProgress | Disabling)
                    | (ResyncRequired, Resyncing | FailoverInProgress | Disabling)
                    | (
                        Resyncing,
                        Protected | ResyncRequired | FailoverInProgress | Disabling
                    )
                    | (FailoverInProgress, FailedOver | Protected | ResyncRequired)
                    | (FailedOver, FailoverInProgress | Committed)
                    | (Committed, Disabling)
            )
    }

    /// Whether the source side may (still) replicate: an agent may register.
    pub fn source_active(self) -> bool {
        matches!(
            self,
            Enabling | InitialReplication | Protected | ResyncRequired | Resyncing
        )
    }

    /// Whether progress percentages are meaningful.
    pub fn reports_progress(self) -> bool {
        matches!(self, InitialReplication | Resyncing)
    }

    pub fn to_pb(self) -> pb::ReplicationState {
        match self {
            Enabling => pb::ReplicationState::Enabling,
            InitialReplication => pb::ReplicationState::InitialReplication,
            Protected => pb::ReplicationState::Protected,
            ResyncRequired => pb::ReplicationState::ResyncRequired,
            Resyncing => pb::ReplicationState::Resyncing,
            FailoverInProgress => pb::ReplicationState::FailoverInProgress,
            FailedOver => pb::ReplicationState::FailedOver,
            Committed => pb::ReplicationState::Committed,
            Disabling => pb::ReplicationState::Disabling,
        }
    }

    /// None for UNSPECIFIED or an unknown number.
    pub fn from_pb(value: i32) -> Option<State> {
        Some(match pb::ReplicationState::try_from(value).ok()? {
            pb::ReplicationState::Unspecified => return None,
            pb::ReplicationState::Enabling => Enabling,
            pb::ReplicationState::InitialReplication => InitialReplication,
            pb::ReplicationState::Protected => Protected,
            pb::ReplicationState::ResyncRequired => ResyncRequired,
            pb::ReplicationState::Resyncing => Resyncing,
            pb::ReplicationState::FailoverInProgress => FailoverInProgress,
            pb::ReplicationState::FailedOver => FailedOver,
            pb::ReplicationState::Committed => Committed,
            pb::ReplicationState::Disabling => Disabling,
        })
    }

    /// The state's name as the .proto spells it, without the prefix.
    pub fn name(self) -> &'static str {
        self.to_pb()
            .as_str_name()
            .trim_start_matches("REPLICATION_STATE_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 9] = [
        Enabling,
        InitialReplication,
        Protected,
        ResyncRequired,
        Resyncing,
        FailoverInProgress,
        FailedOver,
        Committed,
        Disabling,
    ];

    #[test]
    fn the_whole_table() {
        let allowed: &[(State, &[State])] = &[
            (Enabling, &[InitialReplication, Disabling]),
            (InitialReplication, &[Protected, ResyncRequired, Disabling]),
            (Protected, &[ResyncRequired, FailoverInProgress, Disabling]),
            (ResyncRequired, &[Resyncing, FailoverInProgress, Disabling]),
            (
                Resyncing,
                &[Protected, ResyncRequired, FailoverInProgress, Disabling],
            ),
            (FailoverInProgress, &[FailedOver, Protected, ResyncRequired]),
            (FailedOver, &[FailoverInProgress, Committed]),
            (Committed, &[Disabling]),
            (Disabling, &[]),
        ];
        for (from, tos) in allowed {
            for to in ALL {
                let expect = *from == to || tos.contains(&to);
                assert_eq!(from.can_move_to(to), expect, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn pb_round_trip() {
        for s in ALL {
            assert_eq!(State::from_pb(s.to_pb() as i32), Some(s));
        }
        assert_eq!(State::from_pb(0), None);
        assert_eq!(State::from_pb(99), None);
        assert_eq!(Protected.name(), "PROTECTED");
    }
}
