//! The one loop that follows registry's protected items: watch, hand every
//! event to the follower, hand it registry's snapshot once it is complete
//! (SYNCED), and watch again with backoff whenever the stream ends, until
//! shutdown. cache-svc and processor-svc both follow registry this way.

use std::collections::BTreeMap;
use std::future::Future;

use ferry_proto::registry::v1 as pb;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use tokio_util::sync::CancellationToken;

use crate::peers::PeerChannel;
use crate::retry::{Backoff, RetryParams};

/// What a service does with registry's protected items.
pub trait Follower: Send {
    /// Every event but SYNCED, in order (a snapshot's items first).
    fn event(&mut self, event: pb::ProtectedItemEvent) -> impl Future<Output = ()> + Send;

    /// After a snapshot: every VM registry protects, with its item's
    /// incarnation, and the highest incarnation registry ever issued.
    fn synced(
        &mut self,
        protected: &BTreeMap<String, u64>,
        last_incarnation: u64,
    ) -> impl Future<Output = ()> + Send;
}

/// Follows registry until `shutdown`.
pub async fn follow_registry(
    mut client: RegistryClient<PeerChannel>,
    follower: &mut impl Follower,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(RetryParams::RECONNECT);
    loop {
        let watched = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = client.watch_protected_items(pb::WatchProtectedItemsRequest::default()) => w,
        };
        match watched {
            Ok(stream) => {
                backoff.reset();
                let mut stream = stream.into_inner();
                let mut snapshot = BTreeMap::new();
                loop {
                    let event = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        e = stream.message() => e,
                    };
                    match event {
                        Ok(Some(event)) if event.kind() == pb::EventKind::Synced => {
                            follower.synced(&snapshot, event.last_incarnation).await;
                            snapshot.clear();
                        }
                        Ok(Some(event)) => {
                            if let (pb::EventKind::Snapshot, Some(item)) =
                                (event.kind(), &event.item)
                            {
                                snapshot.insert(item.vm_name.clone(), item.incarnation);
                            }
                            follower.event(event).await
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(%status, "registry watch ended; watching again");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::warn!(%status, "cannot watch registry; retrying"),
        }
        if !backoff.wait(shutdown).await {
            return;
        }
    }
}
