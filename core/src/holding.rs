//! Holding: which scopes this replica holds, which the app subscribes to, and evicting the
//! rows of scopes it may no longer hold.
//!
//! Why it is kept on the device: the relay cannot tell which scopes a replica already has
//! (its cursor says how far it read, not through which grants), so the replica names what
//! it holds in every hello ([`HeldScopes`]) and the relay answers with the scopes the
//! connection delivers (`Welcome.scopes`: the token's grants and the subscriptions). From
//! the difference:
//!
//! * **gained** scopes are back-filled by a snapshot (`Welcome.snapshot` with a cursor above
//!   zero). The replica's cursor stays where it is: the log continues from it, and for
//!   positions up to the back-fill's the relay filters by what the replica held before
//!   (`HeldScopes::below`), so a row the back-fill brought is not applied twice;
//! * **lost** scopes are evicted here: their rows and merge metadata go, nothing is logged or
//!   pushed, no conflict is recorded. Local writes still waiting to be pushed are pushed
//!   first (the eviction waits until nothing is pending), and each eviction is recorded in
//!   `ferry_evictions` with how many writes were waiting when the scope was lost.
//!
//! Subscriptions are the app's choice among the scopes its token may read; they are kept in
//! the file so that they hold across restarts, and sent in every hello.

use crate::apply::{Merge, Outcome};
use crate::db;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::hlc::WallClock;
use crate::observer::Notifications;
use crate::port::SnapshotEnd;
use crate::schema::quote;
use crate::scope::{GLOBAL_SCOPE, HeldScopes, Pattern, ScopeSet, scope_name};
use crate::tables::TableInfo;
use crate::value::Value;
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::sync::Arc;

const HELD: &str = "scopes_held";
const EVICT: &str = "scopes_evict";
const EVICT_PENDING: &str = "scopes_evict_pending";
const SUBSCRIPTIONS: &str = "subscriptions";
const COMPLETE_AT: &str = "scopes_complete_at";

/// Most subscriptions an app may hold (the relay refuses more: it uses the same bound).
pub const MAX_SUBSCRIPTIONS: usize = 256;

/// Rows of one scope evicted because the replica may no longer hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The scope.
    pub scope: String,
    /// Rows removed.
    pub rows: u64,
    /// Local change sets that were waiting to be pushed when the scope was lost. They were
    /// pushed before the rows were removed, unless the relay refused one (uploads stop
    /// then, and `SyncStatus::refused` reports it): the eviction does not wait for a
    /// refusal to be resolved, and the change sets stay in the log.
    pub pending_writes: u64,
    /// When (ms since the epoch, device clock).
    pub at_ms: u64,
}

fn decode<T: serde::de::DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>> {
    let Some(b) = db::meta_opt::<Vec<u8>>(conn, key)? else {
        return Ok(None);
    };
    rmp_serde::from_slice(&b)
        .map(Some)
        .map_err(|e| Error::Corrupt(format!("ferry_meta `{key}`: {e}")))
}

fn encode<T: serde::Serialize>(conn: &Connection, key: &str, v: &T) -> Result<()> {
    let b = rmp_serde::to_vec(v).map_err(|e| Error::Corrupt(format!("encoding `{key}`: {e}")))?;
    db::meta_set(conn, key, b)
}

/// The scopes held, as the next hello names them: a back-fill's `below` is dropped once the
/// cursor has passed it.
pub(crate) fn for_hello(conn: &Connection, cursor: u64) -> Result<Option<HeldScopes>> {
    let Some(mut held) = decode::<HeldScopes>(conn, HELD)? else {
        return Ok(None);
    };
    if held.below.as_ref().is_some_and(|(at, _)| cursor >= *at) {
        held.below = None;
    }
    Ok(Some(held))
}

/// The scopes held (as last stored).
pub(crate) fn held(conn: &Connection) -> Result<Option<HeldScopes>> {
    decode(conn, HELD)
}

/// The app's subscriptions (`None`: every scope the token may read).
pub(crate) fn subscriptions(conn: &Connection) -> Result<Option<Vec<String>>> {
    decode(conn, SUBSCRIPTIONS)
}

