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
pub mod pg_rows;
pub mod postgres;
pub mod rule;
pub mod scoped;
pub mod snapshot;
pub mod sqlite;

use crate::auth::Grants;
use crate::error::{RelayError, Result};
use crate::feed::Feed;
use async_trait::async_trait;
use ferry_core::admission::Bounds;
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{ChangeSet, ReplicaId, Value};
use std::sync::Arc;

pub use crate::compact::CompactReport;
pub use crate::stored::{StoredSet, approx_row_bytes};
pub(crate) use crate::stored::{decode_set, encode_set};
pub use scoped::{ReadFilter, ScopedRead};
pub use snapshot::{SnapshotKey, SnapshotPage, SnapshotSize};

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
    /// Change sets after `after` that touch a scope `filter` may read, at most `max_sets`
    /// and about `max_bytes`, found through the per-scope index (see [`scoped`]): the cost
    /// depends on the reader's scopes, not on other tenants' writes.
    async fn read_scoped(
        &self,
        after: u64,
        filter: &ReadFilter,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<ScopedRead>;
    /// Change sets before `before` that touched a row (for backfill).
    async fn row_history(
        &self,
        table: &str,
        pk: &Value,
        before: u64,
    ) -> Result<Vec<Arc<StoredSet>>>;
    /// Folds the log after the row histories' watermark into them (see
    /// [`crate::history`]), about `max_rows` row changes at most; returns the new
    /// watermark. Over PostgreSQL one node folds at a time; the others return the watermark.
    async fn fold_rows(&self, max_rows: usize) -> Result<u64>;
    /// The key snapshot resume tokens are sealed with, the same on every node of the store
    /// (see [`crate::resume`]).
    fn secret(&self) -> [u8; 32];
    /// The next page of the current rows of the scopes `filter` may read, after `after`
    /// (see [`snapshot`]): at most `max_rows` rows and about `max_bytes`.
    async fn snapshot_page(
        &self,
        filter: &ReadFilter,
        after: Option<SnapshotKey>,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<SnapshotPage>;
    /// Rows the walk of `filter`'s scopes holds after `after` (the whole walk for `None`),
    /// as of the current watermark, counted from the scope index only.
    async fn snapshot_size(
        &self,
        filter: &ReadFilter,
        after: Option<SnapshotKey>,
    ) -> Result<SnapshotSize>;
    /// Decides a (validated) lease request by `holder` on the relay's clock, durably and in
    /// order with pushes (a grant and a fence check never race).
    async fn lease(&self, holder: ReplicaId, request: LeaseRequest) -> Result<LeaseOutcome>;
    /// Binds `replica` to the subject `sub` at its first accepted hello and returns true, or
    /// returns whether it is already bound to `sub` (a hello under another subject is then
    /// refused). Durable, and atomic across connections and relay nodes: of two first
    /// hellos with different subjects, exactly one owns the id.
    async fn claim(&self, replica: ReplicaId, sub: &str) -> Result<bool>;
    /// Position of the first change set stored from `origin`, if any.
    async fn first_position(&self, origin: ReplicaId) -> Result<Option<u64>>;
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
