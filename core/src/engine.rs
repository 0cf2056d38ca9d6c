//! The write engine: the replica's one connection and the state mirrored from it.
//!
//! Every SDK statement runs on this connection, under the replica's mutex, which is SQLite's
//! own one-writer rule made explicit. The engine opens the file (pragmas, format, schema),
//! runs write transactions with capture on, records their change sets in the change log,
//! folds other connections' writes, and keeps in memory what it would otherwise re-read on
//! every write (cursor, next `origin_seq`, clock, whether a guarded change set is pending).
//! Those mirrors are reloaded whenever a transaction is rolled back, so they never disagree
//! with the file.
//!
//! Every transaction goes through [`Engine::in_txn`] (commit on success, roll back and
//! reload on failure), except the app's own write transaction, which stays open across the
//! app's statements ([`Engine::begin_write`] / [`Engine::end_write`]).

use crate::capture::{self, Accumulator, HookState, LocalChange};
use crate::changeset::Fence;
use crate::db;
use crate::error::{Error, Result};
use crate::hlc::{Hlc, HlcState, WallClock};
use crate::ids::{ChangeId, ReplicaId};
use crate::log;
use crate::observer::{ChangeEvent, ChangeSource, Notifications, Registry, Rows, Watch};
use crate::rows::Origins;
use crate::schema::{Schema, TableMode};
use crate::sqlgate::{Prepared, SqlGate};
use crate::tables::Tables;
use crate::value::Value;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The replica's connection and its in-memory mirrors (see the module docs).
pub(crate) struct Engine {
    pub(crate) conn: Connection,
    hook: Arc<Mutex<HookState>>,
    gate: SqlGate,
    pub(crate) cat: Arc<Tables>,
    pub(crate) schema_version: u32,
    /// This replica's id and its number among the interned origins.
    pub(crate) me: ReplicaId,
    pub(crate) me_num: u32,
    pub(crate) origins: Origins,
    pub(crate) clock: HlcState,
    /// The highest relay position applied with everything before it.
    pub(crate) cursor: u64,
    pub(crate) next_oseq: u64,
    /// `PRAGMA schema_version` when the trigger mode was last decided.
    schema_cookie: i64,
    /// Whether SQLite runs triggers on this connection (see `sync_trigger_mode`).
    triggers_on: bool,
    /// The schema has `server_checked` tables (before-images are kept for every write).
    has_server_checked: bool,
    /// A guarded change set is pending (see `rollback`).
    pub(crate) guard_pending: bool,
    /// The largest HLC of any change set received from the relay (see `refusal`).
    pub(crate) remote_hlc: Hlc,
    /// While a snapshot is being applied: the page cache size to return to when it is done
    /// (see `apply_snapshot`).
    pub(crate) bulk_cache: Option<i64>,
    /// The relay's limits as last announced, `(max_change_set_ops, max_frame_bytes)`: a
    /// transaction beyond them is refused at commit (it could never be uploaded).
    relay_limits: Option<(u64, u64)>,
}

/// The schema as this replica sees it: the `read_only` tables it is the primary of are
/// writable here. (The declaration stored in the file follows, so reopening without the
/// option makes them read-only again.)
fn primary_view(schema: &Schema, primary: &[String]) -> Result<Schema> {
    let mut view = schema.clone();
    for name in primary {
        let t = view
            .tables
            .iter_mut()
            .find(|t| &t.name == name)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "primary table `{name}` is not declared in the schema"
                ))
            })?;
        if t.mode != TableMode::ReadOnly {
            return Err(Error::InvalidInput(format!(
                "primary table `{name}` is not read_only: only read_only tables have a primary"
            )));
        }
        t.mode = TableMode::MultiWriter;
    }
    Ok(view)
}