/// Replaces the subscriptions (checked: each a pattern without placeholders).
pub(crate) fn set_subscriptions(conn: &Connection, subs: Option<&[String]>) -> Result<()> {
    match subs {
        None => db::meta_delete(conn, SUBSCRIPTIONS),
        Some(list) => {
            if list.len() > MAX_SUBSCRIPTIONS {
                return Err(Error::InvalidInput(format!(
                    "{} subscriptions; at most {MAX_SUBSCRIPTIONS}",
                    list.len()
                )));
            }
            for s in list {
                Pattern::parse(s)
                    .map_err(|e| Error::InvalidInput(format!("subscription `{s}`: {e}")))?;
            }
            let mut v = list.to_vec();
            v.sort();
            v.dedup();
            encode(conn, SUBSCRIPTIONS, &v)
        }
    }
}

/// The relay announced the scopes this connection delivers. Unless a snapshot follows (the
/// held set changes at its last page), they are what the replica holds from now on; if they
/// differ from what it held, rows outside them are to be evicted (`Engine::settle_scopes`).
pub(crate) fn announced(
    conn: &Connection,
    scopes: &ScopeSet,
    snapshot: bool,
    cursor: u64,
    pending: u64,
) -> Result<()> {
    let old = for_hello(conn, cursor)?;
    let changed = old.as_ref().is_none_or(|o| o.scopes != *scopes);
    if !snapshot {
        set_held(conn, scopes, old.and_then(|o| o.below))?;
    }
    if changed || db::meta_opt::<Vec<u8>>(conn, EVICT)?.is_some() {
        encode(conn, EVICT, scopes)?;
        if db::meta_opt::<i64>(conn, EVICT_PENDING)?.is_none() {
            db::meta_set(conn, EVICT_PENDING, pending as i64)?;
        }
    }
    Ok(())
}

/// A snapshot's last page was applied (inside its transaction): the replica holds the
/// announced scopes. After a back-fill, positions up to the back-fill's are still to come
/// through the log for the scopes held before.
pub(crate) fn snapshot_done(conn: &Connection, end: &SnapshotEnd, cursor: u64) -> Result<()> {
    let Some(scopes) = &end.scopes else {
        return Ok(());
    };
    let below = if end.backfill && end.position > cursor {
        let before = held(conn)?.map_or_else(ScopeSet::everything, |h| h.scopes);
        Some((end.position, before))
    } else {
        None
    };
    db::meta_set(conn, COMPLETE_AT, end.complete_at.max(end.position) as i64)?;
    set_held(conn, scopes, below)
}

fn set_held(conn: &Connection, scopes: &ScopeSet, below: Option<(u64, ScopeSet)>) -> Result<()> {
    let held = HeldScopes {
        scopes: scopes.clone(),
        below,
    };
    encode(conn, HELD, &held)
}

/// True when `scope` is held and its rows are complete: the last snapshot was applied and
/// the cursor has since reached the relay's head as it was then (a snapshot is read at the
/// relay's fold, which may lag its log; what was written in between comes through the log).
pub(crate) fn holds(conn: &Connection, scope: &str, cursor: u64) -> Result<bool> {
    let complete_at = db::meta_opt::<i64>(conn, COMPLETE_AT)?.unwrap_or(0) as u64;
    if cursor < complete_at {
        return Ok(false);
    }
    Ok(for_hello(conn, cursor)?.is_some_and(|h| h.scopes.matches(scope) && h.below.is_none()))
}

/// The scopes to evict rows outside of, if an eviction is due.
pub(crate) fn evict_target(conn: &Connection) -> Result<Option<ScopeSet>> {
    decode(conn, EVICT)
}

