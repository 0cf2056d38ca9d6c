//! Compare-and-set: the relay-side check that makes `server_checked` tables (and `custom`
//! columns) strict.
//!
//! A change set carries `base`, the relay position its origin had applied when it was
//! committed. The relay accepts it only if no change the origin had not seen — sequenced
//! after `base`, by another origin — touched the same cells. Because the relay sequences one
//! change set at a time, this makes every accepted write to a checked cell a successful
//! compare-and-set against the value its writer saw: linearizable at the relay.
//!
//! What the check needs is small and kept per row, not per change: for each row of a checked
//! table, the last row-level operation (a delete or a new incarnation: its causal length,
//! position and origin) and, for each checked cell written since, the last write's position
//! and origin. A row-level operation touches every cell, so it conflicts with any unseen cell
//! write and clears the cell stamps. Counter columns never conflict (additions commute) and
//! are not checked.
//!
//! The logic here is pure: a store supplies the stamps through [`CasIndex`] inside its
//! sequencing transaction and writes back the [`CasUpdate`]s of an accepted change set, so the
//! SQLite store, the PostgreSQL store and the in-memory [`crate::sequencer::Sequencer`] apply
//! exactly the same rule.

use crate::changeset::{ChangeSet, RowOp};
use crate::error::Result;
use crate::ids::ReplicaId;
use crate::schema::{TableDecl, TableMode};
use crate::value::Value;

/// Who last wrote a cell, and where that write sits in the relay's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellStamp {
    /// Relay position of the write.
    pub seq: u64,
    /// Its origin.
    pub origin: ReplicaId,
}

impl CellStamp {
    /// No write (position 0).
    pub const NONE: CellStamp = CellStamp {
        seq: 0,
        origin: ReplicaId([0; 16]),
    };
}

/// What the check keeps per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowStamp {
    /// The row's causal length.
    pub cl: u64,
    /// The last row-level operation (delete or new incarnation); position 0 when none seen.
    pub row: CellStamp,
    /// The last write with a non-counter effect (any set, delete or new incarnation).
    pub write: CellStamp,
    /// The last such write by an origin other than `write`'s. Without it, a device's own
    /// later write would hide an earlier one by someone else that its change set never saw.
    pub other: CellStamp,
}

impl RowStamp {
    /// A row first written by `now` (or with no write yet, when `now` is position 0).
    pub fn new(cl: u64, row: CellStamp, now: CellStamp) -> Self {
        RowStamp {
            cl,
            row,
            write: now,
            other: CellStamp::NONE,
        }
    }

    /// Records a write with a non-counter effect.
    pub fn wrote(&mut self, now: CellStamp) {
        if self.write.origin != now.origin {
            self.other = self.write;
        }
        self.write = now;
    }

    /// The last write with a non-counter effect by an origin other than `origin`.
    pub fn last_write_not_by(&self, origin: ReplicaId) -> CellStamp {
        if self.write.origin != origin {
            self.write
        } else {
            self.other
        }
    }
}

/// Stamps a store keeps for the check.
pub trait CasIndex {
    /// The row's stamp, if the row has been written since the index existed.
    fn row(&mut self, table: &str, pk: &Value) -> Result<Option<RowStamp>>;
    /// Stamps of the row's checked cells written since its last row-level operation.
    fn cells(&mut self, table: &str, pk: &Value) -> Result<Vec<(String, CellStamp)>>;
}

/// Stamps to record for one row once its change set is sequenced (at its position, with its
/// origin).
#[derive(Debug, Clone, PartialEq)]
pub struct CasUpdate {
    /// Table.
    pub table: String,
    /// Key.
    pub pk: Value,
    /// Causal length after the change.
    pub cl: u64,
    /// A row-level operation: the row stamp moves and the cell stamps are cleared.
    pub row_level: bool,
    /// The change had a non-counter effect: the write stamp moves.
    pub write: bool,
    /// Checked cells written.
    pub cells: Vec<String>,
}

/// Why a change set failed the check.
#[derive(Debug, Clone, PartialEq)]
pub struct CasConflict {
    /// Table.
    pub table: String,
    /// Key.
    pub pk: Value,
    /// The cell, or `None` when the row as a whole was changed.
    pub column: Option<String>,
    /// Position of the unseen change.
    pub seq: u64,
}

impl std::fmt::Display for CasConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.column {
            Some(c) => write!(
                f,
                "`{}`.`{c}` of row {} was changed at relay position {} by a change this change set had not seen",
                self.table,
                self.pk.describe(),
                self.seq
            ),
            None => write!(
                f,
                "row {} of `{}` was changed at relay position {} by a change this change set had not seen",
                self.pk.describe(),
                self.table,
                self.seq
            ),
        }
    }
}

/// True when writes to `column` of `t` are checked cell by cell.
pub fn is_checked(t: &TableDecl, column: &str) -> bool {
    t.columns.iter().any(|c| {
        c.name == column
            && c.policy
                .checked_by_relay(t.mode == TableMode::ServerChecked)
    })
}

/// True when a change set is checked as a whole: it writes a `server_checked` table, is
/// guarded by a lease, or says it was made on top of such a change set (`guarded`).
pub fn is_guarded(cs: &ChangeSet, decl: impl Fn(&str) -> Option<TableMode>) -> bool {
    cs.guarded
        || cs.fence.is_some()
        || cs
            .rows
            .iter()
            .any(|r| decl(&r.table) == Some(TableMode::ServerChecked))
}

