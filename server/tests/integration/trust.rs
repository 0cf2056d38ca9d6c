//! Trust: what a token lets its bearer do to others. A replica id is bound to the subject it
//! first connected as; pushing needs a write grant; leases need one too, and tell a token
//! without it nothing; metrics publish no replica ids. Real relay processes, raw protocol
//! frames for the attacker's side.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::ReplicaId;
use ferry_core::protocol::{ClientMsg, ErrorCode, LeaseOutcome, LeaseRequest, ServerMsg};
use ferry_testkit::relay::*;
use std::time::Duration;

fn hour() -> Duration {
    Duration::from_secs(3600)
}

async fn welcomed(url: &str, replica: ReplicaId, token: &str) -> raw::Ws {
    let mut ws = raw::connect(url).await;
    raw::send(&mut ws, &raw::hello(replica, token, 0)).await;
    loop {
        match raw::recv(&mut ws).await {
            Some(ServerMsg::Welcome { .. }) => return ws,
            Some(ServerMsg::Error { code, message }) => panic!("refused: {code:?} {message}"),
            Some(_) => continue,
            None => panic!("closed before the welcome"),
        }
    }
}

async fn lease(ws: &mut raw::Ws, request: LeaseRequest) -> LeaseOutcome {
    raw::send(ws, &ClientMsg::Lease { nonce: 5, request }).await;
    loop {
        match raw::recv(ws).await {
            Some(ServerMsg::Lease { nonce: 5, outcome }) => return outcome,
            Some(ServerMsg::Error { code, message }) => panic!("closed: {code:?} {message}"),
            Some(_) => continue,
            None => panic!("closed before the lease answer"),
        }
    }
}

/// The refusal answering a push (acks or a closed connection fail the test).
async fn refusal(ws: &mut raw::Ws) -> (u64, ErrorCode, String) {
    loop {
        match raw::recv(ws).await {
            Some(ServerMsg::Refused {
                origin_seq,
                code,
                message,
                ..
            }) => return (origin_seq, code, message),
            Some(ServerMsg::Acks { acks }) => panic!("acked: {acks:?}"),
            Some(_) => continue,
            None => panic!("closed before the refusal"),
        }
    }
}

/// Pushes `change_sets` and returns the refusal answering them.
async fn push_refused(
    ws: &mut raw::Ws,
    change_sets: Vec<ferry_core::ChangeSet>,
) -> (u64, ErrorCode, String) {
    raw::send(ws, &ClientMsg::Push { change_sets }).await;
    refusal(ws).await
}

fn acquire(name: &str) -> LeaseRequest {
    LeaseRequest::Acquire {
        name: name.into(),
        ttl_ms: 60_000,
    }
}

/// The takeover found in review: a token with no scopes said hello under a device's id,
/// superseded its connection, had an empty change set acked at its next `origin_seq` and
/// took its lease. Now the hello is refused (`identity_mismatch`) before any of that; the
/// device keeps its connection, its sequence and its lease.
#[test]
fn another_subject_cannot_speak_as_a_replica() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let device = open(d.path(), "device.db");
    let me = device.replica_id().unwrap();
    let alice = token_for(
        "alice",
        &["list:a", "lease:*"],
        &["list:a", "lease:*"],
        hour(),
    );
    let h = connect(&device, &url, alice);
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('t1', 'list:a', 'x')",
            &[],
        )
        .unwrap();
    wait_synced(&h);
    let sdk = ferry_core::transport::runtime().unwrap();
    let lease_held = sdk
        .block_on(h.acquire_lease("lease:payroll", Duration::from_secs(60)))
        .unwrap();
    let connects = h.status().connects;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mallory = token_for("mallory", &[], &[], hour());
        let mut ws = raw::connect(&url).await;
        raw::send(&mut ws, &raw::hello(me, &mallory, 0)).await;
        let (code, message) = raw::recv_error(&mut ws).await.unwrap();
        assert_eq!(code, ErrorCode::IdentityMismatch, "{message}");
        assert!(raw::closed(&mut ws).await);
        // Even with every grant, another subject is not the device.
        let admin = admin_token("mallory");
        let mut ws = raw::connect(&url).await;
        raw::send(&mut ws, &raw::hello(me, &admin, 0)).await;
        assert_eq!(
            raw::recv_error(&mut ws).await.unwrap().0,
            ErrorCode::IdentityMismatch
        );
    });
    // The device was not superseded: same connection, it still pushes, its lease holds.
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('t2', 'list:a', 'y')",
            &[],
        )
        .unwrap();
    wait_synced(&h);
    assert_eq!(
        h.status().connects,
        connects,
        "the device kept its connection"
    );
    assert!(h.status().refused.is_none());
    assert_eq!(device.replica_id().unwrap(), me, "no rotation was forced");
    sdk.block_on(h.renew_lease(&lease_held, Duration::from_secs(60)))
        .unwrap();
}

