//! What the apps do: transactions in every table mode (with markers for the atomicity
//! check), lease requests, and decisions about quarantined change sets.

use super::*;

impl Sim {
    /// A random local transaction of several operations.
    pub(crate) fn write(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.seq += 1;
        let marker = format!("{i}/{}", node.seq);
        let list = if self.rng.random_bool(0.5) {
            "list:shared".to_owned()
        } else {
            list_of(i)
        };
        let kinds: Vec<u8> = (0..self.rng.random_range(1..=3))
            .map(|_| self.rng.random_range(0..8u8))
            .collect();
        let key = self.rng.random_range(0..3u8);
        let delta = self.rng.random_range(-3..=5i64);
        let word = format!("w{}", self.rng.random_range(0..1000));
        let fenced = kinds.contains(&7) && self.nodes[i].lease.is_some();
        let primary = self.nodes[i].primary;
        let v2 = self.nodes[i].schema_version >= 2;
        let seed = self.seed;
        let res = self.with_replica(i, "write", |r, node| {
            // Documented: while a checked change set is pending, later ones are checked too.
            let mut behind_checked = false;
            for c in node.committed.iter().rev().filter(|c| c.checked) {
                if r.verdict(&c.id)? == Verdict::Pending {
                    behind_checked = true;
                    break;
                }
            }
            let mut tx = r.begin()?;
            if fenced {
                tx.guard(Fence {
                    lease: LEASE.into(),
                    token: node.lease.unwrap_or(0),
                })?;
            }
            let mut votes = Vec::new();
            let mut cas = None;
            for k in &kinds {
                match k {
                    0 | 1 => {
                        let id = format!("{list}/k{key}");
                        if tx.execute(
                            "UPDATE todo SET title = ? WHERE id = ?",
                            &[Value::Text(word.clone()), Value::Text(id.clone())],
                        )? == 0
                        {
                            tx.execute(
                                "INSERT INTO todo (id, list, title, votes) VALUES (?, ?, ?, 0)",
                                &[
                                    Value::Text(id),
                                    Value::Text(list.clone()),
                                    Value::Text(word.clone()),
                                ],
                            )?;
                        }
                    }
                    2 => {
                        let id = format!("{list}/k{key}");
                        if tx.execute(
                            "UPDATE todo SET votes = votes + ? WHERE id = ?",
                            &[Value::Integer(delta), Value::Text(id.clone())],
                        )? == 1
                        {
                            votes.push((id, delta));
                        }
                    }
                    3 => {
                        let id = format!("n{key}");
                        let prio = if v2 { ", prio = 7" } else { "" };
                        if tx.execute(
                            &format!("UPDATE note SET body = ?, n = n + 1{prio} WHERE id = ?"),
                            &[Value::Text(word.clone()), Value::Text(id.clone())],
                        )? == 0
                        {
                            tx.execute(
                                "INSERT INTO note (id, body, n) VALUES (?, ?, 1)",
                                &[Value::Text(id), Value::Text(word.clone())],
                            )?;
                        }
                    }
                    4 => {
                        tx.execute(
                            "DELETE FROM note WHERE id = ?",
                            &[Value::Text(format!("n{key}"))],
                        )?;
                    }
                    5 if primary => {
                        tx.execute(
                            "INSERT OR REPLACE INTO price (id, cents) VALUES (?, ?)",
                            &[Value::Text(format!("p{key}")), Value::Integer(delta + 100)],
                        )?;
                    }
                    6 if cas.is_none() => {
                        let id = format!("a{}", key % 2);
                        let b = tx.query(
                            "SELECT balance FROM acct WHERE id = ?",
                            &[Value::Text(id.clone())],
                        )?;
                        match b.rows.first().map(|r| r[0].clone()) {
                            Some(Value::Integer(b)) => {
                                tx.execute(
                                    "UPDATE acct SET balance = ?, holder = ? WHERE id = ?",
                                    &[
                                        Value::Integer(b + 1),
                                        Value::Text(format!("n{i}")),
                                        Value::Text(id.clone()),
                                    ],
                                )?;
                            }
                            other => {
                                assert!(other.is_none(), "seed {seed}: balance {other:?}");
                                tx.execute(
                                    "INSERT INTO acct (id, balance, holder) VALUES (?, 1, ?)",
                                    &[Value::Text(id.clone()), Value::Text(format!("n{i}"))],
                                )?;
                            }
                        }
                        cas = Some(id);
                    }
                    _ => {
                        tx.execute(
                            "INSERT OR REPLACE INTO note (id, body, n) VALUES ('fenced', ?, 0)",
                            &[Value::Text(format!("n{i}"))],
                        )?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO tag (id, name) VALUES (?, ?), (?, ?)",
                &[
                    Value::Text(format!("a/{marker}")),
                    Value::Text(word.clone()),
                    Value::Text(format!("b/{marker}")),
                    Value::Text(word.clone()),
                ],
            )?;
            let id = tx.commit_change()?.expect("synced rows were written");
            node.committed.push(Committed {
                id,
                votes,
                checked: cas.is_some() || fenced || behind_checked,
                cas,
                marker: marker.clone(),
                retry_of: None,
            });
            Ok(())
        });
        if res.is_some() {
            let checked = self.nodes[i].committed.last().is_some_and(|c| c.checked);
            let _ = writeln!(
                self.trace,
                "{:>5} write node {i} {marker} {kinds:?}{}",
                self.step,
                if checked { " checked" } else { "" }
            );
        }
    }

    /// `n` small transactions on node `i` before it first connects (a title and a counter in
    /// its own list each): a backlog to push through bounded links. They carry no atomicity
    /// markers (one row each, and the check reads every marker after every step); the
    /// oracle still requires each in the log exactly once and counts their counters.
    pub(crate) fn backlog(&mut self, i: usize, n: usize) {
        let list = list_of(i);
        let res = self.with_replica(i, "backlog", |r, node| {
            for t in 0..n {
                let id = format!("{list}/b{}", t % 500);
                let mut tx = r.begin()?;
                let mut votes = Vec::new();
                if tx.execute(
                    "UPDATE todo SET title = ?, votes = votes + 1 WHERE id = ?",
                    &[Value::Text(format!("t{t}")), Value::Text(id.clone())],
                )? == 1
                {
                    votes.push((id, 1));
                } else {
                    tx.execute(
                        "INSERT INTO todo (id, list, title, votes) VALUES (?, ?, ?, 0)",
                        &[
                            Value::Text(id),
                            Value::Text(list.clone()),
                            Value::Text(format!("t{t}")),
                        ],
                    )?;
                }
                let id = tx.commit_change()?.expect("synced rows were written");
                node.committed.push(Committed {
                    id,
                    votes,
                    checked: false,
                    cas: None,
                    marker: format!("{BACKLOG_MARKER}{i}/{t}"),
                    retry_of: None,
                });
            }
            Ok(())
        });
        if res.is_some() {
            self.note("backlog", format!("node {i}: {n} change sets"));
        }
    }

    pub(crate) fn lease(&mut self, i: usize) {
        let Some(l) = self.nodes[i].link else { return };
        if self.nodes[i].lease_pending || self.links[l].ep.is_none() && self.links[l].up.is_empty()
        {
            return;
        }
        let request = match self.nodes[i].lease {
            Some(token) => LeaseRequest::Release {
                name: LEASE.into(),
                token,
            },
            None => LeaseRequest::Acquire {
                name: LEASE.into(),
                ttl_ms: 600_000,
            },
        };
        self.nodes[i].lease_pending = true;
        self.links[l].up.push_back(ClientMsg::Lease {
            nonce: self.step,
            request,
        });
        self.note("lease request", format!("node {i}"));
    }

    /// The app decides about each change set quarantined on node `i`: a discardable one is
    /// discarded or retried, at random; one that kept no before-images is retried (the only
    /// way on). A retry is a new change set, held to every invariant like any other. True
    /// when something was decided.
    pub(crate) fn decide_quarantined(&mut self, i: usize) -> bool {
        let discards: Vec<bool> = (0..64).map(|_| self.rng.random_bool(0.5)).collect();
        let path = self.nodes[i].path.clone();
        let decided = self.with_replica(i, "quarantine decision", |r, node| {
            let mut decided = Vec::new();
            let quarantined = r.quarantined()?;
            if quarantined.is_empty() {
                return Ok(decided);
            }
            let file = rusqlite::Connection::open(&path).map_err(ferry_core::Error::from)?;
            let change_id = |sql: &str, key: i64| -> ferry_core::Result<ChangeId> {
                let id: Vec<u8> = file
                    .query_row(sql, [key], |row| row.get(0))
                    .map_err(ferry_core::Error::from)?;
                Ok(ChangeId(id.try_into().expect("a change id is 16 bytes")))
            };
            for (k, q) in quarantined.into_iter().enumerate() {
                let old = change_id(
                    "SELECT l.id FROM ferry_quarantine q JOIN ferry_log l \
                     ON l.origin = q.origin AND l.origin_seq = q.origin_seq WHERE q.id = ?1",
                    q.id,
                )?;
                let Some(c) = node.committed.iter().find(|c| c.id == old).cloned() else {
                    panic!(
                        "node {} quarantined a change set it never committed",
                        path.display()
                    );
                };
                if q.discardable && discards[k % discards.len()] {
                    r.discard_quarantined(q.id)?;
                    decided.push(format!("discarded {}", c.marker));
                    continue;
                }
                let retried = match r.retry_quarantined(q.id) {
                    // It kept no before-images and checked writes are pending: later.
                    Err(ferry_core::Error::RetryWaits { .. }) => continue,
                    other => other?,
                };
                if let Some(origin_seq) = retried {
                    let id = change_id(
                        "SELECT id FROM ferry_log WHERE origin_seq = ?1 ORDER BY seq DESC LIMIT 1",
                        origin_seq as i64,
                    )?;
                    decided.push(format!("retried {} as #{origin_seq}", c.marker));
                    node.committed.push(Committed {
                        id,
                        retry_of: Some(old),
                        ..c
                    });
                } else {
                    decided.push(format!("retried {}: nothing left", c.marker));
                }
            }
            Ok(decided)
        });
        let Some(decided) = decided else {
            return false;
        };
        for d in &decided {
            self.note("quarantine decision", format!("node {i} {d}"));
        }
        self.check_atomic(i);
        !decided.is_empty()
    }
}
