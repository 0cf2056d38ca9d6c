//! Capture: turning one transaction's writes to synced tables into one local change record.
//!
//! The SDK's own writes are seen by SQLite's pre-update hook and coalesced in memory per row
//! (net effect of the transaction: a row inserted then updated is one insert; a delete then
//! re-insert of the same key, as `INSERT OR REPLACE` does, is an update of the columns that
//! differ). Writes by other connections are logged by triggers (see `catalog`) and folded the
//! same way. Either path ends in a [`LocalChange`], stored as one record per transaction; the
//! causal metadata (causal length, cell versions) is added later by `materialize`, off the
//! app's write path.

use crate::changeset::MAX_COUNTER_DELTA;
use crate::error::{Error, Result};
use crate::tables::{TableInfo, Tables};
use crate::value::{Value, ref_eq};
use parking_lot::Mutex;
use rusqlite::Connection;
use rusqlite::hooks::{
    Action, PreUpdateCase, PreUpdateNewValueAccessor, PreUpdateOldValueAccessor,
};
use rusqlite::types::ValueRef;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Net effect of a transaction on one row, before causal metadata is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalKind {
    /// The row did not exist before and exists after; cells hold every column.
    Insert,
    /// The row existed before and after; cells hold what changed.
    Update,
    /// The row existed before and not after; for `update_wins` tables cells hold its values
    /// from before the transaction.
    Delete,
}

/// A cell of a local change record, by column id (the record is local to this file, so it
/// carries ids rather than names: smaller and cheaper on the write path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RawCell {
    /// Column set to a value.
    Set(u16, Value),
    /// Counter column changed by a delta.
    Add(u16, i64),
}

/// A row as it was before the transaction (kept when the change set may be refused by the
/// relay and rolled back: `server_checked` tables and lease-guarded transactions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Before {
    /// The row did not exist.
    Absent,
    /// Every column's value, in column order.
    Row(Vec<Value>),
}

/// One row of a local change record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRow {
    /// Local table id.
    pub table: u32,
    /// Primary key.
    pub pk: Value,
    /// What happened.
    pub kind: LocalKind,
    /// Cells (see [`LocalKind`]).
    pub cells: Vec<RawCell>,
    /// The row before the transaction, when it is kept (see [`Before`]); `None` when not
    /// kept or not known (a write by another connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Before>,
}

/// Everything one local transaction changed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LocalChange {
    /// Rows in first-touched order.
    pub rows: Vec<LocalRow>,
    /// The lease the transaction was guarded by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<crate::changeset::Fence>,
}

/// Accumulated net effect on one row.
#[derive(Debug)]
struct RowAcc {
    table: u32,
    pk: Value,
    existed_before: bool,
    alive: bool,
    /// Final values of touched non-counter columns.
    cells: Vec<(u16, Value)>,
    /// Summed counter deltas.
    deltas: Vec<(u16, i64)>,
    /// Values the row had when it was last deleted in this transaction.
    deleted_old: Option<Vec<Value>>,
    /// Values the row had before the transaction (kept for `update_wins` tables only: a
    /// delete's tomb must hold what other replicas know, not in-transaction edits the net
    /// effect never ships).
    original: Option<Vec<Value>>,
    /// Events seen for this row so far.
    events: u32,
    /// Foreign fold only: columns whose final value must be read back from the table
    /// (`None` when the row needs no read).
    reread: Option<Vec<bool>>,
}

impl RowAcc {
    fn set(&mut self, i: usize, v: Value) {
        let i = i as u16;
        match self.cells.iter_mut().find(|(c, _)| *c == i) {
            Some(slot) => slot.1 = v,
            None => self.cells.push((i, v)),
        }
    }
    fn touched(&self, i: usize) -> bool {
        self.cells.iter().any(|(c, _)| *c == i as u16)
    }
    fn add(&mut self, i: usize, d: i64) {
        let i = i as u16;
        match self.deltas.iter_mut().find(|(c, _)| *c == i) {
            Some(slot) => slot.1 = slot.1.wrapping_add(d),
            None => self.deltas.push((i, d)),
        }
    }
    /// Foreign fold: the row's final values of `cols` are read back from the table.
    fn reread(&mut self, cols: impl IntoIterator<Item = usize>, ncols: usize) {
        let flags = self.reread.get_or_insert_with(|| vec![false; ncols]);
        for c in cols {
            flags[c] = true;
        }
    }
    fn delta(&self, i: usize) -> i64 {
        self.deltas
            .iter()
            .find(|(c, _)| *c == i as u16)
            .map_or(0, |(_, d)| *d)
    }
}

