//! A bare protocol client: frames written and read by hand, for hostile-input and fan-out
//! tests that must send what a well-behaved client never would.

use ferry_core::ReplicaId;
use ferry_core::protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A client WebSocket.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `url`.
pub async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connect")
        .0
}

/// A `Hello` frame at `cursor`.
pub fn hello(replica: ReplicaId, token: &str, cursor: u64) -> ClientMsg {
    ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        replica_id: replica,
        token: token.to_owned(),
        cursor,
        schema_version: 1,
        snapshots: false,
        resume: None,
        subscriptions: None,
        held: None,
    }
}

/// Sends a frame.
pub async fn send(ws: &mut Ws, m: &ClientMsg) {
    ws.send(Message::Binary(m.encode().unwrap().into()))
        .await
        .unwrap();
}

/// Sends raw bytes as one binary message (errors ignored: the relay may have closed).
pub async fn send_bytes(ws: &mut Ws, b: Vec<u8>) {
    let _ = ws.send(Message::Binary(b.into())).await;
}

/// Next server frame (None when the connection closed or nothing came in 10 s).
pub async fn recv(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??;
        match next {
            Ok(Message::Binary(b)) => {
                return Some(ServerMsg::decode(&b).expect("server frame"));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Reads frames until an error frame (returned) or the end.
pub async fn recv_error(ws: &mut Ws) -> Option<(ferry_core::protocol::ErrorCode, String)> {
    while let Some(m) = recv(ws).await {
        if let ServerMsg::Error { code, message } = m {
            return Some((code, message));
        }
    }
    None
}

/// A one-row change set as a (possibly hostile) client would craft it: an upsert for odd
/// `cl`, a delete for even, stamped now.
pub fn change_set(
    origin: ReplicaId,
    oseq: u64,
    table: &str,
    pk: &str,
    cl: u64,
    cells: Vec<ferry_core::Cell>,
) -> ferry_core::ChangeSet {
    let b = crate::change::change_set(origin, oseq);
    if cl % 2 == 1 {
        b.upsert(table, pk, cl, cells)
    } else {
        b.delete(table, pk, cl)
    }
    .build()
}

/// True when the server closed the connection (no further frames).
pub async fn closed(ws: &mut Ws) -> bool {
    recv(ws).await.is_none()
}
