//! Replicas on different app schema versions: a replica on the older schema stops at a
//! change to a column it does not declare (typed error, nothing skipped), and once upgraded
//! converges with replicas that were on the newer schema all along — including for rows it
//! created itself before the upgrade, whose new columns it never wrote.
//!
//! Found by the deterministic simulation (`server/tests/simulation/`, seeds 1, 14 and 24
//! before the fixes).
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{Error, Replica, Schema, TableDecl};
use ferry_testkit::change::*;
use ferry_testkit::local::*;
use std::path::Path;

fn schema(version: u32) -> Schema {
    Schema::new(version).table(ferry_testkit::schema::note(version))
}

fn open_v(dir: &Path, name: &str, v: u32) -> Replica {
    Replica::open(dir.join(name), &schema(v)).unwrap()
}

fn note(r: &Replica) -> Vec<Vec<ferry_core::Value>> {
    rows(r, "SELECT id, body, n, prio FROM note ORDER BY id")
}

/// Pulls until the replica is at the head or stops with an outdated-schema error.
fn pull_until_stop(seq: &Sequencer, r: &Replica) -> Option<Error> {
    let cursor = r.cursor().unwrap();
    let (sets, up_to) = seq.changes_after(cursor, usize::MAX);
    r.apply_remote(cursor, up_to, &sets).err()
}

#[test]
fn old_schema_stops_with_a_typed_error_and_resumes_after_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::new();
    let new = open_v(dir.path(), "new.db", 2);
    let old = open_v(dir.path(), "old.db", 1);
    new.execute("INSERT INTO note (id, body, n) VALUES ('a', 'x', 1)", &[])
        .unwrap();
    new.execute("UPDATE note SET prio = 7 WHERE id = 'a'", &[])
        .unwrap();
    push(&mut seq, &new);
    let err = pull_until_stop(&seq, &old).expect("an old schema cannot take prio");
    assert!(
        matches!(&err, Error::AppSchemaOutdated { table, column } if table == "note" && column == "prio"),
        "{err}"
    );
    assert_eq!(old.cursor().unwrap(), 0, "nothing was skipped");
    // Local writes still upload meanwhile.
    old.execute("INSERT INTO note (id, body, n) VALUES ('b', 'y', 1)", &[])
        .unwrap();
    push(&mut seq, &old);
    old.close().unwrap();
    let old = open_v(dir.path(), "old.db", 2);
    pull(&seq, &old);
    pull(&seq, &new);
    assert_eq!(note(&old), note(&new));
    assert_eq!(note(&old)[0][3], i(7));
}

/// The old replica created the row itself (without `prio`) before upgrading; a concurrent
/// delete and an update setting `prio` happened on the newer schema.
fn created_before_upgrade(push_before_upgrade: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::new();
    let n1 = open_v(dir.path(), "n1.db", 2);
    let n2 = open_v(dir.path(), "n2.db", 2);
    let old = open_v(dir.path(), "old.db", 1);
    n1.execute(
        "INSERT INTO note (id, body, n) VALUES ('r', 'first', 1)",
        &[],
    )
    .unwrap();
    push(&mut seq, &n1);
    pull(&seq, &n2);
    n1.execute("DELETE FROM note WHERE id = 'r'", &[]).unwrap();
    push(&mut seq, &n1);
    // Concurrent with the delete: update_wins brings the row back with prio = 7.
    n2.execute("UPDATE note SET prio = 7 WHERE id = 'r'", &[])
        .unwrap();
    push(&mut seq, &n2);
    // The old replica, offline all along, creates the same row later in time.
    std::thread::sleep(std::time::Duration::from_millis(5));
    old.execute(
        "INSERT INTO note (id, body, n) VALUES ('r', 'mine', 1)",
        &[],
    )
    .unwrap();
    if push_before_upgrade {
        push(&mut seq, &old);
    } else {
        old.prepare_push(64, 1 << 20).unwrap();
    }
    old.close().unwrap();
    let old = open_v(dir.path(), "old.db", 2);
    pull(&seq, &old);
    push(&mut seq, &old);
    pull(&seq, &old);
    let reference = open_v(dir.path(), "ref.db", 2);
    pull(&seq, &reference);
    pull(&seq, &n1);
    pull(&seq, &n2);
    assert_eq!(note(&old), note(&reference));
    assert_eq!(note(&n1), note(&reference));
    assert_eq!(note(&n2), note(&reference));
    assert_eq!(note(&reference)[0][3], i(7), "{:?}", note(&reference));
}

#[test]
fn row_created_on_the_old_schema_converges_after_upgrade() {
    created_before_upgrade(false);
}

#[test]
fn row_created_and_pushed_on_the_old_schema_converges_after_upgrade() {
    created_before_upgrade(true);
}

