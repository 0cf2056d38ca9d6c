//! Snapshots: row histories folded from the log replay, in fresh replicas, to the state of
//! the whole log — over many seeds of traffic (the store suite runs one larger seed on both
//! stores).

use ferry_testkit::store_snapshot::check_snapshots;
use ferry_testkit::store_suite::{SqliteStores, StoreFactory};

/// 24 seeds of 400 change sets each: updates, deletes, re-inserts, counters, writes to older
/// incarnations and concurrent bases on `delete_wins` and `update_wins` tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_replay_to_the_logs_state_over_many_seeds() {
    for seed in 0..24u64 {
        let stores = SqliteStores::new();
        let store = stores.open().await;
        check_snapshots(&*store, seed, 400).await;
        store.shutdown().await;
    }
}

mod live {
    //! Snapshots through a real relay process: a new device bootstraps from one, a cut
    //! snapshot resumes after the last page applied, and a forged token is refused.
    #![allow(clippy::unwrap_used)]

    use ferry_core::protocol::{ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg};
    use ferry_core::{ReplicaId, SyncPort, Value};
    use ferry_testkit::relay::*;
    use std::time::Duration;

    /// A relay holding `rows` rows of `todo` over 8 lists, written in transactions of 500 with
    /// counter additions, updates and deletes; its row histories folded up to its head.
    /// Returns the relay, the writer's replica and the head.
    fn loaded(
        dir: &std::path::Path,
        rows: usize,
    ) -> (RelayProc, std::sync::Arc<ferry_core::Replica>, u64) {
        let relay = RelayProc::start(&dir.join("relay"));
        let (w, head) = load(dir, &relay.url(), rows);
        folded(&relay, head);
        (relay, w, head)
    }

    /// Writes `rows` rows through the relay at `url` (see `loaded`); returns the writer and
    /// the head.
    fn load(
        dir: &std::path::Path,
        url: &str,
        rows: usize,
    ) -> (std::sync::Arc<ferry_core::Replica>, u64) {
        let w = open(dir, "writer.db");
        let h = connect(&w, url, admin_token("writer"));
        for chunk in 0..rows.div_ceil(500) {
            w.write(|tx| {
                for i in chunk * 500..((chunk + 1) * 500).min(rows) {
                    tx.execute(
                        "INSERT INTO todo(id, list, title, votes) VALUES (?1, ?2, 't', 1)",
                        &[format!("r{i:06}").into(), format!("list:{}", i % 8).into()],
                    )?;
                }
                Ok(())
            })
            .unwrap();
        }
        w.write(|tx| {
            tx.execute(
                "UPDATE todo SET votes = votes + 2, title = 'u' WHERE id < 'r000100'",
                &[],
            )?;
            tx.execute(
                "DELETE FROM todo WHERE id >= 'r000100' AND id < 'r000150'",
                &[],
            )
        })
        .unwrap();
        wait_synced(&h);
        drop(h);
        let head = w.cursor().unwrap();
        (w, head)
    }

    /// Waits until `relay` says the row histories are folded up to `head`.
    fn folded(relay: &RelayProc, head: u64) {
        eventually("row histories folded", Duration::from_secs(60), || {
            relay.metric("ferry_rows_position") >= head as f64
        });
    }