/// Per-transaction accumulator shared with the pre-update hook.
#[derive(Default)]
pub struct Accumulator {
    rows: Vec<RowAcc>,
    /// Row index by hash of (table, key); looked up with a borrowed key, so touching an
    /// already-seen row allocates nothing.
    index: hashbrown::HashTable<usize>,
    error: Option<Error>,
    /// The lease guarding the running transaction: every row's before-image is kept.
    fence: Option<crate::changeset::Fence>,
    /// Keep every row's before-image (set by the replica for each transaction while strict
    /// writes are possible: the schema has `server_checked` tables or a guarded change set is
    /// pending).
    pub keep_all: bool,
}

/// True when rows of `t` keep their before-image in a transaction (guarded or not).
fn keeps_before(t: &TableInfo, guarded: bool) -> bool {
    guarded || t.mode() == crate::schema::TableMode::ServerChecked
}

impl std::fmt::Debug for Accumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accumulator")
            .field("rows", &self.rows.len())
            .finish()
    }
}

fn key_hash(table: u32, pk: ValueRef<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    table.hash(&mut h);
    match pk {
        ValueRef::Null => 0u8.hash(&mut h),
        ValueRef::Integer(i) => (1u8, i).hash(&mut h),
        ValueRef::Real(f) => (2u8, f.to_bits()).hash(&mut h),
        ValueRef::Text(t) => (3u8, t).hash(&mut h),
        ValueRef::Blob(b) => (4u8, b).hash(&mut h),
    }
    h.finish()
}

impl Accumulator {
    /// The accumulator row for `(t, pk)`, created with `existed_before` if new.
    fn entry(&mut self, t: &TableInfo, pk: ValueRef<'_>, existed_before: bool) -> &mut RowAcc {
        let hash = key_hash(t.id, pk);
        let rows = &self.rows;
        let found = self
            .index
            .find(hash, |&i| {
                rows[i].table == t.id && ref_eq(rows[i].pk.as_ref(), pk)
            })
            .copied();
        let i = match found {
            Some(i) => i,
            None => {
                let i = self.rows.len();
                self.rows.push(RowAcc {
                    table: t.id,
                    pk: Value::from_ref(pk),
                    existed_before,
                    alive: existed_before,
                    cells: Vec::new(),
                    deltas: Vec::new(),
                    deleted_old: None,
                    original: None,
                    events: 0,
                    reread: None,
                });
                let rows = &self.rows;
                self.index
                    .insert_unique(hash, i, |&j| key_hash(rows[j].table, rows[j].pk.as_ref()));
                i
            }
        };
        let row = &mut self.rows[i];
        row.events += 1;
        row
    }

    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// A row was inserted with `new` values.
    pub(crate) fn insert(&mut self, t: &TableInfo, new: Vec<Value>) {
        let pk = new[t.pk].clone();
        let acc = self.entry(t, pk.as_ref(), false);
        let reinsert_of = if acc.alive {
            None
        } else {
            acc.deleted_old.take()
        };
        acc.alive = true;
        let mut bad = None;
        for (i, v) in new.into_iter().enumerate() {
            if t.cols[i].policy.is_additive() {
                match counter_value(v.as_ref()) {
                    Some(n) => acc.add(i, n),
                    None => bad = Some((i, v.describe())),
                }
            } else if i != t.pk {
                let changed = match &reinsert_of {
                    Some(old) => acc.touched(i) || old[i] != v,
                    None => true,
                };
                if changed {
                    acc.set(i, v);
                }
            }
        }
        if let Some((i, got)) = bad {
            self.fail(invalid_counter(t, i, got));
        }
    }

    /// A row with `old` values was deleted.
    pub(crate) fn delete(&mut self, t: &TableInfo, old: Vec<Value>) {
        let pk = old[t.pk].clone();
        let keep = t.update_wins() || keeps_before(t, self.keeps_all());
        let acc = self.entry(t, pk.as_ref(), true);
        if keep && acc.events == 1 {
            acc.original = Some(old.clone());
        }
        acc.alive = false;
        for (i, v) in old.iter().enumerate() {
            if t.cols[i].policy.is_additive() {
                acc.add(i, counter_value(v.as_ref()).unwrap_or(0).wrapping_neg());
            }
        }
        acc.deleted_old = Some(old);
    }

