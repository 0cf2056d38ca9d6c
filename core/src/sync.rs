//! The sans-I/O sync state machine: what to send and what to do with what arrives.
//!
//! It performs no I/O and owns no socket or timer, so the WebSocket transport, the tests'
//! in-memory relay and a simulator can all drive the same logic. One connection is:
//!
//! ```text
//!   client                         relay
//!   Hello{cursor} ───────────────▶
//!                 ◀─────────────── Welcome{head, max_origin_seq}
//!   Push{pending…} ──────────────▶           (while pulling)
//!                 ◀─────────────── Acks / Changes{after, up_to, sets} / live Changes
//! ```
//!
//! A compiling example of the whole loop against the in-memory sequencer:
//!
//! ```
//! use ferry_core::{Replica, Schema, TableDecl, sync::SyncClient, sequencer::Sequencer};
//! # fn main() -> ferry_core::Result<()> {
//! let dir = tempfile::tempdir().map_err(|e| ferry_core::Error::InvalidInput(e.to_string()))?;
//! let schema = Schema::new(1).table(TableDecl::new("todo").text_key("id").text("title"));
//! let a = Replica::open(dir.path().join("a.db"), &schema)?;
//! let b = Replica::open(dir.path().join("b.db"), &schema)?;
//! a.execute("INSERT INTO todo VALUES ('1', 'milk')", &[])?;
//! let mut relay = Sequencer::new();
//! for r in [&a, &b, &a, &b] {
//!     let mut client = SyncClient::new();
//!     let mut session = relay.session();
//!     let mut outbox = std::collections::VecDeque::from([client.start(r, "token")?]);
//!     while let Some(msg) = outbox.pop_front() {
//!         for reply in relay.handle(&mut session, msg) {
//!             outbox.extend(client.handle(r, reply)?.send);
//!         }
//!     }
//!     assert!(client.is_synced(r)?);
//! }
//! assert_eq!(a.dump()?, b.dump()?);
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::port::{SnapshotEnd, SyncPort};
use crate::protocol::{ClientMsg, ErrorCode, LeaseOutcome, Limits, PROTOCOL_VERSION, ServerMsg};
use crate::quarantine::SetAside;
use crate::refusal::RefusalAction;
use crate::scope::ScopeSet;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Connection phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not connected.
    Idle,
    /// Hello sent.
    Handshake,
    /// Welcome received: pushing and pulling.
    Streaming,
}

/// A push the relay refused (the connection stays open; pushing stops until the origin
/// withdraws the change set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPush {
    /// The refused change set.
    pub origin_seq: u64,
    /// Why.
    pub code: ErrorCode,
    /// The relay's explanation.
    pub message: String,
}

/// The relay sent a change this app's schema cannot hold (a column a newer app version
/// added): downloads pause there until the replica is opened with the newer schema; the
/// connection stays up and uploads go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaOutdated {
    /// The table written.
    pub table: String,
    /// The column this app schema does not declare.
    pub column: String,
}

/// The relay's checksum of what this replica should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteChecksum {
    /// The request's nonce.
    pub nonce: u64,
    /// Relay position of the state that was summed.
    pub position: u64,
    /// The digest.
    pub digest: [u8; 32],
    /// Rows covered.
    pub rows: u64,
}

/// What the driver should do after a message.
#[derive(Debug, Default)]
pub struct Reaction {
    /// Frames to send, in order.
    pub send: Vec<ClientMsg>,
    /// The replica id changed (restored backup): close and connect again.
    pub reconnect: bool,
    /// Remote change sets applied.
    pub applied: usize,
    /// A push was refused.
    pub refused: Option<RefusedPush>,
    /// A checksum answer arrived.
    pub checksum: Option<RemoteChecksum>,
    /// Change sets the relay refused that were rolled back (by `origin_seq`).
    pub withdrawn: Vec<u64>,
    /// A lease answer arrived: `(nonce, outcome)`.
    pub lease: Option<(u64, LeaseOutcome)>,
    /// Change sets set aside after a permanent refusal (by `origin_seq`; see
    /// `quarantine`): the uploads behind them go on.
    pub quarantined: Vec<u64>,
}

/// Client side of one sync connection.
#[derive(Debug)]
pub struct SyncClient {
    phase: Phase,
    in_flight: InFlight,
    head: u64,
    max_sets: usize,
    max_bytes: usize,
    /// Most change sets unacknowledged at once.
    window: usize,
    /// Most bytes of change sets unacknowledged at once ([`ChangeSet::approx_bytes`]): the
    /// smaller of the client's choice and the relay's announced `push_window_bytes`. What a
    /// push may leave in the socket buffers is bounded by it, whatever the sets' sizes.
    window_bytes: usize,
    refused: Option<RefusedPush>,
    /// A change set refused for its `custom` columns waits here until the cursor reaches the
    /// change it conflicted with: `(origin_seq, conflict_seq)`.
    rebase: Option<(u64, u64)>,
    /// Push frames in flight on this connection, oldest first: `(frame number, last
    /// origin_seq)`. The relay answers frames in order, each with acks, a refusal, or both.
    frames: VecDeque<(u64, u64)>,
    /// Number of the next push frame.
    next_frame: u64,
    /// Frames up to this number were sent before a refusal that this client recovers from
    /// (rolled back, rebased or re-stamped change set): the relay refuses what they carry
    /// behind it for the gap it left, which is expected.
    stale_through: Option<u64>,
    /// The relay is sending a snapshot: nothing is pushed until its last page.
    bootstrapping: bool,
    /// Downloads paused at a change this app's schema cannot hold (see [`SchemaOutdated`]):
    /// later `Changes` and snapshot pages are dropped unapplied, and sent again once the
    /// replica reconnects with the newer schema.
    outdated: Option<SchemaOutdated>,
    /// The relay's limits (announced in the welcome): a change set beyond them is
    /// quarantined here rather than sent to be refused, or to close the connection.
    limits: Limits,
    /// The snapshot being received back-fills scopes the replica gained (its cursor was
    /// above zero): the cursor stays where it is.
    backfill: bool,
    /// The hello carried a resume token: pages of an earlier walk may be applied already.
    resumed: bool,
    /// The scopes this connection delivers, as the relay announced them.
    scopes: Option<ScopeSet>,
    /// The snapshot received on this connection so far, against what the relay announced.
    snapshot: SnapshotProgress,
    /// Bytes of the change sets acknowledged on this connection.
    acked_bytes: u64,
    /// Change sets (by `origin_seq`) refused for good whose empty placeholder was pushed in
    /// their place: a refusal of one of them is final.
    placeholders: BTreeSet<u64>,
}

