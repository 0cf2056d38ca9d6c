//! The replica: one SQLite file the app reads and writes with plain SQL, offline.
//!
//! `Replica` is a façade. The write engine (`engine`) owns the one connection every SDK
//! statement runs on; the replica holds it behind a mutex (SQLite's one-writer rule made
//! explicit), refuses — rather than deadlocks — a thread that calls it while holding its own
//! open [`Transaction`], and delivers notifications to observers and watches after the lock
//! is released, so they may call back in. It never holds a write transaction across anything
//! but local SQLite work. The protocol's side of the replica is the [`SyncPort`] it
//! implements, kept off the inherent API on purpose (see `port`).

use crate::apply::{self, ApplyReport, Followup};
use crate::changeset::{ChangeSet, Sequenced};
use crate::checksum::{self, StateChecksum};
use crate::conflict::{self, Conflict};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::hlc::{CorrectedClock, Hlc, SystemClock, WallClock};
use crate::ids::{ChangeId, ReplicaId};
use crate::log::{self, Verdict};
use crate::observer::{
    ChangeEvent, ChangeSource, Notifications, Observer, Registry, Rows, Subscription, Watch,
    WatchCallback,
};
use crate::port::SyncPort;
use crate::protocol::{ErrorCode, Move};
use crate::quarantine::Quarantined;
use crate::readers::Readers;
use crate::refusal::RefusalAction;
use crate::resolver::{ConflictInput, Resolution, Resolver};
use crate::schema::{Schema, quote};
use crate::transaction::{Transaction, thread_token};
use crate::value::Value;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Options for [`Replica::open_with`].
#[derive(Clone)]
pub struct OpenOptions {
    /// Physical clock (tests use a fake one to simulate skew).
    pub wall_clock: Arc<dyn WallClock>,
    /// Upper bound of cell operations applied in one SQLite transaction (a change set is
    /// never split; a larger one gets a transaction of its own).
    pub apply_chunk_ops: usize,
    /// Id to give the replica if the file is new (default: a fresh ULID). Ignored for an
    /// existing file. Deterministic simulations set it; apps normally leave it.
    pub new_replica_id: Option<ReplicaId>,
    /// `read_only` tables this replica is the primary of: it writes them (through the SDK or
    /// any connection) and pushes the changes; every other replica receives them read-only.
    /// The relay accepts those pushes only from a token granted `primary` on the table.
    pub primary_tables: Vec<String>,
    /// Fault injection for simulations: every SQLite statement of this replica takes one
    /// unit from the counter per few hundred VM steps; once it is spent, statements fail with
    /// an interrupt, as if the process died at that instruction (the open transaction is
    /// never committed). The caller then drops the replica and reopens the file. Apps leave
    /// it `None` (no cost).
    pub crash_countdown: Option<Arc<std::sync::atomic::AtomicI64>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            wall_clock: Arc::new(SystemClock),
            apply_chunk_ops: 20_000,
            new_replica_id: None,
            primary_tables: Vec::new(),
            crash_countdown: None,
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("apply_chunk_ops", &self.apply_chunk_ops)
            .finish()
    }
}

/// A local replica.
pub struct Replica {
    /// Read-only connections for the app's queries (they do not wait for the writer).
    /// Declared first: dropped before the writer, which then removes the WAL file.
    readers: Readers,
    engine: Arc<Mutex<Option<Engine>>>,
    registry: Arc<Mutex<Registry>>,
    resolvers: Mutex<HashMap<String, Arc<dyn Resolver>>>,
    wall: Arc<CorrectedClock>,
    /// Token of the thread holding an open [`Transaction`] (0: none), so that thread gets an
    /// error instead of a deadlock when it calls the replica directly.
    writer: Arc<AtomicU64>,
    apply_chunk_ops: usize,
    path: PathBuf,
    /// What [`Replica::clear`] opens the new file with.
    schema: Schema,
    primary_tables: Vec<String>,
    /// Sync sessions running on this replica (a [`Replica::clear`] waits for none).
    pub(crate) live_sessions: Arc<AtomicUsize>,
    /// The sync status across sessions.
    #[cfg(feature = "client")]
    pub(crate) board: crate::status_board::StatusBoard,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("path", &self.path).finish()
    }
}

