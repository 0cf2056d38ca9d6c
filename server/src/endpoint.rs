//! The relay's side of one connection, without the socket: what to answer to each frame.
//!
//! [`Endpoint`] owns everything a connection knows (replica, grants, how far it has been
//! told) and turns each decoded client frame into the frames to send back, consulting only
//! the store. The WebSocket loop in `session` adds the socket, timers and rate
//! limiting; the deterministic simulation (`server/tests/integration/simulation/`) drives the same
//! code with messages it delays, drops and replays itself, so what it checks is what serves
//! clients.

use crate::auth::Grants;
use crate::bucket::Bucket;
use crate::error::RelayError;
use crate::metrics as m;

use crate::holding;
use crate::resume::{ResumeKey, TokenError};
use crate::state::RelayState;
use crate::store::{PushOutcome, ReadFilter, SnapshotKey, StoredSet};
use ferry_core::admission::Bounds;
use ferry_core::protocol::{
    Ack, ClientMsg, DecodeError, ErrorCode, Move, PROTOCOL_VERSION, RowKey, ServerMsg,
};
use ferry_core::scope::ScopeSet;
use ferry_core::{ChangeSet, ReplicaId, Sequenced};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Why a connection is being closed (sent to the client as an error frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The protocol code sent in the error frame.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
}

impl Close {
    /// A close with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Close {
            code,
            message: message.into(),
        }
    }
}

impl From<RelayError> for Close {
    fn from(e: RelayError) -> Self {
        if let RelayError::StorageUnavailable(_) = e {
            tracing::warn!(error = %e, "push not stored: the store's disk is full or read-only");
        } else if e.code() == ErrorCode::Internal {
            tracing::error!(error = %e, "relay failure while serving a connection");
        }
        Close::new(e.code(), e.client_message())
    }
}

/// Decodes a client frame; the refusal's code follows from the typed decode error.
pub fn decode(bytes: &[u8], max: usize) -> Result<ClientMsg, Close> {
    ClientMsg::read(bytes, max).map_err(|e| {
        let message = match &e {
            DecodeError::Version(v) => format!(
                "protocol version {v} is not supported; this relay speaks {PROTOCOL_VERSION}"
            ),
            other => other.to_string(),
        };
        Close::new(e.code(), message)
    })
}

/// One authenticated connection's state.
pub struct Endpoint {
    shared: Arc<RelayState>,
    replica: ReplicaId,
    label: String,
    grants: Arc<Grants>,
    filter: ReadFilter,
    /// Position up to which the client has been told everything.
    told: u64,
    /// Position up to which the log has been examined (nothing visible in `(told, scanned]`).
    scanned: u64,
    readable: HashMap<String, bool>,
    /// This connection's number among its replica's connections (see `Sessions`).
    session: u64,
    /// The snapshot being sent, until its last page.
    walk: Option<Walk>,
    /// After a back-fill: positions up to `.0` are filtered by `.1` too (what the replica
    /// held before), see `ferry_core::scope::HeldScopes::below`.
    below: Option<(u64, ScopeSet)>,
    /// Checksum requests (`limits.checksums_per_minute`): each one may read the whole
    /// checksum state.
    checksums: Bucket,
}

/// Checksum requests a connection may make at once before the per-minute rate holds.
const CHECKSUM_BURST: f64 = 3.0;

/// Where a snapshot being sent stands.
#[derive(Debug)]
struct Walk {
    /// The position the replica continues the log from: the oldest of the pages' positions
    /// (`None` before the first page).
    position: Option<u64>,
    /// The next page starts after this row.
    after: Option<SnapshotKey>,
    /// Rows and (estimated) stored bytes the walk holds from this connection's first page
    /// on, announced for progress.
    total: Option<(u64, u64)>,
    /// What the walk reads: the connection's filter, less what the replica holds for a
    /// back-fill.
    filter: ReadFilter,
    /// A back-fill of gained scopes: the replica keeps its cursor, and the log continues
    /// from it with the scopes held before for positions up to the walk's.
    backfill: Option<ScopeSet>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("replica", &self.label)
            .field("told", &self.told)
            .finish()
    }
}