/// Another user signing in on the same replica file: the relay refuses the old id under the
/// new subject, the SDK takes a new id, and syncing goes on (the new user's writes upload).
#[test]
fn a_new_user_on_the_same_file_takes_a_new_id() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let device = open(d.path(), "device.db");
    let first = device.replica_id().unwrap();
    let h = connect(&device, &relay.url(), admin_token("alice"));
    wait_synced(&h);
    drop(h);
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('b1', 'l', 'x')",
            &[],
        )
        .unwrap();
    let h = connect(&device, &relay.url(), admin_token("bob"));
    wait_synced(&h);
    let second = device.replica_id().unwrap();
    assert_ne!(first, second, "a new id for bob");
    assert_eq!(device.pending_count().unwrap(), 0, "bob's write uploaded");
    // And the new id is bob's from now on: alice may not use it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = raw::connect(&relay.url()).await;
        raw::send(&mut ws, &raw::hello(second, &admin_token("alice"), 0)).await;
        assert_eq!(
            raw::recv_error(&mut ws).await.unwrap().0,
            ErrorCode::IdentityMismatch
        );
    });
}

/// A token without write grants stores nothing: 10,240 empty change sets from a read-only
/// token were acked in review, each moving every client's positions. Now the first is
/// refused (`forbidden`) and the head does not move.
#[test]
fn a_read_only_token_stores_nothing() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reader = ReplicaId([7; 16]);
        let tok = token_for("reader", &["*"], &[], hour());
        let mut ws = welcomed(&url, reader, &tok).await;
        let empty: Vec<_> = (1..=64)
            .map(|i| ferry_testkit::change::change_set(reader, i).build())
            .collect();
        let (origin_seq, code, message) = push_refused(&mut ws, empty).await;
        assert_eq!((origin_seq, code), (1, ErrorCode::Forbidden), "{message}");
        assert!(message.contains("no write scopes"), "{message}");
        raw::send(&mut ws, &ClientMsg::Ping { nonce: 1 }).await;
        loop {
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Pong { head, .. }) => {
                    assert_eq!(head, 0, "nothing was stored");
                    break;
                }
                Some(_) => continue,
                None => panic!("closed"),
            }
        }
    });
}

/// Leases need a write grant covering their name. A read-only token was granted
/// `payroll-leader` for a day in review, and probing another's lease told its remaining
/// time; now both get `Forbidden`, which says nothing of the lease, and leave no row.
#[test]
fn leases_need_a_grant_and_tell_others_nothing() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let holder = ReplicaId([1; 16]);
        let granted = token_for("holder", &["lease:*"], &["lease:*"], hour());
        let mut ws = welcomed(&url, holder, &granted).await;
        assert!(matches!(
            lease(&mut ws, acquire("lease:payroll")).await,
            LeaseOutcome::Granted { token: 1, .. }
        ));
        // Outside its grant, even the holder's token is refused.
        assert!(matches!(
            lease(&mut ws, acquire("payroll-leader")).await,
            LeaseOutcome::Forbidden { .. }
        ));
        let prober = ReplicaId([2; 16]);
        let read_only = token_for("prober", &["*"], &[], hour());
        let mut ws2 = welcomed(&url, prober, &read_only).await;
        for name in ["lease:payroll", "payroll-leader", "lease:unused"] {
            match lease(&mut ws2, acquire(name)).await {
                LeaseOutcome::Forbidden { name: n } => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        // A writer of other scopes is refused as well, and the holder's grant stands.
        let other = token_for("other", &["list:*"], &["list:*"], hour());
        let mut ws3 = welcomed(&url, ReplicaId([3; 16]), &other).await;
        assert!(matches!(
            lease(&mut ws3, acquire("lease:payroll")).await,
            LeaseOutcome::Forbidden { .. }
        ));
        assert!(matches!(
            lease(
                &mut ws,
                LeaseRequest::Renew {
                    name: "lease:payroll".into(),
                    token: 1,
                    ttl_ms: 60_000,
                }
            )
            .await,
            LeaseOutcome::Granted { token: 1, .. }
        ));
    });
    let v = relay.metric("ferry_lease_requests_total{outcome=\"forbidden\"}");
    assert!(v >= 5.0, "forbidden lease requests counted: {v}");
}

