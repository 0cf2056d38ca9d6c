//! A connection's write half, on its own task, behind a bounded queue.
//!
//! The session loop queues its answers and goes back to reading: a client pushing a large
//! backlog is read, sequenced and acknowledged while earlier acknowledgements and change sets
//! are still on their way out. The queue is bounded in bytes ([`QUEUE_BYTES`], plus at most
//! one frame larger than that): when a client stops reading, queueing waits, so the session
//! stops reading too and its catch-up stops reading the store — a slow reader is paused and
//! resumed from the log where it was, never buffered without bound.

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// Bytes a connection may have queued for writing.
pub const QUEUE_BYTES: usize = 1 << 20;

type Item = (Message, Option<OwnedSemaphorePermit>);

/// The write half of a connection.
pub struct Outbox {
    tx: mpsc::UnboundedSender<Item>,
    room: Arc<Semaphore>,
    writer: JoinHandle<()>,
    /// Why the writer stopped, once it has.
    stopped: watch::Receiver<Option<String>>,
}

impl Outbox {
    /// Splits `ws`: the returned stream is the read half.
    pub fn start(ws: WebSocket) -> (Outbox, SplitStream<WebSocket>) {
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, stopped) = watch::channel(None);
        let writer = tokio::spawn(async move {
            let why = match write_all(sink, rx).await {
                Ok(()) => "the connection closed".to_owned(),
                Err(e) => e,
            };
            let _ = done.send(Some(why));
        });
        let room = Arc::new(Semaphore::new(QUEUE_BYTES));
        (
            Outbox {
                tx,
                room,
                writer,
                stopped,
            },
            stream,
        )
    }

    /// Queues a binary frame, waiting while the queue is full (the client is not reading).
    /// False when the writer has stopped.
    pub async fn send(&self, bytes: Vec<u8>) -> bool {
        let want = u32::try_from(bytes.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        let Ok(permit) = Arc::clone(&self.room).acquire_many_owned(want).await else {
            return false;
        };
        self.tx
            .send((Message::Binary(bytes.into()), Some(permit)))
            .is_ok()
    }

    /// Waits until at least a quarter of the queue is free: what catch-up waits for before
    /// reading more of the log for this client.
    pub async fn room(&self) {
        let quarter = u32::try_from(QUEUE_BYTES / 4).unwrap_or(u32::MAX);
        drop(self.room.acquire_many(quarter).await);
    }

    /// Resolves when the writer stopped (the socket failed).
    pub async fn stopped(&self) -> String {
        let mut rx = self.stopped.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the connection's writer failed".into(),
        }
    }

    /// Queues `last` (if any) and a close frame after what is queued, and waits up to two
    /// seconds for them to go out.
    pub async fn close(self, last: Option<Vec<u8>>) {
        if let Some(b) = last {
            let _ = self.tx.send((Message::Binary(b.into()), None));
        }
        let _ = self.tx.send((Message::Close(None), None));
        drop(self.tx);
        let mut writer = self.writer;
        if tokio::time::timeout(Duration::from_secs(2), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
}

async fn write_all(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Item>,
) -> Result<(), String> {
    while let Some((m, permit)) = rx.recv().await {
        let mut close = matches!(m, Message::Close(_));
        sink.feed(m).await.map_err(|e| e.to_string())?;
        drop(permit);
        // Whatever else is queued goes out in the same flush.
        while !close && let Ok((m, permit)) = rx.try_recv() {
            close = matches!(m, Message::Close(_));
            sink.feed(m).await.map_err(|e| e.to_string())?;
            drop(permit);
        }
        sink.flush().await.map_err(|e| e.to_string())?;
        if close {
            break;
        }
    }
    let _ = sink.close().await;
    Ok(())
}
