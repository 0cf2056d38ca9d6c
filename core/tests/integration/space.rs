//! Space: the replica file gives back the pages bulk work frees (the change log's bodies once
//! the relay has them), instead of keeping them as free pages forever.

use ferry_core::Value;
use ferry_testkit::local::*;

fn pages(path: &std::path::Path) -> (i64, i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    let total: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let free: i64 = c
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    (total, free)
}

#[test]
fn pushing_a_large_backlog_returns_its_pages() {
    let d = tempfile::tempdir().unwrap();
    let r = open(d.path(), "r.db");
    for t in 0..100 {
        let rows: Vec<Vec<Value>> = (0..500)
            .map(|k| {
                vec![
                    Value::Text(format!("{t:03}-{k:04}")),
                    Value::Text(format!("a title long enough to take some room, row {k}")),
                ]
            })
            .collect();
        r.write(|tx| tx.execute_many("INSERT INTO todo (id, title) VALUES (?1, ?2)", &rows))
            .unwrap();
    }
    let mut seq = ferry_core::sequencer::Sequencer::new();
    push(&mut seq, &r);
    r.close().unwrap();
    let (total, free) = pages(&d.path().join("r.db"));
    eprintln!("space: {total} pages, {free} free after pushing 50,000 rows");
    assert!(
        free * 10 < total,
        "{free} of {total} pages are free after the push"
    );
}
