//! On-disk format upgrades: an upgraded file equals a fresh one, and the queries every sync
//! round runs use the index that keeps them independent of the log's length.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_testkit::local::*;

fn schema_sql(path: &std::path::Path) -> Vec<(String, String, Option<String>)> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn a_version_1_file_upgrades_to_the_fresh_layout() {
    let d = tempfile::tempdir().unwrap();
    let fresh = open(d.path(), "fresh.db");
    fresh.close().unwrap();
    let old = open(d.path(), "old.db");
    old.execute("INSERT INTO todo(id, title) VALUES ('1', 'kept')", &[])
        .unwrap();
    old.close().unwrap();
    {
        // What a version 1 file looked like: no unacked-log index, no strict-write columns
        // or undo table, no eviction record, no quarantine, no refusal codes.
        let c = rusqlite::Connection::open(d.path().join("old.db")).unwrap();
        c.execute_batch(
            "DROP INDEX ferry_log_unacked; DROP TABLE ferry_undo; DROP TABLE ferry_evictions;
             DROP TABLE ferry_quarantine;
             ALTER TABLE ferry_log DROP COLUMN rejected_code;
             ALTER TABLE ferry_log DROP COLUMN rejected; ALTER TABLE ferry_log DROP COLUMN guarded;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let old = open(d.path(), "old.db");
    assert_eq!(
        old.pending_count().unwrap(),
        1,
        "the pending change survived the upgrade"
    );
    old.close().unwrap();
    assert_eq!(
        schema_sql(&d.path().join("old.db")),
        schema_sql(&d.path().join("fresh.db"))
    );
    let c = rusqlite::Connection::open(d.path().join("old.db")).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, ferry_core::FORMAT_VERSION);
}

#[test]
fn sync_queries_use_the_unacked_index() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "r.db");
    r.execute("INSERT INTO todo(id, title) VALUES ('1', 'x')", &[])
        .unwrap();
    let c = rusqlite::Connection::open(d.path().join("r.db")).unwrap();
    for q in [
        "SELECT wire FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL AND wire IS NOT NULL AND origin_seq > 5 ORDER BY seq LIMIT 10",
        "SELECT count(*) FROM ferry_log WHERE server_seq IS NULL AND reissued IS NULL",
        "SELECT seq FROM ferry_log WHERE server_seq IS NULL AND wire IS NULL AND raw IS NOT NULL AND reissued IS NULL ORDER BY seq LIMIT 10",
    ] {
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {q}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("ferry_log_unacked")),
            "{q}\nplan: {plan:?}"
        );
    }
}

/// The stored body of a change set (the device's change log; the relay seals its own the same
/// way), frozen in `core/tests/golden/stored_change_set.hex`. A change to the wire form of a
/// change set must not silently change what is stored: bump `envelope::STORED_VERSION` and
/// keep a reader for the old one. `FERRY_BLESS=1` rewrites the file after a deliberate change.
#[test]
fn golden_stored_change_set() {
    use ferry_core::{ChangeSet, Hlc, ReplicaId, Value};
    use ferry_testkit::change::{add, change_set, set};
    use ferry_testkit::golden;
    let cs = change_set(ReplicaId([1; 16]), 3)
        .id([2; 16])
        .hlc(Hlc::new(1_700_000_000_000, 5))
        .base(41)
        .schema_version(2)
        .fence("leader", 4)
        .guarded()
        .upsert(
            "todo",
            "k1",
            1,
            vec![set("title", "milk"), add("votes", -2)],
        )
        .delete("todo", Value::Blob(vec![9, 9]), 2)
        .build();
    let sealed = ferry_core::envelope::seal(&cs).unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/stored_change_set.hex");
    golden::check(&path, &sealed, "the stored form of a change set");
    assert_eq!(
        ferry_core::envelope::open::<ChangeSet>(&golden::read(&path)).unwrap(),
        cs
    );
}

/// The device's change log stores sealed bodies (and reads the unsealed ones older builds
/// wrote).
#[test]
fn the_change_log_stores_sealed_bodies() {
    use ferry_core::SyncPort;
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "a.db");
    r.execute("INSERT INTO todo(id, title) VALUES ('1', 'a')", &[])
        .unwrap();
    let pushed = r.prepare_push(10, usize::MAX).unwrap();
    assert_eq!(pushed.len(), 1);
    let c = rusqlite::Connection::open(d.path().join("a.db")).unwrap();
    let wire: Vec<u8> = c
        .query_row("SELECT wire FROM ferry_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        &wire[..2],
        &[
            ferry_core::envelope::MARKER,
            ferry_core::envelope::STORED_VERSION
        ]
    );
    // A body written before envelopes: the same change set, unsealed.
    let unsealed = rmp_serde::to_vec_named(&pushed[0]).unwrap();
    c.execute("UPDATE ferry_log SET wire = ?1", [unsealed])
        .unwrap();
    drop(c);
    assert_eq!(r.prepare_push(10, usize::MAX).unwrap(), pushed);
}