/// A snapshot's progress on one connection: rows and the relay's stored bytes received, of
/// the totals the relay announced with its first page (from where this connection resumed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotProgress {
    /// Rows applied.
    pub rows: u64,
    /// Rows announced.
    pub total_rows: u64,
    /// Bytes applied.
    pub bytes: u64,
    /// Bytes announced.
    pub total_bytes: u64,
}

impl Default for SyncClient {
    fn default() -> Self {
        Self::new()
    }
}

impl SyncClient {
    /// A client with default batch bounds (256 change sets / 1 MiB per push, 4 pushes in flight).
    pub fn new() -> Self {
        SyncClient {
            phase: Phase::Idle,
            snapshot: SnapshotProgress::default(),
            acked_bytes: 0,
            placeholders: BTreeSet::new(),
            in_flight: InFlight::default(),
            head: 0,
            max_sets: 256,
            max_bytes: 1 << 20,
            window: 4 * 256,
            window_bytes: DEFAULT_PUSH_WINDOW_BYTES,
            refused: None,
            rebase: None,
            frames: VecDeque::new(),
            next_frame: 0,
            stale_through: None,
            bootstrapping: false,
            limits: Limits::default(),
            outdated: None,
            backfill: false,
            resumed: false,
            scopes: None,
        }
    }

    /// Sets push batch bounds.
    pub fn with_batch(mut self, max_sets: usize, max_bytes: usize) -> Self {
        self.max_sets = max_sets.max(1);
        self.max_bytes = max_bytes.max(1);
        self.window = 4 * self.max_sets;
        self
    }

    /// Bounds what is pushed and not yet acknowledged: at most `max_sets` change sets and
    /// `max_bytes` bytes (at least one change set is always allowed). The relay's announced
    /// window can only lower the byte bound.
    pub fn with_window(mut self, max_sets: usize, max_bytes: usize) -> Self {
        self.window = max_sets.max(1);
        self.window_bytes = max_bytes.max(1);
        self
    }