    /// Drops everything (rollback).
    pub fn clear(&mut self) {
        self.rows.clear();
        self.index.clear();
        self.error = None;
        self.fence = None;
    }

    fn keeps_all(&self) -> bool {
        self.keep_all || self.fence.is_some()
    }

    /// Guards the running transaction with a lease grant (before anything is written).
    pub fn guard(&mut self, fence: crate::changeset::Fence) -> Result<()> {
        if !self.rows.is_empty() {
            return Err(Error::InvalidInput(
                "a transaction must be guarded by its lease before it writes anything".into(),
            ));
        }
        self.fence = Some(fence);
        Ok(())
    }

    /// Turns the accumulated rows into a local change record.
    pub fn finish(&mut self, cat: &Tables) -> Result<LocalChange> {
        if let Some(e) = self.error.take() {
            self.clear();
            return Err(e);
        }
        let rows = std::mem::take(&mut self.rows);
        self.index.clear();
        let guarded = self.keeps_all();
        let mut out = LocalChange {
            rows: Vec::with_capacity(rows.len()),
            fence: self.fence.take(),
        };
        for mut acc in rows {
            let t = cat.by_id(acc.table)?;
            let before = if !keeps_before(t, guarded) {
                None
            } else if acc.existed_before {
                acc.original.clone().map(Before::Row)
            } else {
                Some(Before::Absent)
            };
            let kind = match (acc.existed_before, acc.alive) {
                (false, true) => LocalKind::Insert,
                (true, true) => LocalKind::Update,
                (true, false) => LocalKind::Delete,
                (false, false) => continue,
            };
            let mut cells = Vec::new();
            match kind {
                LocalKind::Insert | LocalKind::Update => {
                    acc.cells.sort_by_key(|(c, _)| *c);
                    cells.reserve(acc.cells.len() + acc.deltas.len());
                    cells.extend(
                        std::mem::take(&mut acc.cells)
                            .into_iter()
                            .map(|(c, v)| RawCell::Set(c, v)),
                    );
                    for (i, c) in t.cols.iter().enumerate() {
                        if c.policy.is_additive() {
                            let d = acc.delta(i);
                            if kind == LocalKind::Insert || d != 0 {
                                cells.push(RawCell::Add(i as u16, d));
                            }
                        }
                    }
                    if kind == LocalKind::Update && cells.is_empty() {
                        continue;
                    }
                }
                LocalKind::Delete => {
                    if t.update_wins()
                        && let Some(old) = acc.original.take().or(acc.deleted_old.take())
                    {
                        cells.extend(
                            old.into_iter()
                                .enumerate()
                                .filter(|(i, _)| *i != t.pk)
                                .map(|(i, v)| RawCell::Set(i as u16, v)),
                        );
                    }
                }
            }
            out.rows.push(LocalRow {
                table: t.id,
                pk: acc.pk,
                kind,
                cells,
                before,
            });
        }
        Ok(out)
    }
}

fn counter_value(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        ValueRef::Null => Some(0),
        _ => None,
    }
}

fn invalid_counter(t: &TableInfo, i: usize, got: String) -> Error {
    Error::InvalidCounter {
        table: t.name().to_owned(),
        column: t.cols[i].name.clone(),
        got,
    }
}

/// State shared between the replica and its pre-update hook.
#[derive(Debug, Default)]
pub struct HookState {
    /// Capture is on only inside an SDK write transaction.
    pub enabled: bool,
    /// The catalog (replaced after schema changes).
    pub catalog: Arc<Tables>,
    /// What the current transaction has changed.
    pub acc: Accumulator,
    /// Columns the running top-level statement can change, per table id, as SQLite's
    /// authorizer reported them when the statement was prepared. Lets the hook compare only
    /// those columns of an UPDATE instead of reading every new value.
    pub stmt_cols: Option<Arc<StmtCols>>,
}

/// Columns a statement's `SET` list names, per synced table id.
pub type StmtCols = Vec<(u32, Vec<usize>)>;

/// Every old value of the row being deleted or updated.
fn old_row(old: &PreUpdateOldValueAccessor, n: i32) -> Vec<Value> {
    (0..n)
        .map(|i| {
            old.get_old_column_value(i)
                .map(Value::from_ref)
                .unwrap_or(Value::Null)
        })
        .collect()
}

/// Every new value of the row being inserted or updated.
fn new_row(new: &PreUpdateNewValueAccessor, n: i32) -> Vec<Value> {
    (0..n)
        .map(|i| {
            new.get_new_column_value(i)
                .map(Value::from_ref)
                .unwrap_or(Value::Null)
        })
        .collect()
}

