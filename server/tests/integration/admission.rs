//! One admission rule: the relay's stores and the in-memory sequencer refuse identically.
//!
//! Each seed generates a history of pushes from three origins with a mix of faults — a
//! retry, a reused `origin_seq`, a gap, a stamp too far ahead of the clock, too many cell
//! operations, an unknown table or column, a stale or unknown fence, an unseen write to a
//! checked cell — often several in one change set, and lease requests that make fences
//! current or stale. Every push goes to a real store (SQLite; PostgreSQL too when the
//! throwaway server is there) and to `ferry_core::sequencer::Sequencer`; the outcomes
//! (position, or refusal code and conflict position) must be the same, push after push.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use ferry_core::admission::Bounds;
use ferry_core::protocol::{ErrorCode, LeaseOutcome, LeaseRequest};
use ferry_core::sequencer::Sequencer;
use ferry_core::{Cell, ChangeSet, Fence, Hlc, ReplicaId, RowChange, RowOp, Value};
use ferry_relay::auth::{Claims, Grants, now_secs};
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::store::postgres::PgStore;
use ferry_relay::store::sqlite::SqliteStore;
use ferry_relay::store::{PushOutcome, Store};
use ferry_testkit::change::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;

const ORIGINS: u8 = 3;
const MAX_OPS: usize = 6;
const SKEW_MS: u64 = 60_000;

