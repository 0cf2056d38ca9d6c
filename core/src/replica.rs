//! The replica: one SQLite file the app reads and writes with plain SQL, offline.
//!
//! `Replica` owns one writer connection (all SDK reads and writes go through it under a
//! mutex, which is SQLite's own one-writer rule made explicit). It wires together capture
//! (pre-update hook for the SDK's writes, triggers for other connections'), the change log,
//! materialization, remote apply, the conflict log and observers. It never holds a write
//! transaction across anything but local SQLite work.

use crate::apply::{self, Ctx, Followup, Outcome};
use crate::capture::{self, Accumulator, HookState, LocalChange, StmtCols};
use crate::catalog::Catalog;
use crate::changeset::{ChangeSet, Sequenced};
use crate::checksum::{self, StateChecksum};
use crate::conflict::{self, Conflict};
use crate::db;
use crate::error::{Error, Result};
use crate::hlc::{CorrectedClock, Hlc, HlcState, SystemClock, WallClock};
use crate::ids::{ChangeId, ReplicaId};
use crate::materialize;
use crate::observer::{
    ChangeEvent, ChangeSource, Observer, Registry, Rows, Subscription, Watch, WatchCallback,
};
use crate::protocol::ErrorCode;
use crate::protocol::Move;
use crate::resolver::{ConflictInput, Resolution, Resolver};
use crate::rollback::Verdict;
use crate::rows::Origins;
use crate::schema::{Schema, TableMode, quote};
use crate::transaction::{Transaction, thread_token};
use crate::value::Value;
use parking_lot::Mutex;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What the authorizer refused, so the error can name it.
#[derive(Debug, Clone)]
enum Denied {
    ReadOnly(String),
    Internal(String),
    SyncedDdl(String),
}

#[derive(Debug, Default)]
struct AuthState {
    /// True while app SQL is being prepared (internal statements are always allowed).
    app_sql: bool,
    read_only: HashSet<String>,
    synced: HashSet<String>,
    denied: Option<Denied>,
    /// When set, tables read by statements being prepared are recorded (for watch).
    reads: Option<BTreeSet<String>>,
    /// When set, `(table, column)` pairs a top-level statement updates are recorded.
    updates: Option<Vec<(String, String)>>,
}

fn is_internal(name: &str) -> bool {
    name.len() >= 6 && name[..6].eq_ignore_ascii_case("ferry_")
}

pub(crate) struct Db {
    conn: Connection,
    hook: Arc<Mutex<HookState>>,
    auth: Arc<Mutex<AuthState>>,
    cat: Arc<Catalog>,
    schema_version: u32,
    me: ReplicaId,
    me_num: u32,
    origins: Origins,
    clock: HlcState,
    cursor: u64,
    next_oseq: u64,
    /// `PRAGMA schema_version` when the trigger mode was last decided.
    schema_cookie: i64,
    /// Whether SQLite runs triggers on this connection (see `sync_trigger_mode`).
    triggers_on: bool,
    /// Columns each app statement (by SQL text) updates, learnt once from the authorizer.
    stmt_cols: Mutex<HashMap<String, Arc<StmtCols>>>,
    /// The schema has `server_checked` tables (before-images are kept for every write).
    has_strict: bool,
    /// A guarded change set is pending (see `rollback`).
    guard_pending: bool,
    /// The largest HLC of any change set received from the relay (see [`Db::restamp`]).
    remote_hlc: Hlc,
}

/// Pending notifications gathered under the lock and delivered after it is released.
#[derive(Default)]
pub(crate) struct Notes {
    events: Vec<ChangeEvent>,
    conflicts: Vec<Conflict>,
    watch_results: Vec<(Arc<Watch>, Rows)>,
}

/// Result of applying a batch of remote change sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Change sets merged.
    pub applied: usize,
    /// Change sets at or below the cursor (already applied), skipped.
    pub duplicates: usize,
    /// This replica's own change sets recognised in the stream (acknowledged).
    pub own: usize,
    /// Conflicts detected.
    pub conflicts: usize,
    /// Cursor after the batch.
    pub cursor: u64,
}

/// A local replica.
pub struct Replica {
    db: Arc<Mutex<Option<Db>>>,
    registry: Arc<Mutex<Registry>>,
    resolvers: Mutex<HashMap<String, Arc<dyn Resolver>>>,
    wall: Arc<CorrectedClock>,
    /// Token of the thread holding an open [`Transaction`] (0: none), so that thread gets an
    /// error instead of a deadlock when it calls the replica directly.
    writer: Arc<AtomicU64>,
    apply_chunk_ops: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("path", &self.path).finish()
    }
}

/// A write transaction handed to [`Replica::write`]: plain SQL, captured as one change set.
pub struct WriteTx<'a> {
    conn: &'a Connection,
    auth: &'a Mutex<AuthState>,
    hook: &'a Mutex<HookState>,
    cat: &'a Catalog,
    stmt_cols: &'a Mutex<HashMap<String, Arc<StmtCols>>>,
}

impl WriteTx<'_> {
    /// Runs one SQL statement with positional parameters; returns rows changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        let cols = self.statement_cols(sql)?;
        let _scope = StmtScope::new(self.hook, cols);
        app_sql(self.auth, || {
            let mut st = self.conn.prepare_cached(sql)?;
            Ok(st.execute(rusqlite::params_from_iter(params.iter()))?)
        })
    }

    /// The columns `sql` updates per synced table, learnt once per SQL text by preparing it
    /// with the authorizer recording (bounded cache).
    fn statement_cols(&self, sql: &str) -> Result<Arc<StmtCols>> {
        if let Some(c) = self.stmt_cols.lock().get(sql) {
            return Ok(Arc::clone(c));
        }
        self.auth.lock().updates = Some(Vec::new());
        let prepared = app_sql(self.auth, || {
            self.conn.prepare(sql)?;
            Ok(())
        });
        let updates = self.auth.lock().updates.take().unwrap_or_default();
        prepared?;
        let mut cols: StmtCols = Vec::new();
        let mut unknown: BTreeSet<u32> = BTreeSet::new();
        for (table, column) in updates {
            let Some(t) = self.cat.get(&table) else {
                continue;
            };
            match t.by_name.get(&column) {
                Some(i) => match cols.iter_mut().find(|(id, _)| *id == t.id) {
                    Some((_, v)) => v.push(*i),
                    None => cols.push((t.id, vec![*i])),
                },
                // A name we cannot map: compare every column of that table.
                None => {
                    unknown.insert(t.id);
                }
            }
        }
        cols.retain(|(id, _)| !unknown.contains(id));
        let cols = Arc::new(cols);
        let mut cache = self.stmt_cols.lock();
        if cache.len() >= 512 {
            cache.clear();
        }
        cache.insert(sql.to_owned(), Arc::clone(&cols));
        Ok(cols)
    }

    /// Runs a query inside the transaction.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        run_query(self.conn, self.auth, sql, params)
    }

    /// Prepares a statement once for many executions (bulk writes), like
    /// `rusqlite::Connection::prepare_cached`.
    pub fn prepare(&self, sql: &str) -> Result<Prepared<'_>> {
        let cols = self.statement_cols(sql)?;
        let stmt = app_sql(self.auth, || Ok(self.conn.prepare_cached(sql)?))?;
        Ok(Prepared {
            stmt,
            auth: self.auth,
            hook: self.hook,
            cols,
        })
    }
}

