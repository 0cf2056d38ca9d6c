//! Consistency modes against a real relay on 127.0.0.1: compare-and-set under contention
//! with a linearizability check of the recorded history, leases with fencing tokens across a
//! stop-the-world pause, and `custom` columns re-resolved after the relay's check.
//!
//! The history checker is a small Wing–Gong search (with Lowe's memoisation of
//! `(linearized set, register value)`): it looks for a total order of the recorded operations
//! that respects real time (an operation that completed before another began comes first)
//! and the semantics of one register under compare-and-set and reads.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{ConflictKind, Error, Resolution, Value};
use ferry_testkit::relay::*;
use std::collections::HashSet;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// One completed operation on the register `acct.balance` of one row.
#[derive(Debug, Clone)]
struct Op {
    client: usize,
    invoke: Duration,
    respond: Duration,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Compare-and-set from `expect` to `new`; `ok` is the relay's verdict.
    Cas { expect: i64, new: i64, ok: bool },
    /// A read after syncing.
    Read { value: i64 },
}

/// True when `ops` has a linearization starting from `init` (Wing–Gong with memoisation).
fn linearizable(ops: &[Op], init: i64) -> bool {
    fn search(
        ops: &[Op],
        done: &mut Vec<bool>,
        left: usize,
        value: i64,
        seen: &mut HashSet<(Vec<bool>, i64)>,
    ) -> bool {
        if left == 0 {
            return true;
        }
        if !seen.insert((done.clone(), value)) {
            return false;
        }
        // Only an operation invoked before every pending one responded can go next.
        let horizon = ops
            .iter()
            .zip(done.iter())
            .filter(|(_, d)| !**d)
            .map(|(o, _)| o.respond)
            .min()
            .unwrap_or_default();
        for i in 0..ops.len() {
            if done[i] || ops[i].invoke > horizon {
                continue;
            }
            let next = match ops[i].kind {
                Kind::Cas { expect, new, ok } => match (ok, value == expect) {
                    (true, true) => Some(new),
                    (false, false) => Some(value),
                    _ => None,
                },
                Kind::Read { value: v } => (v == value).then_some(value),
            };
            let Some(next) = next else { continue };
            done[i] = true;
            if search(ops, done, left - 1, next, seen) {
                return true;
            }
            done[i] = false;
        }
        false
    }
    let mut done = vec![false; ops.len()];
    search(ops, &mut done, ops.len(), init, &mut HashSet::new())
}

#[test]
fn the_checker_rejects_a_lost_update() {
    let t = |ms| Duration::from_millis(ms);
    let cas = |c, i, r, expect, ok| Op {
        client: c,
        invoke: t(i),
        respond: t(r),
        kind: Kind::Cas {
            expect,
            new: expect + 1,
            ok,
        },
    };
    // Two overlapping increments from 0 that both succeed: a lost update.
    assert!(!linearizable(
        &[cas(0, 0, 10, 0, true), cas(1, 1, 9, 0, true)],
        0
    ));
    // One wins, one is refused: fine, in either real-time arrangement.
    assert!(linearizable(
        &[cas(0, 0, 10, 0, true), cas(1, 1, 9, 0, false)],
        0
    ));
    // A refusal that completed before the winner began cannot be explained.
    assert!(!linearizable(
        &[cas(1, 0, 1, 0, false), cas(0, 2, 3, 0, true)],
        0
    ));
    // A read must see the latest write.
    let read = |c, i, r, v| Op {
        client: c,
        invoke: t(i),
        respond: t(r),
        kind: Kind::Read { value: v },
    };
    assert!(linearizable(&[cas(0, 0, 1, 0, true), read(1, 2, 3, 1)], 0));
    assert!(!linearizable(&[cas(0, 0, 1, 0, true), read(1, 2, 3, 0)], 0));
}

