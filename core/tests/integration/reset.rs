//! Starting over: `Replica::clear` (a user logging out) deletes every row and Ferry's state and
//! leaves a new, empty replica at the same path; `Replica::resync` does the same for a replica
//! with nothing left to push, keeping its subscriptions, so the next connection downloads
//! everything again.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::sequencer::Sequencer;
use ferry_core::{ChangeEvent, ChangeSource, Error, Observer, Value};
use ferry_testkit::local::*;
use std::sync::{Arc, Mutex};

struct Events(Mutex<Vec<ChangeSource>>);

impl Observer for Events {
    fn on_change(&self, event: &ChangeEvent) {
        self.0.lock().unwrap().push(event.source);
    }
}

fn count(r: &ferry_core::Replica, table: &str) -> Value {
    r.query(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .rows[0][0]
        .clone()
}

#[test]
fn clear_leaves_a_new_empty_replica_and_tells_watches_and_observers() {
    let d = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::new();
    let other = open(d.path(), "other.db");
    other
        .execute("INSERT INTO todo(id, title) VALUES ('r', 'remote')", &[])
        .unwrap();
    push(&mut seq, &other);
    let r = open(d.path(), "a.db");
    pull(&seq, &r);
    r.execute("INSERT INTO todo(id, title) VALUES ('a', 'unpushed')", &[])
        .unwrap();
    r.execute("INSERT INTO note(id, body) VALUES ('n', 'x')", &[])
        .unwrap();
    r.set_subscriptions(Some(vec!["list:a".into()])).unwrap();
    let (id, cursor) = (r.replica_id().unwrap(), r.cursor().unwrap());
    assert!(cursor > 0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let _watch = r
        .watch(
            "SELECT count(*) FROM todo",
            &[],
            Box::new(move |rows| s2.lock().unwrap().push(rows.rows[0][0].clone())),
        )
        .unwrap();
    let events = Arc::new(Events(Mutex::new(Vec::new())));
    let _sub = r.subscribe(events.clone());

    r.clear().unwrap();

    assert_eq!(count(&r, "todo"), Value::Integer(0));
    assert_eq!(count(&r, "note"), Value::Integer(0));
    assert_eq!(r.pending_count().unwrap(), 0);
    assert_eq!(r.cursor().unwrap(), 0);
    assert_eq!(r.subscriptions().unwrap(), None);
    assert_ne!(
        r.replica_id().unwrap(),
        id,
        "a cleared replica is a new replica"
    );
    assert_eq!(r.last_synced_at().unwrap(), None);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Value::Integer(2), Value::Integer(0)]
    );
    assert_eq!(*events.0.lock().unwrap(), vec![ChangeSource::Cleared]);
    // The new replica works: writes are captured, reads see them, a sync brings the rows back.
    r.execute("INSERT INTO todo(id, title) VALUES ('b', 'after')", &[])
        .unwrap();
    assert_eq!(r.pending_count().unwrap(), 1);
    pull(&seq, &r);
    assert_eq!(count(&r, "todo"), Value::Integer(2));
    // Reopening the file finds the new replica.
    let id2 = r.replica_id().unwrap();
    r.close().unwrap();
    let again = open(d.path(), "a.db");
    assert_eq!(again.replica_id().unwrap(), id2);
}

#[test]
fn resync_refuses_while_writes_are_unpushed_and_keeps_subscriptions() {
    let d = tempfile::tempdir().unwrap();
    let mut seq = Sequencer::new();
    let r = open(d.path(), "a.db");
    r.set_subscriptions(Some(vec!["list:a".into()])).unwrap();
    r.execute("INSERT INTO todo(id, title) VALUES ('a', 'mine')", &[])
        .unwrap();
    match r.resync() {
        Err(Error::InvalidInput(why)) => assert!(why.contains("not pushed"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        count(&r, "todo"),
        Value::Integer(1),
        "a refused resync keeps everything"
    );
    push(&mut seq, &r);
    r.resync().unwrap();
    assert_eq!(count(&r, "todo"), Value::Integer(0));
    assert_eq!(r.cursor().unwrap(), 0);
    assert_eq!(r.subscriptions().unwrap(), Some(vec!["list:a".to_owned()]));
    // Downloading again brings back what it had written, now as remote rows.
    pull(&seq, &r);
    assert_eq!(count(&r, "todo"), Value::Integer(1));
    assert_eq!(r.pending_count().unwrap(), 0);
}

#[test]
fn clear_waits_for_no_session_and_a_closed_replica_stays_closed() {
    let d = tempfile::tempdir().unwrap();
    let r = Arc::new(open(d.path(), "a.db"));
    // A session that keeps trying to reach a relay that is not there.
    let h = r
        .connect(
            "ws://127.0.0.1:9/sync",
            Arc::new(|| Ok::<_, String>("t".to_owned())),
        )
        .unwrap();
    match r.clear() {
        Err(Error::InvalidInput(why)) => assert!(why.contains("disconnect"), "{why}"),
        other => panic!("{other:?}"),
    }
    h.disconnect();
    r.clear().unwrap();
    r.close().unwrap();
    assert!(matches!(r.clear(), Err(Error::Closed)));
}
