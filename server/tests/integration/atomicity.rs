//! Multi-row, multi-table transactions are applied all-or-nothing everywhere: writers move
//! money between accounts (two rows of `note`) and record deposits (a `note` row and a `tag`
//! ledger row) in single transactions, through a real relay, while watched queries on every
//! replica check after each commit that total balance minus total deposits is unchanged. A
//! replica that ever showed part of a change set would break the invariant.
//!
//! `FERRY_ATOMIC_SEEDS=N` runs more seeds (3 by default).
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::Value;
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::sync::{Arc, Mutex};

const ACCOUNTS: usize = 5;
const OPENING: i64 = 100;
/// The invariant, plus every balance so that the results change with every commit (a watch
/// calls back only when its results differ).
const INVARIANT: &str = "SELECT (SELECT coalesce(sum(n), 0) FROM note) \
     - (SELECT coalesce(sum(CAST(name AS INTEGER)), 0) FROM tag), \
     (SELECT group_concat(n) FROM (SELECT n FROM note ORDER BY id))";

fn op(r: &ferry_core::Replica, rng: &mut StdRng) -> i64 {
    let a = format!("acct{}", rng.random_range(0..ACCOUNTS));
    let b = format!("acct{}", rng.random_range(0..ACCOUNTS));
    let x = rng.random_range(1..50i64);
    if rng.random_bool(0.6) {
        r.write(|tx| {
            tx.execute(
                "UPDATE note SET n = n - ?1 WHERE id = ?2",
                &[x.into(), a.into()],
            )?;
            tx.execute(
                "UPDATE note SET n = n + ?1 WHERE id = ?2",
                &[x.into(), b.into()],
            )
        })
        .unwrap();
        0
    } else {
        r.write(|tx| {
            tx.execute(
                "UPDATE note SET n = n + ?1 WHERE id = ?2",
                &[x.into(), a.into()],
            )?;
            tx.execute(
                "INSERT INTO tag(id, name) VALUES (?1, ?2)",
                &[ferry_core::new_id().into(), x.to_string().into()],
            )
        })
        .unwrap();
        x
    }
}

fn run(seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let mut rng = StdRng::seed_from_u64(seed);
    let replicas: Vec<_> = (0..5)
        .map(|i| open(d.path(), &format!("r{i}.db")))
        .collect();
    let handles: Vec<_> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| connect(r, &url, admin_token(&format!("r{i}"))))
        .collect();
    replicas[0]
        .write(|tx| {
            for k in 0..ACCOUNTS {
                tx.execute(
                    "INSERT INTO note(id, n) VALUES (?1, ?2)",
                    &[format!("acct{k}").into(), OPENING.into()],
                )?;
            }
            Ok(())
        })
        .unwrap();
    for h in &handles {
        wait_synced(h);
    }
    let start = OPENING * ACCOUNTS as i64;
    let seen: Vec<Arc<Mutex<Vec<Value>>>> = replicas
        .iter()
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let _watches: Vec<_> = replicas
        .iter()
        .zip(&seen)
        .map(|(r, s)| {
            let s = Arc::clone(s);
            r.watch(
                INVARIANT,
                &[],
                Box::new(move |rows| s.lock().unwrap().push(rows.rows[0][0].clone())),
            )
            .unwrap()
        })
        .collect();
    // Writers 0..3 write in bursts while syncing; 3 and 4 only read.
    let mut deposits = 0;
    for round in 0..6 {
        for w in 0..3 {
            if rng.random_bool(0.3) {
                handles[w].pause();
            } else {
                handles[w].resume();
            }
            for _ in 0..rng.random_range(1..8) {
                deposits += op(&replicas[w], &mut rng);
            }
        }
        if round % 2 == 1 {
            for h in &handles {
                h.resume();
            }
        }
    }
    for h in &handles {
        h.resume();
    }
    for _ in 0..2 {
        for h in &handles {
            wait_synced(h);
        }
    }
    for (i, (r, s)) in replicas.iter().zip(&seen).enumerate() {
        let s = s.lock().unwrap();
        assert!(
            s.len() > 1,
            "seed {seed}: replica {i}'s watch never fired again"
        );
        for v in s.iter() {
            assert_eq!(
                *v,
                Value::Integer(start),
                "seed {seed}: replica {i} showed part of a change set (observed {s:?})"
            );
        }
        assert_eq!(
            r.query("SELECT sum(n) FROM note", &[]).unwrap().rows[0][0],
            Value::Integer(start + deposits),
            "seed {seed}: replica {i} lost or doubled a write"
        );
    }
    let first = replicas[0].dump().unwrap();
    for r in &replicas[1..] {
        assert_eq!(r.dump().unwrap(), first, "seed {seed}: replicas diverged");
    }
}

#[test]
fn multi_table_transactions_are_never_seen_in_part() {
    let seeds = seeds("FERRY_ATOMIC_SEEDS", 3);
    for seed in 0..seeds {
        run(seed);
    }
}
