//! Control messages down the agents' streams: who is streaming each VM now,
//! a bounded mailbox per stream, and the registry watch that stops a stream
//! whose agent was fenced (a newer epoch) or whose VM stopped replicating.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_proto::cache::v1 as pb;
use ferry_proto::ids::{Epoch, Incarnation};
use ferry_proto::registry::v1 as registry;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_runtime::follow::{follow_registry, Follower};
use ferry_runtime::{PeerChannel, Refused};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::CacheError;
use crate::store::Store;

/// Control messages waiting for one stream before senders are refused.
const MAILBOX: usize = 8;

/// What a stream is told.
#[derive(Debug, Clone)]
pub enum Control {
    Resync(pb::ResyncRequest),
    Bookmark(pb::BookmarkRequest),
    Stop(pb::Stop),
}

struct Session {
    id: u64,
    epoch: u64,
    tx: mpsc::Sender<Control>,
}

/// The open agent streams, one per VM.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
}

/// Removes its stream from [`Sessions`] when the stream ends.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    vm: String,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.sessions.open.lock() {
            if open.get(&self.vm).is_some_and(|s| s.id == self.id) {
                open.remove(&self.vm);
            }
        }
    }
}

impl SessionGuard {
    /// A check, callable off the runtime, that this is still the VM's
    /// stream: once its agent opened a newer one (it gave up on this one,
    /// whose last batches may still be arriving), this one may not append,
    /// or it would take the sequences the newer one was told to use.
    pub fn still_current(&self) -> impl FnOnce() -> Result<(), CacheError> + Send + 'static {
        let (sessions, vm, id) = (self.sessions.clone(), self.vm.clone(), self.id);
        move || {
            let open = sessions.open.lock().map_err(|_| poisoned())?;
            match open.get(&vm) {
                Some(s) if s.id == id => Ok(()),
                _ => Err(Refused::failed_precondition(format!(
                    "a newer stream of VM {vm:?} has taken over from this one"
                ))
                .into()),
            }
        }
    }
}

fn poisoned() -> CacheError {
    CacheError::Corrupt("the session table lock was poisoned".into())
}

impl Sessions {
    /// Records the stream of `vm` at `epoch`, replacing an older one (which
    /// is told to stop when its epoch is lower: a newer agent took over).
    pub fn open(
        self: &Arc<Self>,
        vm: &str,
        epoch: u64,
    ) -> Result<(SessionGuard, mpsc::Receiver<Control>), CacheError> {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self
            .open
            .lock()
            .map_err(|_| poisoned())?
            .insert(vm.to_string(), Session { id, epoch, tx });
        if let Some(old) = old.filter(|old| old.epoch < epoch) {
            let _ = old.tx.try_send(Control::Stop(pb::Stop {
                reason: format!("a newer agent (epoch {epoch}) streams VM {vm:?} now"),
                ..Default::default()
            }));
        }
        let guard = SessionGuard {
            sessions: self.clone(),
            vm: vm.to_string(),
            id,
        };
        Ok((guard, rx))
    }

    /// Hands `control` to the agent streaming `vm`; returns its epoch.
    pub fn send(&self, vm: &str, control: Control) -> Result<u64, CacheError> {
        let open = self.open.lock().map_err(|_| poisoned())?;
        let session = open.get(vm).ok_or_else(|| {
            Refused::failed_precondition(format!(
                "no agent is streaming VM {vm:?} now; start its agent and try again"
            ))
        })?;
        session.tx.try_send(control).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::resource_exhausted(format!(
                "the agent of VM {vm:?} has not yet taken the control messages sent before; \
                 try again shortly"
            )),
            mpsc::error::TrySendError::Closed(_) => Refused::failed_precondition(format!(
                "the stream of VM {vm:?} just ended; try again once its agent reconnects"
            )),
        })?;
        Ok(session.epoch)
    }

    /// Stops the stream of `vm` if its epoch is below `epoch` (or any stream
    /// of it when `epoch` is None).
    fn stop(&self, vm: &str, epoch: Option<u64>, reason: &str) {
        let Ok(open) = self.open.lock() else { return };
        if let Some(session) = open.get(vm) {
            if epoch.is_none_or(|e| session.epoch < e) {
                tracing::warn!(
                    vm,
                    epoch = session.epoch,
                    reason,
                    "stopping the agent's stream"
                );
                let _ = session.tx.try_send(Control::Stop(pb::Stop {
                    reason: reason.to_string(),
                    ..Default::default()
                }));
            }
        }
    }
}

