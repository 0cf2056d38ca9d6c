//! Merge semantics: lww, counters, delete rules, custom resolver, conflict log, idempotence.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{
    ChangeSource, Conflict, ConflictKind, Observer, Replica, Resolution, Schema, TableDecl, Value,
    WallClock, Winner,
};
use ferry_testkit::local::*;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A wall clock the test sets.
struct Fake(AtomicU64);
impl WallClock for Fake {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn open_at(dir: &std::path::Path, name: &str, schema: &Schema, ms: u64) -> (Replica, Arc<Fake>) {
    let clock = Arc::new(Fake(AtomicU64::new(ms)));
    let opts = ferry_core::OpenOptions {
        wall_clock: clock.clone(),
        ..Default::default()
    };
    (
        Replica::open_with(dir.join(name), schema, opts).unwrap(),
        clock,
    )
}

#[test]
fn concurrent_cell_writes_resolve_by_hlc_and_are_logged_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    let s = schema();
    let (a, _) = open_at(d.path(), "a.db", &s, 1_000);
    let (b, _) = open_at(d.path(), "b.db", &s, 2_000); // b's clock is later: b wins
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, title) VALUES ('x', 'orig')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    a.execute("UPDATE todo SET title = 'from a' WHERE id = 'x'", &[])
        .unwrap();
    b.execute("UPDATE todo SET title = 'from b' WHERE id = 'x'", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    assert_eq!(rows(&a, "SELECT title FROM todo"), vec![vec![t("from b")]]);
    let ca = a.conflicts().unwrap();
    assert_eq!(ca.len(), 1, "{ca:?}");
    assert_eq!(ca[0].kind, ConflictKind::Cell);
    assert_eq!(ca[0].local.value, t("from a"));
    assert_eq!(ca[0].remote.value, t("from b"));
    assert_eq!(ca[0].winner, Winner::Remote);
    assert_eq!(ca[0].policy, "lww");
    assert_eq!(a.clear_conflicts(None).unwrap(), 1);
    assert!(a.conflicts().unwrap().is_empty());
}

#[test]
fn a_write_made_after_seeing_another_wins_even_with_a_slow_clock() {
    let d = tempfile::tempdir().unwrap();
    let s = schema();
    let (a, _) = open_at(d.path(), "a.db", &s, 9_000_000);
    let (b, _) = open_at(d.path(), "b.db", &s, 1_000); // b's wall clock is far behind
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, title) VALUES ('x', 'a')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    b.execute("UPDATE todo SET title = 'b saw a' WHERE id = 'x'", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    assert_eq!(rows(&a, "SELECT title FROM todo"), vec![vec![t("b saw a")]]);
    assert!(
        a.conflicts().unwrap().is_empty(),
        "sequential writes are not conflicts"
    );
    assert!(b.clock().unwrap() > ferry_core::Hlc::new(9_000_000, 0));
}

#[test]
fn concurrent_counter_increments_add_up() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let c = open(d.path(), "c.db");
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, votes) VALUES ('x', 1)", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b, &c]);
    for (r, n) in [(&a, 2), (&b, 3), (&c, 4)] {
        for _ in 0..n {
            r.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'x'", &[])
                .unwrap();
        }
    }
    b.execute("UPDATE todo SET votes = votes - 10 WHERE id = 'x'", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b, &c]);
    for r in [&a, &b, &c] {
        assert_eq!(
            rows(r, "SELECT votes FROM todo"),
            vec![vec![i(1 + 2 + 3 + 4 - 10)]]
        );
    }
}