/// A refusal names no scope the token cannot read: a `list:a` writer touching a row that lives
/// in `list:b` learns that it may not write that row, not where the row lives.
#[test]
fn refusals_name_no_scope_the_token_cannot_read() {
    use ferry_core::Cell;
    use ferry_core::Value;
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let ha = connect(&admin, &url, admin_token("admin"));
    admin
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('secret-1', 'list:bob-private', 'x')",
            &[],
        )
        .unwrap();
    wait_synced(&ha);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let me = ReplicaId([4; 16]);
        let tok = token_for("alice", &["list:a"], &["list:a"], hour());
        let mut ws = welcomed(&url, me, &tok).await;
        let cs = raw::change_set(
            me,
            1,
            "todo",
            "secret-1",
            1,
            vec![
                Cell::Set("list".into(), Value::Text("list:a".into())),
                Cell::Set("title".into(), Value::Text("mine now".into())),
            ],
        );
        let (_, code, message) = push_refused(&mut ws, vec![cs]).await;
        assert_eq!(code, ErrorCode::Forbidden, "{message}");
        assert!(!message.contains("bob"), "the scope leaked: {message}");
        assert!(message.contains("may not be written"), "{message}");
    });
}

/// A row written into an 80 KB scope (which a backtracking matcher took 21.6 s of relay CPU
/// to match against readers' patterns) is refused: scopes are at most 512 bytes.
#[test]
fn a_scope_longer_than_the_limit_is_refused() {
    use ferry_core::{Cell, Value};
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let me = ReplicaId([5; 16]);
        let tok = token_for("w", &["list:*"], &["list:*"], hour());
        let mut ws = welcomed(&url, me, &tok).await;
        let huge = format!("list:{}", "z:".repeat(40_000));
        let cs = raw::change_set(
            me,
            1,
            "todo",
            "t1",
            1,
            vec![
                Cell::Set("list".into(), Value::Text(huge)),
                Cell::Set("title".into(), Value::Text("x".into())),
            ],
        );
        let (_, code, message) = push_refused(&mut ws, vec![cs]).await;
        assert_eq!(code, ErrorCode::InvalidChangeSet, "{message}");
        assert!(message.contains("at most 512"), "{message}");
    });
}

/// Sockets count against `max_connections` from the moment they are accepted, and headers
/// must arrive within `header_timeout`. In review, 1,500 sockets sending partial headers
/// outlived every timeout, bare ones were never closed, and none counted toward the limit.
/// Here 1,000 such sockets against a limit of 50: those over the limit are closed at once,
/// the rest when their headers time out, and a good client then connects and syncs.
#[test]
fn slow_and_bare_sockets_are_counted_and_closed() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nmax_connections = 50\nheader_timeout = \"1s\"\n",
    );
    let mut socks = Vec::new();
    for i in 0..1_000 {
        let Ok(mut s) = std::net::TcpStream::connect(relay.addr) else {
            continue;
        };
        if i % 2 == 0 {
            // Slowloris: a request line and part of the headers, never finished.
            let _ = s.write_all(b"GET /sync HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        }
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        socks.push(s);
    }
    assert!(socks.len() > 900, "only {} sockets connected", socks.len());
    // Every one of them is closed by the relay: at once over the limit, after the header
    // timeout below it (a read then returns end of file or a reset, never times out).
    let started = std::time::Instant::now();
    for s in &mut socks {
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) if started.elapsed() < Duration::from_secs(9) => break,
                Ok(0) => break,
                Ok(_) => continue, // a 408 answer to the slow request, then the close
                Err(e) => panic!("a socket outlived the header timeout: {e}"),
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closing took {:?}",
        started.elapsed()
    );
    // Fewer than 950: the first ones' headers time out (freeing places) while the rest are
    // still being opened.
    let refused = relay.metric("ferry_sockets_refused_total{limit=\"total\"}");
    assert!(refused >= 500.0, "sockets over the limit: {refused}");
    drop(socks);
    one_row_synced(d.path(), &relay.url(), "good");
}

