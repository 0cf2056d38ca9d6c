//! The invariants: atomicity after every step; after a run, convergence against a fresh
//! full-rights replica, no lost writes, exact counters, compare-and-set balances, fencing.

use super::*;

impl Sim {
    pub(crate) fn check_atomic(&mut self, i: usize) {
        let Some(r) = self.nodes[i].replica.as_ref() else {
            return;
        };
        let rows = match r.query(
            "SELECT (SELECT count(*) FROM tag WHERE id LIKE 'a/%'), (SELECT count(*) FROM tag WHERE id LIKE 'b/%'), \
             (SELECT count(*) FROM tag a WHERE a.id LIKE 'a/%' AND NOT EXISTS (SELECT 1 FROM tag b WHERE b.id = 'b/' || substr(a.id, 3)))",
            &[],
        ) {
            Ok(r) => r,
            Err(e) if is_crash(&e) => {
                self.crash_node(i, "query");
                return;
            }
            Err(e) => panic!("seed {}: {e}", self.seed),
        };
        let row = &rows.rows[0];
        assert!(
            row[0] == row[1] && row[2] == Value::Integer(0),
            "seed {}: node {i} shows part of a transaction: {row:?}\n{}",
            self.seed,
            self.trace
        );
    }

    pub(crate) fn rows(
        r: &Replica,
        table: &str,
        v2: bool,
        filter: &dyn Fn(&[Value]) -> bool,
    ) -> Vec<Vec<Value>> {
        let q = r
            .query(
                &format!("SELECT {} FROM {table} ORDER BY id", columns(table, v2)),
                &[],
            )
            .unwrap();
        q.rows.into_iter().filter(|row| filter(row)).collect()
    }