/// Returns the surviving rows and the conflict logs of (the deleter, the updater).
fn delete_vs_update(
    rule_update_wins: bool,
    delete_first: bool,
) -> (Vec<Vec<Value>>, Vec<Conflict>, Vec<Conflict>) {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    let table = if rule_update_wins { "note" } else { "todo" };
    let col = if rule_update_wins { "body" } else { "title" };
    a.execute(
        &format!("INSERT INTO {table}(id, {col}) VALUES ('x', 'orig')"),
        &[],
    )
    .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    a.execute(&format!("DELETE FROM {table} WHERE id = 'x'"), &[])
        .unwrap();
    b.execute(
        &format!("UPDATE {table} SET {col} = 'edited' WHERE id = 'x'"),
        &[],
    )
    .unwrap();
    let (first, second) = if delete_first { (&a, &b) } else { (&b, &a) };
    push(&mut seq, first);
    push(&mut seq, second);
    sync_all(&mut seq, &[&a, &b]);
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    (
        rows(&a, &format!("SELECT id, {col} FROM {table}")),
        a.conflicts().unwrap(),
        b.conflicts().unwrap(),
    )
}

#[test]
fn delete_wins_over_concurrent_update_in_either_order() {
    for delete_first in [true, false] {
        let (rows, deleter, updater) = delete_vs_update(false, delete_first);
        assert!(rows.is_empty(), "delete_first={delete_first}: {rows:?}");
        // Each side logs the conflict; the delete wins on both.
        let row_conflict =
            |c: &&Conflict| c.kind == ConflictKind::DeleteUpdate && c.policy == "delete_wins";
        assert!(
            deleter
                .iter()
                .filter(row_conflict)
                .all(|c| c.winner == Winner::Local)
        );
        assert!(
            updater
                .iter()
                .filter(row_conflict)
                .all(|c| c.winner == Winner::Remote)
        );
        assert!(
            deleter.iter().any(|c| row_conflict(&c)) && updater.iter().any(|c| row_conflict(&c))
        );
    }
}

#[test]
fn update_wins_over_concurrent_delete_in_either_order() {
    for delete_first in [true, false] {
        let (rows, deleter, updater) = delete_vs_update(true, delete_first);
        assert_eq!(
            rows,
            vec![vec![t("x"), t("edited")]],
            "delete_first={delete_first}"
        );
        let row_conflict =
            |c: &&Conflict| c.kind == ConflictKind::DeleteUpdate && c.policy == "update_wins";
        assert!(
            deleter
                .iter()
                .filter(row_conflict)
                .all(|c| c.winner == Winner::Remote)
        );
        assert!(
            updater
                .iter()
                .filter(row_conflict)
                .all(|c| c.winner == Winner::Local)
        );
        assert!(
            deleter.iter().any(|c| row_conflict(&c)) && updater.iter().any(|c| row_conflict(&c))
        );
    }
}

#[test]
fn reinsert_after_a_seen_delete_resurrects_the_row() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, title) VALUES ('x', 'one')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    b.execute("DELETE FROM todo WHERE id = 'x'", &[]).unwrap();
    sync_all(&mut seq, &[&a, &b]);
    a.execute("INSERT INTO todo(id, title) VALUES ('x', 'two')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    assert_eq!(rows(&b, "SELECT title FROM todo"), vec![vec![t("two")]]);
    assert!(a.conflicts().unwrap().is_empty() && b.conflicts().unwrap().is_empty());
}

#[test]
fn applying_the_same_change_sets_twice_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, votes) VALUES ('x', 5)", &[])
        .unwrap();
    a.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'x'", &[])
        .unwrap();
    push(&mut seq, &a);
    let (sets, up_to) = seq.changes_after(0, usize::MAX);
    let r1 = b.apply_remote(0, up_to, &sets).unwrap();
    assert_eq!(r1.applied, 2);
    let before = b.dump().unwrap();
    let r2 = b.apply_remote(0, up_to, &sets).unwrap();
    assert_eq!(r2.applied, 0);
    assert_eq!(r2.duplicates, 2);
    assert_eq!(b.dump().unwrap(), before);
    assert_eq!(rows(&b, "SELECT votes FROM todo"), vec![vec![i(6)]]);
    // The origin recognises its own echoes and treats them as acknowledgements.
    let r3 = a.apply_remote(0, up_to, &sets).unwrap();
    assert_eq!(r3.own, 2);
    assert_eq!(r3.applied, 0);
    assert_eq!(a.pending_count().unwrap(), 0);
}