/// Evicts (inside the caller's transaction, with capture off) every row of `tables` whose
/// scope is outside `keep`, records what went, and clears the target. Returns the evictions.
pub(crate) fn evict_outside<'a>(
    conn: &Connection,
    tables: impl Iterator<Item = &'a TableInfo>,
    keep: &ScopeSet,
    merge: &mut Merge<'_>,
    now_ms: u64,
) -> Result<Vec<Eviction>> {
    let pending_writes = db::meta_opt::<i64>(conn, EVICT_PENDING)?.unwrap_or(0) as u64;
    let mut gone: BTreeMap<String, u64> = BTreeMap::new();
    let mut tables: Vec<&TableInfo> = tables.collect();
    tables.sort_by(|a, b| a.name().cmp(b.name()));
    for t in tables {
        let key = quote(&t.cols[t.pk].name);
        let doomed: Vec<(String, Value)> = match &t.decl.scope_column {
            None => {
                if keep.matches(GLOBAL_SCOPE) {
                    continue;
                }
                let mut st = conn.prepare(&format!("SELECT {key} FROM {}", quote(t.name())))?;
                let keys = st
                    .query_map([], |r| r.get::<_, Value>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                keys.into_iter()
                    .map(|k| (GLOBAL_SCOPE.to_owned(), k))
                    .collect()
            }
            Some(col) => {
                // Distinct scope values first: a replica holds few scopes and many rows.
                let col = quote(col);
                let mut st =
                    conn.prepare(&format!("SELECT DISTINCT {col} FROM {}", quote(t.name())))?;
                let values = st
                    .query_map([], |r| r.get::<_, Value>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut out = Vec::new();
                let mut keys = conn.prepare(&format!(
                    "SELECT {key} FROM {} WHERE {col} IS ?1",
                    quote(t.name())
                ))?;
                for v in values {
                    let name = scope_name(&v);
                    if keep.matches(&name) {
                        continue;
                    }
                    let ks = keys
                        .query_map([&v], |r| r.get::<_, Value>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    out.extend(ks.into_iter().map(|k| (name.clone(), k)));
                }
                out
            }
        };
        for (scope, pk) in doomed {
            merge.evict(t.name(), &pk)?;
            *gone.entry(scope).or_default() += 1;
        }
    }
    let mut out = Vec::with_capacity(gone.len());
    for (scope, rows) in gone {
        conn.prepare_cached(
            "INSERT INTO ferry_evictions(scope, rows, pending_writes, at_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(rusqlite::params![scope, rows as i64, pending_writes as i64, now_ms as i64])?;
        tracing::info!(%scope, rows, pending_writes, "evicted the rows of a scope this replica no longer holds");
        out.push(Eviction {
            scope,
            rows,
            pending_writes,
            at_ms: now_ms,
        });
    }
    // The record is an audit trail, not a log that grows for ever.
    conn.execute(
        "DELETE FROM ferry_evictions WHERE id <= (SELECT MAX(id) - 1000 FROM ferry_evictions)",
        [],
    )?;
    db::meta_delete(conn, EVICT)?;
    db::meta_delete(conn, EVICT_PENDING)?;
    Ok(out)
}

/// Evictions recorded, newest first (at most `limit`).
pub(crate) fn evictions(conn: &Connection, limit: usize) -> Result<Vec<Eviction>> {
    let mut st = conn.prepare(
        "SELECT scope, rows, pending_writes, at_ms FROM ferry_evictions ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = st
        .query_map([limit as i64], |r| {
            Ok(Eviction {
                scope: r.get(0)?,
                rows: r.get::<_, i64>(1)? as u64,
                pending_writes: r.get::<_, i64>(2)? as u64,
                at_ms: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

impl Engine {
    /// Evicts the rows of scopes no longer held, if an eviction is due and none of this
    /// replica's change sets waits to be pushed (`pending`): those are pushed first. The
    /// caller passes 0 when uploads stopped at a refusal.
    pub(crate) fn settle_scopes(
        &mut self,
        wall: &dyn WallClock,
        pending: u64,
        notes: &mut Notifications,
    ) -> Result<Vec<Eviction>> {
        if pending > 0 {
            return Ok(Vec::new());
        }
        let Some(keep) = evict_target(&self.conn)? else {
            return Ok(Vec::new());
        };
        let now = wall.now_millis();
        let mut out = Outcome::default();
        let evicted = self.in_txn(|e| {
            e.begin_sdk_writes(wall, notes)?;
            let cat = Arc::clone(&e.cat);
            let mut merge = Merge {
                conn: &e.conn,
                cat: &cat,
                origins: &mut e.origins,
                out: &mut out,
                strict: None,
            };
            let ev = evict_outside(&e.conn, cat.tables.values(), &keep, &mut merge, now)?;
            e.sdk_writes(false)?;
            Ok(ev)
        });
        match evicted {
            Ok(ev) => {
                out.notify(notes);
                Ok(ev)
            }
            Err(e) => {
                notes.discard();
                Err(e)
            }
        }
    }
}
