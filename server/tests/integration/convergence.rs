//! Replicas edit offline (conflicting cells, counters, deletes), reconnect through a real
//! relay, and converge; checksums prove each holds what the relay says it should. Seeded:
//! `FERRY_RELAY_SEEDS=200` runs more.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{Replica, Value};
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::sync::Arc;
use std::time::Duration;

fn random_edit(r: &Replica, rng: &mut StdRng, keys: usize, votes: &mut i64) {
    let k = format!("k{}", rng.random_range(0..keys));
    match rng.random_range(0..10) {
        0..=3 => {
            r.execute(
                "INSERT INTO todo(id, list, title, done) VALUES (?1, 'l', ?2, 0)
                 ON CONFLICT(id) DO UPDATE SET title = excluded.title",
                &[
                    Value::Text(k),
                    Value::Text(format!("t{}", rng.random_range(0..1000))),
                ],
            )
            .unwrap();
        }
        4..=5 => {
            let n = r
                .execute(
                    "UPDATE todo SET votes = votes + 1 WHERE id = ?1",
                    &[Value::Text(k)],
                )
                .unwrap();
            *votes += n as i64;
        }
        6 => {
            r.execute(
                "UPDATE todo SET done = 1 - done WHERE id = ?1",
                &[Value::Text(k)],
            )
            .unwrap();
        }
        7 => {
            r.execute("DELETE FROM todo WHERE id = ?1", &[Value::Text(k)])
                .unwrap();
        }
        _ => {
            r.write(|tx| {
                tx.execute(
                    "INSERT OR REPLACE INTO tag(id, name) VALUES (?1, ?2)",
                    &[
                        Value::Text(k.clone()),
                        Value::Text(format!("n{}", rng.random_range(0..9))),
                    ],
                )?;
                tx.execute(
                    "UPDATE todo SET title = 'both' WHERE id = ?1",
                    &[Value::Text(k)],
                )
            })
            .unwrap();
        }
    }
}

#[test]
fn three_replicas_edit_offline_and_converge() {
    let seeds = seeds("FERRY_RELAY_SEEDS", 12);
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = d.path().join(format!("s{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        let rs: Vec<Arc<Replica>> = (0..3).map(|i| open(&dir, &format!("r{i}.db"))).collect();
        let hs: Vec<_> = rs
            .iter()
            .enumerate()
            .map(|(i, r)| connect(r, &relay.url(), admin_token(&format!("u{i}"))))
            .collect();
        for h in &hs {
            wait_synced(h);
        }
        // Rounds of offline editing; some replicas sync between rounds.
        for _round in 0..3 {
            for h in &hs {
                h.pause();
            }
            let keys = rng.random_range(2..6);
            for r in &rs {
                let mut v = 0;
                for _ in 0..rng.random_range(1..12) {
                    random_edit(r, &mut rng, keys, &mut v);
                }
            }
            for (i, h) in hs.iter().enumerate() {
                if rng.random_bool(0.7) || i == 0 {
                    h.resume();
                    wait_synced(h);
                }
            }
        }
        for h in &hs {
            h.resume();
        }
        for _ in 0..2 {
            for h in &hs {
                wait_synced(h);
            }
        }
        let d0 = rs[0].dump().unwrap();
        for (i, r) in rs.iter().enumerate().skip(1) {
            assert_eq!(d0, r.dump().unwrap(), "seed {seed}: replica {i} diverged");
        }
        for (i, (h, r)) in hs.iter().zip(&rs).enumerate() {
            let v = h.verify_blocking(r, Duration::from_secs(30)).unwrap();
            assert!(
                v.matches(),
                "seed {seed}: replica {i} checksum differs from the relay: {v:?}"
            );
        }
    }
}

/// Counter increments made offline on every replica all count, exactly once, even when the
/// relay drops the connection in the middle.
#[test]
fn offline_counters_add_up_exactly() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&d.path().join("relay"));
    let rs: Vec<Arc<Replica>> = (0..3)
        .map(|i| open(d.path(), &format!("c{i}.db")))
        .collect();
    rs[0]
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('c', 'l', 'count me')",
            &[],
        )
        .unwrap();
    let hs: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| connect(r, &relay.url(), admin_token(&format!("c{i}"))))
        .collect();
    for h in &hs {
        wait_synced(h);
    }
    for h in &hs {
        wait_synced(h);
    }
    for h in &hs {
        h.pause();
    }
    let mut total = 0;
    for (i, r) in rs.iter().enumerate() {
        for _ in 0..(50 * (i + 1)) {
            r.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'c'", &[])
                .unwrap();
            total += 1;
        }
    }
    for h in &hs {
        h.resume();
    }
    std::thread::sleep(Duration::from_millis(30));
    relay.restart();
    for _ in 0..2 {
        for h in &hs {
            wait_synced(h);
        }
    }
    for r in &rs {
        assert_eq!(
            r.query("SELECT votes FROM todo WHERE id = 'c'", &[])
                .unwrap()
                .rows,
            vec![vec![Value::Integer(total)]]
        );
    }
}
