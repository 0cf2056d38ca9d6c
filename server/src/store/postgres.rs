//! The PostgreSQL store: several stateless relay nodes over one database.
//!
//! Why PostgreSQL and not a cluster of relays: when one machine is not enough, the hard parts
//! (replication, failover, backups, point-in-time recovery) are already solved by the
//! database an operator runs anyway. Relay nodes keep no state of their own that matters;
//! any node can serve any client, and a node that dies loses nothing that was acknowledged.
//!
//! How the log stays gap-free and in commit order with writers on several nodes
//! (`docs/adr/0001-postgres-sequencing.md`): every sequencing transaction first takes one
//! transaction-scoped advisory lock, then reads the head and numbers its change sets
//! `head + 1 …`. The lock is released only after the commit is visible, so the next writer
//! (on any node) reads a head that includes it: positions are assigned in commit order and a
//! transaction that rolls back consumed none. A reader's snapshot therefore always holds a
//! prefix `1..=n` of the log. Each node batches the pushes waiting on it into one such
//! transaction (group commit), so the lock is taken once per batch, not per change set.
//!
//! Compare-and-set stamps, row scopes, origins and leases are read and written inside the
//! same locked transaction, so the checks are linearizable across nodes exactly as they are
//! in the single-writer SQLite store; lease expiry is decided by the database's clock, the
//! one clock every node shares.
//!
//! Fan-out across nodes: the sequencing transaction sends `NOTIFY ferry_sets` (delivered on
//! commit). Each node runs a publisher that, when notified, when its own writer commits, or
//! every [`CATCH_UP`] in case a notification was lost (a dropped LISTEN connection), reads
//! the log after its feed's head and publishes it, in order, to its connections.

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::compact::Compaction;
use crate::error::{RelayError, Result};
use crate::feed::Feed;
use crate::scoping;
use crate::store::job::{self, Job, JobQueue, PushJob, lease_name};
use crate::store::scoped::{self, ReadFilter, ScopedRead};
use crate::store::snapshot::{SnapshotKey, SnapshotPage, SnapshotSize};
use crate::store::{
    CompactReport, PushOutcome, Store, StoreStats, StoredSet, decode_set, encode_set,
};
use crate::store::{pg_batch, pg_rows};
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use ferry_core::admission::Bounds;
use ferry_core::lease::{self, LeaseState};
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{ChangeSet, ReplicaId, Value};
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// Schema format this relay writes (`ferry_meta.format`).
const FORMAT: i64 = 6;

/// Advisory lock serializing sequencing (pushes, leases, compaction rewrites) across nodes.
const SEQ_LOCK: i64 = 0x4665_7272_7953_6571; // "FerrySeq"
/// Advisory lock serializing schema creation and upgrades when nodes start together.
const SCHEMA_LOCK: i64 = 0x4665_7272_7953_6368; // "FerrySch"
/// Most pushes sequenced in one transaction.
const MAX_BATCH: usize = 512;
/// The notification channel.
const CHANNEL: &str = "ferry_sets";
/// How often a node reads the log even without a notification.
pub const CATCH_UP: Duration = Duration::from_millis(500);