#[test]
fn out_of_order_batches_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    for n in 0..3 {
        a.execute("INSERT INTO todo(id) VALUES (?1)", &[t(&n.to_string())])
            .unwrap();
    }
    push(&mut seq, &a);
    let (sets, _) = seq.changes_after(1, usize::MAX);
    assert!(b.apply_remote(1, 3, &sets).is_err(), "gap before the batch");
    let (sets, _) = seq.changes_after(0, usize::MAX);
    let reversed: Vec<_> = sets.iter().rev().cloned().collect();
    assert!(b.apply_remote(0, 3, &reversed).is_err());
    assert_eq!(b.cursor().unwrap(), 0);
    assert!(rows(&b, "SELECT * FROM todo").is_empty());
}

#[test]
fn a_bad_change_set_is_refused_whole_and_the_ones_before_it_stay() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, title) VALUES ('ok', 'fine')", &[])
        .unwrap();
    push(&mut seq, &a);
    let (mut sets, _) = seq.changes_after(0, 1);
    let mut bad = sets[0].clone();
    bad.server_seq = 2;
    bad.change_set.rows.push(bad.change_set.rows[0].clone());
    bad.change_set.rows[0].pk = t("partial");
    bad.change_set.rows[1].table = "no_such_table".into();
    sets.push(bad);
    let e = b.apply_remote(0, 2, &sets).unwrap_err();
    assert!(e.to_string().contains("no_such_table"), "{e}");
    assert_eq!(b.cursor().unwrap(), 1);
    assert_eq!(
        rows(&b, "SELECT id FROM todo"),
        vec![vec![t("ok")]],
        "no part of the bad set is visible"
    );
}

struct Recorder(Mutex<Vec<(Vec<String>, ChangeSource)>>, Mutex<usize>);
impl Observer for Recorder {
    fn on_change(&self, e: &ferry_core::ChangeEvent) {
        self.0
            .lock()
            .push((e.tables.iter().cloned().collect(), e.source));
    }
    fn on_conflict(&self, _c: &Conflict) {
        *self.1.lock() += 1;
    }
}

#[test]
fn observers_and_watches_see_local_foreign_and_remote_commits_until_dropped() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    let rec = Arc::new(Recorder(Mutex::new(vec![]), Mutex::new(0)));
    let sub = b.subscribe(rec.clone());
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen2 = seen.clone();
    let watch = b
        .watch(
            "SELECT id FROM todo ORDER BY id",
            &[],
            Box::new(move |r| seen2.lock().push(r.rows.len())),
        )
        .unwrap();
    assert_eq!(*seen.lock(), vec![0], "initial result");
    b.execute("INSERT INTO note(id) VALUES ('n')", &[]).unwrap(); // not watched
    a.execute("INSERT INTO todo(id) VALUES ('1'), ('2')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    let orm = rusqlite::Connection::open(d.path().join("b.db")).unwrap();
    orm.execute("INSERT INTO todo(id) VALUES ('3')", [])
        .unwrap();
    assert!(b.capture_foreign().unwrap());
    assert_eq!(*seen.lock(), vec![0, 2, 3]);
    let events = rec.0.lock().clone();
    assert!(events.contains(&(vec!["note".into()], ChangeSource::Local)));
    assert!(events.contains(&(vec!["todo".into()], ChangeSource::Remote)));
    assert!(events.contains(&(vec!["todo".into()], ChangeSource::Foreign)));
    drop(watch);
    drop(sub);
    let n = rec.0.lock().len();
    b.execute("INSERT INTO todo(id) VALUES ('4')", &[]).unwrap();
    assert_eq!(rec.0.lock().len(), n);
    assert_eq!(seen.lock().len(), 3);
}

