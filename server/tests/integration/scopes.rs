//! Partial replication: clients receive only rows in their read scopes, cannot write outside
//! their write scopes, and rows moving between scopes leave and arrive whole.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::protocol::{ClientMsg, ServerMsg};
use ferry_core::{Error, ReplicaId, Value};
use ferry_testkit::relay::*;
use std::time::Duration;

/// The distinct lists of `r`'s todo rows, sorted.
pub(crate) fn lists(r: &ferry_core::Replica) -> Vec<String> {
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

/// A device reconnecting after others wrote to many other scopes reads its own change sets
/// from the store, not theirs (the per-scope index), and still receives all of its own.
#[test]
fn a_reconnect_reads_only_its_own_scopes_from_the_store() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let noisy = open(d.path(), "noisy.db");
    let hn = connect(&noisy, &url, admin_token("noisy"));
    for t in 0..10_000 {
        let list = if t % 1000 == 999 {
            "list:mine".to_owned()
        } else {
            format!("list:other{}", t % 1000)
        };
        noisy
            .write(|tx| {
                tx.execute(
                    "INSERT INTO todo(id, list, title) VALUES (?1, ?2, 'x')",
                    &[format!("r{t}").into(), list.into()],
                )
            })
            .unwrap();
    }
    wait_synced(&hn);
    drop(hn);
    // A restarted relay holds nothing in memory: catch-up is served from the store.
    relay.restart();
    let url = relay.url();
    assert_eq!(relay.metric("ferry_store_sets_read_total"), 0.0);
    let device = open(d.path(), "device.db");
    let hd = connect(
        &device,
        &url,
        token_for("dev", &["list:mine"], &["list:mine"], hour()),
    );
    wait_synced(&hd);
    assert_eq!(
        device.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0],
        Value::Integer(10)
    );
    assert_eq!(lists(&device), ["list:mine"]);
    let read = relay.metric("ferry_store_sets_read_total");
    assert!(
        read <= 20.0,
        "catch-up read {read} change sets from the store for 10 of its own among 10,000"
    );
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
    // It is quarantined (his later writes would go on uploading), with the relay's reason.
    wait_synced(&hbo);
    let q = bob.quarantined().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].code, ferry_core::protocol::ErrorCode::Forbidden);
    assert!(q[0].reason.contains("list:alice"), "{}", q[0].reason);
    let st = hbo.status();
    assert_eq!(st.quarantined, 1);
    assert!(st.refused.is_none(), "{st:?}");
    // Bob still receives others' writes.
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
    // Alice's write, and the empty placeholder that keeps bob's sequence gap-free where his
    // refused write was (it carries no row).
    assert_eq!(
        store_dump(&relay.dir).len(),
        before + 2,
        "only alice's write and bob's placeholder were stored"
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
        use ferry_core::changeset::Cell;
        // A replica id per subject: an id is bound to the first subject it connected as.
        let push = |tok: String| {
            let url = url.clone();
            let me = ReplicaId::generate();
            async move {
                let mut ws = raw::connect(&url).await;
                raw::send(&mut ws, &raw::hello(me, &tok, 0)).await;
                raw::send(
                    &mut ws,
                    &ClientMsg::Push {
                        change_sets: vec![raw::change_set(
                            me,
                            1,
                            "price",
                            "p1",
                            1,
                            vec![Cell::Set("cents".into(), Value::Integer(250))],
                        )],
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
            nbf: None,
            iat: None,
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

/// In an `update_wins` table, an update concurrent with a delete revives the row; when that
/// update also moves the row, the relay must follow the revival, or readers of the new scope
/// would never get it.
#[test]
fn a_revived_row_that_moved_reaches_its_new_scope() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let x = open(d.path(), "x.db");
    let y = open(d.path(), "y.db");
    let ra = open(d.path(), "ra.db");
    let rb = open(d.path(), "rb.db");
    let hx = connect(&x, &url, admin_token("x"));
    let hy = connect(&y, &url, admin_token("y"));
    let ha = connect(
        &ra,
        &url,
        token_for("ra", &["owner:a"], &["owner:a"], hour()),
    );
    let hb = connect(
        &rb,
        &url,
        token_for("rb", &["owner:b"], &["owner:b"], hour()),
    );
    x.execute(
        "INSERT INTO doc(id, owner, body) VALUES ('d', 'owner:a', 'text')",
        &[],
    )
    .unwrap();
    for h in [&hx, &hy, &ha, &hb] {
        wait_synced(h);
    }
    assert_eq!(
        ra.query("SELECT count(*) FROM doc", &[]).unwrap().rows[0][0],
        Value::Integer(1)
    );
    // Concurrently: x deletes it, y moves it to owner:b. The delete reaches the relay first.
    hx.pause();
    hy.pause();
    x.execute("DELETE FROM doc WHERE id = 'd'", &[]).unwrap();
    y.execute(
        "UPDATE doc SET owner = 'owner:b', body = 'moved' WHERE id = 'd'",
        &[],
    )
    .unwrap();
    hx.resume();
    wait_synced(&hx);
    hy.resume();
    wait_synced(&hy);
    for h in [&hx, &hy, &ha, &hb, &hx] {
        wait_synced(h);
    }
    assert_eq!(x.dump().unwrap(), y.dump().unwrap());
    let body = |r: &ferry_core::Replica| r.query("SELECT owner, body FROM doc", &[]).unwrap().rows;
    assert_eq!(
        body(&x),
        vec![vec![
            Value::Text("owner:b".into()),
            Value::Text("moved".into())
        ]]
    );
    assert_eq!(
        body(&rb),
        body(&x),
        "the new scope's reader has the revived row"
    );
    assert!(body(&ra).is_empty(), "the old scope's reader lost it");
    for (h, r) in [(&ha, &ra), (&hb, &rb), (&hx, &x)] {
        let v = h.verify_blocking(r, Duration::from_secs(30)).unwrap();
        assert!(v.matches(), "{v:?}");
    }
}

/// Seeded: writers edit, delete and move rows between scopes concurrently (in a
/// `delete_wins` and an `update_wins` table); readers of one or two scopes end up holding
/// exactly what the relay says they should. `FERRY_SCOPE_SEEDS` runs more.
#[test]
fn readers_of_moving_rows_match_the_relay() {
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let seeds = seeds("FERRY_SCOPE_SEEDS", 8);
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = d.path().join(format!("s{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        let writers: Vec<_> = (0..3).map(|i| open(&dir, &format!("w{i}.db"))).collect();
        let wh: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, w)| connect(w, &url, admin_token(&format!("w{i}"))))
            .collect();
        let scopes: [&[&str]; 4] = [&["a"], &["b"], &["c"], &["a", "c"]];
        let readers: Vec<_> = scopes
            .iter()
            .enumerate()
            .map(|(i, sc)| {
                let pats: Vec<String> = sc
                    .iter()
                    .flat_map(|s| [format!("list:{s}-{seed}"), format!("owner:{s}-{seed}")])
                    .collect();
                let pats: Vec<&str> = pats.iter().map(String::as_str).collect();
                let r = open(&dir, &format!("r{i}.db"));
                let h = connect(&r, &url, token_for(&format!("r{i}"), &pats, &[], hour()));
                (r, h)
            })
            .collect();
        for round in 0..4 {
            for h in &wh {
                h.pause();
            }
            for w in &writers {
                for _ in 0..rng.random_range(1..8) {
                    let k = Value::Text(format!("k{}", rng.random_range(0..4)));
                    let s = ["a", "b", "c"][rng.random_range(0..3)];
                    let (list, owner) = (
                        Value::Text(format!("list:{s}-{seed}")),
                        Value::Text(format!("owner:{s}-{seed}")),
                    );
                    let sql = match rng.random_range(0..8) {
                        0 | 1 => {
                            "INSERT INTO todo(id, list, title) VALUES (?1, ?2, 'n') ON CONFLICT(id) DO UPDATE SET list = excluded.list"
                        }
                        2 => "UPDATE todo SET votes = votes + 1, title = ?2 WHERE id = ?1",
                        3 => "DELETE FROM todo WHERE id = ?1 AND ?2 IS NOT NULL",
                        4 | 5 => {
                            "INSERT INTO doc(id, owner, body) VALUES (?1, ?2, 'n') ON CONFLICT(id) DO UPDATE SET owner = excluded.owner"
                        }
                        6 => "UPDATE doc SET body = ?2 WHERE id = ?1",
                        _ => "DELETE FROM doc WHERE id = ?1 AND ?2 IS NOT NULL",
                    };
                    let arg = if sql.contains("doc") { owner } else { list };
                    w.execute(sql, &[k, arg]).unwrap();
                }
            }
            for h in &wh {
                if rng.random_bool(0.6) || round == 3 {
                    h.resume();
                    wait_synced(h);
                }
            }
        }
        for h in &wh {
            h.resume();
        }
        for _ in 0..2 {
            for h in &wh {
                wait_synced(h);
            }
        }
        for w in &writers[1..] {
            assert_eq!(w.dump().unwrap(), writers[0].dump().unwrap(), "seed {seed}");
        }
        for (i, (r, h)) in readers.iter().enumerate() {
            wait_synced(h);
            let v = h.verify_blocking(r, Duration::from_secs(30)).unwrap();
            assert!(
                v.matches(),
                "seed {seed}: reader {i} ({:?}) differs from the relay: {v:?}",
                scopes[i]
            );
            assert_eq!(
                r.pending_count().unwrap(),
                0,
                "readers never push evictions"
            );
        }
    }
}

#[test]
fn a_primary_device_writes_a_read_only_table_that_others_receive_read_only() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let as_primary = ferry_core::OpenOptions {
        primary_tables: vec!["price".into()],
        ..Default::default()
    };
    let edge = std::sync::Arc::new(
        ferry_core::Replica::open_with(d.path().join("edge.db"), &schema(), as_primary.clone())
            .unwrap(),
    );
    let dash = open(d.path(), "dashboard.db");
    let primary_token = |sub: &str, tables: Vec<String>| {
        let claims = ferry_relay::auth::Claims {
            sub: sub.into(),
            exp: ferry_relay::auth::now_secs() + 600,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: tables,
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        };
        ferry_relay::auth::mint_hs256(SECRET.as_bytes(), &claims).unwrap()
    };
    let he = connect(&edge, &url, primary_token("edge", vec!["price".into()]));
    let hd = connect(&dash, &url, admin_token("dashboard"));
    edge.execute("INSERT INTO price(id, cents) VALUES ('tea', 250)", &[])
        .unwrap();
    wait_synced(&he);
    wait_synced(&hd);
    assert_eq!(
        dash.query("SELECT id, cents FROM price", &[]).unwrap().rows,
        vec![vec![Value::Text("tea".into()), Value::Integer(250)]]
    );
    assert!(matches!(
        dash.execute("UPDATE price SET cents = 1", &[]),
        Err(Error::ReadOnlyTable(_))
    ));

    // A device that declares itself primary but whose token is not granted it is refused by
    // the relay, and nothing of its write reaches anyone.
    let rogue = std::sync::Arc::new(
        ferry_core::Replica::open_with(d.path().join("rogue.db"), &schema(), as_primary).unwrap(),
    );
    let hr = connect(&rogue, &url, admin_token("rogue"));
    wait_synced(&hr);
    rogue
        .execute("UPDATE price SET cents = 1 WHERE id = 'tea'", &[])
        .unwrap();
    wait_synced(&hr);
    let q = rogue.quarantined().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].code, ferry_core::protocol::ErrorCode::Forbidden);
    assert!(q[0].reason.contains("read_only"), "{}", q[0].reason);
    wait_synced(&hd);
    assert_eq!(
        dash.query("SELECT cents FROM price", &[]).unwrap().rows,
        vec![vec![Value::Integer(250)]]
    );
    drop((he, hd, hr));
}
