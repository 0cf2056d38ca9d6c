//! Change sets: what one local transaction changed in synced tables, as it travels.
//!
//! A change set is the unit of atomicity everywhere: it is captured from one transaction,
//! pushed, sequenced by the relay, and applied all-or-nothing on every replica. Rows carry
//! their *causal length* (`cl`: odd = the row exists, even = it was deleted; every
//! delete/re-insert increments it), which lets delete-vs-update merge without a tombstone
//! per cell and in any order.

use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::ids::ReplicaId;
use crate::schema::{Policy, TableDecl};
use crate::value::Value;
use serde::{Deserialize, Serialize};

/// One cell operation inside a row upsert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cell {
    /// Set a column to a value (`lww` / `custom` columns).
    Set(String, Value),
    /// Add a delta to a counter column.
    Add(String, i64),
}

impl Cell {
    /// Whether this cell has the shape writes of `policy` take (see `policy`): an addition
    /// for an additive policy, a value otherwise.
    pub fn fits(&self, policy: Policy) -> bool {
        matches!(self, Cell::Add(..)) == policy.is_additive()
    }

    /// The cell that writes `value` to column `name` of `policy` on a row that had none (a
    /// whole row sent as it stands): an addition from zero for an additive policy.
    pub fn whole(policy: Policy, name: String, value: Value) -> Cell {
        if policy.is_additive() {
            Cell::Add(name, value.as_i64().unwrap_or(0))
        } else {
            Cell::Set(name, value)
        }
    }
}

impl Cell {
    /// The column this cell writes.
    pub fn column(&self) -> &str {
        match self {
            Cell::Set(c, _) | Cell::Add(c, _) => c,
        }
    }
}

/// What happened to one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RowOp {
    /// The row was deleted (its `cl` is even).
    Delete,
    /// Cells of the row were written (its `cl` is odd). When `cl` is greater than the
    /// receiver's, this creates a new incarnation of the row and carries every column.
    Upsert(Vec<Cell>),
}

/// One row's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowChange {
    /// Table name.
    pub table: String,
    /// Primary key value.
    pub pk: Value,
    /// Causal length of the row after this change.
    pub cl: u64,
    /// The operation.
    pub op: RowOp,
}

impl RowChange {
    /// Columns this change sets (counter additions and deletes set none).
    pub fn set_columns(&self) -> Vec<&str> {
        match &self.op {
            RowOp::Upsert(cells) => cells
                .iter()
                .filter_map(|c| match c {
                    Cell::Set(name, _) => Some(name.as_str()),
                    Cell::Add(..) => None,
                })
                .collect(),
            RowOp::Delete => Vec::new(),
        }
    }
}

/// Everything one local transaction changed, with its causal context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// Unique id (ULID bytes).
    pub id: [u8; 16],
    /// The replica that made it.
    pub origin: ReplicaId,
    /// 1, 2, 3, … per origin, no gaps.
    pub origin_seq: u64,
    /// When it was made.
    pub hlc: Hlc,
    /// The relay cursor the origin had applied when it committed.
    pub base: u64,
    /// The app schema version the origin ran.
    pub schema_version: u32,
    /// Row changes, in the order they must be applied.
    pub rows: Vec<RowChange>,
    /// The lease this change set was written under, if the app guarded it with one: the
    /// relay refuses it unless the token is the lease's current, unexpired grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    /// Made while a change set the relay may refuse was pending on its origin: the relay
    /// checks it as a whole too (see `cas`), because a refusal withdraws it with that one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guarded: bool,
}

/// A lease grant a change set was written under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// Lease name.
    pub lease: String,
    /// Fencing token of the grant.
    pub token: u64,
}

impl ChangeSet {
    /// Number of cell-level operations (for batching and progress).
    pub fn op_count(&self) -> usize {
        self.rows
            .iter()
            .map(|r| match &r.op {
                RowOp::Delete => 1,
                RowOp::Upsert(c) => c.len().max(1),
            })
            .sum()
    }

