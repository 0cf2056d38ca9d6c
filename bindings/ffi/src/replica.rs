//! The replica object and its write transaction: thin wrappers over `ferry_core::Replica`
//! and `ferry_core::Transaction`, one line of conversion per method.

use crate::error::Result;
use crate::listeners::{
    ChangeListener, Changes, ConflictResolver, Fetched, QueryListener, Resolver, Status,
    SyncStatusListener, TokenFetcher, TokenProvider, Tokens, query_callback,
};
use crate::num::{self, Signed};
use crate::subscription::Subscription;
use crate::sync::{SyncOptions, SyncSession};
use crate::transaction::WriteTransaction;
use crate::types::{
    ConflictRecord, Eviction, QuarantinedChange, QueryResult, Schema, SqlValue, SyncStatus,
};
use ferry_core as core;
use parking_lot::Mutex;
use std::sync::{Arc, Weak};

/// Options for `Replica.open_with`.
#[derive(Debug, Clone, Default, PartialEq, Eq, uniffi::Record)]
pub struct ReplicaOptions {
    /// `read_only` tables this replica is the primary of: it writes them and every other
    /// replica receives them read-only. Its token must be granted `primary` on them, or the
    /// relay refuses the writes (`Unauthorized`).
    #[uniffi(default)]
    pub primary_tables: Vec<String>,
}

/// A local replica: a SQLite file the app reads and writes with plain SQL, offline, and
/// syncs through a relay. `close_database()` releases the file; so does dropping the object
/// (Kotlin's `close()`/`use {}`, Swift's `deinit`, Python's `with`).
#[derive(uniffi::Object)]
pub struct Replica {
    inner: Arc<core::Replica>,
    sessions: Mutex<Vec<Weak<SyncSession>>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Err(e) = self.close_database() {
            tracing::warn!(error = %e, "closing a dropped replica failed");
        }
    }
}

#[uniffi::export]
impl Replica {
    /// Opens (creating if needed) the replica at `path` with the app's schema; creates the
    /// declared tables, adds new columns and runs migrations.
    #[uniffi::constructor]
    pub fn open(path: String, schema: Schema) -> Result<Arc<Self>> {
        Self::open_with(path, schema, ReplicaOptions::default())
    }

    /// `open` with options (for instance: the `read_only` tables this replica is the primary
    /// of).
    #[uniffi::constructor]
    pub fn open_with(path: String, schema: Schema, options: ReplicaOptions) -> Result<Arc<Self>> {
        let opts = core::OpenOptions {
            primary_tables: options.primary_tables,
            ..Default::default()
        };
        let inner = core::Replica::open_with(&path, &schema.try_into()?, opts)?;
        Ok(Arc::new(Replica {
            inner: Arc::new(inner),
            sessions: Mutex::new(Vec::new()),
        }))
    }

    /// Ends every sync session of this replica and closes the file. Later calls fail with
    /// `Closed`. Closing twice does nothing. (Named so as not to clash with the `close()`
    /// the generated Kotlin gives every object.)
    pub fn close_database(&self) -> Result<()> {
        self.disconnect_all();
        Ok(self.inner.close()?)
    }

    /// Logs out: ends this replica's sync sessions, then deletes every row, the unpushed
    /// writes, the conflict log, the quarantine, the subscriptions and the cursor, leaving a
    /// new, empty replica at the same path, ready for another user (who connects again).
    /// Watches re-run on the empty tables; change listeners get a `Cleared` event. Close the
    /// app's own connections to the file first.
    pub fn disconnect_and_clear(&self) -> Result<()> {
        self.disconnect_all();
        Ok(self.inner.clear()?)
    }

    /// Wipes the rows and downloads them again at the next connection (after a checksum
    /// mismatch, `SyncSession.verify()`): ends the sync sessions, clears like
    /// `disconnectAndClear` but keeps the subscriptions. `InvalidInput` while local writes are
    /// not pushed yet (sync them first). Connect again afterwards.
    pub fn resync(&self) -> Result<()> {
        // Refused before the sessions end: a replica with unpushed writes keeps syncing.
        self.inner.ensure_pushed()?;
        self.disconnect_all();
        Ok(self.inner.resync()?)
    }

    /// The replica's sync status, whichever session produces it: the last status any of its
    /// sessions published (`Stopped` once it ended), or, before any, one read from the file
    /// (`hasSynced`, `lastSyncedAtMs`, pending writes).
    pub fn sync_status(&self) -> Result<SyncStatus> {
        Ok((&self.inner.sync_status()?).into())
    }

