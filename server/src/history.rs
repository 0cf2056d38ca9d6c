//! Row histories: each row's changes, pruned to the ones that still make its state, kept so
//! that a device can receive the current rows of a scope without replaying the whole log
//! (a snapshot; see ADR 0003 and `ferry_core::snapshot`).
//!
//! Both stores keep one history per row, folded from the log in order behind a watermark
//! (see [`Folder`]). [`append`] adds one change to a row's history and drops what can no
//! longer change the row's state on any replica, whatever it already holds:
//!
//! * a change to an **older incarnation** than one the history already has, on a
//!   `delete_wins` table: every replica ignores it;
//! * everything before a change that begins a **newer incarnation** (an upsert with a larger
//!   causal length re-creates the row with exactly its cells; on `delete_wins` tables a
//!   delete clears it the same way);
//! * a cell value **overwritten for certain**: a later write of the same cell in the same
//!   incarnation with a larger `(hlc, origin)` (the rule compaction uses);
//! * **counter additions** of one origin, folded into that origin's latest change in the
//!   same incarnation (additions commute; the sum is what counts);
//! * a change left with **nothing** in it, unless it began the incarnation (replicas create
//!   the row from it) or, on `update_wins` tables, is its origin's latest write (a delete is
//!   decided against each origin's latest write).
//!
//! Pruning and folding look only at the current run of upserts of one incarnation (nothing
//! across a delete), so what a delete decides — concurrency, and on `update_wins` tables the
//! values a revived row comes back with — is unchanged. The store suite replays snapshots
//! into real replicas and compares them with replicas that replayed the whole log.

use crate::catalog::RelayCatalog;
use crate::error::{RelayError, Result};
use crate::stored::StoredSet;
use ferry_core::changeset::{Cell, MAX_COUNTER_DELTA, RowOp};
use ferry_core::snapshot::HistEntry;
use ferry_core::{DeleteRule, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Adds `e`, the newest change to a row, to the row's `history` (oldest first), pruning
/// what can no longer make a difference (see the module docs).
pub fn append(history: &mut Vec<HistEntry>, mut e: HistEntry, rule: DeleteRule) {
    let update_wins = rule == DeleteRule::UpdateWins;
    let max_cl = history.iter().map(|h| h.cl).max().unwrap_or(0);
    let is_delete = matches!(e.op, RowOp::Delete);
    if !update_wins && (e.cl < max_cl || (is_delete && e.cl == max_cl)) {
        return; // every replica ignores it (a stale incarnation, or a delete seen again)
    }
    if e.cl > max_cl && (!is_delete || !update_wins) {
        history.clear();
    }
    if let RowOp::Upsert(cells) = &mut e.op {
        // The run of upserts of this incarnation that `e` continues.
        let run = history
            .iter()
            .rposition(|h| h.cl != e.cl || matches!(h.op, RowOp::Delete))
            .map_or(0, |i| i + 1);
        let me = (e.hlc, e.origin);
        for (i, h) in history.iter_mut().enumerate().skip(run) {
            let RowOp::Upsert(old) = &mut h.op else {
                continue;
            };
            if (h.hlc, h.origin) < me {
                old.retain(|c| match c {
                    Cell::Set(n, _) => {
                        !cells.iter().any(|x| matches!(x, Cell::Set(m, _) if m == n))
                    }
                    Cell::Add(..) => true,
                });
            }
            if i > 0 && h.origin == e.origin {
                // Fold this origin's earlier additions into its newest change.
                // A sum beyond what one operation may carry stays where it is.
                old.retain(|c| match c {
                    Cell::Add(n, d) => {
                        match cells
                            .iter_mut()
                            .find(|x| matches!(x, Cell::Add(m, _) if m == n))
                        {
                            Some(Cell::Add(_, total)) => match total.checked_add(*d) {
                                Some(t) if t.unsigned_abs() <= MAX_COUNTER_DELTA => {
                                    *total = t;
                                    false
                                }
                                _ => true,
                            },
                            _ => {
                                cells.push(Cell::Add(n.clone(), *d));
                                false
                            }
                        }
                    }
                    Cell::Set(..) => true,
                });
            }
        }
        let origin = e.origin;
        let mut i = run.max(1);
        while i < history.len() {
            let h = &history[i];
            let empty = matches!(&h.op, RowOp::Upsert(c) if c.is_empty());
            if empty && (!update_wins || h.origin == origin) {
                history.remove(i);
            } else {
                i += 1;
            }
        }
    }
    history.push(e);
}

/// One row's stored state: its scope (the scope of its newest change) and its history.
#[derive(Debug, Clone, PartialEq)]
pub struct RowHistory {
    /// The row's scope now.
    pub scope: String,
    /// Relay position of the newest change folded in.
    pub seq: u64,
    /// Pruned history, oldest first.
    pub history: Vec<HistEntry>,
}

/// Encodes a history for storage.
pub fn encode(history: &[HistEntry]) -> Result<Vec<u8>> {
    rmp_serde::to_vec(history).map_err(|e| RelayError::Store(format!("encode row history: {e}")))
}

/// Decodes a stored history.
pub fn decode(bytes: &[u8]) -> Result<Vec<HistEntry>> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| RelayError::Store(format!("stored row history is damaged: {e}")))
}

