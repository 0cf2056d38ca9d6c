//! The relay's storage: a [`Store`] sequences change sets durably and serves them back.
//!
//! What every store guarantees (and the shared test suite checks):
//! * `server_seq` is gap-free and in commit order: a reader never sees N+1 before N;
//! * a push is acknowledged only after it is durable;
//! * a push is idempotent on `(origin, origin_seq)`: a retry returns the first position, a
//!   different change set under a used pair is refused as origin reuse;
//! * per origin, `origin_seq` has no gaps;
//! * a refused change set (authorization, validation, compare-and-set, stale fence) stores
//!   nothing;
//! * compare-and-set ([`ferry_core::cas`]) and fence checks ([`ferry_core::lease`]) run in
//!   the sequencing transaction, against stamps and leases written by that same transaction
//!   order, so they are linearizable.
//!
//! The SQLite store ([`sqlite::SqliteStore`]) is the default: one file, one writer thread with
//! group commit, a pool of readers.

pub mod job;
pub mod pg_batch;
pub mod postgres;
pub mod rule;
pub mod sqlite;

use crate::auth::Grants;
use crate::error::{RelayError, Result};
use crate::feed::Feed;
use crate::scoping::RowTag;
use async_trait::async_trait;
use ferry_core::admission::Bounds;
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{ChangeSet, ReplicaId, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A change set as stored: its position, the change set, and the scope of each row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSet {
    /// Position.
    pub server_seq: u64,
    /// The change set (rows may have been pruned by compaction).
    pub change_set: ChangeSet,
    /// One tag per row of `change_set`.
    pub tags: Vec<RowTag>,
}

impl StoredSet {
    /// Rough encoded size, for frame budgets and memory bounds.
    pub fn approx_bytes(&self) -> usize {
        self.change_set
            .rows
            .iter()
            .map(approx_row_bytes)
            .sum::<usize>()
            + 96
    }
}

/// Rough encoded size of a row change.
pub fn approx_row_bytes(rc: &ferry_core::RowChange) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::Text(s) => s.len() + 5,
            Value::Blob(b) => b.len() + 5,
            _ => 9,
        }
    }
    let cells = match &rc.op {
        ferry_core::RowOp::Upsert(cells) => cells
            .iter()
            .map(|c| match c {
                ferry_core::Cell::Set(n, v) => n.len() + value(v) + 4,
                ferry_core::Cell::Add(n, _) => n.len() + 13,
            })
            .sum(),
        ferry_core::RowOp::Delete => 8,
    };
    rc.table.len() + value(&rc.pk) + cells + 24
}

/// A stored body back into a [`StoredSet`] at `seq`.
pub(crate) fn decode_set(seq: i64, body: &[u8]) -> Result<StoredSet> {
    let (change_set, tags): (ChangeSet, Vec<RowTag>) = ferry_core::envelope::open(body)?;
    Ok(StoredSet {
        server_seq: seq as u64,
        change_set,
        tags,
    })
}

/// The stored body of a change set (the same bytes in every store), sealed with its stored
/// format's version (see `ferry_core::envelope`).
pub(crate) fn encode_set(s: &StoredSet) -> Result<Vec<u8>> {
    Ok(ferry_core::envelope::seal(&(&s.change_set, &s.tags))?)
}

/// What happened to one pushed change set.
#[derive(Debug)]
pub enum PushOutcome {
    /// Sequenced (now or by an earlier push) at this position.
    Acked(u64),
    /// Refused; nothing was stored. Later change sets of the same push were not looked at.
    Refused(RelayError),
}

/// Counts for `/metrics` and operators.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    /// Highest position.
    pub head: u64,
    /// Compacted up to.
    pub horizon: u64,
    /// Bytes of stored change sets.
    pub bytes: u64,
}

/// What compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// New horizon.
    pub horizon: u64,
    /// Change sets rewritten.
    pub rewritten: u64,
    /// Cell writes dropped.
    pub cells_dropped: u64,
    /// Bytes before and after.
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
}

/// Durable, ordered storage of change sets.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Sequences `sets` (oldest first) for a connection with `grants`; stops at the first
    /// refusal. Returns after the accepted ones are durable.
    /// Each is decided by the admission rule within `bounds` (see [`rule`]).
    async fn push(
        &self,
        grants: Arc<Grants>,
        bounds: Bounds,
        sets: Vec<ChangeSet>,
    ) -> Result<Vec<PushOutcome>>;
    /// Stored change sets after `after`, at most `max_sets` and about `max_bytes`.
    async fn read(
        &self,
        after: u64,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<Vec<Arc<StoredSet>>>;
    /// Change sets before `before` that touched a row (for backfill).
    async fn row_history(
        &self,
        table: &str,
        pk: &Value,
        before: u64,
    ) -> Result<Vec<Arc<StoredSet>>>;
    /// Decides a (validated) lease request by `holder` on the relay's clock, durably and in
    /// order with pushes (a grant and a fence check never race).
    async fn lease(&self, holder: ReplicaId, request: LeaseRequest) -> Result<LeaseOutcome>;
    /// Highest origin_seq stored for `origin`.
    async fn max_origin_seq(&self, origin: ReplicaId) -> Result<u64>;
    /// Compacts history at or below `horizon` (see `compact`).
    async fn compact(&self, horizon: u64) -> Result<CompactReport>;
    /// Counts.
    async fn stats(&self) -> Result<StoreStats>;
    /// The highest durable position of the whole log, as of now. This node's feed may
    /// still be catching up to it (on the PostgreSQL store another node may have just
    /// committed); a connection that is promised "everything up to here" gets this.
    async fn head(&self) -> Result<u64>;
    /// Head and recent change sets.
    fn feed(&self) -> &Arc<Feed>;
    /// Stops accepting pushes and waits for those in flight.
    async fn shutdown(&self);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferry_core::changeset::{Cell, RowChange, RowOp};
    use ferry_core::{Hlc, ReplicaId};

    /// The stored body of a sequenced change set, frozen in `server/tests/golden/stored_set.hex`
    /// (both stores write these bytes). `FERRY_BLESS=1` rewrites it after a deliberate change;
    /// a change to the wire form must not change it silently (see `ferry_core::envelope`).
    #[test]
    fn golden_stored_set() {
        let s = StoredSet {
            server_seq: 9,
            change_set: ChangeSet {
                id: [2; 16],
                origin: ReplicaId([1; 16]),
                origin_seq: 3,
                hlc: Hlc::new(1_700_000_000_000, 5),
                base: 41,
                schema_version: 1,
                fence: None,
                guarded: false,
                rows: vec![RowChange {
                    table: "todo".into(),
                    pk: Value::Text("k1".into()),
                    cl: 1,
                    op: RowOp::Upsert(vec![Cell::Set("list".into(), Value::Text("home".into()))]),
                }],
            },
            tags: vec![RowTag {
                scope: "home".into(),
                moved_from: Some("work".into()),
            }],
        };
        let body = encode_set(&s).unwrap();
        let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/stored_set.hex");
        if std::env::var("FERRY_BLESS").is_ok() {
            std::fs::write(&path, format!("{hex}\n")).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(hex, want.trim(), "the stored form of a change set changed");
        let back = decode_set(9, &body).unwrap();
        assert_eq!(back.change_set, s.change_set);
        assert_eq!(back.tags, s.tags);
        // Bodies stored before envelopes still open.
        let unsealed = rmp_serde::to_vec_named(&(&s.change_set, &s.tags)).unwrap();
        assert_eq!(decode_set(9, &unsealed).unwrap().tags, s.tags);
    }
}