const SCHEMA_V1: &str = "
CREATE TABLE ferry_meta(key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE ferry_sets(
    server_seq BIGINT PRIMARY KEY,
    origin BYTEA NOT NULL,
    origin_seq BIGINT NOT NULL,
    id BYTEA NOT NULL,
    body BYTEA NOT NULL,
    UNIQUE (origin, origin_seq)
);
CREATE TABLE ferry_origins(origin BYTEA PRIMARY KEY, max_seq BIGINT NOT NULL);
CREATE TABLE ferry_row_scopes(
    tbl TEXT NOT NULL, pk BYTEA NOT NULL, cl BIGINT NOT NULL, scope TEXT NOT NULL,
    hlc BIGINT NOT NULL, origin BYTEA NOT NULL, PRIMARY KEY (tbl, pk)
);
CREATE TABLE ferry_row_hist(
    tbl TEXT NOT NULL, pk BYTEA NOT NULL, server_seq BIGINT NOT NULL,
    PRIMARY KEY (tbl, pk, server_seq)
);
CREATE TABLE ferry_cas_rows(
    tbl TEXT NOT NULL, pk BYTEA NOT NULL, cl BIGINT NOT NULL,
    row_seq BIGINT NOT NULL, row_origin BYTEA NOT NULL,
    w_seq BIGINT NOT NULL, w_origin BYTEA NOT NULL,
    PRIMARY KEY (tbl, pk)
);
CREATE TABLE ferry_cas_cells(
    tbl TEXT NOT NULL, pk BYTEA NOT NULL, col TEXT NOT NULL,
    seq BIGINT NOT NULL, origin BYTEA NOT NULL,
    PRIMARY KEY (tbl, pk, col)
);
CREATE TABLE ferry_leases(
    name TEXT PRIMARY KEY, token BIGINT NOT NULL, holder BYTEA NOT NULL, expires_ms BIGINT NOT NULL
);
INSERT INTO ferry_meta VALUES ('format', 1), ('horizon', 0);
";

/// Format 2: the last non-counter write to a row by an origin other than the last writer's
/// (see `RowStamp::other`). Rows written before the upgrade start with none.
const SCHEMA_V2: &str = "
ALTER TABLE ferry_cas_rows ADD COLUMN o_seq BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN o_origin BYTEA NOT NULL DEFAULT ''::bytea;
";

/// Format 3: the per-scope read index (see `store::scoped`), filled from the stored bodies
/// on upgrade. Byte-order collation, so a scope prefix is one index range.
const SCHEMA_V3: &str = r#"
CREATE TABLE ferry_set_scopes(
    scope TEXT COLLATE "C" NOT NULL, server_seq BIGINT NOT NULL, PRIMARY KEY (scope, server_seq)
);
CREATE TABLE ferry_scopes(name TEXT COLLATE "C" PRIMARY KEY, last_seq BIGINT NOT NULL);
"#;

/// Format 5: which subject owns each replica id (see `Store::claim`).
const SCHEMA_V5: &str = "
CREATE TABLE ferry_owners(replica BYTEA PRIMARY KEY, sub TEXT NOT NULL, since_ms BIGINT NOT NULL);
";

/// Format 6: lease records are forgotten a while after they expire (`lease` module of
/// ferry-core); the index finds them, the `lease_floor` keeps tokens growing.
const SCHEMA_V6: &str = "
CREATE INDEX IF NOT EXISTS ferry_leases_expiry ON ferry_leases(expires_ms);
INSERT INTO ferry_meta VALUES ('lease_floor', 0) ON CONFLICT DO NOTHING;
";

/// Migrations by the format they produce; each runs in the upgrade transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, pg_rows::SCHEMA_V4),
    (5, SCHEMA_V5),
    (6, SCHEMA_V6),
];

/// The subject owning `replica`, binding it to `sub` if none does. Needs no writer: of
/// concurrent first hellos on any nodes, the primary key lets one insert win and the others
/// read the winner's row.
async fn claim_owner(pool: &Pool, replica: ReplicaId, sub: &str) -> Result<String> {
    let c = pool.get().await?;
    let find = c
        .prepare_cached("SELECT sub FROM ferry_owners WHERE replica = $1")
        .await?;
    let id = replica.0.as_slice();
    if let Some(r) = c.query_opt(&find, &[&id]).await? {
        return Ok(r.get(0));
    }
    let insert = format!(
        "INSERT INTO ferry_owners(replica, sub, since_ms) VALUES ($1, $2, {NOW_MS}) ON CONFLICT (replica) DO NOTHING"
    );
    c.execute(insert.as_str(), &[&id, &sub]).await?;
    Ok(c.query_one(&find, &[&id]).await?.get(0))
}

const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

impl From<tokio_postgres::Error> for RelayError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message (`db_error`) says more than the generic `Display`.
        match e.as_db_error() {
            Some(db) if *db.code() == tokio_postgres::error::SqlState::DISK_FULL => {
                RelayError::StorageUnavailable(format!("postgres: {db}"))
            }
            Some(db) => RelayError::Store(format!("postgres: {}: {}", db.code().code(), db)),
            None => RelayError::Store(format!("postgres: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for RelayError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RelayError::Store(format!("postgres pool: {e}"))
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: Pool,
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop: CancellationToken,
    feed: Arc<Feed>,
    cat: Arc<RelayCatalog>,
    secret: [u8; 32],
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// A store setting with the password of a `postgres://user:password@…` URL replaced, for
/// printing (`check-config`) and logs.
pub fn redact_url(store: &str) -> String {
    let Some((scheme, rest)) = store.split_once("://") else {
        return store.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return store.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => store.to_owned(),
    }
}

/// Parses a `postgres://` URL into a client configuration (the password is never logged).
fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
        RelayError::Config(format!(
            "store: not a usable postgres:// URL ({e}); expected postgres://user:password@host:port/database"
        ))
    })?;
    if cfg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(RelayError::Config(
            "store: sslmode=require, but this build connects to PostgreSQL without TLS; use a private network or a local TLS tunnel and drop sslmode".into(),
        ));
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    cfg.application_name("ferry-relay");
    // A node frozen mid-transaction (a stop-the-world pause, a hung VM) would hold the
    // sequencing lock and stall every node: the server ends such a transaction after 10 s,
    // releasing the lock; the frozen node's commit then fails and its clients retry.
    if cfg.get_options().is_none() {
        cfg.options("-c idle_in_transaction_session_timeout=10000");
    }
    Ok(cfg)
}