/// A row's identity in the stores: `(table, pk key)`.
pub type RowKey = (String, Vec<u8>);

/// Folds a run of change sets, in log order, into the histories of the rows they touch.
#[derive(Debug)]
pub struct Folder<'a> {
    cat: &'a RelayCatalog,
    /// Rows touched, with their new state, in key order (the order they are written back
    /// in, which keeps a store's index inserts close together).
    pub rows: BTreeMap<RowKey, (Value, RowHistory)>,
    /// Position of the last change set folded.
    pub position: u64,
}

/// The rows `sets` touch, in key order (to load their stored histories first).
pub fn keys(sets: &[StoredSet]) -> Result<Vec<RowKey>> {
    let mut keys = BTreeSet::new();
    for s in sets {
        for rc in &s.change_set.rows {
            keys.insert((rc.table.clone(), crate::scoping::pk_key(&rc.pk)?));
        }
    }
    Ok(keys.into_iter().collect())
}

impl<'a> Folder<'a> {
    /// Folds `sets` (in log order, continuing from `position`) onto `stored`, the stored
    /// histories of the rows they touch (see [`keys`]); rows missing from it have none yet.
    pub fn run(
        cat: &'a RelayCatalog,
        position: u64,
        sets: &[StoredSet],
        mut stored: HashMap<RowKey, RowHistory>,
    ) -> Result<Self> {
        let mut f = Folder {
            cat,
            rows: BTreeMap::new(),
            position,
        };
        for s in sets {
            f.fold(s, |t, pk| Ok(stored.remove(&(t.to_owned(), pk.to_vec()))))?;
        }
        Ok(f)
    }

    /// Folds the next change set.
    fn fold(
        &mut self,
        s: &StoredSet,
        mut load: impl FnMut(&str, &[u8]) -> Result<Option<RowHistory>>,
    ) -> Result<()> {
        let cs = &s.change_set;
        for (i, rc) in cs.rows.iter().enumerate() {
            let Some(tag) = s.tags.get(i) else {
                return Err(RelayError::Store(format!(
                    "stored change set {} has no scope tag for row {i}",
                    s.server_seq
                )));
            };
            let rule = self
                .cat
                .tables
                .get(&rc.table)
                .map_or(DeleteRule::DeleteWins, |t| t.delete_rule);
            let key = (rc.table.clone(), crate::scoping::pk_key(&rc.pk)?);
            let slot = match self.rows.entry(key) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let found = load(&v.key().0, &v.key().1)?;
                    v.insert((
                        rc.pk.clone(),
                        found.unwrap_or(RowHistory {
                            scope: tag.scope.clone(),
                            seq: 0,
                            history: Vec::new(),
                        }),
                    ))
                }
            };
            let row = &mut slot.1;
            append(
                &mut row.history,
                HistEntry {
                    server_seq: s.server_seq,
                    origin: cs.origin,
                    origin_seq: cs.origin_seq,
                    hlc: cs.hlc,
                    base: cs.base,
                    cl: rc.cl,
                    op: rc.op.clone(),
                },
                rule,
            );
            row.scope.clone_from(&tag.scope);
            row.seq = s.server_seq;
        }
        self.position = s.server_seq;
        Ok(())
    }
}
