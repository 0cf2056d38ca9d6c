//! Opening the replica file: pragmas, Ferry's own tables, format upgrades, app migrations.
//!
//! One place sets every pragma (WAL so readers never block the writer, `synchronous=NORMAL`
//! which in WAL mode survives an app crash, a busy timeout so a foreign writer waits instead
//! of failing). Ferry's on-disk format is versioned with `PRAGMA user_version`, upgraded one
//! IMMEDIATE transaction per step, and a file written by a newer Ferry is refused rather than
//! misread.

use crate::error::{Error, Result};
use crate::schema::Schema;
use crate::tables::Tables;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The on-disk format this build writes.
pub const FORMAT_VERSION: i64 = 6;

const FORMAT_V1: &str = "
CREATE TABLE ferry_meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE ferry_tables(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, decl TEXT NOT NULL);
CREATE TABLE ferry_origins(id INTEGER PRIMARY KEY, replica_id BLOB NOT NULL UNIQUE);
CREATE TABLE ferry_log(
    seq INTEGER PRIMARY KEY,
    origin INTEGER NOT NULL,
    origin_seq INTEGER NOT NULL,
    id BLOB NOT NULL,
    hlc INTEGER NOT NULL,
    base INTEGER NOT NULL,
    raw BLOB,
    wire BLOB,
    server_seq INTEGER,
    reissued INTEGER,
    UNIQUE (origin, origin_seq)
);
CREATE TABLE ferry_rows(
    tbl INTEGER NOT NULL,
    pk NOT NULL,
    cl INTEGER NOT NULL,
    meta BLOB NOT NULL,
    tomb BLOB,
    PRIMARY KEY (tbl, pk)
) WITHOUT ROWID;
CREATE TABLE ferry_foreign(
    seq INTEGER PRIMARY KEY,
    tbl INTEGER NOT NULL,
    pk,
    op INTEGER NOT NULL,
    newpk,
    cols TEXT,
    deltas TEXT,
    existed INTEGER
);
CREATE TABLE ferry_oldvals(seq INTEGER NOT NULL, cid INTEGER NOT NULL, val, PRIMARY KEY (seq, cid)) WITHOUT ROWID;
CREATE TABLE ferry_stash(tbl INTEGER NOT NULL, pk NOT NULL, vals TEXT, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
CREATE TABLE ferry_gate(id INTEGER PRIMARY KEY CHECK (id = 1), sdk INTEGER NOT NULL);
INSERT INTO ferry_gate VALUES (1, 0);
CREATE TABLE ferry_conflicts(
    id INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    pk,
    col TEXT,
    kind TEXT NOT NULL,
    policy TEXT NOT NULL,
    local_value,
    local_hlc INTEGER,
    local_origin BLOB,
    remote_value,
    remote_hlc INTEGER,
    remote_origin BLOB,
    winner TEXT NOT NULL,
    resolution TEXT
);
";

const FORMAT_V2: &str = "
CREATE INDEX ferry_log_unacked ON ferry_log(seq) WHERE server_seq IS NULL AND reissued IS NULL;
";

/// Strict writes: a change set that the relay may refuse (it writes a `server_checked` table,
/// is guarded by a lease, or was made while such a change set was pending) keeps, per row,
/// the row as it was before and its merge metadata, so a refusal can roll it back exactly.
/// `rejected` holds the relay's reason once a change set was withdrawn.
const FORMAT_V3: &str = "
ALTER TABLE ferry_log ADD COLUMN guarded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ferry_log ADD COLUMN rejected TEXT;
CREATE TABLE ferry_undo(
    seq INTEGER NOT NULL,
    tbl INTEGER NOT NULL,
    pk NOT NULL,
    before BLOB,
    prior_cl INTEGER,
    prior_meta BLOB,
    prior_tomb BLOB,
    PRIMARY KEY (tbl, pk, seq)
) WITHOUT ROWID;
CREATE INDEX ferry_undo_seq ON ferry_undo(seq);
";

/// Evictions of scopes the replica no longer holds (see `holding`).
const FORMAT_V4: &str = "
CREATE TABLE ferry_evictions(
    id INTEGER PRIMARY KEY,
    scope TEXT NOT NULL,
    rows INTEGER NOT NULL,
    pending_writes INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
";

/// Change sets the relay refused for a permanent reason, set aside (see `quarantine`).
const FORMAT_V5: &str = "
CREATE TABLE ferry_quarantine(
    id INTEGER PRIMARY KEY,
    origin INTEGER NOT NULL,
    origin_seq INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    wire BLOB NOT NULL,
    at_ms INTEGER NOT NULL
);
";

/// The relay's code for a withdrawn change set (`conflict`, `fenced`, or the permanent code it
/// was quarantined with), beside its reason: apps branch on the code, never on the text.
/// Files withdrawn before this format have none (read as `conflict`).
const FORMAT_V6: &str = "
ALTER TABLE ferry_log ADD COLUMN rejected_code TEXT;
";

/// The name of each parameter of `sql` in binding order (`:id`, `@id`, `$id` with their
/// prefix; `None` for `?`), as SQLite parses it: what a host language needs to bind named
/// parameters from a mapping by position. Prepares without running.
pub(crate) fn parameter_names(conn: &Connection, sql: &str) -> Result<Vec<Option<String>>> {
    let st = conn.prepare_cached(sql)?;
    Ok((1..=st.parameter_count())
        .map(|i| st.parameter_name(i).map(str::to_owned))
        .collect())
}

/// Sets the connection-level pragmas Ferry relies on.
pub fn configure(conn: &Connection) -> Result<()> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    if pages == 0 {
        // A new file: free pages can only be given back incrementally (`reclaim_space`) if
        // the file says so before anything is written to it. A file the app created first
        // keeps its own setting.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

/// Sets the pragmas of a read-only connection to the replica (see `readers`): the file is
/// already in WAL mode; reads wait for a busy file rather than fail.
pub(crate) fn configure_reader(conn: &Connection) -> Result<()> {
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "query_only", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

/// Creates or upgrades Ferry's own tables. Refuses files from a newer Ferry.
pub fn upgrade_format(conn: &mut Connection, new_id: Option<crate::ids::ReplicaId>) -> Result<()> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > FORMAT_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: FORMAT_VERSION,
        });
    }
    if found == FORMAT_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Re-read inside the write lock: another process may have upgraded meanwhile.
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found < 1 {
        let has_ferry: bool = tx
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'ferry\\_%' ESCAPE '\\'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)?;
        if has_ferry {
            return Err(Error::Corrupt(
                "the file has ferry_ tables but no format version".into(),
            ));
        }
        tx.execute_batch(FORMAT_V1)?;
        let id = new_id.unwrap_or_else(crate::ids::ReplicaId::generate);
        tx.execute(
            "INSERT INTO ferry_meta(key, value) VALUES ('replica_id', ?1), ('cursor', 0), ('hlc', 0), ('app_version', 0)",
            params![id.0.to_vec()],
        )?;
        tx.execute(
            "INSERT INTO ferry_origins(replica_id) VALUES (?1)",
            params![id.0.to_vec()],
        )?;
    }
    if found < 2 {
        // Every sync round asks for the unacknowledged change sets; without this index that
        // is a scan of the whole local log, which only grows.
        tx.execute_batch(FORMAT_V2)?;
    }
    if found < 3 {
        tx.execute_batch(FORMAT_V3)?;
    }
    if found < 4 {
        tx.execute_batch(FORMAT_V4)?;
    }
    if found < 5 {
        tx.execute_batch(FORMAT_V5)?;
    }
    if found < 6 {
        tx.execute_batch(FORMAT_V6)?;
    }
    // Future format steps go here, each guarded by `found < N`.
    tx.pragma_update(None, "user_version", FORMAT_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Gives free pages back to the file system, a bounded number at a time, when enough have
/// accumulated: bulk work (a pushed backlog's change-log bodies, a large apply) frees pages
/// that SQLite would otherwise keep inside the file forever. Only files created with
/// incremental auto-vacuum (every file Ferry creates); others are left as they are. Runs
/// outside the app's transactions, at most `max_pages` per call. Returns the pages given back.
pub fn reclaim_space(conn: &Connection, max_pages: i64) -> Result<i64> {
    const AT_LEAST: i64 = 256;
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode != 2 {
        return Ok(0);
    }
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let total: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    if free < AT_LEAST || free * 10 < total {
        return Ok(0);
    }
    let n = free.min(max_pages.max(1));
    // The pragma returns a row per page moved; drain them.
    let mut st = conn.prepare(&format!("PRAGMA incremental_vacuum({n})"))?;
    let mut rows = st.query([])?;
    while rows.next()?.is_some() {}
    Ok(n)
}

/// Reads a value from `ferry_meta`.
pub fn meta_get<T: rusqlite::types::FromSql>(conn: &Connection, key: &str) -> Result<T> {
    conn.query_row("SELECT value FROM ferry_meta WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()?
    .ok_or_else(|| Error::Corrupt(format!("ferry_meta has no `{key}`")))
}

/// Reads a value from `ferry_meta` that may be absent.
pub fn meta_opt<T: rusqlite::types::FromSql>(conn: &Connection, key: &str) -> Result<Option<T>> {
    Ok(conn
        .query_row("SELECT value FROM ferry_meta WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Removes a value from `ferry_meta`.
pub fn meta_delete(conn: &Connection, key: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM ferry_meta WHERE key = ?1")?
        .execute([key])?;
    Ok(())
}

/// Writes a value into `ferry_meta`.
pub fn meta_set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO ferry_meta(key, value) VALUES (?1, ?2)")?
        .execute(params![key, value])?;
    Ok(())
}

/// Runs the app's migrations and reconciles synced tables with the declaration, in one
/// IMMEDIATE transaction, then returns the catalog.
pub fn apply_schema(conn: &mut Connection, schema: &Schema) -> Result<Tables> {
    schema.validate()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored: u32 = meta_get::<i64>(&tx, "app_version").map(|v| v as u32)?;
    if stored > schema.version {
        return Err(Error::AppSchemaTooNew {
            found: stored,
            declared: schema.version,
        });
    }
    // Migrations are not captured: every replica runs them itself.
    tx.execute("UPDATE ferry_gate SET sdk = 1", [])?;
    crate::tables::drop_triggers(&tx)?;
    // Synced tables first so migrations may backfill them.
    let catalog = Tables::reconcile(&tx, schema)?;
    for m in &schema.migrations {
        if m.version > stored {
            tracing::info!(version = m.version, "running app migration");
            tx.execute_batch(&m.sql).map_err(|e| {
                Error::InvalidSchema(format!("migration to version {} failed: {e}", m.version))
            })?;
        }
    }
    // Migrations may have touched synced tables: check they still match the declaration.
    let catalog = if schema.migrations.iter().any(|m| m.version > stored) {
        Tables::reconcile(&tx, schema)?
    } else {
        catalog
    };
    catalog.install_triggers(&tx)?;
    tx.execute("UPDATE ferry_gate SET sdk = 0", [])?;
    meta_set(&tx, "app_version", i64::from(schema.version))?;
    tx.commit()?;
    Ok(catalog)
}

/// Reads the replica id stored in `ferry_meta`.
pub fn stored_replica_id(conn: &Connection) -> Result<crate::ids::ReplicaId> {
    let b: Vec<u8> = meta_get(conn, "replica_id")?;
    crate::ids::ReplicaId::from_slice(&b)
        .ok_or_else(|| Error::Corrupt("replica id is not 16 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::parameter_names;

    #[test]
    fn parameter_names_come_in_binding_order_with_their_prefix() {
        let c = rusqlite::Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        let names =
            parameter_names(&c, "SELECT :a, ?, @b, $c, :a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            names,
            vec![
                Some(":a".to_owned()),
                None,
                Some("@b".to_owned()),
                Some("$c".to_owned())
            ]
        );
        assert!(parameter_names(&c, "SELECT FROM").is_err());
    }
}