    /// Its approximate size in a frame (MessagePack, before compression): the names and values
    /// it carries plus a fixed overhead per row and cell. Flow control counts unacknowledged
    /// pushes in these bytes.
    pub fn approx_bytes(&self) -> usize {
        let rows: usize = self
            .rows
            .iter()
            .map(|r| 24 + r.table.len() + approx_value_bytes(&r.pk) + approx_op_bytes(&r.op))
            .sum();
        96 + rows
    }

    /// Tables this change set touches (sorted, unique).
    pub fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self.rows.iter().map(|r| r.table.clone()).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// Approximate MessagePack size of a value.
pub fn approx_value_bytes(v: &Value) -> usize {
    match v {
        Value::Null => 1,
        Value::Integer(_) | Value::Real(_) => 9,
        Value::Text(s) => s.len() + 5,
        Value::Blob(b) => b.len() + 5,
    }
}

/// Approximate MessagePack size of a row operation's cells.
pub fn approx_op_bytes(op: &RowOp) -> usize {
    match op {
        RowOp::Delete => 1,
        RowOp::Upsert(cells) => cells
            .iter()
            .map(|c| match c {
                Cell::Set(n, v) => 4 + n.len() + approx_value_bytes(v),
                Cell::Add(n, _) => 13 + n.len(),
            })
            .sum(),
    }
}

/// A change set with the position the relay gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequenced {
    /// Gap-free, commit-ordered position at the relay.
    pub server_seq: u64,
    /// The change set (possibly filtered to the receiver's read scopes).
    pub change_set: ChangeSet,
}

/// Largest counter change one cell operation may carry (2^53, exact in every client
/// language). Bigger ones are refused, by the relay and by replicas, so that no single
/// change can push every replica's counter past what it can hold.
pub const MAX_COUNTER_DELTA: u64 = 1 << 53;

/// Checks one row change against its table's declaration: key type, causal-length parity,
/// known columns written at most once, set vs add matching the column's policy, no NULL in a
/// NOT NULL column. The relay runs it before sequencing and every replica before applying, so
/// a change set one side accepts is one the other can apply.
pub fn check_row_change(t: &TableDecl, rc: &RowChange) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidChangeSet(format!("table `{}`: {m}", t.name)));
    match &rc.pk {
        Value::Text(_) | Value::Blob(_) => {}
        other => {
            return bad(format!(
                "primary key must be text or blob, got {}",
                other.describe()
            ));
        }
    }
    match &rc.op {
        RowOp::Delete if rc.cl == 0 || !rc.cl.is_multiple_of(2) => {
            return bad(format!("delete with odd causal length {}", rc.cl));
        }
        RowOp::Upsert(_) if rc.cl.is_multiple_of(2) => {
            return bad(format!("upsert with even causal length {}", rc.cl));
        }
        _ => {}
    }
    if let RowOp::Upsert(cells) = &rc.op {
        let mut seen: Vec<&str> = Vec::with_capacity(cells.len());
        for c in cells {
            let name = c.column();
            let Some(col) = t.columns.iter().find(|d| d.name == name) else {
                return Err(Error::AppSchemaOutdated {
                    table: t.name.clone(),
                    column: name.to_owned(),
                });
            };
            if name == t.pk() {
                return bad(format!("cell writes the primary key `{name}`"));
            }
            if seen.contains(&name) {
                return bad(format!("column `{name}` written twice in one row change"));
            }
            seen.push(name);
            if !c.fits(col.policy) {
                return bad(match c {
                    Cell::Add(..) => format!("counter add on non-counter column `{name}`"),
                    Cell::Set(..) => format!("plain set on counter column `{name}`"),
                });
            }
            match c {
                Cell::Add(_, d) => {
                    if d.unsigned_abs() > MAX_COUNTER_DELTA {
                        return bad(format!(
                            "counter `{name}` changes by {d}, beyond ±{MAX_COUNTER_DELTA} in one operation"
                        ));
                    }
                }
                Cell::Set(_, v) => {
                    if col.not_null && *v == Value::Null {
                        return bad(format!("NULL written to NOT NULL column `{name}`"));
                    }
                }
            }
        }
    }
    Ok(())
}