/// A device in `dir` writes one row as `sub` and syncs it through the relay at `url`.
fn one_row_synced(dir: &std::path::Path, url: &str, sub: &str) {
    let device = open(dir, "device.db");
    let h = connect(&device, url, admin_token(sub));
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('t', 'l', 'x')",
            &[],
        )
        .unwrap();
    wait_synced(&h);
}

/// Writes an upgrade request (with `token` as `Authorization: Bearer` when given) and reads
/// the relay's answer head; true when it switched protocols.
fn raw_upgrade(s: &mut std::net::TcpStream, token: Option<&str>) -> bool {
    use std::io::{Read, Write};
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "GET /sync HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return false,
        }
    }
    head.starts_with(b"HTTP/1.1 101")
}

/// A masked binary frame header announcing `len` payload bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x82, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// Before its hello is verified, a connection may only send small frames (64 KiB), unless
/// its upgrade presented a valid token. The review's attack: 100 unauthenticated sockets
/// each sending 7 MiB of an unfinished frame raised the relay's memory by ~730 MB; now each
/// is closed at the frame's header and the relay's peak memory stays flat. A token on the
/// upgrade (as the SDK sends) still allows full-size frames.
#[test]
fn unauthenticated_sockets_cannot_make_the_relay_buffer_large_frames() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let before = relay.memory_kib("VmHWM");
    let chunk = vec![0u8; 256 << 10];
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let addr = relay.addr;
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                assert!(raw_upgrade(&mut s, None), "upgrade refused");
                let mut sent = 0usize;
                if s.write_all(&frame_header(7 << 20)).is_ok() {
                    while sent < 7 << 20 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                        sent += chunk.len();
                    }
                }
                sent
            })
        })
        .collect();
    let sent: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let grown_mib = relay.memory_kib("VmHWM").saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "peak memory grew by {grown_mib} MiB for 100 unauthenticated frames (sent {:?} bytes of the first)",
        sent.first()
    );
    assert!(
        relay.metric("ferry_errors_total{code=\"too_large\"}") >= 1.0
            || sent.iter().any(|s| *s < 7 << 20),
        "the frames were refused"
    );
    // With a valid token on the upgrade, a frame above 64 KiB is read (and answered as the
    // protocol says: this one is no valid hello, so `bad_frame`, not `too_large`).
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    assert!(raw_upgrade(&mut s, Some(&admin_token("ok"))));
    let len = 200 << 10;
    s.write_all(&frame_header(len as u64)).unwrap();
    s.write_all(&vec![0u8; len]).unwrap();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("bad_frame"), "{text}");
    assert!(!text.contains("too_large"), "{text}");
    // And the SDK, which presents its token, pushes a transaction of about 1 MiB.
    let device = open(d.path(), "device.db");
    let h = connect(&device, &relay.url(), admin_token("dev"));
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('big', 'l', ?1)",
            &[ferry_core::Value::Text("x".repeat(1 << 20))],
        )
        .unwrap();
    wait_synced(&h);
}

/// A WebSocket to `url` from the loopback address `source` (127.0.0.x), or `None` when the
/// relay closed the socket before the handshake completed.
async fn connect_from(url: &str, source: [u8; 4]) -> Option<raw::Ws> {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/sync")
        .parse()
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(source), 0).into())
        .unwrap();
    let tcp = sock.connect(addr).await.ok()?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .ok()?
    .ok()
    .map(|(ws, _)| ws)
}

/// Says hello on `ws`; true when welcomed.
async fn says_hello(ws: &mut raw::Ws, name: &str) -> bool {
    let token = admin_token(name);
    raw::send(ws, &raw::hello(ReplicaId::generate(), &token, 0)).await;
    matches!(raw::recv(ws).await, Some(ServerMsg::Welcome { .. }))
}

