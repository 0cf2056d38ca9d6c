//! Scope changes and subscriptions: a replica holds exactly the rows its token and its
//! subscriptions allow, whatever changed between (or during) its connections — gained
//! scopes are back-filled by a snapshot (rows older than its cursor included), lost ones
//! evicted after its pending writes are pushed.
#![allow(clippy::unwrap_used, missing_docs)]

use super::scopes::lists;
use ferry_core::protocol::ErrorCode;
use ferry_core::{Replica, SyncHandle, SyncPort, Value};
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::sync::Arc;
use std::time::Duration;

fn hour() -> Duration {
    Duration::from_secs(3600)
}

/// `(id, list, title, votes)` of the todo rows in `lists`, as `r` holds them.
fn todos(r: &Replica, lists: &[String]) -> Vec<Vec<Value>> {
    r.query("SELECT id, list, title, votes FROM todo ORDER BY id", &[])
        .unwrap()
        .rows
        .into_iter()
        .filter(|row| matches!(&row[1], Value::Text(l) if lists.contains(l)))
        .collect()
}

fn write(r: &Replica, id: &str, list: &str) {
    r.execute(
        "INSERT INTO todo(id, list, title, votes) VALUES (?1, ?2, 'n', 0) ON CONFLICT(id) DO UPDATE SET list = excluded.list, title = title || '+', votes = votes + 1",
        &[id.into(), list.into()],
    )
    .unwrap();
}

fn verified(h: &SyncHandle, r: &Replica, what: &str) {
    wait_synced(h);
    let v = h.verify_blocking(r, Duration::from_secs(30)).unwrap();
    assert!(
        v.matches(),
        "{what}: the replica differs from the relay: {v:?}"
    );
}

/// A snapshot is read at the relay's fold, which may lag its log: rows written between the
/// snapshot's position and the head the client heard come through the log after the last
/// page, so the scope is not synced until the cursor reaches that head.
#[test]
fn a_scope_counts_as_synced_once_the_log_reaches_the_head_heard_with_its_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let device = open(d.path(), "device.db");
    let end = ferry_core::port::SnapshotEnd {
        position: 5,
        backfill: false,
        scopes: Some(ferry_core::scope::ScopeSet::everything()),
        complete_at: 9,
    };
    device
        .apply_snapshot(Vec::new(), b"", false, Some(end))
        .unwrap();
    assert_eq!(device.cursor().unwrap(), 5);
    assert!(
        !device.holds_scope("list:a").unwrap(),
        "positions 6..=9 are still to come"
    );
    device.apply_changes(5, 8, &[], &[]).unwrap();
    assert!(!device.holds_scope("list:a").unwrap());
    device.apply_changes(8, 9, &[], &[]).unwrap();
    assert!(device.holds_scope("list:a").unwrap());
}