impl Endpoint {
    /// Answers a connection's first frame: checks it is a hello in this relay's protocol
    /// version with a valid token and a cursor the log holds, and returns the endpoint and
    /// the welcome.
    pub async fn open(
        shared: &Arc<RelayState>,
        first: ClientMsg,
    ) -> Result<(Endpoint, ServerMsg), Close> {
        let kind = first.kind();
        let ClientMsg::Hello {
            protocol,
            replica_id,
            token,
            cursor,
            snapshots,
            resume,
            subscriptions,
            held,
            ..
        } = first
        else {
            return Err(Close::new(
                ErrorCode::BadFrame,
                format!("the first frame must be hello, got {kind}"),
            ));
        };
        if protocol != PROTOCOL_VERSION {
            return Err(Close::new(
                ErrorCode::UnsupportedVersion,
                format!("hello asks for protocol {protocol}; this relay speaks {PROTOCOL_VERSION}"),
            ));
        }
        let grants = shared.verifier.verify(&token)?;
        // A replica id is its first subject's: a hello for it under another subject (another
        // user on the same file, or someone who read the id off a change set) is refused
        // before it can supersede the owner's connection, push under its origin or take its
        // leases.
        if !shared.store.claim(replica_id, &grants.sub).await? {
            return Err(Close::new(
                ErrorCode::IdentityMismatch,
                "this replica id belongs to another subject; take a new replica id",
            ));
        }
        let view = holding::view(&grants, subscriptions.as_deref())?;
        if let Some(h) = &held {
            holding::check_held(h)?;
        }
        // The log's head, not this node's feed: a replica that synced through another node may
        // hold a cursor this node has not published yet.
        let head = shared.store.head().await?;
        if cursor > head {
            return Err(Close::new(
                ErrorCode::InvalidChangeSet,
                format!(
                    "cursor {cursor} is beyond this relay's head {head}: the relay does not hold the history this replica saw"
                ),
            ));
        }
        let plan = holding::plan(view, cursor, snapshots, held);
        let filter = ReadFilter::of(&grants, plan.view.clone());
        // A replica that has applied nothing gets a snapshot of its scopes' rows rather than
        // the whole log; one that was cut off during its snapshot continues it.
        // Only for a replica none of whose change sets the log holds: its own change sets
        // come back in the log as acknowledgements, and the client holds its pushes until
        // the last page (`Welcome.snapshot`), so none sits below where the log continues.
        // A replica that gained scopes gets a back-fill of them (see `holding`).
        let walk_filter = match &plan.backfill {
            Some(held) => filter.clone().except(held.clone()),
            None => filter.clone(),
        };
        let wants_walk = match &plan.backfill {
            Some(_) => true,
            None => {
                snapshots && cursor == 0 && shared.store.first_position(replica_id).await?.is_none()
            }
        };
        let resumed = match (wants_walk, resume) {
            (true, Some(t)) => {
                match ResumeKey::new(shared.store.secret()).open(&t, replica_id, &walk_filter) {
                    Ok(r) => Some(r),
                    // The grants or subscriptions changed since: the walk starts over.
                    Err(TokenError::Stale) => None,
                    Err(e) => return Err(Close::new(ErrorCode::BadFrame, e.to_string())),
                }
            }
            _ => None,
        };
        let start = match resumed {
            Some(r) => Some((Some(r.position), r.after)),
            None if wants_walk && head > 0 => Some((None, None)),
            None => None,
        };
        let walk = start.map(|(position, after)| Walk {
            position,
            after,
            total: None,
            filter: walk_filter,
            backfill: plan.backfill,
        });
        let max_origin_seq = shared.store.max_origin_seq(replica_id).await?;
        let horizon = shared.store.stats().await.map(|s| s.horizon).unwrap_or(0);
        let welcome = ServerMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            head,
            server_time_ms: (shared.clock)(),
            max_origin_seq,
            limits: shared.limits(),
            horizon,
            snapshot: walk.is_some(),
            scopes: Some(plan.view),
        };
        tracing::debug!(replica = %replica_id, sub = %grants.sub, cursor, head, backfill = walk.as_ref().is_some_and(|w| w.backfill.is_some()), "replica connected");
        let session = shared.sessions.begin(replica_id).await;
        let grants = Arc::new(grants);
        let ep = Endpoint {
            shared: Arc::clone(shared),
            replica: replica_id,
            label: replica_id.to_string(),
            filter,
            grants,
            told: cursor,
            scanned: cursor,
            readable: HashMap::new(),
            session,
            walk,
            below: plan.below,
            checksums: Bucket::new(
                f64::from(shared.cfg.limits.checksums_per_minute) / 60.0,
                CHECKSUM_BURST,
            ),
        };
        Ok((ep, welcome))
    }

    /// What every connection shares.
    pub fn shared(&self) -> &Arc<RelayState> {
        &self.shared
    }

    /// This connection's number among its replica's connections.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The connection's replica.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// The token's claims.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Position up to which the client has been told everything.
    pub fn told(&self) -> u64 {
        self.told
    }

    /// Answers one frame after the hello: the frames to send back, in order.
    pub async fn handle(&mut self, msg: ClientMsg) -> Result<Vec<ServerMsg>, Close> {
        let mut out = Vec::new();
        match msg {
            ClientMsg::Hello { .. } => {
                return Err(Close::new(ErrorCode::BadFrame, "hello sent twice"));
            }
            ClientMsg::Push { change_sets } => {
                let Some(_current) = self
                    .shared
                    .sessions
                    .current(self.replica, self.session)
                    .await
                else {
                    return Err(Close::new(
                        ErrorCode::ShuttingDown,
                        "superseded: this replica has connected again; frames on this connection are no longer accepted",
                    ));
                };
                self.push(change_sets, &mut out).await?
            }
            ClientMsg::Ping { nonce } => {
                // The pong carries the head as of now; what the client has not been sent yet
                // follows (empty progress is flushed first, so a caught-up client's cursor
                // reaches the head at once).
                self.changes(true, 1, &mut out).await?;
                let head = self.shared.store.head().await?;
                out.push(ServerMsg::Pong { nonce, head });
            }
            ClientMsg::Lease { nonce, request } => {
                ferry_core::lease::validate(&request).map_err(|e| {
                    Close::new(ErrorCode::BadFrame, format!("lease request refused: {e}"))
                })?;
                // Decided before the store is asked, so a token without the grant learns
                // nothing of the lease (held or not, for how long) and leaves no row.
                let name = crate::store::job::lease_name(&request);
                let outcome = if self.grants.may_lease(name) {
                    self.shared.store.lease(self.replica, request).await?
                } else {
                    ferry_core::protocol::LeaseOutcome::Forbidden {
                        name: name.to_owned(),
                    }
                };
                metrics::counter!(m::LEASES, "outcome" => lease_kind(&outcome)).increment(1);
                out.push(ServerMsg::Lease { nonce, outcome });
            }
            ClientMsg::Checksum { nonce } => {
                let Some(shadow) = self.shared.checksums.clone() else {
                    return Err(Close::new(
                        ErrorCode::Internal,
                        "checksums are disabled on this relay (checksums.enabled = false)",
                    ));
                };
                self.checksums.take().await;
                // Everything this connection was told about is in the state summed.
                self.changes(true, 1, &mut out).await?;
                shadow.catch_up(&self.shared.store, Some(self.told)).await?;
                let view = self.filter.view().clone();
                let (position, sum) = tokio::task::spawn_blocking(move || shadow.checksum(&view))
                    .await
                    .map_err(|e| {
                        Close::new(ErrorCode::Internal, format!("checksum failed: {e}"))
                    })??;
                out.push(ServerMsg::Checksum {
                    nonce,
                    position,
                    digest: sum.digest,
                    rows: sum.rows,
                });
            }
        }
        Ok(out)
    }

    async fn push(&mut self, sets: Vec<ChangeSet>, out: &mut Vec<ServerMsg>) -> Result<(), Close> {
        let started = Instant::now();
        let limits = &self.shared.cfg.limits;
        if sets.len() > limits.max_push_sets {
            return Err(Close::new(
                ErrorCode::TooLarge,
                format!(
                    "push of {} change sets; the limit is {}",
                    sets.len(),
                    limits.max_push_sets
                ),
            ));
        }
        // Origin first: a connection may only push its own replica's change sets.
        if let Some(cs) = sets.iter().find(|cs| cs.origin != self.replica) {
            return Err(Close::new(
                ErrorCode::InvalidChangeSet,
                format!(
                    "change set origin {} is not this connection's replica {}",
                    cs.origin, self.replica
                ),
            ));
        }
        let bounds = Bounds {
            now_ms: (self.shared.clock)(),
            max_clock_skew_ms: limits.max_clock_skew.as_millis() as u64,
            max_ops: limits.max_change_set_ops,
        };
        let mut refusal: Option<(u64, RelayError)> = None;
        let mut acks = Vec::new();
        if let Some(first) = sets.first().filter(|_| !self.grants.writes_anything()) {
            refusal = Some((
                first.origin_seq,
                RelayError::Forbidden(
                    "this token grants no write scopes: it may push nothing".into(),
                ),
            ));
        } else if !sets.is_empty() {
            let oseqs: Vec<u64> = sets.iter().map(|c| c.origin_seq).collect();
            let outcomes = self
                .shared
                .store
                .push(Arc::clone(&self.grants), bounds, sets)
                .await?;
            for (oseq, out) in oseqs.into_iter().zip(outcomes) {
                match out {
                    PushOutcome::Acked(server_seq) => acks.push(Ack {
                        origin_seq: oseq,
                        server_seq,
                    }),
                    PushOutcome::Refused(e) => {
                        refusal = Some((oseq, e));
                        break;
                    }
                }
            }
        }
        metrics::counter!(m::SETS_IN).increment(acks.len() as u64);
        if !acks.is_empty() {
            out.push(ServerMsg::Acks { acks });
        }
        metrics::histogram!(m::PUSH_SECONDS).record(started.elapsed().as_secs_f64());
        if let Some((origin_seq, e)) = refusal {
            let code = e.code();
            if code == ErrorCode::Internal {
                return Err(e.into());
            }
            metrics::counter!(m::REFUSED, "code" => code.as_str()).increment(1);
            tracing::info!(replica = %self.replica, origin_seq, code = code.as_str(), error = %e, "push refused");
            let conflict_seq = match &e {
                RelayError::Conflict { seq, .. } => *seq,
                _ => 0,
            };
            out.push(ServerMsg::Refused {
                origin_seq,
                code,
                message: e.to_string(),
                conflict_seq,
            });
        }
        Ok(())
    }

    /// May the connection read `scope` in the change set at `position`?
    fn can_read(&mut self, scope: &str, position: u64) -> bool {
        let below = match &self.below {
            Some((at, held)) if position <= *at => held.matches(scope),
            _ => true,
        };
        below && self.can_read_now(scope)
    }

    fn can_read_now(&mut self, scope: &str) -> bool {
        if let Some(v) = self.readable.get(scope) {
            return *v;
        }
        let v = self.filter.can_read(scope);
        if self.readable.len() < 10_000 {
            self.readable.insert(scope.to_owned(), v);
        }
        v
    }

    /// What was sequenced since the client was last told, at most `frames` frames, pushed
    /// onto `out`. With `flush`, once caught up, also tells it about positions with nothing
    /// visible (so its cursor catches up). Returns true while more remains to send.
    pub async fn changes(
        &mut self,
        flush: bool,
        frames: usize,
        out: &mut Vec<ServerMsg>,
    ) -> Result<bool, Close> {
        let store = Arc::clone(&self.shared.store);
        let mut sent = 0;
        while let Some(walk) = &mut self.walk {
            if sent >= frames {
                return Ok(true);
            }
            if walk.backfill.is_some() && walk.position.is_none() {
                // A back-fill's rows must be as of the replica's cursor or later: the log
                // continues from the cursor, so what the fold has not reached yet would be
                // missed. Fold (or wait for the node that folds) until it has.
                catch_up_fold(&*store, self.told).await?;
            }
            let counted = match walk.total {
                Some(_) => None,
                None => Some(
                    store
                        .snapshot_size(&walk.filter, walk.after.clone())
                        .await?,
                ),
            };
            let page = store
                .snapshot_page(
                    &walk.filter,
                    walk.after.clone(),
                    SNAPSHOT_PAGE_ROWS,
                    FRAME_BUDGET,
                )
                .await?;
            // Pages read after the fold moved on are newer; the log continues from the
            // oldest (a replica replaying what it holds skips it, see `ferry_core::snapshot`).
            let position = walk
                .position
                .map_or(page.position, |p| p.min(page.position));
            walk.position = Some(position);
            walk.after.clone_from(&page.next);
            let done = page.next.is_none();
            let position = if done && walk.backfill.is_none() {
                // This replica's own change sets come back in the log as acknowledgements
                // (and bring back any it withdrew but the relay sequenced): the log continues
                // from before the first of them.
                match store.first_position(self.replica).await? {
                    Some(first) => position.min(first - 1),
                    None => position,
                }
            } else {
                position
            };
            let resume = match &page.next {
                Some(next) => ResumeKey::new(store.secret()).seal(
                    self.replica,
                    &walk.filter,
                    position,
                    Some(next.clone()),
                ),
                None => Vec::new(),
            };
            if let Some(size) = counted {
                // Bytes are known once rows are read: the first page's average per row,
                // times the rows counted (exact when the walk is one page).
                let per_row = page.bytes as f64 / page.rows.len().max(1) as f64;
                let bytes = (per_row * size.rows as f64) as u64;
                walk.total = Some((size.rows, bytes.max(page.bytes)));
            }
            let (total_rows, total_bytes) = walk.total.unwrap_or_default();
            let rows: Vec<_> = page.rows.into_iter().map(|(_, r)| r).collect();
            metrics::counter!(m::SNAPSHOT_ROWS).increment(rows.len() as u64);
            out.push(ServerMsg::Snapshot {
                position,
                rows,
                resume,
                done,
                total_rows,
                total_bytes,
                bytes: page.bytes,
            });
            sent += 1;
            if done {
                match self.walk.take().and_then(|w| w.backfill) {
                    // The log continues from the replica's cursor; up to the walk's position
                    // only for what it held before (the walk brought the rest).
                    Some(held) => {
                        if position > self.told {
                            self.below = Some((position, held));
                        }
                    }
                    None => {
                        self.told = self.told.max(position);
                        self.scanned = self.scanned.max(position);
                    }
                }
            }
        }
        loop {
            let head = store.feed().head();
            if self.scanned >= head {
                break;
            }
            if sent >= frames {
                return Ok(true);
            }
            // Recent positions come from the feed's window (memory, shared by every
            // connection); older ones through the store's per-scope index, so a reconnect
            // reads the device's own scopes, not every tenant's writes.
            let (batch, complete_to) = match store.feed().window_after(self.scanned, 512) {
                Some(b) if !b.is_empty() => {
                    let last = b.last().map_or(self.scanned, |s| s.server_seq);
                    (b, last)
                }
                _ => {
                    let r = store
                        .read_scoped(self.scanned, &self.filter, 512, 4 << 20)
                        .await?;
                    metrics::counter!(m::STORE_SETS_READ).increment(r.examined as u64);
                    (r.sets, r.up_to)
                }
            };
            if complete_to <= self.scanned {
                break;
            }
            let (sets, moves, consumed) = self.filter(&batch, FRAME_BUDGET).await?;
            // All of the batch consumed: complete up to what the read covered (positions it
            // skipped touch no readable scope); otherwise up to the last set consumed.
            let up_to = if consumed >= batch.len() {
                complete_to
            } else {
                batch
                    .get(consumed.saturating_sub(1))
                    .map_or(self.scanned, |s| s.server_seq)
            };
            self.scanned = up_to;
            if sets.is_empty() && moves.is_empty() {
                continue;
            }
            let n = sets.len();
            out.push(ServerMsg::Changes {
                after: self.told,
                up_to,
                change_sets: sets,
                // Over PostgreSQL the store may hold positions this node's feed has not
                // published yet; a frame never names a head below what it covers.
                head: head.max(up_to),
                moves,
            });
            metrics::counter!(m::SETS_OUT).increment(n as u64);
            self.told = up_to;
            sent += 1;
        }
        if flush && self.told < self.scanned {
            let up_to = self.scanned;
            out.push(ServerMsg::Changes {
                after: self.told,
                up_to,
                change_sets: Vec::new(),
                head: store.feed().head().max(up_to),
                moves: Vec::new(),
            });
            self.told = up_to;
        }
        let lag = store.feed().head().saturating_sub(self.told);
        metrics::histogram!(m::REPLICA_LAG).record(lag as f64);
        Ok(false)
    }

    /// The parts of `batch` this connection may see, and the scope moves it must apply.
    /// Stops after the set that takes the frame past `budget` bytes (estimated); returns how
    /// many sets of `batch` it consumed (at least one).
    async fn filter(
        &mut self,
        batch: &[Arc<StoredSet>],
        budget: usize,
    ) -> Result<(Vec<Sequenced>, Vec<Move>, usize), Close> {
        let mut sets = Vec::new();
        let mut moves = Vec::new();
        let mut bytes = 0usize;
        let mut consumed = 0;
        for s in batch {
            if bytes >= budget {
                break;
            }
            consumed += 1;
            let cs = &s.change_set;
            let mut rows = Vec::new();
            let mut evict = Vec::new();
            let mut entering = Vec::new();
            for (i, rc) in cs.rows.iter().enumerate() {
                let Some(tag) = s.tags.get(i) else { continue };
                let now = self.can_read(&tag.scope, s.server_seq);
                let before = match &tag.moved_from {
                    Some(from) => self.can_read(from, s.server_seq),
                    None => now,
                };
                if now {
                    bytes += crate::store::approx_row_bytes(rc);
                    rows.push(rc.clone());
                    if !before {
                        entering.push((rc.table.clone(), rc.pk.clone()));
                    }
                } else if before && tag.moved_from.is_some() {
                    evict.push(RowKey {
                        table: rc.table.clone(),
                        pk: rc.pk.clone(),
                    });
                }
            }
            let mut backfill: Vec<Sequenced> = Vec::new();
            for (table, pk) in entering {
                let history = self
                    .shared
                    .store
                    .row_history(&table, &pk, s.server_seq)
                    .await?;
                for h in history {
                    let parts: Vec<_> = h
                        .change_set
                        .rows
                        .iter()
                        .filter(|r| r.table == table && r.pk == pk)
                        .cloned()
                        .collect();
                    if parts.is_empty() {
                        continue;
                    }
                    bytes += parts
                        .iter()
                        .map(crate::store::approx_row_bytes)
                        .sum::<usize>();
                    match backfill.iter_mut().find(|b| b.server_seq == h.server_seq) {
                        Some(b) => b.change_set.rows.extend(parts),
                        None => {
                            let mut c = h.change_set.clone();
                            c.rows = parts;
                            backfill.push(Sequenced {
                                server_seq: h.server_seq,
                                change_set: c,
                            });
                        }
                    }
                }
            }
            backfill.sort_by_key(|b| b.server_seq);
            if !evict.is_empty() || !backfill.is_empty() {
                moves.push(Move {
                    server_seq: s.server_seq,
                    evict,
                    backfill,
                });
            }
            if !rows.is_empty() {
                let mut part = cs.clone();
                part.rows = rows;
                sets.push(Sequenced {
                    server_seq: s.server_seq,
                    change_set: part,
                });
            }
        }
        Ok((sets, moves, consumed))
    }
}