    /// Calls `listener` with the replica's sync status now and on every change of any of its
    /// sessions — across disconnects, reconnects and `disconnectAndClear` — until the
    /// returned subscription is cancelled or dropped. What a status bar observes.
    pub fn observe_sync_status(
        &self,
        listener: Arc<dyn SyncStatusListener>,
    ) -> Result<Arc<Subscription>> {
        Ok(Subscription::new(
            self.inner.observe_status(Arc::new(Status(listener)))?,
        ))
    }

    /// The file this replica lives in.
    pub fn path(&self) -> String {
        self.inner.path().display().to_string()
    }

    /// This replica's id (a ULID).
    pub fn replica_id(&self) -> Result<String> {
        Ok(self.inner.replica_id()?.to_string())
    }

    /// The app schema version this replica runs.
    pub fn schema_version(&self) -> Result<i32> {
        Ok(i32::try_from(self.inner.schema_version()?).unwrap_or(i32::MAX))
    }

    /// The relay position applied.
    pub fn cursor(&self) -> Result<i64> {
        Ok(self.inner.cursor()?.signed())
    }

    /// When this replica was last completely synced with a relay (ms since the Unix
    /// epoch); `None` before its first complete sync (its rows are not yet the relay's).
    pub fn last_synced_at_ms(&self) -> Result<Option<i64>> {
        Ok(self.inner.last_synced_at()?.map(Signed::signed))
    }

    /// The scope patterns this replica subscribes to; `None` (the default) syncs every scope
    /// the token may read.
    pub fn subscriptions(&self) -> Result<Option<Vec<String>>> {
        Ok(self.inner.subscriptions()?)
    }

    /// Replaces the subscriptions (`None`: every scope the token may read); kept in the file.
    /// A connected session applies them at its next connection (`SyncSession.subscribe` and
    /// friends reconnect at once).
    pub fn set_subscriptions(&self, subscriptions: Option<Vec<String>>) -> Result<()> {
        Ok(self.inner.set_subscriptions(subscriptions)?)
    }

    /// True when this replica holds `scope`'s rows, complete as of its cursor.
    pub fn holds_scope(&self, scope: String) -> Result<bool> {
        Ok(self.inner.holds_scope(&scope)?)
    }

    /// Scopes evicted (newest first, at most `limit`).
    pub fn evictions(&self, limit: i32) -> Result<Vec<Eviction>> {
        let limit = num::unsigned32("limit", limit)? as usize;
        Ok(self
            .inner
            .evictions(limit)?
            .into_iter()
            .map(Eviction::from)
            .collect())
    }

    /// Local change sets not yet acknowledged by the relay.
    pub fn pending_count(&self) -> Result<i64> {
        Ok(self.inner.pending_count()?.signed())
    }

    /// A new ULID, for primary keys.
    pub fn new_id(&self) -> String {
        self.inner.new_id()
    }

    /// The name of each parameter of `sql` in binding order (`:id`, `@id`, `$id` with their
    /// prefix; `None` for `?`), as SQLite parses it: how a host language binds a mapping of
    /// named parameters by position. Prepares without running.
    pub fn parameter_names(&self, sql: String) -> Result<Vec<Option<String>>> {
        Ok(self.inner.parameter_names(&sql)?)
    }

    /// Runs one statement as its own write transaction; returns rows changed.
    pub fn execute(&self, sql: String, params: Vec<SqlValue>) -> Result<i64> {
        Ok(self
            .inner
            .execute(&sql, &crate::types::params(params))?
            .signed())
    }

    /// Runs a read-only query.
    pub fn query(&self, sql: String, params: Vec<SqlValue>) -> Result<QueryResult> {
        Ok(self
            .inner
            .query(&sql, &crate::types::params(params))?
            .into())
    }

    /// `execute` with the parameters as one JSON array (the packed form, for hosts whose
    /// marshalling of value lists is slow: Python's layer uses it).
    pub fn execute_packed(&self, sql: String, params: String) -> Result<i64> {
        Ok(self
            .inner
            .execute(&sql, &crate::packed::params(&params)?)?
            .signed())
    }

    /// `query` with parameters and results in the packed JSON form.
    pub fn query_packed(&self, sql: String, params: String) -> Result<String> {
        crate::packed::rows(&self.inner.query(&sql, &crate::packed::params(&params)?)?)
    }

    /// Opens a write transaction: everything written before `commit()` becomes one change set
    /// (all-or-nothing everywhere). The replica is locked until `commit()` or `rollback()`;
    /// the host layers' `write { }` helpers guarantee one of them.
    pub fn begin_write(&self) -> Result<Arc<WriteTransaction>> {
        Ok(Arc::new(WriteTransaction {
            inner: Mutex::new(self.inner.begin()?),
        }))
    }

