//! Partial replication: clients receive only rows in their read scopes, cannot write outside
//! their write scopes, and rows moving between scopes leave and arrive whole.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;
use ferry_core::protocol::{ClientMsg, ServerMsg};
use ferry_core::{Error, ReplicaId, Value};
use std::time::Duration;

fn lists(r: &ferry_core::Replica) -> Vec<String> {
    r.query("SELECT DISTINCT list FROM todo ORDER BY list", &[])
        .unwrap()
        .rows
        .into_iter()
        .map(|row| match &row[0] {
            Value::Text(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn hour() -> Duration {
    Duration::from_secs(3600)
}

#[test]
fn clients_see_only_their_scopes_and_writes_outside_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let alice = open(d.path(), "alice.db");
    let bob = open(d.path(), "bob.db");
    let ha = connect(&admin, &url, admin_token("admin"));
    let hal = connect(
        &alice,
        &url,
        token_for(
            "alice",
            &["list:{sub}", "list:shared", "global"],
            &["list:{sub}", "list:shared"],
            hour(),
        ),
    );
    let hbo = connect(
        &bob,
        &url,
        token_for(
            "bob",
            &["list:{sub}", "list:shared"],
            &["list:{sub}"],
            hour(),
        ),
    );
    admin
        .write(|tx| {
            for (id, list) in [
                ("1", "list:alice"),
                ("2", "list:bob"),
                ("3", "list:shared"),
                ("4", "list:carol"),
            ] {
                tx.execute(
                    "INSERT INTO todo(id, list, title) VALUES (?1, ?2, 'x')",
                    &[id.into(), list.into()],
                )?;
            }
            tx.execute("INSERT INTO tag(id, name) VALUES ('g', 'global tag')", &[])
        })
        .unwrap();
    wait_synced(&ha);
    wait_synced(&hal);
    wait_synced(&hbo);
    assert_eq!(lists(&alice), ["list:alice", "list:shared"]);
    assert_eq!(lists(&bob), ["list:bob", "list:shared"]);
    assert_eq!(
        alice.query("SELECT count(*) FROM tag", &[]).unwrap().rows[0][0],
        Value::Integer(1)
    );
    assert_eq!(
        bob.query("SELECT count(*) FROM tag", &[]).unwrap().rows[0][0],
        Value::Integer(0)
    );
    for (h, r) in [(&hal, &alice), (&hbo, &bob), (&ha, &admin)] {
        assert!(
            h.verify_blocking(r, Duration::from_secs(30))
                .unwrap()
                .matches()
        );
    }

    // Bob writes into alice's list: refused with a clear error, and it reaches no one.
    let before = store_dump(&relay.dir).len();
    bob.execute(
        "INSERT INTO todo(id, list, title) VALUES ('evil', 'list:alice', 'x')",
        &[],
    )
    .unwrap();
    match hbo.sync_now_blocking(Duration::from_secs(30)) {
        Err(Error::Refused { code, message }) => {
            assert_eq!(code, "forbidden");
            assert!(message.contains("list:alice"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let st = hbo.status();
    assert_eq!(
        st.refused.as_ref().map(|r| r.code.as_str()),
        Some("forbidden")
    );
    assert!(st.last_error.is_some());
    // Bob still receives others' writes while his upload is blocked.
    alice
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('5', 'list:shared', 'y')",
            &[],
        )
        .unwrap();
    wait_synced(&hal);
    eventually("bob to keep receiving", Duration::from_secs(20), || {
        bob.query("SELECT count(*) FROM todo WHERE id = '5'", &[])
            .unwrap()
            .rows[0][0]
            == Value::Integer(1)
    });
    wait_synced(&ha);
    assert_eq!(
        admin
            .query("SELECT count(*) FROM todo WHERE id = 'evil'", &[])
            .unwrap()
            .rows[0][0],
        Value::Integer(0)
    );
    assert_eq!(
        alice
            .query("SELECT count(*) FROM todo WHERE id = 'evil'", &[])
            .unwrap()
            .rows[0][0],
        Value::Integer(0)
    );
    assert_eq!(
        store_dump(&relay.dir).len(),
        before + 1,
        "only alice's write was stored"
    );

    // A read_only table: refused at once on the replica, and by the relay for a raw client.
    let e = alice
        .execute("INSERT INTO price(id, cents) VALUES ('p', 1)", &[])
        .unwrap_err();
    assert!(
        matches!(e, Error::ReadOnlyTable(ref t) if t == "price"),
        "{e}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use ferry_core::changeset::{Cell, ChangeSet, RowChange, RowOp};
        let me = ReplicaId::generate();
        let push = |tok: String| {
            let url = url.clone();
            async move {
                let mut ws = raw::connect(&url).await;
                raw::send(&mut ws, &raw::hello(me, &tok, 0)).await;
                raw::send(
                    &mut ws,
                    &ClientMsg::Push {
                        change_sets: vec![ChangeSet {
                            id: [1; 16],
                            origin: me,
                            origin_seq: 1,
                            hlc: ferry_core::Hlc::new(ferry_relay::auth::now_secs() * 1000, 0),
                            base: 0,
                            schema_version: 1,
                            rows: vec![RowChange {
                                table: "price".into(),
                                pk: "p1".into(),
                                cl: 1,
                                op: RowOp::Upsert(vec![Cell::Set(
                                    "cents".into(),
                                    Value::Integer(250),
                                )]),
                            }],
                        }],
                    },
                )
                .await;
                loop {
                    match raw::recv(&mut ws).await {
                        Some(ServerMsg::Acks { .. }) => return Ok(()),
                        Some(ServerMsg::Refused { code, message, .. }) => {
                            return Err((code, message));
                        }
                        Some(_) => continue,
                        None => panic!("closed"),
                    }
                }
            }
        };
        let err = push(admin_token("not-primary")).await.unwrap_err();
        assert_eq!(err.0, ferry_core::protocol::ErrorCode::Forbidden);
        assert!(err.1.contains("read_only"), "{}", err.1);
        // A primary (a backend) may write it; replicas receive it read-only.
        let claims = ferry_relay::auth::Claims {
            sub: "backend".into(),
            exp: ferry_relay::auth::now_secs() + 600,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: vec!["price".into()],
            iss: None,
            aud: None,
        };
        let tok = ferry_relay::auth::mint_hs256(SECRET.as_bytes(), &claims).unwrap();
        push(tok).await.unwrap();
    });
    wait_synced(&hal);
    assert_eq!(
        alice.query("SELECT cents FROM price", &[]).unwrap().rows,
        vec![vec![Value::Integer(250)]]
    );
    assert!(matches!(
        alice.execute("UPDATE price SET cents = 1", &[]),
        Err(Error::ReadOnlyTable(_))
    ));
}

#[test]
fn rows_moving_between_scopes_leave_and_arrive_whole() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let ha = connect(&admin, &url, admin_token("admin"));
    let h_a = connect(&a, &url, token_for("a", &["list:a"], &["list:a"], hour()));
    let h_b = connect(&b, &url, token_for("b", &["list:b"], &["list:b"], hour()));
    admin
        .execute(
            "INSERT INTO todo(id, list, title, done) VALUES ('m', 'list:a', 'moving', 0)",
            &[],
        )
        .unwrap();
    for _ in 0..3 {
        admin
            .execute("UPDATE todo SET votes = votes + 1 WHERE id = 'm'", &[])
            .unwrap();
    }
    admin
        .execute("UPDATE todo SET done = 1 WHERE id = 'm'", &[])
        .unwrap();
    for h in [&ha, &h_a, &h_b] {
        wait_synced(h);
    }
    assert_eq!(lists(&a), ["list:a"]);
    assert!(lists(&b).is_empty());
    // Move it to list b: a loses it (not a user delete), b receives its whole current state.
    admin
        .execute("UPDATE todo SET list = 'list:b' WHERE id = 'm'", &[])
        .unwrap();
    for h in [&ha, &h_a, &h_b] {
        wait_synced(h);
    }
    assert!(lists(&a).is_empty(), "a still sees the row");
    let row = |r: &ferry_core::Replica| {
        r.query("SELECT id, list, title, done, votes FROM todo", &[])
            .unwrap()
            .rows
    };
    assert_eq!(row(&b), row(&admin));
    assert_eq!(
        row(&b)[0][4],
        Value::Integer(3),
        "counter history arrived whole"
    );
    assert_eq!(
        a.pending_count().unwrap(),
        0,
        "an eviction is never pushed back"
    );
    // b edits it; it moves back to a with b's edit.
    b.execute(
        "UPDATE todo SET title = 'edited by b', votes = votes + 1 WHERE id = 'm'",
        &[],
    )
    .unwrap();
    wait_synced(&h_b);
    admin
        .execute("UPDATE todo SET list = 'list:a' WHERE id = 'm'", &[])
        .unwrap();
    for h in [&ha, &h_b, &h_a, &ha] {
        wait_synced(h);
    }
    assert!(lists(&b).is_empty());
    assert_eq!(row(&a), row(&admin));
    assert_eq!(row(&a)[0][2], Value::Text("edited by b".into()));
    assert_eq!(row(&a)[0][4], Value::Integer(4));
    for (h, r) in [(&h_a, &a), (&h_b, &b), (&ha, &admin)] {
        let v = h.verify_blocking(r, Duration::from_secs(30)).unwrap();
        assert!(v.matches(), "{v:?}");
    }
}
