//! The embedded SQLite store: one file, one writer thread, a pool of readers.
//!
//! Sequencing is done by a single writer thread, so `server_seq = head + 1` is gap-free and in
//! commit order by construction. The writer drains every push waiting in its queue into one
//! transaction (group commit): under load many connections share one fsync, and a push is
//! answered only after that transaction commits with `synchronous = FULL` in WAL mode, so an
//! acknowledged change set survives a crash of the process or the machine. Readers use their
//! own connections and never block the writer (WAL).

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::clock::now_ms;
use crate::compact::Compaction;
use crate::error::{RelayError, Result};
use crate::feed::Feed;
use crate::history::{self, Folder, RowHistory};
use crate::scoping::{self, RowScope, RowScopes};
use crate::store::job::{self, Job, JobQueue, PushJob, lease_name};
use crate::store::rule::{self, Decision};
use crate::store::scoped::{self, ReadFilter, ScopedRead};
use crate::store::snapshot::{self, PageBuilder, SnapshotKey, SnapshotPage, SnapshotSize};
use crate::store::{
    CompactReport, PushOutcome, Store, StoreStats, StoredSet, decode_set, encode_set,
};
use async_trait::async_trait;
use ferry_core::admission::{Bounds, OriginState};
use ferry_core::cas::{CasIndex, CasUpdate, CellStamp, RowStamp};
use ferry_core::hlc::Hlc;
use ferry_core::lease::{self, LeaseState};
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{ChangeSet, ReplicaId, Value};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

/// Format version of the relay's SQLite file (`PRAGMA user_version`).
const FORMAT: i64 = 7;

