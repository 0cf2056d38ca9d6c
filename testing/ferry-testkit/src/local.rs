//! Replicas synced through the in-memory [`Sequencer`] — the relay's decision without the
//! network — for tests of capture, merge and the protocol's device side.

use ferry_core::sequencer::Sequencer;
use ferry_core::{Replica, SyncPort, Value};
use std::path::Path;

pub use crate::change::{i, t};
pub use crate::schema::local as schema;

/// Opens replica `name` in `dir` with [`schema`].
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

/// Two rounds of push and pull for every replica: afterwards all have seen all.
pub fn sync_all(seq: &mut Sequencer, rs: &[&Replica]) {
    for _ in 0..2 {
        for r in rs {
            push(seq, r);
            pull(seq, r);
        }
    }
}

/// The rows `sql` returns.
pub fn rows(r: &Replica, sql: &str) -> Vec<Vec<Value>> {
    r.query(sql, &[]).unwrap().rows
}
