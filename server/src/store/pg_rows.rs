//! Row histories on PostgreSQL: folding the log into `ferry_rows` and reading snapshot pages
//! from it (see [`crate::history`] and [`super::snapshot`]).
//!
//! Any node may fold; a transaction-scoped advisory lock makes one node fold at a time, and
//! the others return the watermark. Folding reads only committed change sets, which are
//! always a gap-free prefix of the log (sequencing holds its own lock until it commits).

use crate::catalog::RelayCatalog;
use crate::error::Result;
use crate::history::{self, Folder, RowHistory};
use crate::store::ReadFilter;
use crate::store::decode_set;
use crate::store::snapshot::{self, PageBuilder, SnapshotKey, SnapshotPage, SnapshotSize};
use deadpool_postgres::Pool;
use std::collections::HashMap;

/// Advisory lock held by the node folding the log into row histories.
const FOLD_LOCK: i64 = 0x4665_7272_7952_6f77; // "FerryRow"

/// Change sets read per query while folding.
const SETS_PER_READ: i64 = 64;

/// Format 4: row histories for snapshots, folded behind the `rows_seq` watermark (a store
/// upgraded to it folds its existing log in the background).
pub const SCHEMA_V4: &str = r#"
CREATE TABLE ferry_rows(
    tbl TEXT COLLATE "C" NOT NULL, pk BYTEA NOT NULL, scope TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL, hist BYTEA NOT NULL, PRIMARY KEY (tbl, pk)
);
CREATE INDEX ferry_rows_scope ON ferry_rows(scope, tbl, pk);
INSERT INTO ferry_meta VALUES ('rows_seq', 0);
CREATE TABLE ferry_secrets(name TEXT PRIMARY KEY, value BYTEA NOT NULL);
"#;

/// The key snapshot resume tokens are sealed with (see `resume`), made by the first node
/// that needs it and shared by all.
pub async fn secret(c: &impl deadpool_postgres::GenericClient) -> Result<[u8; 32]> {
    let fresh = rand::random::<[u8; 32]>().to_vec();
    c.execute(
        "INSERT INTO ferry_secrets(name, value) VALUES ('resume', $1) ON CONFLICT (name) DO NOTHING",
        &[&fresh],
    )
    .await?;
    let v: Vec<u8> = c
        .query_one("SELECT value FROM ferry_secrets WHERE name = 'resume'", &[])
        .await?
        .get(0);
    v.try_into().map_err(|_| {
        crate::error::RelayError::Store("the stored resume-token key is damaged".into())
    })
}

async fn watermark(c: &impl deadpool_postgres::GenericClient) -> Result<u64> {
    let r = c
        .query_one("SELECT value FROM ferry_meta WHERE key = 'rows_seq'", &[])
        .await?;
    Ok(r.get::<_, i64>(0) as u64)
}

/// Folds about `max_rows` row changes after the watermark into `ferry_rows`.
pub async fn fold(pool: &Pool, cat: &RelayCatalog, max_rows: usize) -> Result<u64> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&FOLD_LOCK])
        .await?
        .get(0);
    let from = watermark(&tx).await?;
    if !locked {
        return Ok(from);
    }
    let mut sets = Vec::new();
    let mut rows = 0usize;
    let mut after = from as i64;
    while rows < max_rows {
        let got = tx
            .query(
                "SELECT server_seq, body FROM ferry_sets WHERE server_seq > $1
                 ORDER BY server_seq LIMIT $2",
                &[&after, &SETS_PER_READ],
            )
            .await?;
        let n = got.len() as i64;
        for r in &got {
            let s = decode_set(r.get(0), r.get::<_, &[u8]>(1))?;
            after = s.server_seq as i64;
            rows += s.change_set.rows.len();
            sets.push(s);
            if rows >= max_rows {
                break;
            }
        }
        if n < SETS_PER_READ {
            break;
        }
    }
    if sets.is_empty() {
        return Ok(from);
    }
    // Load every touched row's history in one query.
    let keys = history::keys(&sets)?;
    let (tbls, pks): (Vec<&str>, Vec<&[u8]>) =
        keys.iter().map(|(t, p)| (t.as_str(), p.as_slice())).unzip();
    let found = tx
        .query(
            "SELECT r.tbl, r.pk, r.scope, r.seq, r.hist FROM ferry_rows r
             JOIN UNNEST($1::text[], $2::bytea[]) AS k(tbl, pk) ON r.tbl = k.tbl AND r.pk = k.pk",
            &[&tbls, &pks],
        )
        .await?;
    let mut stored: HashMap<(String, Vec<u8>), RowHistory> = HashMap::with_capacity(found.len());
    for r in &found {
        stored.insert(
            (r.get(0), r.get(1)),
            RowHistory {
                scope: r.get(2),
                seq: r.get::<_, i64>(3) as u64,
                history: history::decode(r.get::<_, &[u8]>(4))?,
            },
        );
    }
    let folder = Folder::run(cat, from, &sets, stored)?;
    let mut t = Vec::with_capacity(folder.rows.len());
    let mut p = Vec::with_capacity(folder.rows.len());
    let mut sc = Vec::with_capacity(folder.rows.len());
    let mut sq = Vec::with_capacity(folder.rows.len());
    let mut h = Vec::with_capacity(folder.rows.len());
    for ((table, pk), (_, row)) in &folder.rows {
        t.push(table.as_str());
        p.push(pk.as_slice());
        sc.push(row.scope.as_str());
        sq.push(row.seq as i64);
        h.push(history::encode(&row.history)?);
    }
    tx.execute(
        "INSERT INTO ferry_rows(tbl, pk, scope, seq, hist)
         SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::int8[], $5::bytea[])
         ON CONFLICT (tbl, pk) DO UPDATE
         SET scope = excluded.scope, seq = excluded.seq, hist = excluded.hist",
        &[&t, &p, &sc, &sq, &h],
    )
    .await?;
    tx.execute(
        "UPDATE ferry_meta SET value = $1 WHERE key = 'rows_seq'",
        &[&(folder.position as i64)],
    )
    .await?;
    tx.commit().await?;
    Ok(folder.position)
}

