//! The sync port: what the sans-I/O sync client needs from a replica, and nothing else.
//!
//! The protocol plumbing — handing out change sets to push, recording acknowledgements,
//! applying the relay's stream, reacting to refusals — changes what the device holds and
//! in which order it pushes. An app calling it by hand (re-stamping a change set, say) would
//! break the device's ordering, so it is not part of [`Replica`](crate::Replica)'s inherent
//! API: [`crate::sync::SyncClient`] is generic over this trait (as automerge's sync state
//! machine is over its document), the replica implements it, and test code that plays the
//! relay itself imports the trait on purpose. Unit tests of the client implement it with an
//! in-memory fake.

use crate::apply::ApplyReport;
use crate::changeset::{ChangeSet, Sequenced};
use crate::error::Result;
use crate::ids::ReplicaId;
use crate::protocol::{ErrorCode, Move};
use crate::quarantine::SetAside;
use crate::refusal::RefusalAction;
use crate::scope::{HeldScopes, ScopeSet};
use crate::snapshot::SnapshotRow;

/// How a snapshot ends (its last page).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotEnd {
    /// The position the log continues from (the oldest of the pages').
    pub position: u64,
    /// A back-fill of gained scopes: the cursor stays (the log continues from it). Otherwise
    /// a first snapshot: the cursor moves up to `position`.
    pub backfill: bool,
    /// The scopes the replica holds once it is applied (`Welcome.scopes`).
    pub scopes: Option<ScopeSet>,
    /// The relay's head as the client last heard it: the snapshot was read at `position`,
    /// which may lie below it (the relay's fold lags its log), and rows written between the
    /// two arrive through the log. The scopes count as synced once the cursor reaches it.
    pub complete_at: u64,
}

/// What the sync client calls on a replica (see the module docs).
pub trait SyncPort {
    /// The replica's current id.
    fn replica_id(&self) -> Result<ReplicaId>;
    /// The highest relay position applied with everything before it.
    fn cursor(&self) -> Result<u64>;
    /// The app schema version the replica runs.
    fn schema_version(&self) -> Result<u32>;
    /// Highest `origin_seq` issued under the current id.
    fn last_origin_seq(&self) -> Result<u64>;
    /// Number of change sets the relay has not acknowledged.
    fn pending_count(&self) -> Result<u64>;
    /// Prepares the oldest unacknowledged change sets for a push — folding other
    /// connections' writes and materializing recorded changes first, which writes — and
    /// returns at most `max_sets` of them and about `max_bytes` (always one if any).
    fn prepare_push(&self, max_sets: usize, max_bytes: usize) -> Result<Vec<ChangeSet>> {
        self.prepare_push_after(0, max_sets, max_bytes)
    }
    /// [`SyncPort::prepare_push`] for the unacknowledged change sets after `origin_seq` (the
    /// ones before it are already on their way): what a push costs does not grow with what
    /// is in flight.
    fn prepare_push_after(
        &self,
        origin_seq: u64,
        max_sets: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChangeSet>>;
    /// Records the relay's acknowledgements `(origin_seq, server_seq)`.
    fn acknowledge(&self, acks: &[(u64, u64)]) -> Result<()>;
    /// Applies the relay's change sets covering positions `(after, up_to]`, in order, with
    /// the rows entering or leaving the replica's read scopes (`moves`).
    fn apply_changes(
        &self,
        after: u64,
        up_to: u64,
        sets: &[Sequenced],
        moves: &[Move],
    ) -> Result<ApplyReport>;
    /// [`SyncPort::apply_changes`] without scope moves.
    fn apply_remote(&self, after: u64, up_to: u64, sets: &[Sequenced]) -> Result<ApplyReport> {
        self.apply_changes(after, up_to, sets, &[])
    }
    /// Applies one page of a snapshot (see [`crate::snapshot`]) in one transaction, with its
    /// resume token; on the last page (`end`), the token is dropped, the held scopes become
    /// the announced ones, and after a first snapshot the cursor moves up to its position.
    /// With `replace` (a back-fill, or a walk that may have started over), rows the replica
    /// holds already are replaced by their history, not merged with it.
    fn apply_snapshot(
        &self,
        rows: Vec<SnapshotRow>,
        resume: &[u8],
        replace: bool,
        end: Option<SnapshotEnd>,
    ) -> Result<ApplyReport>;
    /// The app's subscriptions (`None`: every scope the token may read).
    fn subscriptions(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
    /// The scopes this replica holds, for the hello ([`crate::scope::HeldScopes`]).
    fn held_scopes(&self) -> Result<Option<HeldScopes>> {
        Ok(None)
    }
    /// The relay announced the scopes this connection delivers; `snapshot` when a snapshot
    /// follows (a first one, or a back-fill of gained scopes).
    fn scopes_announced(&self, _scopes: &ScopeSet, _snapshot: bool) -> Result<()> {
        Ok(())
    }
    /// Evicts the rows of scopes no longer held, once no local write waits to be pushed
    /// (or at once when uploads stopped at a `refused` push); returns the rows evicted.
    fn settle_scopes(&self, _refused: bool) -> Result<u64> {
        Ok(0)
    }
    /// The resume token of the snapshot page last applied, while a snapshot is unfinished.
    fn snapshot_resume(&self) -> Result<Option<Vec<u8>>>;
    /// Handles the relay's compare-and-set or fence refusal of own change set `origin_seq`.
    fn handle_refusal(
        &self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<RefusalAction>;
    /// Sets own change set `origin_seq` aside after a permanent refusal (see
    /// `quarantine`), keeping its place in the sequence with an empty placeholder.
    fn quarantine(&self, origin_seq: u64, code: ErrorCode, message: &str) -> Result<SetAside>;
    /// Number of change sets in quarantine.
    fn quarantined_count(&self) -> Result<u64> {
        Ok(0)
    }
    /// The relay announced its limits: transactions that would exceed them are refused at
    /// commit from now on.
    fn learn_limits(&self, _limits: &crate::protocol::Limits) -> Result<()> {
        Ok(())
    }
    /// Re-issues a change set refused for its `custom` columns on top of what the replica
    /// now holds. False if it is no longer pending.
    fn rebase(&self, origin_seq: u64) -> Result<bool>;
    /// Re-stamps the pending change sets from `origin_seq` on after a clock-skew refusal.
    fn restamp(&self, origin_seq: u64) -> Result<usize>;
    /// Takes a new replica id and re-issues every unacknowledged change set under it.
    fn rotate_identity(&self) -> Result<ReplicaId>;
    /// Learns the relay's wall clock; returns how far ahead of it the device clock runs.
    fn learn_relay_clock(&self, relay_ms: u64) -> Result<u64>;
}