    /// Runs `sql` now and after every commit that touches a table it reads, calling
    /// `listener` whenever the results differ. Stops when the subscription ends.
    pub fn watch(
        &self,
        sql: String,
        params: Vec<SqlValue>,
        listener: Arc<dyn QueryListener>,
    ) -> Result<Arc<Subscription>> {
        let sub = self.inner.watch(
            &sql,
            &crate::types::params(params),
            query_callback(listener),
        )?;
        Ok(Subscription::new(sub))
    }

    /// Calls `listener` after every commit to synced tables and for every conflict.
    pub fn subscribe(&self, listener: Arc<dyn ChangeListener>) -> Arc<Subscription> {
        Subscription::new(self.inner.subscribe(Arc::new(Changes(listener))))
    }

    /// Registers the resolver for the `custom` columns of `table`.
    pub fn set_resolver(&self, table: String, resolver: Arc<dyn ConflictResolver>) -> Result<()> {
        Ok(self
            .inner
            .set_resolver(&table, Arc::new(Resolver(resolver)))?)
    }

    /// The conflict log, oldest first.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>> {
        Ok(self
            .inner
            .conflicts()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Clears the conflict log up to and including `up_to_id` (all when None).
    pub fn clear_conflicts(&self, up_to_id: Option<i64>) -> Result<i64> {
        Ok(self.inner.clear_conflicts(up_to_id)?.signed())
    }

    /// Change sets the relay refused for a permanent reason (a scope the token may no longer
    /// write, beyond the relay's limits), set aside so the uploads behind them go on.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedChange>> {
        Ok(self
            .inner
            .quarantined()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Takes quarantined change set `id` back, as a refused compare-and-set write is rolled
    /// back (logged in the conflict log). Fails with `CannotDiscard` when it kept no
    /// before-images (`QuarantinedChange.discardable`).
    pub fn discard_quarantined(&self, id: i64) -> Result<()> {
        Ok(self.inner.discard_quarantined(id)?)
    }

    /// Issues quarantined change set `id` again at the end of the upload queue (after the
    /// cause was fixed, e.g. a token with a wider grant). Returns its new `origin_seq`, or
    /// None when nothing of it was left to push. Fails with `RetryWaits` for one that kept no
    /// before-images while a checked write is pending (retry once it is acknowledged).
    pub fn retry_quarantined(&self, id: i64) -> Result<Option<i64>> {
        Ok(self.inner.retry_quarantined(id)?.map(Signed::signed))
    }

    /// A digest of every synced row (equal on replicas holding the same data).
    pub fn checksum(&self) -> Result<String> {
        Ok(self.inner.checksum()?.hex())
    }

    /// Starts syncing with the relay at `url` (`ws://` or `wss://`). `tokens` is asked for a
    /// token before every connection attempt.
    pub fn connect(
        &self,
        url: String,
        tokens: Arc<dyn TokenProvider>,
        options: Option<SyncOptions>,
    ) -> Result<Arc<SyncSession>> {
        self.start(url, Arc::new(Tokens(tokens)), options)
    }

    /// `connect` with an asynchronous token source (a Kotlin `suspend fun`, a Swift `async`
    /// function, a Python coroutine), awaited before every connection attempt; one that takes
    /// longer than 60 s counts as a failed attempt.
    pub fn connect_fetching(
        &self,
        url: String,
        fetcher: Arc<dyn TokenFetcher>,
        options: Option<SyncOptions>,
    ) -> Result<Arc<SyncSession>> {
        self.start(url, Arc::new(Fetched(fetcher)), options)
    }
}

impl Replica {
    /// Ends every sync session of this replica (each returns once its task has stopped).
    fn disconnect_all(&self) {
        for s in self.sessions.lock().drain(..) {
            if let Some(s) = s.upgrade() {
                s.disconnect();
            }
        }
    }

    fn start(
        &self,
        url: String,
        tokens: Arc<dyn core::TokenProvider>,
        options: Option<SyncOptions>,
    ) -> Result<Arc<SyncSession>> {
        let opts = match options {
            Some(o) => o.try_into()?,
            None => core::SyncOptions::default(),
        };
        let handle = self.inner.connect_with(&url, tokens, opts)?;
        let session = SyncSession::new(handle, Arc::clone(&self.inner));
        let mut sessions = self.sessions.lock();
        sessions.retain(|s| s.strong_count() > 0);
        sessions.push(Arc::downgrade(&session));
        Ok(session)
    }
}

/// A new ULID (sortable, globally unique), for primary keys.
#[uniffi::export]
pub fn new_id() -> String {
    core::new_id()
}

/// Ferry's version.
#[uniffi::export]
pub fn ferry_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

impl Replica {
    /// The core replica (the fast call path's way in).
    pub(crate) fn core(&self) -> &core::Replica {
        &self.inner
    }
}
