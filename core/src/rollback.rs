//! Rolling back strict writes the relay refused.
//!
//! A write to a `server_checked` table, or one guarded by a lease, is applied on the device at
//! once (optimistically) and may later be refused by the relay: a change it had not seen
//! touched the same cells (compare-and-set), or its lease token is stale. The replica must
//! then take it back exactly, as if it had never been made, because no other replica will
//! ever see it.
//!
//! To make that possible such a change set is *guarded*: when it is materialized, each row it
//! touches keeps its before-image (values) and its merge metadata as they were
//! (`ferry_undo`). While a guarded change set is pending, every later local change set is
//! guarded too, so anything written on top of it can be taken back with it.
//!
//! Withdrawing change set N:
//! * N and every later pending change set that wrote one of the same rows (transitively) are
//!   withdrawn together, newest first — they were made on top of N;
//! * each is undone row by row: a row-level operation (insert, delete) is reverted when the
//!   row is still in the incarnation it made; a cell is restored when its current version is
//!   still the withdrawn change's (a later remote write stays); counter additions are
//!   subtracted;
//! * each keeps its place in the origin's sequence as an empty change set (so `origin_seq`
//!   stays gap-free and the relay sees the withdrawal), its reason is stored (`rejected`),
//!   and every withdrawn cell or row is written to the conflict log.
//!
//! Remote changes never have to be merged "under" a guarded change: when a remote change
//! that the relay's rule says dooms a pending guarded change set arrives (see [`doomed`],
//! the same rule as [`crate::cas::check`]), that change set is withdrawn first, before the
//! remote change is merged. Remote changes it does not doom (counter additions, other cells
//! of a `server_checked` row) touch nothing the undo restores.

use crate::capture::Before;
use crate::changeset::{Cell, ChangeSet, RowChange, RowOp};
use crate::conflict::{self, Conflict, ConflictKind, Side, Winner};
use crate::error::Result;
use crate::error_code::ErrorCode;
use crate::hlc::Hlc;
use crate::ids::ReplicaId;
use crate::log::{self, Pending};
use crate::rowmeta::RowMeta;
use crate::rows::read_row;
use crate::rows::{self, Stored};
use crate::schema::TableMode;
use crate::tables::{TableInfo, Tables};
use crate::value::Value;
use crate::vv::Version;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeSet, HashSet};

/// Keeps a row's before-image and metadata for the guarded change set at log row `seq`.
pub(crate) fn keep_undo(
    conn: &Connection,
    seq: i64,
    t: &TableInfo,
    pk: &Value,
    before: Option<&Before>,
    prior: Option<&Stored>,
) -> Result<()> {
    let before = match before {
        Some(b) => Some(rmp_serde::to_vec(b)?),
        None => None,
    };
    let tomb = match prior.and_then(|p| p.tomb.as_ref()) {
        Some(t) => Some(rmp_serde::to_vec(t)?),
        None => None,
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO ferry_undo(seq, tbl, pk, before, prior_cl, prior_meta, prior_tomb)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        seq,
        t.id,
        pk,
        before,
        prior.map(|p| p.meta.cl as i64),
        prior.map(|p| p.meta.encode()),
        tomb
    ])?;
    Ok(())
}