fn origin_num(conn: &Connection, id: ReplicaId) -> Result<u32> {
    conn.query_row(
        "SELECT id FROM ferry_origins WHERE replica_id = ?1",
        [id.0.to_vec()],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .map(|n| n as u32)
    .ok_or_else(|| Error::Corrupt("the replica's own id is not among its origins".into()))
}

/// What [`Engine::open`] needs besides the file and the schema.
pub(crate) struct EngineOptions<'a> {
    pub primary_tables: &'a [String],
    pub new_replica_id: Option<ReplicaId>,
    pub crash_countdown: Option<Arc<AtomicI64>>,
}

impl Engine {
    /// Opens (creating if needed) the replica file: pragmas, Ferry's format, the app's
    /// schema and migrations, capture hook and SQL gate.
    pub(crate) fn open(path: &Path, schema: &Schema, opts: EngineOptions<'_>) -> Result<Engine> {
        let schema = &primary_view(schema, opts.primary_tables)?;
        let mut conn = Connection::open(path)?;
        if let Some(countdown) = opts.crash_countdown {
            conn.progress_handler(
                16,
                Some(move || countdown.fetch_sub(1, Ordering::SeqCst) <= 0),
            )?;
        }
        db::configure(&conn)?;
        db::upgrade_format(&mut conn, opts.new_replica_id)?;
        let cat = Arc::new(db::apply_schema(&mut conn, schema)?);
        let me = db::stored_replica_id(&conn)?;
        let origins = Origins::load(&conn)?;
        let me_num = origin_num(&conn, me)?;
        let cursor = db::meta_get::<i64>(&conn, "cursor")? as u64;
        let stored_hlc = Hlc(db::meta_get::<i64>(&conn, "hlc")? as u64);
        let log_hlc = log::max_hlc(&conn)?;
        let next_oseq = log::next_origin_seq(&conn, me_num)?;
        let remote_hlc: i64 = conn.query_row(
            "SELECT coalesce((SELECT value FROM ferry_meta WHERE key = 'remote_hlc'), 0)",
            [],
            |r| r.get(0),
        )?;
        let hook = Arc::new(Mutex::new(HookState {
            enabled: false,
            catalog: Arc::clone(&cat),
            acc: Accumulator::default(),
            stmt_cols: None,
        }));
        capture::install_hook(&mut conn, Arc::clone(&hook))?;
        let gate = SqlGate::install(&mut conn, &cat)?;
        let has_server_checked = cat
            .tables
            .values()
            .any(|t| t.mode() == TableMode::ServerChecked);
        let guard_pending = log::guard_pending(&conn)?;
        let mut engine = Engine {
            conn,
            hook,
            gate,
            cat,
            schema_version: schema.version,
            me,
            me_num,
            origins,
            clock: HlcState::resume(stored_hlc.max(log_hlc)),
            cursor,
            next_oseq,
            schema_cookie: -1,
            triggers_on: true,
            has_server_checked,
            guard_pending,
            remote_hlc: Hlc(remote_hlc as u64),
            bulk_cache: None,
            relay_limits: None,
        };
        engine.relay_limits = match (
            db::meta_opt::<i64>(&engine.conn, "relay_max_ops")?,
            db::meta_opt::<i64>(&engine.conn, "relay_max_frame_bytes")?,
        ) {
            (Some(ops), Some(bytes)) => Some((ops as u64, bytes as u64)),
            _ => None,
        };
        engine.sync_trigger_mode()?;
        Ok(engine)
    }

    /// Closes the connection.
    pub(crate) fn close(self) -> Result<()> {
        self.conn.close().map_err(|(_, e)| Error::Sqlite(e))
    }

    /// Highest `origin_seq` issued under the current id.
    pub(crate) fn last_origin_seq(&self) -> u64 {
        self.next_oseq - 1
    }

    /// Runs `f` in one IMMEDIATE transaction: committed when it succeeds, rolled back (and
    /// the in-memory mirrors reloaded) when it fails.
    pub(crate) fn in_txn<T>(&mut self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = f(self);
        self.finish_txn(r)
    }