fn grants() -> Arc<Grants> {
    Arc::new(
        Grants::from_claims(&Claims {
            sub: "writer".into(),
            exp: now_secs() + 3600,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: vec!["price".into()],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
        .unwrap(),
    )
}

/// What one push came to, comparably.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Acked(u64),
    Refused(ErrorCode, u64),
}

/// One origin's view of what it pushed.
#[derive(Default)]
struct Origin {
    /// Accepted change sets, by origin_seq.
    accepted: BTreeMap<u64, ChangeSet>,
    /// The lease grant it holds, if any.
    grant: Option<u64>,
}

struct History {
    rng: StdRng,
    origins: Vec<Origin>,
    /// Highest position accepted (change sets take bases up to it).
    head: u64,
}

fn rid(n: u8) -> ReplicaId {
    ReplicaId([n + 1; 16])
}

impl History {
    fn row(&mut self) -> RowChange {
        let k = self.rng.random_range(0..4u8);
        let pk = Value::Text(format!("r{}", self.rng.random_range(0..3u8)));
        let delete = self.rng.random_bool(0.1);
        let (table, cells): (&str, Vec<Cell>) = match k {
            0 => (
                "tag",
                vec![Cell::Set("name".into(), Value::Text("x".into()))],
            ),
            1 => (
                "acct",
                vec![
                    Cell::Set(
                        "balance".into(),
                        Value::Integer(self.rng.random_range(0..100)),
                    ),
                    Cell::Set("holder".into(), Value::Text("h".into())),
                ],
            ),
            2 => (
                "memo",
                vec![Cell::Set("body".into(), Value::Text("m".into()))],
            ),
            _ => (
                "note",
                vec![
                    Cell::Set("body".into(), Value::Text("n".into())),
                    Cell::Add("n".into(), 1),
                ],
            ),
        };
        RowChange {
            table: table.into(),
            pk,
            cl: if delete { 2 } else { 1 },
            op: if delete {
                RowOp::Delete
            } else {
                RowOp::Upsert(cells)
            },
        }
    }

    /// The next push of origin `o`, with faults drawn at random.
    fn push(&mut self, o: usize, now_ms: u64) -> ChangeSet {
        let next = self.origins[o].accepted.keys().last().copied().unwrap_or(0) + 1;
        let r = &mut self.rng;
        if r.random_bool(0.08)
            && let Some(old) = self.origins[o].accepted.values().next().cloned()
        {
            return old; // a retry
        }
        let mut origin_seq = next;
        if r.random_bool(0.08) && next > 1 {
            origin_seq = r.random_range(1..next); // reused (a different change set)
        }
        if r.random_bool(0.08) {
            origin_seq = next + r.random_range(1..3u64); // a gap
        }
        let mut hlc = now_ms;
        if r.random_bool(0.08) {
            hlc = now_ms + 2 * SKEW_MS; // too far ahead
        }
        let base = r.random_range(0..=self.head);
        let rows_n = if r.random_bool(0.08) {
            5
        } else {
            r.random_range(0..3usize)
        };
        let mut rows: Vec<RowChange> = (0..rows_n).map(|_| self.row()).collect();
        let r = &mut self.rng;
        if r.random_bool(0.05) {
            rows.push(RowChange {
                table: "nope".into(),
                pk: Value::Text("k".into()),
                cl: 1,
                op: RowOp::Upsert(vec![]),
            });
        }
        if r.random_bool(0.05) {
            rows.push(RowChange {
                table: "tag".into(),
                pk: Value::Text("k".into()),
                cl: 1,
                op: RowOp::Upsert(vec![Cell::Set("no_such".into(), Value::Null)]),
            });
        }
        let fence = if r.random_bool(0.25) {
            let token = match self.origins[o].grant {
                Some(t) if r.random_bool(0.7) => t,
                Some(t) => t.saturating_sub(1),
                None => r.random_range(1..4u64),
            };
            Some(Fence {
                lease: "leader".into(),
                token,
            })
        } else {
            None
        };
        let guarded = fence.is_some() || rows.iter().any(|rc| rc.table == "acct");
        let mut cs = change_set(rid(o as u8), origin_seq)
            .hlc(Hlc::new(hlc, 0))
            .base(base)
            .rows(rows)
            .build();
        cs.fence = fence;
        cs.guarded = guarded;
        cs
    }

    fn lease(&mut self, o: usize) -> LeaseRequest {
        match self.origins[o].grant {
            Some(token) if self.rng.random_bool(0.5) => LeaseRequest::Release {
                name: "leader".into(),
                token,
            },
            _ => LeaseRequest::Acquire {
                name: "leader".into(),
                ttl_ms: 3_600_000,
            },
        }
    }
}

async fn open(pg: Option<&str>) -> (Arc<dyn Store>, Option<tempfile::TempDir>) {
    let cat = Arc::new(RelayCatalog::from_schema(ferry_testkit::relay::schema()).unwrap());
    match pg {
        None => {
            let dir = tempfile::tempdir().unwrap();
            (SqliteStore::open(dir.path(), cat, 4096).unwrap(), Some(dir))
        }
        Some(url) => (PgStore::open(url, cat, 4096, 64 << 20).await.unwrap(), None),
    }
}

/// Runs one seeded history against a store and the sequencer; returns how many pushes were
/// refused, by code.
async fn run(seed: u64, store: &dyn Store) -> BTreeMap<&'static str, usize> {
    let mut h = History {
        rng: StdRng::seed_from_u64(seed),
        origins: (0..ORIGINS).map(|_| Origin::default()).collect(),
        head: 0,
    };
    let mut seq = Sequencer::with_schema(&ferry_testkit::relay::schema());
    let g = grants();
    let mut refused = BTreeMap::new();
    for step in 0..80 {
        let o = h.rng.random_range(0..ORIGINS as usize);
        let now_ms = now_secs() * 1000;
        seq.now_ms = now_ms;
        if h.rng.random_bool(0.15) {
            let request = h.lease(o);
            let mine = seq.lease(rid(o as u8), &request);
            let theirs = store.lease(rid(o as u8), request).await.unwrap();
            // The two clocks differ by the milliseconds between the calls.
            let same_clock = |o: &LeaseOutcome| match o {
                LeaseOutcome::Busy { name, .. } => LeaseOutcome::Busy {
                    name: name.clone(),
                    retry_after_ms: 0,
                },
                other => other.clone(),
            };
            assert_eq!(
                same_clock(&mine),
                same_clock(&theirs),
                "seed {seed} step {step}: lease outcomes differ"
            );
            match mine {
                LeaseOutcome::Granted { token, .. } => h.origins[o].grant = Some(token),
                LeaseOutcome::Released { .. } => h.origins[o].grant = None,
                _ => {}
            }
            continue;
        }
        let cs = h.push(o, now_ms);
        let bounds = Bounds {
            now_ms,
            max_clock_skew_ms: SKEW_MS,
            max_ops: MAX_OPS,
        };
        let mine = match seq.push_bounded(cs.clone(), &bounds).unwrap() {
            Ok(s) => Outcome::Acked(s),
            Err(r) => Outcome::Refused(r.code, r.conflict_seq),
        };
        let out = store
            .push(Arc::clone(&g), bounds, vec![cs.clone()])
            .await
            .unwrap();
        let theirs = match &out[0] {
            PushOutcome::Acked(s) => Outcome::Acked(*s),
            PushOutcome::Refused(e) => Outcome::Refused(
                e.code(),
                match e {
                    ferry_relay::error::RelayError::Conflict { seq, .. } => *seq,
                    _ => 0,
                },
            ),
        };
        assert_eq!(
            mine, theirs,
            "seed {seed} step {step}: the sequencer and the store decided {cs:?} differently"
        );
        match mine {
            Outcome::Acked(s) => {
                h.head = h.head.max(s);
                h.origins[o].accepted.insert(cs.origin_seq, cs);
            }
            Outcome::Refused(code, _) => *refused.entry(code.as_str()).or_insert(0) += 1,
        }
    }
    refused
}

fn seeds(default: u64) -> u64 {
    std::env::var("FERRY_ADMISSION_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_and_sequencer_refuse_identically() {
    let mut total: BTreeMap<&str, usize> = BTreeMap::new();
    for seed in 0..seeds(60) {
        let (store, _dir) = open(None).await;
        for (code, n) in run(seed, &*store).await {
            *total.entry(code).or_insert(0) += n;
        }
    }
    eprintln!("admission: refusals by code over the seeds: {total:?}");
    // The generator must reach every refusal the rule can give, or the test proves little.
    for code in [
        "origin_reused",
        "invalid_change_set",
        "clock_skew",
        "too_large",
        "fenced",
        "conflict",
    ] {
        assert!(
            total.get(code).is_some_and(|n| *n > 0),
            "no `{code}` refusal generated: {total:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_and_sequencer_refuse_identically() {
    for seed in 0..seeds(6) {
        let (store, _) = open(Some(&ferry_testkit::pg::fresh_pg_db())).await;
        run(1000 + seed, &*store).await;
    }
}
