//! Capture of every SQL form, through the SDK and from a second plain connection.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::{Cell, ChangeSet, Error, RowOp, Schema, TableDecl, TableMode, Value};
use ferry_testkit::change::*;
use ferry_testkit::local::*;

fn pending(r: &ferry_core::Replica) -> Vec<ChangeSet> {
    r.prepare_push(1000, usize::MAX).unwrap()
}

fn cells(cs: &ChangeSet, row: usize) -> Vec<Cell> {
    match &cs.rows[row].op {
        RowOp::Upsert(c) => c.clone(),
        RowOp::Delete => vec![],
    }
}

#[test]
fn insert_becomes_one_change_set_with_every_column() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, done, votes) VALUES ('a', 'milk', 0, 2)",
        &[],
    )
    .unwrap();
    let p = pending(&r);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].origin_seq, 1);
    assert_eq!(p[0].origin, r.replica_id().unwrap());
    assert_eq!(p[0].rows[0].cl, 1);
    let c = cells(&p[0], 0);
    assert!(c.contains(&Cell::Set("title".into(), t("milk"))));
    assert!(c.contains(&Cell::Add("votes".into(), 2)));
    assert!(c.contains(&Cell::Set("list".into(), Value::Null)));
}

#[test]
fn multi_row_insert_and_transaction_are_one_change_set_each() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title) VALUES ('a', 'x'), ('b', 'y'), ('c', 'z')",
        &[],
    )
    .unwrap();
    r.write(|tx| {
        tx.execute("UPDATE todo SET title = 'xx' WHERE id = 'a'", &[])?;
        tx.execute("DELETE FROM todo WHERE id = 'b'", &[])?;
        tx.execute("INSERT INTO note(id, body) VALUES ('n', 'hi')", &[])
    })
    .unwrap();
    let p = pending(&r);
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].rows.len(), 3);
    assert_eq!(p[1].rows.len(), 3);
    assert_eq!(p[1].origin_seq, 2);
    assert_eq!(cells(&p[1], 0), vec![Cell::Set("title".into(), t("xx"))]);
    assert_eq!(p[1].rows[1].op, RowOp::Delete);
    assert_eq!(p[1].rows[1].cl, 2);
    assert!(p[1].base <= r.cursor().unwrap());
}

#[test]
fn update_of_some_columns_captures_only_those() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, done, votes) VALUES ('a', 'x', 0, 0)",
        &[],
    )
    .unwrap();
    r.execute(
        "UPDATE todo SET done = 1, votes = votes + 3 WHERE id = 'a'",
        &[],
    )
    .unwrap();
    r.execute("UPDATE todo SET title = title WHERE id = 'a'", &[])
        .unwrap(); // no change: no change set
    let p = pending(&r);
    assert_eq!(p.len(), 2);
    let c = cells(&p[1], 0);
    assert_eq!(
        c,
        vec![Cell::Set("done".into(), i(1)), Cell::Add("votes".into(), 3)]
    );
}

#[test]
fn insert_or_replace_and_upsert_are_updates_of_what_differs() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, done, votes) VALUES ('a', 'x', 0, 5)",
        &[],
    )
    .unwrap();
    r.execute(
        "INSERT OR REPLACE INTO todo(id, title, done, votes) VALUES ('a', 'y', 0, 7)",
        &[],
    )
    .unwrap();
    r.execute(
        "INSERT INTO todo(id, title) VALUES ('a', 'z') ON CONFLICT(id) DO UPDATE SET title = excluded.title",
        &[],
    )
    .unwrap();
    let p = pending(&r);
    assert_eq!(p.len(), 3);
    assert_eq!(p[1].rows[0].cl, 1, "replace keeps the incarnation");
    assert_eq!(
        cells(&p[1], 0),
        vec![
            Cell::Set("title".into(), t("y")),
            Cell::Add("votes".into(), 2)
        ]
    );
    assert_eq!(cells(&p[2], 0), vec![Cell::Set("title".into(), t("z"))]);
}