/// Replaces version `old` by `new` in the prior metadata the undo records of row `pk` keep
/// (a pending change set re-stamped or rebased: restoring the row later must bring back the
/// new version, not the one nobody else ever saw).
pub(crate) fn swap_in_undo(
    conn: &Connection,
    t: &TableInfo,
    pk: &Value,
    change: &dyn Fn(&mut crate::rowmeta::RowMeta) -> bool,
) -> Result<()> {
    let found: Vec<(i64, i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT seq, prior_cl, prior_meta FROM ferry_undo WHERE tbl = ?1 AND pk = ?2 AND prior_meta IS NOT NULL",
        )?
        .query_map(params![t.id, pk], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (seq, cl, meta) in found {
        let mut m = crate::rowmeta::RowMeta::decode(cl as u64, &meta)?;
        if change(&mut m) {
            conn.prepare_cached(
                "UPDATE ferry_undo SET prior_meta = ?4 WHERE tbl = ?1 AND pk = ?2 AND seq = ?3",
            )?
            .execute(params![t.id, pk, seq, m.encode()])?;
        }
    }
    Ok(())
}

/// A row's undo record.
struct Undo {
    before: Option<Before>,
    prior: Option<Stored>,
}

impl Undo {
    fn prior_cl(&self) -> u64 {
        self.prior.as_ref().map_or(0, |p| p.meta.cl)
    }
}

type UndoRow = (
    Option<Vec<u8>>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

fn load_undo(conn: &Connection, seq: i64, t: &TableInfo, pk: &Value) -> Result<Option<Undo>> {
    let row: Option<UndoRow> = conn
        .prepare_cached(
            "SELECT before, prior_cl, prior_meta, prior_tomb FROM ferry_undo WHERE tbl = ?1 AND pk = ?2 AND seq = ?3",
        )?
        .query_row(params![t.id, pk, seq], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((before, cl, meta, tomb)) = row else {
        return Ok(None);
    };
    let before = match before {
        Some(b) => Some(rmp_serde::from_slice(&b)?),
        None => None,
    };
    let prior = match (cl, meta) {
        (Some(cl), Some(meta)) => Some(Stored {
            meta: RowMeta::decode(cl as u64, &meta)?,
            tomb: match tomb {
                Some(t) => Some(rmp_serde::from_slice(&t)?),
                None => None,
            },
        }),
        _ => None,
    };
    Ok(Some(Undo { before, prior }))
}

/// What a withdrawal did.
#[derive(Debug, Default)]
pub struct Withdrawal {
    /// `origin_seq`s withdrawn (the refused one first).
    pub withdrawn: Vec<u64>,
    /// Tables whose rows changed.
    pub tables: BTreeSet<String>,
    /// Conflict-log entries written.
    pub conflicts: Vec<Conflict>,
}

/// This replica, as a withdrawal needs it.
pub(crate) struct Own {
    /// Replica id.
    pub id: ReplicaId,
    /// Its intern number.
    pub num: u32,
    /// The cursor (base of the placeholders).
    pub cursor: u64,
}

/// Withdraws the pending change set `origin_seq` and those written on top of it (see the
/// module docs). `policy` names the mechanism (`server_checked`, `lease`), `code` and
/// `reason` the relay's verdict (those written on top carry the same code). Runs inside the caller's write transaction, after materialize.
/// Returns an empty withdrawal when the change set is not pending (already withdrawn or
/// acknowledged).
pub(crate) fn withdraw(
    conn: &Connection,
    cat: &Tables,
    me: &Own,
    origin_seq: u64,
    policy: &str,
    (code, reason): (ErrorCode, &str),
) -> Result<Withdrawal> {
    let all = log::pending_live(conn)?;
    let Some(first) = all.iter().position(|p| p.cs.origin_seq == origin_seq) else {
        return Ok(Withdrawal::default());
    };
    let key = |rc: &RowChange| {
        (
            rc.table.clone(),
            rmp_serde::to_vec(&rc.pk).unwrap_or_default(),
        )
    };
    let mut rows: HashSet<(String, Vec<u8>)> = all[first].cs.rows.iter().map(key).collect();
    let mut chain = vec![&all[first]];
    for p in &all[first + 1..] {
        if p.cs.rows.iter().any(|rc| rows.contains(&key(rc))) {
            rows.extend(p.cs.rows.iter().map(key));
            chain.push(p);
        }
    }
    let mut out = Withdrawal::default();
    for p in chain.iter().rev() {
        let why = if p.seq == all[first].seq {
            reason.to_owned()
        } else {
            format!(
                "withdrawn with change set {origin_seq}, which it was written on top of: {reason}"
            )
        };
        undo_set(conn, cat, me, p, p.seq, (policy, &why), &mut out)?;
        let placeholder = ChangeSet {
            rows: Vec::new(),
            base: me.cursor,
            fence: None,
            guarded: false,
            ..p.cs.clone()
        };
        log::withdraw(conn, p.seq, (code, &why), &placeholder)?;
        conn.prepare_cached("DELETE FROM ferry_undo WHERE seq = ?1")?
            .execute([p.seq])?;
    }
    out.withdrawn = chain.iter().map(|p| p.cs.origin_seq).collect();
    out.withdrawn.sort_unstable();
    tracing::info!(origin_seq, withdrawn = ?out.withdrawn, policy, reason, "refused change sets rolled back");
    Ok(out)
}

/// Takes back what pending change set `p` (at log row `p.seq`) did, from the undo records
/// kept under `undo_seq` (its log row, or where a quarantine moved them).
/// `(policy, why)` name the mechanism and the reason, for the conflict log.
pub(crate) fn undo_set(
    conn: &Connection,
    cat: &Tables,
    me: &Own,
    p: &Pending,
    undo_seq: i64,
    (policy, why): (&str, &str),
    out: &mut Withdrawal,
) -> Result<()> {
    // Whether a version is this change set's (following a re-issue); a lookup that fails
    // fails the withdrawal (checked at the end).
    let failed = std::cell::RefCell::new(None);
    let mine = |v: &Version| match log::entry_of(conn, v.origin, v.origin_seq) {
        Ok(seq) => seq == Some(p.seq),
        Err(e) => {
            failed.borrow_mut().get_or_insert(e);
            false
        }
    };
    for rc in p.cs.rows.iter().rev() {
        let t = cat.table(&rc.table)?;
        let mut log = |column: Option<&str>, rejected: Value, kept: Value| -> Result<()> {
            let c = conflict::record(
                conn,
                Conflict {
                    id: 0,
                    table: rc.table.clone(),
                    pk: rc.pk.clone(),
                    column: column.map(str::to_owned),
                    kind: ConflictKind::Rejected,
                    policy: policy.to_owned(),
                    local: Side {
                        value: rejected,
                        hlc: p.cs.hlc,
                        origin: me.id,
                    },
                    remote: Side {
                        value: kept,
                        hlc: Hlc(0),
                        origin: ReplicaId([0; 16]),
                    },
                    winner: Winner::Remote,
                    resolution: Some(why.to_owned()),
                },
            )?;
            out.conflicts.push(c);
            Ok(())
        };
        let Some(undo) = load_undo(conn, undo_seq, t, &rc.pk)? else {
            tracing::error!(table = %rc.table, pk = %rc.pk.describe(), "no before-image kept; the row cannot be rolled back");
            log(
                None,
                Value::Null,
                Value::Text(
                    "not rolled back: no before-image (written by another connection)".into(),
                ),
            )?;
            continue;
        };
        let Some(mut s) = rows::load(conn, t, &rc.pk)? else {
            continue;
        };
        let row_level = matches!(rc.op, RowOp::Delete) || rc.cl != undo.prior_cl();
        let col_value = |vals: &Option<Vec<Value>>, i: usize| {
            vals.as_ref()
                .and_then(|v| v.get(i).cloned())
                .unwrap_or(Value::Null)
        };
        if row_level {
            if s.meta.cl != rc.cl || !s.meta.row.as_ref().is_some_and(&mine) {
                continue; // a later incarnation replaced it: nothing of it is left
            }
            // Columns an app upgrade added after the before-image was taken: they keep their
            // current value and version (nothing this change set did touched them).
            let added: Vec<usize> = match &undo.before {
                Some(Before::Row(vals)) => {
                    (vals.len()..t.cols.len()).filter(|i| *i != t.pk).collect()
                }
                _ => Vec::new(),
            };
            match &undo.before {
                Some(Before::Absent) => rows::delete_row(conn, t, &rc.pk)?,
                Some(Before::Row(vals)) => {
                    let current = read_row(conn, t, &rc.pk)?;
                    let cells: Vec<(usize, Value)> = vals
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != t.pk)
                        .map(|(i, v)| (i, v.clone()))
                        .chain(added.iter().map(|i| (*i, col_value(&current, *i))))
                        .collect();
                    rows::insert_row(conn, t, &rc.pk, &cells)?;
                }
                None => {}
            }
            match &undo.prior {
                Some(prior) => {
                    let mut prior = prior.clone();
                    for i in &added {
                        let cv = s
                            .meta
                            .cell(*i as u32)
                            .filter(|v| !mine(v))
                            .unwrap_or(Version::UNWRITTEN);
                        prior.meta.set_cell(*i as u32, cv);
                    }
                    rows::store(conn, t, &rc.pk, &prior)?
                }
                None => rows::forget(conn, t, &rc.pk)?,
            }
            let after = read_row(conn, t, &rc.pk)?;
            match &rc.op {
                RowOp::Delete => log(None, Value::Null, Value::Text("row restored".into()))?,
                RowOp::Upsert(cells) => {
                    for c in cells {
                        if let Cell::Set(name, v) = c {
                            log(Some(name), v.clone(), col_value(&after, t.col(name)?))?;
                        }
                    }
                }
            }
        } else {
            if s.meta.cl != rc.cl {
                continue;
            }
            let RowOp::Upsert(cells) = &rc.op else {
                continue;
            };
            let before_vals = match &undo.before {
                Some(Before::Row(v)) => Some(v.clone()),
                _ => None,
            };
            let mut sets = Vec::new();
            let mut adds = Vec::new();
            for c in cells {
                let i = t.col(c.column())?;
                match c {
                    Cell::Add(_, d) => adds.push((i, d.wrapping_neg())),
                    Cell::Set(name, v) => {
                        let is_mine = s
                            .meta
                            .cells
                            .iter()
                            .any(|(col, cv)| *col == i as u32 && mine(cv));
                        if !is_mine {
                            continue; // written since by someone else: that value stays
                        }
                        let restored = col_value(&before_vals, i);
                        if before_vals.is_some() {
                            sets.push((i, restored.clone()));
                        }
                        s.meta.cells.retain(|(col, _)| *col != i as u32);
                        // The cell's version before the change set, pinned explicitly: where
                        // it was implicit (the row's creation version) the row version may
                        // have changed since (a delete voided by a concurrent update unpins
                        // it), and the cell must not fall back to another one.
                        let prior_cell = undo.prior.as_ref().and_then(|p| p.meta.cell(i as u32));
                        if let Some(pc) = prior_cell {
                            s.meta.cells.push((i as u32, pc));
                        }
                        log(Some(name), v.clone(), restored)?;
                    }
                }
            }
            s.meta.writes.retain(|w| !mine(w));
            if let Some(prior) = &undo.prior {
                for w in &prior.meta.writes {
                    if w.origin == me.num && !s.meta.writes.iter().any(|x| x.origin == w.origin) {
                        s.meta.writes.push(*w);
                    }
                }
            }
            rows::update_row(conn, t, &rc.pk, &sets, &adds)?;
            rows::store(conn, t, &rc.pk, &s)?;
        }
        out.tables.insert(rc.table.clone());
    }
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The pending guarded change sets (by `origin_seq`, oldest first) that the remote change
/// `rc`, sequenced at `seq` by another origin, dooms: the relay will refuse them, because the
/// rule of [`crate::cas::check`] says `rc` conflicts with them. Only change sets still
/// unacknowledged are considered (an acknowledged one was accepted after `rc` or saw it).
pub(crate) fn doomed(conn: &Connection, t: &TableInfo, rc: &RowChange) -> Result<Vec<u64>> {
    let mut st = conn.prepare_cached(
        "SELECT u.seq, u.prior_cl, l.wire FROM ferry_undo u JOIN ferry_log l ON l.seq = u.seq
         WHERE u.tbl = ?1 AND u.pk = ?2 AND l.guarded = 1 AND l.rejected IS NULL
         AND l.server_seq IS NULL AND l.wire IS NOT NULL ORDER BY u.seq",
    )?;
    let found: Vec<(i64, Option<i64>, Vec<u8>)> = st
        .query_map(params![t.id, rc.pk], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let strict = t.mode() == TableMode::ServerChecked;
    let remote_sets = rc.set_columns();
    let mut out = Vec::new();
    for (_, prior_cl, wire) in found {
        let cs: ChangeSet = log::decode(&wire)?;
        let Some(mine) = cs
            .rows
            .iter()
            .find(|r| r.table == t.name() && r.pk == rc.pk)
        else {
            continue;
        };
        let prior_cl = prior_cl.unwrap_or(0) as u64;
        let remote_row = matches!(rc.op, RowOp::Delete) || rc.cl != prior_cl;
        let mine_row = matches!(mine.op, RowOp::Delete) || mine.cl != prior_cl;
        let hit = if strict {
            let my_sets = mine.set_columns();
            remote_row
                || (!remote_sets.is_empty()
                    && (mine_row || remote_sets.iter().any(|c| my_sets.contains(c))))
        } else {
            remote_row || !remote_sets.is_empty()
        };
        if hit {
            out.push(cs.origin_seq);
        }
    }
    Ok(out)
}

/// Drops the undo records of an acknowledged change set.
pub(crate) fn forget_acked(conn: &Connection, origin: u32, origin_seq: u64) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM ferry_undo WHERE seq = (SELECT seq FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2)",
    )?
    .execute(params![origin, origin_seq as i64])?;
    Ok(())
}
