//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{DeleteRule, Replica, Schema, TableDecl, Value};
use std::path::Path;

/// The schema most tests use: an lww table, a counter, an update_wins table.
pub fn schema() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("title")
                .integer("done")
                .counter("votes")
                .text("list"),
        )
        .table(
            TableDecl::new("note")
                .text_key("id")
                .text("body")
                .counter("n")
                .delete_rule(DeleteRule::UpdateWins),
        )
}

pub fn open(dir: &Path, name: &str) -> Replica {
    Replica::open(dir.join(name), &schema()).expect("open replica")
}

/// Pushes everything pending to the sequencer and acknowledges it.
pub fn push(seq: &mut Sequencer, r: &Replica) {
    loop {
        let batch = r.prepare_push(64, 1 << 20).unwrap();
        if batch.is_empty() {
            return;
        }
        let acks: Vec<(u64, u64)> = batch
            .into_iter()
            .map(|cs| {
                let o = cs.origin_seq;
                (o, seq.push(cs).unwrap())
            })
            .collect();
        r.acknowledge(&acks).unwrap();
    }
}

/// Pulls everything after the replica's cursor.
pub fn pull(seq: &Sequencer, r: &Replica) {
    let cursor = r.cursor().unwrap();
    let (sets, up_to) = seq.changes_after(cursor, usize::MAX);
    r.apply_remote(cursor, up_to, &sets).unwrap();
}

pub fn sync_all(seq: &mut Sequencer, rs: &[&Replica]) {
    for _ in 0..2 {
        for r in rs {
            push(seq, r);
            pull(seq, r);
        }
    }
}

pub fn t(s: &str) -> Value {
    Value::Text(s.into())
}

pub fn i(n: i64) -> Value {
    Value::Integer(n)
}

pub fn rows(r: &Replica, sql: &str) -> Vec<Vec<Value>> {
    r.query(sql, &[]).unwrap().rows
}