#[test]
fn key_change_is_delete_plus_insert() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute("INSERT INTO todo(id, title) VALUES ('a', 'x')", &[])
        .unwrap();
    r.execute("UPDATE todo SET id = 'b' WHERE id = 'a'", &[])
        .unwrap();
    let p = pending(&r);
    assert_eq!(p[1].rows.len(), 2);
    assert_eq!(p[1].rows[0].op, RowOp::Delete);
    assert_eq!(p[1].rows[1].pk, t("b"));
    assert!(cells(&p[1], 1).contains(&Cell::Set("title".into(), t("x"))));
}

#[test]
fn insert_then_delete_in_one_transaction_is_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.write(|tx| {
        tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'x')", &[])?;
        tx.execute("DELETE FROM todo WHERE id = 'a'", &[])
    })
    .unwrap();
    assert!(pending(&r).is_empty());
}

#[test]
fn rolled_back_transaction_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let err = r.write(|tx| {
        tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'x')", &[])?;
        Err::<(), _>(Error::InvalidInput("app gave up".into()))
    });
    assert!(err.is_err());
    assert!(pending(&r).is_empty());
    assert!(rows(&r, "SELECT * FROM todo").is_empty());
    r.execute("INSERT INTO todo(id, title) VALUES ('b', 'y')", &[])
        .unwrap();
    assert_eq!(
        pending(&r)[0].origin_seq,
        1,
        "origin_seq has no gap after a rollback"
    );
}

#[test]
fn writes_from_a_second_plain_connection_are_captured() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, votes) VALUES ('a', 'x', 1)",
        &[],
    )
    .unwrap();
    r.execute("INSERT INTO note(id, body) VALUES ('n', 'old')", &[])
        .unwrap();
    let orm = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    orm.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    orm.execute_batch(
        "BEGIN;
         INSERT INTO todo(id, title, votes) VALUES ('b', 'from orm', 4);
         UPDATE todo SET title = 'edited', votes = votes + 2 WHERE id = 'a';
         INSERT OR REPLACE INTO todo(id, title, votes) VALUES ('b', 'replaced', 10);
         DELETE FROM note WHERE id = 'n';
         COMMIT;",
    )
    .unwrap();
    let p = pending(&r);
    assert_eq!(
        p.len(),
        3,
        "two SDK change sets and one folded foreign change set"
    );
    let f = &p[2];
    assert_eq!(f.origin_seq, 3);
    let a = f.rows.iter().find(|x| x.pk == t("a")).unwrap();
    match &a.op {
        RowOp::Upsert(c) => {
            assert!(c.contains(&Cell::Set("title".into(), t("edited"))));
            assert!(c.contains(&Cell::Add("votes".into(), 2)));
            assert_eq!(c.len(), 2);
        }
        RowOp::Delete => panic!("expected upsert"),
    }
    let b = f.rows.iter().find(|x| x.pk == t("b")).unwrap();
    assert_eq!(b.cl, 1);
    match &b.op {
        RowOp::Upsert(c) => {
            assert!(c.contains(&Cell::Set("title".into(), t("replaced"))));
            assert!(c.contains(&Cell::Add("votes".into(), 10)), "{c:?}");
        }
        RowOp::Delete => panic!("expected upsert"),
    }
    let n = f.rows.iter().find(|x| x.pk == t("n")).unwrap();
    assert_eq!(n.op, RowOp::Delete);
    // The foreign writes sync like any other.
    let mut seq = ferry_core::sequencer::Sequencer::new();
    let other = open(d.path(), "b.db");
    sync_all(&mut seq, &[&r, &other]);
    assert_eq!(r.dump().unwrap(), other.dump().unwrap());
    assert_eq!(
        rows(&other, "SELECT votes FROM todo WHERE id = 'a'"),
        vec![vec![i(3)]]
    );
}

#[test]
fn foreign_replace_of_an_existing_counter_row_logs_the_true_delta() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, votes) VALUES ('a', 'x', 5)",
        &[],
    )
    .unwrap();
    pending(&r);
    let orm = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    orm.execute(
        "INSERT OR REPLACE INTO todo(id, title, votes) VALUES ('a', 'y', 8)",
        [],
    )
    .unwrap();
    let p = pending(&r);
    let c = cells(&p[1], 0);
    assert_eq!(p[1].rows[0].cl, 1);
    assert!(c.contains(&Cell::Add("votes".into(), 3)), "{c:?}");
}

