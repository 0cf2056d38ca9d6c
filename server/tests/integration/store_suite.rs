//! The store suite (`ferry_testkit::store_suite`) run against both stores: the embedded SQLite
//! store and the PostgreSQL store (a fresh database on the throwaway server per test), plus
//! what only PostgreSQL has: several nodes over one database.

use ferry_core::Value;
use ferry_core::admission::Bounds;
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::store::postgres::PgStore;
use ferry_relay::store::{PushOutcome, Store};
use ferry_testkit::raw;
use ferry_testkit::store_snapshot::check_snapshot_rows;
use ferry_testkit::store_suite::{
    PgStores, SqliteStores, StoreFactory, check_scoped_reads, grants, origin, push_scoped_traffic,
    set,
};
use std::collections::HashSet;
use std::sync::Arc;

ferry_testkit::store_suite!(sqlite, SqliteStores::new());
ferry_testkit::store_suite!(postgres, PgStores::fresh());

/// A store written before the per-scope index (SQLite format 3) builds it from the stored
/// bodies when a newer relay opens it, and folds its row histories from the log after:
/// catch-up and snapshots find what they must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrade_builds_the_scope_index() {
    let k = SqliteStores::new();
    let store = k.open().await;
    push_scoped_traffic(&*store).await;
    store.shutdown().await;
    drop(store);
    let c = rusqlite::Connection::open(k.dir().join("relay.db")).unwrap();
    c.execute_batch(
        "DROP TABLE set_scopes; DROP TABLE scopes; DROP TABLE rows; DROP TABLE secrets; DROP TABLE owners;
         DELETE FROM meta WHERE key = 'rows_seq'; PRAGMA user_version = 3;",
    )
    .unwrap();
    drop(c);
    let store = k.open().await;
    check_scoped_reads(&*store).await;
    check_snapshot_rows(&*store).await;
    store.shutdown().await;
}

/// The same for the PostgreSQL store (format 2 to 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_builds_the_scope_index() {
    let k = PgStores::fresh();
    let store = k.open().await;
    push_scoped_traffic(&*store).await;
    store.shutdown().await;
    drop(store);
    let (c, conn) = tokio_postgres::connect(&k.0, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "DROP TABLE ferry_set_scopes; DROP TABLE ferry_scopes; DROP TABLE ferry_rows;
         DROP TABLE ferry_secrets; DROP TABLE ferry_owners;
         DELETE FROM ferry_meta WHERE key = 'rows_seq';
         UPDATE ferry_meta SET value = 2 WHERE key = 'format';",
    )
    .await
    .unwrap();
    let store = k.open().await;
    check_scoped_reads(&*store).await;
    check_snapshot_rows(&*store).await;
    store.shutdown().await;
}

/// Three store instances over one database (three relay nodes in one process): pushes through
/// all of them share one gap-free log, and each node's feed receives what the others
/// sequenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_three_nodes_one_log() {
    let k = PgStores::fresh();
    ferry_testkit::store_suite::concurrent_pushers_and_a_reader(vec![k.clone(), k.clone(), k])
        .await;
}

/// Two nodes deciding compare-and-set on the same cell at the same time: exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_compare_and_set_across_nodes() {
    let k = PgStores::fresh();
    let a = k.open().await;
    let b = k.open().await;
    let mut winners = HashSet::new();
    for round in 1..=20u64 {
        let base = a.stats().await.unwrap().head;
        let mk = |o: u8, v: i64| {
            let mut cs = raw::change_set(
                origin(o),
                round,
                "acct",
                "a1",
                1,
                vec![set("balance", Value::Integer(v))],
            );
            cs.base = base;
            cs
        };
        let (ra, rb) = tokio::join!(
            a.push(grants("a", &[]), Bounds::NONE, vec![mk(1, round as i64)]),
            b.push(grants("b", &[]), Bounds::NONE, vec![mk(2, -(round as i64))])
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        // Either node's head covers what the other acknowledged, at once (its feed may
        // still be a notification behind; a client told "synced up to head" relies on it).
        for o in [&ra[0], &rb[0]] {
            if let PushOutcome::Acked(seq) = o {
                assert!(a.head().await.unwrap() >= *seq && b.head().await.unwrap() >= *seq);
            }
        }
        let wins: Vec<bool> = [ra, rb]
            .iter()
            .map(|o| matches!(o[0], PushOutcome::Acked(_)))
            .collect();
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: exactly one wins"
        );
        winners.insert(wins[0]);
        // The loser withdraws its origin_seq with an empty change set, as a replica would.
        let loser = if wins[0] { 2 } else { 1 };
        let mut empty = raw::change_set(origin(loser), round, "acct", "a1", 1, vec![]);
        empty.rows.clear();
        let store = if wins[0] { &b } else { &a };
        assert!(matches!(
            store
                .push(grants("x", &[]), Bounds::NONE, vec![empty])
                .await
                .unwrap()[0],
            PushOutcome::Acked(_)
        ));
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// The schema is created once and a store refuses a database written by a newer relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_is_versioned() {
    let url = ferry_testkit::pg::fresh_pg_db();
    let k = PgStores(url.clone());
    // Two nodes starting together create the schema once.
    let (a, b) = tokio::join!(k.open(), k.open());
    a.shutdown().await;
    b.shutdown().await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("UPDATE ferry_meta SET value = 99 WHERE key = 'format'", &[])
        .await
        .unwrap();
    let cat = Arc::new(RelayCatalog::from_schema(ferry_testkit::relay::schema()).unwrap());
    let err = PgStore::open(&url, cat, 16, 1 << 20).await.unwrap_err();
    assert!(err.to_string().contains("format 99"), "{err}");
    let bad = PgStore::open(
        "postgres://nobody@127.0.0.1:1/none",
        Arc::new(RelayCatalog::from_schema(ferry_testkit::relay::schema()).unwrap()),
        16,
        1 << 20,
    )
    .await
    .unwrap_err();
    assert!(
        bad.to_string()
            .contains("cannot connect to PostgreSQL at 127.0.0.1:1/none"),
        "{bad}"
    );
}

/// Compaction shrinks stored bodies; the embedded store gives the freed pages back to the
/// file system instead of keeping them inside `relay.db`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_gives_back_the_pages_compaction_frees() {
    use ferry_relay::store::sqlite::SqliteStore;
    use ferry_testkit::change::{change_set, set};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), ferry_testkit::store_suite::catalog(), 4096).unwrap();
    let long = "a name long enough that superseded copies of it take real room".repeat(4);
    for i in 1..=300u64 {
        // Distinct stamps, so each write supersedes the one before whatever the clock does.
        let mut b = change_set(origin(1), i).hlc(ferry_core::Hlc::new(1_700_000_000_000 + i, 0));
        for k in 0..40 {
            b = b.upsert(
                "tag",
                format!("t{k}").as_str(),
                1,
                vec![set("name", long.as_str())],
            );
        }
        let out = store
            .push(grants("a", &[]), Bounds::NONE, vec![b.build()])
            .await
            .unwrap();
        assert!(matches!(out[0], PushOutcome::Acked(_)));
    }
    let head = store.head().await.unwrap();
    let report = store.compact(head).await.unwrap();
    assert!(report.cells_dropped > 0, "{report:?}");
    store.shutdown().await;
    let c = rusqlite::Connection::open(dir.path().join("relay.db")).unwrap();
    let total: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let free: i64 = c
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    eprintln!("relay store: {total} pages, {free} free after compaction");
    assert!(
        free * 10 < total,
        "{free} of {total} pages free after compaction"
    );
}