impl Replica {
    /// Opens (creating if needed) the replica at `path` with the app's declared schema.
    pub fn open(path: impl AsRef<Path>, schema: &Schema) -> Result<Replica> {
        Self::open_with(path, schema, OpenOptions::default())
    }

    /// Opens with explicit options.
    pub fn open_with(
        path: impl AsRef<Path>,
        schema: &Schema,
        opts: OpenOptions,
    ) -> Result<Replica> {
        let path = path.as_ref().to_path_buf();
        let engine = Engine::open(
            &path,
            schema,
            EngineOptions {
                primary_tables: &opts.primary_tables,
                new_replica_id: opts.new_replica_id,
                crash_countdown: opts.crash_countdown.clone(),
            },
        )?;
        tracing::debug!(path = %path.display(), replica = %engine.me, cursor = engine.cursor, "replica opened");
        Ok(Replica {
            readers: Readers::new(&path, Arc::clone(&engine.cat)),
            engine: Arc::new(Mutex::new(Some(engine))),
            registry: Arc::new(Mutex::new(Registry::default())),
            resolvers: Mutex::new(HashMap::new()),
            wall: Arc::new(CorrectedClock::new(opts.wall_clock)),
            writer: Arc::new(AtomicU64::new(0)),
            apply_chunk_ops: opts.apply_chunk_ops.max(1),
            path,
            schema: schema.clone(),
            primary_tables: opts.primary_tables,
            live_sessions: Arc::new(AtomicUsize::new(0)),
            #[cfg(feature = "client")]
            board: crate::status_board::StatusBoard::default(),
        })
    }

