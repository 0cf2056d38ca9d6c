//! The properties every relay store must have — gap-free idempotent sequencing, refusals that
//! store nothing, concurrent pushers and a reader, compare-and-set, guarded change sets,
//! leases and fencing, history and compaction, per-scope reads — written once as functions of a
//! [`StoreFactory`], and [`store_suite!`](crate::store_suite!) to run them all against a
//! backend in one line:
//!
//! ```ignore
//! ferry_testkit::store_suite!(sqlite, ferry_testkit::store_suite::SqliteStores::new());
//! ```
//!
//! The caller needs `tokio` (with `macros` and `rt-multi-thread`) among its dev-dependencies.

use crate::raw;
pub use crate::store_snapshot::snapshots_replay_to_the_state_of_the_log;
use ferry_core::admission::Bounds;
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{Cell, ChangeSet, Fence, ReplicaId, Value};
use ferry_relay::auth::{Claims, Grants, now_secs};
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::error::RelayError;
use ferry_relay::store::postgres::PgStore;
use ferry_relay::store::sqlite::SqliteStore;
use ferry_relay::store::{PushOutcome, ReadFilter, Store};
use rand::RngExt;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Opens stores of one backend; opening again on the same factory (or a clone) opens the same
/// data, as a restarted relay or a second relay node would.
pub trait StoreFactory: Clone + Send + Sync + 'static {
    /// A store over this factory's data.
    fn open(&self) -> impl Future<Output = Arc<dyn Store>> + Send;

    /// Moves the expiry of lease `name` back by `ms` in the stored data, as if that much
    /// time had passed since (stores judge expiry by the relay's or database's clock).
    /// Returns how many records matched (0 once the store forgot it).
    fn age_lease(&self, name: &str, ms: u64) -> impl Future<Output = u64> + Send;
}

/// Embedded SQLite stores in one temporary directory.
#[derive(Clone)]
pub struct SqliteStores(Arc<tempfile::TempDir>);

impl SqliteStores {
    /// Stores in a fresh temporary directory.
    pub fn new() -> SqliteStores {
        SqliteStores(Arc::new(tempfile::tempdir().unwrap()))
    }
}

