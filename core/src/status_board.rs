//! Status observers: one board per session and one per replica.
//!
//! A session's status ([`crate::SyncHandle::observe`]) ends with the session: an app that
//! disconnects on logout and connects again, or a screen that outlives a session, would have
//! to find the new handle and observe it again. So each session publishes to its own board and
//! to the replica's: the replica's board keeps the last status any session of this replica
//! published and forwards each new one to the replica's observers
//! ([`crate::Replica::observe_status`]), so a status bar observes the database once. With no
//! session yet it answers from the file (cursor, pending writes, when it last synced).
//!
//! Both kinds of observer need the same guarantee — registering and being handed the current
//! status is one step against publishing, so no observer misses a change or sees one twice —
//! which is why this is one type.

use crate::transport::{StatusObserver, StatusSubscription, SyncStatus};
use parking_lot::{Mutex, ReentrantMutex};
use std::sync::Arc;

pub(crate) type ObserverList = Vec<(u64, Arc<dyn StatusObserver>)>;

/// The last published status and the observers it is delivered to.
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

    /// The last status published since the board was made or restarted, if any.
    pub(crate) fn last(&self) -> Option<SyncStatus> {
        self.last.lock().clone()
    }

    /// Publishes `now` (the replica was cleared) and forgets it: until a session publishes
    /// again, the current status is read from the file.
    pub(crate) fn restart(&self, now: &SyncStatus) {
        let _delivering = self.delivery.lock();
        self.publish(now);
        *self.last.lock() = None;
    }

    /// Registers `observer` and gives it the current status — the last published, or else
    /// `resting()` — as one step against [`StatusBoard::publish`]. Nothing is registered
    /// when `resting` fails.
    pub(crate) fn observe<E>(
        &self,
        observer: Arc<dyn StatusObserver>,
        resting: impl FnOnce() -> Result<SyncStatus, E>,
    ) -> Result<StatusSubscription, E> {
        let _delivering = self.delivery.lock();
        let now = match self.last() {
            Some(s) => s,
            None => resting()?,
        };
        Ok(self.register(observer, &now))
    }

    /// [`StatusBoard::observe`] for a board that cannot fail to say where it stands: the last
    /// published status, or else `fallback()` (a session's board, published from its start).
    pub(crate) fn observe_published(
        &self,
        observer: Arc<dyn StatusObserver>,
        fallback: impl FnOnce() -> SyncStatus,
    ) -> StatusSubscription {
        let _delivering = self.delivery.lock();
        let now = self.last().unwrap_or_else(fallback);
        self.register(observer, &now)
    }

    /// Adds `observer` and hands it `now`; the caller holds the delivery lock.
    fn register(&self, observer: Arc<dyn StatusObserver>, now: &SyncStatus) -> StatusSubscription {
        let id = {
            let mut n = self.next.lock();
            *n += 1;
            *n
        };
        self.observers.lock().push((id, Arc::clone(&observer)));
        observer.on_status(now);
        StatusSubscription::new(Arc::downgrade(&self.observers), id)
    }
}