/// A read-only repeatable-read transaction: one consistent view of the row histories.
async fn read_tx(c: &mut deadpool_postgres::Object) -> Result<deadpool_postgres::Transaction<'_>> {
    Ok(c.build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

/// One page of a snapshot walk, read in one repeatable-read transaction.
pub async fn page(
    pool: &Pool,
    filter: &ReadFilter,
    after: Option<SnapshotKey>,
    max_rows: usize,
    max_bytes: usize,
) -> Result<SnapshotPage> {
    let mut c = pool.get().await?;
    let tx = read_tx(&mut c).await?;
    let position = watermark(&tx).await?;
    let ranges = snapshot::ranges(filter);
    let mut page = PageBuilder::new(position, max_rows, max_bytes);
    let mut at = walk_start(&tx, &ranges, filter, after).await?;
    while let Some((scope, from)) = at {
        let want = page.room();
        let (t0, pk0) = from.unwrap_or_default();
        let rows = tx
            .query(
                r#"SELECT tbl, pk, hist FROM ferry_rows
                   WHERE scope = $1::text COLLATE "C" AND (tbl, pk) > ($2::text COLLATE "C", $3::bytea)
                   ORDER BY tbl, pk LIMIT $4"#,
                &[&scope, &t0, &pk0, &(want as i64)],
            )
            .await?;
        let mut last = None;
        for r in &rows {
            let t: String = r.get(0);
            let pk: Vec<u8> = r.get(1);
            let full = !page.push(&scope, t.clone(), &pk, r.get::<_, &[u8]>(2))?;
            last = Some((t, pk));
            if full {
                return Ok(page.finish(false));
            }
        }
        at = if rows.len() < want {
            next_scope(&tx, &ranges, filter, Some(&scope))
                .await?
                .map(|s| (s, None))
        } else {
            Some((scope, last))
        };
    }
    tx.commit().await?;
    Ok(page.finish(true))
}

/// Rows of the walk after `after` (see `Store::snapshot_size`).
pub async fn size(
    pool: &Pool,
    filter: &ReadFilter,
    after: Option<SnapshotKey>,
) -> Result<SnapshotSize> {
    let mut c = pool.get().await?;
    let tx = read_tx(&mut c).await?;
    let ranges = snapshot::ranges(filter);
    let mut size = SnapshotSize::default();
    let mut at = walk_start(&tx, &ranges, filter, after).await?;
    while let Some((scope, from)) = at {
        let (t0, pk0) = from.unwrap_or_default();
        let r = tx
            .query_one(
                r#"SELECT count(*) FROM ferry_rows
                   WHERE scope = $1::text COLLATE "C" AND (tbl, pk) > ($2::text COLLATE "C", $3::bytea)"#,
                &[&scope, &t0, &pk0],
            )
            .await?;
        size.rows += r.get::<_, i64>(0) as u64;
        at = next_scope(&tx, &ranges, filter, Some(&scope))
            .await?
            .map(|s| (s, None));
    }
    tx.commit().await?;
    Ok(size)
}

/// Where a walk after `after` begins: a scope, and the row in it to continue after.
async fn walk_start(
    tx: &deadpool_postgres::Transaction<'_>,
    ranges: &[(String, Option<String>)],
    filter: &ReadFilter,
    after: Option<SnapshotKey>,
) -> Result<Option<(String, Option<(String, Vec<u8>)>)>> {
    Ok(match after {
        Some(k) => Some((k.scope, Some((k.table, k.pk)))),
        None => next_scope(tx, ranges, filter, None)
            .await?
            .map(|s| (s, None)),
    })
}

/// The first readable scope after `after` (or the first of all) in the walk's ranges.
async fn next_scope(
    c: &deadpool_postgres::Transaction<'_>,
    ranges: &[(String, Option<String>)],
    filter: &ReadFilter,
    after: Option<&str>,
) -> Result<Option<String>> {
    for (start, end) in ranges {
        if let (Some(a), Some(e)) = (after, end)
            && a >= e.as_str()
        {
            continue;
        }
        let mut from = after.unwrap_or("").to_owned();
        loop {
            let names: Vec<String> = c
                .query(
                    r#"SELECT name FROM ferry_scopes
                       WHERE name >= $1::text COLLATE "C" AND name > $2::text COLLATE "C"
                         AND ($3::text IS NULL OR name < $3::text COLLATE "C")
                       ORDER BY name LIMIT 256"#,
                    &[start, &from, end],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if let Some(found) = names.iter().find(|n| filter.can_read(n)) {
                return Ok(Some(found.clone()));
            }
            match names.last() {
                Some(l) if names.len() == 256 => from = l.clone(),
                _ => break,
            }
        }
    }
    Ok(None)
}