fn balance(r: &ferry_core::Replica) -> i64 {
    match r
        .query("SELECT balance FROM acct WHERE id = 'c'", &[])
        .unwrap()
        .rows
        .first()
        .map(|row| row[0].clone())
    {
        Some(Value::Integer(b)) => b,
        other => panic!("balance is {other:?}"),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn ten_clients_compare_and_set_one_cell_one_winner_per_round() {
    let d = tempfile::tempdir().unwrap();
    ten_clients_cas(&d, &Cluster::sqlite(&d.path().join("relay")));
}

/// The same with the clients spread over three relay nodes on one PostgreSQL database.
#[test]
fn ten_clients_compare_and_set_over_three_postgres_nodes() {
    let d = tempfile::tempdir().unwrap();
    ten_clients_cas(&d, &Cluster::postgres(&d.path().join("relay"), 3));
}

fn ten_clients_cas(d: &tempfile::TempDir, cluster: &Cluster) {
    const CLIENTS: usize = 10;
    let rounds = seeds("FERRY_CAS_ROUNDS", 12) as usize;
    let url = cluster.url(0);
    let seed = open(d.path(), "seed.db");
    seed.execute(
        "INSERT INTO acct(id, balance, holder) VALUES ('c', 0, 'nobody')",
        &[],
    )
    .unwrap();
    let h = connect(&seed, &url, admin_token("seed"));
    wait_synced(&h);
    drop(h);

    let start = Instant::now();
    let history = Arc::new(Mutex::new(Vec::<(usize, Op)>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<(bool, Duration)>::new()));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, dir) = (cluster.url(c), d.path().to_path_buf());
            let (history, latencies, barrier) = (
                Arc::clone(&history),
                Arc::clone(&latencies),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                let r = open(&dir, &format!("c{c}.db"));
                let h = connect(&r, &url, admin_token(&format!("c{c}")));
                for round in 0..rounds {
                    wait_synced(&h);
                    barrier.wait();
                    let invoke = start.elapsed();
                    let mut tx = r.begin().unwrap();
                    let Value::Integer(v) = tx
                        .query("SELECT balance FROM acct WHERE id = 'c'", &[])
                        .unwrap()
                        .rows[0][0]
                    else {
                        panic!("no balance")
                    };
                    tx.execute(
                        "UPDATE acct SET balance = ?1, holder = ?2 WHERE id = 'c'",
                        &[(v + 1).into(), format!("c{c}").into()],
                    )
                    .unwrap();
                    // Same transaction, multi_writer table: refused together with the cell.
                    tx.execute(
                        "INSERT INTO tag(id, name) VALUES (?1, ?2)",
                        &[
                            ferry_core::new_id().into(),
                            format!("win c{c} r{round}").into(),
                        ],
                    )
                    .unwrap();
                    // Everyone has read before anyone commits: all compare against the same
                    // value, so exactly one can win the round.
                    barrier.wait();
                    let t0 = Instant::now();
                    let verdict = h.commit_checked_blocking(&mut tx, Duration::from_secs(60));
                    let took = t0.elapsed();
                    let ok = match verdict {
                        Ok(_) => true,
                        Err(Error::Rejected {
                            code: ferry_core::protocol::ErrorCode::Conflict,
                            message: why,
                        }) => {
                            assert!(why.contains("`acct`"), "{why}");
                            false
                        }
                        Err(e) => panic!("client {c} round {round}: {e}"),
                    };
                    latencies.lock().unwrap().push((ok, took));
                    let respond = start.elapsed();
                    history.lock().unwrap().push((
                        round,
                        Op {
                            client: c,
                            invoke,
                            respond,
                            kind: Kind::Cas {
                                expect: v,
                                new: v + 1,
                                ok,
                            },
                        },
                    ));
                    if !ok {
                        // The optimistic change vanished at once, before any further sync: its
                        // row of the multi_writer table too.
                        assert!(
                            r.query(
                                "SELECT 1 FROM tag WHERE name = ?1",
                                &[format!("win c{c} r{round}").into()]
                            )
                            .unwrap()
                            .rows
                            .is_empty(),
                            "client {c}: rejected change still visible"
                        );
                    }
                    barrier.wait();
                    let invoke = start.elapsed();
                    wait_synced(&h);
                    let value = balance(&r);
                    history.lock().unwrap().push((
                        round,
                        Op {
                            client: c,
                            invoke,
                            respond: start.elapsed(),
                            kind: Kind::Read { value },
                        },
                    ));
                }
                wait_synced(&h);
                r.dump().unwrap()
            })
        })
        .collect();
    let dumps: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, dump) in dumps.iter().enumerate() {
        assert_eq!(dump, &dumps[0], "client {i} diverged");
    }
    let history = history.lock().unwrap().clone();
    for round in 0..rounds {
        let winners: Vec<usize> = history
            .iter()
            .filter(|(r, o)| *r == round && matches!(o.kind, Kind::Cas { ok: true, .. }))
            .map(|(_, o)| o.client)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        for (_, o) in history.iter().filter(|(r, _)| *r == round) {
            if let Kind::Read { value } = o.kind {
                assert_eq!(
                    value,
                    round as i64 + 1,
                    "round {round}: client {} read",
                    o.client
                );
            }
        }
    }
    let ops: Vec<Op> = history.into_iter().map(|(_, o)| o).collect();
    assert!(
        linearizable(&ops, 0),
        "history is not linearizable: {ops:#?}"
    );
    let last = &dumps[0];
    let tags = last.iter().find(|(t, _)| t == "tag").unwrap();
    assert_eq!(
        tags.1.rows.len(),
        rounds,
        "exactly the winners' tag rows survive everywhere"
    );

    let lat = latencies.lock().unwrap().clone();
    let mut ok: Vec<Duration> = lat.iter().filter(|(o, _)| *o).map(|(_, d)| *d).collect();
    let mut refused: Vec<Duration> = lat.iter().filter(|(o, _)| !*o).map(|(_, d)| *d).collect();
    ok.sort();
    refused.sort();
    eprintln!(
        "compare-and-set, {CLIENTS} clients x {rounds} rounds on one cell: {} accepted, {} refused ({:.0}% refusal); \
         commit_checked latency accepted p50 {:?} p99 {:?}, refused (verdict + rollback) p50 {:?} p99 {:?}",
        ok.len(),
        refused.len(),
        100.0 * refused.len() as f64 / lat.len() as f64,
        percentile(&ok, 0.5),
        percentile(&ok, 0.99),
        percentile(&refused, 0.5),
        percentile(&refused, 0.99),
    );
}

