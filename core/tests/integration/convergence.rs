//! Convergence property test: 3–5 replicas, random writes on a small key space (so conflicts
//! are frequent), random sync order with lost acks, duplicated and interrupted deliveries,
//! foreign-connection writes and restarts. At the end every replica's synced tables are equal,
//! counters equal the sum of all increments, and every committed write reached the relay log
//! and lost only to a later write by `(hlc, origin)`.
//!
//! Cases: 500 by default; `FERRY_PROPTEST_CASES=20000 cargo test --release -p ferry-core --test integration convergence::`
//! runs more. Failing seeds are saved by proptest in `convergence.proptest-regressions` and
//! replayed first on every run; commit that file.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::SyncPort;
use ferry_core::sequencer::Sequencer;
use ferry_core::{Cell, DeleteRule, Hlc, Replica, ReplicaId, RowOp, Schema, TableDecl, Value};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

fn schema() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("title")
                .counter("votes"),
        )
        .table(
            TableDecl::new("note")
                .text_key("id")
                .text("body")
                .counter("n")
                .delete_rule(DeleteRule::UpdateWins),
        )
        // Never deleted: the oracle checks its cells and counters exactly.
        .table(
            TableDecl::new("kv")
                .text_key("id")
                .text("a")
                .text("b")
                .counter("hits"),
        )
}

#[derive(Debug, Clone)]
enum Op {
    Upsert { table: u8, key: u8 },
    Update { table: u8, key: u8 },
    Delete { table: u8, key: u8 },
    Add { table: u8, key: u8, delta: i8 },
    KvSet { key: u8, col: bool },
    KvAdd { key: u8, delta: i8 },
}

#[derive(Debug, Clone)]
enum Action {
    Write {
        r: usize,
        ops: Vec<Op>,
        foreign: bool,
    },
    Push {
        r: usize,
        lose_ack: bool,
        max: usize,
    },
    Pull {
        r: usize,
        max: usize,
        twice: bool,
    },
    Restart {
        r: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0u8..2;
    let k = 0u8..3;
    prop_oneof![
        (t.clone(), k.clone()).prop_map(|(table, key)| Op::Upsert { table, key }),
        (t.clone(), k.clone()).prop_map(|(table, key)| Op::Update { table, key }),
        (t.clone(), k.clone()).prop_map(|(table, key)| Op::Delete { table, key }),
        (t, k.clone(), -5i8..6).prop_map(|(table, key, delta)| Op::Add { table, key, delta }),
        (k.clone(), any::<bool>()).prop_map(|(key, col)| Op::KvSet { key, col }),
        (k, -5i8..6).prop_map(|(key, delta)| Op::KvAdd { key, delta }),
    ]
}

fn action(n: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (0..n, prop::collection::vec(op(), 1..4), prop::bool::weighted(0.2))
            .prop_map(|(r, ops, foreign)| Action::Write { r, ops, foreign }),
        2 => (0..n, prop::bool::weighted(0.2), 1usize..4).prop_map(|(r, lose_ack, max)| Action::Push { r, lose_ack, max }),
        2 => (0..n, 1usize..6, prop::bool::weighted(0.2)).prop_map(|(r, max, twice)| Action::Pull { r, max, twice }),
        1 => (0..n).prop_map(|r| Action::Restart { r }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Action>)> {
    (3usize..=5).prop_flat_map(|n| (Just(n), prop::collection::vec(action(n), 5..40)))
}

/// One deterministic wall clock per replica: shared time plus a fixed skew.
struct Clock(Arc<AtomicU64>, u64);
impl ferry_core::WallClock for Clock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst) + self.1
    }
}

fn open_replica(dir: &Path, r: usize, time: &Arc<AtomicU64>) -> Replica {
    let opts = ferry_core::OpenOptions {
        wall_clock: Arc::new(Clock(time.clone(), [0, 3, 1, 7, 2][r % 5])),
        new_replica_id: Some(ReplicaId([r as u8 + 1; 16])),
        apply_chunk_ops: 4,
        ..Default::default()
    };
    Replica::open_with(dir.join(format!("r{r}.db")), &schema(), opts).unwrap()
}

