//! Ferry's benchmarks: each workload run on plain rusqlite and on a Ferry replica, in the same
//! process, same pragmas, same table shape, and reported as a ratio (Ferry / plain). Wall-clock
//! figures differ between machines; the ratios are what `docs/benchmarks.md` tracks.
//!
//! `cargo run --release -p ferry-core --bin ferry-bench -- [--rows N] [--repeat K]`
#![allow(clippy::print_stdout)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{Replica, Schema, TableDecl, Value};
use rusqlite::{Connection, params};
use std::path::Path;
use std::time::{Duration, Instant};

const TX: usize = 1_000;

fn schema() -> Schema {
    Schema::new(1).table(
        TableDecl::new("t")
            .text_key("id")
            .text("a")
            .integer("b")
            .real("c")
            .text("d")
            .integer("e"),
    )
}

fn plain(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open plain");
    ferry_core::configure_sqlite(&c).expect("pragmas");
    c.execute_batch(
        "CREATE TABLE t (id TEXT NOT NULL, a TEXT, b INTEGER, c REAL, d TEXT, e INTEGER, PRIMARY KEY (id))",
    )
    .expect("create");
    c
}

fn row(i: usize) -> [Value; 6] {
    [
        Value::Text(format!("{:026}", i * 7919 % 1_000_003)),
        Value::Text(format!("title number {i}")),
        Value::Integer(i as i64),
        Value::Real(i as f64 * 0.5),
        Value::Text("lorem ipsum dolor".into()),
        Value::Integer((i % 7) as i64),
    ]
}

const INSERT: &str = "INSERT INTO t (id, a, b, c, d, e) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const UPDATE: &str = "UPDATE t SET b = ?1 WHERE id = ?2";
const SELECT: &str = "SELECT id, a, b, c, d, e FROM t WHERE id = ?1";

fn plain_insert(c: &mut Connection, n: usize) {
    plain_insert_range(c, 0..n);
}

