//! Retention: a replica replaying the compacted log from any cursor ends in the same state as
//! one that replayed the whole log. Seeded random histories with concurrent writers, counters,
//! deletes and an `update_wins` table; `FERRY_COMPACT_SEEDS` runs more.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::{Replica, Sequenced, Value};
use ferry_relay::auth::{Claims, Grants};
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::store::sqlite::SqliteStore;
use ferry_relay::store::{PushOutcome, Store};
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::sync::Arc;

fn grants() -> Arc<Grants> {
    Arc::new(
        Grants::from_claims(&Claims {
            sub: "t".into(),
            exp: u64::MAX,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: vec!["*".into()],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
        .unwrap(),
    )
}

async fn push(store: &SqliteStore, r: &Replica) {
    loop {
        let batch = r.prepare_push(64, 1 << 20).unwrap();
        if batch.is_empty() {
            return;
        }
        let oseqs: Vec<u64> = batch.iter().map(|c| c.origin_seq).collect();
        let out = store
            .push(grants(), ferry_core::admission::Bounds::NONE, batch)
            .await
            .unwrap();
        let acks: Vec<(u64, u64)> = oseqs
            .into_iter()
            .zip(out)
            .map(|(o, x)| match x {
                PushOutcome::Acked(s) => (o, s),
                PushOutcome::Refused(e) => panic!("refused: {e}"),
            })
            .collect();
        r.acknowledge(&acks).unwrap();
    }
}

async fn all(store: &SqliteStore) -> Vec<Sequenced> {
    store
        .read(0, usize::MAX >> 1, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|s| Sequenced {
            server_seq: s.server_seq,
            change_set: s.change_set.clone(),
        })
        .collect()
}

async fn pull(store: &SqliteStore, r: &Replica) {
    let c = r.cursor().unwrap();
    let sets: Vec<Sequenced> = all(store)
        .await
        .into_iter()
        .filter(|s| s.server_seq > c)
        .collect();
    let up_to = sets.last().map_or(c, |s| s.server_seq);
    r.apply_remote(c, up_to, &sets).unwrap();
}

fn edit(r: &Replica, rng: &mut StdRng) {
    let k = Value::Text(format!("k{}", rng.random_range(0..4)));
    let v = Value::Text(format!("v{}", rng.random_range(0..100)));
    let sql = match rng.random_range(0..9) {
        0 | 1 => {
            "INSERT INTO todo(id, list, title) VALUES (?1, 'l', ?2) ON CONFLICT(id) DO UPDATE SET title = excluded.title"
        }
        2 => "UPDATE todo SET done = length(?2) WHERE id = ?1",
        3 => "UPDATE todo SET votes = votes + length(?2) WHERE id = ?1",
        4 => "DELETE FROM todo WHERE id = ?1 AND ?2 IS NOT NULL",
        5 | 6 => {
            "INSERT INTO note(id, body) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET body = excluded.body, n = n + 1"
        }
        7 => "DELETE FROM note WHERE id = ?1 AND ?2 IS NOT NULL",
        _ => {
            "INSERT INTO tag(id, name) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET name = excluded.name"
        }
    };
    r.execute(sql, &[k, v]).unwrap();
}

#[test]
fn compacted_log_replays_to_the_same_state_from_any_cursor() {
    let seeds = seeds("FERRY_COMPACT_SEEDS", 30);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cat = Arc::new(RelayCatalog::from_schema(schema()).unwrap());
    let mut dropped_total = 0;
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&d.path().join("store"), Arc::clone(&cat), 64).unwrap();
        let rs: Vec<Replica> = (0..3)
            .map(|i| Replica::open(d.path().join(format!("r{i}.db")), &schema()).unwrap())
            .collect();
        rt.block_on(async {
            for _ in 0..rng.random_range(20..60) {
                let i = rng.random_range(0..3);
                match rng.random_range(0..4) {
                    0 => push(&store, &rs[i]).await,
                    1 => pull(&store, &rs[i]).await,
                    _ => edit(&rs[i], &mut rng),
                }
            }
            for r in &rs {
                push(&store, r).await;
            }
        });
        let full = rt.block_on(all(&store));
        let head = full.len() as u64;
        let horizon = rng.random_range(0..=head);
        let report = rt.block_on(store.compact(horizon)).unwrap();
        dropped_total += report.cells_dropped;
        let compacted = rt.block_on(all(&store));
        assert_eq!(compacted.len(), full.len(), "positions are kept");
        let reference = Replica::open(d.path().join("ref.db"), &schema()).unwrap();
        reference.apply_remote(0, head, &full).unwrap();
        for trial in 0..4 {
            let cursor = if trial == 0 {
                0
            } else {
                rng.random_range(0..=head)
            };
            let x = Replica::open(d.path().join(format!("x{trial}.db")), &schema()).unwrap();
            x.apply_remote(0, cursor, &full[..cursor as usize]).unwrap();
            x.apply_remote(cursor, head, &compacted[cursor as usize..])
                .unwrap();
            assert_eq!(
                x.dump().unwrap(),
                reference.dump().unwrap(),
                "seed {seed}: replay from cursor {cursor} over a log compacted at {horizon} diverged"
            );
        }
        rt.block_on(store.shutdown());
    }
    assert!(
        dropped_total > 0,
        "compaction should have dropped superseded writes"
    );
    eprintln!("{seeds} seeds, {dropped_total} superseded cell writes dropped");
}