const SCHEMA_V1: &str = "
CREATE TABLE sets(
    server_seq INTEGER PRIMARY KEY,
    origin BLOB NOT NULL,
    origin_seq INTEGER NOT NULL,
    id BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX sets_origin ON sets(origin, origin_seq);
CREATE TABLE origins(origin BLOB PRIMARY KEY, max_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE row_scopes(
    tbl TEXT NOT NULL, pk BLOB NOT NULL, cl INTEGER NOT NULL, scope TEXT NOT NULL,
    hlc INTEGER NOT NULL, origin BLOB NOT NULL, PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE row_hist(
    tbl TEXT NOT NULL, pk BLOB NOT NULL, server_seq INTEGER NOT NULL,
    PRIMARY KEY (tbl, pk, server_seq)
) WITHOUT ROWID;
CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('horizon', 0);
";

/// Version 2: compare-and-set stamps and leases.
const SCHEMA_V2: &str = "
CREATE TABLE cas_rows(
    tbl TEXT NOT NULL, pk BLOB NOT NULL, cl INTEGER NOT NULL,
    row_seq INTEGER NOT NULL, row_origin BLOB NOT NULL,
    w_seq INTEGER NOT NULL, w_origin BLOB NOT NULL,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE cas_cells(
    tbl TEXT NOT NULL, pk BLOB NOT NULL, col TEXT NOT NULL,
    seq INTEGER NOT NULL, origin BLOB NOT NULL,
    PRIMARY KEY (tbl, pk, col)
) WITHOUT ROWID;
CREATE TABLE leases(
    name TEXT PRIMARY KEY, token INTEGER NOT NULL, holder BLOB NOT NULL, expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 3: the last non-counter write to a row by an origin other than the last writer's
/// (see `RowStamp::other`). Rows written before the upgrade start with none.
const SCHEMA_V3: &str = "
ALTER TABLE cas_rows ADD COLUMN o_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cas_rows ADD COLUMN o_origin BLOB NOT NULL DEFAULT x'';
";

/// Version 4: the per-scope read index (see `store::scoped`), filled from the stored bodies
/// on upgrade.
const SCHEMA_V4: &str = "
CREATE TABLE set_scopes(
    block INTEGER NOT NULL, scope TEXT NOT NULL, server_seq INTEGER NOT NULL,
    PRIMARY KEY (block, scope, server_seq)
) WITHOUT ROWID;
CREATE TABLE scopes(name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
";

/// Version 5: row histories for snapshots (see `history`), folded from the log behind the
/// `rows_seq` watermark; a store upgraded to it folds its existing log in the background.
const SCHEMA_V5: &str = "
CREATE TABLE rows(
    tbl TEXT NOT NULL, pk BLOB NOT NULL, scope TEXT NOT NULL, seq INTEGER NOT NULL,
    hist BLOB NOT NULL, PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE INDEX rows_scope ON rows(scope, tbl, pk);
INSERT INTO meta VALUES ('rows_seq', 0);
CREATE TABLE secrets(name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
";

/// Version 6: which subject owns each replica id (see `Store::claim`). Replicas that
/// connected before the upgrade are bound at their next hello.
const SCHEMA_V6: &str = "
CREATE TABLE owners(replica BLOB PRIMARY KEY, sub TEXT NOT NULL, since_ms INTEGER NOT NULL) WITHOUT ROWID;
";

/// Version 7: lease records are forgotten a while after they expire (`lease` module of
/// ferry-core); the index finds them, the `lease_floor` keeps tokens growing.
const SCHEMA_V7: &str = "
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_ms);
INSERT OR IGNORE INTO meta VALUES ('lease_floor', 0);
";

/// Page cache of the writer's connection, in KiB.
const WRITER_CACHE_KIB: i64 = 32 << 10;

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    feed: Arc<Feed>,
    cat: Arc<RelayCatalog>,
    secret: [u8; 32],
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn configure(conn: &Connection) -> Result<()> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    if pages == 0 {
        // A new store: compaction's freed pages can be given back (see `rewrite`).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

fn open_file(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    Ok(conn)
}

fn upgrade(conn: &mut Connection) -> Result<()> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v > FORMAT {
        return Err(RelayError::Store(format!(
            "store format {v} is newer than this relay understands ({FORMAT}); upgrade the relay"
        )));
    }
    if v < FORMAT {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if v < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        if v < 2 {
            // Stamps start empty: rows written before the upgrade are checked from their
            // next write on.
            tx.execute_batch(SCHEMA_V2)?;
        }
        if v < 3 {
            tx.execute_batch(SCHEMA_V3)?;
        }
        if v < 4 {
            tx.execute_batch(SCHEMA_V4)?;
            let mut indexed = 0u64;
            let mut st = tx.prepare("SELECT server_seq, body FROM sets ORDER BY server_seq")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let body: Vec<u8> = r.get(1)?;
                index_scopes(&tx, &decode_set(r.get(0)?, &body)?)?;
                indexed += 1;
            }
            drop(rows);
            drop(st);
            if indexed > 0 {
                tracing::info!(change_sets = indexed, "per-scope read index built");
            }
        }
        if v < 5 {
            tx.execute_batch(SCHEMA_V5)?;
            tx.execute(
                "INSERT INTO secrets(name, value) VALUES ('resume', ?1)",
                [rand::random::<[u8; 32]>().to_vec()],
            )?;
        }
        if v < 6 {
            tx.execute_batch(SCHEMA_V6)?;
        }
        if v < 7 {
            tx.execute_batch(SCHEMA_V7)?;
        }
        tx.pragma_update(None, "user_version", FORMAT)?;
        tx.commit()?;
    }
    Ok(())
}

/// The key snapshot resume tokens are sealed with (see `resume`).
fn read_secret(conn: &Connection) -> Result<[u8; 32]> {
    let v: Vec<u8> =
        conn.query_row("SELECT value FROM secrets WHERE name = 'resume'", [], |r| {
            r.get(0)
        })?;
    v.try_into()
        .map_err(|_| RelayError::Store("the stored resume-token key is damaged".into()))
}

fn head_of(conn: &Connection) -> Result<u64> {
    let h: i64 = conn.query_row("SELECT coalesce(max(server_seq), 0) FROM sets", [], |r| {
        r.get(0)
    })?;
    Ok(h as u64)
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir/relay.db`.
    pub fn open(dir: &Path, cat: Arc<RelayCatalog>, window: usize) -> Result<Arc<SqliteStore>> {
        Self::open_with_window_bytes(dir, cat, window, 64 << 20)
    }

    /// Opens with an explicit memory bound for the live window (bytes).
    pub fn open_with_window_bytes(
        dir: &Path,
        cat: Arc<RelayCatalog>,
        window: usize,
        window_bytes: usize,
    ) -> Result<Arc<SqliteStore>> {
        crate::private::dir(dir)?;
        let path = dir.join("relay.db");
        crate::private::file(&path)?;
        let mut conn = open_file(&path)?;
        // The writer's working set (the index pages a group commit and a fold touch) stays
        // in memory instead of being read back from the OS and spilled mid-transaction.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        upgrade(&mut conn)?;
        let head = head_of(&conn)?;
        let secret = read_secret(&conn)?;
        let feed = Arc::new(Feed::new(head, window, window_bytes));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn,
            feed: Arc::clone(&feed),
            cat: Arc::clone(&cat),
            head,
        };
        let handle = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || writer.run(rx))?;
        tracing::info!(path = %path.display(), head, "sqlite store opened");
        Ok(Arc::new(SqliteStore {
            path,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            readers: Mutex::new(Vec::new()),
            feed,
            cat,
            secret,
        }))
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = match self.readers.lock().pop() {
            Some(c) => c,
            None => open_file(&self.path)?,
        };
        let (conn, r) = tokio::task::spawn_blocking(move || {
            let r = f(&conn);
            (conn, r)
        })
        .await
        .map_err(|e| RelayError::Store(format!("reader task failed: {e}")))?;
        let mut pool = self.readers.lock();
        if pool.len() < 8 {
            pool.push(conn);
        }
        r
    }
}

impl JobQueue for SqliteStore {
    fn put(&self, job: Job) -> Result<()> {
        let g = self.jobs.lock();
        let tx = g.as_ref().ok_or(RelayError::ShuttingDown)?;
        tx.send(job).map_err(|_| RelayError::ShuttingDown)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn push(
        &self,
        grants: Arc<Grants>,
        bounds: Bounds,
        sets: Vec<ChangeSet>,
    ) -> Result<Vec<PushOutcome>> {
        job::push(self, grants, bounds, sets).await
    }

    async fn read(
        &self,
        after: u64,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<StoredSet>>> {
        self.with_reader(move |c| read_in_order(c, after, max_sets, max_bytes))
            .await
    }

    async fn read_scoped(
        &self,
        after: u64,
        filter: &ReadFilter,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<ScopedRead> {
        let filter = filter.clone();
        self.with_reader(move |c| read_scoped(c, after, &filter, max_sets, max_bytes))
            .await
    }

    async fn row_history(
        &self,
        table: &str,
        pk: &Value,
        before: u64,
    ) -> Result<Vec<Arc<StoredSet>>> {
        let table = table.to_owned();
        let pk = scoping::pk_key(pk)?;
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(
                "SELECT s.server_seq, s.body FROM row_hist h JOIN sets s ON s.server_seq = h.server_seq
                 WHERE h.tbl = ?1 AND h.pk = ?2 AND h.server_seq < ?3 ORDER BY h.server_seq",
            )?;
            let mut rows = st.query(params![table, pk, before as i64])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let body: Vec<u8> = r.get(1)?;
                out.push(Arc::new(decode_set(r.get(0)?, &body)?));
            }
            Ok(out)
        })
        .await
    }

    async fn fold_rows(&self, max_rows: usize) -> Result<u64> {
        job::fold(self, max_rows).await
    }

    fn secret(&self) -> [u8; 32] {
        self.secret
    }

    async fn snapshot_page(
        &self,
        filter: &ReadFilter,
        after: Option<SnapshotKey>,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<SnapshotPage> {
        let filter = filter.clone();
        self.with_reader(move |c| snapshot_page(c, &filter, after, max_rows, max_bytes))
            .await
    }

    async fn snapshot_size(
        &self,
        filter: &ReadFilter,
        after: Option<SnapshotKey>,
    ) -> Result<SnapshotSize> {
        let filter = filter.clone();
        self.with_reader(move |c| snapshot_size(c, &filter, after))
            .await
    }

    async fn lease(&self, holder: ReplicaId, request: LeaseRequest) -> Result<LeaseOutcome> {
        job::lease(self, holder, request).await
    }

    async fn first_position(&self, origin: ReplicaId) -> Result<Option<u64>> {
        self.with_reader(move |c| {
            let n: Option<i64> = c
                .prepare_cached(
                    "SELECT server_seq FROM sets WHERE origin = ?1 ORDER BY origin_seq LIMIT 1",
                )?
                .query_row([origin.0.to_vec()], |r| r.get(0))
                .optional()?;
            Ok(n.map(|n| n as u64))
        })
        .await
    }

    async fn claim(&self, replica: ReplicaId, sub: &str) -> Result<bool> {
        // Every hello after the first finds the owner on a reader; only a first one waits
        // for the writer.
        let owner = self
            .with_reader(move |c| {
                Ok(
                    c.prepare_cached("SELECT sub FROM owners WHERE replica = ?1")?
                        .query_row([replica.0.to_vec()], |r| r.get::<_, String>(0))
                        .optional()?,
                )
            })
            .await?;
        let owner = match owner {
            Some(o) => o,
            None => job::claim(self, replica, sub.to_owned()).await?,
        };
        Ok(owner == sub)
    }

    async fn max_origin_seq(&self, origin: ReplicaId) -> Result<u64> {
        self.with_reader(move |c| {
            let n: Option<i64> = c
                .prepare_cached("SELECT max_seq FROM origins WHERE origin = ?1")?
                .query_row([origin.0.to_vec()], |r| r.get(0))
                .optional()?;
            Ok(n.unwrap_or(0) as u64)
        })
        .await
    }

    async fn compact(&self, horizon: u64) -> Result<CompactReport> {
        let cat = Arc::clone(&self.cat);
        // Compute on a reader snapshot; bodies at or below the horizon only change here.
        let (rewrites, report) = self
            .with_reader(move |c| {
                let old: i64 =
                    c.query_row("SELECT value FROM meta WHERE key = 'horizon'", [], |r| {
                        r.get(0)
                    })?;
                let mut pass = Compaction::new(&cat, horizon, old as u64);
                let mut st =
                    c.prepare("SELECT server_seq, body FROM sets ORDER BY server_seq DESC")?;
                let mut rows = st.query([])?;
                while let Some(r) = rows.next()? {
                    let body: Vec<u8> = r.get(1)?;
                    pass.visit(r.get(0)?, &body)?;
                }
                Ok((pass.rewrites, pass.report))
            })
            .await?;
        job::rewrite(self, rewrites, report.horizon).await?;
        self.feed.clear_window();
        tracing::info!(?report, "history compacted");
        Ok(report)
    }

    async fn stats(&self) -> Result<StoreStats> {
        self.with_reader(|c| {
            let horizon: i64 =
                c.query_row("SELECT value FROM meta WHERE key = 'horizon'", [], |r| {
                    r.get(0)
                })?;
            let pages: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
            let size: i64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
            Ok(StoreStats {
                head: head_of(c)?,
                horizon: horizon as u64,
                bytes: (pages * size) as u64,
            })
        })
        .await
    }

    async fn head(&self) -> Result<u64> {
        // One writer publishes before it answers: the feed is never behind an ack.
        Ok(self.feed.head())
    }

    fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    async fn shutdown(&self) {
        drop(self.jobs.lock().take());
        let handle = self.writer.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

struct Writer {
    conn: Connection,
    feed: Arc<Feed>,
    cat: Arc<RelayCatalog>,
    head: u64,
}

struct SqlRows<'a>(&'a Connection);

impl RowScopes for SqlRows<'_> {
    fn get(&mut self, table: &str, pk: &Value) -> Result<Option<RowScope>> {
        let key = scoping::pk_key(pk)?;
        let row: Option<(i64, String, i64, Vec<u8>)> = self
            .0
            .prepare_cached(
                "SELECT cl, scope, hlc, origin FROM row_scopes WHERE tbl = ?1 AND pk = ?2",
            )?
            .query_row(params![table, key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        Ok(row.map(|(cl, scope, hlc, origin)| RowScope {
            cl: cl as u64,
            scope,
            hlc: Hlc(hlc as u64),
            origin: ReplicaId::from_slice(&origin).unwrap_or(ReplicaId([0; 16])),
        }))
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut pushes = Vec::new();
            let mut job = Some(first);
            loop {
                match job.take() {
                    Some(Job::Push {
                        grants,
                        bounds,
                        sets,
                        reply,
                    }) => pushes.push((grants, bounds, sets, reply)),
                    Some(Job::Rewrite {
                        sets,
                        horizon,
                        reply,
                    }) => {
                        self.flush(std::mem::take(&mut pushes));
                        let _ = reply.send(self.rewrite(sets, horizon));
                    }
                    Some(Job::Lease {
                        holder,
                        request,
                        reply,
                    }) => {
                        self.flush(std::mem::take(&mut pushes));
                        let _ = reply.send(self.lease(holder, &request));
                    }
                    Some(Job::Fold { max_rows, reply }) => {
                        self.flush(std::mem::take(&mut pushes));
                        let _ = reply.send(self.fold(max_rows));
                    }
                    Some(Job::Claim {
                        replica,
                        sub,
                        reply,
                    }) => {
                        self.flush(std::mem::take(&mut pushes));
                        let _ = reply.send(self.claim(replica, sub));
                    }
                    None => break,
                }
                if pushes.len() >= 256 {
                    break;
                }
                job = rx.try_recv().ok();
            }
            self.flush(pushes);
        }
        tracing::debug!("store writer stopped");
    }

    fn flush(&mut self, pushes: Vec<PushJob>) {
        if pushes.is_empty() {
            return;
        }
        let head_before = self.head;
        match self.sequence(&pushes) {
            Ok((outcomes, stored)) => {
                self.feed.publish(stored);
                for ((_, _, _, reply), out) in pushes.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                self.head = head_before;
                let unavailable = matches!(e, RelayError::StorageUnavailable(_));
                if unavailable {
                    tracing::warn!(error = %e, "push not stored: storage unavailable");
                } else {
                    tracing::error!(error = %e, "push transaction failed");
                }
                let msg = e.to_string();
                for (_, _, _, reply) in pushes {
                    let _ = reply.send(Err(if unavailable {
                        RelayError::StorageUnavailable(msg.clone())
                    } else {
                        RelayError::Store(msg.clone())
                    }));
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn sequence(
        &mut self,
        pushes: &[PushJob],
    ) -> Result<(Vec<Vec<PushOutcome>>, Vec<Arc<StoredSet>>)> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut all = Vec::with_capacity(pushes.len());
        let mut stored = Vec::new();
        let mut head = self.head;
        for (grants, bounds, sets, _) in pushes {
            let mut outcomes = Vec::with_capacity(sets.len());
            for cs in sets {
                match sequence_one(&tx, &self.cat, grants, bounds, cs, head + 1)? {
                    One::Existing(seq) => outcomes.push(PushOutcome::Acked(seq)),
                    One::New(s) => {
                        head += 1;
                        outcomes.push(PushOutcome::Acked(head));
                        stored.push(Arc::new(s));
                    }
                    One::Refused(e) => {
                        outcomes.push(PushOutcome::Refused(e));
                        break;
                    }
                }
            }
            all.push(outcomes);
        }
        tx.commit()?;
        self.head = head;
        Ok((all, stored))
    }

    /// Folds the log after the watermark into the row histories, in one transaction.
    fn fold(&mut self, max_rows: usize) -> Result<u64> {
        let started = std::time::Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let from: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'rows_seq'", [], |r| {
            r.get(0)
        })?;
        let mut sets = Vec::new();
        let mut rows = 0usize;
        {
            let mut st = tx.prepare_cached(
                "SELECT server_seq, body FROM sets WHERE server_seq > ?1 ORDER BY server_seq",
            )?;
            let mut found = st.query([from])?;
            while rows < max_rows
                && let Some(r) = found.next()?
            {
                let body: Vec<u8> = r.get(1)?;
                let s = decode_set(r.get(0)?, &body)?;
                rows += s.change_set.rows.len();
                sets.push(s);
            }
        }
        let mut stored = HashMap::new();
        {
            let mut load =
                tx.prepare_cached("SELECT scope, seq, hist FROM rows WHERE tbl = ?1 AND pk = ?2")?;
            for (t, pk) in history::keys(&sets)? {
                let found: Option<(String, i64, Vec<u8>)> = load
                    .query_row(params![t, pk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                if let Some((scope, seq, h)) = found {
                    let row = RowHistory {
                        scope,
                        seq: seq as u64,
                        history: history::decode(&h)?,
                    };
                    stored.insert((t, pk), row);
                }
            }
        }
        let folder = Folder::run(&self.cat, from as u64, &sets, stored)?;
        if folder.position == from as u64 {
            return Ok(folder.position);
        }
        let mut put = tx.prepare_cached(
            "INSERT INTO rows(tbl, pk, scope, seq, hist) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(tbl, pk) DO UPDATE SET scope = excluded.scope, seq = excluded.seq,
             hist = excluded.hist",
        )?;
        for ((t, pk), (_, row)) in &folder.rows {
            put.execute(params![
                t,
                pk,
                row.scope,
                row.seq as i64,
                history::encode(&row.history)?
            ])?;
        }
        drop(put);
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'rows_seq'",
            [folder.position as i64],
        )?;
        tx.commit()?;
        tracing::debug!(
            rows,
            position = folder.position,
            ms = started.elapsed().as_millis() as u64,
            "row histories folded"
        );
        Ok(folder.position)
    }

    fn claim(&mut self, replica: ReplicaId, sub: String) -> Result<String> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO owners(replica, sub, since_ms) VALUES (?1, ?2, ?3) ON CONFLICT(replica) DO NOTHING",
        )?
        .execute(params![replica.0.to_vec(), sub, now_ms() as i64])?;
        let owner: String = tx
            .prepare_cached("SELECT sub FROM owners WHERE replica = ?1")?
            .query_row([replica.0.to_vec()], |r| r.get(0))?;
        tx.commit()?;
        Ok(owner)
    }

    fn lease(&mut self, holder: ReplicaId, request: &LeaseRequest) -> Result<LeaseOutcome> {
        let name = lease_name(request);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        let floor = forget_leases(&tx, now)?;
        let state = load_lease(&tx, name)?;
        let (outcome, next) = lease::decide(now, state, floor, holder, request);
        if let Some(n) = next {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO leases(name, token, holder, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                name,
                n.token as i64,
                n.holder.0.to_vec(),
                n.expires_ms as i64
            ])?;
        }
        tx.commit()?;
        Ok(outcome)
    }

    fn rewrite(
        &mut self,
        sets: Vec<(StoredSet, Vec<(String, Value)>)>,
        horizon: u64,
    ) -> Result<()> {
        for chunk in sets.chunks(500) {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for (s, dropped) in chunk {
                tx.prepare_cached("UPDATE sets SET body = ?1 WHERE server_seq = ?2")?
                    .execute(params![encode_set(s)?, s.server_seq as i64])?;
                for (t, pk) in dropped {
                    tx.prepare_cached(
                        "DELETE FROM row_hist WHERE tbl = ?1 AND pk = ?2 AND server_seq = ?3",
                    )?
                    .execute(params![
                        t,
                        scoping::pk_key(pk)?,
                        s.server_seq as i64
                    ])?;
                }
            }
            tx.commit()?;
        }
        self.conn.execute(
            "UPDATE meta SET value = max(value, ?1) WHERE key = 'horizon'",
            [horizon as i64],
        )?;
        // Compaction shrank bodies: give the freed pages back (64 MiB at most per pass, so
        // pushes wait little; the next pass takes the rest).
        // The compaction itself is committed; a failure here only leaves pages free.
        match ferry_core::reclaim_sqlite_space(&self.conn, 16_384) {
            Ok(0) => {}
            Ok(pages) => tracing::info!(pages, "free pages given back after compaction"),
            Err(e) => tracing::warn!(error = %e, "free pages not given back after compaction"),
        }
        Ok(())
    }
}

enum One {
    Existing(u64),
    New(StoredSet),
    Refused(RelayError),
}

/// Sequences one change set inside the writer's transaction. SQL failures are errors (the
/// whole group fails); refusals are outcomes (nothing stored for this change set).
fn sequence_one(
    tx: &rusqlite::Transaction<'_>,
    cat: &RelayCatalog,
    grants: &Grants,
    bounds: &Bounds,
    cs: &ChangeSet,
    next: u64,
) -> Result<One> {
    let origin = cs.origin.0.to_vec();
    let existing: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT server_seq, id FROM sets WHERE origin = ?1 AND origin_seq = ?2")?
        .query_row(params![origin, cs.origin_seq as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let max: i64 = tx
        .prepare_cached("SELECT max_seq FROM origins WHERE origin = ?1")?
        .query_row([&origin], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let state = OriginState {
        existing: match existing {
            Some((seq, id)) => Some((seq as u64, rule::stored_id(&id)?)),
            None => None,
        },
        max_seq: max as u64,
    };
    let fence_lease = match &cs.fence {
        Some(f) => load_lease(tx, &f.lease)?,
        None => None,
    };
    let mut cx = rule::Context {
        cat,
        grants,
        rows: &mut SqlRows(tx),
        fence_lease,
        now_ms: now_ms(),
        stamps: &mut SqlCas(tx),
    };
    let accepted = match rule::decide(cs, &state, bounds, &mut cx)? {
        Decision::Existing(seq) => return Ok(One::Existing(seq)),
        Decision::Refused(e) => return Ok(One::Refused(e)),
        Decision::Accept(a) => a,
    };
    let stored = StoredSet {
        server_seq: next,
        change_set: cs.clone(),
        tags: accepted.tags,
    };
    tx.prepare_cached(
        "INSERT INTO sets(server_seq, origin, origin_seq, id, body) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        next as i64,
        origin,
        cs.origin_seq as i64,
        cs.id.to_vec(),
        encode_set(&stored)?
    ])?;
    tx.prepare_cached("INSERT OR REPLACE INTO origins(origin, max_seq) VALUES (?1, ?2)")?
        .execute(params![origin, cs.origin_seq as i64])?;
    for (table, pk, s) in &accepted.scopes {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO row_scopes(tbl, pk, cl, scope, hlc, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            table,
            scoping::pk_key(pk)?,
            s.cl as i64,
            s.scope,
            s.hlc.0 as i64,
            s.origin.0.to_vec()
        ])?;
    }
    record_stamps(tx, &accepted.stamps, next, cs.origin)?;
    index_scopes(tx, &stored)?;
    for (table, pk) in rule::history_keys(cat, cs)? {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO row_hist(tbl, pk, server_seq) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![table, pk, next as i64])?;
    }
    Ok(One::New(stored))
}

/// Indexes the scopes `s` touches (see `store::scoped`).
fn index_scopes(tx: &Connection, s: &StoredSet) -> Result<()> {
    let seq = s.server_seq as i64;
    let block = (s.server_seq / scoped::BLOCK) as i64;
    for scope in scoped::scopes_of(s) {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO set_scopes(block, scope, server_seq) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![block, scope, seq])?;
        tx.prepare_cached(
            "INSERT INTO scopes(name, last_seq) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        )?
        .execute(params![scope, seq])?;
    }
    Ok(())
}

/// The change sets after `after` that `filter` may read (see `store::scoped`), on one
/// read snapshot.
fn read_scoped(
    c: &Connection,
    after: u64,
    filter: &ReadFilter,
    max_sets: usize,
    max_bytes: usize,
) -> Result<ScopedRead> {
    let tx = c.unchecked_transaction()?;
    let head = head_of(&tx)?;
    if after >= head {
        return Ok(ScopedRead::at_head(after));
    }
    let scopes = match filter.prefixes() {
        Some(prefixes) => readable_scopes(&tx, prefixes, filter, after)?,
        None => None,
    };
    let Some(scopes) = scopes else {
        return Ok(ScopedRead::in_order(
            read_in_order(&tx, after, max_sets, max_bytes)?,
            head,
            filter,
        ));
    };
    let per = scoped::per_scope(scopes.len(), max_sets);
    let mut lists = Vec::with_capacity(scopes.len());
    {
        let mut st = tx.prepare_cached(
            "SELECT server_seq FROM set_scopes WHERE block = ?1 AND scope = ?2
             AND server_seq > ?3 AND server_seq <= ?4 ORDER BY server_seq LIMIT ?5",
        )?;
        for (scope, last) in &scopes {
            // One probe per block from the cursor's to the scope's last write.
            let mut l: Vec<u64> = Vec::new();
            let upto = head.min(*last);
            let mut block = (after + 1) / scoped::BLOCK;
            while block <= upto / scoped::BLOCK && l.len() < per {
                let mut rows = st.query(params![
                    block as i64,
                    scope,
                    after as i64,
                    upto as i64,
                    (per - l.len()) as i64
                ])?;
                while let Some(r) = rows.next()? {
                    l.push(r.get::<_, i64>(0)? as u64);
                }
                block += 1;
            }
            lists.push(l);
        }
    }
    let plan = scoped::merge(head, per, &lists, max_sets);
    let mut sets = Vec::with_capacity(plan.positions.len());
    let mut bytes = 0usize;
    let mut st = tx.prepare_cached("SELECT body FROM sets WHERE server_seq = ?1")?;
    for p in &plan.positions {
        let body: Vec<u8> = st.query_row([*p as i64], |r| r.get(0))?;
        if !sets.is_empty() && bytes + body.len() > max_bytes {
            // Complete up to the last one read.
            return Ok(ScopedRead::in_order(sets, head, filter));
        }
        bytes += body.len();
        sets.push(Arc::new(decode_set(*p as i64, &body)?));
    }
    Ok(ScopedRead::complete_to(sets, plan.up_to, filter))
}

/// The readable scopes with a write after `after` and their last positions, or `None` when
/// there are more than [`scoped::MAX_SCOPES`] (the log is then read in order).
fn readable_scopes(
    c: &Connection,
    prefixes: &[String],
    filter: &ReadFilter,
    after: u64,
) -> Result<Option<Vec<(String, u64)>>> {
    let mut out = Vec::new();
    for p in prefixes {
        let end = scoped::prefix_end(p);
        let mut st = c.prepare_cached(
            "SELECT name, last_seq FROM scopes WHERE name >= ?1 AND (?2 IS NULL OR name < ?2) AND last_seq > ?3",
        )?;
        let mut rows = st.query(params![p, end, after as i64])?;
        while let Some(r) = rows.next()? {
            let name: String = r.get(0)?;
            if filter.can_read(&name) {
                if out.len() == scoped::MAX_SCOPES {
                    return Ok(None);
                }
                out.push((name, r.get::<_, i64>(1)? as u64));
            }
        }
    }
    Ok(Some(out))
}

/// One page of a snapshot walk (see `store::snapshot`), on one read snapshot.
fn snapshot_page(
    c: &Connection,
    filter: &ReadFilter,
    after: Option<SnapshotKey>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<SnapshotPage> {
    let tx = c.unchecked_transaction()?;
    let position: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'rows_seq'", [], |r| {
        r.get(0)
    })?;
    let ranges = snapshot::ranges(filter);
    let mut page = PageBuilder::new(position as u64, max_rows, max_bytes);
    let mut at = match after {
        Some(k) => Some((k.scope, Some((k.table, k.pk)))),
        None => next_scope(&tx, &ranges, filter, None)?.map(|s| (s, None)),
    };
    while let Some((scope, from)) = at {
        let want = page.room();
        let (t0, pk0) = from.unwrap_or_default();
        let mut st = tx.prepare_cached(
            "SELECT tbl, pk, hist FROM rows WHERE scope = ?1 AND (tbl, pk) > (?2, ?3)
             ORDER BY tbl, pk LIMIT ?4",
        )?;
        let mut rows = st.query(params![scope, t0, pk0, want as i64])?;
        let mut n = 0;
        let mut last = None;
        while let Some(r) = rows.next()? {
            n += 1;
            let t: String = r.get(0)?;
            let pk: Vec<u8> = r.get(1)?;
            let h: Vec<u8> = r.get(2)?;
            last = Some((t.clone(), pk.clone()));
            if !page.push(&scope, t, &pk, &h)? {
                return Ok(page.finish(false));
            }
        }
        at = if n < want {
            next_scope(&tx, &ranges, filter, Some(&scope))?.map(|s| (s, None))
        } else {
            Some((scope, last))
        };
    }
    Ok(page.finish(true))
}

fn snapshot_size(
    c: &Connection,
    filter: &ReadFilter,
    after: Option<SnapshotKey>,
) -> Result<SnapshotSize> {
    let tx = c.unchecked_transaction()?;
    let ranges = snapshot::ranges(filter);
    let mut size = SnapshotSize::default();
    let mut at = match after {
        Some(k) => Some((k.scope, Some((k.table, k.pk)))),
        None => next_scope(&tx, &ranges, filter, None)?.map(|s| (s, None)),
    };
    while let Some((scope, from)) = at {
        let (t0, pk0) = from.unwrap_or_default();
        // Answered from the covering `rows_scope` index, without reading the histories.
        let rows: i64 = tx
            .prepare_cached(
                "SELECT count(*) FROM rows INDEXED BY rows_scope
                 WHERE scope = ?1 AND (tbl, pk) > (?2, ?3)",
            )?
            .query_row(params![scope, t0, pk0], |r| r.get(0))?;
        size.rows += rows as u64;
        at = next_scope(&tx, &ranges, filter, Some(&scope))?.map(|s| (s, None));
    }
    Ok(size)
}

/// The first readable scope after `after` (or the first of all) in the walk's ranges.
fn next_scope(
    c: &Connection,
    ranges: &[(String, Option<String>)],
    filter: &ReadFilter,
    after: Option<&str>,
) -> Result<Option<String>> {
    let mut st = c.prepare_cached(
        "SELECT name FROM scopes WHERE name >= ?1 AND name > ?2 AND (?3 IS NULL OR name < ?3)
         ORDER BY name LIMIT 256",
    )?;
    for (start, end) in ranges {
        if let (Some(a), Some(e)) = (after, end)
            && a >= e.as_str()
        {
            continue;
        }
        let mut from = after.map(str::to_owned);
        loop {
            let names: Vec<String> = st
                .query_map(params![start, from.as_deref().unwrap_or(""), end], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<_>>()?;
            if let Some(found) = names.iter().find(|n| filter.can_read(n)) {
                return Ok(Some(found.clone()));
            }
            match names.last() {
                Some(l) if names.len() == 256 => from = Some(l.clone()),
                _ => break,
            }
        }
    }
    Ok(None)
}

/// Stored change sets after `after` in order, at most `max_sets` and about `max_bytes`.
fn read_in_order(
    c: &Connection,
    after: u64,
    max_sets: usize,
    max_bytes: usize,
) -> Result<Vec<Arc<StoredSet>>> {
    let mut st = c.prepare_cached(
        "SELECT server_seq, body FROM sets WHERE server_seq > ?1 ORDER BY server_seq LIMIT ?2",
    )?;
    let mut rows = st.query(params![after as i64, max_sets.max(1) as i64])?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next()? {
        let body: Vec<u8> = r.get(1)?;
        if !out.is_empty() && bytes + body.len() > max_bytes {
            break;
        }
        bytes += body.len();
        out.push(Arc::new(decode_set(r.get(0)?, &body)?));
    }
    Ok(out)
}

/// Deletes a few long-expired lease records (see the `lease` module of ferry-core) and
/// returns the floor: the largest token ever forgotten.
fn forget_leases(tx: &Connection, now_ms: u64) -> Result<u64> {
    let forgotten: Option<i64> = tx
        .prepare_cached(
            "DELETE FROM leases WHERE name IN (SELECT name FROM leases WHERE expires_ms < ?1
             ORDER BY expires_ms LIMIT ?2) RETURNING token",
        )?
        .query_map(
            params![
                lease::forget_before(now_ms) as i64,
                lease::FORGET_PER_REQUEST as i64
            ],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<Vec<i64>>>()?
        .into_iter()
        .max();
    if let Some(t) = forgotten {
        tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'lease_floor'")?
            .execute([t])?;
    }
    let floor: i64 = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'lease_floor'")?
        .query_row([], |r| r.get(0))?;
    Ok(floor as u64)
}

fn load_lease(tx: &Connection, name: &str) -> Result<Option<LeaseState>> {
    let row: Option<(i64, Vec<u8>, i64)> = tx
        .prepare_cached("SELECT token, holder, expires_ms FROM leases WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(token, holder, expires)| {
        Ok(LeaseState {
            token: token as u64,
            holder: ReplicaId::from_slice(&holder)
                .ok_or_else(|| RelayError::Store("lease holder is not 16 bytes".into()))?,
            expires_ms: expires as u64,
        })
    })
    .transpose()
}

/// `(cl, row_seq, row_origin, w_seq, w_origin, o_seq, o_origin)` of `cas_rows`.
type StampRow = (i64, i64, Vec<u8>, i64, Vec<u8>, i64, Vec<u8>);

/// The compare-and-set stamps, read inside the sequencing transaction.
struct SqlCas<'a>(&'a Connection);

fn origin_of(b: &[u8]) -> ReplicaId {
    ReplicaId::from_slice(b).unwrap_or(ReplicaId([0; 16]))
}

impl CasIndex for SqlCas<'_> {
    fn row(&mut self, table: &str, pk: &Value) -> ferry_core::Result<Option<RowStamp>> {
        let key =
            scoping::pk_key(pk).map_err(|e| ferry_core::Error::InvalidChangeSet(e.to_string()))?;
        let row: Option<StampRow> = self
            .0
            .prepare_cached(
                "SELECT cl, row_seq, row_origin, w_seq, w_origin, o_seq, o_origin FROM cas_rows WHERE tbl = ?1 AND pk = ?2",
            )?
            .query_row(params![table, key], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()?;
        Ok(row.map(|(cl, rs, ro, ws, wo, os, oo)| RowStamp {
            cl: cl as u64,
            row: CellStamp {
                seq: rs as u64,
                origin: origin_of(&ro),
            },
            write: CellStamp {
                seq: ws as u64,
                origin: origin_of(&wo),
            },
            other: CellStamp {
                seq: os as u64,
                origin: origin_of(&oo),
            },
        }))
    }

    fn cells(&mut self, table: &str, pk: &Value) -> ferry_core::Result<Vec<(String, CellStamp)>> {
        let key =
            scoping::pk_key(pk).map_err(|e| ferry_core::Error::InvalidChangeSet(e.to_string()))?;
        let mut st = self
            .0
            .prepare_cached("SELECT col, seq, origin FROM cas_cells WHERE tbl = ?1 AND pk = ?2")?;
        let rows = st.query_map(params![table, key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (c, seq, o) = row?;
            out.push((
                c,
                CellStamp {
                    seq: seq as u64,
                    origin: origin_of(&o),
                },
            ));
        }
        Ok(out)
    }
}

/// Writes the stamps of a change set sequenced at `seq`.
fn record_stamps(tx: &Connection, stamps: &[CasUpdate], seq: u64, origin: ReplicaId) -> Result<()> {
    let o = origin.0.to_vec();
    for u in stamps {
        let key = scoping::pk_key(&u.pk)?;
        if u.row_level {
            tx.prepare_cached("DELETE FROM cas_cells WHERE tbl = ?1 AND pk = ?2")?
                .execute(params![u.table, key])?;
        }
        if u.write {
            // SET expressions see the row as it was: the previous writer becomes `o_*` when
            // this write comes from another origin (RowStamp::wrote).
            tx.prepare_cached(
                "INSERT INTO cas_rows(tbl, pk, cl, row_seq, row_origin, w_seq, w_origin, o_seq, o_origin)
                 VALUES (?1, ?2, ?3, CASE WHEN ?6 THEN ?4 ELSE 0 END, CASE WHEN ?6 THEN ?5 ELSE x'' END, ?4, ?5, 0, x'')
                 ON CONFLICT (tbl, pk) DO UPDATE SET cl = excluded.cl,
                 row_seq = CASE WHEN ?6 THEN excluded.row_seq ELSE cas_rows.row_seq END,
                 row_origin = CASE WHEN ?6 THEN excluded.row_origin ELSE cas_rows.row_origin END,
                 o_seq = CASE WHEN cas_rows.w_origin = excluded.w_origin THEN cas_rows.o_seq ELSE cas_rows.w_seq END,
                 o_origin = CASE WHEN cas_rows.w_origin = excluded.w_origin THEN cas_rows.o_origin ELSE cas_rows.w_origin END,
                 w_seq = excluded.w_seq, w_origin = excluded.w_origin",
            )?
            .execute(params![u.table, key, u.cl as i64, seq as i64, o, u.row_level])?;
        }
        for c in &u.cells {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO cas_cells(tbl, pk, col, seq, origin) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![u.table, key, c, seq as i64, o])?;
        }
    }
    Ok(())
}
