//! An upload queue that never wedges: a change set the relay refuses for a permanent reason
//! (a scope the token may no longer write, a size beyond the relay's limits) is set aside,
//! the uploads behind it go on, and the app decides (discard or retry). A transaction the
//! relay could never take is refused at commit. Real relay processes on 127.0.0.1.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::protocol::ErrorCode;
use ferry_core::{Error, Replica, Value};
use ferry_testkit::eventually;
use ferry_testkit::relay::*;
use std::time::Duration;

fn hour() -> Duration {
    Duration::from_secs(3600)
}

fn text(r: &Replica, sql: &str) -> Option<String> {
    match r
        .query(sql, &[])
        .unwrap()
        .rows
        .first()
        .map(|row| row[0].clone())
    {
        Some(Value::Text(t)) => Some(t),
        _ => None,
    }
}

fn count(r: &Replica, sql: &str) -> i64 {
    match r.query(sql, &[]).unwrap().rows[0][0] {
        Value::Integer(n) => n,
        ref other => panic!("not a count: {other:?}"),
    }
}

/// Resumes a paused sync until everything uploaded, and returns the quarantine: the one
/// change set the relay refused as `forbidden`.
fn resume_until_quarantined(
    h: &ferry_core::SyncHandle,
    device: &Replica,
) -> Vec<ferry_core::Quarantined> {
    h.resume();
    wait_synced(h);
    let q = device.quarantined().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].code, ErrorCode::Forbidden);
    q
}

/// The wedge found in review: a user edits a row offline while an admin moves it to a scope
/// the user may not write. The edit is refused as `forbidden`; before, every later write of
/// the user stayed pending forever. Now it is quarantined, later writes upload, it cannot be
/// discarded (an unguarded write keeps no before-images: a typed error says so), and it
/// uploads once retried under a token that may write it.
#[test]
fn a_forbidden_edit_is_set_aside_and_later_writes_upload() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let admin = open(d.path(), "admin.db");
    let ha = connect(&admin, &url, admin_token("root"));
    let device = open(d.path(), "device.db");
    let alice = || token_for("alice", &["list:a", "list:b"], &["list:a"], hour());
    let h = connect(&device, &url, alice());
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('t1', 'list:a', 'first')",
            &[],
        )
        .unwrap();
    wait_synced(&h);
    pause(&h);
    // Offline, the user edits the row; meanwhile an admin moves it to `list:b`.
    device
        .execute("UPDATE todo SET title = 'mine' WHERE id = 't1'", &[])
        .unwrap();
    wait_synced(&ha);
    admin
        .execute("UPDATE todo SET list = 'list:b' WHERE id = 't1'", &[])
        .unwrap();
    wait_synced(&ha);
    // Then writes more, which must not wait behind the refused edit.
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('t2', 'list:a', 'after')",
            &[],
        )
        .unwrap();
    let q = resume_until_quarantined(&h, &device);
    assert_eq!(q[0].tables, vec!["todo".to_owned()]);
    assert!(!q[0].discardable);
    assert!(q[0].reason.contains("t1"), "{}", q[0].reason);
    let s = h.status();
    assert_eq!(s.quarantined, 1, "{s:?}");
    assert!(s.refused.is_none(), "uploads are not stopped: {s:?}");
    assert_eq!(s.pending, 0);
    eventually(
        "the later write reaches others",
        Duration::from_secs(30),
        || text(&admin, "SELECT title FROM todo WHERE id = 't2'").as_deref() == Some("after"),
    );
    assert_eq!(
        text(&admin, "SELECT title FROM todo WHERE id = 't1'").as_deref(),
        Some("first"),
        "the refused edit was not stored"
    );
    // Discarding cannot take back a write that kept no before-image: a typed error, and
    // the entry stays.
    match device.discard_quarantined(q[0].id) {
        Err(Error::CannotDiscard { id, .. }) => assert_eq!(id, q[0].id),
        other => panic!("expected CannotDiscard, got {other:?}"),
    }
    assert_eq!(device.quarantined().unwrap().len(), 1);
    // Offline, a checked write is pending: an unguarded change set retried now could not
    // be taken back with it were the relay to refuse it, so the retry waits (a typed error,
    // nothing changed).
    drop(h);
    device
        .execute("INSERT INTO acct(id, balance) VALUES ('a9', 1)", &[])
        .unwrap();
    match device.retry_quarantined(q[0].id) {
        Err(Error::RetryWaits { id }) => assert_eq!(id, q[0].id),
        other => panic!("expected RetryWaits, got {other:?}"),
    }
    assert_eq!(
        device.quarantined().unwrap(),
        q,
        "the entry stays as it was"
    );
    // The app fixes the cause (a token that may write `list:b`), the checked write is
    // acknowledged, and the retry goes ahead.
    let h = connect(
        &device,
        &url,
        token_for(
            "alice",
            &["list:a", "list:b", "global"],
            &["list:a", "list:b", "global"],
            hour(),
        ),
    );
    wait_synced(&h);
    assert!(device.retry_quarantined(q[0].id).unwrap().is_some());
    assert!(matches!(
        device.retry_quarantined(q[0].id),
        Err(Error::NotQuarantined(_))
    ));
    wait_synced(&h);
    assert!(device.quarantined().unwrap().is_empty());
    eventually(
        "the retried edit reaches others",
        Duration::from_secs(30),
        || text(&admin, "SELECT title FROM todo WHERE id = 't1'").as_deref() == Some("mine"),
    );
    assert_eq!(
        text(&device, "SELECT list FROM todo WHERE id = 't1'").as_deref(),
        Some("list:b")
    );
    check_log(&relay);
}