/// Tells the hook which columns the running statement updates, until dropped.
struct StmtScope<'a>(&'a Mutex<HookState>);

impl<'a> StmtScope<'a> {
    fn new(hook: &'a Mutex<HookState>, cols: Arc<StmtCols>) -> Self {
        hook.lock().stmt_cols = Some(cols);
        StmtScope(hook)
    }
}

impl Drop for StmtScope<'_> {
    fn drop(&mut self) {
        self.0.lock().stmt_cols = None;
    }
}

/// A statement prepared inside a [`WriteTx`].
pub struct Prepared<'a> {
    stmt: rusqlite::CachedStatement<'a>,
    auth: &'a Mutex<AuthState>,
    hook: &'a Mutex<HookState>,
    cols: Arc<StmtCols>,
}

impl Prepared<'_> {
    /// Executes with positional parameters; returns rows changed.
    pub fn execute(&mut self, params: &[Value]) -> Result<usize> {
        let _scope = StmtScope::new(self.hook, Arc::clone(&self.cols));
        let stmt = &mut self.stmt;
        app_sql(self.auth, || {
            Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))?)
        })
    }
}

/// Runs app SQL with the authorizer in app mode, mapping refusals to typed errors.
fn app_sql<T>(auth: &Mutex<AuthState>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    auth.lock().app_sql = true;
    let r = f();
    let denied = {
        let mut a = auth.lock();
        a.app_sql = false;
        a.denied.take()
    };
    match (r, denied) {
        (Err(_), Some(Denied::ReadOnly(t))) => Err(Error::ReadOnlyTable(t)),
        (Err(_), Some(Denied::Internal(t))) => Err(Error::InvalidInput(format!(
            "`{t}` is Ferry's own table; apps must not write it"
        ))),
        (Err(_), Some(Denied::SyncedDdl(t))) => Err(Error::InvalidInput(format!(
            "synced table `{t}` can only be changed by declaring a new schema version"
        ))),
        (Err(Error::Sqlite(e)), None) if e.to_string().contains("ferry: table") => {
            Err(Error::InvalidInput(e.to_string()))
        }
        (r, _) => r,
    }
}