#[test]
fn a_gained_scope_is_back_filled_and_a_lost_one_evicted_after_its_writes_are_pushed() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let ha = connect(&admin, &url, admin_token("admin"));
    for i in 0..300 {
        write(&admin, &format!("r{i}"), ["list:a", "list:b"][i % 2]);
    }
    wait_synced(&ha);
    let device = open(d.path(), "device.db");
    let h = connect(
        &device,
        &url,
        token_for("dev", &["list:a"], &["list:a"], hour()),
    );
    verified(&h, &device, "list:a only");
    assert_eq!(lists(&device), ["list:a"]);
    assert!(h.has_synced("list:a").unwrap() && !h.has_synced("list:b").unwrap());
    drop(h);
    // Rows change in both lists, some move from b to a and back, counters grow.
    for i in 0..300 {
        write(&admin, &format!("r{i}"), ["list:b", "list:a"][i % 3 % 2]);
    }
    wait_synced(&ha);
    // The token gains list:b: its rows, older than the device's cursor, are back-filled.
    let h = connect(
        &device,
        &url,
        token_for("dev", &["list:a", "list:b"], &["list:a"], hour()),
    );
    h.wait_for_first_sync_blocking("list:b", Duration::from_secs(60))
        .unwrap();
    verified(&h, &device, "after gaining list:b");
    let both = ["list:a".to_owned(), "list:b".to_owned()];
    assert_eq!(todos(&device, &both), todos(&admin, &both));
    assert_eq!(todos(&device, &both).len(), 300);
    // Offline, the device writes to list:b; then the token loses list:a: the write is
    // pushed first, then list:a's rows go.
    h.pause();
    pause(&h);
    write(&device, "from-device", "list:b");
    drop(h);
    let h = connect(
        &device,
        &url,
        token_for("dev", &["list:b"], &["list:b"], hour()),
    );
    verified(&h, &device, "after losing list:a");
    assert_eq!(lists(&device), ["list:b"]);
    let ev = device.evictions(10).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].scope, "list:a");
    assert_eq!(ev[0].pending_writes, 1);
    wait_synced(&ha);
    assert_eq!(
        ev[0].rows as usize,
        todos(&admin, &["list:a".to_owned()]).len()
    );
    assert_eq!(
        admin
            .query("SELECT list FROM todo WHERE id = 'from-device'", &[])
            .unwrap()
            .rows,
        vec![vec![Value::Text("list:b".into())]],
        "the pending write reached the relay"
    );
    assert_eq!(
        device.pending_count().unwrap(),
        0,
        "an eviction pushes nothing"
    );
    drop(h);
    // A write to a scope the token then loses altogether is refused and quarantined (its
    // placeholder keeps the sequence), and the eviction goes ahead once nothing else waits.
    write(&device, "b-then-lost", "list:b");
    let h = connect(
        &device,
        &url,
        token_for("dev", &["list:a"], &["list:a"], hour()),
    );
    ferry_testkit::eventually("list:b evicted", Duration::from_secs(30), || {
        lists(&device) == ["list:a"]
    });
    assert!(h.status().refused.is_none());
    let q = device.quarantined().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].code, ErrorCode::Forbidden);
    let ev = device.evictions(10).unwrap();
    assert_eq!(ev[0].scope.as_str(), "list:b");
    assert!(ev[0].pending_writes <= 1, "{:?}", ev[0]);
}

#[test]
fn subscriptions_choose_among_the_permitted_scopes_at_run_time() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let ha = connect(&admin, &url, admin_token("admin"));
    for i in 0..200 {
        write(&admin, &format!("r{i}"), &format!("list:p{}", i % 4));
    }
    wait_synced(&ha);
    let device = open(d.path(), "device.db");
    device
        .set_subscriptions(Some(vec!["list:p0".into()]))
        .unwrap();
    let h = connect(
        &device,
        &url,
        token_for("dev", &["list:*"], &["list:*"], hour()),
    );
    // A first sync's scope is complete once its snapshot is applied, not at the welcome.
    h.wait_for_first_sync_blocking("list:p0", Duration::from_secs(60))
        .unwrap();
    assert_eq!(todos(&device, &["list:p0".into()]).len(), 50);
    verified(&h, &device, "subscribed to p0");
    assert_eq!(lists(&device), ["list:p0"]);
    // Open a project on demand, and a pattern of them.
    h.subscribe("list:p1").unwrap();
    h.wait_for_first_sync_blocking("list:p1", Duration::from_secs(60))
        .unwrap();
    verified(&h, &device, "subscribed to p0, p1");
    assert_eq!(lists(&device), ["list:p0", "list:p1"]);
    // Drop one while a write to it waits: pushed, then evicted.
    h.pause();
    pause(&h);
    write(&device, "r0", "list:p0");
    h.resume();
    h.unsubscribe("list:p0").unwrap();
    wait_synced(&h);
    ferry_testkit::eventually("p0 evicted", Duration::from_secs(30), || {
        lists(&device) == ["list:p1"]
    });
    verified(&h, &device, "subscribed to p1");
    wait_synced(&ha);
    assert_eq!(
        todos(&admin, &["list:p0".into()])
            .into_iter()
            .find(|r| r[0] == Value::Text("r0".into()))
            .unwrap()[3],
        Value::Integer(1),
        "the write made before unsubscribing reached the relay"
    );
    // Back to every permitted scope.
    h.set_subscriptions(None).unwrap();
    ferry_testkit::eventually("all lists", Duration::from_secs(60), || {
        h.has_synced("list:p3").unwrap()
    });
    verified(&h, &device, "every scope");
    let every: Vec<String> = (0..4).map(|i| format!("list:p{i}")).collect();
    assert_eq!(todos(&device, &every), todos(&admin, &every));
    // Unsubscribing with no subscriptions, or subscribing to what the token may not read,
    // is refused with a typed error.
    assert!(matches!(
        h.unsubscribe("list:p1"),
        Err(ferry_core::Error::InvalidInput(_))
    ));
    h.subscribe("secret").unwrap();
    ferry_testkit::eventually("refused", Duration::from_secs(30), || {
        h.status()
            .last_error
            .is_some_and(|e| e.code == Some(ErrorCode::Forbidden))
    });
    assert_eq!(lists(&device), every, "nothing was evicted or applied");
}