/// Installs the pre-update hook that feeds `state`. The hook runs for every row the SDK's
/// connection writes, so it allocates only for what it must keep.
pub fn install_hook(conn: &mut Connection, state: Arc<Mutex<HookState>>) -> Result<()> {
    conn.preupdate_hook(Some(
        move |_action: Action, db: &str, table: &str, case: &PreUpdateCase| {
            if db != "main" {
                return;
            }
            let mut guard = state.lock();
            let HookState {
                enabled,
                catalog,
                acc,
                stmt_cols,
            } = &mut *guard;
            let guarded = acc.keeps_all();
            if !*enabled {
                return;
            }
            let Some(t) = catalog.get(table) else { return };
            let n = t.cols.len() as i32;
            match case {
                PreUpdateCase::Insert(new) => {
                    acc.insert(t, new_row(new, n));
                }
                PreUpdateCase::Delete(old) => {
                    acc.delete(t, old_row(old, n));
                }
                PreUpdateCase::Update {
                    old_value_accessor: old,
                    new_value_accessor: new,
                } => {
                    let pk = t.pk as i32;
                    let (Ok(old_pk), Ok(new_pk)) =
                        (old.get_old_column_value(pk), new.get_new_column_value(pk))
                    else {
                        acc.fail(Error::Corrupt(format!(
                            "pre-update values of `{table}` unreadable"
                        )));
                        return;
                    };
                    if !ref_eq(old_pk, new_pk) {
                        // A key change is a delete of the old key and an insert of the new one.
                        acc.delete(t, old_row(old, n));
                        acc.insert(t, new_row(new, n));
                        return;
                    }
                    let mut bad = None;
                    let row = acc.entry(t, old_pk, true);
                    if row.events == 1 && (t.update_wins() || keeps_before(t, guarded)) {
                        row.original = Some(old_row(old, n));
                    }
                    // At depth 0 the statement's own SET list bounds what can change;
                    // trigger-driven updates (depth > 0) and unknown statements compare
                    // every column.
                    let all: Vec<usize>;
                    let known = match (old.get_query_depth(), stmt_cols.as_deref()) {
                        (0, Some(sc)) => sc.iter().find(|(id, _)| *id == t.id).map(|(_, c)| c),
                        _ => None,
                    };
                    let cols: &[usize] = match known {
                        Some(c) => c,
                        None => {
                            all = (0..t.cols.len()).collect();
                            &all
                        }
                    };
                    for &c in cols {
                        let i = c as i32;
                        let (Ok(a), Ok(b)) =
                            (old.get_old_column_value(i), new.get_new_column_value(i))
                        else {
                            continue;
                        };
                        if ref_eq(a, b) {
                            continue;
                        }
                        if t.cols[c].policy.is_additive() {
                            match (counter_value(a), counter_value(b)) {
                                (Some(x), Some(y)) => match y.checked_sub(x) {
                                    Some(d) if d.unsigned_abs() <= MAX_COUNTER_DELTA => {
                                        row.add(c, d)
                                    }
                                    _ => {
                                        bad = Some((
                                            c,
                                            format!(
                                                "a change from {x} to {y} (more than ±{MAX_COUNTER_DELTA} at once)"
                                            ),
                                        ))
                                    }
                                },
                                _ => bad = Some((c, Value::from_ref(b).describe())),
                            }
                        } else {
                            row.set(c, Value::from_ref(b));
                        }
                    }
                    if let Some((c, got)) = bad {
                        acc.fail(invalid_counter(t, c, got));
                    }
                }
                PreUpdateCase::Unknown => {
                    acc.fail(Error::Corrupt(format!(
                        "unknown pre-update event on `{table}`"
                    )));
                }
            }
        },
    ))?;
    Ok(())
}