#[test]
fn read_only_tables_refuse_sdk_and_foreign_writes() {
    let d = tempfile::tempdir().unwrap();
    let schema = Schema::new(1).table(
        TableDecl::new("price")
            .text_key("id")
            .real("amount")
            .mode(TableMode::ReadOnly),
    );
    let r = ferry_core::Replica::open(d.path().join("a.db"), &schema).unwrap();
    let e = r
        .execute("INSERT INTO price VALUES ('x', 1.0)", &[])
        .unwrap_err();
    assert!(
        matches!(e, Error::ReadOnlyTable(ref t) if t == "price"),
        "{e:?}"
    );
    let orm = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    let e = orm
        .execute("INSERT INTO price VALUES ('x', 1.0)", [])
        .unwrap_err();
    assert!(e.to_string().contains("read_only"), "{e}");
    assert!(pending(&r).is_empty());
    // A remote (primary's) change still applies.
    let mut seq = ferry_core::sequencer::Sequencer::new();
    seq.push(
        change_set(ferry_core::ReplicaId([9; 16]), 1)
            .id([7; 16])
            .hlc(ferry_core::Hlc::new(1, 0))
            .upsert("price", t("x"), 1, vec![set("amount", Value::Real(2.5))])
            .build(),
    )
    .unwrap();
    pull(&seq, &r);
    assert_eq!(
        rows(&r, "SELECT amount FROM price"),
        vec![vec![Value::Real(2.5)]]
    );
}

#[test]
fn app_sql_cannot_touch_ferry_tables_or_alter_synced_ones() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    assert!(matches!(
        r.execute("DELETE FROM ferry_log", &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.execute("DROP TABLE todo", &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.query("INSERT INTO todo(id) VALUES ('q')", &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        r.execute("SELEC nonsense", &[]),
        Err(Error::Sqlite(_))
    ));
    // Local-only tables are fine.
    r.execute("CREATE TABLE local_cache(k TEXT PRIMARY KEY, v)", &[])
        .unwrap();
    r.execute("INSERT INTO local_cache VALUES ('k', 1)", &[])
        .unwrap();
    assert!(pending(&r).is_empty());
}

#[test]
fn counter_columns_refuse_non_integers() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let e = r
        .execute("INSERT INTO todo(id, votes) VALUES ('a', 'many')", &[])
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidCounter { ref column, .. } if column == "votes"),
        "{e:?}"
    );
    assert!(rows(&r, "SELECT * FROM todo").is_empty());
}

#[test]
fn app_triggers_still_fire_for_sdk_writes_and_their_writes_are_captured() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute("INSERT INTO todo(id, title) VALUES ('before', 'x')", &[])
        .unwrap();
    r.execute("CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT)", &[])
        .unwrap();
    r.execute(
        "CREATE TRIGGER app_audit AFTER INSERT ON todo BEGIN \
         INSERT INTO audit(what) VALUES (NEW.id); \
         UPDATE todo SET votes = votes + 1 WHERE id = NEW.id; END",
        &[],
    )
    .unwrap();
    r.execute("INSERT INTO todo(id, title) VALUES ('after', 'y')", &[])
        .unwrap();
    assert_eq!(rows(&r, "SELECT what FROM audit"), vec![vec![t("after")]]);
    assert_eq!(
        rows(&r, "SELECT votes FROM todo WHERE id = 'after'"),
        vec![vec![i(1)]]
    );
    let p = r.prepare_push(100, usize::MAX).unwrap();
    let last = p.last().unwrap();
    match &last.rows[0].op {
        RowOp::Upsert(c) => assert!(c.contains(&Cell::Add("votes".into(), 1)), "{c:?}"),
        RowOp::Delete => panic!(),
    }
    // Dropping the app's trigger goes back to the fast mode; foreign capture keeps working.
    r.execute("DROP TRIGGER app_audit", &[]).unwrap();
    r.execute("INSERT INTO todo(id) VALUES ('third')", &[])
        .unwrap();
    assert_eq!(rows(&r, "SELECT count(*) FROM audit"), vec![vec![i(1)]]);
    let orm = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    orm.execute("UPDATE todo SET title = 'orm' WHERE id = 'third'", [])
        .unwrap();
    assert!(r.capture_foreign().unwrap());
}