struct World {
    time: Arc<AtomicU64>,
    dir: tempfile::TempDir,
    replicas: Vec<Option<Replica>>,
    seq: Sequencer,
    counter: u64,
    /// Every kv value written by a committed transaction.
    kv_written: Vec<String>,
    /// Per replica: kv cells written by other connections and not yet folded. Consecutive
    /// foreign transactions between two folds become one change set (their net effect).
    unfolded: Vec<BTreeMap<(u8, bool), String>>,
    /// Sum of every committed kv counter delta, per key.
    kv_hits: BTreeMap<String, i64>,
}

const TABLES: [&str; 2] = ["todo", "note"];
const TEXT: [&str; 2] = ["title", "body"];
const COUNT: [&str; 2] = ["votes", "n"];

impl World {
    fn path(&self, r: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("r{r}.db"))
    }
    fn r(&self, r: usize) -> &Replica {
        self.replicas[r].as_ref().unwrap()
    }

    fn write(&mut self, r: usize, ops: &[Op], foreign: bool) {
        self.counter += 1;
        let tag = format!("v{}", self.counter);
        let mut stmts: Vec<(String, Vec<Value>)> = Vec::new();
        // Net effect per transaction: only the last value written to a cell is committed.
        let mut kv_vals: BTreeMap<(u8, bool), String> = BTreeMap::new();
        let mut kv_adds = Vec::new();
        for (j, o) in ops.iter().enumerate() {
            let val = Value::Text(format!("{tag}.{j}"));
            match o {
                Op::Upsert { table, key } => {
                    let t = TABLES[*table as usize];
                    let c = TEXT[*table as usize];
                    stmts.push((
                        format!("INSERT INTO {t}(id, {c}) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET {c} = excluded.{c}"),
                        vec![key_of(*key), val],
                    ));
                }
                Op::Update { table, key } => {
                    let t = TABLES[*table as usize];
                    let c = TEXT[*table as usize];
                    stmts.push((
                        format!("UPDATE {t} SET {c} = ?2 WHERE id = ?1"),
                        vec![key_of(*key), val],
                    ));
                }
                Op::Delete { table, key } => {
                    stmts.push((
                        format!("DELETE FROM {} WHERE id = ?1", TABLES[*table as usize]),
                        vec![key_of(*key)],
                    ));
                }
                Op::Add { table, key, delta } => {
                    let t = TABLES[*table as usize];
                    let c = COUNT[*table as usize];
                    stmts.push((
                        format!("UPDATE {t} SET {c} = {c} + ?2 WHERE id = ?1"),
                        vec![key_of(*key), Value::Integer(i64::from(*delta))],
                    ));
                }
                Op::KvSet { key, col } => {
                    let c = if *col { "a" } else { "b" };
                    if let Value::Text(s) = &val {
                        kv_vals.insert((*key, *col), s.clone());
                    }
                    stmts.push((
                        format!("INSERT INTO kv(id, {c}) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET {c} = excluded.{c}"),
                        vec![key_of(*key), val],
                    ));
                }
                Op::KvAdd { key, delta } => {
                    kv_adds.push((key_str(*key), i64::from(*delta)));
                    stmts.push((
                        "INSERT INTO kv(id, hits) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET hits = hits + excluded.hits".into(),
                        vec![key_of(*key), Value::Integer(i64::from(*delta))],
                    ));
                }
            }
        }
        if foreign {
            let c = rusqlite::Connection::open(self.path(r)).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            for (sql, p) in &stmts {
                c.execute(sql, rusqlite::params_from_iter(p.iter()))
                    .unwrap();
            }
            c.execute_batch("COMMIT").unwrap();
        } else {
            self.unfolded[r].clear();
            self.r(r)
                .write(|tx| {
                    for (sql, p) in &stmts {
                        tx.execute(sql, p)?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        if foreign {
            for (cell, v) in kv_vals {
                if let Some(old) = self.unfolded[r].insert(cell, v.clone()) {
                    self.kv_written.retain(|x| *x != old);
                }
                self.kv_written.push(v);
            }
        } else {
            self.kv_written.extend(kv_vals.into_values());
        }
        for (k, d) in kv_adds {
            *self.kv_hits.entry(k).or_default() += d;
        }
    }

    fn push(&mut self, r: usize, max: usize, lose_ack: bool) {
        self.unfolded[r].clear();
        let batch = self.r(r).prepare_push(max, usize::MAX).unwrap();
        let mut acks = Vec::new();
        for cs in batch {
            let o = cs.origin_seq;
            acks.push((o, self.seq.push(cs).unwrap()));
        }
        if !lose_ack {
            self.r(r).acknowledge(&acks).unwrap();
        }
    }

    fn pull(&mut self, r: usize, max: usize, twice: bool) {
        self.unfolded[r].clear();
        let rep = self.r(r);
        let cursor = rep.cursor().unwrap();
        let (sets, up_to) = self.seq.changes_after(cursor, max);
        rep.apply_remote(cursor, up_to, &sets).unwrap();
        if twice {
            let before = rep.dump().unwrap();
            let again = rep.apply_remote(cursor, up_to, &sets).unwrap();
            assert_eq!(again.applied + again.own, 0);
            assert_eq!(
                rep.dump().unwrap(),
                before,
                "a repeated delivery changed the replica"
            );
        }
        // A batch that skips ahead of the cursor is refused and changes nothing.
        let cursor = rep.cursor().unwrap();
        if self.seq.head() > cursor + 1 {
            let (sets, up_to) = self.seq.changes_after(cursor + 1, 1);
            let before = rep.dump().unwrap();
            assert!(rep.apply_remote(cursor + 1, up_to, &sets).is_err());
            assert_eq!(rep.dump().unwrap(), before);
        }
    }

    fn restart(&mut self, r: usize) {
        let old = self.replicas[r].take().unwrap();
        old.close().unwrap();
        self.replicas[r] = Some(open_replica(self.dir.path(), r, &self.time));
    }

    fn settle(&mut self) {
        for _ in 0..3 {
            for r in 0..self.replicas.len() {
                self.push(r, usize::MAX, false);
                self.pull(r, usize::MAX, false);
            }
        }
    }
}

fn key_str(k: u8) -> String {
    format!("k{k}")
}
fn key_of(k: u8) -> Value {
    Value::Text(key_str(k))
}

fn run(n: usize, actions: &[Action]) {
    let dir = tempfile::tempdir().unwrap();
    let time = Arc::new(AtomicU64::new(1_000));
    let replicas = (0..n)
        .map(|r| Some(open_replica(dir.path(), r, &time)))
        .collect();
    let mut w = World {
        time,
        dir,
        replicas,
        seq: Sequencer::new(),
        counter: 0,
        kv_written: Vec::new(),
        unfolded: vec![BTreeMap::new(); n],
        kv_hits: BTreeMap::new(),
    };
    for a in actions {
        w.time.fetch_add(2, Ordering::SeqCst);
        match a {
            Action::Write { r, ops, foreign } => w.write(*r, ops, *foreign),
            Action::Push { r, lose_ack, max } => w.push(*r, *max, *lose_ack),
            Action::Pull { r, max, twice } => w.pull(*r, *max, *twice),
            Action::Restart { r } => w.restart(*r),
        }
    }
    w.settle();
    let first = w.r(0).dump().unwrap();
    for r in 1..n {
        assert_eq!(
            w.r(r).dump().unwrap(),
            first,
            "replica {r} diverged from replica 0"
        );
        assert_eq!(w.r(r).pending_count().unwrap(), 0);
    }
    check_oracle(&w, &first);
}

/// The relay log is the ground truth of what was committed and in which order.
fn check_oracle(w: &World, dump: &[(String, ferry_core::Rows)]) {
    let (log, _) = w.seq.changes_after(0, usize::MAX);
    let mut best: HashMap<(String, String), (Hlc, ReplicaId, Value)> = HashMap::new();
    let mut hits: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen_values = std::collections::HashSet::new();
    for s in &log {
        let cs = &s.change_set;
        for rc in cs.rows.iter().filter(|rc| rc.table == "kv") {
            let RowOp::Upsert(cells) = &rc.op else {
                panic!("kv rows are never deleted")
            };
            let Value::Text(k) = &rc.pk else { panic!() };
            for c in cells {
                match c {
                    Cell::Set(col, v) => {
                        if let Value::Text(t) = v {
                            seen_values.insert(t.clone());
                        }
                        let e = best.entry((k.clone(), col.clone())).or_insert((
                            cs.hlc,
                            cs.origin,
                            v.clone(),
                        ));
                        if (cs.hlc, cs.origin) > (e.0, e.1) {
                            *e = (cs.hlc, cs.origin, v.clone());
                        }
                    }
                    Cell::Add(_, d) => *hits.entry(k.clone()).or_default() += d,
                }
            }
        }
    }
    for v in &w.kv_written {
        assert!(
            seen_values.contains(v),
            "committed write {v} never reached the relay"
        );
    }
    let kv = &dump.iter().find(|(n, _)| n == "kv").unwrap().1;
    let col = |name: &str| kv.columns.iter().position(|c| c == name).unwrap();
    for row in &kv.rows {
        let Value::Text(k) = &row[col("id")] else {
            panic!()
        };
        for c in ["a", "b"] {
            let expected = best
                .get(&(k.clone(), c.to_owned()))
                .map_or(Value::Null, |e| e.2.clone());
            assert_eq!(
                row[col(c)],
                expected,
                "kv {k}.{c} is not the last writer's value"
            );
        }
        assert_eq!(
            row[col("hits")],
            Value::Integer(hits.get(k).copied().unwrap_or(0)),
            "kv {k}.hits"
        );
        assert_eq!(
            hits.get(k).copied().unwrap_or(0),
            w.kv_hits.get(k).copied().unwrap_or(0),
            "counter increments lost for {k}"
        );
    }
}

fn cases() -> u32 {
    std::env::var("FERRY_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn replicas_converge((n, actions) in scenario()) {
        run(n, &actions);
    }
}

#[test]
fn hand_case_everything_conflicts() {
    use Action::*;
    let ops = |t: u8| {
        vec![
            Op::Upsert { table: t, key: 0 },
            Op::Add {
                table: t,
                key: 0,
                delta: 3,
            },
            Op::KvSet { key: 0, col: true },
        ]
    };
    let actions = vec![
        Write {
            r: 0,
            ops: ops(0),
            foreign: false,
        },
        Write {
            r: 1,
            ops: ops(0),
            foreign: true,
        },
        Write {
            r: 2,
            ops: vec![
                Op::Delete { table: 0, key: 0 },
                Op::Delete { table: 1, key: 0 },
            ],
            foreign: false,
        },
        Push {
            r: 1,
            lose_ack: true,
            max: 9,
        },
        Write {
            r: 0,
            ops: ops(1),
            foreign: false,
        },
        Push {
            r: 0,
            lose_ack: false,
            max: 9,
        },
        Pull {
            r: 2,
            max: 1,
            twice: true,
        },
        Write {
            r: 2,
            ops: vec![
                Op::Update { table: 1, key: 0 },
                Op::KvAdd { key: 0, delta: -2 },
            ],
            foreign: false,
        },
        Restart { r: 1 },
        Push {
            r: 2,
            lose_ack: false,
            max: 9,
        },
    ];
    run(3, &actions);
}