    /// Bytes of change sets pushed and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight.bytes
    }

    /// Bytes of the change sets acknowledged on this connection
    /// ([`crate::ChangeSet::approx_bytes`]).
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    /// The snapshot received on this connection so far (all zero when none was sent).
    pub fn snapshot_progress(&self) -> SnapshotProgress {
        self.snapshot
    }

    /// Whether a snapshot is being received (pushes wait for its last page).
    pub fn bootstrapping(&self) -> bool {
        self.bootstrapping
    }

    /// The connection's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The relay position known to this client (from welcome, acks and changes).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The push refusal that stopped uploads on this connection, if any.
    pub fn refused(&self) -> Option<&RefusedPush> {
        self.refused.as_ref()
    }

    /// Starts a connection: the hello frame.
    pub fn start(&mut self, replica: &impl SyncPort, token: &str) -> Result<ClientMsg> {
        self.phase = Phase::Handshake;
        self.in_flight.clear();
        self.refused = None;
        self.outdated = None;
        self.frames.clear();
        self.stale_through = None;
        self.bootstrapping = false;
        self.backfill = false;
        self.scopes = None;
        let resume = replica.snapshot_resume()?;
        self.resumed = resume.is_some();
        Ok(ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            replica_id: replica.replica_id()?,
            token: token.to_owned(),
            cursor: replica.cursor()?,
            schema_version: replica.schema_version()?,
            snapshots: true,
            resume,
            subscriptions: replica.subscriptions()?,
            held: replica.held_scopes()?,
        })
    }

    /// The connection dropped: everything in flight will be pushed again next time (the
    /// relay deduplicates on `(origin, origin_seq)`).
    pub fn disconnected(&mut self) {
        self.phase = Phase::Idle;
        self.in_flight.clear();
        self.frames.clear();
    }

    /// The next push frame, if there is pending work and room in the window.
    pub fn poll_push(&mut self, replica: &impl SyncPort) -> Result<Option<ClientMsg>> {
        if self.phase != Phase::Streaming
            || self.bootstrapping
            || self.refused.is_some()
            || self.in_flight.len() >= self.window
            || self.in_flight.bytes >= self.window_bytes
        {
            return Ok(None);
        }
        if let Some((origin_seq, conflict_seq)) = self.rebase {
            if replica.cursor()? < conflict_seq {
                return Ok(None);
            }
            replica.rebase(origin_seq)?;
            self.rebase = None;
        }
        let after = self.in_flight.last().unwrap_or(0);
        // Bounded by what one frame may carry, so a poll decodes no more than it sends.
        let room = self.window_bytes.saturating_sub(self.in_flight.bytes);
        let pending = replica.prepare_push_after(after, self.max_sets, self.max_bytes.min(room))?;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for cs in pending {
            if self.in_flight.contains(&cs.origin_seq) {
                continue;
            }
            let size = cs.approx_bytes();
            if let Some(why) = self.beyond_limits(&cs, size) {
                if !batch.is_empty() {
                    break; // sent first; this one is set aside at the next poll
                }
                // The relay would refuse it (or close the connection on its frame): set it
                // aside, and go on with what is behind it.
                // (A placeholder is never beyond them: `Withdrawn` here would mean it is, and
                // stops like `Nothing` rather than going round.)
                match replica.quarantine(cs.origin_seq, ErrorCode::TooLarge, &why)? {
                    SetAside::Rows => {
                        tracing::warn!(origin_seq = cs.origin_seq, %why, "change set beyond the relay's limits quarantined");
                        return self.poll_push(replica);
                    }
                    SetAside::Guarded => {
                        replica.handle_refusal(cs.origin_seq, ErrorCode::TooLarge, &why)?;
                        tracing::warn!(origin_seq = cs.origin_seq, %why, "guarded change set beyond the relay's limits rolled back");
                        return self.poll_push(replica);
                    }
                    SetAside::Withdrawn | SetAside::Nothing => {}
                }
                break;
            }
            if !batch.is_empty()
                && (batch.len() >= self.max_sets
                    || bytes + size > self.max_bytes
                    || self.in_flight.len() + batch.len() >= self.window
                    || self.in_flight.bytes + bytes + size > self.window_bytes)
            {
                break;
            }
            bytes += size;
            batch.push((cs, size));
        }
        if batch.is_empty() {
            return Ok(None);
        }
        for (cs, size) in &batch {
            self.in_flight.insert(cs.origin_seq, *size);
        }
        if let Some((last, _)) = batch.last() {
            self.frames.push_back((self.next_frame, last.origin_seq));
            self.next_frame += 1;
        }
        Ok(Some(ClientMsg::Push {
            change_sets: batch.into_iter().map(|(cs, _)| cs).collect(),
        }))
    }

    /// Downloads pause at a change this app's schema cannot hold (a typed state, not a
    /// connection failure: reconnecting would only download the same frame again); any
    /// other error is returned.
    fn pause_if_outdated(&mut self, e: Error) -> Result<()> {
        match e {
            Error::AppSchemaOutdated { table, column } => {
                tracing::warn!(%table, %column, "a change needs a newer app schema: downloads paused, uploads go on");
                self.outdated = Some(SchemaOutdated { table, column });
                Ok(())
            }
            e => Err(e),
        }
    }

    /// Downloads paused at a change this app's schema cannot hold, if they did.
    pub fn schema_outdated(&self) -> Option<&SchemaOutdated> {
        self.outdated.as_ref()
    }

    /// Why change set `cs` (of about `size` bytes) can never pass the relay's announced
    /// limits, if it cannot.
    /// Sets refused change set `origin_seq` aside if the refusal is permanent and about its
    /// rows (not a stale frame, not the placeholder this client pushed in its place).
    fn set_aside(
        &self,
        replica: &impl SyncPort,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
        stale: bool,
    ) -> Result<Option<SetAside>> {
        if !crate::quarantine::is_permanent(code)
            || stale
            || self.placeholders.contains(&origin_seq)
        {
            return Ok(None);
        }
        Ok(match replica.quarantine(origin_seq, code, message)? {
            SetAside::Nothing => None,
            outcome => Some(outcome),
        })
    }

    fn beyond_limits(&self, cs: &crate::changeset::ChangeSet, size: usize) -> Option<String> {
        let ops = cs.op_count() as u64;
        let max_bytes = self.limits.max_frame_bytes / 8 * 7;
        if ops > self.limits.max_change_set_ops {
            Some(format!(
                "change set of {ops} cell operations; the relay accepts {}",
                self.limits.max_change_set_ops
            ))
        } else if size as u64 > max_bytes {
            Some(format!(
                "change set of about {size} bytes; the relay's frames carry {max_bytes}"
            ))
        } else {
            None
        }
    }

    /// Handles one frame from the relay.
    pub fn handle(&mut self, replica: &impl SyncPort, msg: ServerMsg) -> Result<Reaction> {
        let mut step = Reaction::default();
        match msg {
            ServerMsg::Welcome {
                protocol,
                head,
                server_time_ms,
                max_origin_seq,
                limits,
                horizon: _,
                snapshot,
                scopes,
            } => {
                if self.phase != Phase::Handshake {
                    return Err(Error::Protocol("welcome outside the handshake".into()));
                }
                if protocol != PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!("relay speaks protocol {protocol}")));
                }
                self.head = head;
                replica.learn_limits(&limits)?;
                self.limits = limits;
                self.max_sets = self.max_sets.min(limits.max_push_sets.max(1) as usize);
                self.max_bytes = self
                    .max_bytes
                    .min((limits.max_frame_bytes / 2).max(1024) as usize);
                if limits.push_window_bytes > 0 {
                    self.window_bytes = self
                        .window_bytes
                        .min(usize::try_from(limits.push_window_bytes).unwrap_or(usize::MAX));
                }
                replica.learn_relay_clock(server_time_ms)?;
                if max_origin_seq > replica.last_origin_seq()? {
                    // The relay holds changes from this id that this file does not: it was
                    // restored or copied. Continue under a new id so nothing is taken for a duplicate.
                    replica.rotate_identity()?;
                    self.phase = Phase::Idle;
                    step.reconnect = true;
                    return Ok(step);
                }
                self.phase = Phase::Streaming;
                self.bootstrapping = snapshot;
                // A snapshot for a replica that has applied some of the log back-fills the
                // scopes it gained; its cursor stays (see `holding`).
                self.backfill = snapshot && replica.cursor()? > 0;
                if let Some(s) = &scopes {
                    // With a snapshot to come, the replica holds the scopes once its last
                    // page is applied.
                    replica.scopes_announced(s, snapshot)?;
                    replica.settle_scopes(self.refused.is_some())?;
                }
                self.scopes = scopes;
            }
            ServerMsg::Acks { acks } => {
                self.expect_streaming()?;
                let pairs: Vec<(u64, u64)> =
                    acks.iter().map(|a| (a.origin_seq, a.server_seq)).collect();
                replica.acknowledge(&pairs)?;
                // Rows of scopes no longer held go once nothing waits to be pushed.
                replica.settle_scopes(self.refused.is_some())?;
                let top = acks.iter().map(|a| a.origin_seq).max().unwrap_or(0);
                while self.frames.front().is_some_and(|(_, last)| *last <= top) {
                    self.frames.pop_front();
                }
                for a in acks {
                    self.placeholders.remove(&a.origin_seq);
                    self.acked_bytes += self.in_flight.remove(&a.origin_seq) as u64;
                    self.head = self.head.max(a.server_seq);
                }
            }
            ServerMsg::Changes {
                after,
                up_to,
                change_sets,
                head,
                moves,
            } => {
                self.expect_streaming()?;
                // A frame covering positions beyond the head it names, or beyond what any
                // store can number, would move the cursor past everything the real relay
                // holds (a device then refused at every hello): refused, nothing applied.
                if up_to > head || up_to > MAX_POSITION {
                    return Err(Error::Protocol(format!(
                        "changes up to position {up_to} beyond the relay's head {head}: refused, nothing applied"
                    )));
                }
                self.head = self.head.max(head);
                // Paused at a change this app's schema cannot hold: nothing after it.
                if self.outdated.is_none() {
                    match replica.apply_changes(after, up_to, &change_sets, &moves) {
                        Ok(report) => {
                            step.applied = report.applied;
                            // Pending strict writes a remote change doomed: reported like a
                            // refusal heard from the relay (`rolled_back`).
                            step.withdrawn.extend(report.withdrawn);
                        }
                        Err(e) => self.pause_if_outdated(e)?,
                    }
                }
                for cs in &change_sets {
                    if cs.change_set.origin == replica.replica_id()? {
                        self.placeholders.remove(&cs.change_set.origin_seq);
                        self.acked_bytes += self.in_flight.remove(&cs.change_set.origin_seq) as u64;
                    }
                }
            }
            ServerMsg::Snapshot {
                position,
                rows,
                resume,
                done,
                total_rows,
                total_bytes,
                bytes,
            } => {
                self.expect_streaming()?;
                // A snapshot may be read at a position sequenced after the welcome (the
                // relay's fold moves on), so only the positions a store can number bound it.
                if position > MAX_POSITION {
                    return Err(Error::Protocol(format!(
                        "snapshot at position {position}, beyond any relay's: refused, nothing applied"
                    )));
                }
                self.head = self.head.max(position);
                let n = rows.len() as u64;
                let end = done.then(|| SnapshotEnd {
                    position,
                    backfill: self.backfill,
                    scopes: self.scopes.clone(),
                    complete_at: self.head,
                });
                // Rows the replica may hold already (a back-fill, or a walk the relay started
                // over because the scopes changed) are replaced rather than merged.
                let replace = self.backfill || self.resumed;
                if self.outdated.is_some() {
                    return Ok(step); // paused: the rest is sent again after the upgrade
                }
                let report = match replica.apply_snapshot(rows, &resume, replace, end) {
                    Ok(r) => r,
                    Err(e) => {
                        self.pause_if_outdated(e)?;
                        return Ok(step);
                    }
                };
                let p = &mut self.snapshot;
                p.rows += n;
                p.bytes += bytes;
                // Writers may add rows while the walk runs: the total never shows less.
                p.total_rows = total_rows.max(p.rows);
                p.total_bytes = total_bytes.max(p.bytes);
                if done {
                    // The byte total was an estimate; what arrived is the truth.
                    p.total_bytes = p.bytes;
                }
                step.applied = report.applied;
                if done {
                    // Pushing starts now, above the position the log continues from.
                    self.bootstrapping = false;
                }
            }
            ServerMsg::Pong { head, .. } => {
                self.head = self.head.max(head);
            }
            ServerMsg::Refused {
                origin_seq,
                code,
                message,
                conflict_seq,
            } => {
                self.expect_streaming()?;
                if code == ErrorCode::OriginReused {
                    self.disconnected();
                    replica.rotate_identity()?;
                    step.reconnect = true;
                    return Ok(step);
                }
                // Everything from the refused change set on was not sequenced.
                self.in_flight.retain_below(origin_seq);
                // The refusal answers the oldest frame in flight.
                let frame = self.frames.pop_front().map(|(n, _)| n);
                let recover = |this: &mut Self| {
                    // Frames sent so far carry change sets behind this one: the relay refuses
                    // them for the gap until it is filled again.
                    this.stale_through = this.next_frame.checked_sub(1);
                };
                let stale = frame.is_some_and(|f| self.stale_through.is_some_and(|s| f <= s));
                if code == ErrorCode::ClockSkew {
                    // Stamped before this replica learnt the relay's clock: nobody has seen
                    // it, so it is re-stamped (with everything pending after it) and pushed
                    // again; it is never dropped. A refusal of a frame sent before an earlier
                    // re-stamp is about stamps already replaced: re-stamping again could change
                    // change sets the relay has just sequenced.
                    if !stale {
                        replica.restamp(origin_seq)?;
                        recover(self);
                    }
                } else if matches!(code, ErrorCode::Conflict | ErrorCode::Fenced) {
                    // Rolled back (or left to rebase): the relay's verdict reached the app
                    // through the conflict log; pushing goes on.
                    match replica.handle_refusal(origin_seq, code, &message)? {
                        RefusalAction::Withdrawn(list) => step.withdrawn = list,
                        RefusalAction::Rebase => self.rebase = Some((origin_seq, conflict_seq)),
                    }
                    recover(self);
                } else if stale
                    && (code == ErrorCode::InvalidChangeSet
                        || crate::quarantine::is_permanent(code))
                {
                    // Sent before a refusal above reached us: refused for the gap it left, or
                    // for what it carried then — sent again since (or set aside), and the
                    // new push gets its own answer.
                } else if let Some(outcome) =
                    self.set_aside(replica, origin_seq, code, &message, stale)?
                {
                    // Pushing it again cannot help: set aside (the app decides), rolled back
                    // (a strict write), or withdrawn here already while it was in flight
                    // (rolled back by a change it lost to). Either way a placeholder keeps
                    // its place in the sequence and the uploads behind it go on; a refusal of that placeholder (this client
                    // remembers sending it) stops them below instead of going round again.
                    match outcome {
                        SetAside::Rows => step.quarantined.push(origin_seq),
                        SetAside::Guarded => {
                            // A strict write: rolled back with what was written on top.
                            if let RefusalAction::Withdrawn(list) =
                                replica.handle_refusal(origin_seq, code, &message)?
                            {
                                step.withdrawn = list;
                            }
                        }
                        SetAside::Withdrawn | SetAside::Nothing => {}
                    }
                    self.placeholders.insert(origin_seq);
                    recover(self);
                } else {
                    if self
                        .refused
                        .as_ref()
                        .is_some_and(|r| r.origin_seq <= origin_seq)
                    {
                        // A later push already in flight was refused because of the first
                        // refusal (a gap); the first one is the cause worth reporting.
                        return Ok(step);
                    }
                    let refusal = RefusedPush {
                        origin_seq,
                        code,
                        message,
                    };
                    tracing::warn!(origin_seq, code = code.as_str(), message = %refusal.message, "push refused by the relay");
                    self.refused = Some(refusal.clone());
                    step.refused = Some(refusal);
                    // Uploads stop here: an eviction waiting for them goes ahead (the
                    // refused change sets stay in the log, reported).
                    replica.settle_scopes(true)?;
                    return Ok(step);
                }
            }
            ServerMsg::Lease { nonce, outcome } => {
                self.expect_streaming()?;
                step.lease = Some((nonce, outcome));
            }
            ServerMsg::Checksum {
                nonce,
                position,
                digest,
                rows,
            } => {
                self.expect_streaming()?;
                step.checksum = Some(RemoteChecksum {
                    nonce,
                    position,
                    digest,
                    rows,
                });
            }
            ServerMsg::Error { code, message } => {
                self.disconnected();
                if code == ErrorCode::OriginReused || code == ErrorCode::IdentityMismatch {
                    if code == ErrorCode::IdentityMismatch {
                        tracing::warn!(%message, "the relay binds this replica id to another user: taking a new id");
                    }
                    replica.rotate_identity()?;
                    step.reconnect = true;
                    return Ok(step);
                }
                return Err(Error::Protocol(format!(
                    "relay refused ({code:?}): {message}"
                )));
            }
        }
        if let Some(push) = self.poll_push(replica)? {
            step.send.push(push);
        }
        Ok(step)
    }

    fn expect_streaming(&self) -> Result<()> {
        if self.phase == Phase::Streaming {
            Ok(())
        } else {
            Err(Error::Protocol("data frame before welcome".into()))
        }
    }

    /// True when nothing is pending and the cursor has reached the relay's head.
    pub fn is_synced(&self, replica: &impl SyncPort) -> Result<bool> {
        Ok(self.phase == Phase::Streaming
            && self.in_flight.is_empty()
            && replica.pending_count()? == 0
            && replica.cursor()? >= self.head)
    }
}

