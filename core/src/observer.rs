//! Observers: table-change notifications and watched queries.
//!
//! Notifications are delivered after each commit (local, foreign fold, or remote apply) and
//! outside the database lock, so an observer may call back into the replica. Subscriptions
//! and watches are handles that cancel when dropped.

use crate::conflict::Conflict;
use crate::value::Value;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};

/// Where a committed change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    /// Through the SDK on this device.
    Local,
    /// Written by another connection on this file and folded in.
    Foreign,
    /// Received from the relay.
    Remote,
    /// This replica's own change sets, refused by the relay, rolled back.
    Rollback,
    /// Every row was deleted (`Replica::clear`, `Replica::resync`).
    Cleared,
}

/// A committed change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// Synced tables touched.
    pub tables: BTreeSet<String>,
    /// Where it came from.
    pub source: ChangeSource,
}

/// Receives table changes and conflicts.
pub trait Observer: Send + Sync {
    /// Called after a commit that touched synced tables.
    fn on_change(&self, event: &ChangeEvent);
    /// Called for each conflict detected while merging.
    fn on_conflict(&self, _conflict: &Conflict) {}
}

/// Query results.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows of values.
    pub rows: Vec<Vec<Value>>,
}

/// Callback for a watched query.
pub type WatchCallback = Box<dyn Fn(&Rows) + Send + Sync>;

pub(crate) struct Watch {
    pub sql: String,
    pub params: Vec<Value>,
    pub tables: BTreeSet<String>,
    pub last: Mutex<Option<Rows>>,
    pub callback: WatchCallback,
}

#[derive(Default)]
pub(crate) struct Registry {
    next: u64,
    pub observers: HashMap<u64, Arc<dyn Observer>>,
    pub watches: HashMap<u64, Arc<Watch>>,
}

impl Registry {
    pub fn add_observer(&mut self, o: Arc<dyn Observer>) -> u64 {
        self.next += 1;
        self.observers.insert(self.next, o);
        self.next
    }
    pub fn add_watch(&mut self, w: Arc<Watch>) -> u64 {
        self.next += 1;
        self.watches.insert(self.next, w);
        self.next
    }
}

/// Notifications gathered while the replica is locked, delivered once it is released (so an
/// observer may call back into the replica).
#[derive(Default)]
pub(crate) struct Notifications {
    pub events: Vec<ChangeEvent>,
    pub conflicts: Vec<Conflict>,
    pub watch_results: Vec<(Arc<Watch>, Rows)>,
}

impl Notifications {
    /// Forgets what a transaction that was rolled back would have announced.
    pub fn discard(&mut self) {
        self.events.clear();
        self.conflicts.clear();
    }

    /// The tables the gathered events touched.
    pub fn touched(&self) -> BTreeSet<&String> {
        self.events.iter().flat_map(|e| e.tables.iter()).collect()
    }

    /// Delivers everything gathered (after the replica's lock is released).
    pub fn deliver(self, registry: &Mutex<Registry>) {
        if self.events.is_empty() && self.conflicts.is_empty() && self.watch_results.is_empty() {
            return;
        }
        let observers: Vec<Arc<dyn Observer>> =
            registry.lock().observers.values().cloned().collect();
        for o in &observers {
            for e in &self.events {
                o.on_change(e);
            }
            for c in &self.conflicts {
                o.on_conflict(c);
            }
        }
        for (w, rows) in self.watch_results {
            // A watch cancelled meanwhile is no longer in the registry: skip it.
            if registry.lock().watches.values().any(|x| Arc::ptr_eq(x, &w)) {
                (w.callback)(&rows);
            }
        }
    }
}

/// Cancels its subscription or watch when dropped.
#[must_use = "the subscription ends when this handle is dropped"]
pub struct Subscription {
    registry: Weak<Mutex<Registry>>,
    id: u64,
}

impl Subscription {
    pub(crate) fn new(registry: &Arc<Mutex<Registry>>, id: u64) -> Self {
        Subscription {
            registry: Arc::downgrade(registry),
            id,
        }
    }
    /// Cancels now (same as dropping).
    pub fn cancel(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            let mut r = r.lock();
            r.observers.remove(&self.id);
            r.watches.remove(&self.id);
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscription({})", self.id)
    }
}
