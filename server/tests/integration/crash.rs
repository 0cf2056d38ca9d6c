//! Crashes: the relay SIGKILLed again and again while clients push; a client process killed
//! in the middle of a download. Nothing acknowledged is lost or duplicated, and everyone
//! converges.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::{Replica, Value};
use ferry_testkit::relay::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[test]
fn relay_killed_repeatedly_while_clients_push_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let writers = 4;
    let rs: Vec<Arc<Replica>> = (0..writers)
        .map(|i| open(d.path(), &format!("w{i}.db")))
        .collect();
    let hs: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| connect(r, &url, admin_token(&format!("w{i}"))))
        .collect();
    rs[0]
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('hits', 'l', 'counter')",
            &[],
        )
        .unwrap();
    wait_synced(&hs[0]);
    for h in &hs {
        wait_synced(h);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(w, r)| {
            let r = Arc::clone(r);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    r.write(|tx| {
                        tx.execute(
                            "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
                            &[Value::Text(format!("w{w}-{n}"))],
                        )?;
                        tx.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'hits'", &[])
                    })
                    .unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                n
            })
        })
        .collect();
    let kills = 20;
    for k in 0..kills {
        // Let some pushes through, then kill in the middle of the stream.
        let target = store_dump(&relay.dir).len() + 5;
        let deadline = Instant::now() + Duration::from_secs(10);
        while store_dump(&relay.dir).len() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        relay.restart();
        eprintln!("kill {k}: relay restarted");
    }
    stop.store(true, Ordering::Relaxed);
    let written: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for _ in 0..2 {
        for h in &hs {
            wait_synced(h);
        }
    }
    let total: u64 = written.iter().sum();
    let issued: u64 = rs.iter().map(|r| r.last_origin_seq().unwrap()).sum();
    let logged = check_log(&relay) as u64;
    assert_eq!(
        logged, issued,
        "every local change set is in the relay's log exactly once"
    );
    for (i, r) in rs.iter().enumerate() {
        assert_eq!(r.pending_count().unwrap(), 0);
        let rows = r
            .query("SELECT count(*) FROM todo WHERE id != 'hits'", &[])
            .unwrap();
        assert_eq!(
            rows.rows[0][0],
            Value::Integer(total as i64),
            "replica {i} misses rows"
        );
        let hits = r
            .query("SELECT votes FROM todo WHERE id = 'hits'", &[])
            .unwrap();
        assert_eq!(
            hits.rows[0][0],
            Value::Integer(total as i64),
            "replica {i}: counter"
        );
    }
    let d0 = rs[0].dump().unwrap();
    for r in &rs[1..] {
        assert_eq!(d0, r.dump().unwrap());
    }
    for (h, r) in hs.iter().zip(&rs) {
        assert!(
            h.verify_blocking(r, Duration::from_secs(30))
                .unwrap()
                .matches()
        );
    }
    eprintln!("{kills} kills, {total} transactions, {logged} change sets");
}

const CHILD_ENV: &str = "FERRY_TEST_CHILD_DOWNLOAD";
const BATCH: i64 = 7;

/// Runs in a child process: opens the replica and syncs until killed.
#[test]
#[ignore = "child process of client_killed_mid_download_reopens_consistent"]
fn child_download() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (path, url, token) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    let r = Arc::new(Replica::open(&path, &schema()).unwrap());
    let mut opts = fast_opts();
    opts.ping_interval = Duration::from_secs(30);
    let h = r
        .connect_with(&url, Arc::new(move || Ok(token.clone())), opts)
        .unwrap();
    h.sync_now_blocking(Duration::from_secs(300)).unwrap();
    std::thread::sleep(Duration::from_secs(300));
}

fn batches_whole(r: &Replica) {
    let rows = r
        .query(
            "SELECT title, count(*) FROM todo WHERE list = 'bulk' GROUP BY title",
            &[],
        )
        .unwrap();
    for row in rows.rows {
        assert_eq!(
            row[1],
            Value::Integer(BATCH),
            "a change set was applied in part: {row:?}"
        );
    }
}

#[test]
fn client_killed_mid_download_reopens_consistent() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let src = open(d.path(), "src.db");
    let hsrc = connect(&src, &url, admin_token("src"));
    let sets = 4000;
    for b in 0..sets {
        src.write(|tx| {
            let mut st = tx.prepare("INSERT INTO todo(id, list, title) VALUES (?1, 'bulk', ?2)")?;
            for i in 0..BATCH {
                st.execute(&[
                    Value::Text(format!("b{b}-{i}")),
                    Value::Text(format!("batch{b}")),
                ])?;
            }
            Ok(())
        })
        .unwrap();
    }
    wait_synced(&hsrc);
    let path = d.path().join("victim.db");
    drop(Replica::open(&path, &schema()).unwrap());
    let mut killed_at = Vec::new();
    for attempt in 0..3 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash::child_download",
                "--nocapture",
            ])
            .env(
                CHILD_ENV,
                format!("{}|{url}|{}", path.display(), admin_token("victim")),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill once the download is under way but not finished.
        let floor = (attempt as u64 + 1) * sets / 5;
        let deadline = Instant::now() + Duration::from_secs(60);
        let cursor = loop {
            let c = read_cursor(&path);
            if c > floor || Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        killed_at.push(cursor);
        let r = Replica::open(&path, &schema()).unwrap();
        batches_whole(&r);
        assert!(r.cursor().unwrap() >= cursor, "cursor went back");
        r.close().unwrap();
    }
    assert!(
        killed_at.iter().any(|c| *c > 0 && *c < sets),
        "the kills should land mid-download: {killed_at:?}"
    );
    let victim = Arc::new(Replica::open(&path, &schema()).unwrap());
    let hv = connect(&victim, &url, admin_token("victim"));
    wait_synced(&hv);
    batches_whole(&victim);
    assert_eq!(victim.dump().unwrap(), src.dump().unwrap());
    assert!(
        hv.verify_blocking(&victim, Duration::from_secs(30))
            .unwrap()
            .matches()
    );
    eprintln!("killed at cursors {killed_at:?} of {sets}");
}

fn read_cursor(path: &std::path::Path) -> u64 {
    let Ok(c) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    c.query_row(
        "SELECT value FROM ferry_meta WHERE key = 'cursor'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u64)
    .unwrap_or(0)
}