/// Inserts rows `ids` in transactions of `TX` rows.
fn plain_insert_range(c: &mut Connection, ids: std::ops::Range<usize>) {
    for chunk in ids.collect::<Vec<_>>().chunks(TX) {
        let tx = c.transaction().expect("tx");
        {
            let mut st = tx.prepare_cached(INSERT).expect("prep");
            for i in chunk {
                st.execute(rusqlite::params_from_iter(row(*i).iter()))
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
}

fn ferry_insert(r: &Replica, n: usize) {
    ferry_insert_range(r, 0..n);
}

/// Writes rows `ids` through Ferry in transactions of `TX` rows.
fn ferry_insert_range(r: &Replica, ids: std::ops::Range<usize>) {
    for chunk in ids.collect::<Vec<_>>().chunks(TX) {
        r.write(|tx| {
            let mut st = tx.prepare(INSERT)?;
            for i in chunk {
                st.execute(&row(*i))?;
            }
            Ok(())
        })
        .expect("ferry insert");
    }
}

fn plain_update(c: &mut Connection, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(TX) {
        let tx = c.transaction().expect("tx");
        {
            let mut st = tx.prepare_cached(UPDATE).expect("prep");
            for i in chunk {
                st.execute(params![-(*i as i64), row(*i)[0]])
                    .expect("update");
            }
        }
        tx.commit().expect("commit");
    }
}

fn ferry_update(r: &Replica, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(TX) {
        r.write(|tx| {
            let mut st = tx.prepare(UPDATE)?;
            for i in chunk {
                st.execute(&[Value::Integer(-(*i as i64)), row(*i)[0].clone()])?;
            }
            Ok(())
        })
        .expect("ferry update");
    }
}

fn plain_reads(c: &Connection, n: usize) -> usize {
    let mut st = c.prepare_cached(SELECT).expect("prep");
    let mut found = 0;
    for i in 0..n {
        let v: Vec<Vec<Value>> = st
            .query_map([&row(i)[0]], |r| {
                (0..6).map(|k| r.get::<_, Value>(k)).collect()
            })
            .expect("q")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        found += v.len();
    }
    found
}

fn ferry_reads(r: &Replica, n: usize) -> usize {
    let mut found = 0;
    for i in 0..n {
        found += r.query(SELECT, &[row(i)[0].clone()]).expect("q").rows.len();
    }
    found
}

/// Latencies of point reads, in microseconds: (p50, p99, max, reads).
type Latency = (f64, f64, f64, usize);

fn percentiles(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99), at(1.0), v.len())
}

/// Point reads of `keys` in a loop until `done`, each timed.
fn timed_reads(done: &std::sync::atomic::AtomicBool, mut read: impl FnMut(usize)) -> Vec<Duration> {
    let mut lat = Vec::new();
    let mut i = 0usize;
    while !done.load(std::sync::atomic::Ordering::Acquire) || lat.len() < 100 {
        let t = Instant::now();
        read(i);
        lat.push(t.elapsed());
        i = i.wrapping_add(7);
    }
    lat
}

/// R3: a UI thread's point reads while `n` remote rows are applied on another thread (Ferry),
/// against point reads on one plain connection while another connection inserts `n` rows in
/// transactions of `TX` (plain SQLite's own reader/writer concurrency in WAL mode). Both
/// replicas hold `base` rows to read first.
fn read_latency(dir: &Path, n: usize, base: usize) -> (Latency, Latency) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Plain.
    let mut c = plain(&dir.join("lat-plain.db"));
    plain_insert(&mut c, base);
    let done = AtomicBool::new(false);
    let plain_lat = std::thread::scope(|s| {
        s.spawn(|| {
            let mut w = Connection::open(dir.join("lat-plain.db")).expect("open writer");
            ferry_core::configure_sqlite(&w).expect("pragmas");
            plain_insert_range(&mut w, base..base + n);
            done.store(true, Ordering::Release);
        });
        let mut st = c.prepare_cached(SELECT).expect("prep");
        timed_reads(&done, |i| {
            let found = st
                .query_map([&row(i % base)[0]], |r| r.get::<_, Value>(0))
                .expect("q")
                .count();
            assert_eq!(found, 1);
        })
    });
    // Ferry: the change sets of two writers, the first applied before the reads start.
    let a = Replica::open(dir.join("lat-a.db"), &schema()).expect("open");
    let b = Replica::open(dir.join("lat-b.db"), &schema()).expect("open");
    ferry_insert(&a, base);
    ferry_insert_range(&b, base..base + n);
    let mut seq = Sequencer::new();
    for cs in a.prepare_push(usize::MAX, usize::MAX).expect("pending") {
        seq.push(cs).expect("push");
    }
    let (first, up_a) = seq.changes_after(0, usize::MAX);
    for cs in b.prepare_push(usize::MAX, usize::MAX).expect("pending") {
        seq.push(cs).expect("push");
    }
    let (second, up_b) = seq.changes_after(up_a, usize::MAX);
    let dst = Replica::open(dir.join("lat-dst.db"), &schema()).expect("open");
    dst.apply_remote(0, up_a, &first).expect("apply first");
    let done = AtomicBool::new(false);
    let ferry_lat = std::thread::scope(|s| {
        s.spawn(|| {
            dst.apply_remote(up_a, up_b, &second).expect("apply second");
            done.store(true, Ordering::Release);
        });
        timed_reads(&done, |i| {
            let rows = dst.query(SELECT, &[row(i % base)[0].clone()]).expect("q");
            assert_eq!(rows.rows.len(), 1);
        })
    });
    (percentiles(plain_lat), percentiles(ferry_lat))
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed(), v)
}

