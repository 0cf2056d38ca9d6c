//! End-to-end sync through a real relay process on 127.0.0.1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;
use ferry_core::Value;

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