/// The client's default bound on unacknowledged push bytes (the relay may announce less).
pub const DEFAULT_PUSH_WINDOW_BYTES: usize = 4 << 20;

/// Highest relay position a frame may name: both stores number positions with signed
/// 64-bit integers.
pub const MAX_POSITION: u64 = i64::MAX as u64;

/// Change sets pushed on this connection and not yet acknowledged, with their sizes.
#[derive(Debug, Default)]
struct InFlight {
    sets: BTreeMap<u64, usize>,
    bytes: usize,
}

impl InFlight {
    fn insert(&mut self, origin_seq: u64, bytes: usize) {
        if let Some(old) = self.sets.insert(origin_seq, bytes) {
            self.bytes -= old;
        }
        self.bytes += bytes;
    }

    /// Forgets an acknowledged change set; returns its bytes (0 if it was not in flight).
    fn remove(&mut self, origin_seq: &u64) -> usize {
        let b = self.sets.remove(origin_seq).unwrap_or(0);
        self.bytes -= b;
        b
    }

    /// Keeps the sets before `origin_seq` (a refusal: the rest were not sequenced).
    fn retain_below(&mut self, origin_seq: u64) {
        for (_, b) in self.sets.split_off(&origin_seq) {
            self.bytes -= b;
        }
    }

