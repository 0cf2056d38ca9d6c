//! Strict writes, seeded: replicas increment balances in a `server_checked` table
//! (read-modify-write), each increment in one transaction with a row of a `multi_writer` log
//! table, and sync through the in-memory sequencer (the relay's compare-and-set and ordering
//! rules) with connections cut at random points, so refusals arrive before, after and in the
//! middle of the conflicting changes.
//!
//! After every scenario:
//! * every replica holds exactly what a fresh replica applying the relay's log holds;
//! * linearizability of the checked cells: walking the relay's log in order, every accepted
//!   increment wrote exactly the previous balance plus one (no lost update, no stale read);
//! * atomicity: a log row exists (everywhere) iff its increment was accepted; a rejected
//!   increment left nothing anywhere, on its own device included;
//! * every change has a verdict with the relay's code (`conflict`), every rejection is in its
//!   device's conflict log, counted once as rolled back and announced by a `Rollback` event,
//!   whether the relay refused it or the device withdrew it on meeting the winning change
//!   first (an offline race).
//!
//! Cases: 300 by default (`FERRY_PROPTEST_CASES` for more).
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::protocol::ErrorCode;
use ferry_core::sequencer::Sequencer;
use ferry_core::{
    Cell, ChangeEvent, ChangeId, ChangeSource, ConflictKind, Observer, Replica, RowOp, Schema,
    Subscription, TableDecl, TableMode, Value, Verdict,
};
use ferry_testkit::local::sync_via_client;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn schema() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("acct")
                .text_key("id")
                .integer("balance")
                .mode(TableMode::ServerChecked),
        )
        .table(TableDecl::new("log").text_key("id").text("acct").text("by"))
}

#[derive(Debug, Clone)]
enum Action {
    /// Replica increments account `a` (creating it at 1).
    Inc(usize, u8),
    /// Replica deletes account `a`.
    Del(usize, u8),
    /// Replica writes a log row only (unguarded unless a guarded change is pending).
    Note(usize),
    /// Replica syncs, the connection dropping after `steps` frames (0: until quiet).
    Sync(usize, u8),
}

fn action(n: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..n, 0..3u8).prop_map(|(r, a)| Action::Inc(r, a)),
        1 => (0..n, 0..3u8).prop_map(|(r, a)| Action::Del(r, a)),
        1 => (0..n).prop_map(Action::Note),
        4 => (0..n, 0..6u8).prop_map(|(r, s)| Action::Sync(r, s)),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Action>)> {
    (2..5usize).prop_flat_map(|n| (Just(n), prop::collection::vec(action(n), 1..40)))
}

struct World {
    _dir: tempfile::TempDir,
    replicas: Vec<Replica>,
    seq: Sequencer,
    /// (replica, change id, log row id) of every increment.
    incs: Vec<(usize, ChangeId, String)>,
    /// Every change made.
    changes: Vec<(usize, ChangeId)>,
    /// Change sets each replica's sessions reported withdrawn.
    withdrawn: Vec<usize>,
    /// `Rollback` events each replica's observer received.
    rollbacks: Vec<Arc<AtomicUsize>>,
    _subs: Vec<Subscription>,
}

impl World {
    fn commit(&mut self, r: usize, f: impl FnOnce(&ferry_core::Transaction)) -> Option<ChangeId> {
        let mut tx = self.replicas[r].begin().unwrap();
        f(&tx);
        let id = tx.commit_change().unwrap();
        if let Some(id) = id {
            self.changes.push((r, id));
        }
        id
    }

    fn inc(&mut self, r: usize, a: u8) {
        let acct = format!("a{a}");
        let log_id = ferry_core::new_id();
        let by = format!("r{r}");
        let id = self.commit(r, |tx| {
            let rows = tx
                .query(
                    "SELECT balance FROM acct WHERE id = ?1",
                    &[Value::Text(acct.clone())],
                )
                .unwrap();
            match rows.rows.first() {
                Some(row) => {
                    let Value::Integer(b) = row[0] else {
                        panic!("balance {:?}", row[0])
                    };
                    tx.execute(
                        "UPDATE acct SET balance = ?1 WHERE id = ?2",
                        &[Value::Integer(b + 1), Value::Text(acct.clone())],
                    )
                    .unwrap();
                }
                None => {
                    tx.execute(
                        "INSERT INTO acct(id, balance) VALUES (?1, 1)",
                        &[Value::Text(acct.clone())],
                    )
                    .unwrap();
                }
            }
            tx.execute(
                "INSERT INTO log(id, acct, by) VALUES (?1, ?2, ?3)",
                &[
                    Value::Text(log_id.clone()),
                    Value::Text(acct.clone()),
                    Value::Text(by.clone()),
                ],
            )
            .unwrap();
        });
        self.incs.push((r, id.unwrap(), log_id));
    }

    fn sync(&mut self, r: usize, steps: u8) {
        self.withdrawn[r] += sync_via_client(&mut self.seq, &self.replicas[r], steps);
    }

    fn settle(&mut self) {
        for _ in 0..4 {
            for r in 0..self.replicas.len() {
                self.sync(r, 0);
            }
        }
    }
}

/// Counts `Rollback` events.
struct Rollbacks(Arc<AtomicUsize>);

