//! A sync connection's socket: opening it (with the socket options the app chose) and its
//! write half on a task of its own.
//!
//! Why a separate writer: a loop that awaits its own sends stops reading while a send waits
//! for room. With a large backlog both ends can then wait at once — the client blocked writing
//! pushes, the relay blocked writing the echoes and acknowledgements of earlier ones, neither
//! reading — and the connection stalls for good once more bytes are in flight than the two
//! socket buffers hold. Here the session loop hands frames to [`Outbox`] and goes back to
//! reading at once; how much it hands over is bounded by the push window (see
//! [`crate::sync::SyncClient::with_window`]) plus a few small control frames.

use crate::protocol::ClientMsg;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    /// The URL is not a WebSocket URL with a host.
    #[error("bad relay url `{url}`: {why}")]
    Url { url: String, why: String },
    /// TCP, TLS or the WebSocket handshake failed.
    #[error("cannot connect to {url}: {why}")]
    Connect { url: String, why: String },
    /// The writer stopped: the connection is gone.
    #[error("connection lost: {0}")]
    Lost(String),
    /// A frame could not be encoded.
    #[error("cannot encode a frame: {0}")]
    Encode(String),
}

/// Opens a WebSocket to `url`; `buffer` sets the TCP send and receive buffers (`None`: the
/// kernel's autotuning).
/// The upgrade request carries `token` (`Authorization: Bearer`), so that the relay lets
/// the connection send full-size frames before its hello is verified. `tls` decides which
/// certificates a `wss://` relay may present (see [`crate::tls`]).
pub(crate) async fn open(
    url: &str,
    config: WebSocketConfig,
    buffer: Option<usize>,
    token: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Ws, SocketError> {
    let bad = |why: String| SocketError::Url {
        url: url.to_owned(),
        why,
    };
    let mut request = url.into_client_request().map_err(|e| bad(e.to_string()))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| bad("the token cannot be sent in an HTTP header".into()))?;
    request.headers_mut().insert(
        tokio_tungstenite::tungstenite::http::header::AUTHORIZATION,
        bearer,
    );
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let failed = |why: String| SocketError::Connect {
        url: url.to_owned(),
        why,
    };
    let tcp = connect_tcp(&host, port, buffer)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
        request,
        tcp,
        Some(config),
        Some(connector),
    )
    .await
    .map_err(|e| failed(e.to_string()))?;
    Ok(ws)
}

async fn connect_tcp(host: &str, port: u16, buffer: Option<usize>) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(n) = buffer {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            socket.set_send_buffer_size(n)?;
            socket.set_recv_buffer_size(n)?;
        }
        match socket.connect(addr).await {
            Ok(s) => {
                // Frames are small and often back to back: no Nagle delay.
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
    }))
}

/// The write half of a connection, on its own task.
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Message>,
    writer: JoinHandle<Result<(), String>>,
}

impl Outbox {
    /// Splits `ws`: the returned stream is the read half; frames given to the outbox are
    /// written in order by a task of the current runtime.
    pub(crate) fn start(ws: Ws) -> (Outbox, SplitStream<Ws>) {
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_all(sink, rx));
        (Outbox { tx, writer }, stream)
    }

    /// Queues a frame (never waits on the network).
    pub(crate) fn send(&self, msg: &ClientMsg) -> Result<(), SocketError> {
        let bytes = msg
            .encode()
            .map_err(|e| SocketError::Encode(e.to_string()))?;
        self.tx
            .send(Message::Binary(bytes.into()))
            .map_err(|_| SocketError::Lost("the connection's writer stopped".into()))
    }

    /// Resolves when the writer stopped (the connection failed, or it was closed).
    pub(crate) async fn stopped(&mut self) -> SocketError {
        match (&mut self.writer).await {
            Ok(Ok(())) => SocketError::Lost("the connection closed".into()),
            Ok(Err(e)) => SocketError::Lost(e),
            Err(e) => SocketError::Lost(format!("the connection's writer failed: {e}")),
        }
    }

    /// Sends a close frame after what is queued and waits (briefly) for it to go out.
    pub(crate) async fn close(self) {
        let _ = self.tx.send(Message::Close(None));
        drop(self.tx);
        let mut writer = self.writer;
        if tokio::time::timeout(Duration::from_secs(1), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
}

async fn write_all(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Message>,
) -> Result<(), String> {
    while let Some(m) = rx.recv().await {
        let mut close = matches!(m, Message::Close(_));
        sink.feed(m).await.map_err(|e| e.to_string())?;
        // Whatever else is queued goes out in the same flush.
        while !close && let Ok(m) = rx.try_recv() {
            close = matches!(m, Message::Close(_));
            sink.feed(m).await.map_err(|e| e.to_string())?;
        }
        sink.flush().await.map_err(|e| e.to_string())?;
        if close {
            break;
        }
    }
    let _ = sink.close().await;
    Ok(())
}