/// The exact history of row `n1` in simulation seed 24: the old replica created the row
/// offline (its change reaches the relay last), was upgraded, and then received, in order,
/// two concurrent creations on the new schema, two deletes, an update and delete from a
/// device three hours behind, and an update setting `prio` that update_wins brings back.
#[test]
fn simulation_seed_24_history_converges() {
    use ferry_core::{Cell, Hlc, ReplicaId, RowOp, Sequenced, Value};
    let dir = tempfile::tempdir().unwrap();
    let old = open_v(dir.path(), "old.db", 1);
    old.execute(
        "INSERT INTO note (id, body, n) VALUES ('n1', 'w416', 1)",
        &[],
    )
    .unwrap();
    let mine = old.prepare_push(8, 1 << 20).unwrap().remove(0);
    old.close().unwrap();
    let old = open_v(dir.path(), "old.db", 2);
    let t = mine.hlc.millis();
    let (a, b, c) = (ReplicaId([2; 16]), ReplicaId([1; 16]), ReplicaId([6; 16]));
    let up = |cells: Vec<Cell>| RowOp::Upsert(cells);
    let set = |s: &str, v: Value| Cell::Set(s.into(), v);
    let mk = |seq: u64, origin: ReplicaId, oseq: u64, back: u64, base: u64, cl: u64, op: RowOp| {
        Sequenced {
            server_seq: seq,
            change_set: change_set(origin, oseq)
                .hlc(Hlc::new(t - back, 0))
                .base(base)
                .schema_version(2)
                .row("note", "n1", cl, op)
                .build(),
        }
    };
    let null = Value::Null;
    let log = vec![
        mk(
            1,
            a,
            1,
            30_100,
            0,
            1,
            up(vec![
                set("body", t_("w170")),
                set("prio", null.clone()),
                Cell::Add("n".into(), 1),
            ]),
        ),
        mk(
            2,
            b,
            1,
            29_734,
            0,
            1,
            up(vec![
                set("body", t_("w76")),
                set("prio", null.clone()),
                Cell::Add("n".into(), 1),
            ]),
        ),
        mk(3, a, 2, 21_822, 2, 2, RowOp::Delete),
        mk(4, b, 2, 18_373, 2, 2, RowOp::Delete),
        mk(
            5,
            c,
            1,
            3 * 3_600_000,
            0,
            1,
            up(vec![set("body", t_("w268")), Cell::Add("n".into(), 2)]),
        ),
        mk(6, c, 2, 3 * 3_600_000 - 2_000, 0, 2, RowOp::Delete),
        mk(
            7,
            a,
            3,
            6_434,
            4,
            1,
            up(vec![
                set("body", t_("w625")),
                set("prio", Value::Integer(7)),
                Cell::Add("n".into(), 1),
            ]),
        ),
        Sequenced {
            server_seq: 8,
            change_set: mine.clone(),
        },
    ];
    old.apply_remote(0, 8, &log).unwrap();
    let reference = open_v(dir.path(), "ref.db", 2);
    reference.apply_remote(0, 8, &log).unwrap();
    assert_eq!(note(&old), note(&reference));
}

fn t_(s: &str) -> ferry_core::Value {
    ferry_core::Value::Text(s.into())
}

/// A guarded change set captured on the old schema is withdrawn after the upgrade: rolling
/// it back must not undo a newer-schema column another device set meanwhile.
#[test]
fn rollback_after_upgrade_keeps_new_columns() {
    let with_acct = |v: u32| {
        schema(v).table(
            TableDecl::new("acct")
                .text_key("id")
                .integer("balance")
                .mode(ferry_core::TableMode::ServerChecked),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::with_schema(&with_acct(2));
    let open = |name: &str, v: u32| Replica::open(dir.path().join(name), &with_acct(v)).unwrap();
    let old = open("old.db", 1);
    let other = open("other.db", 2);
    old.execute("INSERT INTO note (id, body, n) VALUES ('n1', 'a', 1)", &[])
        .unwrap();
    push(&mut seq, &old);
    pull(&seq, &other);
    // Guarded on the old schema: creates an account and edits the note.
    old.write(|tx| {
        tx.execute("INSERT INTO acct (id, balance) VALUES ('a1', 1)", &[])?;
        tx.execute("UPDATE note SET body = 'b' WHERE id = 'n1'", &[])?;
        Ok(())
    })
    .unwrap();
    old.prepare_push(8, 1 << 20).unwrap();
    // Meanwhile on the new schema: the same account (so the relay refuses the old one's),
    // and prio on the note.
    other
        .execute("INSERT INTO acct (id, balance) VALUES ('a1', 5)", &[])
        .unwrap();
    other
        .execute("UPDATE note SET prio = 7 WHERE id = 'n1'", &[])
        .unwrap();
    push(&mut seq, &other);
    old.close().unwrap();
    let old = open("old.db", 2);
    pull(&seq, &old);
    let pending = old.prepare_push(8, 1 << 20).unwrap();
    for cs in pending {
        match seq.push_checked(cs).unwrap() {
            Ok(s) => old.acknowledge(&[(0, s)]).unwrap_or(()),
            Err(refusal) => {
                old.handle_refusal(refusal_origin(&old), refusal.code, &refusal.message)
                    .unwrap();
            }
        }
    }
    push(&mut seq, &old);
    pull(&seq, &old);
    let reference = open("ref.db", 2);
    pull(&seq, &reference);
    pull(&seq, &other);
    assert_eq!(note(&old), note(&reference));
    assert_eq!(note(&other), note(&reference));
    assert_eq!(note(&reference)[0][3], i(7));
}

fn refusal_origin(r: &Replica) -> u64 {
    r.prepare_push(1, 1 << 20).unwrap()[0].origin_seq
}