impl Observer for Rollbacks {
    fn on_change(&self, e: &ChangeEvent) {
        if e.source == ChangeSource::Rollback {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn run(n: usize, actions: &[Action]) {
    let dir = tempfile::tempdir().unwrap();
    let s = schema();
    let replicas: Vec<Replica> = (0..n)
        .map(|i| Replica::open(dir.path().join(format!("r{i}.db")), &s).unwrap())
        .collect();
    let rollbacks: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::default()).collect();
    let subs = (0..n)
        .map(|i| {
            let count = Arc::clone(&rollbacks[i]);
            let replica = &replicas[i];
            replica.subscribe(Arc::new(Rollbacks(count)))
        })
        .collect();
    let mut w = World {
        _dir: dir,
        replicas,
        seq: Sequencer::with_schema(&s),
        incs: Vec::new(),
        changes: Vec::new(),
        withdrawn: vec![0; n],
        rollbacks,
        _subs: subs,
    };
    for a in actions {
        match *a {
            Action::Inc(r, a) => w.inc(r, a),
            Action::Del(r, a) => {
                w.commit(r, |tx| {
                    tx.execute(
                        "DELETE FROM acct WHERE id = ?1",
                        &[Value::Text(format!("a{a}"))],
                    )
                    .unwrap();
                });
            }
            Action::Note(r) => {
                w.commit(r, |tx| {
                    tx.execute(
                        "INSERT INTO log(id, acct, by) VALUES (?1, 'note', ?2)",
                        &[
                            Value::Text(ferry_core::new_id()),
                            Value::Text(format!("r{r}")),
                        ],
                    )
                    .unwrap();
                });
            }
            Action::Sync(r, steps) => w.sync(r, steps),
        }
    }
    w.settle();

    // Everyone holds what a fresh replica applying the relay's log holds.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = Replica::open(fresh_dir.path().join("fresh.db"), &s).unwrap();
    let (log, up_to) = w.seq.changes_after(0, usize::MAX);
    fresh.apply_remote(0, up_to, &log).unwrap();
    let truth = fresh.dump().unwrap();
    for (i, r) in w.replicas.iter().enumerate() {
        assert_eq!(
            r.pending_count().unwrap(),
            0,
            "replica {i} still has pending changes"
        );
        assert_eq!(
            r.dump().unwrap(),
            truth,
            "replica {i} diverged from the relay's log"
        );
    }

    // Linearizability of the checked cells: every accepted write is the previous value + 1.
    let mut balance: HashMap<String, i64> = HashMap::new();
    for s in &log {
        for rc in s.change_set.rows.iter().filter(|r| r.table == "acct") {
            match &rc.op {
                RowOp::Delete => {
                    balance.remove(&format!("{:?}", rc.pk));
                }
                RowOp::Upsert(cells) => {
                    for c in cells {
                        if let Cell::Set(col, Value::Integer(v)) = c
                            && col == "balance"
                        {
                            let key = format!("{:?}", rc.pk);
                            let prev = balance.get(&key).copied().unwrap_or(0);
                            assert_eq!(
                                *v,
                                prev + 1,
                                "lost update on {:?} at relay position {}",
                                rc.pk,
                                s.server_seq
                            );
                            balance.insert(key, *v);
                        }
                    }
                }
            }
        }
    }

    // Verdicts, atomicity and the conflict log.
    let mut rejected_on = vec![0usize; n];
    for (r, id) in &w.changes {
        match w.replicas[*r].verdict(id).unwrap() {
            Verdict::Accepted(_) => {}
            Verdict::Rejected { code, reason } => {
                assert_eq!(
                    code,
                    ErrorCode::Conflict,
                    "change {id} of replica {r}: {reason}"
                );
                rejected_on[*r] += 1;
            }
            Verdict::Pending => panic!("change {id} of replica {r} has no verdict"),
        }
    }
    let logged: BTreeSet<String> = fresh
        .query("SELECT id FROM log WHERE acct != 'note'", &[])
        .unwrap()
        .rows
        .into_iter()
        .map(|r| match &r[0] {
            Value::Text(t) => t.clone(),
            v => panic!("{v:?}"),
        })
        .collect();
    for (r, id, log_id) in &w.incs {
        let accepted = matches!(w.replicas[*r].verdict(id).unwrap(), Verdict::Accepted(_));
        assert_eq!(
            logged.contains(log_id),
            accepted,
            "increment {id} of replica {r}: log row present = {}, accepted = {accepted}",
            logged.contains(log_id)
        );
    }
    for (i, r) in w.replicas.iter().enumerate() {
        let rejections = r
            .conflicts()
            .unwrap()
            .into_iter()
            .filter(|c| c.kind == ConflictKind::Rejected)
            .count();
        assert_eq!(
            rejections > 0,
            rejected_on[i] > 0,
            "replica {i}: {} rejected changes but {rejections} conflict-log entries",
            rejected_on[i]
        );
        assert_eq!(
            w.withdrawn[i], rejected_on[i],
            "replica {i}: every rejected change is counted as rolled back, once"
        );
        assert_eq!(
            w.rollbacks[i].load(Ordering::Relaxed) > 0,
            rejected_on[i] > 0,
            "replica {i}: {} rejected changes, a Rollback event iff any",
            rejected_on[i]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ferry_testkit::local::proptest_cases(), max_shrink_iters: 1000, ..ProptestConfig::default() })]
    #[test]
    fn strict_writes_are_linearizable_atomic_and_converge((n, actions) in scenario()) {
        run(n, &actions);
    }
}

#[test]
fn two_replicas_race_one_wins_the_other_rolls_back() {
    run(
        2,
        &[
            Action::Inc(0, 0),
            Action::Sync(0, 0),
            Action::Sync(1, 0),
            Action::Inc(0, 0),
            Action::Inc(1, 0),
            Action::Sync(0, 0),
            Action::Sync(1, 0),
        ],
    );
}
