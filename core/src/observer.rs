//! Observers: table-change notifications and watched queries.
//!
//! Notifications are delivered after each commit (local, foreign fold, or remote apply) and
//! outside the database lock, so an observer may call back into the replica. Subscriptions
//! and watches are handles that cancel when dropped.
//!
//! A watch's results are made under the database lock, each with a version, and delivered
//! after it is released: two commits' deliveries (or a commit's and the watch's first run)
//! can race there, so a result older than one already delivered is dropped. The app never
//! sees a stale result after a newer one, and a watch is registered under the same lock its
//! first run reads under, so no commit falls between the two.

use crate::conflict::Conflict;
use crate::value::Value;
use parking_lot::{Mutex, ReentrantMutex};
use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The latest result made (under the database lock).
    last: Mutex<Option<Rows>>,
    /// How many results have been made: the version of the latest.
    made: AtomicU64,
    /// The version last handed to the callback. Held while the callback runs, so one watch's
    /// callbacks never overlap; reentrant, as a callback may commit and so deliver again.
    shown: ReentrantMutex<Cell<u64>>,
    callback: WatchCallback,
}

impl Watch {
    /// A watch whose first result, `rows`, is version 1 (see [`Watch::deliver`]).
    pub fn new(
        sql: &str,
        params: &[Value],
        tables: BTreeSet<String>,
        rows: Rows,
        callback: WatchCallback,
    ) -> Self {
        Watch {
            sql: sql.to_owned(),
            params: params.to_vec(),
            tables,
            last: Mutex::new(Some(rows)),
            made: AtomicU64::new(1),
            shown: ReentrantMutex::new(Cell::new(0)),
            callback,
        }
    }

    /// Records a re-run's `rows` (under the database lock): the version to deliver them with,
    /// or `None` when they equal the latest result.
    pub fn record(&self, rows: &Rows) -> Option<u64> {
        let mut last = self.last.lock();
        if last.as_ref() == Some(rows) {
            return None;
        }
        *last = Some(rows.clone());
        Some(self.made.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Hands `rows` to the callback unless a newer version was handed already.
    pub fn deliver(&self, version: u64, rows: &Rows) {
        let shown = self.shown.lock();
        if version <= shown.get() {
            return;
        }
        shown.set(version);
        (self.callback)(rows);
    }
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
    /// Re-run results: the watch, its rows and their version.
    pub watch_results: Vec<(Arc<Watch>, Rows, u64)>,
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
        for (w, rows, version) in self.watch_results {
            // A watch cancelled meanwhile is no longer in the registry: skip it.
            if registry.lock().watches.values().any(|x| Arc::ptr_eq(x, &w)) {
                w.deliver(version, &rows);
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