    /// Commits on success, rolls back (and resets in-memory state) on failure.
    fn finish_txn<T>(&mut self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    self.rollback();
                    Err(e.into())
                }
            },
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "rollback failed");
        }
        {
            let mut h = self.hook.lock();
            h.enabled = false;
            h.acc.clear();
        }
        // In-memory mirrors of what the transaction may have changed.
        if let Ok(o) = Origins::load(&self.conn) {
            self.origins = o;
        }
        if let Ok(c) = db::meta_get::<i64>(&self.conn, "cursor") {
            self.cursor = c as u64;
        }
        if let Ok(n) = log::next_origin_seq(&self.conn, self.me_num) {
            self.next_oseq = n;
        }
        if let Ok(g) = log::guard_pending(&self.conn) {
            self.guard_pending = g;
        }
    }

    /// Ferry's capture triggers exist for *other* connections; on its own connection they
    /// would only cost time (SQLite still loads OLD/NEW and enters each trigger program per
    /// row even when its WHEN is false). So while the app has no triggers of its own, the
    /// SDK's connection runs with triggers disabled; as soon as the app defines one (through
    /// Ferry or another connection), they are enabled again so the app's triggers fire.
    /// Checked when the schema cookie changes, inside the write transaction.
    fn sync_trigger_mode(&mut self) -> Result<()> {
        let cookie: i64 = self
            .conn
            .pragma_query_value(None, "schema_version", |r| r.get(0))?;
        if cookie == self.schema_cookie {
            return Ok(());
        }
        let app_triggers: i64 = self.conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name NOT LIKE 'ferry\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )?;
        let want = app_triggers > 0;
        if want != self.triggers_on {
            self.conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER,
                want,
            )?;
            // Statements compiled under the other mode must be recompiled.
            self.conn.flush_prepared_statement_cache();
            self.triggers_on = want;
            tracing::debug!(enabled = want, "trigger mode of the SDK connection changed");
        }
        self.schema_cookie = cookie;
        Ok(())
    }

    /// Tells the capture triggers whether the writes that follow are the SDK's own (captured
    /// by the hook, or not to be captured at all) rather than another connection's.
    pub(crate) fn sdk_writes(&self, sdk: bool) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE ferry_gate SET sdk = ?1 WHERE id = 1")?
            .execute([i64::from(sdk)])?;
        Ok(())
    }

    /// Starts a transaction in which the SDK writes synced tables itself (apply, refusal
    /// handling): triggers off for these writes, and other connections' writes folded first
    /// so they are ordered before.
    pub(crate) fn begin_sdk_writes(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notifications,
    ) -> Result<()> {
        self.sync_trigger_mode()?;
        self.sdk_writes(true)?;
        self.fold_foreign(wall, notes)?;
        Ok(())
    }

    /// Opens the app's write transaction with capture on (foreign writes folded first).
    pub(crate) fn begin_write(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notifications,
    ) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            self.begin_sdk_writes(wall, notes)?;
            let mut h = self.hook.lock();
            h.acc.keep_all = self.has_server_checked || self.guard_pending;
            h.enabled = true;
            Ok(())
        })();
        if r.is_err() {
            self.rollback();
            notes.events.clear();
        }
        r
    }

    /// Ends the transaction opened by [`Engine::begin_write`]: with `keep`, what the app
    /// changed becomes one change set and is committed; without, everything is rolled back.
    pub(crate) fn end_write(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notifications,
        keep: bool,
    ) -> Result<Option<ChangeId>> {
        if !keep {
            self.rollback();
            notes.events.clear();
            return Ok(None);
        }
        let r = (|| {
            let change = {
                let mut h = self.hook.lock();
                h.enabled = false;
                let cat = Arc::clone(&h.catalog);
                h.acc.finish(&cat)?
            };
            let mut id = None;
            if !change.rows.is_empty() {
                self.check_size(&change)?;
                notes.events.push(ChangeEvent {
                    tables: self.table_names(&change),
                    source: ChangeSource::Local,
                });
                id = Some(ChangeId(self.record(&change, wall)?));
            }
            self.sdk_writes(false)?;
            Ok(id)
        })();
        let r = self.finish_txn(r);
        if r.is_err() {
            notes.events.clear();
        }
        r
    }

    /// Stores the relay's announced limits (see `relay_limits`).
    pub(crate) fn learn_limits(&mut self, limits: &crate::protocol::Limits) -> Result<()> {
        let now = (limits.max_change_set_ops, limits.max_frame_bytes);
        if self.relay_limits == Some(now) {
            return Ok(());
        }
        db::meta_set(
            &self.conn,
            "relay_max_ops",
            now.0.min(i64::MAX as u64) as i64,
        )?;
        db::meta_set(
            &self.conn,
            "relay_max_frame_bytes",
            now.1.min(i64::MAX as u64) as i64,
        )?;
        self.relay_limits = Some(now);
        Ok(())
    }

    /// Refuses a transaction the relay would refuse as too large (by its last announced
    /// limits): measured as the change set it becomes ([`crate::ChangeSet::approx_bytes`]),
    /// against 7/8 of the frame limit (the frame around it, and what the estimate misses).
    fn check_size(&self, change: &LocalChange) -> Result<()> {
        let Some((max_ops, max_frame)) = self.relay_limits else {
            return Ok(());
        };
        let mut ops = 0u64;
        let mut bytes = 96u64;
        for r in &change.rows {
            let t = self.cat.by_id(r.table)?;
            ops += r.cells.len().max(1) as u64;
            bytes += (24 + t.name().len() + crate::changeset::approx_value_bytes(&r.pk)) as u64;
            for c in &r.cells {
                let (col, v) = match c {
                    capture::RawCell::Set(i, v) => (*i, crate::changeset::approx_value_bytes(v)),
                    capture::RawCell::Add(i, _) => (*i, 9),
                };
                let name = t.cols.get(usize::from(col)).map_or(0, |c| c.name.len());
                bytes += (4 + name + v) as u64;
            }
        }
        let max_bytes = max_frame / 8 * 7;
        if ops > max_ops || bytes > max_bytes {
            return Err(Error::TransactionTooLarge {
                ops,
                bytes,
                max_ops,
                max_bytes,
            });
        }
        Ok(())
    }

    /// Guards the open write transaction with a lease grant.
    pub(crate) fn guard_with(&self, fence: Fence) -> Result<()> {
        crate::lease::validate_name(&fence.lease)?;
        self.hook.lock().acc.guard(fence)
    }

    /// Runs one app statement inside the open write transaction.
    pub(crate) fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.gate
            .execute(&self.conn, &self.hook, &self.cat, sql, params)
    }

    /// Prepares an app statement inside the open write transaction.
    pub(crate) fn prepare(&self, sql: &str) -> Result<Prepared<'_>> {
        self.gate.prepare(&self.conn, &self.hook, &self.cat, sql)
    }

    /// Runs a read-only app query.
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.gate.query(&self.conn, sql, params)
    }

    /// The tables an app query reads.
    pub(crate) fn tables_read(&self, sql: &str) -> Result<BTreeSet<String>> {
        self.gate.tables_read(&self.conn, sql)
    }

    /// True when another connection left writes to fold.
    pub(crate) fn foreign_waiting(&self) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM ferry_foreign)")?
            .query_row([], |r| r.get(0))?)
    }

    /// Folds foreign writes into one change set (inside the caller's transaction).
    pub(crate) fn fold_foreign(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notifications,
    ) -> Result<bool> {
        let mut acc = Accumulator::default();
        if !capture::fold_foreign(&self.conn, &self.cat, &mut acc)? {
            return Ok(false);
        }
        let change = acc.finish(&self.cat)?;
        if change.rows.is_empty() {
            return Ok(false);
        }
        notes.events.push(ChangeEvent {
            tables: self.table_names(&change),
            source: ChangeSource::Foreign,
        });
        self.record(&change, wall)?;
        Ok(true)
    }

    fn table_names(&self, change: &LocalChange) -> BTreeSet<String> {
        let mut ids: Vec<u32> = change.rows.iter().map(|r| r.table).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| self.cat.names.get(&id).cloned())
            .collect()
    }

    /// Records a local change in the change log under the next `origin_seq`.
    fn record(&mut self, change: &LocalChange, wall: &dyn WallClock) -> Result<[u8; 16]> {
        let hlc = self.clock.tick(wall.now_millis());
        let guarded = self.guard_pending
            || change.fence.is_some()
            || self.has_server_checked
                && change.rows.iter().any(|r| {
                    self.cat
                        .by_id(r.table)
                        .is_ok_and(|t| t.mode() == TableMode::ServerChecked)
                });
        let id = ulid::Ulid::generate().to_bytes();
        log::append(
            &self.conn,
            &log::Recorded {
                origin: self.me_num,
                origin_seq: self.next_oseq,
                id,
                hlc,
                base: self.cursor,
                raw: &rmp_serde::to_vec(change)?,
                guarded,
            },
        )?;
        self.next_oseq += 1;
        self.guard_pending |= guarded;
        Ok(id)
    }

    /// Materializes every pending local record (inside the caller's transaction).
    pub(crate) fn materialize_in_tx(&self) -> Result<usize> {
        crate::materialize::run(
            &self.conn,
            &self.cat,
            self.me,
            self.me_num,
            self.schema_version,
            usize::MAX,
        )
    }

    /// Materializes every pending local record, in a transaction of its own if any.
    pub(crate) fn materialize_all(&mut self) -> Result<()> {
        if log::unmaterialized_count(&self.conn)? == 0 {
            return Ok(());
        }
        self.in_txn(|e| e.materialize_in_tx()).map(|_| ())
    }

    /// Records the relay's position of own change set `origin_seq` (inside the caller's
    /// transaction); its undo records go once it is acknowledged.
    pub(crate) fn acknowledge(&mut self, origin_seq: u64, server_seq: u64) -> Result<()> {
        if log::acknowledge(&self.conn, self.me_num, origin_seq, server_seq)? && self.guard_pending
        {
            crate::rollback::forget_acked(&self.conn, self.me_num, origin_seq)?;
            self.guard_pending = log::guard_pending(&self.conn)?;
        }
        Ok(())
    }

    /// Takes a new replica id and re-issues every unacknowledged change set under it.
    pub(crate) fn rotate_identity(&mut self) -> Result<ReplicaId> {
        let (new, num, next) = self.in_txn(|e| {
            let new = ReplicaId::generate();
            let num = e.origins.intern(&e.conn, new)?;
            db::meta_set(&e.conn, "replica_id", new.0.to_vec())?;
            let next = log::reissue_unacked(&e.conn, new, num)?;
            Ok((new, num, next))
        })?;
        tracing::warn!(old = %self.me, new = %new, "replica id rotated; unacknowledged changes re-issued");
        self.me = new;
        self.me_num = num;
        self.next_oseq = next;
        Ok(new)
    }

    /// Re-runs the watched queries the gathered events may have changed (under the lock).
    pub(crate) fn rerun_watches(&self, registry: &Mutex<Registry>, notes: &mut Notifications) {
        if notes.events.is_empty() {
            return;
        }
        let touched = notes.touched();
        let watches: Vec<Arc<Watch>> = registry.lock().watches.values().cloned().collect();
        let mut results = Vec::new();
        for w in watches {
            if !w.tables.iter().any(|t| touched.contains(t)) {
                continue;
            }
            match self.query(&w.sql, &w.params) {
                Ok(rows) => {
                    if let Some(version) = w.record(&rows) {
                        results.push((Arc::clone(&w), rows, version));
                    }
                }
                Err(e) => tracing::warn!(error = %e, sql = %w.sql, "watched query failed"),
            }
        }
        notes.watch_results.extend(results);
    }
}