#[test]
fn a_lease_holder_paused_past_its_ttl_cannot_overwrite_the_new_holder() {
    let d = tempfile::tempdir().unwrap();
    lease_pause(&d, &Cluster::sqlite(&d.path().join("relay")));
}

/// The same with the two holders on different relay nodes over one PostgreSQL database.
#[test]
fn a_paused_lease_holder_is_fenced_across_postgres_nodes() {
    let d = tempfile::tempdir().unwrap();
    lease_pause(&d, &Cluster::postgres(&d.path().join("relay"), 2));
}

fn lease_pause(d: &tempfile::TempDir, cluster: &Cluster) {
    let rt = ferry_core::transport::runtime().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let ha = connect(&a, &cluster.url(0), admin_token("a"));
    let hb = connect(&b, &cluster.url(1), admin_token("b"));
    wait_synced(&ha);
    wait_synced(&hb);

    let ttl = Duration::from_millis(3000);
    let la = rt.block_on(ha.acquire_lease("leader", ttl)).unwrap();
    let busy = rt.block_on(hb.acquire_lease("leader", ttl)).unwrap_err();
    assert!(matches!(busy, Error::LeaseBusy { .. }), "{busy}");

    // The holder writes under its lease: accepted.
    let mut tx = guarded_tx(
        &a,
        &la,
        "INSERT INTO acct(id, balance, holder) VALUES ('cfg', 1, 'a')",
    );
    rt.block_on(ha.commit_checked(&mut tx)).unwrap();

    // Stop the world on `a`: no network, no renewals, but it goes on writing, still
    // believing it holds the lease.
    pause(&ha);
    let mut tx = guarded_tx(
        &a,
        &la,
        "UPDATE acct SET balance = 2, holder = 'a-after-pause' WHERE id = 'cfg'",
    );
    let stale = tx.commit_change().unwrap().unwrap();
    // And a guarded write no one else touches: only the fence can stop it.
    let mut tx = guarded_tx(
        &a,
        &la,
        "INSERT INTO tag(id, name) VALUES ('audit', 'a was here')",
    );
    let fenced = tx.commit_change().unwrap().unwrap();
    std::thread::sleep(ttl + Duration::from_millis(300));

    // The lease expired on the relay's clock; `b` takes it with a newer token and writes.
    let lb = rt
        .block_on(hb.acquire_lease("leader", Duration::from_secs(30)))
        .unwrap();
    assert!(
        lb.token > la.token,
        "fencing tokens grow: {} then {}",
        la.token,
        lb.token
    );
    wait_synced(&hb);
    let mut tx = guarded_tx(
        &b,
        &lb,
        "UPDATE acct SET balance = 10, holder = 'b' WHERE id = 'cfg'",
    );
    rt.block_on(hb.commit_checked(&mut tx)).unwrap();

    // `a` wakes up: its writes are refused and rolled back. The overwrite of `cfg` meets
    // `b`'s write first (compare-and-set) or its stale token at the relay, whichever `a`
    // learns of first; the other write is refused for its token alone.
    ha.resume();
    let why = rt.block_on(ha.verdict(stale)).unwrap_err();
    assert!(matches!(&why, Error::Rejected { .. }), "{why}");
    let why = rt.block_on(ha.verdict(fenced)).unwrap_err();
    assert!(
        matches!(&why, Error::Rejected { code: ferry_core::protocol::ErrorCode::Fenced, message } if message.contains("stale")),
        "{why}"
    );
    let renew = rt.block_on(ha.renew_lease(&la, ttl)).unwrap_err();
    assert!(matches!(renew, Error::LeaseLost { .. }), "{renew}");
    wait_synced(&ha);
    wait_synced(&hb);
    for r in [&a, &b] {
        let row = r
            .query("SELECT balance, holder FROM acct WHERE id = 'cfg'", &[])
            .unwrap();
        assert_eq!(
            row.rows[0],
            vec![Value::Integer(10), Value::Text("b".into())]
        );
    }
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    let rejected: Vec<_> = a
        .conflicts()
        .unwrap()
        .into_iter()
        .filter(|c| c.kind == ConflictKind::Rejected)
        .collect();
    assert!(
        rejected
            .iter()
            .any(|c| c.policy == "lease" && c.table == "tag"),
        "{rejected:?}"
    );
    assert!(
        a.query("SELECT 1 FROM tag WHERE id = 'audit'", &[])
            .unwrap()
            .rows
            .is_empty(),
        "the fenced write was rolled back"
    );
    assert!(ha.status().rolled_back >= 1);
    // Releasing hands the lease over at once.
    rt.block_on(hb.release_lease(&lb)).unwrap();
    let again = rt.block_on(ha.acquire_lease("leader", ttl)).unwrap();
    assert!(again.token > lb.token);
}