/// Random grant changes and subscriptions between connections while writers keep writing
/// (so back-fills are read while the log moves): after each connection the device holds
/// exactly the rows of the scopes both allow, with the relay's values and counters.
#[test]
fn random_grant_and_subscription_changes_end_with_exactly_the_allowed_rows() {
    let seeds = seeds("FERRY_HOLDING_SEEDS", 24);
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let scopes = ["a", "b", "c", "d"];
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = d.path().join(format!("s{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        let list = |s: &str| format!("list:{s}-{seed}");
        let writers: Vec<Arc<Replica>> = (0..2).map(|i| open(&dir, &format!("w{i}.db"))).collect();
        let wh: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, w)| connect(w, &url, admin_token(&format!("w{i}"))))
            .collect();
        let device = open(&dir, "device.db");
        let mut subscribed: Option<Vec<String>> = None;
        for round in 0..6 {
            let readable: Vec<&str> = scopes
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.6))
                .collect();
            if rng.random_bool(0.5) {
                let subs: Vec<String> = scopes
                    .iter()
                    .filter(|_| rng.random_bool(0.5))
                    .filter(|s| readable.contains(s))
                    .map(|s| list(s))
                    .collect();
                subscribed = Some(subs);
            } else if rng.random_bool(0.3) {
                subscribed = None;
            }
            if let Some(s) = &subscribed {
                // A subscription the token no longer allows would be refused: keep the
                // subscriptions within the grants, as an app following its user's access does.
                let kept: Vec<String> = s
                    .iter()
                    .filter(|l| readable.iter().any(|r| list(r) == **l))
                    .cloned()
                    .collect();
                subscribed = Some(kept);
            }
            device.set_subscriptions(subscribed.clone()).unwrap();
            let pats: Vec<String> = readable.iter().map(|s| list(s)).collect();
            let pats: Vec<&str> = pats.iter().map(String::as_str).collect();
            let h = connect(&device, &url, token_for("dev", &pats, &pats, hour()));
            // Writers keep writing while the device connects (and back-fills).
            for _ in 0..rng.random_range(20..80) {
                let w = &writers[rng.random_range(0..writers.len())];
                let id = format!("k{}", rng.random_range(0..60));
                write(w, &id, &list(scopes[rng.random_range(0..scopes.len())]));
            }
            let allowed: Vec<String> = readable
                .iter()
                .map(|s| list(s))
                .filter(|l| subscribed.as_ref().is_none_or(|s| s.contains(l)))
                .collect();
            if !allowed.is_empty() && rng.random_bool(0.5) {
                let s = &allowed[rng.random_range(0..allowed.len())];
                // Its own new row: a key another writer holds in a scope this token may not
                // write would be refused (and the eviction waits for its pushes).
                write(&device, &format!("dev-{seed}-{round}"), s);
            }
            for w in &wh {
                wait_synced(w);
            }
            wait_synced(&h);
            for w in &wh {
                wait_synced(w);
            }
            ferry_testkit::eventually("evictions settle", Duration::from_secs(30), || {
                lists(&device).iter().all(|l| allowed.contains(l))
            });
            assert_eq!(
                todos(&device, &allowed),
                todos(&writers[0], &allowed),
                "seed {seed} round {round}: rows of {allowed:?} (readable {readable:?}, subscribed {subscribed:?})"
            );
            verified(&h, &device, &format!("seed {seed} round {round}"));
            drop(h);
        }
    }
}