/// Folds the row histories (see [`crate::history`]) until they are as of `position` or
/// later; over PostgreSQL another node may be the one folding, so this polls.
async fn catch_up_fold(store: &dyn crate::store::Store, position: u64) -> Result<(), Close> {
    let deadline = Instant::now() + FOLD_WAIT;
    loop {
        let at = store.fold_rows(FOLD_ROWS).await?;
        if at >= position {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Close::new(
                ErrorCode::ShuttingDown,
                format!(
                    "the relay's row histories are at position {at}, behind this replica's cursor {position}, after {FOLD_WAIT:?}: try again"
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Row changes folded per call while a back-fill waits for the fold.
const FOLD_ROWS: usize = 50_000;
/// How long a back-fill waits for the fold to reach the replica's cursor.
const FOLD_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn lease_kind(o: &ferry_core::protocol::LeaseOutcome) -> &'static str {
    use ferry_core::protocol::LeaseOutcome as L;
    match o {
        L::Granted { .. } => "granted",
        L::Busy { .. } => "busy",
        L::Released { .. } => "released",
        L::Lost { .. } => "lost",
        L::Forbidden { .. } => "forbidden",
    }
}

/// Frames sent per turn of a connection's loop while it catches up.
pub const CATCH_UP_FRAMES: usize = 4;

/// Most rows in one snapshot frame.
const SNAPSHOT_PAGE_ROWS: usize = 4096;

/// Target size of one changes frame (a single change set may exceed it).
const FRAME_BUDGET: usize = 2 << 20;
