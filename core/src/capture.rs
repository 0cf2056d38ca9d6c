//! Capture: turning one transaction's writes to synced tables into one local change record.
//!
//! The SDK's own writes are seen by SQLite's pre-update hook and coalesced in memory per row
//! (net effect of the transaction: a row inserted then updated is one insert; a delete then
//! re-insert of the same key, as `INSERT OR REPLACE` does, is an update of the columns that
//! differ). Writes by other connections are logged by triggers (see `catalog`) and folded the
//! same way. Either path ends in a [`LocalChange`], stored as one record per transaction; the
//! causal metadata (causal length, cell versions) is added later by `materialize`, off the
//! app's write path.

use crate::catalog::{Catalog, TableInfo};
use crate::changeset::Cell;
use crate::error::{Error, Result};
use crate::schema::{Policy, quote};
use crate::value::{Value, ref_eq};
use parking_lot::Mutex;
use rusqlite::hooks::{Action, PreUpdateCase};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Net effect of a transaction on one row, before causal metadata is attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocalKind {
    /// The row did not exist before and exists after; cells hold every column.
    Insert,
    /// The row existed before and after; cells hold what changed.
    Update,
    /// The row existed before and not after; for `update_wins` tables cells hold its last values.
    Delete,
}

/// One row of a local change record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRow {
    /// Table name.
    pub table: String,
    /// Primary key.
    pub pk: Value,
    /// What happened.
    pub kind: LocalKind,
    /// Cells (see [`LocalKind`]).
    pub cells: Vec<Cell>,
}

/// Everything one local transaction changed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LocalChange {
    /// Rows in first-touched order.
    pub rows: Vec<LocalRow>,
}

/// Accumulated net effect on one row.
#[derive(Debug)]
struct RowAcc {
    table: u32,
    pk: Value,
    existed_before: bool,
    alive: bool,
    /// Final values of touched non-counter columns (by column id).
    cells: Vec<Option<Value>>,
    /// Summed counter deltas (by column id).
    deltas: Vec<i64>,
    /// Values the row had when it was last deleted in this transaction.
    deleted_old: Option<Vec<Value>>,
    /// Values the row had before the transaction (kept for `update_wins` tables only: a
    /// delete's tomb must hold what other replicas know, not in-transaction edits the net
    /// effect never ships).
    original: Option<Vec<Value>>,
    /// Events seen for this row so far.
    events: u32,
}

impl RowAcc {
    fn new(t: &TableInfo, pk: Value, existed_before: bool) -> Self {
        RowAcc {
            table: t.id,
            pk,
            existed_before,
            alive: existed_before,
            cells: vec![None; t.cols.len()],
            deltas: vec![0; t.cols.len()],
            deleted_old: None,
            original: None,
            events: 0,
        }
    }
}

/// Per-transaction accumulator shared with the pre-update hook.
#[derive(Debug, Default)]
pub struct Accumulator {
    rows: Vec<RowAcc>,
    index: HashMap<(u32, PkKey), usize>,
    error: Option<Error>,
}

/// A hashable primary key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PkKey {
    Text(String),
    Blob(Vec<u8>),
    Int(i64),
    Other(Vec<u8>),
}

fn pk_key(v: &Value) -> PkKey {
    match v {
        Value::Text(s) => PkKey::Text(s.clone()),
        Value::Blob(b) => PkKey::Blob(b.clone()),
        Value::Integer(i) => PkKey::Int(*i),
        Value::Real(f) => PkKey::Other(f.to_bits().to_le_bytes().to_vec()),
        Value::Null => PkKey::Other(Vec::new()),
    }
}