/// Follows registry's protected items until `shutdown`: a raised epoch
/// (failover fenced the source, or a newer agent registered) is recorded and
/// stops older streams; a VM leaving replication stops its stream.
pub async fn watch_registry(
    client: RegistryClient<PeerChannel>,
    sessions: Arc<Sessions>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) {
    let mut follower = RegistryFollower { sessions, store };
    follow_registry(client, &mut follower, &shutdown).await
}

struct RegistryFollower {
    sessions: Arc<Sessions>,
    store: Arc<Store>,
}

impl Follower for RegistryFollower {
    async fn event(&mut self, event: registry::ProtectedItemEvent) {
        apply(&event, &self.sessions, &self.store).await
    }

    async fn synced(&mut self, protected: &BTreeMap<String, u64>, last_incarnation: u64) {
        reconcile(&self.store, protected, last_incarnation).await
    }
}

/// After registry's snapshot: logs of VMs registry no longer protects, at
/// an incarnation it has issued, belong to items disabled while this cache
/// was away, and are deleted. A log newer than anything registry issued
/// (registry restored from an old backup?), or from before incarnations,
/// is kept and reported.
async fn reconcile(store: &Store, items: &BTreeMap<String, u64>, last_incarnation: u64) {
    for (vm, incarnation) in store.incarnations() {
        if items.contains_key(&vm) {
            continue;
        }
        if incarnation == Incarnation(0) || incarnation.get() > last_incarnation {
            tracing::warn!(
                vm,
                %incarnation,
                last_incarnation,
                "registry does not protect this VM, but its log is not of an incarnation \
                 registry issued: kept"
            );
            continue;
        }
        match store.remove(&vm, incarnation).await {
            Ok(_) => {}
            Err(err) => tracing::error!(vm, %err, "cannot delete a disabled item's log"),
        }
    }
}

async fn apply(event: &registry::ProtectedItemEvent, sessions: &Sessions, store: &Store) {
    let Some(item) = &event.item else { return };
    let vm = item.vm_name.as_str();
    if event.kind() == registry::EventKind::Removed {
        sessions.stop(vm, None, &format!("replication of VM {vm:?} was disabled"));
        // The log goes with the item (never a newer incarnation's).
        if let Err(err) = store.remove(vm, Incarnation(item.incarnation)).await {
            tracing::error!(vm, %err, "cannot delete a disabled item's log");
        }
        return;
    }
    if item.state() == registry::ReplicationState::Disabling {
        sessions.stop(vm, None, &format!("replication of VM {vm:?} was disabled"));
        return;
    }
    if item.incarnation > 0 {
        // A log of an older incarnation is the disabled item's.
        if let Err(err) = store.remove(vm, Incarnation(item.incarnation - 1)).await {
            tracing::error!(vm, %err, "cannot delete a disabled item's log");
        }
    }
    // Recorded durably, so that the fenced agent stays refused even if it
    // reaches this cache before registry can be asked again.
    if let Ok(Some(state)) = store.get(vm) {
        if let Err(err) = store.admit_epoch(&state, Epoch(item.epoch)).await {
            tracing::debug!(vm, %err, "epoch not raised");
        }
    }
    sessions.stop(
        vm,
        Some(item.epoch),
        &format!(
            "this agent of VM {vm:?} was fenced: registry's epoch is now {}",
            item.epoch
        ),
    );
}
