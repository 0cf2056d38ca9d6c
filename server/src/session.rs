//! One client connection over a WebSocket: the socket, timers and rate limit around an
//! [`Endpoint`] (which decides what to answer).
//!
//! A connection is one task. It reads a frame, handles it to completion (a push is answered
//! only once durable), and between frames sends the change sets sequenced since it last
//! looked, filtered to the token's read scopes. Anything malformed, oversized or forged gets
//! an error frame naming what was wrong and the connection closes; the task owns nothing
//! shared but the store handle, so other connections are unaffected.

use crate::auth::now_secs;
use crate::bucket::Bucket;
use crate::endpoint::{CATCH_UP_FRAMES, Close, Endpoint, decode};
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::state::RelayState;
use axum::extract::ws::{Message, WebSocket};
use ferry_core::protocol::{ErrorCode, ServerMsg};
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

struct Conn {
    ep: Endpoint,
    ws: SplitStream<WebSocket>,
    out: Outbox,
    last_frame: Instant,
    /// Frames (protocol frames and WebSocket pings and pongs alike).
    frames: Bucket,
}

/// Serves one upgraded WebSocket until it closes. The caller counted it in
/// `RelayState::connections` (admission is one atomic step there); it is uncounted here.
pub async fn serve(shared: Arc<RelayState>, mut ws: WebSocket) {
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    metrics::counter!(m::CONNECTIONS_TOTAL).increment(1);
    let handshake = handshake(&shared, &mut ws).await;
    let (out, result) = match handshake {
        Ok(ep) => {
            let l = &shared.cfg.limits;
            let frames = Bucket::new(f64::from(l.frames_per_second), f64::from(l.frame_burst));
            let (out, read) = Outbox::start(ws);
            let mut c = Conn {
                ep,
                ws: read,
                out,
                last_frame: Instant::now(),
                frames,
            };
            let r = c.run().await;
            shared.sessions.end(c.ep.replica(), c.ep.session());
            (c.out, r)
        }
        Err(close) => (Outbox::start(ws).0, Err(close)),
    };
    let last = result.err().and_then(|close| {
        metrics::counter!(m::ERRORS, "code" => close.code.as_str()).increment(1);
        tracing::info!(code = close.code.as_str(), message = %close.message, "closing connection with an error");
        ServerMsg::Error {
            code: close.code,
            message: close.message,
        }
        .encode()
        .ok()
    });
    out.close(last).await;
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!(m::CONNECTIONS).decrement(1.0);
}

async fn handshake(shared: &Arc<RelayState>, ws: &mut WebSocket) -> Result<Endpoint, Close> {
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
    let (ep, welcome) = Endpoint::open(shared, decode(&bytes, max)?).await?;
    send_raw(ws, &welcome).await?;
    Ok(ep)
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

/// A WebSocket error as a close: a frame or message over the size limit is `TooLarge` (told
/// by the error's type, which axum wraps), anything else a `BadFrame`.
fn ws_error(e: axum::Error) -> Close {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(c)) => {
            Close::new(ErrorCode::TooLarge, format!("frame too large: {c}"))
        }
        _ => Close::new(ErrorCode::BadFrame, format!("bad websocket frame: {inner}")),
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
        let shared = Arc::clone(self.ep.shared());
        let mut head = shared.store.feed().subscribe();
        // The same leeway as verification, so a token is never refused at hello and then
        // honoured, or the other way round.
        let leeway = shared.cfg.auth.leeway.as_secs();
        let until_exp = Duration::from_secs(
            self.ep
                .grants()
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
                _ = shared.shutdown.cancelled() => {
                    return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down; connect again"));
                }
                _ = &mut expiry => {
                    return Err(Close::new(ErrorCode::Unauthorized, "token expired; connect again with a fresh token"));
                }
                e = self.out.stopped() => {
                    tracing::debug!(error = %e, "connection lost while writing");
                    return Ok(());
                }
                frame = self.ws.next() => self.on_frame(frame).await?,
                r = head.changed() => {
                    if r.is_err() {
                        return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down"));
                    }
                    behind = true;
                    Turn::Continue
                }
                // Catch-up goes a few frames at a time, so frames from the client (pushes,
                // pings) are handled in between: a replica pushes while it pulls.
                // Only while the client reads what it was sent (see `outbox`).
                _ = self.out.room(), if behind => {
                    behind = self.changes(false, CATCH_UP_FRAMES).await?;
                    Turn::Continue
                }
                _ = tick.tick() => {
                    if self.last_frame.elapsed() > shared.cfg.limits.idle_timeout {
                        return Err(Close::new(ErrorCode::BadFrame, "idle timeout: no frame (not even a ping) received"));
                    }
                    behind = self.changes(true, CATCH_UP_FRAMES).await?;
                    Turn::Continue
                }
            };
            if let Turn::Done = turn {
                return Ok(());
            }
        }
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
                // Pings are answered as they are read: they share the frame rate.
                self.last_frame = Instant::now();
                self.frames.take().await;
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
        self.frames.take().await;
        // Decoding and sequencing a frame takes a few times its size; frames being handled
        // at once share one budget, so a hundred devices pushing backlogs together wait
        // their turn (unread) rather than each holding a window's worth in memory.
        let shared = Arc::clone(self.ep.shared());
        let cost = u32::try_from(bytes.len())
            .unwrap_or(u32::MAX)
            .min(shared.cfg.limits.push_memory_bytes.min(u32::MAX as usize) as u32);
        let memory = tokio::select! {
            p = shared.frame_memory.acquire_many(cost) => p.map_err(|_| Close::new(ErrorCode::ShuttingDown, "the relay is shutting down"))?,
            _ = shared.shutdown.cancelled() => return Err(Close::new(ErrorCode::ShuttingDown, "the relay is shutting down; connect again")),
        };
        let msg = decode(&bytes, shared.cfg.limits.max_frame_bytes)?;
        drop(bytes);
        let replies = self.ep.handle(msg).await?;
        // Answers wait for the client to read them, which must not hold up other pushes.
        drop(memory);
        for reply in replies {
            self.send(&reply).await?;
        }
        Ok(Turn::Continue)
    }

    /// Sends what was sequenced since the client was last told (see [`Endpoint::changes`]).
    async fn changes(&mut self, flush: bool, frames: usize) -> Result<bool, Close> {
        let mut out = Vec::new();
        let more = self.ep.changes(flush, frames, &mut out).await?;
        for msg in &out {
            self.send(msg).await?;
        }
        Ok(more)
    }

    /// Queues a frame for the writer (waits while the client is not reading).
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), Close> {
        let b = msg
            .encode()
            .map_err(|e| Close::new(ErrorCode::Internal, format!("cannot encode: {e}")))?;
        metrics::counter!(m::BYTES_OUT).increment(b.len() as u64);
        if self.out.send(b).await {
            Ok(())
        } else {
            Err(Close::new(ErrorCode::BadFrame, "connection lost"))
        }
    }
}