fn run_query(
    conn: &Connection,
    auth: &Mutex<AuthState>,
    sql: &str,
    params: &[Value],
) -> Result<Rows> {
    app_sql(auth, || {
        let mut st = conn.prepare_cached(sql)?;
        if !st.readonly() {
            return Err(Error::InvalidInput(
                "query() only reads; use execute() or write() for statements that change data"
                    .into(),
            ));
        }
        let columns: Vec<String> = st.column_names().map(|s| s.to_owned()).collect();
        let n = columns.len();
        let rows = st
            .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                (0..n)
                    .map(|i| r.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Rows { columns, rows })
    })
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
        let schema = &primary_view(schema, &opts.primary_tables)?;
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open(&path)?;
        if let Some(countdown) = opts.crash_countdown.clone() {
            conn.progress_handler(
                16,
                Some(move || countdown.fetch_sub(1, Ordering::SeqCst) <= 0),
            )?;
        }
        db::configure(&conn)?;
        db::upgrade_format(&mut conn, opts.new_replica_id)?;
        let cat = Arc::new(db::apply_schema(&mut conn, schema)?);
        let me = apply::stored_replica_id(&conn)?;
        let origins = Origins::load(&conn)?;
        let me_num = origin_num(&conn, me)?;
        let cursor = db::meta_get::<i64>(&conn, "cursor")? as u64;
        let stored_hlc = db::meta_get::<i64>(&conn, "hlc")? as u64;
        let log_hlc: i64 =
            conn.query_row("SELECT coalesce(max(hlc), 0) FROM ferry_log", [], |r| {
                r.get(0)
            })?;
        let next_oseq = next_origin_seq(&conn, me_num)?;
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
        let auth = Arc::new(Mutex::new(AuthState {
            read_only: cat
                .tables
                .values()
                .filter(|t| t.mode() == TableMode::ReadOnly)
                .map(|t| t.name().to_owned())
                .collect(),
            synced: cat.tables.keys().cloned().collect(),
            ..AuthState::default()
        }));
        install_authorizer(&mut conn, Arc::clone(&auth))?;
        let db = Db {
            conn,
            hook,
            auth,
            cat,
            schema_version: schema.version,
            me,
            me_num,
            origins,
            clock: HlcState::resume(Hlc(stored_hlc.max(log_hlc as u64))),
            cursor,
            next_oseq,
            schema_cookie: -1,
            triggers_on: true,
            stmt_cols: Mutex::new(HashMap::new()),
            has_strict: false,
            guard_pending: false,
            remote_hlc: Hlc(remote_hlc as u64),
        };
        let mut db = db;
        db.has_strict = db
            .cat
            .tables
            .values()
            .any(|t| t.mode() == TableMode::ServerChecked);
        db.guard_pending = crate::rollback::guard_pending(&db.conn)?;
        db.sync_trigger_mode()?;
        tracing::debug!(path = %path.display(), replica = %me, cursor, "replica opened");
        Ok(Replica {
            db: Arc::new(Mutex::new(Some(db))),
            registry: Arc::new(Mutex::new(Registry::default())),
            resolvers: Mutex::new(HashMap::new()),
            wall: Arc::new(CorrectedClock::new(opts.wall_clock)),
            writer: Arc::new(AtomicU64::new(0)),
            apply_chunk_ops: opts.apply_chunk_ops.max(1),
            path,
        })
    }

    /// Closes the replica; later calls fail with [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let db = self.lock()?.take();
        if let Some(db) = db {
            db.conn.close().map_err(|(_, e)| Error::Sqlite(e))?;
        }
        Ok(())
    }

    /// The file this replica lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_db<T>(&self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        let mut g = self.lock()?;
        let db = g.as_mut().ok_or(Error::Closed)?;
        f(db)
    }

    /// Locks the database, refusing (rather than deadlocking) when this thread already holds
    /// it through an open [`Transaction`].
    fn lock(&self) -> Result<parking_lot::MutexGuard<'_, Option<Db>>> {
        self.not_writer()?;
        Ok(self.db.lock())
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
    /// [`Transaction::rollback`] (dropping it rolls back). This is [`Replica::write`] for
    /// callers that cannot pass a closure (the FFI); the replica is locked meanwhile, so
    /// finish it promptly.
    pub fn begin(&self) -> Result<Transaction> {
        self.not_writer()?;
        let mut g = Mutex::lock_arc(&self.db);
        let db = g.as_mut().ok_or(Error::Closed)?;
        let mut notes = Notes::default();
        db.begin_write(&*self.wall, &mut notes)?;
        self.writer.store(thread_token(), Ordering::Release);
        Ok(Transaction::new(
            g,
            notes,
            Arc::clone(&self.registry),
            Arc::clone(&self.wall),
            Arc::clone(&self.writer),
        ))
    }

    /// This replica's id.
    pub fn replica_id(&self) -> Result<ReplicaId> {
        self.with_db(|db| Ok(db.me))
    }

    /// The highest relay position applied with everything before it.
    pub fn cursor(&self) -> Result<u64> {
        self.with_db(|db| Ok(db.cursor))
    }

    /// The app schema version this replica runs.
    pub fn schema_version(&self) -> Result<u32> {
        self.with_db(|db| Ok(db.schema_version))
    }

    /// The latest HLC issued or seen.
    pub fn clock(&self) -> Result<Hlc> {
        self.with_db(|db| Ok(db.clock.last()))
    }

    /// Learns the relay's wall clock (at hello): new change sets are stamped no further ahead
    /// of it than a second, and the HLC moves past it. Returns how far ahead of the relay the
    /// device clock runs (0 if it does not).
    pub fn learn_relay_clock(&self, relay_ms: u64) -> Result<u64> {
        let ahead = self.wall.learn(relay_ms);
        if ahead > 0 {
            tracing::warn!(
                ahead_ms = ahead,
                "device clock is ahead of the relay's; stamping with the relay's time"
            );
        }
        self.observe_clock(Hlc::new(relay_ms, 0))?;
        Ok(ahead)
    }

    /// Folds a timestamp learned from outside (e.g. the relay's clock at hello).
    pub fn observe_clock(&self, h: Hlc) -> Result<()> {
        self.with_db(|db| {
            db.clock.observe(h);
            Ok(())
        })
    }

    /// A new ULID, for primary keys.
    pub fn new_id(&self) -> String {
        crate::ids::new_id()
    }

    /// Runs a read-only query.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.with_db(|db| run_query(&db.conn, &db.auth, sql, params))
    }

    /// Runs one statement as its own write transaction; returns rows changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        self.write(|tx| tx.execute(sql, params))
    }

    /// Runs `f` in one write transaction. Everything it changes in synced tables becomes one
    /// change set; if it returns an error nothing is kept.
    pub fn write<T>(&self, f: impl FnOnce(&WriteTx<'_>) -> Result<T>) -> Result<T> {
        let (out, notes) = {
            let mut g = self.lock()?;
            let db = g.as_mut().ok_or(Error::Closed)?;
            let mut notes = Notes::default();
            let out = db.write_txn(&*self.wall, &mut notes, f)?;
            collect_watches(&self.registry, db, &mut notes);
            (out, notes)
        };
        deliver(&self.registry, notes);
        Ok(out)
    }

    /// Folds writes made by other connections on this file into change sets now.
    /// (Ferry also does this before every write, push and apply.) Returns true if any.
    pub fn capture_foreign(&self) -> Result<bool> {
        let (any, notes) = {
            let mut g = self.lock()?;
            let db = g.as_mut().ok_or(Error::Closed)?;
            // Only take the write lock when another connection left something to fold.
            let waiting: bool = db
                .conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM ferry_foreign)")?
                .query_row([], |r| r.get(0))?;
            if !waiting {
                return Ok(false);
            }
            let mut notes = Notes::default();
            db.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = db
                .gate(true)
                .and_then(|_| db.fold_foreign(&*self.wall, &mut notes))
                .and_then(|any| {
                    db.gate(false)?;
                    Ok(any)
                });
            let any = db.finish_txn(r)?;
            collect_watches(&self.registry, db, &mut notes);
            (any, notes)
        };
        deliver(&self.registry, notes);
        Ok(any)
    }

    /// Oldest unacknowledged change sets, at most `max_sets` and about `max_bytes` (always at
    /// least one if any is pending). Folds foreign writes and materializes first.
    pub fn pending(&self, max_sets: usize, max_bytes: usize) -> Result<Vec<ChangeSet>> {
        self.capture_foreign()?;
        self.with_db(|db| {
            db.materialize_all()?;
            let mut st = db.conn.prepare_cached(
                "SELECT wire FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL AND wire IS NOT NULL
                 ORDER BY seq LIMIT ?1",
            )?;
            let mut rows = st.query([max_sets.max(1) as i64])?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = rows.next()? {
                let b: Vec<u8> = r.get(0)?;
                if !out.is_empty() && bytes + b.len() > max_bytes {
                    break;
                }
                bytes += b.len();
                out.push(rmp_serde::from_slice(&b)?);
            }
            Ok(out)
        })
    }

    /// Number of change sets not yet acknowledged by the relay.
    pub fn pending_count(&self) -> Result<u64> {
        self.with_db(|db| {
            let foreign: i64 =
                db.conn
                    .query_row("SELECT count(*) FROM ferry_foreign", [], |r| r.get(0))?;
            let n: i64 = db.conn.query_row(
                "SELECT count(*) FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL",
                [],
                |r| r.get(0),
            )?;
            Ok(n as u64 + u64::from(foreign > 0))
        })
    }

    /// Highest origin_seq this replica has issued under its current id.
    pub fn last_origin_seq(&self) -> Result<u64> {
        self.with_db(|db| Ok(db.next_oseq - 1))
    }

    /// Records the relay's acknowledgements `(origin_seq, server_seq)` of this replica's change sets.
    pub fn acknowledge(&self, acks: &[(u64, u64)]) -> Result<()> {
        self.with_db(|db| {
            db.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = acks.iter().try_for_each(|(o, s)| db.ack(*o, *s));
            db.finish_txn(r)
        })
    }

    /// Applies remote change sets covering relay positions `(after, up_to]`, in order.
    /// Each change set is all-or-nothing and the cursor moves in the same transaction;
    /// sets at or below the cursor are skipped, so a repeated delivery changes nothing.
    pub fn apply_remote(&self, after: u64, up_to: u64, sets: &[Sequenced]) -> Result<ApplyReport> {
        self.apply_changes(after, up_to, sets, &[])
    }

    /// [`Replica::apply_remote`] plus rows entering or leaving this replica's read scopes
    /// (`moves`, each applied atomically with its position; see [`Move`]).
    pub fn apply_changes(
        &self,
        after: u64,
        up_to: u64,
        sets: &[Sequenced],
        moves: &[Move],
    ) -> Result<ApplyReport> {
        in_order(
            moves.iter().map(|m| m.server_seq),
            after,
            up_to,
            "scope move",
        )?;
        for m in moves {
            in_order(
                m.backfill.iter().map(|b| b.server_seq),
                0,
                m.server_seq.saturating_sub(1),
                "backfill",
            )?;
        }
        in_order(
            sets.iter().map(|s| s.server_seq),
            after,
            up_to,
            "server_seq",
        )?;
        let mut report = ApplyReport::default();
        let mut followups = Vec::new();
        let mut start = 0;
        let mut moves_done = 0;
        let mut failure = None;
        while start < sets.len() || (start == 0 && sets.is_empty()) {
            let mut end = start;
            let mut ops = 0;
            while end < sets.len()
                && (end == start || ops + sets[end].change_set.op_count() <= self.apply_chunk_ops)
            {
                ops += sets[end].change_set.op_count();
                end += 1;
            }
            let chunk = &sets[start..end];
            let is_last = end >= sets.len();
            let moves_end = if is_last {
                moves.len()
            } else {
                let last_seq = chunk.last().map_or(0, |s| s.server_seq);
                moves_done + moves[moves_done..].partition_point(|m| m.server_seq <= last_seq)
            };
            let chunk_moves = &moves[moves_done..moves_end];
            moves_done = moves_end;
            let notes = {
                let mut g = self.lock()?;
                let db = g.as_mut().ok_or(Error::Closed)?;
                if after > db.cursor {
                    return Err(Error::InvalidChangeSet(format!(
                        "batch starts after relay position {after} but this replica has only applied up to {}",
                        db.cursor
                    )));
                }
                let mut notes = Notes::default();
                let r = db.apply_chunk(
                    &*self.wall,
                    chunk,
                    chunk_moves,
                    if is_last { Some(up_to) } else { None },
                    &mut report,
                    &mut notes,
                );
                followups.extend(r.0);
                failure = r.1;
                collect_watches(&self.registry, db, &mut notes);
                notes
            };
            deliver(&self.registry, notes);
            if failure.is_some() || is_last {
                break;
            }
            start = end;
        }
        report.cursor = self.cursor()?;
        self.resolve_followups(followups)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn resolve_followups(&self, followups: Vec<Followup>) -> Result<()> {
        for f in followups {
            let resolver = self.resolvers.lock().get(&f.table).cloned();
            let Some(resolver) = resolver else {
                tracing::warn!(table = %f.table, column = %f.column, "custom conflict without a registered resolver; lww result kept");
                self.with_db(|db| {
                    set_resolution(
                        &db.conn,
                        f.conflict_id,
                        "no resolver registered: lww result kept",
                    )
                })?;
                continue;
            };
            let (merged, pk_col) = self.with_db(|db| {
                let t = db.cat.table(&f.table)?;
                let i = t.col(&f.column)?;
                let row = capture::read_row(&db.conn, t, &f.pk)?;
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
            self.with_db(|db| set_resolution(&db.conn, f.conflict_id, &note))?;
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

    /// Registers the resolver for `custom` columns of `table`.
    pub fn set_resolver(&self, table: &str, resolver: Arc<dyn Resolver>) -> Result<()> {
        self.with_db(|db| db.cat.table(table).map(|_| ()))?;
        self.resolvers.lock().insert(table.to_owned(), resolver);
        Ok(())
    }

    /// The conflict log, oldest first.
    pub fn conflicts(&self) -> Result<Vec<Conflict>> {
        self.with_db(|db| conflict::list(&db.conn))
    }

    /// Clears the conflict log up to and including `up_to_id` (everything when None).
    pub fn clear_conflicts(&self, up_to_id: Option<i64>) -> Result<usize> {
        self.with_db(|db| conflict::clear(&db.conn, up_to_id))
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
        let (rows, tables) = self.with_db(|db| {
            db.auth.lock().reads = Some(BTreeSet::new());
            // Prepare fresh (not cached) so the authorizer sees every table the query reads.
            let prep = app_sql(&db.auth, || {
                db.conn.prepare(sql)?;
                Ok(())
            });
            let tables = db.auth.lock().reads.take().unwrap_or_default();
            prep?;
            Ok((run_query(&db.conn, &db.auth, sql, params)?, tables))
        })?;
        callback(&rows);
        let w = Arc::new(Watch {
            sql: sql.to_owned(),
            params: params.to_vec(),
            tables,
            last: Mutex::new(Some(rows)),
            callback,
        });
        let id = self.registry.lock().add_watch(w);
        Ok(Subscription::new(&self.registry, id))
    }

    /// Every synced table's rows, sorted by key: what convergence tests compare.
    pub fn dump(&self) -> Result<Vec<(String, Rows)>> {
        self.with_db(|db| {
            let mut names: Vec<&String> = db.cat.tables.keys().collect();
            names.sort();
            let mut out = Vec::new();
            for n in names {
                let t = db.cat.table(n)?;
                let sql = format!(
                    "SELECT {} FROM {} ORDER BY {}",
                    t.select_list(),
                    quote(n),
                    quote(&t.cols[t.pk].name)
                );
                let mut st = db.conn.prepare(&sql)?;
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
        self.with_db(|db| checksum::compute(&db.conn, &db.cat, keep))
    }

    /// Takes a new replica id and re-issues every unacknowledged change set under it, so
    /// that none can be mistaken for a change the relay already holds from the old id (a
    /// file restored from a backup, or copied to another device).
    pub fn rotate_identity(&self) -> Result<ReplicaId> {
        self.with_db(|db| db.rotate_identity())
    }

    /// Handles the relay's refusal of one of this replica's change sets for a
    /// compare-and-set conflict or a stale lease (see `rollback`): a guarded change set is
    /// rolled back with those written on top of it, observers are told (change events with
    /// [`ChangeSource::Rollback`], conflict-log entries); a change set refused only for its
    /// `custom` columns is left for [`Replica::rebase`] once the replica has caught up.
    pub fn handle_refusal(
        &self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<RefusalAction> {
        let (action, notes) = {
            let mut g = self.lock()?;
            let db = g.as_mut().ok_or(Error::Closed)?;
            let mut notes = Notes::default();
            db.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = db.strict_refusal(origin_seq, code, message, &mut notes);
            let action = db.finish_txn(r)?;
            collect_watches(&self.registry, db, &mut notes);
            (action, notes)
        };
        deliver(&self.registry, notes);
        Ok(action)
    }

    /// Re-issues a pending change set refused for its `custom` columns on top of what the
    /// replica now holds: its base becomes the cursor, its clock a fresh tick, and its custom
    /// cells carry the current (merged or resolved) values, so the relay can accept it and
    /// every replica ends with what this one shows. Returns false if it is no longer pending.
    pub fn rebase(&self, origin_seq: u64) -> Result<bool> {
        let wall = Arc::clone(&self.wall);
        self.with_db(|db| {
            db.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = db.rebase(origin_seq, &*wall);
            db.finish_txn(r)
        })
    }

    /// Re-stamps the pending change sets from `origin_seq` on with the corrected clock, after
    /// the relay refused one for clock skew (see DESIGN.md, Order). Returns how many.
    pub fn restamp(&self, origin_seq: u64) -> Result<usize> {
        let wall = Arc::clone(&self.wall);
        self.with_db(|db| {
            db.conn.execute_batch("BEGIN IMMEDIATE")?;
            let r = db.restamp(origin_seq, &*wall);
            db.finish_txn(r)
        })
    }

    /// The relay's verdict on a change set this replica made.
    pub fn verdict(&self, id: &ChangeId) -> Result<Verdict> {
        self.with_db(|db| crate::rollback::verdict(&db.conn, &id.0))
    }
}

/// What [`Replica::handle_refusal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalAction {
    /// These change sets (by `origin_seq`) were rolled back and replaced by empty ones; push
    /// again. Empty when it had been rolled back already.
    Withdrawn(Vec<u64>),
    /// Catch up past the conflicting change, then [`Replica::rebase`] it and push again.
    Rebase,
}

/// Checks that relay positions are strictly increasing within `(after, up_to]`.
fn in_order(seqs: impl Iterator<Item = u64>, after: u64, up_to: u64, what: &str) -> Result<()> {
    let mut last = after;
    for s in seqs {
        if s <= last || s > up_to {
            return Err(Error::InvalidChangeSet(format!(
                "{what} position {s} is out of order in a batch covering ({after}, {up_to}]"
            )));
        }
        last = s;
    }
    Ok(())
}

/// `(seq, hlc, base, raw, wire)` of an unacknowledged log row.
type Unacked = (
    i64,
    i64,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    bool,
    Option<String>,
);

fn set_resolution(conn: &Connection, id: i64, text: &str) -> Result<()> {
    conn.execute(
        "UPDATE ferry_conflicts SET resolution = ?1 WHERE id = ?2",
        params![text, id],
    )?;
    Ok(())
}

/// The origin_seq the next local change set of origin `num` gets (stored, so it survives
/// restarts and is rolled back with a failed transaction).
fn next_origin_seq(conn: &Connection, num: u32) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT coalesce(max(origin_seq), 0) + 1 FROM ferry_log WHERE origin = ?1",
        [num],
        |r| r.get(0),
    )?;
    Ok(n as u64)
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

fn install_authorizer(conn: &mut Connection, auth: Arc<Mutex<AuthState>>) -> Result<()> {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        let mut a = auth.lock();
        if let (Some(reads), AuthAction::Read { table_name, .. }) = (&mut a.reads, &ctx.action) {
            reads.insert((*table_name).to_owned());
        }
        if let (
            Some(updates),
            AuthAction::Update {
                table_name,
                column_name,
            },
            None,
        ) = (&mut a.updates, &ctx.action, ctx.accessor)
        {
            updates.push(((*table_name).to_owned(), (*column_name).to_owned()));
        }
        if !a.app_sql || ctx.accessor.is_some_and(is_internal) {
            return Authorization::Allow;
        }
        let denied = match ctx.action {
            AuthAction::Insert { table_name }
            | AuthAction::Delete { table_name }
            | AuthAction::Update { table_name, .. } => {
                if is_internal(table_name) {
                    Some(Denied::Internal(table_name.to_owned()))
                } else if a.read_only.contains(table_name) {
                    Some(Denied::ReadOnly(table_name.to_owned()))
                } else {
                    None
                }
            }
            AuthAction::CreateTrigger { table_name, .. }
            | AuthAction::DropTrigger { table_name, .. } => {
                // App triggers on synced tables are fine (their writes are captured).
                is_internal(table_name).then(|| Denied::Internal(table_name.to_owned()))
            }
            AuthAction::DropTable { table_name } | AuthAction::AlterTable { table_name, .. } => {
                if is_internal(table_name) {
                    Some(Denied::Internal(table_name.to_owned()))
                } else if a.synced.contains(table_name) {
                    Some(Denied::SyncedDdl(table_name.to_owned()))
                } else {
                    None
                }
            }
            _ => None,
        };
        match denied {
            Some(d) => {
                a.denied = Some(d);
                Authorization::Deny
            }
            None => Authorization::Allow,
        }
    }))?;
    Ok(())
}

impl Db {
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

    fn gate(&self, sdk: bool) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE ferry_gate SET sdk = ?1 WHERE id = 1")?
            .execute([i64::from(sdk)])?;
        Ok(())
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
        if let Ok(n) = next_origin_seq(&self.conn, self.me_num) {
            self.next_oseq = n;
        }
        if let Ok(g) = crate::rollback::guard_pending(&self.conn) {
            self.guard_pending = g;
        }
    }

    fn write_txn<T>(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notes,
        f: impl FnOnce(&WriteTx<'_>) -> Result<T>,
    ) -> Result<T> {
        self.begin_write(wall, notes)?;
        match f(&self.tx()) {
            Ok(v) => {
                self.end_write(wall, notes, true)?;
                Ok(v)
            }
            Err(e) => {
                self.end_write(wall, notes, false)?;
                Err(e)
            }
        }
    }

    /// The app's view of the open write transaction.
    pub(crate) fn tx(&self) -> WriteTx<'_> {
        WriteTx {
            conn: &self.conn,
            auth: &self.auth,
            hook: &self.hook,
            cat: &self.cat,
            stmt_cols: &self.stmt_cols,
        }
    }

    /// Materializes every pending local record (inside the caller's transaction).
    fn materialize_in_tx(&self) -> Result<usize> {
        materialize::run(
            &self.conn,
            &self.cat,
            self.me,
            self.me_num,
            self.schema_version,
            usize::MAX,
        )
    }

    fn strict_refusal(
        &mut self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
        notes: &mut Notes,
    ) -> Result<RefusalAction> {
        self.materialize_in_tx()?;
        let row: Option<(bool, Option<String>, Option<i64>)> = self
            .conn
            .prepare_cached(
                "SELECT guarded, rejected, server_seq FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
            )?
            .query_row(params![self.me_num, origin_seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let guarded = match row {
            None => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which this replica never issued"
                )));
            }
            Some((_, Some(_), _)) => return Ok(RefusalAction::Withdrawn(Vec::new())),
            Some((_, None, Some(s))) => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which it had acknowledged at {s}"
                )));
            }
            Some((g, None, None)) => g,
        };
        let policy = match code {
            ErrorCode::Fenced => "lease",
            ErrorCode::Conflict if guarded => "server_checked",
            ErrorCode::Conflict => return Ok(RefusalAction::Rebase),
            other => {
                return Err(Error::InvalidInput(format!(
                    "a `{}` refusal is not rolled back",
                    other.as_str()
                )));
            }
        };
        let me = crate::rollback::Me {
            id: self.me,
            num: self.me_num,
            cursor: self.cursor,
        };
        let w = crate::rollback::withdraw(&self.conn, &self.cat, &me, origin_seq, policy, message)?;
        self.guard_pending = crate::rollback::guard_pending(&self.conn)?;
        if !w.tables.is_empty() {
            notes.events.push(ChangeEvent {
                tables: w.tables,
                source: ChangeSource::Rollback,
            });
        }
        notes.conflicts.extend(w.conflicts);
        Ok(RefusalAction::Withdrawn(w.withdrawn))
    }

    fn rebase(&mut self, origin_seq: u64, wall: &dyn WallClock) -> Result<bool> {
        self.materialize_in_tx()?;
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT seq, wire FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2
                 AND server_seq IS NULL AND rejected IS NULL AND reissued IS NULL AND wire IS NOT NULL",
            )?
            .query_row(params![self.me_num, origin_seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((seq, wire)) = row else {
            return Ok(false);
        };
        let mut cs: ChangeSet = rmp_serde::from_slice(&wire)?;
        let old = crate::vv::Version {
            hlc: cs.hlc,
            origin: self.me_num,
            origin_seq,
            server_seq: 0,
            base: cs.base,
        };
        let hlc = self.clock.tick(wall.now_millis());
        let new = crate::vv::Version {
            hlc,
            base: self.cursor,
            ..old
        };
        for rc in &mut cs.rows {
            let t = self.cat.table(&rc.table)?;
            let current = capture::read_row(&self.conn, t, &rc.pk)?;
            let Some(mut stored) = crate::rows::load(&self.conn, t, &rc.pk)? else {
                continue;
            };
            crate::rollback::swap_in_undo(&self.conn, t, &rc.pk, &|m| m.swap_version(&old, &new))?;
            let m = &mut stored.meta;
            m.swap_version(&old, &new);
            if let crate::changeset::RowOp::Upsert(cells) = &mut rc.op {
                for c in cells.iter_mut() {
                    let crate::changeset::Cell::Set(name, v) = c else {
                        continue;
                    };
                    let i = t.col(name)?;
                    if t.cols[i].policy != crate::schema::Policy::Custom {
                        continue;
                    }
                    if let Some(now) = current.as_ref().and_then(|r| r.get(i)) {
                        *v = now.clone();
                    }
                    let later_own = m
                        .cell(i as u32)
                        .is_some_and(|cv| cv.origin == self.me_num && cv.origin_seq > origin_seq);
                    if !later_own && m.cl == rc.cl {
                        m.set_cell(i as u32, new);
                    }
                }
            }
            crate::rows::store(&self.conn, t, &rc.pk, &stored)?;
        }
        cs.hlc = hlc;
        cs.base = self.cursor;
        self.conn
            .prepare_cached("UPDATE ferry_log SET wire = ?1, hlc = ?2, base = ?3 WHERE seq = ?4")?
            .execute(params![
                rmp_serde::to_vec_named(&cs)?,
                hlc.0 as i64,
                self.cursor as i64,
                seq
            ])?;
        db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
        tracing::info!(
            origin_seq,
            base = self.cursor,
            "change set rebased after a custom-column conflict"
        );
        Ok(true)
    }

    /// Re-stamps this replica's pending change sets from `origin_seq` on, after the relay
    /// refused one as stamped too far ahead of its clock (the device clock ran ahead before
    /// the replica learnt the relay's). Nobody else has seen them, so each gets a fresh HLC
    /// from the corrected clock, above every timestamp received from the relay and every own
    /// earlier one: a local merge they won against a received write (whose HLC is below
    /// that) is still won, so the replica keeps what the others will compute. Returns how
    /// many were re-stamped. Withdrawn ones are re-stamped too: their empty placeholders
    /// still have to be sequenced to keep the device's sequence gap-free.
    fn restamp(&mut self, origin_seq: u64, wall: &dyn WallClock) -> Result<usize> {
        self.materialize_in_tx()?;
        // Own change sets before it keep their stamps (acknowledged, or pending and in order
        // before it): the re-stamped ones must stay above them, or an older write of this
        // device would win over a newer one everywhere else.
        let own_before: i64 = self
            .conn
            .prepare_cached(
                "SELECT coalesce(max(hlc), 0) FROM ferry_log WHERE origin = ?1
                 AND (origin_seq < ?2 OR server_seq IS NOT NULL)",
            )?
            .query_row(params![self.me_num, origin_seq as i64], |r| r.get(0))?;
        let pending: Vec<(i64, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT seq, origin_seq, wire FROM ferry_log WHERE origin = ?1 AND origin_seq >= ?2
                 AND server_seq IS NULL AND reissued IS NULL AND wire IS NOT NULL ORDER BY origin_seq",
            )?
            .query_map(params![self.me_num, origin_seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        if pending
            .first()
            .is_none_or(|(_, o, _)| *o as u64 != origin_seq)
        {
            // Not pending any more (a stale refusal of an old frame): nothing to re-stamp.
            return Ok(0);
        }
        self.clock = HlcState::resume(self.remote_hlc.max(Hlc(own_before as u64)));
        for (seq, oseq, wire) in &pending {
            let mut cs: ChangeSet = rmp_serde::from_slice(wire)?;
            let hlc = self.clock.tick(wall.now_millis());
            for rc in &cs.rows {
                let t = self.cat.table(&rc.table)?;
                let (me, oseq) = (self.me_num, *oseq as u64);
                crate::rollback::swap_in_undo(&self.conn, t, &rc.pk, &|m| {
                    m.restamp(me, oseq, hlc)
                })?;
                let Some(mut stored) = crate::rows::load(&self.conn, t, &rc.pk)? else {
                    continue;
                };
                if stored.meta.restamp(me, oseq, hlc) {
                    crate::rows::store(&self.conn, t, &rc.pk, &stored)?;
                }
            }
            cs.hlc = hlc;
            self.conn
                .prepare_cached("UPDATE ferry_log SET wire = ?1, hlc = ?2 WHERE seq = ?3")?
                .execute(params![rmp_serde::to_vec_named(&cs)?, hlc.0 as i64, seq])?;
        }
        db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
        tracing::warn!(
            from = origin_seq,
            count = pending.len(),
            "pending change sets re-stamped after a clock-skew refusal"
        );
        Ok(pending.len())
    }

    /// Guards the open write transaction with a lease grant (see [`Transaction::guard`]).
    pub(crate) fn guard_with(&self, fence: crate::changeset::Fence) -> Result<()> {
        crate::lease::validate_name(&fence.lease)?;
        self.hook.lock().acc.guard(fence)
    }

    /// Opens a write transaction with capture on (foreign writes folded first).
    pub(crate) fn begin_write(&mut self, wall: &dyn WallClock, notes: &mut Notes) -> Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            self.sync_trigger_mode()?;
            self.gate(true)?;
            self.fold_foreign(wall, notes)?;
            let mut h = self.hook.lock();
            h.acc.keep_all = self.has_strict || self.guard_pending;
            h.enabled = true;
            Ok(())
        })();
        if r.is_err() {
            self.rollback();
            notes.events.clear();
        }
        r
    }

    /// Ends the transaction opened by [`Db::begin_write`]: with `keep`, what the app changed
    /// becomes one change set and is committed; without, everything is rolled back.
    pub(crate) fn end_write(
        &mut self,
        wall: &dyn WallClock,
        notes: &mut Notes,
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
                notes.events.push(ChangeEvent {
                    tables: self.table_names(&change),
                    source: ChangeSource::Local,
                });
                id = Some(ChangeId(self.append_local(&change, wall)?));
            }
            self.gate(false)?;
            Ok(id)
        })();
        let r = self.finish_txn(r);
        if r.is_err() {
            notes.events.clear();
        }
        r
    }

    /// Folds foreign writes into one change set (inside the caller's transaction).
    fn fold_foreign(&mut self, wall: &dyn WallClock, notes: &mut Notes) -> Result<bool> {
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
        self.append_local(&change, wall)?;
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

    fn append_local(&mut self, change: &LocalChange, wall: &dyn WallClock) -> Result<[u8; 16]> {
        let hlc = self.clock.tick(wall.now_millis());
        let oseq = self.next_oseq;
        let guarded = self.guard_pending
            || change.fence.is_some()
            || self.has_strict
                && change.rows.iter().any(|r| {
                    self.cat
                        .by_id(r.table)
                        .is_ok_and(|t| t.mode() == TableMode::ServerChecked)
                });
        let id = ulid::Ulid::generate().to_bytes();
        self.conn
            .prepare_cached(
                "INSERT INTO ferry_log(origin, origin_seq, id, hlc, base, raw, guarded) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                self.me_num,
                oseq as i64,
                id.to_vec(),
                hlc.0 as i64,
                self.cursor as i64,
                rmp_serde::to_vec(change)?,
                guarded
            ])?;
        self.next_oseq += 1;
        self.guard_pending |= guarded;
        Ok(id)
    }

    fn materialize_all(&mut self) -> Result<()> {
        let pending: i64 = self.conn.query_row(
            "SELECT count(*) FROM ferry_log WHERE server_seq IS NULL AND wire IS NULL AND raw IS NOT NULL AND reissued IS NULL",
            [],
            |r| r.get(0),
        )?;
        if pending == 0 {
            return Ok(());
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = self.materialize_in_tx();
        self.finish_txn(r).map(|_| ())
    }

    fn ack(&mut self, origin_seq: u64, server_seq: u64) -> Result<()> {
        let known: Option<Option<i64>> = self
            .conn
            .prepare_cached(
                "SELECT server_seq FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
            )?
            .query_row(params![self.me_num, origin_seq as i64], |r| r.get(0))
            .optional()?;
        match known {
            None => Err(Error::Protocol(format!(
                "acknowledgement for origin_seq {origin_seq}, which this replica never issued"
            ))),
            Some(Some(s)) if s as u64 != server_seq => Err(Error::Protocol(format!(
                "origin_seq {origin_seq} acknowledged at {server_seq} but earlier at {s}"
            ))),
            Some(Some(_)) => Ok(()),
            Some(None) => {
                self.conn
                    .prepare_cached(
                        "UPDATE ferry_log SET server_seq = ?1, wire = NULL, raw = NULL WHERE origin = ?2 AND origin_seq = ?3",
                    )?
                    .execute(params![server_seq as i64, self.me_num, origin_seq as i64])?;
                if self.guard_pending {
                    crate::rollback::forget_acked(&self.conn, self.me_num, origin_seq)?;
                    self.guard_pending = crate::rollback::guard_pending(&self.conn)?;
                }
                Ok(())
            }
        }
    }

    /// Applies a chunk of sequenced change sets in one transaction. A change set that fails
    /// rolls the transaction back; the ones before it are then applied again on their own, so
    /// each change set stays all-or-nothing without paying for a savepoint per set.
    fn apply_chunk(
        &mut self,
        wall: &dyn WallClock,
        chunk: &[Sequenced],
        moves: &[Move],
        up_to: Option<u64>,
        report: &mut ApplyReport,
        notes: &mut Notes,
    ) -> (Vec<Followup>, Option<Error>) {
        let snapshot = report.clone();
        match self.apply_chunk_once(wall, chunk, moves, up_to, report, notes) {
            Ok(f) => (f, None),
            Err((failed_at, e)) => {
                *report = snapshot;
                // The failed transaction (its foreign fold included) was rolled back.
                notes.events.clear();
                notes.conflicts.clear();
                tracing::warn!(error = %e, "remote change set refused");
                if failed_at == 0 {
                    return (Vec::new(), Some(e));
                }
                let before = chunk[failed_at].server_seq;
                let moves = &moves[..moves.partition_point(|m| m.server_seq < before)];
                match self.apply_chunk_once(wall, &chunk[..failed_at], moves, None, report, notes) {
                    Ok(f) => (f, Some(e)),
                    Err((_, again)) => (Vec::new(), Some(again)),
                }
            }
        }
    }

    fn apply_chunk_once(
        &mut self,
        wall: &dyn WallClock,
        chunk: &[Sequenced],
        moves: &[Move],
        up_to: Option<u64>,
        report: &mut ApplyReport,
        notes: &mut Notes,
    ) -> std::result::Result<Vec<Followup>, (usize, Error)> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| (0, e.into()))?;
        let mut out = Outcome::default();
        let mut local_report = report.clone();
        let mut failed_at = 0;
        let cursor_before = self.cursor;
        let clock_before = self.clock;
        let r = (|| {
            self.sync_trigger_mode()?;
            self.gate(true)?;
            self.fold_foreign(wall, notes)?;
            self.materialize_in_tx()?;
            let mut mv = 0;
            for (k, s) in chunk.iter().enumerate() {
                failed_at = k;
                if s.server_seq <= self.cursor {
                    local_report.duplicates += 1;
                    continue;
                }
                while mv < moves.len() && moves[mv].server_seq < s.server_seq {
                    self.apply_move(&moves[mv], true, true, &mut out)?;
                    mv += 1;
                }
                let moving =
                    (mv < moves.len() && moves[mv].server_seq == s.server_seq).then(|| &moves[mv]);
                if let Some(m) = moving {
                    self.apply_move(m, true, false, &mut out)?;
                }
                let cs = &s.change_set;
                let echo = if cs.origin == self.me {
                    self.own_echo(cs)?
                } else {
                    None
                };
                if let Some(withdrawn) = echo {
                    if withdrawn && !cs.rows.is_empty() {
                        // The relay sequenced this change set in full — a copy still in
                        // flight on a connection the device had left — after the device had
                        // withdrawn it (written on top of a refused one). The log is the
                        // truth: it is applied back, like any remote change.
                        let mut ctx = Ctx {
                            conn: &self.conn,
                            cat: &self.cat,
                            origins: &mut self.origins,
                            out: &mut out,
                            strict: None,
                        };
                        ctx.apply(s)?;
                        self.conn
                            .prepare_cached(
                                "UPDATE ferry_log SET rejected = NULL WHERE origin = ?1 AND origin_seq = ?2",
                            )?
                            .execute(params![self.me_num, cs.origin_seq as i64])?;
                        tracing::warn!(
                            origin_seq = cs.origin_seq,
                            "a withdrawn change set was sequenced after all; applied back"
                        );
                    }
                    self.ack(cs.origin_seq, s.server_seq)?;
                    local_report.own += 1;
                } else {
                    let before = out.conflicts.len();
                    let me = self.guard_pending.then_some(crate::rollback::Me {
                        id: self.me,
                        num: self.me_num,
                        cursor: self.cursor,
                    });
                    let mut ctx = Ctx {
                        conn: &self.conn,
                        cat: &self.cat,
                        origins: &mut self.origins,
                        out: &mut out,
                        strict: me.as_ref(),
                    };
                    ctx.apply(s)?;
                    if me.is_some() {
                        // It may have withdrawn the pending guarded change sets it dooms.
                        self.guard_pending = crate::rollback::guard_pending(&self.conn)?;
                    }
                    local_report.applied += 1;
                    local_report.conflicts += out.conflicts.len() - before;
                    self.clock.observe(cs.hlc);
                    self.remote_hlc = self.remote_hlc.max(cs.hlc);
                }
                if let Some(m) = moving {
                    self.apply_move(m, false, true, &mut out)?;
                    mv += 1;
                }
                self.cursor = s.server_seq;
            }
            for m in &moves[mv..] {
                if m.server_seq > self.cursor {
                    self.apply_move(m, true, true, &mut out)?;
                }
            }
            if let Some(u) = up_to
                && u > self.cursor
            {
                self.cursor = u;
            }
            db::meta_set(&self.conn, "cursor", self.cursor as i64)?;
            db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
            db::meta_set(&self.conn, "remote_hlc", self.remote_hlc.0 as i64)?;
            self.gate(false)?;
            Ok(())
        })();
        if let Err(e) = self.finish_txn(r) {
            self.cursor = cursor_before;
            self.clock = clock_before;
            return Err((failed_at, e));
        }
        *report = local_report;
        if !out.tables.is_empty() {
            notes.events.push(ChangeEvent {
                tables: std::mem::take(&mut out.tables),
                source: ChangeSource::Remote,
            });
        }
        notes.conflicts.append(&mut out.conflicts);
        Ok(out.followups)
    }

    /// Applies the backfill and/or evictions of one scope move (inside the chunk's transaction).
    fn apply_move(
        &mut self,
        m: &Move,
        backfill: bool,
        evict: bool,
        out: &mut Outcome,
    ) -> Result<()> {
        if m.server_seq <= self.cursor {
            return Ok(()); // delivered before
        }
        let mut ctx = Ctx {
            conn: &self.conn,
            cat: &self.cat,
            origins: &mut self.origins,
            out,
            strict: None,
        };
        if backfill {
            for b in &m.backfill {
                ctx.apply(b)?;
                self.clock.observe(b.change_set.hlc);
                self.remote_hlc = self.remote_hlc.max(b.change_set.hlc);
            }
        }
        if evict {
            for k in &m.evict {
                ctx.evict(&k.table, &k.pk)?;
            }
        }
        Ok(())
    }

    /// For this replica's own change set coming back in the stream: `Some(withdrawn)` when
    /// it is the one this replica logged under that `origin_seq` (one lookup for both).
    fn own_echo(&self, cs: &ChangeSet) -> Result<Option<bool>> {
        let row: Option<(Vec<u8>, bool)> = self
            .conn
            .prepare_cached(
                "SELECT id, rejected IS NOT NULL FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
            )?
            .query_row(params![self.me_num, cs.origin_seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.and_then(|(id, withdrawn)| (id == cs.id).then_some(withdrawn)))
    }

    fn rotate_identity(&mut self) -> Result<ReplicaId> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            let new = ReplicaId::generate();
            let num = self.origins.intern(&self.conn, new)?;
            db::meta_set(&self.conn, "replica_id", new.0.to_vec())?;
            let old: Vec<Unacked> = self
                .conn
                .prepare(
                    "SELECT seq, hlc, base, raw, wire, guarded, rejected FROM ferry_log
                     WHERE server_seq IS NULL AND reissued IS NULL ORDER BY seq",
                )?
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut oseq = 1u64;
            for (seq, hlc, base, raw, wire, guarded, rejected) in old {
                let id = ulid::Ulid::generate().to_bytes();
                let wire = match wire {
                    Some(w) => {
                        let mut cs: ChangeSet = rmp_serde::from_slice(&w)?;
                        cs.origin = new;
                        cs.origin_seq = oseq;
                        cs.id = id;
                        Some(rmp_serde::to_vec_named(&cs)?)
                    }
                    None => None,
                };
                self.conn.execute(
                    "INSERT INTO ferry_log(origin, origin_seq, id, hlc, base, raw, wire, guarded, rejected) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![num, oseq as i64, id.to_vec(), hlc, base, raw, wire, guarded, rejected],
                )?;
                let new_seq = self.conn.last_insert_rowid();
                self.conn.execute(
                    "UPDATE ferry_undo SET seq = ?1 WHERE seq = ?2",
                    params![new_seq, seq],
                )?;
                self.conn.execute(
                    "UPDATE ferry_log SET reissued = ?1, raw = NULL, wire = NULL WHERE seq = ?2",
                    params![new_seq, seq],
                )?;
                oseq += 1;
            }
            Ok((new, num, oseq))
        })();
        let (new, num, next) = self.finish_txn(r)?;
        tracing::warn!(old = %self.me, new = %new, "replica id rotated; unacknowledged changes re-issued");
        self.me = new;
        self.me_num = num;
        self.next_oseq = next;
        Ok(new)
    }
}

