//! The owned write transaction (`Replica::begin`) the FFI builds on: same capture as
//! `Replica::write`, rollback on drop, and an error instead of a deadlock for a thread that
//! calls the replica while it holds a transaction.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::{Error, Value};
use ferry_testkit::local::*;
use std::sync::{Arc, Mutex};

fn titles(r: &ferry_core::Replica) -> Vec<Value> {
    r.query("SELECT title FROM todo ORDER BY id", &[])
        .unwrap()
        .rows
        .into_iter()
        .map(|mut v| v.remove(0))
        .collect()
}

#[test]
fn commit_makes_one_change_set_of_everything_written() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut tx = r.begin().unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'milk')", &[])
        .unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('b', 'eggs')", &[])
        .unwrap();
    // The transaction sees its own writes.
    let n = tx.query("SELECT count(*) FROM todo", &[]).unwrap();
    assert_eq!(n.rows[0][0], Value::Integer(2));
    tx.commit().unwrap();
    let p = r.prepare_push(100, usize::MAX).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].rows.len(), 2);
    assert_eq!(titles(&r), vec![t("milk"), t("eggs")]);
    // Finished: further use is a typed error, not a panic.
    assert!(matches!(
        tx.execute("DELETE FROM todo", &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(tx.commit(), Err(Error::InvalidInput(_))));
    assert!(tx.rollback().is_ok());
}

#[test]
fn rollback_and_drop_keep_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut tx = r.begin().unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'milk')", &[])
        .unwrap();
    tx.rollback().unwrap();
    {
        let tx = r.begin().unwrap();
        tx.execute("INSERT INTO todo(id, title) VALUES ('b', 'eggs')", &[])
            .unwrap();
    }
    assert!(titles(&r).is_empty());
    assert_eq!(r.pending_count().unwrap(), 0);
    // The replica is usable afterwards and capture still works.
    r.execute("INSERT INTO todo(id, title) VALUES ('c', 'tea')", &[])
        .unwrap();
    assert_eq!(r.pending_count().unwrap(), 1);
}

#[test]
fn same_thread_replica_call_errors_instead_of_deadlocking() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut tx = r.begin().unwrap();
    assert!(matches!(
        r.query("SELECT 1", &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(r.begin(), Err(Error::InvalidInput(_))));
    assert!(matches!(
        r.execute("INSERT INTO todo(id) VALUES ('x')", &[]),
        Err(Error::InvalidInput(_))
    ));
    tx.commit().unwrap();
    assert_eq!(r.query("SELECT 1", &[]).unwrap().rows.len(), 1);
}

#[test]
fn other_threads_read_the_last_commit_without_waiting_and_write_after_it() {
    let d = tempfile::tempdir().unwrap();
    let r = Arc::new(open(d.path(), "a.db"));
    r.execute("INSERT INTO todo(id, title) VALUES ('0', 'bread')", &[])
        .unwrap();
    let mut tx = r.begin().unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'milk')", &[])
        .unwrap();
    // A read on another thread does not wait for the open transaction (its connection is
    // one of the read-only ones) and sees the last commit, not the uncommitted row.
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    let r2 = Arc::clone(&r);
    std::thread::spawn(move || read_tx.send(titles(&r2)).unwrap());
    let during = read_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a read waited for the write transaction");
    assert_eq!(during, vec![t("bread")]);
    // A write on another thread waits for the commit.
    let (write_tx, write_rx) = std::sync::mpsc::channel();
    let r3 = Arc::clone(&r);
    std::thread::spawn(move || {
        r3.execute("UPDATE todo SET title = 'oat milk' WHERE id = 'a'", &[])
            .unwrap();
        write_tx.send(()).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        write_rx.try_recv().is_err(),
        "a write did not wait for the transaction"
    );
    tx.commit().unwrap();
    write_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap();
    // Read after a commit on another thread: the commit is there.
    assert_eq!(titles(&r), vec![t("bread"), t("oat milk")]);
}

#[test]
fn watches_and_observers_fire_on_commit_only() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let _w = r
        .watch(
            "SELECT count(*) FROM todo",
            &[],
            Box::new(move |rows| s2.lock().unwrap().push(rows.rows[0][0].clone())),
        )
        .unwrap();
    let mut tx = r.begin().unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('a', 'milk')", &[])
        .unwrap();
    tx.rollback().unwrap();
    let mut tx = r.begin().unwrap();
    tx.execute("INSERT INTO todo(id, title) VALUES ('b', 'eggs')", &[])
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing before commit");
    tx.commit().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Value::Integer(0), Value::Integer(1)]
    );
}