/// A transaction on `r` guarded by `lease`, with `sql` written in it.
fn guarded_tx(
    r: &ferry_core::Replica,
    lease: &ferry_core::Lease,
    sql: &str,
) -> ferry_core::Transaction {
    let tx = r.begin().unwrap();
    tx.guard(lease.fence()).unwrap();
    tx.execute(sql, &[]).unwrap();
    tx
}

struct Join(Arc<Mutex<usize>>);

impl ferry_core::Resolver for Join {
    fn resolve(&self, c: &ferry_core::ConflictInput) -> Resolution {
        *self.0.lock().unwrap() += 1;
        let (Value::Text(l), Value::Text(r)) = (&c.local, &c.remote) else {
            return Resolution::KeepLocal;
        };
        let mut both = [l.clone(), r.clone()];
        both.sort();
        Resolution::Value(Value::Text(both.join("|")))
    }
}

#[test]
fn custom_columns_are_checked_and_re_resolved_before_they_reach_anyone() {
    let d = tempfile::tempdir().unwrap();
    custom_re_resolve(&d, &Cluster::sqlite(&d.path().join("relay")));
}

/// The same with the two writers on different relay nodes over one PostgreSQL database.
#[test]
fn custom_columns_are_re_resolved_across_postgres_nodes() {
    let d = tempfile::tempdir().unwrap();
    custom_re_resolve(&d, &Cluster::postgres(&d.path().join("relay"), 2));
}

fn custom_re_resolve(d: &tempfile::TempDir, cluster: &Cluster) {
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let calls_a = Arc::new(Mutex::new(0));
    let calls_b = Arc::new(Mutex::new(0));
    a.set_resolver("memo", Arc::new(Join(Arc::clone(&calls_a))))
        .unwrap();
    b.set_resolver("memo", Arc::new(Join(Arc::clone(&calls_b))))
        .unwrap();
    a.execute("INSERT INTO memo(id, body) VALUES ('m', 'base')", &[])
        .unwrap();
    let ha = connect(&a, &cluster.url(0), admin_token("a"));
    let hb = connect(&b, &cluster.url(1), admin_token("b"));
    wait_synced(&ha);
    wait_synced(&hb);
    pause(&ha);
    pause(&hb);
    a.execute("UPDATE memo SET body = 'from-a' WHERE id = 'm'", &[])
        .unwrap();
    b.execute("UPDATE memo SET body = 'from-b' WHERE id = 'm'", &[])
        .unwrap();
    ha.resume();
    wait_synced(&ha);
    // b's change meets the relay's check, is sent back, meets b's resolver, and is pushed
    // again carrying the answer: no refusal reaches the app.
    hb.resume();
    wait_synced(&hb);
    wait_synced(&ha);
    for r in [&a, &b] {
        assert_eq!(
            r.query("SELECT body FROM memo", &[]).unwrap().rows[0][0],
            Value::Text("from-a|from-b".into())
        );
    }
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    assert_eq!(
        *calls_b.lock().unwrap(),
        1,
        "b's resolver met the conflict once"
    );
    assert_eq!(
        *calls_a.lock().unwrap(),
        0,
        "a never saw an unresolved conflict"
    );
    assert!(hb.status().refused.is_none());
}
