//! Snapshot rows: the current state of one row as the relay serves it to a device that
//! never saw the row's history (a new device, or one that gained the row's scope).
//!
//! A row's state is not shipped as merged values, because the merge metadata a device keeps
//! (`rowmeta`) is written in terms of the device's own interned origins and its own pending
//! writes. It is shipped as the row's **history, pruned**: the changes to that row, in log
//! order, less every change that can no longer make a difference to the row's state (a value
//! overwritten for certain by a later one in the same incarnation, the incarnations before a
//! newer one began, counter additions folded per origin). The relay keeps this pruned history
//! per row as the log is sequenced (see `ferry-relay`'s `history` module); a device replays
//! it through the same merge that applies the live log, so the state it ends with is the
//! state it would have reached by replaying the whole log, by construction.

use crate::changeset::{RowChange, RowOp, approx_op_bytes, approx_value_bytes};
use crate::hlc::Hlc;
use crate::ids::ReplicaId;
use crate::value::Value;
use serde::{Deserialize, Serialize};

/// One change to one row, with the identity of the change set that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistEntry {
    /// Relay position of the change set.
    pub server_seq: u64,
    /// The replica that made it.
    pub origin: ReplicaId,
    /// Its origin sequence number.
    pub origin_seq: u64,
    /// Its HLC.
    pub hlc: Hlc,
    /// The relay cursor its origin had applied.
    pub base: u64,
    /// Causal length of the row after the change.
    pub cl: u64,
    /// What it did to the row.
    pub op: RowOp,
}

impl HistEntry {
    /// The row change this entry replays, for row `table`/`pk`.
    pub fn row_change(&self, table: &str, pk: &Value) -> RowChange {
        RowChange {
            table: table.to_owned(),
            pk: pk.clone(),
            cl: self.cl,
            op: self.op.clone(),
        }
    }
}

/// One row of a snapshot: its table, key and pruned history, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRow {
    /// Table name.
    pub table: String,
    /// Primary key value.
    pub pk: Value,
    /// The changes that make the row's current state, in log order.
    pub history: Vec<HistEntry>,
}

impl SnapshotRow {
    /// The relay position of its newest change (0 for an empty history).
    pub fn seq(&self) -> u64 {
        self.history.last().map_or(0, |e| e.server_seq)
    }

    /// Approximate encoded size, for chunk budgets.
    pub fn approx_bytes(&self) -> usize {
        let entries: usize = self
            .history
            .iter()
            .map(|e| 64 + approx_op_bytes(&e.op))
            .sum();
        16 + self.table.len() + approx_value_bytes(&self.pk) + entries
    }
}