/// Re-runs the watched queries a commit may have changed (under the database lock).
pub(crate) fn collect_watches(registry: &Mutex<Registry>, db: &mut Db, notes: &mut Notes) {
    if notes.events.is_empty() {
        return;
    }
    let touched: BTreeSet<&String> = notes.events.iter().flat_map(|e| e.tables.iter()).collect();
    let watches: Vec<Arc<Watch>> = registry.lock().watches.values().cloned().collect();
    for w in watches {
        if !w.tables.iter().any(|t| touched.contains(t)) {
            continue;
        }
        match run_query(&db.conn, &db.auth, &w.sql, &w.params) {
            Ok(rows) => {
                let mut last = w.last.lock();
                if last.as_ref() != Some(&rows) {
                    *last = Some(rows.clone());
                    drop(last);
                    notes.watch_results.push((Arc::clone(&w), rows));
                }
            }
            Err(e) => tracing::warn!(error = %e, sql = %w.sql, "watched query failed"),
        }
    }
}

/// Delivers notifications gathered under the lock (after it is released).
pub(crate) fn deliver(registry: &Mutex<Registry>, notes: Notes) {
    if notes.events.is_empty() && notes.conflicts.is_empty() && notes.watch_results.is_empty() {
        return;
    }
    let observers: Vec<Arc<dyn Observer>> = registry.lock().observers.values().cloned().collect();
    for o in &observers {
        for e in &notes.events {
            o.on_change(e);
        }
        for c in &notes.conflicts {
            o.on_conflict(c);
        }
    }
    for (w, rows) in notes.watch_results {
        // A watch cancelled meanwhile is no longer in the registry: skip it.
        if registry.lock().watches.values().any(|x| Arc::ptr_eq(x, &w)) {
            (w.callback)(&rows);
        }
    }
}