    /// Every invariant, once settled.
    pub(crate) fn check(&mut self) {
        let seed = self.seed;
        // The reference: a fresh replica that may read everything.
        let refdir = self.dir.join("reference.db");
        let reference = Replica::open_with(
            &refdir,
            &schema(2),
            OpenOptions {
                new_replica_id: Some(ReplicaId([0xEE; 16])),
                ..Default::default()
            },
        )
        .unwrap();
        let shared = Arc::clone(self.shared.as_ref().unwrap());
        let mut client = SyncClient::new();
        let tok = token("reference", &["*".into()], &["*".into()], false, false);
        let mut outbox = VecDeque::from([client.start(&reference, &tok).unwrap()]);
        let mut ep: Option<Endpoint> = None;
        while let Some(msg) = outbox.pop_front() {
            let replies = self.rt.block_on(async {
                match ep.as_mut() {
                    None => {
                        let (e, w) = Endpoint::open(&shared, msg).await.unwrap();
                        ep = Some(e);
                        vec![w]
                    }
                    Some(e) => {
                        let mut out = e.handle(msg).await.unwrap();
                        e.changes(true, 1000, &mut out).await.unwrap();
                        out
                    }
                }
            });
            for reply in replies {
                outbox.extend(client.handle(&reference, reply).unwrap().send);
            }
            if outbox.is_empty() && !client.is_synced(&reference).unwrap() {
                outbox.push_back(ClientMsg::Ping { nonce: 1 });
            }
        }
        let head = self.rt.block_on(shared.store.head()).unwrap();
        assert_eq!(reference.cursor().unwrap(), head);

        // The relay's log: every committed change set exactly once, or refused.
        let log = self
            .rt
            .block_on(shared.store.read(0, usize::MAX, usize::MAX))
            .unwrap();
        assert_eq!(log.len() as u64, head, "seed {seed}: gap in the log");
        let mut in_log: BTreeMap<[u8; 16], u64> = BTreeMap::new();
        let mut last_fence = 0;
        for s in &log {
            *in_log.entry(s.change_set.id).or_default() += 1;
            if let Some(f) = &s.change_set.fence {
                assert!(
                    f.token >= last_fence,
                    "seed {seed}: fenced write with token {} sequenced after token {last_fence}",
                    f.token
                );
                last_fence = f.token;
            }
        }
        let mut votes: BTreeMap<String, i64> = BTreeMap::new();
        let mut balance: BTreeMap<String, i64> = BTreeMap::new();
        let mut markers = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let r = node.replica.as_ref().unwrap();
            for c in &node.committed {
                if let Some(old) = &c.retry_of {
                    assert!(
                        matches!(r.verdict(old).unwrap(), Verdict::Rejected { reason, .. } if reason.starts_with("quarantined")),
                        "seed {seed}: node {i} retried {} from quarantine, yet the original stands\n{}",
                        c.marker,
                        self.trace
                    );
                }
                match r.verdict(&c.id).unwrap() {
                    Verdict::Accepted(_) => {
                        assert_eq!(
                            in_log.get(&c.id.0),
                            Some(&1),
                            "seed {seed}: node {i} write {} acknowledged but not in the log once\n{}",
                            c.marker,
                            self.trace
                        );
                        for (k, d) in &c.votes {
                            *votes.entry(k.clone()).or_default() += d;
                        }
                        if let Some(a) = &c.cas {
                            *balance.entry(a.clone()).or_default() += 1;
                        }
                        if !c.marker.starts_with(BACKLOG_MARKER) {
                            markers.insert(c.marker.clone());
                        }
                    }
                    Verdict::Rejected { code, reason: why } => {
                        assert!(
                            c.checked
                                || why.starts_with("quarantined")
                                || code == ferry_core::protocol::ErrorCode::Fenced
                                || why.contains("fence")
                                || why.contains("lease")
                                || why.contains("written on top of"),
                            "seed {seed}: node {i} write {} refused: {why}\n{}",
                            c.marker,
                            self.trace
                        );
                        // Withdrawn: at most an empty placeholder keeps its origin_seq.
                        assert!(
                            log.iter()
                                .all(|s| s.change_set.id != c.id.0 || s.change_set.rows.is_empty()),
                            "seed {seed}: node {i} write {} refused ({why}) yet in the log: {:?}\n{}",
                            c.marker,
                            log.iter().find(|s| s.change_set.id == c.id.0),
                            self.trace
                        );
                    }
                    Verdict::Pending => panic!(
                        "seed {seed}: node {i} write {} still pending after settling\n{}",
                        c.marker, self.trace
                    ),
                }
            }
        }
        // Counters and balances from what was accepted.
        for row in Self::rows(&reference, "todo", false, &|_| true) {
            let Value::Text(id) = &row[0] else { panic!() };
            let expect = votes.get(id).copied().unwrap_or(0);
            assert_eq!(
                row[3],
                Value::Integer(expect),
                "seed {seed}: votes of {id}\n{}",
                self.trace
            );
        }
        for row in Self::rows(&reference, "acct", false, &|_| true) {
            let Value::Text(id) = &row[0] else { panic!() };
            let expect = balance.get(id).copied().unwrap_or(0);
            assert_eq!(
                row[1],
                Value::Integer(expect),
                "seed {seed}: balance of {id} (compare-and-set); history:\n{}\n{}",
                history(&log, "acct"),
                self.trace
            );
        }
        let tags: BTreeSet<String> = Self::rows(&reference, "tag", false, &|_| true)
            .into_iter()
            .filter_map(|r| match &r[0] {
                Value::Text(t) if t.starts_with("a/") => Some(t[2..].to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            tags, markers,
            "seed {seed}: accepted transactions vs markers"
        );
        // Convergence and isolation.
        for (i, node) in self.nodes.iter().enumerate() {
            let r = node.replica.as_ref().unwrap();
            let lists = ["list:shared".to_owned(), list_of(i)];
            let v2 = node.schema_version >= 2;
            for t in TABLES {
                let visible = |row: &[Value]| {
                    t != "todo" || matches!(&row[1], Value::Text(l) if lists.contains(l))
                };
                let mine = Self::rows(r, t, v2, &|_| true);
                let want = Self::rows(&reference, t, v2, &visible);
                assert_eq!(
                    mine,
                    want,
                    "seed {seed}: node {i} table {t} differs; its history:\n{}\nits conflict log: {:#?}\n{}",
                    history(&log, t),
                    meta_dump(&node.path, t),
                    self.trace
                );
            }
        }
    }
}

/// A replica file's merge metadata of `table`, for failure messages.
pub(crate) fn meta_dump(path: &Path, table: &str) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT r.pk, r.cl, r.meta FROM ferry_rows r JOIN ferry_tables t ON t.id = r.tbl WHERE t.name = ?1")
        .unwrap();
    let rows: Vec<(Value, i64, Vec<u8>)> = st
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut out = String::new();
    for (pk, cl, meta) in rows {
        let m = ferry_core::inspect::row_metadata(cl as u64, &meta).unwrap();
        let _ = writeln!(out, "  {pk:?}: {m}");
    }
    out
}

/// Every change to `table` in the relay's log, for failure messages.
pub(crate) fn history(log: &[Arc<ferry_relay::store::StoredSet>], table: &str) -> String {
    let mut h = String::new();
    for s in log {
        for rc in s.change_set.rows.iter().filter(|rc| rc.table == table) {
            let _ = writeln!(
                h,
                "  @{} {} #{} {:?} base {} {:?} cl {} {:?}",
                s.server_seq,
                s.change_set.origin,
                s.change_set.origin_seq,
                s.change_set.hlc,
                s.change_set.base,
                rc.pk,
                rc.cl,
                rc.op
            );
        }
    }
    h
}