    /// Deletes the replica's data and starts it over as a new, empty replica at the same path
    /// (a user logging out, or `resync`): every row of every table, the change log with local
    /// writes not yet pushed, the conflict log, the quarantine, the subscriptions, the cursor;
    /// the next connection gets a new replica id and a first sync. Watches re-run (on empty
    /// tables) and observers get a [`ChangeSource::Cleared`] event; resolvers stay registered.
    ///
    /// Fails with `InvalidInput` while a sync session runs (disconnect it first). Close the
    /// app's own connections to the file first: one left open keeps reading the deleted file.
    pub fn clear(&self) -> Result<()> {
        if self.live_sessions.load(Ordering::Acquire) > 0 {
            return Err(Error::InvalidInput(
                "a sync session is running on this replica: disconnect it before clearing".into(),
            ));
        }
        let notes = {
            let mut g = self.lock()?;
            let old = g.take().ok_or(Error::Closed)?;
            self.readers.close();
            old.close()?;
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::CannotOpen(format!("removing {p:?}: {e}"))),
                }
            }
            let engine = Engine::open(
                &self.path,
                &self.schema,
                EngineOptions {
                    primary_tables: &self.primary_tables,
                    new_replica_id: None,
                    crash_countdown: None,
                },
            )?;
            self.readers.reopen(Arc::clone(&engine.cat));
            let mut notes = Notifications::default();
            notes.events.push(ChangeEvent {
                tables: engine.cat.tables.keys().cloned().collect(),
                source: ChangeSource::Cleared,
            });
            engine.rerun_watches(&self.registry, &mut notes);
            tracing::info!(path = %self.path.display(), replica = %engine.me, "replica cleared");
            *g = Some(engine);
            notes
        };
        notes.deliver(&self.registry);
        #[cfg(feature = "client")]
        self.restart_status()?;
        Ok(())
    }

    /// Wipes the replica's rows and downloads them again at the next connection (after a
    /// checksum mismatch, say): [`Replica::clear`], keeping the subscriptions. Refuses with
    /// `InvalidInput` while local writes are not yet pushed (sync them first; `clear` drops
    /// them) and while a sync session runs.
    pub fn resync(&self) -> Result<()> {
        self.ensure_pushed()?;
        let subscriptions = self.subscriptions()?;
        self.clear()?;
        self.set_subscriptions(subscriptions)
    }

    /// `InvalidInput` while local change sets are not pushed yet (what [`Replica::resync`]
    /// refuses on; a caller that must stop its sessions first asks this before).
    pub fn ensure_pushed(&self) -> Result<()> {
        match self.pending_count()? {
            0 => Ok(()),
            pending => Err(Error::InvalidInput(format!(
                "{pending} local change sets are not pushed yet: sync them first (clearing would drop them)"
            ))),
        }
    }

    /// Closes the replica; later calls fail with [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let mut g = self.lock()?;
        // Readers first: the writer, closing last, checkpoints and removes the WAL file.
        self.readers.close();
        match g.take() {
            Some(engine) => engine.close(),
            None => Ok(()),
        }
    }

    /// The file this replica lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_engine<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        let mut g = self.lock()?;
        let engine = g.as_mut().ok_or(Error::Closed)?;
        f(engine)
    }

    /// Runs `f` under the lock with a place for notifications; re-runs the watches its
    /// changes touch, and delivers everything once the lock is released.
    fn notifying<T>(
        &self,
        f: impl FnOnce(&mut Engine, &mut Notifications) -> Result<T>,
    ) -> Result<T> {
        let (out, notes) = {
            let mut g = self.lock()?;
            let engine = g.as_mut().ok_or(Error::Closed)?;
            let mut notes = Notifications::default();
            let out = f(engine, &mut notes);
            engine.rerun_watches(&self.registry, &mut notes);
            (out, notes)
        };
        notes.deliver(&self.registry);
        out
    }

    /// Locks the engine, refusing (rather than deadlocking) when this thread already holds
    /// it through an open [`Transaction`].
    fn lock(&self) -> Result<parking_lot::MutexGuard<'_, Option<Engine>>> {
        self.not_writer()?;
        Ok(self.engine.lock())
    }

    /// Fails when this thread holds an open [`Transaction`] on this replica (locking again
    /// would deadlock).
    fn not_writer(&self) -> Result<()> {
        if self.writer.load(Ordering::Acquire) == thread_token() {
            return Err(Error::InvalidInput(
                "this thread holds an open write transaction on this replica: use the transaction, \
                 or commit or roll it back first"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Opens a write transaction that lives until [`Transaction::commit`] or
    /// [`Transaction::rollback`] (dropping it rolls back). [`Replica::write`] is the same
    /// with a closure; the replica is locked meanwhile, so finish it promptly.
    pub fn begin(&self) -> Result<Transaction> {
        self.not_writer()?;
        let mut g = Mutex::lock_arc(&self.engine);
        let engine = g.as_mut().ok_or(Error::Closed)?;
        let mut notes = Notifications::default();
        engine.begin_write(&*self.wall, &mut notes)?;
        self.writer.store(thread_token(), Ordering::Release);
        Ok(Transaction::new(
            g,
            notes,
            Arc::clone(&self.registry),
            Arc::clone(&self.wall),
            Arc::clone(&self.writer),
        ))
    }

    /// Runs `f` in one write transaction. Everything it changes in synced tables becomes one
    /// change set; if it returns an error nothing is kept.
    pub fn write<T>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let mut tx = self.begin()?;
        match f(&tx) {
            Ok(v) => {
                tx.commit()?;
                Ok(v)
            }
            Err(e) => {
                tx.rollback()?;
                Err(e)
            }
        }
    }

    /// Runs one statement as its own write transaction; returns rows changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.write(|tx| tx.execute(sql, params))
    }

    /// Runs a read-only query on one of the replica's read connections: it sees every commit
    /// made before it starts and does not wait for a write or a remote apply in progress.
    /// Inside a write transaction, query through the transaction (it sees its own writes).
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.not_writer()?;
        self.readers.query(sql, params)
    }

    /// The name of each parameter of `sql` in binding order (`:id`, `@id`, `$id` with their
    /// prefix; `None` for `?`), as SQLite parses it, so a host language can bind a mapping by
    /// position. Prepares the statement without running it.
    pub fn parameter_names(&self, sql: &str) -> Result<Vec<Option<String>>> {
        self.with_engine(|e| crate::db::parameter_names(&e.conn, sql))
    }

    /// This replica's id.
    pub fn replica_id(&self) -> Result<ReplicaId> {
        self.with_engine(|e| Ok(e.me))
    }

    /// The highest relay position applied with everything before it.
    pub fn cursor(&self) -> Result<u64> {
        self.with_engine(|e| Ok(e.cursor))
    }

    /// When this replica was last caught up with a relay (milliseconds since the Unix
    /// epoch): nothing pending and everything the relay had applied. `None` until the first
    /// complete sync — the replica's rows are then not yet the relay's.
    pub fn last_synced_at(&self) -> Result<Option<u64>> {
        self.with_engine(|e| {
            Ok(crate::db::meta_opt::<i64>(&e.conn, "last_synced_at")?.map(|v| v.max(0) as u64))
        })
    }

    /// The scope patterns this replica subscribes to; `None` (the default) syncs every scope
    /// its token may read. Kept in the file.
    pub fn subscriptions(&self) -> Result<Option<Vec<String>>> {
        self.with_engine(|e| crate::holding::subscriptions(&e.conn))
    }

    /// Replaces the subscriptions (`None`: every scope the token may read). Each is a scope
    /// name or a pattern with `*` (`project:42`, `project:*`). A connected
    /// [`SyncHandle`](crate::SyncHandle) reconnects to apply them: scopes newly subscribed
    /// are back-filled by a snapshot; rows of scopes dropped are evicted once this replica's
    /// pending writes are pushed (see [`Replica::evictions`]).
    pub fn set_subscriptions(&self, subscriptions: Option<Vec<String>>) -> Result<()> {
        self.with_engine(|e| crate::holding::set_subscriptions(&e.conn, subscriptions.as_deref()))
    }

    /// Adds `scope` to the subscriptions. When the replica synced every permitted scope,
    /// it now syncs `scope` alone (and the others it subscribes to later).
    pub fn subscribe_scope(&self, scope: &str) -> Result<()> {
        self.with_engine(|e| {
            let mut subs = crate::holding::subscriptions(&e.conn)?.unwrap_or_default();
            subs.push(scope.to_owned());
            crate::holding::set_subscriptions(&e.conn, Some(&subs))
        })
    }

    /// Removes `scope` from the subscriptions. A replica that syncs every permitted scope
    /// (no subscriptions) has nothing to remove it from: that is an
    /// [`Error::InvalidInput`]; subscribe to what it should keep instead.
    pub fn unsubscribe_scope(&self, scope: &str) -> Result<()> {
        self.with_engine(|e| {
            let Some(mut subs) = crate::holding::subscriptions(&e.conn)? else {
                return Err(Error::InvalidInput(format!(
                    "cannot unsubscribe from `{scope}`: this replica syncs every scope its token may read (no subscriptions); subscribe to the scopes to keep instead"
                )));
            };
            let before = subs.len();
            subs.retain(|s| s != scope);
            if subs.len() == before {
                return Err(Error::InvalidInput(format!(
                    "cannot unsubscribe from `{scope}`: not subscribed (subscriptions: {})",
                    subs.join(", ")
                )));
            }
            crate::holding::set_subscriptions(&e.conn, Some(&subs))
        })
    }

    /// True when this replica holds `scope`'s rows, complete as of its cursor: the relay
    /// announced it (token and subscriptions allow it) and its back-fill, if it needed one,
    /// was applied and caught up with. Before a first sync, or for a scope it may not read or
    /// did not subscribe to, false.
    pub fn holds_scope(&self, scope: &str) -> Result<bool> {
        self.with_engine(|e| crate::holding::holds(&e.conn, scope, e.cursor))
    }

    /// Rows evicted because their scope was no longer held (the token lost it, or the app
    /// unsubscribed), newest first, at most `limit`.
    pub fn evictions(&self, limit: usize) -> Result<Vec<crate::Eviction>> {
        self.with_engine(|e| crate::holding::evictions(&e.conn, limit))
    }

    /// Records a complete sync at `at_ms` (see [`Replica::last_synced_at`]).
    #[cfg(feature = "client")]
    pub(crate) fn note_synced(&self, at_ms: u64) -> Result<()> {
        self.with_engine(|e| crate::db::meta_set(&e.conn, "last_synced_at", at_ms as i64))
    }

    /// The app schema version this replica runs.
    pub fn schema_version(&self) -> Result<u32> {
        self.with_engine(|e| Ok(e.schema_version))
    }

    /// The latest HLC issued or seen.
    pub fn clock(&self) -> Result<Hlc> {
        self.with_engine(|e| Ok(e.clock.last()))
    }

    /// A new ULID, for primary keys.
    pub fn new_id(&self) -> String {
        crate::ids::new_id()
    }

    /// Folds writes made by other connections on this file into change sets now.
    /// (Ferry also does this before every write, push and apply.) Returns true if any.
    pub fn capture_foreign(&self) -> Result<bool> {
        let wall = Arc::clone(&self.wall);
        self.notifying(|engine, notes| {
            // Only take the write lock when another connection left something to fold.
            if !engine.foreign_waiting()? {
                return Ok(false);
            }
            engine.in_txn(|e| {
                e.sdk_writes(true)?;
                let any = e.fold_foreign(&*wall, notes)?;
                e.sdk_writes(false)?;
                Ok(any)
            })
        })
    }

    /// Number of change sets not yet acknowledged by the relay (writes of other
    /// connections not folded yet count as one).
    pub fn pending_count(&self) -> Result<u64> {
        self.with_engine(|e| {
            let foreign = e.foreign_waiting()?;
            Ok(log::unacked_count(&e.conn)? + u64::from(foreign))
        })
    }

    /// The relay's verdict on a change set this replica made.
    pub fn verdict(&self, id: &ChangeId) -> Result<Verdict> {
        self.with_engine(|e| log::verdict(&e.conn, &id.0))
    }

    /// Registers the resolver for `custom` columns of `table`.
    pub fn set_resolver(&self, table: &str, resolver: Arc<dyn Resolver>) -> Result<()> {
        self.with_engine(|e| match e.cat.get(table) {
            Some(_) => Ok(()),
            None => Err(Error::InvalidInput(format!(
                "no resolver for `{table}`: it is not a synced table of this schema"
            ))),
        })?;
        self.resolvers.lock().insert(table.to_owned(), resolver);
        Ok(())
    }

    /// The conflict log, oldest first.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        self.with_engine(|e| conflict::list(&e.conn))
    }

    /// Clears the conflict log up to and including `up_to_id` (everything when None).
    pub fn clear_conflicts(&self, up_to_id: Option<i64>) -> Result<usize> {
        self.with_engine(|e| conflict::clear(&e.conn, up_to_id))
    }

    /// Change sets the relay refused for a permanent reason and that were set aside so the
    /// uploads behind them go on, oldest first (see [`Quarantined`]). Each waits for
    /// [`Replica::discard_quarantined`] or [`Replica::retry_quarantined`].
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        self.with_engine(|e| crate::quarantine::list(&e.conn))
    }

    /// Takes quarantined change set `id` back, exactly as a refused compare-and-set write is
    /// rolled back (each withdrawn cell written to the conflict log); observers and watches
    /// are told. Fails with [`Error::CannotDiscard`] when it kept no before-images (see
    /// [`Quarantined::discardable`]), [`Error::NotQuarantined`] for an unknown id.
    pub fn discard_quarantined(&self, id: i64) -> Result<()> {
        self.notifying(|engine, notes| engine.in_txn(|e| e.discard_quarantined(id, notes)))
    }

    /// Issues quarantined change set `id` again, at the end of the upload queue with a fresh
    /// clock, with the cells nothing has overwritten since (after the cause was fixed, e.g.
    /// a token with a wider grant). Returns its new `origin_seq`, or `None` when nothing of
    /// it was left to push. Fails with [`Error::RetryWaits`] for one that kept no
    /// before-images while a checked write is pending (retry once it is acknowledged).
    pub fn retry_quarantined(&self, id: i64) -> Result<Option<u64>> {
        let wall = Arc::clone(&self.wall);
        self.with_engine(|e| e.in_txn(|e| e.retry_quarantined(id, &*wall)))
    }

    /// Subscribes to table changes and conflicts until the handle is dropped.
    pub fn subscribe(&self, observer: Arc<dyn Observer>) -> Subscription {
        let id = self.registry.lock().add_observer(observer);
        Subscription::new(&self.registry, id)
    }

    /// Runs `sql` now and again after every commit that touches a table it reads, calling
    /// `callback` with the results whenever they differ from the last ones.
    pub fn watch(
        &self,
        sql: &str,
        params: &[Value],
        callback: WatchCallback,
    ) -> Result<Subscription> {
        // Registered under the lock the first run reads under: a commit is either in the
        // first result or re-runs the watch (see `observer`).
        let (w, rows, id) = self.with_engine(|e| {
            let tables = e.tables_read(sql)?;
            let rows = e.query(sql, params)?;
            let w = Arc::new(Watch::new(sql, params, tables, rows.clone(), callback));
            let id = self.registry.lock().add_watch(Arc::clone(&w));
            Ok((w, rows, id))
        })?;
        w.deliver(1, &rows);
        Ok(Subscription::new(&self.registry, id))
    }

    /// Every synced table's rows, sorted by key: what convergence tests compare.
    pub fn dump(&self) -> Result<Vec<(String, Rows)>> {
        self.with_engine(|e| {
            let mut names: Vec<&String> = e.cat.tables.keys().collect();
            names.sort();
            let mut out = Vec::new();
            for n in names {
                let t = e.cat.table(n)?;
                let sql = format!(
                    "SELECT {} FROM {} ORDER BY {}",
                    t.select_list(),
                    quote(n),
                    quote(&t.cols[t.pk].name)
                );
                let mut st = e.conn.prepare(&sql)?;
                let columns = t.cols.iter().map(|c| c.name.clone()).collect();
                let k = t.cols.len();
                let rows = st
                    .query_map([], |r| {
                        (0..k)
                            .map(|i| r.get::<_, Value>(i))
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                out.push((n.clone(), Rows { columns, rows }));
            }
            Ok(out)
        })
    }

    /// Checksum of every synced row this replica holds (see [`crate::checksum`]). Compare
    /// it with the relay's only when nothing is pending and the cursor equals the relay's
    /// position.
    pub fn checksum(&self) -> Result<StateChecksum> {
        self.checksum_where(&|_, _| true)
    }

    /// Checksum of the rows whose scope passes `keep(table, scope)`.
    pub fn checksum_where(&self, keep: &dyn Fn(&str, &str) -> bool) -> Result<StateChecksum> {
        self.with_engine(|e| checksum::compute(&e.conn, &e.cat, keep))
    }

    /// Hands the app's resolvers the custom-column conflicts an apply left (after it
    /// committed); an answer other than the merged value becomes a new local write.
    fn resolve_followups(&self, followups: Vec<Followup>) -> Result<()> {
        for f in followups {
            let resolver = self.resolvers.lock().get(&f.table).cloned();
            let Some(resolver) = resolver else {
                tracing::warn!(table = %f.table, column = %f.column, "custom conflict without a registered resolver; lww result kept");
                self.with_engine(|e| {
                    conflict::set_resolution(
                        &e.conn,
                        f.conflict_id,
                        "no resolver registered: lww result kept",
                    )
                })?;
                continue;
            };
            let (merged, pk_col) = self.with_engine(|e| {
                let t = e.cat.table(&f.table)?;
                let i = t.col(&f.column)?;
                let row = crate::rows::read_row(&e.conn, t, &f.pk)?;
                Ok((row.map(|mut v| v.swap_remove(i)), t.cols[t.pk].name.clone()))
            })?;
            let Some(merged) = merged else { continue };
            let input = ConflictInput {
                table: f.table.clone(),
                pk: f.pk.clone(),
                column: f.column.clone(),
                local: f.local.clone(),
                remote: f.remote.clone(),
                merged: merged.clone(),
            };
            let answer = match resolver.resolve(&input) {
                Resolution::KeepLocal => f.local.clone(),
                Resolution::TakeRemote => f.remote.clone(),
                Resolution::Value(v) => v,
            };
            let note = format!("resolver answered {}", answer.describe());
            self.with_engine(|e| conflict::set_resolution(&e.conn, f.conflict_id, &note))?;
            // Built-in merge already made every replica pick `merged`; only a different answer
            // needs writing. It becomes a new local change, newer than both sides.
            if answer != merged {
                self.write(|tx| {
                    tx.execute(
                        &format!(
                            "UPDATE {} SET {} = ?1 WHERE {} = ?2",
                            quote(&f.table),
                            quote(&f.column),
                            quote(&pk_col)
                        ),
                        &[answer.clone(), f.pk.clone()],
                    )
                })?;
            }
        }
        Ok(())
    }
}

impl SyncPort for Replica {
    fn replica_id(&self) -> Result<ReplicaId> {
        Replica::replica_id(self)
    }

    fn cursor(&self) -> Result<u64> {
        Replica::cursor(self)
    }

    fn schema_version(&self) -> Result<u32> {
        Replica::schema_version(self)
    }

    fn last_origin_seq(&self) -> Result<u64> {
        self.with_engine(|e| Ok(e.last_origin_seq()))
    }

    fn pending_count(&self) -> Result<u64> {
        Replica::pending_count(self)
    }

    fn prepare_push_after(
        &self,
        origin_seq: u64,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeSet>> {
        self.capture_foreign()?;
        self.with_engine(|e| {
            e.materialize_all()?;
            log::unacked(&e.conn, origin_seq, max_sets, max_bytes)
        })
    }

    fn acknowledge(&self, acks: &[(u64, u64)]) -> Result<()> {
        self.with_engine(|e| {
            e.in_txn(|e| acks.iter().try_for_each(|(o, s)| e.acknowledge(*o, *s)))?;
            // Bodies the relay now holds freed pages: give them back while the push goes on.
            crate::db::reclaim_space(&e.conn, 4096).map(|_| ())
        })
    }

    /// Each change set is all-or-nothing and the cursor moves in the same transaction; sets
    /// at or below the cursor are skipped, so a repeated delivery changes nothing.
    fn apply_changes(
        &self,
        after: u64,
        up_to: u64,
        sets: &[Sequenced],
        moves: &[Move],
    ) -> Result<ApplyReport> {
        apply::check_batch(after, up_to, sets, moves)?;
        let mut report = ApplyReport::default();
        let mut followups = Vec::new();
        let applied = apply::in_chunks(sets, moves, up_to, self.apply_chunk_ops, |chunk| {
            self.notifying(|engine, notes| {
                if after > engine.cursor {
                    return Err(Error::InvalidChangeSet(format!(
                        "batch starts after relay position {after} but this replica has only applied up to {}",
                        engine.cursor
                    )));
                }
                let (done, failure) = engine.apply_chunk(&*self.wall, &chunk, &mut report, notes);
                followups.extend(done);
                failure.map_or(Ok(()), Err)
            })
        });
        report.cursor = self.cursor()?;
        self.resolve_followups(followups)?;
        applied.map(|()| report)
    }

    fn apply_snapshot(
        &self,
        rows: Vec<crate::snapshot::SnapshotRow>,
        resume: &[u8],
        replace: bool,
        end: Option<crate::port::SnapshotEnd>,
    ) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.notifying(|engine, notes| {
            let page = crate::apply::SnapshotPage {
                rows,
                resume,
                replace,
                end,
            };
            engine.apply_snapshot(&*self.wall, page, &mut report, notes)
        })?;
        Ok(report)
    }

    fn subscriptions(&self) -> Result<Option<Vec<String>>> {
        Replica::subscriptions(self)
    }

    fn held_scopes(&self) -> Result<Option<crate::scope::HeldScopes>> {
        self.with_engine(|e| crate::holding::for_hello(&e.conn, e.cursor))
    }

    fn scopes_announced(&self, scopes: &crate::scope::ScopeSet, snapshot: bool) -> Result<()> {
        let pending = self.pending_count()?;
        self.with_engine(|e| {
            crate::holding::announced(&e.conn, scopes, snapshot, e.cursor, pending)
        })
    }

    fn settle_scopes(&self, refused: bool) -> Result<u64> {
        if self
            .with_engine(|e| crate::holding::evict_target(&e.conn))?
            .is_none()
        {
            return Ok(0);
        }
        let pending = if refused { 0 } else { self.pending_count()? };
        let evicted =
            self.notifying(|engine, notes| engine.settle_scopes(&*self.wall, pending, notes))?;
        Ok(evicted.iter().map(|e| e.rows).sum())
    }

    fn snapshot_resume(&self) -> Result<Option<Vec<u8>>> {
        self.with_engine(|e| crate::db::meta_opt(&e.conn, "snapshot_resume"))
    }

    fn handle_refusal(
        &self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<RefusalAction> {
        self.notifying(|engine, notes| {
            engine.in_txn(|e| e.handle_refusal(origin_seq, code, message, notes))
        })
    }

    fn quarantine(
        &self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<crate::quarantine::SetAside> {
        let wall = Arc::clone(&self.wall);
        self.with_engine(|e| e.in_txn(|e| e.quarantine(origin_seq, code, message, &*wall)))
    }

    fn quarantined_count(&self) -> Result<u64> {
        self.with_engine(|e| crate::quarantine::count(&e.conn))
    }

    fn learn_limits(&self, limits: &crate::protocol::Limits) -> Result<()> {
        self.with_engine(|e| e.learn_limits(limits))
    }

    fn rebase(&self, origin_seq: u64) -> Result<bool> {
        let wall = Arc::clone(&self.wall);
        self.with_engine(|e| e.in_txn(|e| e.rebase(origin_seq, &*wall)))
    }

    fn restamp(&self, origin_seq: u64) -> Result<usize> {
        let wall = Arc::clone(&self.wall);
        self.with_engine(|e| e.in_txn(|e| e.restamp(origin_seq, &*wall)))
    }

    fn rotate_identity(&self) -> Result<ReplicaId> {
        self.with_engine(|e| e.rotate_identity())
    }

    /// New change sets are stamped no further ahead of the relay's clock than a second, and
    /// the HLC moves past it.
    fn learn_relay_clock(&self, relay_ms: u64) -> Result<u64> {
        let ahead = self.wall.learn(relay_ms);
        if ahead > 0 {
            tracing::warn!(
                ahead_ms = ahead,
                "device clock is ahead of the relay's; stamping with the relay's time"
            );
        }
        self.with_engine(|e| {
            e.clock.observe(Hlc::new(relay_ms, 0));
            Ok(())
        })?;
        Ok(ahead)
    }
}
