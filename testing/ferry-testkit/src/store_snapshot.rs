//! The snapshot property of the store suite: rows read from a store's row histories, replayed
//! into a fresh replica, give exactly the state a replica reaches by replaying the whole log.

use crate::change::{add, change_set, set, t};
use crate::store_suite::{StoreFactory, acked, all, grants, origin, readers};
use ferry_core::admission::Bounds;
use ferry_core::{ChangeSet, Hlc, Replica, Sequenced, SyncPort, Value};
use ferry_relay::store::{ReadFilter, SnapshotKey, Store};
use rand::RngExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::BTreeSet;
use std::sync::Arc;

/// A row the traffic writes: its table, key, scope value and the newest incarnation the
/// traffic has made.
struct Row {
    table: &'static str,
    pk: String,
    scope_value: Option<String>,
    cl: u64,
}

/// Seeded traffic of `sets` change sets from four origins over 80 rows of a `delete_wins`
/// table with a counter (`todo`, scoped), an `update_wins` table with a counter (`note`,
/// global) and a scoped `update_wins` table (`doc`): updates, deletes, re-inserts, counter
/// additions, writes to older incarnations, and bases that make writes concurrent.
fn traffic(seed: u64, sets: usize) -> Vec<ChangeSet> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows: Vec<Row> = (0..80)
        .map(|i| match i % 3 {
            0 => Row {
                table: "todo",
                pk: format!("t{i}"),
                scope_value: Some(["l0", "l1", "u:a", "u:b"][i % 4].to_owned()),
                cl: 0,
            },
            1 => Row {
                table: "note",
                pk: format!("n{i}"),
                scope_value: None,
                cl: 0,
            },
            _ => Row {
                table: "doc",
                pk: format!("d{i}"),
                scope_value: Some(["l0", "u:a"][i % 2].to_owned()),
                cl: 0,
            },
        })
        .collect();
    let mut oseq = [0u64; 4];
    let mut hlc = ferry_relay::clock::now_ms();
    let mut out = Vec::with_capacity(sets);
    for n in 0..sets {
        let o = rng.random_range(0..4usize);
        oseq[o] += 1;
        // Clocks disagree a little, so later positions do not always carry larger HLCs.
        hlc += rng.random_range(0..3);
        let skew = rng.random_range(0..40u64);
        let base = if n == 0 {
            0
        } else {
            rng.random_range(0..=n as u64)
        };
        let mut b = change_set(origin(o as u8 + 1), oseq[o])
            .hlc(Hlc::new(hlc + skew, 0))
            .base(base);
        let mut touched = BTreeSet::new();
        for _ in 0..rng.random_range(1..4) {
            let r = rng.random_range(0..rows.len());
            if !touched.insert(r) {
                continue;
            }
            let row = &mut rows[r];
            let counter = match row.table {
                "todo" => Some("votes"),
                "note" => Some("n"),
                _ => None,
            };
            let value = |rng: &mut StdRng| t(&format!("v{}", rng.random_range(0..1000)));
            let whole = |rng: &mut StdRng, row: &Row| {
                let mut cells = Vec::new();
                match row.table {
                    "todo" => {
                        cells.push(set("list", t(row.scope_value.as_deref().unwrap_or(""))));
                        cells.push(set("title", value(rng)));
                        cells.push(set("done", Value::Integer(rng.random_range(0..2))));
                        cells.push(add("votes", rng.random_range(0..5)));
                    }
                    "note" => {
                        cells.push(set("body", value(rng)));
                        cells.push(add("n", rng.random_range(0..5)));
                    }
                    _ => {
                        cells.push(set("owner", t(row.scope_value.as_deref().unwrap_or(""))));
                        cells.push(set("body", value(rng)));
                    }
                }
                cells
            };
            let roll = rng.random_range(0..100);
            if row.cl == 0 || (row.cl.is_multiple_of(2) && roll < 60) {
                // (Re)create the row: a new incarnation carries every column.
                row.cl += 1;
                let cells = whole(&mut rng, row);
                b = b.upsert(row.table, row.pk.as_str(), row.cl, cells);
            } else if !row.cl.is_multiple_of(2) && roll < 12 {
                row.cl += 1;
                b = b.delete(row.table, row.pk.as_str(), row.cl);
            } else {
                // An update, sometimes of an older incarnation (concurrent with a delete).
                let mut cl = if row.cl.is_multiple_of(2) {
                    row.cl - 1
                } else {
                    row.cl
                };
                if cl > 2 && roll > 92 {
                    cl -= 2;
                }
                let mut cells = Vec::new();
                if let Some(c) = counter
                    && rng.random_bool(0.6)
                {
                    cells.push(add(c, rng.random_range(-3..10)));
                }
                if cells.is_empty() || rng.random_bool(0.5) {
                    let col = match row.table {
                        "todo" => ["title", "done"][rng.random_range(0..2)],
                        _ => "body",
                    };
                    let v = if col == "done" {
                        Value::Integer(rng.random_range(0..2))
                    } else {
                        value(&mut rng)
                    };
                    cells.push(set(col, v));
                }
                b = b.upsert(row.table, row.pk.as_str(), cl, cells);
            }
        }
        out.push(b.build());
    }
    out
}

