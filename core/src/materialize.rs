//! Materialize: turning stored local change records into wire change sets.
//!
//! The write path stores one compact record per transaction and nothing per row, which keeps
//! local writes close to plain SQLite speed. Before anything needs causal metadata (pushing,
//! applying remote changes) the pending records are materialized in order: each row gets its
//! causal length from `ferry_rows`, its cells get versions, and the wire change set is stored
//! next to the record. Because apply always materializes first, `ferry_rows` seen by a merge
//! always includes every local write.

use crate::capture::{LocalChange, LocalKind, RawCell};
use crate::changeset::{Cell, ChangeSet, RowChange, RowOp};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::log;
use crate::rows::read_row;
use crate::rows::{self, Stored};
use crate::tables::Tables;
use crate::value::Value;
use crate::vv::Version;
use rusqlite::Connection;

/// Materializes up to `limit` pending local records; returns how many.
pub fn run(
    conn: &Connection,
    cat: &Tables,
    me: ReplicaId,
    me_num: u32,
    schema_version: u32,
    limit: usize,
) -> Result<usize> {
    let todo = log::unmaterialized(conn, limit)?;
    let n = todo.len();
    for rec in todo {
        let log::RawRecord {
            seq: row,
            origin_seq: oseq,
            id,
            hlc,
            base,
            raw,
            guarded,
        } = rec;
        let local: LocalChange = rmp_serde::from_slice(&raw)?;
        let v = Version {
            hlc,
            origin: me_num,
            origin_seq: oseq,
            server_seq: 0,
            base,
        };
        let mut out = Vec::with_capacity(local.rows.len());
        for lr in local.rows {
            let t = cat.by_id(lr.table)?;
            let table = t.name().to_owned();
            let stored = rows::load(conn, t, &lr.pk)?;
            if guarded {
                crate::rollback::keep_undo(
                    conn,
                    row,
                    t,
                    &lr.pk,
                    lr.before.as_ref(),
                    stored.as_ref(),
                )?;
            }
            let cl_local = stored.as_ref().map_or(0, |s| s.meta.cl);
            let alive = cl_local % 2 == 1;
            match lr.kind {
                LocalKind::Insert | LocalKind::Update if alive => {
                    let mut s = stored.unwrap_or_default();
                    for c in &lr.cells {
                        if let RawCell::Set(i, _) = c {
                            s.meta.set_cell(u32::from(*i), v);
                        }
                    }
                    s.meta.note_write(v);
                    rows::store(conn, t, &lr.pk, &s)?;
                    out.push(RowChange {
                        table,
                        pk: lr.pk,
                        cl: cl_local,
                        op: RowOp::Upsert(named(t, lr.cells)?),
                    });
                }
                LocalKind::Insert | LocalKind::Update => {
                    // A new incarnation. An update of a row Ferry never tracked (written during
                    // a migration) ships the whole row so receivers get all of it.
                    let cells = if lr.kind == LocalKind::Insert {
                        named(t, lr.cells)?
                    } else {
                        match read_row(conn, t, &lr.pk)? {
                            Some(vals) => full_row(t, vals),
                            None => continue,
                        }
                    };
                    let cl = cl_local + 1;
                    let mut s = Stored::default();
                    s.meta.reincarnate(cl, v);
                    // Captured before an upgrade added columns: those it did not write.
                    s.meta.mark_unwritten(t.cols.len(), t.pk, |i| {
                        cells.iter().any(|c| t.by_name.get(c.column()) == Some(&i))
                    });
                    rows::store(conn, t, &lr.pk, &s)?;
                    out.push(RowChange {
                        table: table.clone(),
                        pk: lr.pk,
                        cl,
                        op: RowOp::Upsert(cells),
                    });
                }
                LocalKind::Delete if alive || stored.is_none() => {
                    let cl = if stored.is_none() { 2 } else { cl_local + 1 };
                    let mut s = stored.unwrap_or_default();
                    if t.update_wins() {
                        s.meta.freeze_cells(t.cols.len());
                    }
                    s.meta.cl = cl;
                    s.meta.row = Some(v);
                    if t.update_wins() {
                        let mut tomb = Vec::new();
                        for c in lr.cells {
                            if let RawCell::Set(i, val) = c {
                                tomb.push((u32::from(i), val));
                            }
                        }
                        s.tomb = Some(tomb);
                    } else {
                        s.meta.cells.clear();
                        s.meta.writes.clear();
                        s.tomb = None;
                    }
                    rows::store(conn, t, &lr.pk, &s)?;
                    out.push(RowChange {
                        table: table.clone(),
                        pk: lr.pk,
                        cl,
                        op: RowOp::Delete,
                    });
                }
                LocalKind::Delete => {}
            }
        }
        let cs = ChangeSet {
            id,
            origin: me,
            origin_seq: oseq,
            hlc,
            base,
            schema_version,
            rows: out,
            fence: local.fence,
            guarded,
        };
        log::set_materialized(conn, row, &cs)?;
    }
    Ok(n)
}

/// Every non-key column of a row as cells (counters as additions from zero).
pub fn full_row(t: &crate::tables::TableInfo, vals: Vec<Value>) -> Vec<Cell> {
    vals.into_iter()
        .enumerate()
        .filter(|(i, _)| *i != t.pk)
        .map(|(i, v)| Cell::whole(t.cols[i].policy, t.cols[i].name.clone(), v))
        .collect()
}

/// Raw cells (column ids) to wire cells (column names).
fn named(t: &crate::tables::TableInfo, cells: Vec<RawCell>) -> Result<Vec<Cell>> {
    cells
        .into_iter()
        .map(|c| {
            let (RawCell::Set(i, _) | RawCell::Add(i, _)) = &c;
            let name = t
                .cols
                .get(usize::from(*i))
                .ok_or_else(|| {
                    Error::Corrupt(format!("local change names column {i} of `{}`", t.name()))
                })?
                .name
                .clone();
            Ok(match c {
                RawCell::Set(_, v) => Cell::Set(name, v),
                RawCell::Add(_, d) => Cell::Add(name, d),
            })
        })
        .collect()
}
