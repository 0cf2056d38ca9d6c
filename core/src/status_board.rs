//! The replica's sync status as one stream, whichever session produces it.
//!
//! A session's status ([`crate::SyncHandle::observe`]) ends with the session: an app that
//! disconnects on logout and connects again, or a screen that outlives a session, would have
//! to find the new handle and observe it again. The board keeps the last status any session of
//! this replica published and forwards each new one to the replica's own observers
//! ([`crate::Replica::observe_status`]), so a status bar observes the database once. With no
//! session yet it answers from the file (cursor, pending writes, when it last synced).

use crate::transport::{StatusObserver, StatusSubscription, SyncStatus};
use parking_lot::{Mutex, ReentrantMutex};
use std::sync::Arc;

type ObserverList = Vec<(u64, Arc<dyn StatusObserver>)>;

/// The last published status and the replica's status observers.
#[derive(Default)]
pub(crate) struct StatusBoard {
    last: Mutex<Option<SyncStatus>>,
    observers: Arc<Mutex<ObserverList>>,
    next: Mutex<u64>,
    /// Held while a status is delivered and while a new observer is given the current one
    /// (reentrant: an observer may observe), so no observer misses a change.
    delivery: ReentrantMutex<()>,
}

impl StatusBoard {
    /// Records `status` and hands it to every observer.
    pub(crate) fn publish(&self, status: &SyncStatus) {
        let _delivering = self.delivery.lock();
        *self.last.lock() = Some(status.clone());
        let observers: Vec<Arc<dyn StatusObserver>> = self
            .observers
            .lock()
            .iter()
            .map(|(_, o)| Arc::clone(o))
            .collect();
        for o in observers {
            o.on_status(status);
        }
    }

    /// The last status a session published, if any did since the replica was opened or
    /// cleared.
    pub(crate) fn last(&self) -> Option<SyncStatus> {
        self.last.lock().clone()
    }

    /// Forgets the last status (the replica was cleared) and publishes `now`.
    pub(crate) fn restart(&self, now: &SyncStatus) {
        self.publish(now);
        *self.last.lock() = None;
    }

    /// Registers `observer` and gives it `now()` (the current status) as one step against
    /// [`StatusBoard::publish`].
    pub(crate) fn observe(
        &self,
        observer: Arc<dyn StatusObserver>,
        now: impl FnOnce() -> SyncStatus,
    ) -> StatusSubscription {
        let _delivering = self.delivery.lock();
        let id = {
            let mut n = self.next.lock();
            *n += 1;
            *n
        };
        self.observers.lock().push((id, Arc::clone(&observer)));
        observer.on_status(&now());
        StatusSubscription::new(Arc::downgrade(&self.observers), id)
    }
}
