//! One client connection: hello and authentication, pushes, live changes, keep-alive.
//!
//! A connection is one task. It reads a frame, handles it to completion (a push is answered
//! only once durable), and between frames sends the change sets sequenced since it last
//! looked, filtered to the token's read scopes. Anything malformed, oversized or forged gets
//! an error frame naming what was wrong and the connection closes; the task owns nothing
//! shared but the store handle, so other connections are unaffected.

use crate::auth::{Grants, Verifier, now_secs};
use crate::catalog::RelayCatalog;
use crate::config::Config;
use crate::error::RelayError;
use crate::metrics as m;
use crate::scoping;
use crate::shadow::Shadow;
use crate::store::{PushOutcome, Store, StoredSet};
use axum::extract::ws::{Message, WebSocket};
use ferry_core::protocol::{
    Ack, ClientMsg, ErrorCode, Limits, Move, PROTOCOL_VERSION, RowKey, ServerMsg,
};
use ferry_core::{ChangeSet, ReplicaId, Sequenced};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What every connection shares.
pub struct Shared {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Tables.
    pub cat: Arc<RelayCatalog>,
    /// Token verification.
    pub verifier: Verifier,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Checksum state, when enabled.
    pub shadow: Option<Arc<Shadow>>,
    /// Fired on shutdown.
    pub shutdown: CancellationToken,
    /// Open connections.
    pub connections: AtomicUsize,
    /// Connection tasks still running (shutdown waits for them).
    pub tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish()
    }
}

impl Shared {
    /// The limits announced to clients.
    pub fn limits(&self) -> Limits {
        let l = &self.cfg.limits;
        Limits {
            max_frame_bytes: l.max_frame_bytes as u64,
            max_change_set_ops: l.max_change_set_ops as u64,
            max_push_sets: l.max_push_sets as u64,
        }
    }
}

/// Why a connection is being closed.
struct Close {
    code: ErrorCode,
    message: String,
}

impl Close {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Close {
            code,
            message: message.into(),
        }
    }
}

impl From<RelayError> for Close {
    fn from(e: RelayError) -> Self {
        if e.code() == ErrorCode::Internal {
            tracing::error!(error = %e, "relay failure while serving a connection");
        }
        Close::new(e.code(), e.client_message())
    }
}

/// Decodes a client frame, telling a version mismatch apart from garbage.
fn decode(bytes: &[u8], max: usize) -> Result<ClientMsg, Close> {
    if bytes.len() > max {
        return Err(Close::new(
            ErrorCode::TooLarge,
            format!(
                "frame of {} bytes exceeds the {max} byte limit",
                bytes.len()
            ),
        ));
    }
    if bytes.len() >= 4 && bytes[..2] == *b"FY" && bytes[2] != PROTOCOL_VERSION {
        return Err(Close::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this relay speaks {PROTOCOL_VERSION}",
                bytes[2]
            ),
        ));
    }
    ClientMsg::decode_limited(bytes, max).map_err(|e| {
        let msg = e.to_string();
        let code = if msg.contains("byte limit") {
            ErrorCode::TooLarge
        } else {
            ErrorCode::BadFrame
        };
        Close::new(code, msg)
    })
}

struct Conn {
    shared: Arc<Shared>,
    ws: WebSocket,
    replica: ReplicaId,
    label: String,
    grants: Arc<Grants>,
    /// Position up to which the client has been told everything.
    told: u64,
    /// Position up to which the log has been examined (nothing visible in `(told, scanned]`).
    scanned: u64,
    readable: HashMap<String, bool>,
    last_frame: Instant,
    bucket: f64,
    bucket_at: Instant,
}

/// Serves one upgraded WebSocket until it closes.
pub async fn serve(shared: Arc<Shared>, mut ws: WebSocket) {
    shared.connections.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
    let result = match handshake(&shared, &mut ws).await {
        Ok((replica, grants, cursor)) => {
            let label = replica.to_string();
            let bucket = f64::from(shared.cfg.limits.frame_burst);
            let mut c = Conn {
                shared: Arc::clone(&shared),
                ws,
                replica,
                label,
                grants: Arc::new(grants),
                told: cursor,
                scanned: cursor,
                readable: HashMap::new(),
                last_frame: Instant::now(),
                bucket,
                bucket_at: Instant::now(),
            };
            let r = c.run().await;
            metrics::gauge!(m::REPLICA_LAG, "replica" => c.label.clone()).set(0.0);
            ws = c.ws;
            r
        }
        Err(close) => Err(close),
    };
    if let Err(close) = result {
        metrics::counter!(m::ERRORS, "code" => close.code.as_str()).increment(1);
        tracing::info!(code = close.code.as_str(), message = %close.message, "closing connection with an error");
        let frame = ServerMsg::Error {
            code: close.code,
            message: close.message,
        };
        if let Ok(b) = frame.encode() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Binary(b.into())))
                    .await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Close(None))).await;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
}

