//! The app's write transaction: the one type both ways of writing use.
//!
//! [`Replica::write`](crate::Replica::write) hands a closure a `&Transaction` and commits
//! when it returns `Ok`; [`Replica::begin`](crate::Replica::begin) returns one that owns the
//! replica's lock until it is committed or rolled back (dropping it rolls back) — what host
//! languages reached through the FFI need, since they cannot be lent a borrowed transaction.
//! Everything written between begin and commit becomes one change set.
//!
//! While a transaction is open, the thread that opened it gets an
//! [`Error::InvalidInput`] (instead of a deadlock) if it calls the replica directly.

use crate::changeset::Fence;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::hlc::CorrectedClock;
use crate::ids::ChangeId;
use crate::observer::{Notifications, Registry, Rows};
use crate::sqlgate::Prepared;
use crate::value::Value;
use parking_lot::{Mutex, RawMutex, lock_api::ArcMutexGuard};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A small nonzero number naming the current thread (for the same-thread deadlock check).
pub(crate) fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: Cell<u64> = const { Cell::new(0) };
    }
    TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// An open write transaction on a replica (see the module docs).
pub struct Transaction {
    guard: Option<ArcMutexGuard<RawMutex, Option<Engine>>>,
    notes: Notifications,
    registry: Arc<Mutex<Registry>>,
    wall: Arc<CorrectedClock>,
    writer: Arc<AtomicU64>,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("open", &self.guard.is_some())
            .finish()
    }
}

impl Transaction {
    pub(crate) fn new(
        guard: ArcMutexGuard<RawMutex, Option<Engine>>,
        notes: Notifications,
        registry: Arc<Mutex<Registry>>,
        wall: Arc<CorrectedClock>,
        writer: Arc<AtomicU64>,
    ) -> Self {
        Transaction {
            guard: Some(guard),
            notes,
            registry,
            wall,
            writer,
        }
    }

    fn engine(&self) -> Result<&Engine> {
        self.guard
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("the transaction is already finished".into()))?
            .as_ref()
            .ok_or(Error::Closed)
    }

    /// Runs one SQL statement with positional parameters; returns rows changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.engine()?.execute(sql, params)
    }

    /// Runs one statement once per parameter row, prepared once (bulk writes); returns the
    /// rows changed in all.
    pub fn execute_many(&self, sql: &str, rows: &[Vec<Value>]) -> Result<usize> {
        let mut st = self.prepare(sql)?;
        let mut n = 0;
        for params in rows {
            n += st.execute(params)?;
        }
        Ok(n)
    }

    /// Prepares a statement once for many executions (bulk writes), like
    /// `rusqlite::Connection::prepare_cached`.
    pub fn prepare(&self, sql: &str) -> Result<Prepared<'_>> {
        self.engine()?.prepare(sql)
    }

    /// The names of `sql`'s parameters in binding order (see [`crate::Replica::parameter_names`]).
    pub fn parameter_names(&self, sql: &str) -> Result<Vec<Option<String>>> {
        crate::db::parameter_names(&self.engine()?.conn, sql)
    }

    /// Runs a query that sees the transaction's own writes.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.engine()?.query(sql, params)
    }

    /// True until committed or rolled back.
    pub fn is_open(&self) -> bool {
        self.guard.is_some()
    }

    /// Commits: what was written becomes one change set. Fails if already finished.
    pub fn commit(&mut self) -> Result<()> {
        self.finish(true).map(|_| ())
    }

    /// Commits and returns the id of the change set it made (`None` when nothing synced was
    /// written), to ask for the relay's verdict ([`crate::Replica::verdict`],
    /// [`crate::SyncHandle::commit_checked`]).
    pub fn commit_change(&mut self) -> Result<Option<ChangeId>> {
        self.finish(true)
    }

    /// Guards this transaction with a lease grant: its change set carries the fencing token
    /// and the relay refuses it (and the replica rolls it back) unless the grant is still the
    /// lease's current one when it arrives. Call before writing anything.
    pub fn guard(&self, fence: Fence) -> Result<()> {
        self.engine()?.guard_with(fence)
    }

    /// Rolls back everything written. Rolling back a finished transaction does nothing.
    pub fn rollback(&mut self) -> Result<()> {
        if self.guard.is_none() {
            return Ok(());
        }
        self.finish(false).map(|_| ())
    }

    fn finish(&mut self, keep: bool) -> Result<Option<ChangeId>> {
        let Some(mut guard) = self.guard.take() else {
            return Err(Error::InvalidInput(
                "the transaction is already finished".into(),
            ));
        };
        self.writer.store(0, Ordering::Release);
        let mut notes = std::mem::take(&mut self.notes);
        let r = match guard.as_mut() {
            None => Err(Error::Closed),
            Some(engine) => {
                let r = engine.end_write(&*self.wall, &mut notes, keep);
                if r.is_ok() {
                    engine.rerun_watches(&self.registry, &mut notes);
                }
                r
            }
        };
        drop(guard);
        if r.is_ok() {
            notes.deliver(&self.registry);
        }
        r
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.guard.is_some()
            && let Err(e) = self.finish(false)
        {
            tracing::error!(error = %e, "rolling back a dropped transaction failed");
        }
    }
}