/// Two replicas (clocks 1 s apart) sharing row `x` of a table with a `custom` column `tags`.
fn custom_doc_pair(dir: &std::path::Path) -> (Replica, Replica, Sequencer) {
    let s = Schema::new(1).table(TableDecl::new("doc").text_key("id").column(
        "tags",
        ferry_core::ColumnType::Text,
        ferry_core::Policy::Custom,
    ));
    let (a, _) = open_at(dir, "a.db", &s, 1_000);
    let (b, _) = open_at(dir, "b.db", &s, 2_000);
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO doc VALUES ('x', 'base')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    (a, b, seq)
}

#[test]
fn custom_resolver_runs_on_the_device_with_the_pending_write_and_its_answer_wins() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, mut seq) = custom_doc_pair(d.path());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let calls2 = calls.clone();
    a.set_resolver(
        "doc",
        Arc::new(move |c: &ferry_core::ConflictInput| {
            calls2.lock().push((c.local.clone(), c.remote.clone()));
            let (Value::Text(l), Value::Text(r)) = (&c.local, &c.remote) else {
                return Resolution::KeepLocal;
            };
            Resolution::Value(Value::Text(format!("{l}+{r}")))
        }),
    )
    .unwrap();
    b.execute("UPDATE doc SET tags = 'b' WHERE id = 'x'", &[])
        .unwrap();
    push(&mut seq, &b);
    a.execute("UPDATE doc SET tags = 'a' WHERE id = 'x'", &[])
        .unwrap(); // pending when b's arrives
    pull(&seq, &a);
    assert_eq!(*calls.lock(), vec![(t("a"), t("b"))]);
    sync_all(&mut seq, &[&a, &b]);
    for r in [&a, &b] {
        assert_eq!(rows(r, "SELECT tags FROM doc"), vec![vec![t("a+b")]]);
    }
    let log = a.conflicts().unwrap();
    assert_eq!(log[0].policy, "custom");
    assert!(log[0].resolution.as_deref().unwrap_or("").contains("a+b"));
}

#[test]
fn custom_resolver_runs_when_the_ack_overtakes_the_concurrent_change() {
    // b pushes after a, and b's ack arrives before a's change reaches b: b's write is no
    // longer unacknowledged, yet it is the later of the two in the relay's order, so b must
    // still run the resolver (and a must not).
    let d = tempfile::tempdir().unwrap();
    let (a, b, mut seq) = custom_doc_pair(d.path());
    let mut calls = Vec::new();
    for (r, name) in [(&a, "a"), (&b, "b")] {
        let c = Arc::new(Mutex::new(Vec::new()));
        let c2 = c.clone();
        r.set_resolver(
            "doc",
            Arc::new(move |c: &ferry_core::ConflictInput| {
                c2.lock().push((c.local.clone(), c.remote.clone()));
                let (Value::Text(l), Value::Text(r)) = (&c.local, &c.remote) else {
                    return Resolution::KeepLocal;
                };
                Resolution::Value(Value::Text(format!("{name}:{l}+{r}")))
            }),
        )
        .unwrap();
        calls.push(c);
    }
    a.execute("UPDATE doc SET tags = 'a' WHERE id = 'x'", &[])
        .unwrap();
    b.execute("UPDATE doc SET tags = 'b' WHERE id = 'x'", &[])
        .unwrap();
    push(&mut seq, &a);
    push(&mut seq, &b); // acknowledged before b has pulled a's change
    pull(&seq, &b);
    pull(&seq, &a);
    assert!(
        calls[0].lock().is_empty(),
        "a's write came first: a does not resolve"
    );
    assert_eq!(*calls[1].lock(), vec![(t("b"), t("a"))]);
    sync_all(&mut seq, &[&a, &b]);
    for r in [&a, &b] {
        assert_eq!(rows(r, "SELECT tags FROM doc"), vec![vec![t("b:b+a")]]);
    }
}

