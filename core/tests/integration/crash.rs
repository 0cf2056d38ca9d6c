//! Crash safety: a process killed (SIGKILL) in the middle of applying a large remote batch, or
//! in the middle of local writes, reopens consistent: no half change set is visible, the
//! cursor matches the contents, origin_seq has no gap, and the work can be finished.
//!
//! The test binary re-runs itself as the child (`crash_child`, a no-op unless
//! `FERRY_CRASH_CHILD` is set) so the kill hits real Ferry code mid-flight.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{Cell, Replica, ReplicaId, RowChange, RowOp, Sequenced, Value};
use ferry_testkit::change::*;
use ferry_testkit::local::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const ROWS_PER_SET: usize = 50;
const SETS: u64 = 400;

fn remote_log() -> Vec<Sequenced> {
    let mut seq = Sequencer::new();
    for s in 1..=SETS {
        let rows: Vec<RowChange> = (0..ROWS_PER_SET)
            .map(|k| RowChange {
                table: "todo".into(),
                pk: Value::Text(format!("s{s}-r{k}")),
                cl: 1,
                op: RowOp::Upsert(vec![
                    Cell::Set("title".into(), Value::Text("x".repeat(40))),
                    Cell::Set("done".into(), Value::Integer(s as i64)),
                    Cell::Add("votes".into(), 1),
                    Cell::Set("list".into(), Value::Text(format!("set{s}"))),
                ]),
            })
            .collect();
        seq.push(
            change_set(ReplicaId([0xAB; 16]), s)
                .hlc(ferry_core::Hlc::new(1_000 + s, 0))
                .rows(rows)
                .build(),
        )
        .unwrap();
    }
    seq.changes_after(0, usize::MAX).0
}

fn spawn(mode: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash::crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FERRY_CRASH_CHILD", mode)
        .env("FERRY_CRASH_DIR", dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_ready(dir: &Path) {
    let t = Instant::now();
    while !dir.join("ready").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "child never got ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::remove_file(dir.join("ready")).unwrap();
}

/// The child: does the work forever (until killed or done).
#[test]
fn crash_child() {
    let Ok(mode) = std::env::var("FERRY_CRASH_CHILD") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("FERRY_CRASH_DIR").unwrap());
    // One change set per transaction, so the parent can see progress and kill mid-way.
    let opts = ferry_core::OpenOptions {
        apply_chunk_ops: 1,
        ..Default::default()
    };
    let r = Replica::open_with(dir.join("victim.db"), &schema(), opts).unwrap();
    std::fs::write(dir.join("ready"), b"").unwrap();
    match mode.as_str() {
        "apply" => {
            let log: Vec<Sequenced> =
                rmp_serde::from_slice(&std::fs::read(dir.join("log.bin")).unwrap()).unwrap();
            let cursor = r.cursor().unwrap();
            let rest: Vec<Sequenced> = log.into_iter().filter(|s| s.server_seq > cursor).collect();
            r.apply_remote(cursor, SETS, &rest).unwrap();
        }
        "write" => {
            let start = r.pending_count().unwrap();
            for n in start.. {
                r.write(|tx| {
                    for k in 0..ROWS_PER_SET {
                        tx.execute(
                            "INSERT INTO todo(id, title, list) VALUES (?1, ?2, ?3)",
                            &[
                                t(&format!("t{n}-{k}")),
                                t(&"y".repeat(40)),
                                t(&format!("tx{n}")),
                            ],
                        )?;
                    }
                    Ok(())
                })
                .unwrap();
            }
        }
        _ => unreachable!(),
    }
}

/// Every change set is all there or not there, and exactly those at or below the cursor.
fn check_apply_consistent(r: &Replica) -> u64 {
    let cursor = r.cursor().unwrap();
    let per_set = rows(
        r,
        "SELECT done, count(*), sum(votes) FROM todo GROUP BY done ORDER BY done",
    );
    assert_eq!(
        per_set.len() as u64,
        cursor,
        "sets present must be exactly 1..=cursor"
    );
    for (i, row) in per_set.iter().enumerate() {
        assert_eq!(row[0], Value::Integer(i as i64 + 1));
        assert_eq!(
            row[1],
            Value::Integer(ROWS_PER_SET as i64),
            "half-applied change set {}",
            i + 1
        );
        assert_eq!(row[2], Value::Integer(ROWS_PER_SET as i64));
    }
    cursor
}

#[test]
fn killed_mid_apply_reopens_consistent_and_finishes() {
    let d = tempfile::tempdir().unwrap();
    let log = remote_log();
    std::fs::write(d.path().join("log.bin"), rmp_serde::to_vec(&log).unwrap()).unwrap();
    let mut cursors = Vec::new();
    let mut rng = rand::rng();
    for round in 0..6 {
        let mut child = spawn("apply", d.path());
        wait_ready(d.path());
        // Kill once the child's committed cursor passes a random point (read through a
        // connection of our own), so the kill lands while it is applying.
        let target = rand::RngExt::random_range(&mut rng, 1..SETS - 20);
        let watcher = rusqlite::Connection::open(d.path().join("victim.db")).unwrap();
        let started = Instant::now();
        loop {
            let c: i64 = watcher
                .query_row(
                    "SELECT value FROM ferry_meta WHERE key = 'cursor'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            if c as u64 >= target || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        child.kill().ok(); // SIGKILL
        drop(watcher);
        child.wait().unwrap();
        let r = open(d.path(), "victim.db");
        let c = check_apply_consistent(&r);
        cursors.push(c);
        r.close().unwrap();
        if c == SETS {
            eprintln!("round {round}: child finished before the kill");
        }
    }
    eprintln!("cursors after kills: {cursors:?}");
    assert!(
        cursors.iter().any(|c| *c > 0 && *c < SETS),
        "no kill landed mid-apply: {cursors:?}"
    );
    let r = open(d.path(), "victim.db");
    let cursor = r.cursor().unwrap();
    let rest: Vec<Sequenced> = log.into_iter().filter(|s| s.server_seq > cursor).collect();
    r.apply_remote(cursor, SETS, &rest).unwrap();
    assert_eq!(check_apply_consistent(&r), SETS);
}

#[test]
fn killed_mid_write_reopens_with_whole_transactions_and_gap_free_log() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    for _ in 0..5 {
        let mut child = spawn("write", d.path());
        wait_ready(d.path());
        std::thread::sleep(Duration::from_millis(rand::RngExt::random_range(
            &mut rng,
            5..80u64,
        )));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let r = open(d.path(), "victim.db");
    let groups = rows(&r, "SELECT list, count(*) FROM todo GROUP BY list");
    assert!(!groups.is_empty(), "the child never committed anything");
    for g in &groups {
        assert_eq!(
            g[1],
            Value::Integer(ROWS_PER_SET as i64),
            "partial transaction {:?}",
            g[0]
        );
    }
    let pending = r.prepare_push(usize::MAX, usize::MAX).unwrap();
    assert_eq!(
        pending.len(),
        groups.len(),
        "one change set per committed transaction"
    );
    for (i, cs) in pending.iter().enumerate() {
        assert_eq!(cs.origin_seq, i as u64 + 1, "origin_seq must have no gap");
        assert_eq!(cs.rows.len(), ROWS_PER_SET);
    }
    // And they sync whole.
    let mut seq = Sequencer::new();
    let other = open(d.path(), "other.db");
    sync_all(&mut seq, &[&r, &other]);
    assert_eq!(r.dump().unwrap(), other.dump().unwrap());
}
