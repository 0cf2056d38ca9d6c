//! A device whose clock ran hours ahead wrote offline before it ever learnt the relay's
//! clock. The relay refuses those change sets (`clock_skew`); the device re-stamps them with
//! the corrected clock and pushes again, and every replica converges on the same values —
//! the re-stamped writes win or lose against others by their new timestamps, locally too.
//!
//! Found by the deterministic simulation (`server/tests/simulation/`, seeds 1, 2 and 59
//! before the fixes).
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{Hlc, OpenOptions, Replica, ReplicaId, Sequenced, WallClock};
use ferry_testkit::change::*;
use ferry_testkit::local::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

struct Clock(Arc<AtomicU64>, u64);
impl WallClock for Clock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst) + self.1
    }
}

const HOUR: u64 = 3_600_000;

#[test]
fn refused_for_skew_is_restamped_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let time = Arc::new(AtomicU64::new(1_800_000_000_000));
    let ahead = Replica::open_with(
        dir.path().join("ahead.db"),
        &schema(),
        OpenOptions {
            wall_clock: Arc::new(Clock(Arc::clone(&time), 2 * HOUR)),
            ..Default::default()
        },
    )
    .unwrap();
    // Offline, two hours ahead: two writes to the same row, one to another.
    ahead
        .execute(
            "INSERT INTO note (id, body, n) VALUES ('r', 'first', 1)",
            &[],
        )
        .unwrap();
    time.fetch_add(10, Ordering::SeqCst);
    ahead
        .execute("UPDATE note SET body = 'second' WHERE id = 'r'", &[])
        .unwrap();
    let stamped: Vec<Hlc> = ahead
        .prepare_push(8, 1 << 20)
        .unwrap()
        .iter()
        .map(|c| c.hlc)
        .collect();
    assert!(
        stamped
            .iter()
            .all(|h| h.millis() >= 1_800_000_000_000 + 2 * HOUR)
    );
    // Hello: the device learns the relay's clock, is refused for skew, re-stamps.
    time.fetch_add(1_000, Ordering::SeqCst);
    ahead
        .learn_relay_clock(time.load(Ordering::SeqCst))
        .unwrap();
    assert_eq!(ahead.restamp(1).unwrap(), 2);
    let pending = ahead.prepare_push(8, 1 << 20).unwrap();
    let relay_now = time.load(Ordering::SeqCst);
    assert!(
        pending.iter().all(|c| c.hlc.millis() <= relay_now + 1_000),
        "{pending:?}"
    );
    assert!(pending[0].hlc < pending[1].hlc, "order kept");
    // A write by another device, later than the re-stamped ones but far earlier than the
    // original stamps, must win everywhere — on this device too.
    time.fetch_add(500, Ordering::SeqCst);
    let mut seq = Sequencer::new();
    let other = ReplicaId([9; 16]);
    let later = Sequenced {
        server_seq: 1,
        change_set: change_set(other, 1)
            .hlc(Hlc::new(time.load(Ordering::SeqCst), 0))
            .upsert(
                "note",
                t("r"),
                1,
                vec![set("body", t("theirs")), add("n", 1)],
            )
            .build(),
    };
    seq.push(later.change_set.clone()).unwrap();
    ahead
        .apply_remote(0, 1, std::slice::from_ref(&later))
        .unwrap();
    push(&mut seq, &ahead);
    pull(&seq, &ahead);
    let reference = open(dir.path(), "ref.db");
    pull(&seq, &reference);
    let q = "SELECT id, body, n FROM note ORDER BY id";
    assert_eq!(rows(&ahead, q), rows(&reference, q));
    assert_eq!(rows(&reference, q)[0][1], t("theirs"));
}
