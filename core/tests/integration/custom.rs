//! `custom` columns next to `lww` and counter columns, seeded: replicas (clocks skewed) edit
//! one row's `lww` title, `custom` tags and counter in random combinations, each edit one
//! transaction, and sync through the in-memory sequencer that checks `custom` cells like the
//! relay (refusals, re-resolution and rebases), with connections cut at random points.
//!
//! After every scenario, once everyone has synced:
//! * every replica holds the same rows (convergence, through rebases);
//! * nothing is left to push and no push is refused (a `custom` conflict never reaches the
//!   app as an error);
//! * the counter is the sum of every increment made (no delta lost or doubled by a rebase).
//!
//! Cases: 300 by default (`FERRY_PROPTEST_CASES` for more).
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::sequencer::Sequencer;
use ferry_core::{
    ColumnType, ConflictInput, OpenOptions, Policy, Replica, Resolution, Schema, TableDecl, Value,
    WallClock,
};
use ferry_testkit::local::sync_via_client;
use proptest::prelude::*;
use std::sync::Arc;

fn schema() -> Schema {
    Schema::new(1).table(
        TableDecl::new("doc")
            .text_key("id")
            .text("title")
            .column("tags", ColumnType::Text, Policy::Custom)
            .counter("n"),
    )
}

struct Skewed(u64);

impl WallClock for Skewed {
    fn now_millis(&self) -> u64 {
        1_700_000_000_000 + self.0
    }
}

#[derive(Debug, Clone)]
enum Action {
    /// Replica edits the row: title, tags and/or an increment (at least one).
    Edit(usize, bool, bool, bool),
    /// Replica syncs, the connection dropping after `steps` frames (0: until quiet).
    Sync(usize, u8),
}

fn action(n: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..n, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(r, a, b, c)| Action::Edit(
            r,
            a,
            b,
            c || !(a || b)
        )),
        (0..n, 0u8..6).prop_map(|(r, s)| Action::Sync(r, s)),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Action>)> {
    (2usize..4).prop_flat_map(|n| (Just(n), prop::collection::vec(action(n), 1..30)))
}

fn run(n: usize, actions: &[Action]) {
    let dir = tempfile::tempdir().unwrap();
    let s = schema();
    let replicas: Vec<Replica> = (0..n)
        .map(|i| {
            let opts = OpenOptions {
                wall_clock: Arc::new(Skewed(i as u64 * 700)),
                ..Default::default()
            };
            let r = Replica::open_with(dir.path().join(format!("r{i}.db")), &s, opts).unwrap();
            r.set_resolver(
                "doc",
                Arc::new(|c: &ConflictInput| match (&c.local, &c.remote) {
                    (Value::Text(l), Value::Text(r)) => {
                        // Order-independent and bounded, so answers settle.
                        let mut parts: Vec<&str> = l.split('+').chain(r.split('+')).collect();
                        parts.sort_unstable();
                        parts.dedup();
                        Resolution::Value(Value::Text(parts.join("+")))
                    }
                    _ => Resolution::KeepLocal,
                }),
            )
            .unwrap();
            r
        })
        .collect();
    let mut seq = Sequencer::with_schema(&s);
    replicas[0]
        .execute(
            "INSERT INTO doc(id, title, tags, n) VALUES ('x', 't', 'base', 0)",
            &[],
        )
        .unwrap();
    for r in &replicas {
        sync_via_client(&mut seq, r, 0);
    }
    sync_via_client(&mut seq, &replicas[0], 0);
    let mut total = 0i64;
    for (k, a) in actions.iter().enumerate() {
        match *a {
            Action::Edit(r, title, tags, inc) => {
                let mut sets = Vec::new();
                if title {
                    sets.push(format!("title = 't{k}'"));
                }
                if tags {
                    sets.push(format!("tags = 'g{k}'"));
                }
                if inc {
                    sets.push("n = n + 1".to_owned());
                    total += 1;
                }
                replicas[r]
                    .execute(
                        &format!("UPDATE doc SET {} WHERE id = 'x'", sets.join(", ")),
                        &[],
                    )
                    .unwrap();
            }
            Action::Sync(r, steps) => {
                sync_via_client(&mut seq, &replicas[r], steps);
            }
        }
    }
    for _ in 0..6 {
        for r in &replicas {
            sync_via_client(&mut seq, r, 0);
        }
    }
    let first = replicas[0].dump().unwrap();
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(r.pending_count().unwrap(), 0, "replica {i} has pushes left");
        assert_eq!(r.dump().unwrap(), first, "replica {i} diverged");
    }
    let n = replicas[0]
        .query("SELECT n FROM doc WHERE id = 'x'", &[])
        .unwrap()
        .rows[0][0]
        .clone();
    assert_eq!(n, Value::Integer(total), "counter");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ferry_testkit::local::proptest_cases(), max_shrink_iters: 1000, ..ProptestConfig::default() })]
    #[test]
    fn custom_lww_and_counter_cells_converge_through_rebases((n, actions) in scenario()) {
        run(n, &actions);
    }
}

/// The case that diverged before rebases dropped lost `lww` cells (see `merge.rs`).
#[test]
fn a_later_edit_of_both_columns_rebased_converges() {
    run(
        2,
        &[
            Action::Edit(1, true, true, false),
            Action::Sync(1, 0),
            Action::Edit(0, true, true, false),
            Action::Sync(0, 0),
        ],
    );
}
