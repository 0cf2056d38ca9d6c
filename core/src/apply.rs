//! Apply: merging one remote change set into the replica, all-or-nothing.
//!
//! Remote change sets arrive in `server_seq` order and the replica's own pending changes
//! always sit after them in that order. The rules below are therefore written as "fold the
//! incoming change onto the current state", and each is commutative with the replica's
//! pending changes, which is what makes every replica converge:
//!
//! * a row's causal length (`cl`) only grows: a change for an older incarnation is stale;
//! * a cell takes the value with the larger `(hlc, origin)` (HLCs advance on receive, so a
//!   write made after seeing another always wins); counters add;
//! * delete vs a concurrent update follows the table's delete rule, using the two-entry
//!   version vector to decide concurrency (see `vv`).

use crate::catalog::{Catalog, TableInfo};
use crate::changeset::{Cell, RowChange, RowOp, Sequenced};
use crate::conflict::{self, Conflict, ConflictKind, Side, Winner};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::rows::{self, Origins, Stored};
use crate::schema::Policy;
use crate::value::Value;
use crate::vv::{Version, happened_before};
use rusqlite::{Connection, OptionalExtension};
use std::collections::BTreeSet;

/// A custom-policy conflict to hand to the app's resolver after the apply commits.
#[derive(Debug, Clone)]
pub struct Followup {
    /// Table.
    pub table: String,
    /// Row key.
    pub pk: Value,
    /// Column.
    pub column: String,
    /// This device's pending value.
    pub local: Value,
    /// The incoming value.
    pub remote: Value,
    /// The logged conflict's id.
    pub conflict_id: i64,
}

/// Everything the apply of one batch produced besides table writes.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Tables touched.
    pub tables: BTreeSet<String>,
    /// Conflicts logged.
    pub conflicts: Vec<Conflict>,
    /// Custom-policy conflicts on this device's pending writes.
    pub followups: Vec<Followup>,
}

/// Merge context for one transaction.
pub struct Ctx<'a> {
    /// The connection (inside a transaction).
    pub conn: &'a Connection,
    /// Synced tables.
    pub cat: &'a Catalog,
    /// Interned origins.
    pub origins: &'a mut Origins,
    /// What happened.
    pub out: &'a mut Outcome,
    /// This replica, when guarded change sets are pending: remote changes that doom one are
    /// preceded by its withdrawal (see `rollback`).
    pub strict: Option<&'a crate::rollback::Me>,
}