    /// The newest change set in flight.
    fn last(&self) -> Option<u64> {
        self.sets.keys().next_back().copied()
    }

    fn contains(&self, origin_seq: &u64) -> bool {
        self.sets.contains_key(origin_seq)
    }

    fn clear(&mut self) {
        self.sets.clear();
        self.bytes = 0;
    }

    fn len(&self) -> usize {
        self.sets.len()
    }

    fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The client against a fake port: what it asks of the replica for each frame, and what
    //! it sends back, without a database or a relay.
    use super::*;
    use crate::apply::ApplyReport;
    use crate::changeset::{ChangeSet, Sequenced};
    use crate::hlc::Hlc;
    use crate::ids::ReplicaId;
    use crate::protocol::{Ack, Limits, Move};
    use std::cell::RefCell;

    /// An in-memory replica that records every call the client makes.
    #[derive(Default)]
    struct FakePort {
        id: RefCell<u8>,
        cursor: RefCell<u64>,
        /// Pending change sets (origin_seq), oldest first.
        pending: RefCell<Vec<u64>>,
        last_origin_seq: RefCell<u64>,
        calls: RefCell<Vec<String>>,
        refusal: RefCell<Option<RefusalAction>>,
        /// Whether a change set that is not a placeholder yet has rows to set aside (else it
        /// is empty: nothing to set aside).
        quarantines: RefCell<bool>,
        /// Change sets held as placeholders (set aside or withdrawn).
        placeholders: RefCell<BTreeSet<u64>>,
        /// Guarded change sets (rolled back rather than set aside).
        guarded: RefCell<BTreeSet<u64>>,
        /// The frame limit last announced.
        frame_limit: RefCell<u64>,
    }