/// One address cannot take every place: sockets from one IP (bare ones and upgraded sync
/// connections alike, for their whole life) count against `max_connections_per_ip`; over it
/// a socket is closed at once, while another address is served. A place is given back when
/// its connection ends.
#[test]
fn one_address_cannot_take_every_place() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nmax_connections_per_ip = 5\n",
    );
    let url = relay.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Five sync connections from 127.0.0.3 hold its places.
        let mut held = Vec::new();
        for i in 0..5 {
            let mut ws = connect_from(&url, [127, 0, 0, 3]).await.expect("connects");
            assert!(says_hello(&mut ws, &format!("d{i}")).await);
            held.push(ws);
        }
        assert!(
            connect_from(&url, [127, 0, 0, 3]).await.is_none(),
            "a sixth socket from the same address is closed"
        );
        // Bare sockets count too: four of them from 127.0.0.4, then one sync connection.
        let mut bare = Vec::new();
        for _ in 0..4 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(([127, 0, 0, 4], 0).into()).unwrap();
            bare.push(sock.connect(relay.addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut ws = connect_from(&url, [127, 0, 0, 4]).await.expect("a fifth");
        assert!(says_hello(&mut ws, "e").await);
        assert!(connect_from(&url, [127, 0, 0, 4]).await.is_none());
        // Another address is served meanwhile.
        let mut other = connect_from(&url, [127, 0, 0, 5]).await.expect("connects");
        assert!(says_hello(&mut other, "f").await);
        // Places come back when connections end.
        for mut ws in held {
            let _ = ws.close(None).await;
            assert!(raw::closed(&mut ws).await);
        }
        let mut back = None;
        for _ in 0..50 {
            back = connect_from(&url, [127, 0, 0, 3]).await;
            if back.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut back = back.expect("the address's places were given back");
        assert!(says_hello(&mut back, "g").await);
    });
    assert!(relay.metric("ferry_sockets_refused_total{limit=\"per_ip\"}") >= 2.0);
}

/// WebSocket pings share the connection's frame rate: a flood of them is answered at that
/// rate (the relay stops reading), not as fast as they come. Protocol frames already were.
#[test]
fn a_ping_flood_is_answered_at_the_frame_rate() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nframes_per_second = 20\nframe_burst = 20\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = raw::connect(&relay.url()).await;
        assert!(says_hello(&mut ws, "p").await);
        for _ in 0..400 {
            ws.send(Message::Ping(vec![1, 2, 3].into())).await.unwrap();
        }
        // Pongs that arrive within two seconds: at 20 per second after a burst of 20, about
        // 60; unthrottled, all 400.
        let mut pongs = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
            if matches!(m, Message::Pong(_)) {
                pongs += 1;
            }
        }
        assert!(pongs > 0, "pings are answered");
        assert!(
            pongs < 150,
            "{pongs} pongs in 2 s: pings are not rate-limited"
        );
    });
}

/// Checksum requests are rate-limited per connection (`checksums_per_minute`, after a burst
/// of 3; more wait) and answers are cached per position and scopes: asking again at a quiet
/// position sums nothing.
#[test]
fn checksum_requests_are_rate_limited_and_cached() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nchecksums_per_minute = 120\n",
    );
    one_row_synced(d.path(), &relay.url(), "c");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ws = raw::connect(&relay.url()).await;
        assert!(says_hello(&mut ws, "c").await);
        let started = std::time::Instant::now();
        for nonce in 0..7 {
            raw::send(&mut ws, &ClientMsg::Checksum { nonce }).await;
        }
        let mut answers = Vec::new();
        while answers.len() < 7 {
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Checksum {
                    nonce,
                    position,
                    digest,
                    rows,
                }) => answers.push((nonce, position, digest, rows)),
                Some(_) => continue,
                None => panic!("closed after {} answers", answers.len()),
            }
        }
        // Three at once, then two per second: the 7th after about two seconds.
        assert!(
            started.elapsed() >= Duration::from_millis(1800),
            "7 checksums answered in {:?}",
            started.elapsed()
        );
        assert!(
            answers
                .iter()
                .all(|a| a.1 == answers[0].1 && a.2 == answers[0].2)
        );
        assert_eq!(answers[0].3, 1, "one row summed");
    });
    assert!(relay.metric("ferry_checksums_total{cached=\"false\"}") >= 1.0);
    assert!(
        relay.metric("ferry_checksums_total{cached=\"true\"}") >= 6.0,
        "repeated checksums at one position are answered from the cache"
    );
}