impl Ctx<'_> {
    /// The server_seq of a version, looking up this replica's own acknowledged changes
    /// (following a change re-issued under a new replica id to its new identity).
    fn seq_of(&self, v: &Version) -> Option<u64> {
        if v.server_seq != 0 {
            return Some(v.server_seq);
        }
        own_server_seq(self.conn, v.origin, v.origin_seq)
    }

    fn hb(&self, a: &Version, b: &Version) -> bool {
        happened_before(a, b, |v| self.seq_of(v))
    }

    /// True when `v` is this replica's own write that the stream has not reached at relay
    /// position `at`: not acknowledged yet, or acknowledged at a later position (the ack
    /// overtook the changes ordered before it). Of two concurrent writes exactly one side
    /// sees this, whatever the timing of acks, so exactly one device runs the resolver.
    fn is_pending_local(&self, v: &Version, at: u64) -> bool {
        is_own(self.conn, v.origin, v.origin_seq) && self.seq_of(v).is_none_or(|s| s > at)
    }

    fn wins(&self, a: &Version, b: &Version) -> bool {
        (a.hlc, self.origins.get(a.origin)) > (b.hlc, self.origins.get(b.origin))
    }

    fn side(&self, value: Value, v: &Version) -> Side {
        Side {
            value,
            hlc: v.hlc,
            origin: self.origins.get(v.origin),
        }
    }

    /// Applies one sequenced remote change set (the caller holds the transaction).
    pub fn apply(&mut self, s: &Sequenced) -> Result<()> {
        let cs = &s.change_set;
        let origin = self.origins.intern(self.conn, cs.origin)?;
        let v = Version {
            hlc: cs.hlc,
            origin,
            origin_seq: cs.origin_seq,
            server_seq: s.server_seq,
            base: cs.base,
        };
        // Validate everything before touching anything.
        for rc in &cs.rows {
            validate(self.cat.table(&rc.table)?, rc)?;
        }
        if let Some(me) = self.strict {
            for rc in &cs.rows {
                let t = self.cat.table(&rc.table)?;
                for doomed in crate::rollback::doomed(self.conn, t, rc)? {
                    let policy = if t.mode() == crate::schema::TableMode::ServerChecked {
                        "server_checked"
                    } else {
                        "guarded"
                    };
                    let reason = format!(
                        "row {} of `{}` was changed first by replica {} (relay position {})",
                        rc.pk.describe(),
                        rc.table,
                        cs.origin,
                        s.server_seq
                    );
                    let w = crate::rollback::withdraw(
                        self.conn, self.cat, me, doomed, policy, &reason,
                    )?;
                    self.out.tables.extend(w.tables);
                    self.out.conflicts.extend(w.conflicts);
                }
            }
        }
        let mut last_table: Option<&str> = None;
        for rc in &cs.rows {
            let t = self.cat.table(&rc.table)?;
            self.apply_row(t, rc, &v)?;
            if last_table != Some(rc.table.as_str()) && !self.out.tables.contains(&rc.table) {
                self.out.tables.insert(rc.table.clone());
            }
            last_table = Some(rc.table.as_str());
        }
        Ok(())
    }

    /// Forgets a row that left this replica's read scopes: its values and its merge
    /// metadata go, so that if it comes back its history is replayed from scratch. Not a
    /// user delete: nothing is logged or pushed.
    pub fn evict(&mut self, table: &str, pk: &Value) -> Result<()> {
        let t = self.cat.table(table)?;
        rows::delete_row(self.conn, t, pk)?;
        rows::forget(self.conn, t, pk)?;
        self.out.tables.insert(table.to_owned());
        Ok(())
    }

    fn apply_row(&mut self, t: &TableInfo, rc: &RowChange, v: &Version) -> Result<()> {
        let stored = rows::load(self.conn, t, &rc.pk)?;
        let cl_local = stored.as_ref().map_or(0, |s| s.meta.cl);
        match &rc.op {
            RowOp::Delete => {
                if rc.cl <= cl_local {
                    return Ok(()); // stale, or the same delete seen twice
                }
                let alive = cl_local % 2 == 1;
                let mut s = stored.unwrap_or_default();
                if alive && rc.cl == cl_local + 1 {
                    // Writes to this incarnation the delete did not see are concurrent with it.
                    let concurrent: Option<Version> = s
                        .meta
                        .writes
                        .iter()
                        .copied()
                        .filter(|w| !self.hb(w, v))
                        .max_by_key(|w| w.hlc);
                    if let Some(w) = concurrent {
                        let update_wins = t.update_wins();
                        self.log_row_conflict(t, &rc.pk, &w, v, !update_wins)?;
                        if update_wins {
                            // The delete is void: the row stays in this incarnation.
                            return Ok(());
                        }
                    }
                }
                if alive && t.update_wins() {
                    let vals = crate::capture::read_row(self.conn, t, &rc.pk)?;
                    s.tomb = vals.map(|vals| {
                        vals.into_iter()
                            .enumerate()
                            .filter(|(i, _)| *i != t.pk)
                            .map(|(i, v)| (i as u32, v))
                            .collect()
                    });
                    s.meta.freeze_cells(t.cols.len());
                } else {
                    s.meta.cells.clear();
                    s.meta.writes.clear();
                    s.tomb = None;
                }
                s.meta.cl = rc.cl;
                s.meta.row = Some(*v);
                if alive {
                    rows::delete_row(self.conn, t, &rc.pk)?;
                }
                rows::store(self.conn, t, &rc.pk, &s)
            }
            RowOp::Upsert(cells) => {
                if rc.cl < cl_local {
                    let Some(mut s) = stored else { return Ok(()) };
                    let deleted = cl_local % 2 == 0;
                    if deleted && rc.cl + 1 == cl_local {
                        // An update of the incarnation that a delete (concurrent with it) removed.
                        let d = s.meta.row.unwrap_or(*v);
                        let update_wins = t.update_wins();
                        self.log_row_conflict(t, &rc.pk, &d, v, update_wins)?;
                        if update_wins {
                            let tomb = s.tomb.take().unwrap_or_default();
                            let restore: Vec<(usize, Value)> =
                                tomb.into_iter().map(|(c, val)| (c as usize, val)).collect();
                            rows::insert_row(self.conn, t, &rc.pk, &restore)?;
                            // The delete is void: back to the incarnation it removed. Cells
                            // were pinned when it was deleted.
                            s.meta.cl = rc.cl;
                            s.meta.row = None;
                            self.merge_cells(t, &rc.pk, &mut s, cells, v)?;
                            rows::store(self.conn, t, &rc.pk, &s)?;
                        }
                    }
                    return Ok(());
                }
                if rc.cl == cl_local {
                    let Some(mut s) = stored else { return Ok(()) };
                    self.merge_cells(t, &rc.pk, &mut s, cells, v)?;
                    return rows::store(self.conn, t, &rc.pk, &s);
                }
                // A newer incarnation: the row is (re)created with exactly these cells.
                let mut vals = Vec::with_capacity(cells.len());
                for c in cells {
                    let i = t.col(c.column())?;
                    vals.push(match c {
                        Cell::Set(_, val) => (i, val.clone()),
                        Cell::Add(_, d) => (i, Value::Integer(*d)),
                    });
                }
                rows::insert_row(self.conn, t, &rc.pk, &vals)?;
                let mut s = Stored::default();
                s.meta.reincarnate(rc.cl, *v);
                // A creator on an older app schema did not write the columns added since:
                // they stay unwritten rather than taking the creation's version.
                s.meta
                    .mark_unwritten(t.cols.len(), t.pk, |i| vals.iter().any(|(c, _)| *c == i));
                rows::store(self.conn, t, &rc.pk, &s)
            }
        }
    }

    fn merge_cells(
        &mut self,
        t: &TableInfo,
        pk: &Value,
        s: &mut Stored,
        cells: &[Cell],
        v: &Version,
    ) -> Result<()> {
        let mut sets = Vec::new();
        let mut adds = Vec::new();
        let mut current: Option<Option<Vec<Value>>> = None;
        for c in cells {
            let i = t.col(c.column())?;
            match c {
                Cell::Add(_, d) => adds.push((i, *d)),
                Cell::Set(_, val) => {
                    let Some(cv) = s.meta.cell(i as u32) else {
                        sets.push((i, val.clone()));
                        s.meta.set_cell(i as u32, *v);
                        continue;
                    };
                    let incoming_wins = self.wins(v, &cv);
                    if !self.hb(&cv, v) {
                        // Concurrent writes to one cell: a conflict, decided by (hlc, origin).
                        let cur = current.get_or_insert_with(|| {
                            crate::capture::read_row(self.conn, t, pk).ok().flatten()
                        });
                        let local = cur
                            .as_ref()
                            .and_then(|r| r.get(i).cloned())
                            .unwrap_or(Value::Null);
                        if local != *val {
                            let policy = t.cols[i].policy;
                            let logged = conflict::record(
                                self.conn,
                                Conflict {
                                    id: 0,
                                    table: t.name().to_owned(),
                                    pk: pk.clone(),
                                    column: Some(t.cols[i].name.clone()),
                                    kind: ConflictKind::Cell,
                                    policy: policy.as_str().to_owned(),
                                    local: self.side(local.clone(), &cv),
                                    remote: self.side(val.clone(), v),
                                    winner: if incoming_wins {
                                        Winner::Remote
                                    } else {
                                        Winner::Local
                                    },
                                    resolution: None,
                                },
                            )?;
                            if policy == Policy::Custom && self.is_pending_local(&cv, v.server_seq)
                            {
                                self.out.followups.push(Followup {
                                    table: t.name().to_owned(),
                                    pk: pk.clone(),
                                    column: t.cols[i].name.clone(),
                                    local,
                                    remote: val.clone(),
                                    conflict_id: logged.id,
                                });
                            }
                            self.out.conflicts.push(logged);
                        }
                    }
                    if incoming_wins {
                        sets.push((i, val.clone()));
                        s.meta.set_cell(i as u32, *v);
                    }
                }
            }
        }
        s.meta.note_write(*v);
        rows::update_row(self.conn, t, pk, &sets, &adds)
    }

    fn log_row_conflict(
        &mut self,
        t: &TableInfo,
        pk: &Value,
        existing: &Version,
        incoming: &Version,
        incoming_wins: bool,
    ) -> Result<()> {
        let logged = conflict::record(
            self.conn,
            Conflict {
                id: 0,
                table: t.name().to_owned(),
                pk: pk.clone(),
                column: None,
                kind: ConflictKind::DeleteUpdate,
                policy: if t.update_wins() {
                    "update_wins"
                } else {
                    "delete_wins"
                }
                .to_owned(),
                local: self.side(Value::Null, existing),
                remote: self.side(Value::Null, incoming),
                winner: if incoming_wins {
                    Winner::Remote
                } else {
                    Winner::Local
                },
                resolution: None,
            },
        )?;
        self.out.conflicts.push(logged);
        Ok(())
    }
}