async fn handshake(
    shared: &Arc<Shared>,
    ws: &mut WebSocket,
) -> Result<(ReplicaId, Grants, u64), Close> {
    let max = shared.cfg.limits.max_frame_bytes;
    let first = tokio::select! {
        _ = shared.shutdown.cancelled() => return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down")),
        r = tokio::time::timeout(shared.cfg.limits.hello_timeout, ws.recv()) => match r {
            Err(_) => return Err(Close::new(ErrorCode::BadFrame, "no hello within the time allowed")),
            Ok(None) => return Err(Close::new(ErrorCode::BadFrame, "connection closed before hello")),
            Ok(Some(Err(e))) => return Err(ws_error(e)),
            Ok(Some(Ok(m))) => m,
        }
    };
    let bytes = match first {
        Message::Binary(b) => b,
        other => {
            return Err(Close::new(
                ErrorCode::BadFrame,
                format!("expected a binary hello frame, got {}", kind(&other)),
            ));
        }
    };
    metrics::counter!(m::BYTES_IN).increment(bytes.len() as u64);
    let (protocol, replica_id, token, cursor) = match decode(&bytes, max)? {
        ClientMsg::Hello {
            protocol,
            replica_id,
            token,
            cursor,
            ..
        } => (protocol, replica_id, token, cursor),
        other => {
            return Err(Close::new(
                ErrorCode::BadFrame,
                format!("the first frame must be hello, got {}", other.kind()),
            ));
        }
    };
    if protocol != PROTOCOL_VERSION {
        return Err(Close::new(
            ErrorCode::UnsupportedVersion,
            format!("hello asks for protocol {protocol}; this relay speaks {PROTOCOL_VERSION}"),
        ));
    }
    let grants = shared.verifier.verify(&token)?;
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
    let max_origin_seq = shared.store.max_origin_seq(replica_id).await?;
    let horizon = shared.store.stats().await.map(|s| s.horizon).unwrap_or(0);
    let welcome = ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        head,
        server_time_ms: now_ms(),
        max_origin_seq,
        limits: shared.limits(),
        horizon,
    };
    send_raw(ws, &welcome).await?;
    tracing::debug!(replica = %replica_id, sub = %grants.sub, cursor, head, "replica connected");
    Ok((replica_id, grants, cursor))
}

fn lease_kind(o: &ferry_core::protocol::LeaseOutcome) -> &'static str {
    use ferry_core::protocol::LeaseOutcome as L;
    match o {
        L::Granted { .. } => "granted",
        L::Busy { .. } => "busy",
        L::Released { .. } => "released",
        L::Lost { .. } => "lost",
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "a text frame",
        Message::Binary(_) => "a binary frame",
        Message::Ping(_) => "a ping",
        Message::Pong(_) => "a pong",
        Message::Close(_) => "a close",
    }
}

fn ws_error(e: axum::Error) -> Close {
    let msg = e.to_string();
    if msg.contains("too long") || msg.contains("Space limit") || msg.contains("size") {
        Close::new(ErrorCode::TooLarge, format!("frame too large: {msg}"))
    } else {
        Close::new(ErrorCode::BadFrame, format!("bad websocket frame: {msg}"))
    }
}

async fn send_raw(ws: &mut WebSocket, msg: &ServerMsg) -> Result<(), Close> {
    let b = msg
        .encode()
        .map_err(|e| Close::new(ErrorCode::Internal, format!("cannot encode: {e}")))?;
    metrics::counter!(m::BYTES_OUT).increment(b.len() as u64);
    ws.send(Message::Binary(b.into()))
        .await
        .map_err(|e| Close::new(ErrorCode::BadFrame, format!("connection lost: {e}")))
}

/// Outcome of one turn of the loop.
enum Turn {
    Continue,
    Done,
}

