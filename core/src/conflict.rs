//! The conflict log: every detected conflict, with both versions, the winner and the policy.
//!
//! Conflicts are resolved deterministically by policy on every replica; the log exists so the
//! app can show the user what was overwritten (or dropped by a delete) and so tests can see
//! that a conflict was detected rather than silently lost. Entries stay until the app clears
//! them.

use crate::error::Result;
use crate::hlc::Hlc;
use crate::ids::ReplicaId;
use crate::value::Value;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

/// What kind of conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictKind {
    /// Two concurrent writes to one cell.
    Cell,
    /// A delete concurrent with an update of the same row.
    DeleteUpdate,
    /// This replica's change was refused by the relay (compare-and-set conflict, stale lease)
    /// and rolled back: `local` is what was written, `remote` what the row holds after the
    /// rollback, `resolution` the relay's reason.
    Rejected,
}

/// Which side won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    /// The value this replica had.
    Local,
    /// The incoming value.
    Remote,
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// The value (NULL for a delete).
    pub value: Value,
    /// Its HLC.
    pub hlc: Hlc,
    /// The replica that wrote it.
    pub origin: ReplicaId,
}

/// One logged conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Log id (for clearing individual entries).
    pub id: i64,
    /// Table.
    pub table: String,
    /// Row key.
    pub pk: Value,
    /// Column (None for a row-level conflict).
    pub column: Option<String>,
    /// Kind.
    pub kind: ConflictKind,
    /// Policy that decided (`lww`, `custom`, `delete_wins`, `update_wins`).
    pub policy: String,
    /// What this replica had.
    pub local: Side,
    /// What arrived.
    pub remote: Side,
    /// Who won.
    pub winner: Winner,
    /// What the custom resolver answered, if it ran.
    pub resolution: Option<String>,
}

/// Appends a conflict; returns it with its id.
pub fn record(conn: &Connection, mut c: Conflict) -> Result<Conflict> {
    conn.prepare_cached(
        "INSERT INTO ferry_conflicts(tbl, pk, col, kind, policy, local_value, local_hlc, local_origin,
         remote_value, remote_hlc, remote_origin, winner, resolution)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        c.table,
        c.pk,
        c.column,
        kind_str(c.kind),
        c.policy,
        c.local.value,
        c.local.hlc.0 as i64,
        c.local.origin.0.to_vec(),
        c.remote.value,
        c.remote.hlc.0 as i64,
        c.remote.origin.0.to_vec(),
        match c.winner {
            Winner::Local => "local",
            Winner::Remote => "remote",
        },
        c.resolution,
    ])?;
    c.id = conn.last_insert_rowid();
    Ok(c)
}

fn kind_str(k: ConflictKind) -> &'static str {
    match k {
        ConflictKind::Cell => "cell",
        ConflictKind::DeleteUpdate => "delete_update",
        ConflictKind::Rejected => "rejected",
    }
}

/// Reads the whole log, oldest first.
pub fn list(conn: &Connection) -> Result<Vec<Conflict>> {
    let mut st = conn.prepare_cached(
        "SELECT id, tbl, pk, col, kind, policy, local_value, local_hlc, local_origin,
                remote_value, remote_hlc, remote_origin, winner, resolution
         FROM ferry_conflicts ORDER BY id",
    )?;
    let rows = st.query_map([], |r| {
        let origin = |b: Vec<u8>| ReplicaId::from_slice(&b).unwrap_or(ReplicaId([0; 16]));
        Ok(Conflict {
            id: r.get(0)?,
            table: r.get(1)?,
            pk: r.get(2)?,
            column: r.get(3)?,
            kind: match r.get::<_, String>(4)?.as_str() {
                "cell" => ConflictKind::Cell,
                "rejected" => ConflictKind::Rejected,
                _ => ConflictKind::DeleteUpdate,
            },
            policy: r.get(5)?,
            local: Side {
                value: r.get(6)?,
                hlc: Hlc(r.get::<_, i64>(7)? as u64),
                origin: origin(r.get(8)?),
            },
            remote: Side {
                value: r.get(9)?,
                hlc: Hlc(r.get::<_, i64>(10)? as u64),
                origin: origin(r.get(11)?),
            },
            winner: if r.get::<_, String>(12)? == "local" {
                Winner::Local
            } else {
                Winner::Remote
            },
            resolution: r.get(13)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Clears entries up to and including `up_to_id` (all when None).
pub fn clear(conn: &Connection, up_to_id: Option<i64>) -> Result<usize> {
    Ok(conn.execute(
        "DELETE FROM ferry_conflicts WHERE id <= ?1",
        [up_to_id.unwrap_or(i64::MAX)],
    )?)
}

/// Records how a logged conflict was resolved (by the app's resolver, or why not).
pub(crate) fn set_resolution(conn: &Connection, id: i64, text: &str) -> Result<()> {
    conn.execute(
        "UPDATE ferry_conflicts SET resolution = ?1 WHERE id = ?2",
        rusqlite::params![text, id],
    )?;
    Ok(())
}