/// What a connection reading `filter` receives of the log: the rows of readable scopes.
fn visible(log: &[Arc<ferry_relay::store::StoredSet>], filter: &ReadFilter) -> Vec<Sequenced> {
    log.iter()
        .map(|s| {
            let mut cs = s.change_set.clone();
            cs.rows = cs
                .rows
                .iter()
                .zip(&s.tags)
                .filter(|(_, tag)| filter.can_read(&tag.scope))
                .map(|(rc, _)| rc.clone())
                .collect();
            Sequenced {
                server_seq: s.server_seq,
                change_set: cs,
            }
        })
        .filter(|s| !s.change_set.rows.is_empty())
        .collect()
}

/// Snapshots of several tokens, read in pages of random sizes from row histories folded in
/// random steps while the traffic was being pushed, replay into fresh replicas to exactly
/// the state (values and checksum) of replicas that replayed the whole visible log; every
/// row comes once, in key order, from a readable scope.
pub async fn snapshots_replay_to_the_state_of_the_log<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    check_snapshots(&*store, 0xb007, 3_000).await;
    store.shutdown().await;
}

/// [`snapshots_replay_to_the_state_of_the_log`] for the traffic of `seed` (`sets` change
/// sets) on an empty store.
pub async fn check_snapshots(store: &dyn Store, seed: u64, sets: usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5_4a95);
    let writer = grants("writer", &[]);
    let sets = traffic(seed, sets);
    for chunk in sets.chunks(60) {
        let out = store
            .push(Arc::clone(&writer), Bounds::NONE, chunk.to_vec())
            .await
            .unwrap();
        acked(&out);
        if rng.random_bool(0.5) {
            store.fold_rows(rng.random_range(1..200)).await.unwrap();
        }
    }
    let head = fold_to_head(store).await;
    let log = all(store).await;
    let dir = tempfile::tempdir().unwrap();
    let schema = crate::schema::relay(1);
    for (k, read) in [
        vec!["*"],
        vec!["l0"],
        vec!["u:*", "global"],
        vec!["l1", "u:b"],
        vec!["nothing"],
    ]
    .iter()
    .enumerate()
    {
        let filter = ReadFilter::new(readers("r", read));
        let from_snapshot = Replica::open(dir.path().join(format!("s{k}.db")), &schema).unwrap();
        let mut after: Option<SnapshotKey> = None;
        let mut keys = Vec::new();
        // What each page's start announces, against what the walk then returns.
        let mut announced = Vec::new();
        let mut returned = Vec::new();
        loop {
            announced.push(store.snapshot_size(&filter, after.clone()).await.unwrap());
            let page = store
                .snapshot_page(
                    &filter,
                    after.clone(),
                    rng.random_range(1..40),
                    rng.random_range(100..20_000),
                )
                .await
                .unwrap();
            assert_eq!(
                page.position, head,
                "{read:?}: pages are as of the watermark"
            );
            let rows: Vec<_> = page.rows.iter().map(|(_, r)| r.clone()).collect();
            returned.push(page.rows.len() as u64);
            for (scope, r) in &page.rows {
                assert!(filter.can_read(scope), "{read:?}: {scope} is not readable");
                keys.push((
                    scope.clone(),
                    r.table.clone(),
                    ferry_relay::scoping::pk_key(&r.pk).unwrap(),
                ));
            }
            // The cursor stays at 0 (no `continue_from`): the whole log is replayed over it below.
            from_snapshot
                .apply_snapshot(rows.clone(), &[], false, None)
                .unwrap();
            match page.next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        for (i, size) in announced.iter().enumerate() {
            let rows: u64 = returned[i..].iter().sum();
            assert_eq!(
                size.rows, rows,
                "{read:?}: the rows announced before page {i} are what the walk returns from there"
            );
        }
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "{read:?}: rows come once each, in key order");
        let truth: BTreeSet<(String, Vec<u8>)> = log
            .iter()
            .flat_map(|s| s.change_set.rows.iter().zip(&s.tags))
            .filter(|(_, tag)| filter.can_read(&tag.scope))
            .map(|(rc, _)| {
                (
                    rc.table.clone(),
                    ferry_relay::scoping::pk_key(&rc.pk).unwrap(),
                )
            })
            .collect();
        let got: BTreeSet<(String, Vec<u8>)> = keys
            .iter()
            .map(|(_, t, p)| (t.clone(), p.clone()))
            .collect();
        assert_eq!(got, truth, "{read:?}: every row of a readable scope");
        let from_log = Replica::open(dir.path().join(format!("l{k}.db")), &schema).unwrap();
        let seen = visible(&log, &filter);
        for part in seen.chunks(200) {
            let after = from_log.cursor().unwrap();
            let up_to = part.last().map_or(after, |s| s.server_seq);
            from_log.apply_remote(after, up_to, part).unwrap();
        }
        assert_eq!(
            from_snapshot.dump().unwrap(),
            from_log.dump().unwrap(),
            "{read:?}: a snapshot replays to the log's state"
        );
        assert_eq!(
            from_snapshot.checksum().unwrap(),
            from_log.checksum().unwrap(),
            "{read:?}"
        );
        // A device continues the log from the position of its first page, which may be older
        // than the rows it received: replaying what it already holds changes nothing.
        let before = from_snapshot.dump().unwrap();
        for part in seen.chunks(200) {
            let after = from_snapshot.cursor().unwrap();
            let up_to = part.last().map_or(after, |s| s.server_seq);
            from_snapshot.apply_remote(after, up_to, part).unwrap();
        }
        assert_eq!(
            from_snapshot.dump().unwrap(),
            before,
            "{read:?}: the log replayed over a snapshot changes nothing"
        );
        if read == &vec!["*"] {
            let rows: usize = from_log
                .dump()
                .unwrap()
                .iter()
                .map(|(_, r)| r.rows.len())
                .sum();
            assert!(rows > 20, "the traffic leaves rows alive ({rows})");
        }
    }
}