impl PgStore {
    /// Connects to `url`, creates or upgrades the schema, and starts the node's writer and
    /// publisher. Must be called inside a tokio runtime.
    pub async fn open(
        url: &str,
        cat: Arc<RelayCatalog>,
        window: usize,
        window_bytes: usize,
    ) -> Result<Arc<PgStore>> {
        let cfg = pg_config(url)?;
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| RelayError::Config(format!("store: postgres pool: {e}")))?;
        {
            let mut c = pool.get().await.map_err(|e| {
                RelayError::Store(format!(
                    "cannot connect to PostgreSQL at {}: {e}",
                    describe(&cfg)
                ))
            })?;
            upgrade(&mut c).await?;
        }
        let head = head_of(&pool.get().await?).await?;
        let secret = pg_rows::secret(&pool.get().await?).await?;
        let feed = Arc::new(Feed::new(head, window, window_bytes));
        let stop = CancellationToken::new();
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        let writer = Writer {
            pool: pool.clone(),
            cat: Arc::clone(&cat),
            local: local_tx,
        };
        let publisher = Publisher {
            pool: pool.clone(),
            cfg,
            feed: Arc::clone(&feed),
            pending: BTreeMap::new(),
        };
        let tasks = vec![
            tokio::spawn(writer.run(jobs_rx)),
            tokio::spawn(publisher.run(local_rx, stop.clone())),
        ];
        tracing::info!(head, "postgres store opened");
        Ok(Arc::new(PgStore {
            pool,
            jobs: Mutex::new(Some(jobs_tx)),
            tasks: Mutex::new(tasks),
            stop,
            feed,
            cat,
            secret,
        }))
    }
}

/// Checks a `postgres://` URL without connecting (for `check-config`).
pub fn check_url(url: &str) -> Result<()> {
    pg_config(url).map(|_| ())
}

/// `host:port/db` of a configuration, for messages (no credentials).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or("postgres"))
}