/// A strict write (here `server_checked`) refused for good is not set aside: the relay
/// decides strict writes, so it is rolled back at once, with what was written on top of it,
/// exactly as a compare-and-set conflict is. Set aside, a later write on top of it would
/// have uploaded a value computed from one the relay never took (found by the simulation,
/// seed 55: a balance one increment ahead of the accepted ones).
#[test]
fn a_strict_write_refused_for_good_is_rolled_back_with_what_was_written_on_top() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let url = relay.url();
    let other = open(d.path(), "other.db");
    let ho = connect(&other, &url, admin_token("root"));
    other
        .execute("INSERT INTO acct(id, balance) VALUES ('a1', 10)", &[])
        .unwrap();
    wait_synced(&ho);
    let device = open(d.path(), "device.db");
    // May read everything but write only `list:a`: the global `acct` table is not its.
    let h = connect(&device, &url, token_for("bob", &["*"], &["list:a"], hour()));
    wait_synced(&h);
    pause(&h);
    device
        .execute("UPDATE acct SET balance = balance + 1 WHERE id = 'a1'", &[])
        .unwrap();
    // On top of it: the next increment reads 11.
    device
        .execute("UPDATE acct SET balance = balance + 1 WHERE id = 'a1'", &[])
        .unwrap();
    device
        .execute(
            "INSERT INTO todo(id, list, title) VALUES ('b1', 'list:a', 'behind')",
            &[],
        )
        .unwrap();
    assert_eq!(
        count(&device, "SELECT balance FROM acct WHERE id = 'a1'"),
        12
    );
    h.resume();
    wait_synced(&h);
    assert!(
        device.quarantined().unwrap().is_empty(),
        "nothing set aside"
    );
    assert!(h.status().refused.is_none(), "uploads go on");
    assert_eq!(
        count(&device, "SELECT balance FROM acct WHERE id = 'a1'"),
        10,
        "both increments taken back"
    );
    eventually(
        "the unrelated write behind them uploads",
        Duration::from_secs(30),
        || text(&other, "SELECT title FROM todo WHERE id = 'b1'").as_deref() == Some("behind"),
    );
    let logged = device.conflicts().unwrap();
    assert!(
        logged
            .iter()
            .any(|c| c.policy == "forbidden" && c.column.as_deref() == Some("balance")),
        "{logged:?}"
    );
    // The replica holds what the relay holds.
    let v = h.verify_blocking(&device, Duration::from_secs(30)).unwrap();
    assert_eq!(v.relay, v.local, "{v:?}");
}

/// A transaction beyond the relay's announced limits is refused at commit, nothing
/// written; one written before the limits were known is set aside when its push comes, and
/// the connection stays up (no reconnect loop).
#[test]
fn transactions_beyond_the_relays_limits_never_wedge_uploads() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nmax_change_set_ops = 100\n",
    );
    let url = relay.url();
    let device = open(d.path(), "device.db");
    let insert = |from: usize, n: usize| {
        device.write(|tx| {
            for i in from..from + n {
                tx.execute(
                    "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
                    &[Value::Text(format!("r{i}"))],
                )?;
            }
            Ok(())
        })
    };
    // Before the device has ever heard the relay: committed.
    insert(0, 60).unwrap();
    let h = connect(&device, &url, admin_token("carol"));
    insert(60, 5).unwrap();
    wait_synced(&h);
    let q = device.quarantined().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].code, ErrorCode::TooLarge);
    assert_eq!(q[0].rows, 60);
    assert_eq!(h.status().connects, 1, "no reconnect loop");
    // Now the limits are known: refused at commit, nothing written.
    match insert(100, 60) {
        Err(Error::TransactionTooLarge { ops, max_ops, .. }) => {
            assert!(ops > 100, "{ops}");
            assert_eq!(max_ops, 100);
        }
        other => panic!("expected TransactionTooLarge, got {other:?}"),
    }
    assert_eq!(
        count(&device, "SELECT count(*) FROM todo WHERE id LIKE 'r1__'"),
        0
    );
    // Smaller ones go through, and the limits are remembered across a reopen.
    insert(200, 10).unwrap();
    wait_synced(&h);
    drop(h);
    drop(device);
    let device = open(d.path(), "device.db");
    let big = device.write(|tx| {
        for i in 0..60 {
            tx.execute(
                "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
                &[Value::Text(format!("z{i}"))],
            )?;
        }
        Ok(())
    });
    assert!(
        matches!(big, Err(Error::TransactionTooLarge { .. })),
        "{big:?}"
    );
    let observer = open(d.path(), "observer.db");
    let ho = connect(&observer, &url, admin_token("dave"));
    wait_synced(&ho);
    assert_eq!(count(&observer, "SELECT count(*) FROM todo"), 15);
}