/// Checks `cs` against the index. `Ok(Ok(updates))`: it passes; record `updates` when it is
/// sequenced (every change set records them, checked or not). `Ok(Err(conflict))`: refuse
/// it. `Err`: the index failed.
///
/// The rule, for a change set C and an earlier change X by another origin with
/// `X.server_seq > C.base` (unseen by C):
/// * rows of `server_checked` tables: C conflicts if X deleted or re-created the row, or if
///   X set a cell C sets, or if X set any cell and C deletes or re-creates the row;
/// * `custom` columns of other tables: C conflicts if X set the same cell;
/// * other rows of a guarded change set (see [`is_guarded`]): C conflicts if X had any
///   non-counter effect on the row (the row is the unit, because a refused change set is
///   rolled back as a whole and its writes to `multi_writer` rows must not have been merged
///   with writes it never saw).
pub fn check<'a>(
    decl: impl Fn(&str) -> Option<&'a TableDecl>,
    cs: &ChangeSet,
    idx: &mut dyn CasIndex,
) -> Result<std::result::Result<Vec<CasUpdate>, CasConflict>> {
    let unseen = |s: CellStamp| s.seq > cs.base && s.origin != cs.origin;
    let guarded = is_guarded(cs, |t| decl(t).map(|d| d.mode));
    let mut updates = Vec::with_capacity(cs.rows.len());
    for rc in &cs.rows {
        let Some(t) = decl(&rc.table) else { continue };
        let conflict = |column: Option<&str>, seq: u64| {
            Ok(Err(CasConflict {
                table: rc.table.clone(),
                pk: rc.pk.clone(),
                column: column.map(str::to_owned),
                seq,
            }))
        };
        let strict = t.mode == TableMode::ServerChecked;
        let row = idx.row(&rc.table, &rc.pk)?;
        let row_level = matches!(rc.op, RowOp::Delete) || row.is_none_or(|r| rc.cl != r.cl);
        let sets = rc.set_columns();
        let checked: Vec<String> = sets
            .iter()
            .filter(|c| is_checked(t, c))
            .map(|c| (*c).to_owned())
            .collect();
        let needs_cells = strict || !checked.is_empty();
        let cells = if needs_cells {
            idx.cells(&rc.table, &rc.pk)?
        } else {
            Vec::new()
        };
        if strict {
            if let Some(r) = row.filter(|r| unseen(r.row)) {
                return conflict(None, r.row.seq);
            }
            let hit = cells
                .iter()
                .find(|(c, s)| unseen(*s) && (row_level || checked.contains(c)));
            if let Some((c, s)) = hit {
                return conflict(Some(c), s.seq);
            }
        } else {
            if guarded
                && let Some(w) = row
                    .map(|r| r.last_write_not_by(cs.origin))
                    .filter(|w| unseen(*w))
            {
                return conflict(None, w.seq);
            }
            if let Some((c, s)) = cells
                .iter()
                .find(|(c, s)| unseen(*s) && checked.contains(c))
            {
                return conflict(Some(c), s.seq);
            }
        }
        updates.push(CasUpdate {
            table: rc.table.clone(),
            pk: rc.pk.clone(),
            cl: rc.cl,
            row_level,
            write: row_level || !sets.is_empty(),
            cells: checked,
        });
    }
    Ok(Ok(updates))
}

/// A row's stamps in [`MemIndex`].
type MemRow = (RowStamp, Vec<(String, CellStamp)>);

/// An in-memory [`CasIndex`] (the in-memory sequencer's, and a reference for stores).
#[derive(Debug, Default, Clone)]
pub struct MemIndex {
    rows: std::collections::HashMap<(String, Vec<u8>), MemRow>,
}

fn key(table: &str, pk: &Value) -> (String, Vec<u8>) {
    (table.to_owned(), rmp_serde::to_vec(pk).unwrap_or_default())
}

impl MemIndex {
    /// Records the updates of a change set sequenced at `seq` from `origin`.
    pub fn record(&mut self, updates: &[CasUpdate], seq: u64, origin: ReplicaId) {
        let now = CellStamp { seq, origin };
        let none = CellStamp {
            seq: 0,
            origin: ReplicaId([0; 16]),
        };
        for u in updates {
            let e = self
                .rows
                .entry(key(&u.table, &u.pk))
                .or_insert((RowStamp::new(u.cl, none, none), Vec::new()));
            e.0.cl = u.cl;
            if u.row_level {
                e.0.row = now;
                e.1.clear();
            }
            if u.write {
                e.0.wrote(now);
            }
            for c in &u.cells {
                match e.1.iter_mut().find(|(x, _)| x == c) {
                    Some(slot) => slot.1 = now,
                    None => e.1.push((c.clone(), now)),
                }
            }
        }
    }
}

impl CasIndex for MemIndex {
    fn row(&mut self, table: &str, pk: &Value) -> Result<Option<RowStamp>> {
        Ok(self.rows.get(&key(table, pk)).map(|r| r.0))
    }
    fn cells(&mut self, table: &str, pk: &Value) -> Result<Vec<(String, CellStamp)>> {
        Ok(self
            .rows
            .get(&key(table, pk))
            .map(|r| r.1.clone())
            .unwrap_or_default())
    }
}