#[test]
fn execute_many_is_one_change_set_and_stops_at_the_first_error() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut tx = r.begin().unwrap();
    let rows: Vec<Vec<Value>> = (0..100)
        .map(|i| vec![t(&format!("k{i:03}")), t("x")])
        .collect();
    let sql = "INSERT INTO todo(id, title) VALUES (?1, ?2)";
    assert_eq!(tx.execute_many(sql, &rows).unwrap(), 100);
    tx.commit().unwrap();
    let p = r.prepare_push(100, usize::MAX).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].rows.len(), 100);
    // A duplicate key in the middle: an error, and rolling back keeps nothing of the batch.
    let mut tx = r.begin().unwrap();
    let bad = vec![vec![t("new1"), t("y")], vec![t("k000"), t("dup")]];
    assert!(tx.execute_many(sql, &bad).is_err());
    tx.rollback().unwrap();
    assert_eq!(
        r.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0],
        Value::Integer(100)
    );
}

#[test]
fn closing_after_concurrent_reads_releases_the_file() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("a.db");
    let wal = d.path().join("a.db-wal");
    {
        let r = Arc::new(open(d.path(), "a.db"));
        r.execute("INSERT INTO todo(id, title) VALUES ('a', 'milk')", &[])
            .unwrap();
        // Several threads at once: several read connections.
        let readers: Vec<_> = (0..6)
            .map(|_| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        assert_eq!(titles(&r), vec![t("milk")]);
                    }
                })
            })
            .collect();
        for h in readers {
            h.join().unwrap();
        }
        assert!(wal.exists());
        r.close().unwrap();
        assert!(matches!(titles_result(&r), Err(Error::Closed)));
    }
    // The writer closed last: SQLite checkpointed and removed the WAL file.
    assert!(!wal.exists(), "the WAL file outlived the replica");
    // Dropping without close does the same.
    {
        let r = ferry_core::Replica::open(&path, &schema()).unwrap();
        assert_eq!(titles(&r), vec![t("milk")]);
    }
    assert!(!wal.exists(), "the WAL file outlived a dropped replica");
}

fn titles_result(r: &ferry_core::Replica) -> ferry_core::Result<ferry_core::Rows> {
    r.query("SELECT title FROM todo", &[])
}

/// A watch started while other threads commit ends on the latest result: no commit falls
/// between its first run and its registration, and no older result is delivered after a
/// newer one (many rounds, each racing a watch against two committing threads).
#[test]
fn a_watch_started_during_commits_ends_on_the_latest_result() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    let mut made = 0;
    for round in 0..300 {
        let latest = Arc::new(Mutex::new(None));
        let l2 = Arc::clone(&latest);
        let w = std::thread::scope(|s| {
            for k in 0..2 {
                let r = &r;
                s.spawn(move || {
                    r.execute(
                        "INSERT INTO todo(id, title) VALUES (?, 't')",
                        &[Value::Text(format!("{round}-{k}"))],
                    )
                    .unwrap();
                });
            }
            r.watch(
                "SELECT count(*) FROM todo",
                &[],
                Box::new(move |rows| {
                    // A slow callback widens the window a commit could fall into.
                    let v = rows.rows[0][0].clone();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    *l2.lock().unwrap() = Some(v);
                }),
            )
            .unwrap()
        });
        made += 2;
        assert_eq!(
            *latest.lock().unwrap(),
            Some(Value::Integer(made)),
            "round {round}"
        );
        drop(w);
    }
}