#[test]
fn a_large_foreign_transaction_folds_into_one_change_set() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut orm = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    let tx = orm.transaction().unwrap();
    for n in 0..5_000 {
        tx.execute(
            "INSERT INTO todo(id, title, votes) VALUES (?1, 'x', 1)",
            [format!("k{n}")],
        )
        .unwrap();
    }
    tx.execute(
        "UPDATE todo SET title = 'y', votes = votes + 1 WHERE id < 'k2'",
        [],
    )
    .unwrap();
    tx.execute("DELETE FROM todo WHERE id LIKE 'k4%'", [])
        .unwrap();
    tx.commit().unwrap();
    let p = pending(&r);
    assert_eq!(p.len(), 1);
    let deleted = (0..5_000)
        .filter(|n| n.to_string().starts_with('4'))
        .count();
    assert_eq!(
        p[0].rows.len(),
        5_000 - deleted,
        "inserted-then-deleted rows vanish"
    );
    let k1 = p[0].rows.iter().find(|x| x.pk == t("k1")).unwrap();
    match &k1.op {
        RowOp::Upsert(c) => {
            assert!(c.contains(&Cell::Set("title".into(), t("y"))));
            assert!(c.contains(&Cell::Add("votes".into(), 2)), "{c:?}");
        }
        RowOp::Delete => panic!(),
    }
}

#[test]
fn columns_changed_by_an_app_trigger_are_captured_beyond_the_statements_set_list() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute(
        "INSERT INTO todo(id, title, done) VALUES ('a', 'x', 0)",
        &[],
    )
    .unwrap();
    r.execute(
        "CREATE TRIGGER mark_done AFTER UPDATE OF title ON todo BEGIN \
         UPDATE todo SET done = 1, list = 'edited' WHERE id = NEW.id; END",
        &[],
    )
    .unwrap();
    let p0 = r.prepare_push(100, usize::MAX).unwrap().len();
    r.write(|tx| {
        let mut st = tx.prepare("UPDATE todo SET title = ?1 WHERE id = ?2")?;
        st.execute(&[t("renamed"), t("a")])
    })
    .unwrap();
    let p = r.prepare_push(100, usize::MAX).unwrap();
    assert_eq!(p.len(), p0 + 1);
    match &p.last().unwrap().rows[0].op {
        RowOp::Upsert(c) => {
            assert!(
                c.contains(&Cell::Set("title".into(), t("renamed"))),
                "{c:?}"
            );
            assert!(c.contains(&Cell::Set("done".into(), i(1))), "{c:?}");
            assert!(c.contains(&Cell::Set("list".into(), t("edited"))), "{c:?}");
        }
        RowOp::Delete => panic!(),
    }
}

/// A counter change beyond ±2^53 in one write is refused with a clear error (found by the
/// hostile-input corpus: the relay used to sequence such an add, and two of them overflow
/// every replica's counter).
#[test]
fn counter_change_beyond_two_to_the_53_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), "r.db");
    r.execute(
        "INSERT INTO todo (id, title, votes) VALUES ('a', 'x', 1)",
        &[],
    )
    .unwrap();
    let e = r
        .execute(
            "UPDATE todo SET votes = 9223372036854775807 WHERE id = 'a'",
            &[],
        )
        .unwrap_err();
    assert!(matches!(e, ferry_core::Error::InvalidCounter { .. }), "{e}");
    assert!(e.to_string().contains("at once"), "{e}");
    r.execute(
        "UPDATE todo SET votes = votes + 9007199254740992 WHERE id = 'a'",
        &[],
    )
    .unwrap();
}