async fn upgrade(c: &mut deadpool_postgres::Object) -> Result<()> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('ferry_meta') IS NOT NULL", &[])
        .await?
        .get(0);
    let v: i64 = if exists {
        tx.query_opt("SELECT value FROM ferry_meta WHERE key = 'format'", &[])
            .await?
            .map_or(0, |r| r.get(0))
    } else {
        0
    };
    if v > FORMAT {
        return Err(RelayError::Store(format!(
            "the PostgreSQL store has format {v}, newer than this relay understands ({FORMAT}); upgrade the relay"
        )));
    }
    for (to, sql) in MIGRATIONS {
        if v < *to {
            tx.batch_execute(sql).await?;
            tracing::info!(format = to, "postgres store schema upgraded");
        }
    }
    if v < 3 {
        index_existing(&tx).await?;
    }
    tx.execute(
        "UPDATE ferry_meta SET value = $1 WHERE key = 'format'",
        &[&FORMAT],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Fills the per-scope read index from the stored bodies (upgrade to format 3).
async fn index_existing(tx: &deadpool_postgres::Transaction<'_>) -> Result<()> {
    let mut after = 0i64;
    let mut indexed = 0u64;
    loop {
        let rows = tx
            .query(
                "SELECT server_seq, body FROM ferry_sets WHERE server_seq > $1 ORDER BY server_seq LIMIT 1000",
                &[&after],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let mut index = pg_batch::ScopeIndex::default();
        for r in &rows {
            index.add(&decode_set(r.get(0), r.get::<_, &[u8]>(1))?);
        }
        index.write(tx).await?;
        indexed += rows.len() as u64;
    }
    if indexed > 0 {
        tracing::info!(change_sets = indexed, "per-scope read index built");
    }
    Ok(())
}

/// The change sets after `after` that `filter` may read (see `store::scoped`). The head is
/// read first: every later statement sees the whole log up to it, index included.
async fn read_scoped(
    c: &deadpool_postgres::Object,
    after: u64,
    filter: &ReadFilter,
    max_sets: usize,
    max_bytes: usize,
) -> Result<ScopedRead> {
    let head = head_of(c).await?;
    if after >= head {
        return Ok(ScopedRead::at_head(after));
    }
    let scopes = match filter.prefixes() {
        Some(prefixes) => readable_scopes(c, prefixes, filter, after).await?,
        None => None,
    };
    let Some(scopes) = scopes else {
        return Ok(ScopedRead::in_order(
            read_after(c, after, max_sets, max_bytes).await?,
            head,
            filter,
        ));
    };
    let per = scoped::per_scope(scopes.len(), max_sets);
    let mut lists = vec![Vec::new(); scopes.len()];
    if !scopes.is_empty() {
        let st = c
            .prepare_cached(
                r#"SELECT k.i, p.server_seq FROM unnest($1::text[]) WITH ORDINALITY AS k(name, i)
                 CROSS JOIN LATERAL (
                     SELECT s.server_seq FROM ferry_set_scopes s
                     WHERE s.scope = k.name COLLATE "C" AND s.server_seq > $2 AND s.server_seq <= $3
                     ORDER BY s.server_seq LIMIT $4
                 ) p ORDER BY k.i, p.server_seq"#,
            )
            .await?;
        let rows = c
            .query(
                &st,
                &[&scopes, &(after as i64), &(head as i64), &(per as i64)],
            )
            .await?;
        for r in rows {
            let i: i64 = r.get(0);
            let seq: i64 = r.get(1);
            if let Some(l) = usize::try_from(i - 1).ok().and_then(|i| lists.get_mut(i)) {
                l.push(seq as u64);
            }
        }
    }
    let plan = scoped::merge(head, per, &lists, max_sets);
    let positions: Vec<i64> = plan.positions.iter().map(|p| *p as i64).collect();
    let st = c
        .prepare_cached(
            "SELECT server_seq, body FROM ferry_sets WHERE server_seq = ANY($1) ORDER BY server_seq",
        )
        .await?;
    let rows = c.query(&st, &[&positions]).await?;
    let mut sets = Vec::with_capacity(rows.len());
    let mut bytes = 0usize;
    for r in rows {
        let body: &[u8] = r.get(1);
        if !sets.is_empty() && bytes + body.len() > max_bytes {
            // Complete up to the last one read.
            return Ok(ScopedRead::in_order(sets, head, filter));
        }
        bytes += body.len();
        sets.push(Arc::new(decode_set(r.get(0), body)?));
    }
    Ok(ScopedRead::complete_to(sets, plan.up_to, filter))
}

/// The readable scopes with a write after `after`, or `None` when there are more than
/// [`scoped::MAX_SCOPES`] (the log is then read in order).
async fn readable_scopes(
    c: &deadpool_postgres::Object,
    prefixes: &[String],
    filter: &ReadFilter,
    after: u64,
) -> Result<Option<Vec<String>>> {
    let mut out = Vec::new();
    for p in prefixes {
        let rows = match scoped::prefix_end(p) {
            Some(end) => {
                let st = c
                    .prepare_cached(
                        r#"SELECT name FROM ferry_scopes WHERE name >= $1::text COLLATE "C"
                         AND name < $2::text COLLATE "C" AND last_seq > $3"#,
                    )
                    .await?;
                c.query(&st, &[p, &end, &(after as i64)]).await?
            }
            None => {
                let st = c
                    .prepare_cached(
                        r#"SELECT name FROM ferry_scopes WHERE name >= $1::text COLLATE "C" AND last_seq > $2"#,
                    )
                    .await?;
                c.query(&st, &[p, &(after as i64)]).await?
            }
        };
        for r in rows {
            let name: String = r.get(0);
            if filter.can_read(&name) {
                if out.len() == scoped::MAX_SCOPES {
                    return Ok(None);
                }
                out.push(name);
            }
        }
    }
    Ok(Some(out))
}

async fn head_of(c: &impl GenericClient) -> Result<u64> {
    let h: i64 = c
        .query_one("SELECT coalesce(max(server_seq), 0) FROM ferry_sets", &[])
        .await?
        .get(0);
    Ok(h as u64)
}

async fn read_after(
    c: &deadpool_postgres::Object,
    after: u64,
    max_sets: usize,
    max_bytes: usize,
) -> Result<Vec<Arc<StoredSet>>> {
    let st = c
        .prepare_cached(
            "SELECT server_seq, body FROM ferry_sets WHERE server_seq > $1 ORDER BY server_seq LIMIT $2",
        )
        .await?;
    let rows = c
        .query(&st, &[&(after as i64), &(max_sets.max(1) as i64)])
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut bytes = 0usize;
    for r in rows {
        let body: &[u8] = r.get(1);
        if !out.is_empty() && bytes + body.len() > max_bytes {
            break;
        }
        bytes += body.len();
        out.push(Arc::new(decode_set(r.get(0), body)?));
    }
    Ok(out)
}

impl JobQueue for PgStore {
    fn put(&self, job: Job) -> Result<()> {
        let g = self.jobs.lock();
        let tx = g.as_ref().ok_or(RelayError::ShuttingDown)?;
        tx.send(job).map_err(|_| RelayError::ShuttingDown)
    }
}

#[async_trait]
impl Store for PgStore {
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
        let c = self.pool.get().await?;
        read_after(&c, after, max_sets, max_bytes).await
    }

    async fn read_scoped(
        &self,
        after: u64,
        filter: &ReadFilter,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<ScopedRead> {
        let c = self.pool.get().await?;
        read_scoped(&c, after, filter, max_sets, max_bytes).await
    }

    async fn row_history(
        &self,
        table: &str,
        pk: &Value,
        before: u64,
    ) -> Result<Vec<Arc<StoredSet>>> {
        let pk = scoping::pk_key(pk)?;
        let c = self.pool.get().await?;
        let st = c
            .prepare_cached(
                "SELECT s.server_seq, s.body FROM ferry_row_hist h JOIN ferry_sets s ON s.server_seq = h.server_seq
                 WHERE h.tbl = $1 AND h.pk = $2 AND h.server_seq < $3 ORDER BY h.server_seq",
            )
            .await?;
        let rows = c.query(&st, &[&table, &pk, &(before as i64)]).await?;
        rows.iter()
            .map(|r| Ok(Arc::new(decode_set(r.get(0), r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    async fn fold_rows(&self, max_rows: usize) -> Result<u64> {
        pg_rows::fold(&self.pool, &self.cat, max_rows).await
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
        pg_rows::page(&self.pool, filter, after, max_rows, max_bytes).await
    }

    async fn snapshot_size(
        &self,
        filter: &ReadFilter,
        after: Option<SnapshotKey>,
    ) -> Result<SnapshotSize> {
        pg_rows::size(&self.pool, filter, after).await
    }

    async fn lease(&self, holder: ReplicaId, request: LeaseRequest) -> Result<LeaseOutcome> {
        job::lease(self, holder, request).await
    }

    async fn first_position(&self, origin: ReplicaId) -> Result<Option<u64>> {
        let c = self.pool.get().await?;
        let r = c
            .query_opt(
                "SELECT server_seq FROM ferry_sets WHERE origin = $1 ORDER BY origin_seq LIMIT 1",
                &[&origin.0.to_vec()],
            )
            .await?;
        Ok(r.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn claim(&self, replica: ReplicaId, sub: &str) -> Result<bool> {
        Ok(claim_owner(&self.pool, replica, sub).await? == sub)
    }

    async fn max_origin_seq(&self, origin: ReplicaId) -> Result<u64> {
        let c = self.pool.get().await?;
        let st = c
            .prepare_cached("SELECT max_seq FROM ferry_origins WHERE origin = $1")
            .await?;
        let n: Option<i64> = c
            .query_opt(&st, &[&origin.0.as_slice()])
            .await?
            .map(|r| r.get(0));
        Ok(n.unwrap_or(0) as u64)
    }

    async fn compact(&self, horizon: u64) -> Result<CompactReport> {
        let c = self.pool.get().await?;
        let old: i64 = c
            .query_one("SELECT value FROM ferry_meta WHERE key = 'horizon'", &[])
            .await?
            .get(0);
        // Walk newest first in pages; bodies at or below the horizon only change here.
        let mut pass = Compaction::new(&self.cat, horizon, old as u64);
        let mut below = i64::MAX;
        loop {
            let rows = c
                .query(
                    "SELECT server_seq, body FROM ferry_sets WHERE server_seq < $1 ORDER BY server_seq DESC LIMIT 1000",
                    &[&below],
                )
                .await?;
            let Some(last) = rows.last() else { break };
            below = last.get(0);
            for r in &rows {
                pass.visit(r.get(0), r.get(1))?;
            }
        }
        let (rewrites, report) = (pass.rewrites, pass.report);
        drop(c);
        job::rewrite(self, rewrites, report.horizon).await?;
        self.feed.clear_window();
        tracing::info!(?report, "history compacted");
        Ok(report)
    }

    async fn stats(&self) -> Result<StoreStats> {
        let c = self.pool.get().await?;
        let r = c
            .query_one(
                "SELECT (SELECT coalesce(max(server_seq), 0) FROM ferry_sets),
                        (SELECT value FROM ferry_meta WHERE key = 'horizon'),
                        (SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
                          WHERE c.relkind = 'r' AND c.relname LIKE 'ferry\\_%')",
                &[],
            )
            .await?;
        Ok(StoreStats {
            head: r.get::<_, i64>(0) as u64,
            horizon: r.get::<_, i64>(1) as u64,
            bytes: r.get::<_, Option<i64>>(2).unwrap_or(0) as u64,
        })
    }

    async fn head(&self) -> Result<u64> {
        // Never behind this node's feed, which may lag the log by a notification.
        let h = head_of(&self.pool.get().await?).await?;
        Ok(h.max(self.feed.head()))
    }

    fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    async fn shutdown(&self) {
        drop(self.jobs.lock().take());
        let tasks = std::mem::take(&mut *self.tasks.lock());
        let mut tasks = tasks.into_iter();
        // The writer drains its queue first; then the publisher stops.
        if let Some(w) = tasks.next() {
            let _ = w.await;
        }
        self.stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        self.pool.close();
    }
}

/// The node's writer: batches the pushes waiting on this node into one locked transaction.
struct Writer {
    pool: Pool,
    cat: Arc<RelayCatalog>,
    local: mpsc::UnboundedSender<Vec<Arc<StoredSet>>>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut next: Option<Job> = None;
        loop {
            let job = match next.take() {
                Some(j) => j,
                None => match rx.recv().await {
                    Some(j) => j,
                    None => break,
                },
            };
            match job {
                Job::Push {
                    grants,
                    bounds,
                    sets,
                    reply,
                } => {
                    let mut pushes = vec![(grants, bounds, sets, reply)];
                    let result = self.sequence(&mut pushes, &mut rx, &mut next).await;
                    self.answer(pushes, result);
                }
                Job::Rewrite {
                    sets,
                    horizon,
                    reply,
                } => {
                    let _ = reply.send(self.rewrite(sets, horizon).await);
                }
                Job::Lease {
                    holder,
                    request,
                    reply,
                } => {
                    let _ = reply.send(self.lease(holder, &request).await);
                }
                Job::Fold { max_rows, reply } => {
                    let _ = reply.send(pg_rows::fold(&self.pool, &self.cat, max_rows).await);
                }
                Job::Claim {
                    replica,
                    sub,
                    reply,
                } => {
                    let _ = reply.send(claim_owner(&self.pool, replica, &sub).await);
                }
            }
        }
        tracing::debug!("postgres store writer stopped");
    }

    #[allow(clippy::type_complexity)]
    fn answer(
        &self,
        pushes: Vec<PushJob>,
        result: Result<(Vec<Vec<PushOutcome>>, Vec<Arc<StoredSet>>)>,
    ) {
        match result {
            Ok((outcomes, stored)) => {
                if !stored.is_empty() {
                    let _ = self.local.send(stored);
                }
                for ((_, _, _, reply), out) in pushes.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                // Whether a failed COMMIT took effect is unknown; the client retries and the
                // `(origin, origin_seq)` check makes the retry idempotent either way.
                tracing::error!(error = %e, "push transaction failed");
                let msg = e.to_string();
                for (_, _, _, reply) in pushes {
                    let _ = reply.send(Err(RelayError::Store(msg.clone())));
                }
            }
        }
    }

    /// Group commit: takes the sequencing lock first, then adds every push that arrived
    /// while it waited (other nodes hold the lock in turn, so the wait is when a batch
    /// grows), then sequences them all in one transaction. A lease or compaction job found
    /// in the queue ends the batch and is left in `next`.
    #[allow(clippy::type_complexity)]
    async fn sequence(
        &self,
        pushes: &mut Vec<PushJob>,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        next: &mut Option<Job>,
    ) -> Result<(Vec<Vec<PushOutcome>>, Vec<Arc<StoredSet>>)> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let (head, now) = lock(&tx, true).await?;
        while pushes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Job::Push {
                    grants,
                    bounds,
                    sets,
                    reply,
                }) => pushes.push((grants, bounds, sets, reply)),
                Ok(other) => {
                    *next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let batch: Vec<pg_batch::Push<'_>> = pushes
            .iter()
            .map(|(g, bounds, sets, _)| pg_batch::Push {
                grants: g,
                bounds,
                sets,
            })
            .collect();
        let (all, stored) = pg_batch::sequence(&tx, &self.cat, &batch, head, now).await?;
        tx.commit().await?;
        Ok((all, stored))
    }

    async fn lease(&self, holder: ReplicaId, request: &LeaseRequest) -> Result<LeaseOutcome> {
        let name = lease_name(request);
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let (_, now) = lock(&tx, false).await?;
        let floor = forget_leases(&tx, now).await?;
        let state = load_lease(&tx, name).await?;
        let (outcome, next) = lease::decide(now, state, floor, holder, request);
        if let Some(n) = next {
            tx.execute(
                "INSERT INTO ferry_leases(name, token, holder, expires_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET token = excluded.token, holder = excluded.holder,
                 expires_ms = excluded.expires_ms",
                &[
                    &name,
                    &(n.token as i64),
                    &n.holder.0.as_slice(),
                    &(n.expires_ms as i64),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn rewrite(
        &self,
        sets: Vec<(StoredSet, Vec<(String, Value)>)>,
        horizon: u64,
    ) -> Result<()> {
        for chunk in sets.chunks(500) {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            lock(&tx, false).await?;
            for (s, dropped) in chunk {
                tx.execute(
                    "UPDATE ferry_sets SET body = $1 WHERE server_seq = $2",
                    &[&encode_set(s)?, &(s.server_seq as i64)],
                )
                .await?;
                for (t, pk) in dropped {
                    tx.execute(
                        "DELETE FROM ferry_row_hist WHERE tbl = $1 AND pk = $2 AND server_seq = $3",
                        &[t, &scoping::pk_key(pk)?, &(s.server_seq as i64)],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
        }
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE ferry_meta SET value = greatest(value, $1) WHERE key = 'horizon'",
            &[&(horizon as i64)],
        )
        .await?;
        Ok(())
    }
}

/// Takes the sequencing lock; returns the head and the database clock (ms since the epoch).
/// With `notify`, also queues the fan-out notification (delivered only if the transaction
/// commits). The statements are pipelined: one round trip.
async fn lock(tx: &deadpool_postgres::Transaction<'_>, notify: bool) -> Result<(u64, u64)> {
    let pg = |e: tokio_postgres::Error| RelayError::from(e);
    let head_sql = format!("SELECT coalesce(max(server_seq), 0), {NOW_MS} FROM ferry_sets");
    // The head query is a new statement, so it takes a new snapshot after the lock is
    // granted: it sees every commit that released the lock.
    let (_, r, _) = futures_util::try_join!(
        async {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SEQ_LOCK])
                .await
                .map_err(pg)
        },
        async { tx.query_one(head_sql.as_str(), &[]).await.map_err(pg) },
        async {
            if notify {
                tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                    .await
                    .map_err(pg)
            } else {
                Ok(0)
            }
        },
    )?;
    Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1).max(0) as u64))
}

/// Deletes a few long-expired lease records (see the `lease` module of ferry-core) and
/// returns the floor: the largest token ever forgotten. Runs under the sequencing lock.
async fn forget_leases(tx: &deadpool_postgres::Transaction<'_>, now_ms: u64) -> Result<u64> {
    let st = tx
        .prepare_cached(
            "WITH gone AS (DELETE FROM ferry_leases WHERE name IN (SELECT name FROM ferry_leases
             WHERE expires_ms < $1 ORDER BY expires_ms LIMIT $2) RETURNING token)
             UPDATE ferry_meta SET value = GREATEST(value, COALESCE((SELECT max(token) FROM gone), 0))
             WHERE key = 'lease_floor' RETURNING value",
        )
        .await?;
    let r = tx
        .query_one(
            &st,
            &[
                &(lease::forget_before(now_ms) as i64),
                &(lease::FORGET_PER_REQUEST as i64),
            ],
        )
        .await?;
    Ok(r.get::<_, i64>(0) as u64)
}

async fn load_lease(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
) -> Result<Option<LeaseState>> {
    let st = tx
        .prepare_cached("SELECT token, holder, expires_ms FROM ferry_leases WHERE name = $1")
        .await?;
    let Some(r) = tx.query_opt(&st, &[&name]).await? else {
        return Ok(None);
    };
    Ok(Some(LeaseState {
        token: r.get::<_, i64>(0) as u64,
        holder: ReplicaId::from_slice(r.get(1))
            .ok_or_else(|| RelayError::Store("lease holder is not 16 bytes".into()))?,
        expires_ms: r.get::<_, i64>(2) as u64,
    }))
}

/// Publishes the log to this node's feed, in order: from its own writer's commits without a
/// read, from everyone else's after a notification or a periodic catch-up read.
struct Publisher {
    pool: Pool,
    cfg: tokio_postgres::Config,
    feed: Arc<Feed>,
    /// Change sets this node committed, not yet published (keyed by position).
    pending: BTreeMap<u64, Arc<StoredSet>>,
}

impl Publisher {
    async fn run(
        mut self,
        mut local: mpsc::UnboundedReceiver<Vec<Arc<StoredSet>>>,
        stop: CancellationToken,
    ) {
        let (wake_tx, mut wake) = mpsc::channel::<()>(1);
        let listener = tokio::spawn(listen(self.cfg.clone(), wake_tx, stop.clone()));
        let mut tick = tokio::time::interval(CATCH_UP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut read_db = false;
            tokio::select! {
                _ = stop.cancelled() => break,
                got = local.recv() => match got {
                    Some(sets) => self.buffer(sets),
                    None => break,
                },
                _ = wake.recv() => read_db = true,
                _ = tick.tick() => read_db = true,
            }
            while let Ok(sets) = local.try_recv() {
                self.buffer(sets);
            }
            if let Err(e) = self.catch_up(read_db).await {
                tracing::warn!(error = %e, "reading the log for fan-out failed; retrying");
            }
        }
        listener.abort();
        tracing::debug!("postgres store publisher stopped");
    }

    fn buffer(&mut self, sets: Vec<Arc<StoredSet>>) {
        for s in sets {
            self.pending.insert(s.server_seq, s);
        }
    }

    /// Publishes everything consecutive after the feed's head: from the buffer while it
    /// holds the next position, from the database otherwise (when `read_db`, or when the
    /// buffer shows a gap, i.e. another node committed in between).
    async fn catch_up(&mut self, mut read_db: bool) -> Result<()> {
        loop {
            let head = self.feed.head();
            self.pending = self.pending.split_off(&(head + 1));
            let mut run = Vec::new();
            let mut want = head + 1;
            while let Some(s) = self.pending.remove(&want) {
                run.push(s);
                want += 1;
            }
            if !run.is_empty() {
                self.feed.publish(run);
                continue;
            }
            if !read_db && self.pending.is_empty() {
                return Ok(());
            }
            let c = self.pool.get().await?;
            let got = read_after(&c, head, 512, 8 << 20).await?;
            drop(c);
            let full = got.len() >= 512;
            if got.is_empty() {
                return Ok(());
            }
            self.feed.publish(got);
            read_db = full || !self.pending.is_empty();
        }
    }
}

/// Keeps a LISTEN connection open and wakes the publisher on each notification; reconnects
/// with a delay when the connection drops (the periodic catch-up covers the gap).
async fn listen(cfg: tokio_postgres::Config, wake: mpsc::Sender<()>, stop: CancellationToken) {
    loop {
        match cfg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (done_tx, done_rx) = oneshot::channel::<()>();
                let w = wake.clone();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                                let _ = w.try_send(());
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "postgres LISTEN connection failed");
                                break;
                            }
                        }
                    }
                    let _ = done_tx.send(());
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        // Something may have been committed before LISTEN took effect.
                        let _ = wake.try_send(());
                        tokio::select! {
                            _ = stop.cancelled() => { driver.abort(); return; }
                            _ = done_rx => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres LISTEN failed");
                        driver.abort();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "postgres LISTEN connection failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_checked_and_redacted() {
        assert_eq!(
            redact_url("postgres://ferry:s3cret@db:5432/ferry"),
            "postgres://ferry:<redacted>@db:5432/ferry"
        );
        assert_eq!(
            redact_url("postgres://ferry@db/ferry"),
            "postgres://ferry@db/ferry"
        );
        assert_eq!(redact_url("sqlite"), "sqlite");
        assert!(check_url("postgres://u@h:5432/d").is_ok());
        let e = check_url("postgres://u@h:notaport/d").unwrap_err();
        assert!(
            e.to_string().contains("not a usable postgres:// URL"),
            "{e}"
        );
        let e = check_url("postgres://u@h/d?sslmode=require").unwrap_err();
        assert!(e.to_string().contains("sslmode=require"), "{e}");
    }
}
