//! Snapshots: row histories folded from the log replay, in fresh replicas, to the state of
//! the whole log — over many seeds of traffic (the store suite runs one larger seed on both
//! stores).

use ferry_testkit::store_snapshot::check_snapshots;
use ferry_testkit::store_suite::{SqliteStores, StoreFactory};

/// 24 seeds of 400 change sets each: updates, deletes, re-inserts, counters, writes to older
/// incarnations and concurrent bases on `delete_wins` and `update_wins` tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_replay_to_the_logs_state_over_many_seeds() {
    for seed in 0..24u64 {
        let stores = SqliteStores::new();
        let store = stores.open().await;
        check_snapshots(&*store, seed, 400).await;
        store.shutdown().await;
    }
}
