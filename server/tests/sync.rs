//! End-to-end sync through a real relay process on 127.0.0.1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;
use ferry_core::Value;

#[test]
fn two_replicas_sync_through_the_relay() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    a.execute(
        "INSERT INTO todo(id, list, title) VALUES ('1', 'l1', 'milk')",
        &[],
    )
    .unwrap();
    let ha = connect(&a, &relay.url(), admin_token("a"));
    let hb = connect(&b, &relay.url(), admin_token("b"));
    wait_synced(&ha);
    wait_synced(&hb);
    assert_eq!(
        b.query("SELECT title FROM todo", &[]).unwrap().rows,
        vec![vec![Value::Text("milk".into())]]
    );
    let v = hb
        .verify_blocking(&b, std::time::Duration::from_secs(30))
        .unwrap();
    assert!(v.matches(), "{v:?}");
}