/// Folds the row histories up to the store's head; returns the head.
pub async fn fold_to_head(store: &dyn Store) -> u64 {
    let head = store.head().await.unwrap();
    let mut at = 0;
    for _ in 0..100_000 {
        at = store.fold_rows(5_000).await.unwrap();
        if at == head {
            break;
        }
    }
    assert_eq!(at, head, "folding reaches the head");
    head
}

/// Checks that a snapshot for a token reading everything holds exactly the rows of the log,
/// each in the scope of its last change (after the store folded up to its head).
pub async fn check_snapshot_rows(store: &dyn Store) {
    let head = fold_to_head(store).await;
    let log = all(store).await;
    let mut truth = std::collections::BTreeMap::new();
    for s in &log {
        for (rc, tag) in s.change_set.rows.iter().zip(&s.tags) {
            truth.insert(
                (
                    rc.table.clone(),
                    ferry_relay::scoping::pk_key(&rc.pk).unwrap(),
                ),
                tag.scope.clone(),
            );
        }
    }
    let filter = ReadFilter::new(readers("r", &["*"]));
    let mut got = std::collections::BTreeMap::new();
    let mut after = None;
    loop {
        let page = store
            .snapshot_page(&filter, after, 500, 1 << 20)
            .await
            .unwrap();
        assert_eq!(page.position, head);
        for (scope, r) in page.rows {
            let k = (r.table, ferry_relay::scoping::pk_key(&r.pk).unwrap());
            assert!(got.insert(k, scope).is_none(), "a row comes once");
        }
        match page.next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    assert_eq!(got, truth);
}