struct Result {
    name: &'static str,
    plain: Vec<Duration>,
    ferry: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut n = 100_000usize;
    let mut repeat = 3usize;
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().collect();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rows" => n = it.next().and_then(|v| v.parse().ok()).unwrap_or(n),
            "--repeat" => repeat = it.next().and_then(|v| v.parse().ok()).unwrap_or(repeat),
            "--only" => only = it.next().cloned(),
            _ => {
                eprintln!(
                    "usage: ferry-bench [--rows N] [--repeat K] [--only local|apply|latency]"
                );
                std::process::exit(2);
            }
        }
    }
    let mut results = [
        Result {
            name: "W1 insert (txn of 1000)",
            plain: vec![],
            ferry: vec![],
        },
        Result {
            name: "W1b insert + materialize for push",
            plain: vec![],
            ferry: vec![],
        },
        Result {
            name: "W2 update one column (txn of 1000)",
            plain: vec![],
            ferry: vec![],
        },
        Result {
            name: "W3 apply remote rows into empty replica",
            plain: vec![],
            ferry: vec![],
        },
        Result {
            name: "R point reads by key (Replica::query)",
            plain: vec![],
            ferry: vec![],
        },
        Result {
            name: "R2 point reads, own connection on the file",
            plain: vec![],
            ferry: vec![],
        },
    ];
    for round in 0..repeat {
        let dir = tempfile_dir(round);
        let local = only.as_deref() != Some("apply");
        let apply = only.as_deref() != Some("local");
        // W1 + W2 + reads
        if local {
            let mut c = plain(&dir.join("plain.db"));
            let (tp, _) = time(|| plain_insert(&mut c, n));
            let r = Replica::open(dir.join("ferry.db"), &schema()).expect("open");
            let (tf, _) = time(|| ferry_insert(&r, n));
            results[0].plain.push(tp);
            results[0].ferry.push(tf);
            let (tm, _) = time(|| {
                r.prepare_push(usize::MAX, usize::MAX)
                    .expect("materialize")
                    .len()
            });
            results[1].plain.push(tp);
            results[1].ferry.push(tf + tm);

            let (tp, _) = time(|| plain_update(&mut c, n));
            let (tf, _) = time(|| ferry_update(&r, n));
            results[2].plain.push(tp);
            results[2].ferry.push(tf);

            let (tp, a) = time(|| plain_reads(&c, n));
            let (tf, b) = time(|| ferry_reads(&r, n));
            assert_eq!(a, b);
            results[4].plain.push(tp);
            results[4].ferry.push(tf);
            // The app's own connection (e.g. its ORM) reading a Ferry replica file.
            let own = Connection::open(dir.join("ferry.db")).expect("open own");
            ferry_core::configure_sqlite(&own).expect("pragmas");
            let (tp, a) = time(|| plain_reads(&c, n));
            let (tf, b) = time(|| plain_reads(&own, n));
            assert_eq!(a, b);
            results[5].plain.push(tp);
            results[5].ferry.push(tf);
        }
        if apply {
            // W3: the change sets replica A would push, applied into an empty replica.
            let src = Replica::open(dir.join("src.db"), &schema()).expect("open");
            ferry_insert(&src, n);
            let mut seq = Sequencer::new();
            for cs in src.prepare_push(usize::MAX, usize::MAX).expect("pending") {
                seq.push(cs).expect("push");
            }
            let (log, up_to) = seq.changes_after(0, usize::MAX);
            let dst = Replica::open(dir.join("dst.db"), &schema()).expect("open");
            let (tf, _) = time(|| dst.apply_remote(0, up_to, &log).expect("apply"));
            let mut c2 = plain(&dir.join("plain2.db"));
            let (tp, _) = time(|| plain_insert(&mut c2, n));
            assert_eq!(
                dst.query("SELECT count(*) FROM t", &[])
                    .expect("count")
                    .rows[0][0],
                Value::Integer(n as i64)
            );
            results[3].plain.push(tp);
            results[3].ferry.push(tf);
            drop(c2);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if only.is_none() || only.as_deref() == Some("latency") {
        let dir = tempfile_dir(usize::MAX);
        let (p, f) = read_latency(&dir, n, 10_000);
        println!(
            "R3 point-read latency while {n} remote rows apply (µs): plain p50 {:.0} p99 {:.0} \
             max {:.0} ({} reads); ferry p50 {:.0} p99 {:.0} max {:.0} ({} reads); p99 ratio {:.2}x",
            p.0,
            p.1,
            p.2,
            p.3,
            f.0,
            f.1,
            f.2,
            f.3,
            f.1 / p.1
        );
        let _ = std::fs::remove_dir_all(&dir);
        if only.as_deref() == Some("latency") {
            return;
        }
    }
    println!("rows: {n}, transactions of {TX}, rounds: {repeat} (median shown)");
    println!(
        "{:<42} {:>12} {:>12} {:>8}",
        "workload", "plain ms", "ferry ms", "ratio"
    );
    for r in results.iter().filter(|r| !r.plain.is_empty()) {
        let p = median(&r.plain);
        let f = median(&r.ferry);
        println!(
            "{:<42} {:>12.1} {:>12.1} {:>7.2}x",
            r.name,
            p.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            f.as_secs_f64() / p.as_secs_f64()
        );
    }
}

fn tempfile_dir(round: usize) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-bench-{}-{round}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("bench dir");
    d
}