#[test]
fn migrations_add_columns_and_keep_rows_and_capture() {
    let d = tempfile::tempdir().unwrap();
    let v1 = Schema::new(1).table(TableDecl::new("item").text_key("id").text("name"));
    {
        let r = Replica::open(d.path().join("a.db"), &v1).unwrap();
        r.execute("INSERT INTO item VALUES ('1', 'one')", &[])
            .unwrap();
        r.close().unwrap();
    }
    let v2 = Schema::new(2)
        .table(
            TableDecl::new("item")
                .text_key("id")
                .text("name")
                .integer("qty"),
        )
        .migration(
            2,
            "CREATE TABLE settings(k TEXT PRIMARY KEY, v); UPDATE item SET qty = 1;",
        );
    let r = Replica::open(d.path().join("a.db"), &v2).unwrap();
    assert_eq!(
        rows(&r, "SELECT id, name, qty FROM item"),
        vec![vec![t("1"), t("one"), i(1)]]
    );
    r.execute("UPDATE item SET qty = 5 WHERE id = '1'", &[])
        .unwrap();
    let p = r.prepare_push(100, usize::MAX).unwrap();
    assert_eq!(p.len(), 2, "the backfill in the migration is not captured");
    assert_eq!(
        p[1].rows[0].op,
        ferry_core::RowOp::Upsert(vec![ferry_core::Cell::Set("qty".into(), i(5))])
    );
    assert_eq!(p[1].schema_version, 2);
    r.close().unwrap();
    // Opening with the older declaration is refused.
    let e = Replica::open(d.path().join("a.db"), &v1).unwrap_err();
    assert!(
        matches!(
            e,
            ferry_core::Error::AppSchemaTooNew {
                found: 2,
                declared: 1
            }
        ),
        "{e:?}"
    );
}

#[test]
fn refuses_a_file_from_a_newer_ferry_and_bad_tables() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("n.db");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let e = Replica::open(&p, &schema()).unwrap_err();
    assert!(
        matches!(e, ferry_core::Error::SchemaTooNew { found: 99, .. }),
        "{e:?}"
    );
    let p2 = d.path().join("int.db");
    {
        let c = rusqlite::Connection::open(&p2).unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)")
            .unwrap();
    }
    let mut decl = TableDecl::new("t").integer("id").text("name");
    decl.primary_key = Some("id".into());
    let e = Replica::open(&p2, &Schema::new(1).table(decl)).unwrap_err();
    assert!(e.to_string().contains("integer"), "{e}");
}

#[test]
fn closed_replica_says_so_and_reopens() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute("INSERT INTO todo(id) VALUES ('a')", &[]).unwrap();
    let id = r.replica_id().unwrap();
    r.close().unwrap();
    assert!(matches!(
        r.query("SELECT 1", &[]),
        Err(ferry_core::Error::Closed)
    ));
    let r = open(d.path(), "a.db");
    assert_eq!(r.replica_id().unwrap(), id);
    assert_eq!(r.prepare_push(10, usize::MAX).unwrap().len(), 1);
}

#[test]
fn restored_backup_takes_a_new_id_and_reissues_its_pending_changes() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO todo(id, title) VALUES ('1', 'one')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    a.close().unwrap();
    std::fs::copy(d.path().join("a.db"), d.path().join("backup.db")).unwrap();
    let a = open(d.path(), "a.db");
    a.execute("INSERT INTO todo(id, title) VALUES ('2', 'two')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    a.close().unwrap();
    // The device is restored from the backup and writes something new.
    let restored = open(d.path(), "backup.db");
    restored
        .execute("INSERT INTO todo(id, title) VALUES ('3', 'three')", &[])
        .unwrap();
    let old_id = restored.replica_id().unwrap();
    // Same origin_seq count as the relay holds, so the relay catches the reuse by change-set id.
    assert!(
        session_loop(&mut seq, &restored),
        "the client must ask to reconnect"
    );
    assert_ne!(restored.replica_id().unwrap(), old_id);
    sync_all(&mut seq, &[&restored, &b]);
    assert_eq!(
        rows(&b, "SELECT id FROM todo ORDER BY id"),
        vec![vec![t("1")], vec![t("2")], vec![t("3")]]
    );
    assert_eq!(restored.dump().unwrap(), b.dump().unwrap());
}