impl Accumulator {
    fn entry(&mut self, t: &TableInfo, pk: Value, existed_before: bool) -> &mut RowAcc {
        let key = (t.id, pk_key(&pk));
        let i = match self.index.get(&key) {
            Some(i) => *i,
            None => {
                self.rows.push(RowAcc::new(t, pk, existed_before));
                self.index.insert(key, self.rows.len() - 1);
                self.rows.len() - 1
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
        let acc = self.entry(t, pk, false);
        let reinsert_of = if acc.alive {
            None
        } else {
            acc.deleted_old.take()
        };
        acc.alive = true;
        let mut bad = None;
        for (i, v) in new.into_iter().enumerate() {
            if t.cols[i].policy == Policy::Counter {
                match counter_value(&v) {
                    Some(n) => acc.deltas[i] = acc.deltas[i].wrapping_add(n),
                    None => bad = Some((i, v.describe())),
                }
            } else {
                let changed = match &reinsert_of {
                    Some(old) => acc.cells[i].is_some() || old[i] != v,
                    None => true,
                };
                if changed && i != t.pk {
                    acc.cells[i] = Some(v);
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
        let acc = self.entry(t, pk, true);
        if t.update_wins() && acc.events == 1 {
            acc.original = Some(old.clone());
        }
        acc.alive = false;
        for (i, v) in old.iter().enumerate() {
            if t.cols[i].policy == Policy::Counter {
                acc.deltas[i] = acc.deltas[i].wrapping_sub(counter_value(v).unwrap_or(0));
            }
        }
        acc.deleted_old = Some(old);
    }

    /// Columns `changed` of a row went from `old` to `new` values (same key).
    pub(crate) fn update(
        &mut self,
        t: &TableInfo,
        pk: Value,
        changed: Vec<(usize, Value, Value)>,
        old_all: Option<Vec<Value>>,
    ) {
        let acc = self.entry(t, pk, true);
        if acc.events == 1 {
            acc.original = old_all;
        }
        let mut bad = None;
        for (i, old, new) in changed {
            if t.cols[i].policy == Policy::Counter {
                match (counter_value(&old), counter_value(&new)) {
                    (Some(a), Some(b)) => {
                        acc.deltas[i] = acc.deltas[i].wrapping_add(b.wrapping_sub(a))
                    }
                    _ => bad = Some((i, new.describe())),
                }
            } else {
                acc.cells[i] = Some(new);
            }
        }
        if let Some((i, got)) = bad {
            self.fail(invalid_counter(t, i, got));
        }
    }

    /// True when nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.error.is_none()
    }

    /// Drops everything (rollback).
    pub fn clear(&mut self) {
        *self = Accumulator::default();
    }

    /// Turns the accumulated rows into a local change record. `tomb` supplies the values of
    /// deleted rows for `update_wins` tables when the accumulator did not see them.
    pub fn finish(&mut self, cat: &Catalog) -> Result<LocalChange> {
        if let Some(e) = self.error.take() {
            self.clear();
            return Err(e);
        }
        let rows = std::mem::take(&mut self.rows);
        self.index.clear();
        let mut out = LocalChange::default();
        for acc in rows {
            let t = cat.by_id(acc.table)?;
            let kind = match (acc.existed_before, acc.alive) {
                (false, true) => LocalKind::Insert,
                (true, true) => LocalKind::Update,
                (true, false) => LocalKind::Delete,
                (false, false) => continue,
            };
            let mut cells = Vec::new();
            match kind {
                LocalKind::Insert | LocalKind::Update => {
                    for (i, c) in t.cols.iter().enumerate() {
                        if i == t.pk {
                            continue;
                        }
                        if c.policy == Policy::Counter {
                            if kind == LocalKind::Insert || acc.deltas[i] != 0 {
                                cells.push(Cell::Add(c.name.clone(), acc.deltas[i]));
                            }
                        } else if let Some(v) = &acc.cells[i] {
                            cells.push(Cell::Set(c.name.clone(), v.clone()));
                        }
                    }
                    if kind == LocalKind::Update && cells.is_empty() {
                        continue;
                    }
                }
                LocalKind::Delete => {
                    if t.update_wins()
                        && let Some(old) = acc.original.as_ref().or(acc.deleted_old.as_ref())
                    {
                        for (i, c) in t.cols.iter().enumerate() {
                            if i != t.pk {
                                cells.push(Cell::Set(c.name.clone(), old[i].clone()));
                            }
                        }
                    }
                }
            }
            out.rows.push(LocalRow {
                table: t.name().to_owned(),
                pk: acc.pk,
                kind,
                cells,
            });
        }
        Ok(out)
    }
}

fn counter_value(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::Null => Some(0),
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
    pub catalog: Arc<Catalog>,
    /// What the current transaction has changed.
    pub acc: Accumulator,
}

/// Installs the pre-update hook that feeds `state`.
pub fn install_hook(conn: &mut Connection, state: Arc<Mutex<HookState>>) -> Result<()> {
    conn.preupdate_hook(Some(
        move |_action: Action, db: &str, table: &str, case: &PreUpdateCase| {
            if db != "main" {
                return;
            }
            let mut st = state.lock();
            if !st.enabled {
                return;
            }
            let cat = Arc::clone(&st.catalog);
            let Some(t) = cat.get(table) else { return };
            let n = t.cols.len() as i32;
            match case {
                PreUpdateCase::Insert(new) => {
                    let vals = (0..n)
                        .map(|i| {
                            new.get_new_column_value(i)
                                .map(Value::from_ref)
                                .unwrap_or(Value::Null)
                        })
                        .collect();
                    st.acc.insert(t, vals);
                }
                PreUpdateCase::Delete(old) => {
                    let vals = (0..n)
                        .map(|i| {
                            old.get_old_column_value(i)
                                .map(Value::from_ref)
                                .unwrap_or(Value::Null)
                        })
                        .collect();
                    st.acc.delete(t, vals);
                }
                PreUpdateCase::Update {
                    old_value_accessor: old,
                    new_value_accessor: new,
                } => {
                    let pk = t.pk as i32;
                    let same_key =
                        match (old.get_old_column_value(pk), new.get_new_column_value(pk)) {
                            (Ok(a), Ok(b)) => ref_eq(a, b),
                            _ => false,
                        };
                    if same_key {
                        let pkv = old
                            .get_old_column_value(pk)
                            .map(Value::from_ref)
                            .unwrap_or(Value::Null);
                        let mut changed = Vec::new();
                        for i in 0..n {
                            let (Ok(a), Ok(b)) =
                                (old.get_old_column_value(i), new.get_new_column_value(i))
                            else {
                                continue;
                            };
                            if !ref_eq(a, b) {
                                changed.push((i as usize, Value::from_ref(a), Value::from_ref(b)));
                            }
                        }
                        if !changed.is_empty() {
                            let old_all = t.update_wins().then(|| {
                                (0..n)
                                    .map(|i| {
                                        old.get_old_column_value(i)
                                            .map(Value::from_ref)
                                            .unwrap_or(Value::Null)
                                    })
                                    .collect()
                            });
                            st.acc.update(t, pkv, changed, old_all);
                        }
                    } else {
                        // A key change is a delete of the old key and an insert of the new one.
                        let olds = (0..n)
                            .map(|i| {
                                old.get_old_column_value(i)
                                    .map(Value::from_ref)
                                    .unwrap_or(Value::Null)
                            })
                            .collect();
                        let news = (0..n)
                            .map(|i| {
                                new.get_new_column_value(i)
                                    .map(Value::from_ref)
                                    .unwrap_or(Value::Null)
                            })
                            .collect();
                        st.acc.delete(t, olds);
                        st.acc.insert(t, news);
                    }
                }
                PreUpdateCase::Unknown => {
                    st.acc.fail(Error::Corrupt(format!(
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
pub fn fold_foreign(conn: &Connection, cat: &Catalog, acc: &mut Accumulator) -> Result<bool> {
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
        conn.execute("DELETE FROM ferry_stash", [])?;
        return Ok(false);
    }
    // Per touched row: which columns changed (final values are read from the table).
    let mut touched: Vec<(u32, Value, Vec<bool>)> = Vec::new();
    let mut touch = |tid: u32, pk: &Value, cols: &[usize], ncols: usize| {
        let slot = match touched
            .iter_mut()
            .position(|(t, p, _)| *t == tid && p == pk)
        {
            Some(i) => i,
            None => {
                touched.push((tid, pk.clone(), vec![false; ncols]));
                touched.len() - 1
            }
        };
        for c in cols {
            touched[slot].2[*c] = true;
        }
    };
    for (seq, tbl, pk, op, newpk, cols, deltas, existed) in entries {
        let t = cat.by_id(tbl as u32)?;
        let n = t.cols.len();
        let counter_json: serde_json::Map<String, serde_json::Value> = match &deltas {
            Some(d) => serde_json::from_str(d)?,
            None => serde_json::Map::new(),
        };
        let all: Vec<usize> = (0..n).collect();
        match op {
            1 => {
                let e = acc.entry(t, pk.clone(), existed == Some(1));
                e.alive = true;
                for (name, d) in &counter_json {
                    let i = t.col(name)?;
                    e.deltas[i] = e.deltas[i].wrapping_add(d.as_i64().unwrap_or(0));
                }
                touch(t.id, &pk, &all, n);
            }
            2 if pk != newpk => {
                let old = old_values(conn, seq, t)?;
                let e = acc.entry(t, pk.clone(), true);
                if e.events == 1 {
                    e.original = old.clone();
                }
                e.alive = false;
                e.deleted_old = old;
                let e = acc.entry(t, newpk.clone(), false);
                e.alive = true;
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let new = pair.get(1).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    e.deltas[i] = e.deltas[i].wrapping_add(new);
                }
                // The old key's counters go away with it.
                let e = acc.entry(t, pk.clone(), true);
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let old = pair.get(0).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    e.deltas[i] = e.deltas[i].wrapping_sub(old);
                }
                touch(t.id, &newpk, &all, n);
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
                let e = acc.entry(t, pk.clone(), true);
                if e.events == 1 {
                    e.original = old;
                }
                for (name, pair) in &counter_json {
                    let i = t.col(name)?;
                    let old = pair.get(0).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    let new = pair.get(1).and_then(serde_json::Value::as_i64).unwrap_or(0);
                    e.deltas[i] = e.deltas[i].wrapping_add(new.wrapping_sub(old));
                }
                let non_counter: Vec<usize> = idx
                    .into_iter()
                    .filter(|i| t.cols[*i].policy != Policy::Counter)
                    .collect();
                touch(t.id, &pk, &non_counter, n);
            }
            3 => {
                let old = old_values(conn, seq, t)?;
                let e = acc.entry(t, pk.clone(), true);
                if e.events == 1 {
                    e.original = old.clone();
                }
                e.alive = false;
                e.deleted_old = old;
                for (name, d) in &counter_json {
                    let i = t.col(name)?;
                    e.deltas[i] = e.deltas[i].wrapping_add(d.as_i64().unwrap_or(0));
                }
            }
            _ => return Err(Error::Corrupt(format!("ferry_foreign has unknown op {op}"))),
        }
    }
    // Final values come from the table itself: it is the truth after the foreign commits.
    for (tid, pk, cols) in touched {
        let t = cat.by_id(tid)?;
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?1",
            t.select_list(),
            quote(t.name()),
            quote(&t.cols[t.pk].name)
        );
        let current: Option<Vec<Value>> = conn
            .prepare_cached(&sql)?
            .query_row([&pk], |r| {
                (0..t.cols.len()).map(|i| r.get::<_, Value>(i)).collect()
            })
            .optional()?;
        let e = acc.entry(t, pk.clone(), false);
        match current {
            Some(vals) => {
                e.alive = true;
                for (i, v) in vals.into_iter().enumerate() {
                    if cols[i] && i != t.pk && t.cols[i].policy != Policy::Counter {
                        e.cells[i] = Some(v);
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

/// Reads the current values of a row (for materializing rows Ferry has no metadata for).
pub fn read_row(conn: &Connection, t: &TableInfo, pk: &Value) -> Result<Option<Vec<Value>>> {
    let sql = format!(
        "SELECT {} FROM {} WHERE {} = ?1",
        t.select_list(),
        quote(t.name()),
        quote(&t.cols[t.pk].name)
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([pk], |r| {
            (0..t.cols.len()).map(|i| r.get::<_, Value>(i)).collect()
        })
        .optional()?)
}

/// Borrowed-value equality, re-exported for the hook.
pub fn same(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    ref_eq(a, b)
}