    /// Says hello as `me` at `url` and returns the first snapshot page's rows and resume
    /// token, checking what it announces for a walk of `rows` rows.
    fn first_page(
        rt: &tokio::runtime::Runtime,
        url: &str,
        me: ReplicaId,
        token: &str,
        rows: u64,
    ) -> (Vec<ferry_core::snapshot::SnapshotRow>, Vec<u8>) {
        rt.block_on(async {
            let mut ws = raw::connect(url).await;
            raw::send(&mut ws, &hello(me, token, None)).await;
            assert!(matches!(
                raw::recv(&mut ws).await,
                Some(ServerMsg::Welcome { .. })
            ));
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Snapshot {
                    rows: page,
                    resume,
                    done,
                    total_rows,
                    total_bytes,
                    bytes,
                    ..
                }) => {
                    assert!(!done, "{rows} rows take more than one page");
                    assert!(!resume.is_empty());
                    // The whole walk is announced with the first page.
                    assert_eq!(total_rows, rows);
                    assert!(bytes > 0 && total_bytes > bytes, "{bytes} of {total_bytes}");
                    (page, resume)
                }
                other => panic!("expected a snapshot page, got {other:?}"),
            }
        })
    }

    fn reader(dir: &std::path::Path, name: &str) -> std::sync::Arc<ferry_core::Replica> {
        open(dir, name)
    }

    /// A new device receives the rows of its scopes in a snapshot, not the log, and ends in
    /// the writer's state (values and checksum).
    #[test]
    fn a_new_device_bootstraps_from_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let (relay, w, head) = loaded(d.path(), 3_000);
        let read_before = relay.metric("ferry_store_sets_read_total");
        let b = reader(d.path(), "b.db");
        assert_eq!(b.last_synced_at().unwrap(), None);
        let hb = connect(&b, &relay.url(), admin_token("b"));
        wait_synced(&hb);
        // Progress: every row announced up front arrived; the complete sync is recorded.
        let st = hb.status();
        assert_eq!(st.snapshot.rows, 3_000, "{st:?}");
        assert_eq!(st.snapshot.total_rows, 3_000, "{st:?}");
        assert!(st.snapshot.bytes > 0 && st.snapshot.bytes == st.snapshot.total_bytes);
        assert!(st.has_synced && st.last_synced_at.is_some(), "{st:?}");
        assert_eq!(b.last_synced_at().unwrap(), st.last_synced_at);
        assert_eq!(b.dump().unwrap(), w.dump().unwrap());
        assert_eq!(b.checksum().unwrap(), w.checksum().unwrap());
        assert!(b.cursor().unwrap() >= head);
        let sent = relay.metric("ferry_snapshot_rows_total");
        assert!(sent >= 3_000.0, "the rows came in a snapshot ({sent})");
        let read = relay.metric("ferry_store_sets_read_total") - read_before;
        assert!(
            read < 5.0,
            "the log was not replayed ({read} change sets read)"
        );
        // A device that may read one list receives only that list's rows.
        let c = reader(d.path(), "c.db");
        let hc = connect(
            &c,
            &relay.url(),
            token_for("c", &["list:3"], &[], Duration::from_secs(3600)),
        );
        wait_synced(&hc);
        let n = c.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0].clone();
        let truth = w
            .query("SELECT count(*) FROM todo WHERE list = 'list:3'", &[])
            .unwrap()
            .rows[0][0]
            .clone();
        assert_eq!(n, truth);
        assert!(matches!(n, Value::Integer(k) if k > 300));
    }

    /// The database-level status (`Replica::observe_status`): observed once, before any
    /// session, it reports the file at rest, a first sync's download as a fraction that only
    /// grows through the snapshot's pages, the session's end, and a later session too —
    /// with `has_synced` and `last_synced_at` kept across them.
    #[test]
    fn the_database_status_follows_every_session_with_progress() {
        use ferry_core::{ConnState, SyncStatus};
        use std::sync::{Arc, Mutex};
        let d = tempfile::tempdir().unwrap();
        let (relay, w, _) = loaded(d.path(), 10_000);
        let b = reader(d.path(), "b.db");
        let seen: Arc<Mutex<Vec<SyncStatus>>> = Arc::default();
        let log = Arc::clone(&seen);
        let _sub = b
            .observe_status(Arc::new(move |s: &SyncStatus| {
                log.lock().unwrap().push(s.clone())
            }))
            .unwrap();
        let first = seen.lock().unwrap()[0].clone();
        assert_eq!(first.state, ConnState::Stopped);
        assert!(
            !first.has_synced && first.download_fraction().is_none(),
            "{first:?}"
        );

        let hb = connect(&b, &relay.url(), admin_token("b"));
        wait_synced(&hb);
        drop(hb);
        eventually(
            "the session's end reported",
            Duration::from_secs(10),
            || b.sync_status().unwrap().state == ConnState::Stopped,
        );
        let statuses = seen.lock().unwrap().clone();
        let fractions: Vec<f64> = statuses
            .iter()
            .filter_map(|s| s.download_fraction())
            .collect();
        assert!(
            fractions.windows(2).all(|p| p[0] <= p[1]),
            "the download fraction only grows: {fractions:?}"
        );
        assert!(
            fractions.iter().any(|f| *f > 0.0 && *f < 1.0),
            "a fraction between the snapshot's pages: {fractions:?}"
        );
        assert_eq!(fractions.last(), Some(&1.0), "{fractions:?}");
        let rest = b.sync_status().unwrap();
        assert!(rest.has_synced && rest.last_synced_at.is_some(), "{rest:?}");
        assert!(
            rest.upload_error.is_none() && rest.download_error.is_none(),
            "{rest:?}"
        );

        // A second session reaches the same observer; its upload is reported too.
        let n = seen.lock().unwrap().len();
        b.write(|tx| {
            tx.execute(
                "INSERT INTO todo(id, list, title, votes) VALUES ('new', 'list:0', 'n', 1)",
                &[],
            )
            .map(|_| ())
        })
        .unwrap();
        let hb = connect(&b, &relay.url(), admin_token("b"));
        wait_synced(&hb);
        let later = seen.lock().unwrap()[n..].to_vec();
        assert!(
            later.iter().any(|s| s.state == ConnState::Online),
            "{later:?}"
        );
        assert!(
            later.iter().any(|s| s.upload_fraction() == Some(1.0)),
            "the upload reported as done: {later:?}"
        );
        assert!(later.iter().all(|s| s.has_synced), "has_synced is kept");
        drop(hb);
        drop(w);
    }

    fn hello(replica: ReplicaId, token: &str, resume: Option<Vec<u8>>) -> ClientMsg {
        ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            replica_id: replica,
            token: token.to_owned(),
            cursor: 0,
            schema_version: 1,
            snapshots: true,
            resume,
            subscriptions: None,
            held: None,
        }
    }

    /// A device that applied the first page of its snapshot (of every list, with an admin
    /// token), then lost the connection.
    struct Cut {
        device: std::sync::Arc<ferry_core::Replica>,
        me: ReplicaId,
        token: String,
        rt: tokio::runtime::Runtime,
        page: Vec<ferry_core::snapshot::SnapshotRow>,
        resume: Vec<u8>,
    }

    fn cut_after_first_page(relay: &RelayProc, dir: &std::path::Path) -> Cut {
        let device = reader(dir, "device.db");
        let me = device.replica_id().unwrap();
        let token = admin_token("device");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (page, resume) = first_page(&rt, &relay.url(), me, &token, 10_000);
        device
            .apply_snapshot(page.clone(), &resume, false, None)
            .unwrap();
        Cut {
            device,
            me,
            token,
            rt,
            page,
            resume,
        }
    }

    /// A walk cut after its first page, whose device then changes its subscriptions, starts
    /// over for the new scopes; rows the first walk brought are replaced, not merged (their
    /// histories fold counter additions that the device partly holds), and rows of scopes
    /// no longer subscribed are evicted.
    #[test]
    fn a_walk_started_over_for_other_scopes_replaces_the_rows_it_brought() {
        let d = tempfile::tempdir().unwrap();
        let (relay, w, _head) = loaded(d.path(), 10_000);
        let Cut { device, token, .. } = cut_after_first_page(&relay, d.path());
        // The writer adds to counters of rows of that page; the histories fold them.
        let hw = connect(&w, &relay.url(), admin_token("writer"));
        w.execute(
            "UPDATE todo SET votes = votes + 5 WHERE id < 'r000400'",
            &[],
        )
        .unwrap();
        wait_synced(&hw);
        folded(&relay, w.cursor().unwrap());
        device
            .set_subscriptions(Some(vec!["list:0".into(), "list:1".into()]))
            .unwrap();
        let h = connect(&device, &relay.url(), token);
        wait_synced(&h);
        ferry_testkit::eventually("other lists evicted", Duration::from_secs(30), || {
            device
                .query(
                    "SELECT count(*) FROM todo WHERE list NOT IN ('list:0', 'list:1')",
                    &[],
                )
                .unwrap()
                .rows[0][0]
                == Value::Integer(0)
        });
        let q = "SELECT id, list, title, votes FROM todo WHERE list IN ('list:0', 'list:1') ORDER BY id";
        assert_eq!(
            device.query(q, &[]).unwrap().rows,
            w.query(q, &[]).unwrap().rows
        );
        assert!(
            h.verify_blocking(&device, Duration::from_secs(30))
                .unwrap()
                .matches()
        );
    }

    /// A snapshot cut after its first page resumes after that page on the next connection:
    /// the rest comes once, the device ends in the writer's state, and a forged or foreign
    /// token is refused with a typed error before anything is sent.
    #[test]
    fn a_cut_snapshot_resumes_after_the_last_page_applied() {
        let d = tempfile::tempdir().unwrap();
        let (relay, w, _head) = loaded(d.path(), 10_000);
        let Cut {
            device,
            me,
            token,
            rt,
            page,
            resume,
        } = cut_after_first_page(&relay, d.path());
        assert_eq!(device.snapshot_resume().unwrap(), Some(resume.clone()));
        assert_eq!(device.cursor().unwrap(), 0);
        rt.block_on(async {
            // A token with a bit flipped, and another replica's, are refused.
            let mut forged = resume.clone();
            let mid = forged.len() / 2;
            forged[mid] ^= 0x40;
            for (who, tok, t) in [
                (me, token.clone(), forged),
                (ReplicaId([9; 16]), token.clone(), resume.clone()),
            ] {
                let mut ws = raw::connect(&relay.url()).await;
                raw::send(&mut ws, &hello(who, &tok, Some(t))).await;
                match raw::recv(&mut ws).await {
                    Some(ServerMsg::Error { code, message }) => {
                        assert_eq!(code, ErrorCode::BadFrame, "{message}");
                        assert!(message.contains("resume token"), "{message}");
                    }
                    other => panic!("expected a refusal, got {other:?}"),
                }
            }
            // A genuine token for other read grants is stale: the walk of the scopes this
            // token reads starts over (from its first row, with its own total).
            let other = token_for("device", &["list:1"], &[], Duration::from_secs(60));
            let mut ws = raw::connect(&relay.url()).await;
            raw::send(&mut ws, &hello(me, &other, Some(resume.clone()))).await;
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Welcome { snapshot, .. }) => assert!(snapshot),
                other => panic!("expected a welcome, got {other:?}"),
            }
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Snapshot { total_rows, .. }) => {
                    assert!(total_rows < 10_000, "a walk of list:1 only: {total_rows}")
                }
                other => panic!("expected a snapshot page, got {other:?}"),
            }
        });
        let sent_before = relay.metric("ferry_snapshot_rows_total");
        let h = connect(&device, &relay.url(), token);
        wait_synced(&h);
        let sent = relay.metric("ferry_snapshot_rows_total") - sent_before;
        assert_eq!(
            sent as usize,
            10_000 - page.len(),
            "the rest of the snapshot came once, after the first page"
        );
        // What the resumed walk announced is the rest, not the whole.
        let st = h.status().snapshot;
        assert_eq!(st.rows as usize, 10_000 - page.len(), "{st:?}");
        assert_eq!(st.total_rows, st.rows, "{st:?}");
        assert_eq!(device.snapshot_resume().unwrap(), None);
        assert_eq!(device.dump().unwrap(), w.dump().unwrap());
        assert_eq!(device.checksum().unwrap(), w.checksum().unwrap());
    }

    /// Three relays over one PostgreSQL database: a snapshot begun on one node, whose node is
    /// then SIGKILLed, resumes on another (the resume token is sealed with the store's key,
    /// the pages are read from the shared row histories), and the device ends in the
    /// writer's state.
    #[test]
    fn a_snapshot_resumes_on_another_postgres_node_after_a_sigkill() {
        let d = tempfile::tempdir().unwrap();
        let mut cluster = Cluster::postgres(d.path(), 3);
        let (w, head) = load(d.path(), &cluster.url(0), 6_000);
        folded(&cluster.nodes[1], head);
        let device = reader(d.path(), "device.db");
        let me = device.replica_id().unwrap();
        let token = admin_token("device");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (page, resume) = first_page(&rt, &cluster.url(1), me, &token, 6_000);
        device
            .apply_snapshot(page.clone(), &resume, false, None)
            .unwrap();
        cluster.nodes[1].kill();
        let h = connect(&device, &cluster.url(2), token);
        wait_synced(&h);
        let sent = cluster.nodes[2].metric("ferry_snapshot_rows_total");
        assert_eq!(
            sent as usize,
            6_000 - page.len(),
            "node 2 sent the rest of the walk begun on node 1"
        );
        assert!(h.status().snapshot.total_rows > 0);
        assert_eq!(device.snapshot_resume().unwrap(), None);
        assert_eq!(device.dump().unwrap(), w.dump().unwrap());
        assert_eq!(device.checksum().unwrap(), w.checksum().unwrap());
    }
}