/// Runs one protocol session; returns true if the client asked to reconnect.
fn session_loop(seq: &mut Sequencer, r: &Replica) -> bool {
    let mut client = ferry_core::sync::SyncClient::new();
    let mut session = seq.session();
    let mut outbox = std::collections::VecDeque::from([client.start(r, "t").unwrap()]);
    while let Some(msg) = outbox.pop_front() {
        for reply in seq.handle(&mut session, msg) {
            let step = client.handle(r, reply).unwrap();
            if step.reconnect {
                return true;
            }
            outbox.extend(step.send);
        }
    }
    assert!(client.is_synced(r).unwrap());
    false
}

#[test]
fn backup_behind_the_relay_is_caught_at_hello() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let mut seq = Sequencer::new();
    a.close().unwrap();
    std::fs::copy(d.path().join("a.db"), d.path().join("backup.db")).unwrap();
    let a = open(d.path(), "a.db");
    a.execute("INSERT INTO todo(id) VALUES ('1')", &[]).unwrap();
    a.execute("INSERT INTO todo(id) VALUES ('2')", &[]).unwrap();
    assert!(!session_loop(&mut seq, &a));
    let restored = open(d.path(), "backup.db");
    restored
        .execute("INSERT INTO todo(id) VALUES ('3')", &[])
        .unwrap();
    let old = restored.replica_id().unwrap();
    assert!(session_loop(&mut seq, &restored));
    assert_ne!(restored.replica_id().unwrap(), old);
    assert!(!session_loop(&mut seq, &restored));
    assert!(!session_loop(&mut seq, &a));
    assert_eq!(a.dump().unwrap(), restored.dump().unwrap());
    assert_eq!(rows(&a, "SELECT count(*) FROM todo"), vec![vec![i(3)]]);
}

/// A `doc` table with an `lww` title and `custom` tags.
fn doc_with_title_and_tags() -> Schema {
    Schema::new(1).table(TableDecl::new("doc").text_key("id").text("title").column(
        "tags",
        ferry_core::ColumnType::Text,
        ferry_core::Policy::Custom,
    ))
}

/// Registers on each replica a resolver answering `local+remote`.
fn join_custom_values(rs: &[&Replica]) {
    for r in rs {
        r.set_resolver(
            "doc",
            Arc::new(|c: &ferry_core::ConflictInput| {
                let (Value::Text(l), Value::Text(r)) = (&c.local, &c.remote) else {
                    return Resolution::KeepLocal;
                };
                Resolution::Value(Value::Text(format!("{l}+{r}")))
            }),
        )
        .unwrap();
    }
}

/// The policies of the conflicts `r` logged for `column`.
fn logged_policies(r: &Replica, column: &str) -> Vec<String> {
    r.conflicts()
        .unwrap()
        .into_iter()
        .filter(|c| c.column.as_deref() == Some(column))
        .map(|c| c.policy)
        .collect()
}

/// A concurrent `lww` edit made in the same transaction as an edit of a `custom` column is a
/// conflict on both devices (each logs the `lww` cell, `docs/conflicts.md`), while only the
/// device whose write came later runs the resolver and logs the `custom` cell.
#[test]
fn an_lww_cell_edited_with_a_custom_cell_is_logged_on_both_devices() {
    // Both orders: the later write still pending when the other arrives, and the later write
    // acknowledged before the other reaches it.
    for ack_first in [false, true] {
        lww_and_custom_in_one_transaction(ack_first);
    }
}