    impl FakePort {
        fn with_pending(n: u64) -> FakePort {
            let p = FakePort::default();
            *p.pending.borrow_mut() = (1..=n).collect();
            *p.last_origin_seq.borrow_mut() = n;
            p
        }
        fn call(&self, c: String) {
            self.calls.borrow_mut().push(c);
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.borrow_mut())
        }
        fn set(&self, origin_seq: u64) -> ChangeSet {
            ChangeSet {
                id: [origin_seq as u8; 16],
                origin: ReplicaId([*self.id.borrow(); 16]),
                origin_seq,
                hlc: Hlc::new(1, 0),
                base: 0,
                schema_version: 1,
                rows: Vec::new(),
                fence: None,
                guarded: false,
            }
        }
    }

    impl SyncPort for FakePort {
        fn replica_id(&self) -> Result<ReplicaId> {
            Ok(ReplicaId([*self.id.borrow(); 16]))
        }
        fn cursor(&self) -> Result<u64> {
            Ok(*self.cursor.borrow())
        }
        fn schema_version(&self) -> Result<u32> {
            Ok(7)
        }
        fn last_origin_seq(&self) -> Result<u64> {
            Ok(*self.last_origin_seq.borrow())
        }
        fn pending_count(&self) -> Result<u64> {
            Ok(self.pending.borrow().len() as u64)
        }
        fn prepare_push_after(
            &self,
            after: u64,
            max_sets: usize,
            _max_bytes: usize,
        ) -> Result<Vec<ChangeSet>> {
            let p = self.pending.borrow();
            Ok(p.iter()
                .filter(|o| **o > after)
                .take(max_sets)
                .map(|o| self.set(*o))
                .collect())
        }
        fn acknowledge(&self, acks: &[(u64, u64)]) -> Result<()> {
            self.call(format!("acknowledge {acks:?}"));
            self.pending
                .borrow_mut()
                .retain(|o| !acks.iter().any(|(a, _)| a == o));
            Ok(())
        }
        fn apply_changes(
            &self,
            after: u64,
            up_to: u64,
            sets: &[Sequenced],
            _moves: &[Move],
        ) -> Result<ApplyReport> {
            self.call(format!("apply ({after}, {up_to}] {}", sets.len()));
            *self.cursor.borrow_mut() = up_to;
            Ok(ApplyReport {
                applied: sets.len(),
                cursor: up_to,
                ..ApplyReport::default()
            })
        }
        fn apply_snapshot(
            &self,
            rows: Vec<crate::snapshot::SnapshotRow>,
            _resume: &[u8],
            _replace: bool,
            end: Option<SnapshotEnd>,
        ) -> Result<ApplyReport> {
            let continue_from = end.map(|e| e.position);
            self.call(format!("apply snapshot {} {continue_from:?}", rows.len()));
            if let Some(p) = continue_from {
                let mut c = self.cursor.borrow_mut();
                *c = (*c).max(p);
            }
            Ok(ApplyReport {
                applied: rows.len(),
                ..ApplyReport::default()
            })
        }
        fn snapshot_resume(&self) -> Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn learn_limits(&self, limits: &Limits) -> Result<()> {
            *self.frame_limit.borrow_mut() = limits.max_frame_bytes;
            Ok(())
        }
        fn handle_refusal(
            &self,
            origin_seq: u64,
            code: ErrorCode,
            _message: &str,
        ) -> Result<RefusalAction> {
            self.call(format!("handle_refusal {origin_seq} {}", code.as_str()));
            Ok(self
                .refusal
                .borrow_mut()
                .take()
                .unwrap_or(RefusalAction::Withdrawn(vec![origin_seq])))
        }
        fn quarantine(&self, origin_seq: u64, code: ErrorCode, _message: &str) -> Result<SetAside> {
            self.call(format!("quarantine {origin_seq} {}", code.as_str()));
            if self.placeholders.borrow().contains(&origin_seq) {
                return Ok(SetAside::Withdrawn);
            }
            if self.guarded.borrow().contains(&origin_seq) {
                return Ok(SetAside::Guarded);
            }
            if !*self.quarantines.borrow() {
                return Ok(SetAside::Nothing);
            }
            self.placeholders.borrow_mut().insert(origin_seq);
            Ok(SetAside::Rows)
        }
        fn rebase(&self, origin_seq: u64) -> Result<bool> {
            self.call(format!("rebase {origin_seq}"));
            Ok(true)
        }
        fn restamp(&self, origin_seq: u64) -> Result<usize> {
            self.call(format!("restamp {origin_seq}"));
            Ok(1)
        }
        fn rotate_identity(&self) -> Result<ReplicaId> {
            self.call("rotate_identity".into());
            *self.id.borrow_mut() += 1;
            Ok(ReplicaId([*self.id.borrow(); 16]))
        }
        fn learn_relay_clock(&self, relay_ms: u64) -> Result<u64> {
            self.call(format!("learn_relay_clock {relay_ms}"));
            Ok(0)
        }
    }

    fn welcome(head: u64, max_origin_seq: u64) -> ServerMsg {
        ServerMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            head,
            server_time_ms: 42,
            max_origin_seq,
            limits: Limits::default(),
            horizon: 0,
            snapshot: false,
            scopes: None,
        }
    }

    fn pushed(step: &Reaction) -> Vec<u64> {
        step.send
            .iter()
            .flat_map(|m| match m {
                ClientMsg::Push { change_sets } => {
                    change_sets.iter().map(|c| c.origin_seq).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }

    fn refused(origin_seq: u64, code: ErrorCode, conflict_seq: u64) -> ServerMsg {
        ServerMsg::Refused {
            origin_seq,
            code,
            message: "no".into(),
            conflict_seq,
        }
    }

    /// A client holding `n` pending sets (the first `quarantines`-answer set), welcomed by an
    /// empty relay: the port, the client and the welcome's reaction (its calls cleared).
    fn welcomed_pending(n: u64, quarantines: bool) -> (FakePort, SyncClient, Reaction) {
        let port = FakePort::with_pending(n);
        *port.quarantines.borrow_mut() = quarantines;
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        let step = c.handle(&port, welcome(0, 0)).unwrap();
        port.calls();
        (port, c, step)
    }

    /// The relay's `forbidden` refusal of `origin_seq`, handled.
    fn forbid(c: &mut SyncClient, port: &FakePort, origin_seq: u64) -> Reaction {
        c.handle(port, refused(origin_seq, ErrorCode::Forbidden, 0))
            .unwrap()
    }

    /// A client welcomed by a relay at `head`, its port's calls so far cleared.
    fn welcomed_at(head: u64) -> (FakePort, SyncClient) {
        let port = FakePort::default();
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        c.handle(&port, welcome(head, 0)).unwrap();
        port.calls();
        (port, c)
    }

    fn welcome_with(limits: Limits) -> ServerMsg {
        ServerMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            head: 0,
            server_time_ms: 42,
            max_origin_seq: 0,
            limits,
            horizon: 0,
            snapshot: false,
            scopes: None,
        }
    }

    /// Every push the client is willing to send now: the welcome's, then polls until `None`.
    fn drain(c: &mut SyncClient, port: &FakePort, first: &Reaction) -> Vec<u64> {
        let mut sent = pushed(first);
        while let Some(m) = c.poll_push(port).unwrap() {
            sent.extend(pushed(&Reaction {
                send: vec![m],
                ..Reaction::default()
            }));
        }
        sent
    }

    fn acks(seqs: &[u64]) -> ServerMsg {
        ServerMsg::Acks {
            acks: seqs
                .iter()
                .map(|o| Ack {
                    origin_seq: *o,
                    server_seq: *o,
                })
                .collect(),
        }
    }

    #[test]
    fn the_relay_window_bounds_unacknowledged_bytes() {
        let port = FakePort::with_pending(10);
        let size = port.set(1).approx_bytes();
        let mut c = SyncClient::new()
            .with_batch(100, 1 << 20)
            .with_window(100, 1 << 20);
        c.start(&port, "tok").unwrap();
        let limits = Limits {
            push_window_bytes: (3 * size) as u64,
            ..Limits::default()
        };
        let step = c.handle(&port, welcome_with(limits)).unwrap();
        assert_eq!(drain(&mut c, &port, &step), vec![1, 2, 3]);
        assert_eq!(c.in_flight_bytes(), 3 * size);
        let step = c.handle(&port, acks(&[1, 2])).unwrap();
        assert_eq!(
            drain(&mut c, &port, &step),
            vec![4, 5],
            "two sets of room again"
        );
        assert_eq!(c.in_flight_bytes(), 3 * size);
        // A refusal of 4 takes 4 and 5 out of flight.
        // (A custom-column conflict: the client waits to catch up before pushing again.)
        *port.refusal.borrow_mut() = Some(RefusalAction::Rebase);
        c.handle(&port, refused(4, ErrorCode::Conflict, 100))
            .unwrap();
        assert_eq!(c.in_flight_bytes(), size, "only 3 is still in flight");
    }

    #[test]
    fn the_set_window_holds_without_a_relay_window() {
        let port = FakePort::with_pending(10);
        let mut c = SyncClient::new()
            .with_batch(100, 1 << 20)
            .with_window(2, 1 << 30);
        c.start(&port, "tok").unwrap();
        // A relay from before the window was announced: the client's own bounds apply.
        let limits = Limits {
            push_window_bytes: 0,
            ..Limits::default()
        };
        let step = c.handle(&port, welcome_with(limits)).unwrap();
        assert_eq!(drain(&mut c, &port, &step), vec![1, 2]);
        let step = c.handle(&port, acks(&[1])).unwrap();
        assert_eq!(drain(&mut c, &port, &step), vec![3]);
        // One set is always allowed, however large.
        let mut one = SyncClient::new().with_window(1, 1);
        one.start(&port, "tok").unwrap();
        let step = one.handle(&port, welcome(0, 0)).unwrap();
        assert_eq!(drain(&mut one, &port, &step), vec![2]);
    }

    #[test]
    fn hello_names_the_replica_and_welcome_starts_pushing() {
        let port = FakePort::with_pending(3);
        let mut c = SyncClient::new().with_batch(2, 1 << 20);
        match c.start(&port, "tok").unwrap() {
            ClientMsg::Hello {
                replica_id,
                cursor,
                schema_version,
                token,
                ..
            } => {
                assert_eq!(replica_id, ReplicaId([0; 16]));
                assert_eq!((cursor, schema_version, token.as_str()), (0, 7, "tok"));
            }
            other => panic!("expected hello, got {other:?}"),
        }
        let step = c.handle(&port, welcome(5, 0)).unwrap();
        assert_eq!(port.calls(), vec!["learn_relay_clock 42"]);
        assert_eq!(pushed(&step), vec![1, 2], "one batch of at most two");
        // In flight: not pushed again until acknowledged.
        assert_eq!(c.poll_push(&port).unwrap().map(|_| ()), Some(()));
        let step = c
            .handle(
                &port,
                ServerMsg::Acks {
                    acks: vec![Ack {
                        origin_seq: 1,
                        server_seq: 6,
                    }],
                },
            )
            .unwrap();
        assert_eq!(port.calls(), vec!["acknowledge [(1, 6)]"]);
        assert!(pushed(&step).is_empty(), "2 and 3 are still in flight");
        assert_eq!(c.head(), 6);
        assert!(!c.is_synced(&port).unwrap());
    }

    #[test]
    fn a_relay_holding_more_of_this_id_than_the_file_rotates_it() {
        let port = FakePort::with_pending(1);
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        let step = c.handle(&port, welcome(0, 5)).unwrap();
        assert!(step.reconnect);
        assert_eq!(
            port.calls(),
            vec!["learn_relay_clock 42", "rotate_identity"]
        );
        assert_eq!(c.phase(), Phase::Idle);
    }

    #[test]
    fn changes_are_applied_and_sync_is_reached() {
        let port = FakePort::default();
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        c.handle(&port, welcome(2, 0)).unwrap();
        assert!(!c.is_synced(&port).unwrap(), "behind the head");
        let other = Sequenced {
            server_seq: 2,
            change_set: ChangeSet {
                origin: ReplicaId([9; 16]),
                ..port.set(1)
            },
        };
        let step = c
            .handle(
                &port,
                ServerMsg::Changes {
                    after: 0,
                    up_to: 2,
                    change_sets: vec![other],
                    head: 2,
                    moves: Vec::new(),
                },
            )
            .unwrap();
        assert_eq!(step.applied, 1);
        assert_eq!(port.calls(), vec!["learn_relay_clock 42", "apply (0, 2] 1"]);
        assert!(c.is_synced(&port).unwrap());
    }

    #[test]
    fn refusals_reach_the_port_by_code() {
        // Clock skew: re-stamped and pushed again.
        let port = FakePort::with_pending(2);
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        c.handle(&port, welcome(0, 0)).unwrap();
        port.calls();
        let step = c
            .handle(&port, refused(1, ErrorCode::ClockSkew, 0))
            .unwrap();
        assert_eq!(port.calls(), vec!["restamp 1"]);
        assert_eq!(pushed(&step), vec![1, 2], "pushed again");
        assert!(step.refused.is_none());

        // A compare-and-set conflict: rolled back, pushing goes on.
        let step = c.handle(&port, refused(1, ErrorCode::Conflict, 0)).unwrap();
        assert_eq!(port.calls(), vec!["handle_refusal 1 conflict"]);
        assert_eq!(step.withdrawn, vec![1]);

        // A custom-column conflict: rebased once the cursor reaches the conflicting change.
        *port.refusal.borrow_mut() = Some(RefusalAction::Rebase);
        c.handle(&port, refused(2, ErrorCode::Conflict, 4)).unwrap();
        assert_eq!(port.calls(), vec!["handle_refusal 2 conflict"]);
        assert!(
            c.poll_push(&port).unwrap().is_none(),
            "waits for position 4"
        );
        *port.cursor.borrow_mut() = 4;
        assert!(c.poll_push(&port).unwrap().is_some());
        assert_eq!(port.calls(), vec!["rebase 2"]);

        // A permanent refusal: set aside, and the uploads behind it go on (its placeholder
        // first).
        *port.quarantines.borrow_mut() = true;
        let step = forbid(&mut c, &port, 2);
        assert_eq!(port.calls(), vec!["quarantine 2 forbidden"]);
        assert_eq!(step.quarantined, vec![2]);
        assert!(step.refused.is_none());
        assert_eq!(pushed(&step), vec![2], "the placeholder is pushed");

        // Its placeholder refused too (a token that may write nothing): uploads stop and it
        // is reported.
        let step = forbid(&mut c, &port, 2);
        assert!(port.calls().is_empty(), "nothing left to set aside");
        assert_eq!(step.refused.map(|r| r.code), Some(ErrorCode::Forbidden));
        assert!(c.poll_push(&port).unwrap().is_none());

        // Origin reuse: a new identity and a new connection.
        let step = c
            .handle(&port, refused(2, ErrorCode::OriginReused, 0))
            .unwrap();
        assert!(step.reconnect);
        assert_eq!(port.calls(), vec!["rotate_identity"]);
    }

    #[test]
    fn a_set_withdrawn_while_in_flight_and_then_refused_does_not_stop_uploads() {
        // Sets 1–3 are in flight when a remote change dooms 2 (rolled back here: its
        // placeholder now holds its place); then the relay refuses the frame's 2 for good.
        let (port, mut c, step) = welcomed_pending(3, true);
        assert_eq!(pushed(&step), vec![1, 2, 3]);
        port.placeholders.borrow_mut().insert(2);
        c.handle(&port, acks(&[1])).unwrap();
        port.calls();
        let step = forbid(&mut c, &port, 2);
        assert_eq!(port.calls(), vec!["quarantine 2 forbidden"]);
        assert!(
            step.refused.is_none(),
            "the refusal was about rows withdrawn already"
        );
        assert!(step.quarantined.is_empty(), "nothing new set aside");
        assert_eq!(
            pushed(&step),
            vec![2, 3],
            "the placeholder goes, and what is behind it"
        );
        assert!(c.refused().is_none());

        // The gap's refusal of the stale 3 changes nothing; the placeholder and 3 are acked.
        c.handle(&port, refused(3, ErrorCode::InvalidChangeSet, 0))
            .unwrap();
        c.handle(&port, acks(&[2, 3])).unwrap();
        assert!(c.refused().is_none());
        assert_eq!(port.pending_count().unwrap(), 0);

        // A set refused for good whose placeholder is refused as well (the token may write
        // nothing) is reported, once, and uploads stop: no refusal loop.
        port.pending.borrow_mut().push(4);
        *port.last_origin_seq.borrow_mut() = 4;
        port.placeholders.borrow_mut().insert(4);
        let push = c.poll_push(&port).unwrap();
        assert!(push.is_some());
        let step = forbid(&mut c, &port, 4);
        assert_eq!(pushed(&step), vec![4], "its placeholder is pushed");
        let step = forbid(&mut c, &port, 4);
        assert_eq!(step.refused.map(|r| r.origin_seq), Some(4));
        assert!(c.poll_push(&port).unwrap().is_none());
    }

    #[test]
    fn a_permanent_refusal_of_a_frame_sent_before_a_recovery_is_not_final() {
        // One set per frame: 1 and 2 go in two frames.
        let port = FakePort::with_pending(2);
        *port.quarantines.borrow_mut() = true;
        let mut c = SyncClient::new().with_batch(1, 1 << 20);
        c.start(&port, "t").unwrap();
        let step = c.handle(&port, welcome(0, 0)).unwrap();
        assert_eq!(pushed(&step), vec![1]);
        assert!(c.poll_push(&port).unwrap().is_some(), "2 in a second frame");
        port.calls();
        // 1 is set aside; its placeholder and 2 go again.
        let step = forbid(&mut c, &port, 1);
        assert_eq!(step.quarantined, vec![1]);
        assert_eq!(pushed(&step), vec![1]);
        assert!(c.poll_push(&port).unwrap().is_some(), "2 again");
        port.calls();
        // The first frame carrying 2 is refused for what it carried then: 2 was sent again.
        let step = forbid(&mut c, &port, 2);
        assert!(
            port.calls().is_empty(),
            "nothing set aside for a stale frame"
        );
        assert!(step.refused.is_none() && c.refused().is_none());
        // The placeholder is acked; 2 refused again, now answering its new push: set aside.
        c.handle(&port, acks(&[1])).unwrap();
        port.calls();
        let step = forbid(&mut c, &port, 2);
        assert_eq!(port.calls(), vec!["quarantine 2 forbidden"]);
        assert_eq!(step.quarantined, vec![2]);
        assert!(c.refused().is_none());
    }

    #[test]
    fn a_guarded_set_refused_for_good_is_rolled_back_not_set_aside() {
        let (port, mut c, _) = welcomed_pending(2, false);
        port.guarded.borrow_mut().insert(1);
        let step = forbid(&mut c, &port, 1);
        assert_eq!(
            port.calls(),
            vec!["quarantine 1 forbidden", "handle_refusal 1 forbidden"]
        );
        assert!(step.quarantined.is_empty());
        assert_eq!(step.withdrawn, vec![1]);
        assert!(step.refused.is_none());
        assert_eq!(
            pushed(&step),
            vec![1, 2],
            "its placeholder, and what is behind"
        );
    }

    #[test]
    fn a_set_beyond_the_relays_limits_is_set_aside_not_sent() {
        let port = FakePort::with_pending(3);
        *port.quarantines.borrow_mut() = true;
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        // Frames of 64 bytes: every set (about 96 bytes) is beyond them, but the fake's
        // placeholder answer lets only the first be set aside.
        let limits = Limits {
            max_frame_bytes: 64,
            ..Limits::default()
        };
        let step = c.handle(&port, welcome_with(limits)).unwrap();
        assert_eq!(
            *port.frame_limit.borrow(),
            64,
            "the replica learns the limits"
        );
        let calls = port.calls();
        assert!(
            calls.contains(&"quarantine 1 too_large".to_owned()),
            "{calls:?}"
        );
        assert!(
            pushed(&step).is_empty(),
            "nothing beyond the limits is sent"
        );
    }

    #[test]
    fn data_before_welcome_is_a_protocol_error() {
        let port = FakePort::default();
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        let e = c
            .handle(&port, ServerMsg::Acks { acks: Vec::new() })
            .unwrap_err();
        assert!(matches!(e, Error::Protocol(_)));
        assert!(port.calls().is_empty());
    }

    /// A relay (or someone in the middle) naming positions beyond its head, or beyond what a
    /// store can number, is refused before anything reaches the replica: applied, the cursor
    /// would sit past the real relay's head and every later hello would be refused.
    #[test]
    fn positions_beyond_the_head_are_refused_and_nothing_applied() {
        for (up_to, head) in [(1 << 62, 3), (5, 4), (MAX_POSITION + 1, u64::MAX)] {
            let (port, mut c) = welcomed_at(3);
            let e = c
                .handle(
                    &port,
                    ServerMsg::Changes {
                        after: 0,
                        up_to,
                        change_sets: Vec::new(),
                        head,
                        moves: Vec::new(),
                    },
                )
                .unwrap_err();
            assert!(matches!(e, Error::Protocol(_)), "{e}");
            assert!(port.calls().is_empty(), "nothing applied");
            assert_eq!(c.head(), 3);
        }
        // A snapshot at a position no store can number.
        let (port, mut c) = welcomed_at(3);
        let e = c
            .handle(
                &port,
                ServerMsg::Snapshot {
                    position: MAX_POSITION + 1,
                    rows: Vec::new(),
                    resume: Vec::new(),
                    done: true,
                    total_rows: 0,
                    total_bytes: 0,
                    bytes: 0,
                },
            )
            .unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e}");
        assert!(port.calls().is_empty(), "nothing applied");
    }

    /// A hello refused because the replica id belongs to another user: the replica takes a
    /// new id and connects again.
    #[test]
    fn an_id_owned_by_another_subject_is_replaced() {
        let port = FakePort::with_pending(1);
        let mut c = SyncClient::new();
        c.start(&port, "t").unwrap();
        let step = c
            .handle(
                &port,
                ServerMsg::Error {
                    code: ErrorCode::IdentityMismatch,
                    message: "another subject".into(),
                },
            )
            .unwrap();
        assert!(step.reconnect);
        assert_eq!(port.calls(), vec!["rotate_identity"]);
    }
}