/// Checks a remote row change against the catalog before touching anything.
fn validate(t: &TableInfo, rc: &RowChange) -> Result<()> {
    crate::changeset::check_row_change(&t.decl, rc)
}

/// Reads the replica id stored in `ferry_meta`.
pub fn stored_replica_id(conn: &Connection) -> Result<ReplicaId> {
    let b: Vec<u8> = crate::db::meta_get(conn, "replica_id")?;
    ReplicaId::from_slice(&b).ok_or_else(|| Error::Corrupt("replica id is not 16 bytes".into()))
}

/// The relay position of one of this replica's own changes, if acknowledged.
pub fn own_server_seq(conn: &Connection, origin: u32, origin_seq: u64) -> Option<u64> {
    let row: Option<(Option<i64>, Option<i64>)> = conn
        .prepare_cached(
            "SELECT server_seq, reissued FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2",
        )
        .and_then(|mut st| {
            st.query_row(rusqlite::params![origin, origin_seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .ok()
        .flatten();
    match row {
        Some((Some(s), _)) => Some(s as u64),
        Some((None, Some(re))) => conn
            .prepare_cached("SELECT server_seq FROM ferry_log WHERE seq = ?1")
            .and_then(|mut st| {
                st.query_row([re], |r| r.get::<_, Option<i64>>(0))
                    .optional()
            })
            .ok()
            .flatten()
            .flatten()
            .map(|s| s as u64),
        _ => None,
    }
}

fn is_own(conn: &Connection, origin: u32, origin_seq: u64) -> bool {
    conn.prepare_cached("SELECT 1 FROM ferry_log WHERE origin = ?1 AND origin_seq = ?2")
        .and_then(|mut st| st.exists(rusqlite::params![origin, origin_seq as i64]))
        .unwrap_or(false)
}