fn lww_and_custom_in_one_transaction(ack_first: bool) {
    let d = tempfile::tempdir().unwrap();
    let s = doc_with_title_and_tags();
    let (a, _) = open_at(d.path(), "a.db", &s, 1_000);
    let (b, _) = open_at(d.path(), "b.db", &s, 2_000);
    let mut seq = Sequencer::new();
    a.execute("INSERT INTO doc VALUES ('x', 'base', 'base')", &[])
        .unwrap();
    sync_all(&mut seq, &[&a, &b]);
    join_custom_values(&[&a, &b]);
    b.execute("UPDATE doc SET title = 'b', tags = 'b' WHERE id = 'x'", &[])
        .unwrap();
    if ack_first {
        a.execute("UPDATE doc SET title = 'a', tags = 'a' WHERE id = 'x'", &[])
            .unwrap();
        push(&mut seq, &b);
        push(&mut seq, &a); // acknowledged before b's change reaches a
        pull(&seq, &a);
        pull(&seq, &b);
    } else {
        push(&mut seq, &b);
        a.execute("UPDATE doc SET title = 'a', tags = 'a' WHERE id = 'x'", &[])
            .unwrap();
        pull(&seq, &a); // a's write still pending
    }
    sync_all(&mut seq, &[&a, &b]);
    sync_all(&mut seq, &[&a, &b]);
    assert_eq!(
        logged_policies(&a, "title"),
        vec!["lww"],
        "{ack_first}: {:?}",
        a.conflicts()
    );
    assert_eq!(
        logged_policies(&b, "title"),
        vec!["lww"],
        "{ack_first}: {:?}",
        b.conflicts()
    );
    assert_eq!(
        logged_policies(&a, "tags"),
        vec!["custom"],
        "{ack_first}: {:?}",
        a.conflicts()
    );
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
}

/// The same through a relay that checks `custom` cells: the later device's change set is
/// refused, re-resolved and rebased. The rebased set must not carry the `lww` cell it lost
/// with its newer clock (the replicas diverged: the other device took the loser), so only
/// the device that resolved logs the `lww` conflict (`docs/conflicts.md`).
#[test]
fn a_rebased_change_set_keeps_the_lww_outcome() {
    let d = tempfile::tempdir().unwrap();
    let s = doc_with_title_and_tags();
    let (a, _) = open_at(d.path(), "a.db", &s, 1_000);
    let (b, _) = open_at(d.path(), "b.db", &s, 2_000);
    let mut seq = Sequencer::with_schema(&s);
    a.execute("INSERT INTO doc VALUES ('x', 'base', 'base')", &[])
        .unwrap();
    for r in [&a, &b, &a] {
        sync_via_client(&mut seq, r, 0);
    }
    join_custom_values(&[&a, &b]);
    // b (its clock 1 s ahead) writes and pushes first; a, offline, writes both columns.
    b.execute("UPDATE doc SET title = 'b', tags = 'b' WHERE id = 'x'", &[])
        .unwrap();
    sync_via_client(&mut seq, &b, 0);
    a.execute("UPDATE doc SET title = 'a', tags = 'a' WHERE id = 'x'", &[])
        .unwrap();
    for _ in 0..3 {
        sync_via_client(&mut seq, &a, 0);
        sync_via_client(&mut seq, &b, 0);
    }
    assert_eq!(
        a.dump().unwrap(),
        b.dump().unwrap(),
        "the replicas diverged"
    );
    assert_eq!(
        rows(&a, "SELECT title, tags FROM doc"),
        vec![vec![t("b"), t("a+b")]],
        "b's title has the later clock and wins; a's resolver answers for tags"
    );
    assert_eq!(
        logged_policies(&a, "title"),
        vec!["lww"],
        "{:?}",
        a.conflicts()
    );
    assert_eq!(
        logged_policies(&a, "tags"),
        vec!["custom"],
        "{:?}",
        a.conflicts()
    );
    assert!(
        logged_policies(&b, "title").is_empty(),
        "the rebased set no longer carries a's title: {:?}",
        b.conflicts()
    );
}