/// Folds writes made by other connections (logged by triggers) into an accumulator, and
/// empties the log. Runs inside the SDK's write transaction.
pub fn fold_foreign(conn: &Connection, cat: &Tables, acc: &mut Accumulator) -> Result<bool> {
    let mut st = conn.prepare_cached(
        "SELECT seq, tbl, pk, op, newpk, cols, deltas, existed FROM ferry_foreign ORDER BY seq",
    )?;
    type Row = (
        i64,
        i64,
        Value,
        i64,
        Value,
        Option<String>,
        Option<String>,
        Option<i64>,
    );
    let entries: Vec<Row> = st
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if entries.is_empty() {
        // Stash rows left by a foreign INSERT OR IGNORE / upsert that inserted nothing.
        conn.prepare_cached("DELETE FROM ferry_stash")?
            .execute([])?;
        return Ok(false);
    }
    for (seq, tbl, pk, op, newpk, cols, deltas, existed) in entries {
        let t = cat.by_id(tbl as u32)?;
        let n = t.cols.len();
        let counter_json: serde_json::Map<String, serde_json::Value> = match &deltas {
            Some(d) => serde_json::from_str(d)?,
            None => serde_json::Map::new(),
        };
        match op {
            1 => {
                let e = acc.entry(t, pk.as_ref(), existed == Some(1));
                e.alive = true;
                for (name, d) in &counter_json {
                    let i = t.col(name)?;
                    e.add(i, d.as_i64().unwrap_or(0));
                }
                e.reread(0..n, n);
            }
            2 if pk != newpk => {
                let old = old_values(conn, seq, t)?;
                let e = acc.entry(t, pk.as_ref(), true);
                if e.events == 1 {
                    e.original = old.clone();
                }
                e.alive = false;
                e.deleted_old = old;
                let e = acc.entry(t, newpk.as_ref(), false);
                e.alive = true;
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let new = pair.get(1).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    e.add(i, new);
                }
                e.reread(0..n, n);
                // The old key's counters go away with it.
                let e = acc.entry(t, pk.as_ref(), true);
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let old = pair.get(0).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    e.add(i, old.wrapping_neg());
                }
            }
            2 => {
                let names: Vec<Option<String>> = match &cols {
                    Some(c) => serde_json::from_str(c)?,
                    None => Vec::new(),
                };
                let idx: Vec<usize> = names
                    .iter()
                    .flatten()
                    .map(|c| t.col(c))
                    .collect::<Result<_>>()?;
                let old = old_values(conn, seq, t)?;
                let e = acc.entry(t, pk.as_ref(), true);
                if e.events == 1 {
                    e.original = old;
                }
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let old = pair.get(0).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    let new = pair.get(1).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    match new.checked_sub(old) {
                        Some(d) if d.unsigned_abs() <= MAX_COUNTER_DELTA => e.add(i, d),
                        _ => {
                            return Err(invalid_counter(
                                t,
                                i,
                                format!(
                                    "a change from {old} to {new} (more than ±{MAX_COUNTER_DELTA} at once)"
                                ),
                            ));
                        }
                    }
                }
                e.reread(
                    idx.into_iter().filter(|i| !t.cols[*i].policy.is_additive()),
                    n,
                );
            }
            3 => {
                let old = old_values(conn, seq, t)?;
                let e = acc.entry(t, pk.as_ref(), true);
                if e.events == 1 {
                    e.original = old.clone();
                }
                e.alive = false;
                e.deleted_old = old;
                for (name, d) in &counter_json {
                    let i = t.col(name)?;
                    e.add(i, d.as_i64().unwrap_or(0));
                }
            }
            _ => return Err(Error::Corrupt(format!("ferry_foreign has unknown op {op}"))),
        }
    }
    // Final values come from the table itself: it is the truth after the foreign commits.
    for e in acc.rows.iter_mut() {
        let Some(cols) = e.reread.take() else {
            continue;
        };
        let t = cat.by_id(e.table)?;
        match crate::rows::read_row(conn, t, &e.pk)? {
            Some(vals) => {
                e.alive = true;
                for (i, v) in vals.into_iter().enumerate() {
                    if cols[i] && i != t.pk && !t.cols[i].policy.is_additive() {
                        e.set(i, v);
                    }
                }
            }
            None => e.alive = false,
        }
    }
    conn.execute("DELETE FROM ferry_foreign", [])?;
    conn.execute("DELETE FROM ferry_oldvals", [])?;
    conn.execute("DELETE FROM ferry_stash", [])?;
    Ok(true)
}

fn old_values(conn: &Connection, seq: i64, t: &TableInfo) -> Result<Option<Vec<Value>>> {
    if !t.update_wins() {
        return Ok(None);
    }
    let mut vals = vec![Value::Null; t.cols.len()];
    let mut st = conn.prepare_cached("SELECT cid, val FROM ferry_oldvals WHERE seq = ?1")?;
    let mut rows = st.query([seq])?;
    while let Some(r) = rows.next()? {
        let cid: i64 = r.get(0)?;
        if let Some(slot) = vals.get_mut(cid as usize) {
            *slot = r.get(1)?;
        }
    }
    Ok(Some(vals))
}