impl Conn {
    async fn run(&mut self) -> Result<(), Close> {
        let mut head = self.shared.store.feed().subscribe();
        // The same leeway as verification, so a token is never refused at hello and then
        // honoured, or the other way round.
        let leeway = self.shared.cfg.auth.leeway.as_secs();
        let until_exp = Duration::from_secs(
            self.grants
                .exp
                .saturating_add(leeway)
                .saturating_sub(now_secs()),
        );
        let expiry = tokio::time::sleep(until_exp);
        tokio::pin!(expiry);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut behind = true;
        loop {
            let turn = tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled() => {
                    return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down; connect again"));
                }
                _ = &mut expiry => {
                    return Err(Close::new(ErrorCode::Unauthorized, "token expired; connect again with a fresh token"));
                }
                frame = self.ws.recv() => self.on_frame(frame).await?,
                r = head.changed() => {
                    if r.is_err() {
                        return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down"));
                    }
                    behind = true;
                    Turn::Continue
                }
                // Catch-up goes a few frames at a time, so frames from the client (pushes,
                // pings) are handled in between: a replica pushes while it pulls.
                _ = std::future::ready(()), if behind => {
                    behind = self.send_changes(false, CATCH_UP_FRAMES).await?;
                    Turn::Continue
                }
                _ = tick.tick() => {
                    if self.last_frame.elapsed() > self.shared.cfg.limits.idle_timeout {
                        return Err(Close::new(ErrorCode::BadFrame, "idle timeout: no frame (not even a ping) received"));
                    }
                    behind = self.send_changes(true, CATCH_UP_FRAMES).await?;
                    Turn::Continue
                }
            };
            if let Turn::Done = turn {
                return Ok(());
            }
        }
    }

    async fn throttle(&mut self) {
        let l = &self.shared.cfg.limits;
        let rate = f64::from(l.frames_per_second);
        let burst = f64::from(l.frame_burst);
        let now = Instant::now();
        self.bucket =
            (self.bucket + now.duration_since(self.bucket_at).as_secs_f64() * rate).min(burst);
        self.bucket_at = now;
        if self.bucket < 1.0 {
            let wait = (1.0 - self.bucket) / rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            self.bucket = 1.0;
            self.bucket_at = Instant::now();
        }
        self.bucket -= 1.0;
    }

    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Result<Turn, Close> {
        let bytes = match frame {
            None | Some(Ok(Message::Close(_))) => return Ok(Turn::Done),
            Some(Err(e)) => return Err(ws_error(e)),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {
                self.last_frame = Instant::now();
                return Ok(Turn::Continue);
            }
            Some(Ok(Message::Text(_))) => {
                return Err(Close::new(
                    ErrorCode::BadFrame,
                    "text frames are not part of the protocol",
                ));
            }
        };
        self.last_frame = Instant::now();
        metrics::counter!(m::BYTES_IN).increment(bytes.len() as u64);
        self.throttle().await;
        match decode(&bytes, self.shared.cfg.limits.max_frame_bytes)? {
            ClientMsg::Hello { .. } => Err(Close::new(ErrorCode::BadFrame, "hello sent twice")),
            ClientMsg::Push { change_sets } => {
                self.push(change_sets).await?;
                Ok(Turn::Continue)
            }
            ClientMsg::Ping { nonce } => {
                // The pong carries the head as of now; what the client has not been sent yet
                // follows (empty progress is flushed first, so a caught-up client's cursor
                // reaches the head at once).
                self.send_changes(true, 1).await?;
                let head = self.shared.store.head().await?;
                self.send(&ServerMsg::Pong { nonce, head }).await?;
                Ok(Turn::Continue)
            }
            ClientMsg::Lease { nonce, request } => {
                ferry_core::lease::validate(&request).map_err(|e| {
                    Close::new(ErrorCode::BadFrame, format!("lease request refused: {e}"))
                })?;
                let outcome = self.shared.store.lease(self.replica, request).await?;
                metrics::counter!(m::LEASES, "outcome" => lease_kind(&outcome)).increment(1);
                self.send(&ServerMsg::Lease { nonce, outcome }).await?;
                Ok(Turn::Continue)
            }
            ClientMsg::Checksum { nonce } => {
                let Some(shadow) = self.shared.shadow.clone() else {
                    return Err(Close::new(
                        ErrorCode::Internal,
                        "checksums are disabled on this relay (checksums.enabled = false)",
                    ));
                };
                // Everything this connection was told about is in the state summed.
                self.send_changes(true, 1).await?;
                shadow.catch_up(&self.shared.store, Some(self.told)).await?;
                let grants = Arc::clone(&self.grants);
                let (position, sum) = tokio::task::spawn_blocking(move || shadow.checksum(&grants))
                    .await
                    .map_err(|e| {
                        Close::new(ErrorCode::Internal, format!("checksum failed: {e}"))
                    })??;
                self.send(&ServerMsg::Checksum {
                    nonce,
                    position,
                    digest: sum.digest,
                    rows: sum.rows,
                })
                .await?;
                Ok(Turn::Continue)
            }
        }
    }

    async fn push(&mut self, sets: Vec<ChangeSet>) -> Result<(), Close> {
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
        let horizon_ms = now_ms() + limits.max_clock_skew.as_millis() as u64;
        let mut valid = Vec::with_capacity(sets.len());
        let mut refusal: Option<(u64, RelayError)> = None;
        for cs in sets {
            if cs.hlc.millis() > horizon_ms {
                refusal = Some((
                    cs.origin_seq,
                    RelayError::ClockSkew(format!(
                        "change set {} is stamped {} ms ahead of the relay's clock; the limit is {} ms",
                        cs.origin_seq,
                        cs.hlc.millis().saturating_sub(now_ms()),
                        limits.max_clock_skew.as_millis()
                    )),
                ));
                break;
            }
            if let Err(e) = scoping::validate(&self.shared.cat, &cs, limits.max_change_set_ops) {
                refusal = Some((cs.origin_seq, e));
                break;
            }
            valid.push(cs);
        }
        let mut acks = Vec::new();
        if !valid.is_empty() {
            let oseqs: Vec<u64> = valid.iter().map(|c| c.origin_seq).collect();
            let outcomes = self
                .shared
                .store
                .push(Arc::clone(&self.grants), valid)
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
            self.send(&ServerMsg::Acks { acks }).await?;
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
            self.send(&ServerMsg::Refused {
                origin_seq,
                code,
                message: e.to_string(),
                conflict_seq,
            })
            .await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: &ServerMsg) -> Result<(), Close> {
        send_raw(&mut self.ws, msg).await
    }

    fn can_read(&mut self, scope: &str) -> bool {
        if let Some(v) = self.readable.get(scope) {
            return *v;
        }
        let v = self.grants.can_read(scope);
        if self.readable.len() < 10_000 {
            self.readable.insert(scope.to_owned(), v);
        }
        v
    }

    /// Sends what was sequenced since the client was last told, at most `frames` frames.
    /// With `flush`, once caught up, also tells it about positions with nothing visible (so
    /// its cursor catches up). Returns true while more remains to send.
    async fn send_changes(&mut self, flush: bool, frames: usize) -> Result<bool, Close> {
        let store = Arc::clone(&self.shared.store);
        let mut sent = 0;
        loop {
            let head = store.feed().head();
            if self.scanned >= head {
                break;
            }
            if sent >= frames {
                return Ok(true);
            }
            let batch = match store.feed().window_after(self.scanned, 512) {
                Some(b) if !b.is_empty() => b,
                _ => store.read(self.scanned, 512, 4 << 20).await?,
            };
            if batch.is_empty() {
                break;
            }
            let (sets, moves, consumed) = self.filter(&batch, FRAME_BUDGET).await?;
            let up_to = batch
                .get(consumed.saturating_sub(1))
                .map_or(self.scanned, |s| s.server_seq);
            self.scanned = up_to;
            if sets.is_empty() && moves.is_empty() {
                continue;
            }
            let n = sets.len();
            self.send(&ServerMsg::Changes {
                after: self.told,
                up_to,
                change_sets: sets,
                head,
                moves,
            })
            .await?;
            metrics::counter!(m::SETS_OUT).increment(n as u64);
            self.told = up_to;
            sent += 1;
        }
        if flush && self.told < self.scanned {
            let up_to = self.scanned;
            self.send(&ServerMsg::Changes {
                after: self.told,
                up_to,
                change_sets: Vec::new(),
                head: store.feed().head(),
                moves: Vec::new(),
            })
            .await?;
            self.told = up_to;
        }
        let lag = store.feed().head().saturating_sub(self.told);
        metrics::gauge!(m::REPLICA_LAG, "replica" => self.label.clone()).set(lag as f64);
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
                let now = self.can_read(&tag.scope);
                let before = match &tag.moved_from {
                    Some(from) => self.can_read(from),
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

/// Frames sent per turn of a connection's loop while it catches up.
const CATCH_UP_FRAMES: usize = 4;

/// Target size of one changes frame (a single change set may exceed it).
const FRAME_BUDGET: usize = 2 << 20;
