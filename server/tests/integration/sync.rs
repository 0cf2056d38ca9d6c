//! End-to-end sync through a real relay process on 127.0.0.1.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::Value;
use ferry_testkit::relay::*;

#[test]
fn two_replicas_sync_through_the_relay() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    a.execute(
        "INSERT INTO todo(id, list, title) VALUES ('1', 'l1', 'milk')",
        &[],
    )
    .unwrap();
    let ha = connect(&a, &relay.url(), admin_token("a"));
    let hb = connect(&b, &relay.url(), admin_token("b"));
    wait_synced(&ha);
    wait_synced(&hb);
    assert_eq!(
        b.query("SELECT title FROM todo", &[]).unwrap().rows,
        vec![vec![Value::Text("milk".into())]]
    );
    let v = hb
        .verify_blocking(&b, std::time::Duration::from_secs(30))
        .unwrap();
    assert!(v.matches(), "{v:?}");
}

/// A replica with a long download ahead of it pushes at once: the relay reads its push after
/// a few catch-up frames, not after the whole download. (The count includes frames the relay
/// sent before the push reached it, which on a busy machine can be a few turns of
/// `CATCH_UP_FRAMES`; the bound is half the download, far below what a relay that finishes
/// catch-up before reading would show.)
#[test]
fn a_replica_pushes_while_it_pulls() {
    use ferry_core::changeset::Cell;
    use ferry_core::protocol::{ClientMsg, ServerMsg};
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let src = open(d.path(), "src.db");
    let hs = connect(&src, &relay.url(), admin_token("src"));
    let sets = 16_000; // 32 frames of 512
    let frames = sets / 512;
    for n in 0..sets {
        src.execute(
            "INSERT INTO tag(id, name) VALUES (?1, 'backlog')",
            &[Value::Text(format!("b{n}"))],
        )
        .unwrap();
    }
    wait_synced(&hs);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let frames_before_ack = rt.block_on(async {
        let me = ferry_core::ReplicaId::generate();
        let mut ws = raw::connect(&relay.url()).await;
        raw::send(&mut ws, &raw::hello(me, &admin_token("late"), 0)).await;
        let push = raw::change_set(
            me,
            1,
            "tag",
            "mine",
            1,
            vec![Cell::Set("name".into(), "urgent".into())],
        );
        raw::send(
            &mut ws,
            &ClientMsg::Push {
                change_sets: vec![push],
            },
        )
        .await;
        let mut changes = 0;
        loop {
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Acks { .. }) => return changes,
                Some(ServerMsg::Changes { .. }) => changes += 1,
                Some(_) => {}
                None => panic!("closed before the ack"),
            }
        }
    });
    assert!(
        frames_before_ack <= frames / 2,
        "the push waited behind {frames_before_ack} of {frames} catch-up frames"
    );
}

/// A TCP proxy to `to` that delivers what the server sends after its first chunk (the
/// WebSocket upgrade answer) `delay` late; what the client sends goes through at once.
fn slow_downstream(to: std::net::SocketAddr, delay: std::time::Duration) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for inbound in l.incoming() {
            let Ok(client) = inbound else { return };
            let Ok(server) = std::net::TcpStream::connect(to) else {
                return;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 65536];
                let mut first = true;
                while let Ok(n) = s_read.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if !std::mem::take(&mut first) {
                        std::thread::sleep(delay);
                    }
                    if c_write.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `sync_now` called while the connection is still being set up waits for a head learnt after
/// the call: a change another replica had acknowledged before it is always there when it
/// returns. Here b's hello reaches the relay, and the relay answers (welcome and catch-up up
/// to its head), before a's write is sequenced; b calls `sync_now` after a's ack, while that
/// answer is still on the slow link. The welcome's head is too old to count.
#[test]
fn sync_now_while_connecting_sees_what_was_acknowledged_before_it() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let slow = slow_downstream(relay.addr, std::time::Duration::from_millis(300));
    let a = open(d.path(), "a.db");
    let ha = connect(&a, &relay.url(), admin_token("a"));
    wait_synced(&ha);
    for i in 0..3 {
        let b = open(d.path(), &format!("b{i}.db"));
        let hb = connect(&b, &format!("ws://{slow}/sync"), admin_token("b"));
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.execute(
            "INSERT INTO tag(id, name) VALUES (?1, 'x')",
            &[Value::Text(format!("t{i}"))],
        )
        .unwrap();
        wait_synced(&ha);
        wait_synced(&hb);
        let n = b.query("SELECT count(*) FROM tag", &[]).unwrap().rows[0][0].clone();
        assert_eq!(
            n,
            Value::Integer(i + 1),
            "round {i}: b returned from sync_now without a's write"
        );
    }
}