impl SqliteStores {
    /// The directory holding the store's file.
    pub fn dir(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Default for SqliteStores {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreFactory for SqliteStores {
    async fn open(&self) -> Arc<dyn Store> {
        SqliteStore::open(self.0.path(), catalog(), 4096).unwrap()
    }

    async fn age_lease(&self, name: &str, ms: u64) -> u64 {
        let c = rusqlite::Connection::open(self.0.path().join("relay.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        let n = c
            .execute(
                "UPDATE leases SET expires_ms = expires_ms - ?2 WHERE name = ?1",
                rusqlite::params![name, ms as i64],
            )
            .unwrap();
        n as u64
    }
}

/// PostgreSQL stores over one database.
#[derive(Clone)]
pub struct PgStores(pub String);

impl PgStores {
    /// Stores over a fresh database on the test run's server ([`crate::pg::fresh_pg_db`]).
    pub fn fresh() -> PgStores {
        PgStores(crate::pg::fresh_pg_db())
    }
}

impl StoreFactory for PgStores {
    async fn open(&self) -> Arc<dyn Store> {
        PgStore::open(&self.0, catalog(), 4096, 64 << 20)
            .await
            .unwrap()
    }

    async fn age_lease(&self, name: &str, ms: u64) -> u64 {
        let (c, conn) = tokio_postgres::connect(&self.0, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let n = c
            .execute(
                "UPDATE ferry_leases SET expires_ms = expires_ms - $2 WHERE name = $1",
                &[&name, &(ms as i64)],
            )
            .await
            .unwrap();
        n as u64
    }
}

/// The relay tests' catalog ([`crate::schema::relay`] at version 1).
pub fn catalog() -> Arc<RelayCatalog> {
    Arc::new(RelayCatalog::from_schema(crate::schema::relay(1)).unwrap())
}

/// Runs every property of the suite against the stores `$factory` (an expression, evaluated
/// once per test) opens, as `#[tokio::test]`s in a module named `$name`.
#[macro_export]
macro_rules! store_suite {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_suite!(@tests $factory;
                sequencing_is_gap_free_and_idempotent,
                a_refusal_stores_nothing,
                compare_and_set,
                guarded_sees_an_unseen_write_behind_its_own,
                leases_and_fencing,
                idle_leases_are_forgotten_and_tokens_keep_growing,
                history_and_compaction,
                scoped_reads_find_exactly_the_readable_sets,
                snapshots_replay_to_the_state_of_the_log,
            );
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_pushers_and_a_reader() {
                $crate::store_suite::concurrent_pushers_and_a_reader(vec![$factory]).await;
            }
        }
    };
    (@tests $factory:expr; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                $crate::store_suite::$test($factory).await;
            }
        )*
    };
}

/// Grants of a token for `sub` that reads and writes everything and is primary of `primary`.
pub fn grants(sub: &str, primary: &[&str]) -> Arc<Grants> {
    Arc::new(
        Grants::from_claims(&Claims {
            sub: sub.into(),
            exp: now_secs() + 3600,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: primary.iter().map(|s| s.to_string()).collect(),
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
        .unwrap(),
    )
}

/// Replica id `[n; 16]`.
pub fn origin(n: u8) -> ReplicaId {
    ReplicaId([n; 16])
}

/// A cell set to `v`.
pub fn set(c: &str, v: Value) -> Cell {
    Cell::Set(c.into(), v)
}

/// A change set of `o` at `oseq` writing row `pk` of the global `tag` table.
pub fn tag(o: ReplicaId, oseq: u64, pk: &str) -> ChangeSet {
    raw::change_set(
        o,
        oseq,
        "tag",
        pk,
        1,
        vec![set("name", Value::Text(pk.into()))],
    )
}

/// The positions of acknowledged outcomes (panics on a refusal).
pub fn acked(out: &[PushOutcome]) -> Vec<u64> {
    out.iter()
        .map(|o| match o {
            PushOutcome::Acked(s) => *s,
            PushOutcome::Refused(e) => panic!("refused: {e}"),
        })
        .collect()
}

/// The refusal of an outcome (panics on an acknowledgement).
pub fn refused(out: &PushOutcome) -> &RelayError {
    match out {
        PushOutcome::Refused(e) => e,
        PushOutcome::Acked(s) => panic!("acknowledged at {s}, expected a refusal"),
    }
}

/// Every stored change set, in order.
pub async fn all(store: &dyn Store) -> Vec<Arc<ferry_relay::store::StoredSet>> {
    let mut out = Vec::new();
    loop {
        let after = out
            .last()
            .map_or(0, |s: &Arc<ferry_relay::store::StoredSet>| s.server_seq);
        let got = store.read(after, 100, 1 << 20).await.unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend(got);
    }
}

/// Positions are 1, 2, 3…; a retry returns the first position; a different change set under a
/// used `(origin, origin_seq)` and a gap in `origin_seq` are refused and store nothing.
pub async fn sequencing_is_gap_free_and_idempotent<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let g = grants("a", &[]);
    let sets: Vec<_> = (1..=3)
        .map(|i| tag(origin(1), i, &format!("t{i}")))
        .collect();
    assert_eq!(
        acked(
            &store
                .push(Arc::clone(&g), Bounds::NONE, sets.clone())
                .await
                .unwrap()
        ),
        vec![1, 2, 3]
    );
    let retry = store
        .push(Arc::clone(&g), Bounds::NONE, vec![sets[1].clone()])
        .await
        .unwrap();
    assert_eq!(
        acked(&retry),
        vec![2],
        "a retry is acknowledged at its first position"
    );
    let reuse = store
        .push(
            Arc::clone(&g),
            Bounds::NONE,
            vec![tag(origin(1), 2, "other")],
        )
        .await
        .unwrap();
    assert!(matches!(refused(&reuse[0]), RelayError::OriginReused(_)));
    let gap = store
        .push(Arc::clone(&g), Bounds::NONE, vec![tag(origin(1), 5, "gap")])
        .await
        .unwrap();
    assert!(
        matches!(refused(&gap[0]), RelayError::InvalidChangeSet(m) if m.contains("holds up to 3"))
    );
    let stored = all(&*store).await;
    assert_eq!(
        stored.iter().map(|s| s.server_seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for (s, cs) in stored.iter().zip(&sets) {
        assert_eq!(s.change_set.id, cs.id);
    }
    assert_eq!(store.max_origin_seq(origin(1)).await.unwrap(), 3);
    assert_eq!(store.max_origin_seq(origin(9)).await.unwrap(), 0);
    assert_eq!(store.stats().await.unwrap().head, 3);
    store.shutdown().await;
    // Reopening keeps everything and continues at the head.
    let store = kind.open().await;
    assert_eq!(store.feed().head(), 3);
    assert_eq!(
        acked(
            &store
                .push(g, Bounds::NONE, vec![tag(origin(1), 4, "t4")])
                .await
                .unwrap()
        ),
        vec![4]
    );
    store.shutdown().await;
}

/// A refusal stores nothing, and the change sets after it in the same push are not looked at.
pub async fn a_refusal_stores_nothing<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let g = grants("a", &[]);
    let price = raw::change_set(
        origin(2),
        2,
        "price",
        "p",
        1,
        vec![set("cents", Value::Integer(5))],
    );
    let out = store
        .push(
            Arc::clone(&g),
            Bounds::NONE,
            vec![tag(origin(2), 1, "ok"), price, tag(origin(2), 3, "after")],
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 2, "nothing after the refusal is looked at");
    assert!(matches!(out[0], PushOutcome::Acked(1)));
    assert!(matches!(refused(&out[1]), RelayError::Forbidden(m) if m.contains("read_only")));
    assert_eq!(store.stats().await.unwrap().head, 1);
    assert_eq!(store.max_origin_seq(origin(2)).await.unwrap(), 1);
    // A primary may write it.
    let p = raw::change_set(
        origin(3),
        1,
        "price",
        "p",
        1,
        vec![set("cents", Value::Integer(5))],
    );
    assert_eq!(
        acked(
            &store
                .push(grants("backend", &["price"]), Bounds::NONE, vec![p])
                .await
                .unwrap()
        ),
        vec![2]
    );
    store.shutdown().await;
}

/// Many concurrent pushers: every change set gets exactly one position, positions are 1..=n,
/// and each origin's change sets are in its own order. A reader polling the log meanwhile
/// only ever sees a gap-free prefix (never N+1 before N).
pub async fn concurrent_pushers_and_a_reader<F: StoreFactory>(kinds: Vec<F>) {
    let mut stores = Vec::new();
    for k in &kinds {
        stores.push(k.open().await);
    }
    let pushers = 8u8;
    let per = 40u64;
    let reader_store = Arc::clone(&stores[stores.len() - 1]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_r = Arc::clone(&stop);
    let reader = tokio::spawn(async move {
        let mut seen = 0u64;
        let mut polls = 0u64;
        while !stop_r.load(std::sync::atomic::Ordering::SeqCst) {
            let got = reader_store.read(seen, 50, 1 << 20).await.unwrap();
            for s in got {
                assert_eq!(s.server_seq, seen + 1, "the reader saw a gap after {seen}");
                seen = s.server_seq;
            }
            polls += 1;
            tokio::task::yield_now().await;
        }
        (seen, polls)
    });
    let mut tasks = Vec::new();
    for p in 0..pushers {
        let store = Arc::clone(&stores[p as usize % stores.len()]);
        tasks.push(tokio::spawn(async move {
            let g = grants(&format!("p{p}"), &[]);
            let mut positions = Vec::new();
            for i in 1..=per {
                let cs = tag(origin(10 + p), i, &format!("p{p}-{i}"));
                positions.extend(acked(
                    &store
                        .push(Arc::clone(&g), Bounds::NONE, vec![cs])
                        .await
                        .unwrap(),
                ));
            }
            positions
        }));
    }
    let mut every = Vec::new();
    for t in tasks {
        let pos = t.await.unwrap();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "an origin's change sets keep its order"
        );
        every.extend(pos);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (seen, polls) = reader.await.unwrap();
    assert!(polls > 0 && seen <= pushers as u64 * per);
    every.sort_unstable();
    let n = pushers as u64 * per;
    assert_eq!(
        every,
        (1..=n).collect::<Vec<_>>(),
        "positions are exactly 1..={n}"
    );
    for store in &stores {
        let log = all(&**store).await;
        assert_eq!(log.len() as u64, n);
        let mut per_origin: BTreeMap<ReplicaId, u64> = BTreeMap::new();
        for s in &log {
            let last = per_origin.entry(s.change_set.origin).or_default();
            assert_eq!(s.change_set.origin_seq, *last + 1);
            *last += 1;
        }
        // Every node's feed reaches the head and holds the same sets in the same order.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.feed().head() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a node's feed stopped at {}",
                store.feed().head()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let w = store
            .feed()
            .window_after(0, 10_000)
            .expect("window holds everything");
        assert_eq!(
            w.iter().map(|s| s.change_set.id).collect::<Vec<_>>(),
            log.iter().map(|s| s.change_set.id).collect::<Vec<_>>()
        );
    }
    for s in stores {
        s.shutdown().await;
    }
}

/// Compare-and-set on a `server_checked` table: a write based on an old position loses to
/// the unseen change, and the refusal names its position.
pub async fn compare_and_set<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let bal = |o: ReplicaId, oseq: u64, base: u64, v: i64| {
        let mut cs = raw::change_set(
            o,
            oseq,
            "acct",
            "a1",
            1,
            vec![set("balance", Value::Integer(v))],
        );
        cs.base = base;
        cs
    };
    let first = acked(
        &store
            .push(
                grants("a", &[]),
                Bounds::NONE,
                vec![bal(origin(1), 1, 0, 10)],
            )
            .await
            .unwrap(),
    );
    assert_eq!(first, vec![1]);
    let lost = store
        .push(
            grants("b", &[]),
            Bounds::NONE,
            vec![bal(origin(2), 1, 0, 20)],
        )
        .await
        .unwrap();
    match refused(&lost[0]) {
        RelayError::Conflict { seq, .. } => assert_eq!(*seq, 1),
        e => panic!("expected a conflict, got {e}"),
    }
    // Having seen position 1, the same write is accepted.
    let ok = store
        .push(
            grants("b", &[]),
            Bounds::NONE,
            vec![bal(origin(2), 1, 1, 20)],
        )
        .await
        .unwrap();
    assert_eq!(acked(&ok), vec![2]);
    // The writer's own earlier change is not "unseen".
    let own = store
        .push(
            grants("b", &[]),
            Bounds::NONE,
            vec![bal(origin(2), 2, 1, 30)],
        )
        .await
        .unwrap();
    assert_eq!(acked(&own), vec![3]);
    store.shutdown().await;
}

/// A guarded change set (it touches a `server_checked` table) is checked at row granularity
/// against every unseen write by another origin, even when a later write of its own origin
/// (unguarded, so not checked) came in between. Found by the deterministic simulation
/// (seed 6): the store kept only the row's last writer, and that writer was the pusher.
pub async fn guarded_sees_an_unseen_write_behind_its_own<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let note = |o: ReplicaId, oseq: u64, body: &str| {
        raw::change_set(
            o,
            oseq,
            "note",
            "n1",
            1,
            vec![set("body", Value::Text(body.into()))],
        )
    };
    let other = acked(
        &store
            .push(
                grants("b", &[]),
                Bounds::NONE,
                vec![note(origin(2), 1, "theirs")],
            )
            .await
            .unwrap(),
    );
    assert_eq!(other, vec![1]);
    let own = acked(
        &store
            .push(
                grants("a", &[]),
                Bounds::NONE,
                vec![note(origin(1), 1, "mine")],
            )
            .await
            .unwrap(),
    );
    assert_eq!(own, vec![2]);
    let mut guarded = raw::change_set(
        origin(1),
        2,
        "acct",
        "a9",
        1,
        vec![set("balance", Value::Integer(1))],
    );
    guarded.rows.extend(note(origin(1), 2, "again").rows);
    let out = store
        .push(grants("a", &[]), Bounds::NONE, vec![guarded])
        .await
        .unwrap();
    match refused(&out[0]) {
        RelayError::Conflict { seq, .. } => assert_eq!(*seq, 1, "the other origin's write"),
        e => panic!("expected a conflict, got {e}"),
    }
    store.shutdown().await;
}

/// Lease records expired for longer than `FORGET_AFTER_MS` are deleted by later lease
/// requests, a few at a time and oldest first, and a forgotten name's next grant still gets a
/// larger token than any it had (a write fenced by an old token stays refused). Records
/// expired more recently are kept.
pub async fn idle_leases_are_forgotten_and_tokens_keep_growing<F: StoreFactory>(kind: F) {
    use ferry_core::lease::{FORGET_AFTER_MS, FORGET_PER_REQUEST};
    let store = kind.open().await;
    let acquire = |name: &str| LeaseRequest::Acquire {
        name: name.into(),
        ttl_ms: 60_000,
    };
    let release = |name: &str, token| LeaseRequest::Release {
        name: name.into(),
        token,
    };
    let fenced_push = |oseq: u64, token: u64| {
        let mut cs = tag(origin(1), oseq, &format!("old-{oseq}"));
        cs.fence = Some(Fence {
            lease: "old".into(),
            token,
        });
        let store = store.clone();
        async move {
            store
                .push(grants("a", &[]), Bounds::NONE, vec![cs])
                .await
                .unwrap()
        }
    };
    // `old` is granted three times and released; it expired long ago.
    let mut t = 0;
    for _ in 0..3 {
        t = lease_token(&store.lease(origin(1), acquire("old")).await.unwrap());
        store.lease(origin(1), release("old", t)).await.unwrap();
    }
    assert_eq!(t, 3);
    // Names nobody uses any more, and one that expired only recently. Aged together after
    // all were made (every lease request forgets a few).
    let idle = 3 * FORGET_PER_REQUEST;
    for i in 0..idle {
        let name = format!("idle-{i}");
        let ti = lease_token(&store.lease(origin(2), acquire(&name)).await.unwrap());
        store.lease(origin(2), release(&name, ti)).await.unwrap();
    }
    let recent = lease_token(&store.lease(origin(2), acquire("recent")).await.unwrap());
    store
        .lease(origin(2), release("recent", recent))
        .await
        .unwrap();
    assert_eq!(kind.age_lease("old", FORGET_AFTER_MS + 60_000).await, 1);
    for i in 0..idle {
        let aged = kind
            .age_lease(&format!("idle-{i}"), FORGET_AFTER_MS + 1000)
            .await;
        assert_eq!(aged, 1);
    }
    assert_eq!(kind.age_lease("recent", FORGET_AFTER_MS - 60_000).await, 1);
    // One request forgets a few, oldest first: `old` and some idle ones, not the newest.
    let probe = lease_token(&store.lease(origin(3), acquire("probe")).await.unwrap());
    assert_eq!(
        kind.age_lease("old", 0).await,
        0,
        "the oldest record is forgotten"
    );
    let last = format!("idle-{}", idle - 1);
    assert_eq!(
        kind.age_lease(&last, 0).await,
        1,
        "a request forgets a bounded number"
    );
    // A write fenced by the forgotten grant is refused.
    assert!(matches!(
        refused(&fenced_push(1, 3).await[0]),
        RelayError::Fenced(_)
    ));
    for _ in 0..idle / FORGET_PER_REQUEST {
        store
            .lease(
                origin(3),
                LeaseRequest::Renew {
                    name: "probe".into(),
                    token: probe,
                    ttl_ms: 60_000,
                },
            )
            .await
            .unwrap();
    }
    assert_eq!(
        kind.age_lease(&last, 0).await,
        0,
        "every idle record is forgotten"
    );
    assert_eq!(kind.age_lease("recent", 0).await, 1, "a recent one is kept");
    // `old` starts above every token it ever had; the old one stays refused.
    let again = lease_token(&store.lease(origin(2), acquire("old")).await.unwrap());
    assert!(
        again > 3,
        "a forgotten name's tokens keep growing (got {again})"
    );
    assert!(matches!(
        refused(&fenced_push(1, 3).await[0]),
        RelayError::Fenced(_)
    ));
    // A kept record goes on from its own token.
    let r2 = lease_token(&store.lease(origin(3), acquire("recent")).await.unwrap());
    assert_eq!(r2, recent + 1);
    store.shutdown().await;
}

/// The fencing token of a granted lease (panics otherwise).
pub fn lease_token(o: &LeaseOutcome) -> u64 {
    match o {
        LeaseOutcome::Granted { token, .. } => *token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Leases: one holder at a time, a new grant after expiry with a larger token, and a write
/// fenced by the old token refused.
pub async fn leases_and_fencing<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let acquire = |ttl_ms| LeaseRequest::Acquire {
        name: "door".into(),
        ttl_ms,
    };
    let t1 = lease_token(&store.lease(origin(1), acquire(300)).await.unwrap());
    assert!(matches!(
        store.lease(origin(2), acquire(300)).await.unwrap(),
        LeaseOutcome::Busy { .. }
    ));
    let fenced = |o: ReplicaId, oseq: u64, token: u64| {
        let mut cs = tag(o, oseq, &format!("f{}-{oseq}", o.0[0]));
        cs.fence = Some(Fence {
            lease: "door".into(),
            token,
        });
        cs
    };
    assert_eq!(
        acked(
            &store
                .push(
                    grants("a", &[]),
                    Bounds::NONE,
                    vec![fenced(origin(1), 1, t1)]
                )
                .await
                .unwrap()
        ),
        vec![1]
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let t2 = lease_token(&store.lease(origin(2), acquire(10_000)).await.unwrap());
    assert!(t2 > t1, "fencing tokens grow ({t1} then {t2})");
    let stale = store
        .push(
            grants("a", &[]),
            Bounds::NONE,
            vec![fenced(origin(1), 2, t1)],
        )
        .await
        .unwrap();
    assert!(matches!(refused(&stale[0]), RelayError::Fenced(_)));
    assert_eq!(
        acked(
            &store
                .push(
                    grants("b", &[]),
                    Bounds::NONE,
                    vec![fenced(origin(2), 1, t2)]
                )
                .await
                .unwrap()
        ),
        vec![2]
    );
    store.shutdown().await;
}

/// Row history for backfill, and compaction keeping every position.
pub async fn history_and_compaction<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    let g = grants("a", &[]);
    let todo = |oseq: u64, title: &str| {
        raw::change_set(
            origin(1),
            oseq,
            "todo",
            "x",
            1,
            vec![
                set("list", Value::Text("l1".into())),
                set("title", Value::Text(title.into())),
            ],
        )
    };
    let mut sets = Vec::new();
    for i in 1..=5 {
        let mut cs = todo(i, &format!("v{i}"));
        cs.hlc = ferry_core::Hlc::new(now_secs() * 1000 + i, 0);
        sets.push(cs);
    }
    sets.push(tag(origin(1), 6, "g"));
    assert_eq!(
        acked(&store.push(g, Bounds::NONE, sets).await.unwrap()),
        vec![1, 2, 3, 4, 5, 6]
    );
    let hist = store
        .row_history("todo", &Value::Text("x".into()), 5)
        .await
        .unwrap();
    assert_eq!(
        hist.iter().map(|s| s.server_seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let r = store.compact(6).await.unwrap();
    assert_eq!(r.horizon, 6);
    assert!(
        r.cells_dropped >= 8,
        "superseded titles and lists dropped: {r:?}"
    );
    let log = all(&*store).await;
    assert_eq!(log.len(), 6, "compaction keeps every position");
    let last = &log[4].change_set.rows[0];
    assert!(matches!(&last.op, ferry_core::RowOp::Upsert(c) if c.len() == 2));
    assert_eq!(store.stats().await.unwrap().horizon, 6);
    store.shutdown().await;
}

/// Grants reading the scope patterns `read` (and writing nothing) for subject `sub`.
pub fn readers(sub: &str, read: &[&str]) -> Arc<Grants> {
    Arc::new(
        Grants::from_claims(&Claims {
            sub: sub.into(),
            exp: now_secs() + 3600,
            read: read.iter().map(|s| s.to_string()).collect(),
            write: vec![],
            primary: vec![],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        })
        .unwrap(),
    )
}

/// Pages through [`Store::read_scoped`] after `after` with page sizes drawn from `rng`,
/// checking each answer's shape; returns the positions read and where the read ended.
async fn page_scoped(
    store: &dyn Store,
    filter: &ReadFilter,
    mut after: u64,
    rng: &mut StdRng,
) -> (Vec<u64>, u64) {
    let mut got = Vec::new();
    for _ in 0..100_000 {
        let max_sets = rng.random_range(1..400);
        let max_bytes = rng.random_range(1..200_000);
        let r = store
            .read_scoped(after, filter, max_sets, max_bytes)
            .await
            .unwrap();
        assert!(r.sets.len() <= max_sets);
        if r.up_to <= after {
            assert!(r.sets.is_empty());
            return (got, after);
        }
        for s in &r.sets {
            assert!(
                s.server_seq > after && s.server_seq <= r.up_to,
                "{} outside ({after}, {}]",
                s.server_seq,
                r.up_to
            );
        }
        got.extend(r.sets.iter().map(|s| s.server_seq));
        after = r.up_to;
    }
    panic!("scoped reads did not reach the head");
}

/// A connection's catch-up through the per-scope index finds exactly the change sets that
/// touch a scope it may read (rows in it, or rows leaving it), pages through to the head
/// whatever the page sizes, and still does after compaction rewrote bodies. Patterns cover
/// exact scopes, prefixes, `{sub}`, `*`, nothing, and more scopes than one merge takes.
pub async fn scoped_reads_find_exactly_the_readable_sets<F: StoreFactory>(kind: F) {
    let store = kind.open().await;
    push_scoped_traffic(&*store).await;
    check_scoped_reads(&*store).await;
    // Rows that moved between scopes are in a snapshot of the scope they are in now.
    crate::store_snapshot::check_snapshot_rows(&*store).await;
    let report = store.compact(6_000).await.unwrap();
    assert!(report.rewritten > 0, "{report:?}");
    check_scoped_reads(&*store).await;
    store.shutdown().await;
}

/// Pushes 9,000 seeded change sets of 1–3 rows over 308 scopes (the `global` table too), some
/// rows moving between scopes: more than two blocks of SQLite's index (see
/// `ferry_relay::store::scoped::BLOCK`).
pub async fn push_scoped_traffic(store: &dyn Store) {
    use rand::SeedableRng;
    let g = grants("writer", &[]);
    let mut rng = StdRng::seed_from_u64(0x5c0_9ed);
    let lists: Vec<String> = [
        "l0", "l1", "l2", "l3", "team:a", "team:b", "user:x", "user:xy",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((0..300).map(|i| format!("s{i:03}")))
    .collect();
    let mut hlc = now_secs() * 1000;
    let mut oseq = [0u64; 3];
    let mut batch = Vec::new();
    for n in 0..9_000 {
        let o = rng.random_range(0..3usize);
        oseq[o] += 1;
        hlc += 1;
        let mut b = crate::change::change_set(origin(o as u8 + 1), oseq[o])
            .hlc(ferry_core::Hlc::new(hlc, 0));
        for _ in 0..rng.random_range(1..4) {
            // A few rows keep moving between scopes; the rest are new.
            let pk = if rng.random_bool(0.3) {
                format!("m{}", rng.random_range(0..10))
            } else {
                format!("r{n}-{}", rng.random_range(0..1_000_000))
            };
            b = if rng.random_bool(0.1) {
                b.upsert(
                    "tag",
                    pk.as_str(),
                    1,
                    vec![set("name", Value::Text("g".into()))],
                )
            } else {
                let list = if rng.random_bool(0.5) {
                    &lists[rng.random_range(0..8)]
                } else {
                    &lists[rng.random_range(0..lists.len())]
                };
                b.upsert(
                    "todo",
                    pk.as_str(),
                    1,
                    vec![set("list", Value::Text(list.clone()))],
                )
            };
        }
        batch.push(b.build());
        if batch.len() == 500 {
            let out = store
                .push(Arc::clone(&g), Bounds::NONE, std::mem::take(&mut batch))
                .await
                .unwrap();
            acked(&out);
        }
    }
}

/// Checks scoped reads of several tokens from several cursors against a filter of the whole
/// log (see [`scoped_reads_find_exactly_the_readable_sets`]).
pub async fn check_scoped_reads(store: &dyn Store) {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(0x9a6e);
    let tokens: Vec<(&str, Vec<&str>)> = vec![
        ("a", vec!["l3"]),
        ("a", vec!["l1", "team:*"]),
        ("x", vec!["user:{sub}", "global"]),
        ("a", vec!["s1*"]),
        ("a", vec!["s*"]),
        ("a", vec!["*"]),
        ("a", vec![]),
        ("a", vec!["nothing-here"]),
    ];
    let log = all(store).await;
    let head = log.last().map_or(0, |s| s.server_seq);
    for (sub, read) in &tokens {
        let grants = readers(sub, read);
        let filter = ReadFilter::new(Arc::clone(&grants));
        for after in [0, 1, 4095, 4096, 8191, head / 3, head - 1, head] {
            let truth: Vec<u64> = log
                .iter()
                .filter(|s| s.server_seq > after)
                .filter(|s| {
                    s.tags.iter().any(|t| {
                        grants.can_read(&t.scope)
                            || t.moved_from.as_deref().is_some_and(|f| grants.can_read(f))
                    })
                })
                .map(|s| s.server_seq)
                .collect();
            let (got, end) = page_scoped(store, &filter, after, &mut rng).await;
            assert_eq!(
                end, head,
                "{read:?} after {after}: the read reaches the head"
            );
            assert_eq!(got, truth, "{read:?} after {after}");
        }
    }
}
