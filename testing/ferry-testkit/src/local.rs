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

/// Syncs `r` with `seq` through the device's protocol state machine (`SyncClient`, batches of
/// two change sets), as a real connection does: refusals (compare-and-set, `custom` cells on a
/// sequencer made [`Sequencer::with_schema`]) are handled by the device. The connection drops
/// after `steps` frames from the sequencer (0: it runs until quiet). Panics if a refusal stops
/// uploads. Returns how many of the device's change sets were withdrawn (what the session's
/// `rolled_back` counter adds up).
pub fn sync_via_client(seq: &mut Sequencer, r: &Replica, steps: u8) -> usize {
    let mut client = ferry_core::sync::SyncClient::new().with_batch(2, usize::MAX);
    let mut session = seq.session();
    let mut outbox = std::collections::VecDeque::from([client.start(r, "t").unwrap()]);
    let mut n = 0u32;
    let mut withdrawn = 0;
    while let Some(msg) = outbox.pop_front() {
        for reply in seq.handle(&mut session, msg) {
            n += 1;
            if steps > 0 && n > u32::from(steps) {
                client.disconnected();
                return withdrawn;
            }
            let step = client.handle(r, reply).unwrap();
            assert!(
                step.refused.is_none(),
                "unexpected refusal {:?}",
                step.refused
            );
            withdrawn += step.withdrawn.len();
            outbox.extend(step.send);
        }
        if outbox.is_empty()
            && let Some(p) = client.poll_push(r).unwrap()
        {
            outbox.push_back(p);
        }
    }
    client.disconnected();
    withdrawn
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

/// Cases per seeded property test: `FERRY_PROPTEST_CASES`, or 300.
pub fn proptest_cases() -> u32 {
    std::env::var("FERRY_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}
