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

use crate::changeset::{Cell, RowChange, RowOp, Sequenced};
use crate::conflict::{self, Conflict, ConflictKind, Side, Winner};
use crate::db;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::error_code::ErrorCode;
use crate::hlc::WallClock;
use crate::ids::ReplicaId;
use crate::log;
use crate::observer::{ChangeEvent, ChangeSource, Notifications};
use crate::protocol::Move;
use crate::rows::{self, Origins, Stored};
use crate::snapshot::SnapshotRow;
use crate::tables::{TableInfo, Tables};
use crate::value::Value;
use crate::vv::{Version, happened_before};
use rusqlite::Connection;
use std::collections::BTreeSet;

/// One page of a snapshot, as the engine applies it.
pub(crate) struct SnapshotPage<'a> {
    /// The rows.
    pub rows: Vec<SnapshotRow>,
    /// Where the walk continues after this page (kept until the last page).
    pub resume: &'a [u8],
    /// Rows held already are replaced (a back-fill of gained scopes, or a walk that may have
    /// started over), not merged.
    pub replace: bool,
    /// Set on the last page.
    pub end: Option<crate::port::SnapshotEnd>,
}

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
    /// Tables whose rows went back to what they were before a withdrawn change set.
    pub rolled_back: BTreeSet<String>,
    /// This replica's pending change sets withdrawn because a remote change doomed them (by
    /// `origin_seq`; see `rollback`).
    pub withdrawn: Vec<u64>,
}

impl Outcome {
    /// Hands the tables touched and the conflicts logged to `notes`, for delivery once the
    /// transaction committed.
    pub(crate) fn notify(&mut self, notes: &mut Notifications) {
        if !self.rolled_back.is_empty() {
            notes.events.push(ChangeEvent {
                tables: std::mem::take(&mut self.rolled_back),
                source: ChangeSource::Rollback,
            });
        }
        if !self.tables.is_empty() {
            notes.events.push(ChangeEvent {
                tables: std::mem::take(&mut self.tables),
                source: ChangeSource::Remote,
            });
        }
        notes.conflicts.append(&mut self.conflicts);
    }
}

/// The merge of remote changes inside one transaction.
pub(crate) struct Merge<'a> {
    /// The connection (inside a transaction).
    pub conn: &'a Connection,
    /// Synced tables.
    pub cat: &'a Tables,
    /// Interned origins.
    pub origins: &'a mut Origins,
    /// What happened.
    pub out: &'a mut Outcome,
    /// This replica, when guarded change sets are pending: remote changes that doom one are
    /// preceded by its withdrawal (see `rollback`).
    pub strict: Option<&'a crate::rollback::Own>,
}

impl Merge<'_> {
    /// The server_seq of a version, looking up this replica's own acknowledged changes
    /// (following a change re-issued under a new replica id to its new identity).
    fn seq_of(&self, v: &Version) -> Result<Option<u64>> {
        if v.server_seq != 0 {
            return Ok(Some(v.server_seq));
        }
        log::own_server_seq(self.conn, v.origin, v.origin_seq)
    }

    fn hb(&self, a: &Version, b: &Version) -> Result<bool> {
        let failed = std::cell::RefCell::new(None);
        let r = happened_before(a, b, |v| {
            self.seq_of(v).unwrap_or_else(|e| {
                failed.borrow_mut().get_or_insert(e);
                None
            })
        });
        match failed.into_inner() {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    /// True when `v` is this replica's own write that the stream has not reached at relay
    /// position `at`: not acknowledged yet, or acknowledged at a later position (the ack
    /// overtook the changes ordered before it). Of two concurrent writes exactly one side
    /// sees this, whatever the timing of acks, so exactly one device runs the resolver.
    fn is_pending_local(&self, v: &Version, at: u64) -> Result<bool> {
        Ok(log::is_own(self.conn, v.origin, v.origin_seq)?
            && self.seq_of(v)?.is_none_or(|s| s > at))
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
        for rc in &cs.rows {
            let t = self.cat.table(&rc.table)?;
            self.withdraw_doomed(t, rc, cs.origin, s.server_seq)?;
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

    /// With guarded change sets pending (`strict`), withdraws those that remote change `rc`
    /// (made by `origin`, sequenced at `server_seq`) dooms, before it is merged.
    fn withdraw_doomed(
        &mut self,
        t: &TableInfo,
        rc: &RowChange,
        origin: ReplicaId,
        server_seq: u64,
    ) -> Result<()> {
        let Some(me) = self.strict else {
            return Ok(());
        };
        for doomed in crate::rollback::doomed(self.conn, t, rc)? {
            let policy = if t.mode() == crate::schema::TableMode::ServerChecked {
                "server_checked"
            } else {
                "guarded"
            };
            let reason = format!(
                "row {} of `{}` was changed first by replica {origin} (relay position {server_seq})",
                rc.pk.describe(),
                rc.table,
            );
            // The relay would refuse it with `conflict`: the device is told so now, with the
            // same event, counter and verdict as a refusal it hears from the relay.
            let w = crate::rollback::withdraw(
                self.conn,
                self.cat,
                me,
                doomed,
                policy,
                (ErrorCode::Conflict, &reason),
            )?;
            self.out.rolled_back.extend(w.tables);
            self.out.withdrawn.extend(w.withdrawn);
            self.out.conflicts.extend(w.conflicts);
        }
        Ok(())
    }

    /// Replays one snapshot row's pruned history (see `snapshot`) through the merge, as if
    /// the change sets it comes from were applied one by one. An entry whose write the row
    /// already notes (this replica's own, or one the log delivered) is skipped by the merge:
    /// a counter addition applied twice would count twice. This replica's own entries are
    /// replayed like any other, because a back-fill may bring a row whose metadata was
    /// evicted since its own write to it.
    pub fn apply_history(&mut self, row: SnapshotRow) -> Result<()> {
        let t = self.cat.table(&row.table)?;
        let SnapshotRow { table, pk, history } = row;
        // The entries become row changes by move: a row's only entry (most rows) takes the
        // row's table name and key too.
        let n = history.len();
        let mut table = Some(table);
        let mut pk = Some(pk);
        let mut changes = Vec::with_capacity(n);
        for (i, e) in history.into_iter().enumerate() {
            let last = i + 1 == n;
            let (Some(tbl), Some(key)) = (take_last(&mut table, last), take_last(&mut pk, last))
            else {
                break;
            };
            let id = (e.origin, e.origin_seq, e.hlc, e.server_seq, e.base);
            changes.push((
                id,
                RowChange {
                    table: tbl,
                    pk: key,
                    cl: e.cl,
                    op: e.op,
                },
            ));
        }
        for (_, rc) in &changes {
            validate(t, rc)?;
        }
        let mut wrote = false;
        for ((origin, origin_seq, hlc, server_seq, base), rc) in &changes {
            self.withdraw_doomed(t, rc, *origin, *server_seq)?;
            let v = Version {
                hlc: *hlc,
                origin: self.origins.intern(self.conn, *origin)?,
                origin_seq: *origin_seq,
                server_seq: *server_seq,
                base: *base,
            };
            self.apply_row(t, rc, &v)?;
            wrote = true;
        }
        if wrote && !self.out.tables.contains(t.name()) {
            self.out.tables.insert(t.name().to_owned());
        }
        Ok(())
    }

    /// Merges the changes own pending change set `p` made to row `table`/`pk` again, after
    /// the row was replaced by a back-fill.
    fn reapply_own(
        &mut self,
        p: &log::Pending,
        me_num: u32,
        table: &str,
        pk: &Value,
    ) -> Result<()> {
        let cs = &p.cs;
        let v = Version {
            hlc: cs.hlc,
            origin: me_num,
            origin_seq: cs.origin_seq,
            server_seq: 0,
            base: cs.base,
        };
        for rc in cs
            .rows
            .iter()
            .filter(|rc| rc.table == table && rc.pk == *pk)
        {
            let t = self.cat.table(table)?;
            self.apply_row(t, rc, &v)?;
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
                    let mut concurrent: Option<Version> = None;
                    for w in s.meta.writes.iter().copied() {
                        if !self.hb(&w, v)? && concurrent.is_none_or(|c| w.hlc >= c.hlc) {
                            concurrent = Some(w);
                        }
                    }
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
                    let vals = crate::rows::read_row(self.conn, t, &rc.pk)?;
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
                if stored.as_ref().is_some_and(|s| {
                    s.meta
                        .writes
                        .iter()
                        .any(|w| w.origin == v.origin && w.origin_seq >= v.origin_seq)
                }) {
                    // This write, or a later one of its origin, is in the row already: it
                    // came in a snapshot whose rows are newer than the position the log
                    // continues from (see `snapshot`). Applying it again would count a
                    // counter twice; in log order an origin's writes come in sequence.
                    return Ok(());
                }
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
                    if !self.hb(&cv, v)? {
                        // Concurrent writes to one cell: a conflict, decided by (hlc, origin).
                        if current.is_none() {
                            current = Some(crate::rows::read_row(self.conn, t, pk)?);
                        }
                        let cur = current.as_ref().unwrap_or(&None);
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
                            if policy.resolved_by_app()
                                && self.is_pending_local(&cv, v.server_seq)?
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

/// The value itself when `last`, else a copy.
fn take_last<T: Clone>(o: &mut Option<T>, last: bool) -> Option<T> {
    if last { o.take() } else { o.clone() }
}

/// Page cache while a snapshot is applied, as `PRAGMA cache_size` (negative: KiB).
const BULK_CACHE_SIZE: i64 = -65_536;

/// Result of applying a batch of remote change sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Change sets merged.
    pub applied: usize,
    /// Change sets at or below the cursor (already applied), skipped.
    pub duplicates: usize,
    /// This replica's own change sets recognised in the stream (acknowledged).
    pub own: usize,
    /// Conflicts detected.
    pub conflicts: usize,
    /// Cursor after the batch.
    pub cursor: u64,
    /// This replica's pending change sets withdrawn because a change in the batch doomed
    /// them (by `origin_seq`).
    pub withdrawn: Vec<u64>,
}

/// Checks that relay positions are strictly increasing within `(after, up_to]`.
fn in_order(seqs: impl Iterator<Item = u64>, after: u64, up_to: u64, what: &str) -> Result<()> {
    let mut last = after;
    for s in seqs {
        if s <= last || s > up_to {
            return Err(Error::InvalidChangeSet(format!(
                "{what} position {s} is out of order in a batch covering ({after}, {up_to}]"
            )));
        }
        last = s;
    }
    Ok(())
}

/// Checks a batch covering relay positions `(after, up_to]` before anything is applied:
/// change sets, scope moves and their backfills each in order.
pub(crate) fn check_batch(
    after: u64,
    up_to: u64,
    sets: &[Sequenced],
    moves: &[Move],
) -> Result<()> {
    in_order(
        moves.iter().map(|m| m.server_seq),
        after,
        up_to,
        "scope move",
    )?;
    for m in moves {
        in_order(
            m.backfill.iter().map(|b| b.server_seq),
            0,
            m.server_seq.saturating_sub(1),
            "backfill",
        )?;
    }
    in_order(
        sets.iter().map(|s| s.server_seq),
        after,
        up_to,
        "server_seq",
    )
}

/// One transaction's share of a batch.
pub(crate) struct Chunk<'a> {
    pub sets: &'a [Sequenced],
    pub moves: &'a [Move],
    /// The batch's end, on its last chunk (the cursor moves there even past the last set).
    pub up_to: Option<u64>,
}

/// Splits a batch into chunks of at most `max_ops` cell operations (a change set is never
/// split; a larger one is a chunk of its own), each with the scope moves ordered up to its
/// last change set, and runs `f` on each in order until one fails. An empty batch is one
/// empty chunk (its moves and `up_to` still apply).
pub(crate) fn in_chunks(
    sets: &[Sequenced],
    moves: &[Move],
    up_to: u64,
    max_ops: usize,
    mut f: impl FnMut(Chunk<'_>) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    let mut moves_done = 0;
    loop {
        let mut end = start;
        let mut ops = 0;
        while end < sets.len() && (end == start || ops + sets[end].change_set.op_count() <= max_ops)
        {
            ops += sets[end].change_set.op_count();
            end += 1;
        }
        let chunk = &sets[start..end];
        let is_last = end >= sets.len();
        let moves_end = if is_last {
            moves.len()
        } else {
            let last_seq = chunk.last().map_or(0, |s| s.server_seq);
            moves_done + moves[moves_done..].partition_point(|m| m.server_seq <= last_seq)
        };
        f(Chunk {
            sets: chunk,
            moves: &moves[moves_done..moves_end],
            up_to: is_last.then_some(up_to),
        })?;
        moves_done = moves_end;
        if is_last {
            return Ok(());
        }
        start = end;
    }
}

impl Engine {
    /// Applies a chunk of sequenced change sets in one transaction. A change set that fails
    /// rolls the transaction back; the ones before it are then applied again on their own, so
    /// each change set stays all-or-nothing without paying for a savepoint per set.
    pub(crate) fn apply_chunk(
        &mut self,
        wall: &dyn WallClock,
        chunk: &Chunk<'_>,
        report: &mut ApplyReport,
        notes: &mut Notifications,
    ) -> (Vec<Followup>, Option<Error>) {
        let snapshot = report.clone();
        match self.apply_chunk_once(wall, chunk, report, notes) {
            Ok(f) => (f, None),
            Err((failed_at, e)) => {
                *report = snapshot;
                // The failed transaction (its foreign fold included) was rolled back.
                notes.discard();
                tracing::warn!(error = %e, "remote change set refused");
                if failed_at == 0 {
                    return (Vec::new(), Some(e));
                }
                let before = chunk.sets[failed_at].server_seq;
                let head = Chunk {
                    sets: &chunk.sets[..failed_at],
                    moves: &chunk.moves[..chunk.moves.partition_point(|m| m.server_seq < before)],
                    up_to: None,
                };
                match self.apply_chunk_once(wall, &head, report, notes) {
                    Ok(f) => (f, Some(e)),
                    Err((_, again)) => (Vec::new(), Some(again)),
                }
            }
        }
    }

    fn apply_chunk_once(
        &mut self,
        wall: &dyn WallClock,
        chunk: &Chunk<'_>,
        report: &mut ApplyReport,
        notes: &mut Notifications,
    ) -> std::result::Result<Vec<Followup>, (usize, Error)> {
        let mut out = Outcome::default();
        let mut local_report = report.clone();
        let mut failed_at = 0;
        let cursor_before = self.cursor;
        let clock_before = self.clock;
        let moves = chunk.moves;
        let r = self.in_txn(|e| {
            e.begin_sdk_writes(wall, notes)?;
            e.materialize_in_tx()?;
            let mut mv = 0;
            for (k, s) in chunk.sets.iter().enumerate() {
                failed_at = k;
                if s.server_seq <= e.cursor {
                    local_report.duplicates += 1;
                    continue;
                }
                while mv < moves.len() && moves[mv].server_seq < s.server_seq {
                    e.apply_move(&moves[mv], true, true, &mut out)?;
                    mv += 1;
                }
                let moving =
                    (mv < moves.len() && moves[mv].server_seq == s.server_seq).then(|| &moves[mv]);
                if let Some(m) = moving {
                    e.apply_move(m, true, false, &mut out)?;
                }
                let cs = &s.change_set;
                let echo = if cs.origin == e.me {
                    log::own_echo(&e.conn, e.me_num, cs)?
                } else {
                    None
                };
                if let Some(withdrawn) = echo {
                    if withdrawn && !cs.rows.is_empty() {
                        // The relay sequenced this change set in full — a copy still in
                        // flight on a connection the device had left — after the device had
                        // withdrawn it (written on top of a refused one). The log is the
                        // truth: it is applied back, like any remote change.
                        e.merge(&mut out, None).apply(s)?;
                        log::reinstate(&e.conn, e.me_num, cs.origin_seq)?;
                        tracing::warn!(
                            origin_seq = cs.origin_seq,
                            "a withdrawn change set was sequenced after all; applied back"
                        );
                    }
                    e.acknowledge(cs.origin_seq, s.server_seq)?;
                    local_report.own += 1;
                } else {
                    let before = out.conflicts.len();
                    let own = e.guard_pending.then_some(crate::rollback::Own {
                        id: e.me,
                        num: e.me_num,
                        cursor: e.cursor,
                    });
                    e.merge(&mut out, own.as_ref()).apply(s)?;
                    if own.is_some() {
                        // It may have withdrawn the pending guarded change sets it dooms.
                        e.guard_pending = log::guard_pending(&e.conn)?;
                    }
                    local_report.applied += 1;
                    local_report.conflicts += out.conflicts.len() - before;
                    e.clock.observe(cs.hlc);
                    e.remote_hlc = e.remote_hlc.max(cs.hlc);
                }
                if let Some(m) = moving {
                    e.apply_move(m, false, true, &mut out)?;
                    mv += 1;
                }
                e.cursor = s.server_seq;
            }
            for m in &moves[mv..] {
                if m.server_seq > e.cursor {
                    e.apply_move(m, true, true, &mut out)?;
                }
            }
            if let Some(u) = chunk.up_to
                && u > e.cursor
            {
                e.cursor = u;
            }
            db::meta_set(&e.conn, "cursor", e.cursor as i64)?;
            db::meta_set(&e.conn, "hlc", e.clock.last().0 as i64)?;
            db::meta_set(&e.conn, "remote_hlc", e.remote_hlc.0 as i64)?;
            e.sdk_writes(false)?;
            Ok(())
        });
        if let Err(e) = r {
            self.cursor = cursor_before;
            self.clock = clock_before;
            return Err((failed_at, e));
        }
        local_report.withdrawn.append(&mut out.withdrawn);
        *report = local_report;
        out.notify(notes);
        Ok(out.followups)
    }

    /// Applies one page of snapshot rows in one transaction (see `snapshot`): each row's
    /// pruned history is replayed through the merge. On the last page of a first snapshot
    /// the cursor moves up to its position; a back-fill's leaves it (see `holding`).
    pub(crate) fn apply_snapshot(
        &mut self,
        wall: &dyn WallClock,
        page: SnapshotPage<'_>,
        report: &mut ApplyReport,
        notes: &mut Notifications,
    ) -> Result<()> {
        let SnapshotPage {
            rows,
            resume,
            replace,
            end,
        } = page;
        let done = end.is_some();
        let mut out = Outcome::default();
        let clock_before = self.clock;
        let remote_before = self.remote_hlc;
        let cursor_before = self.cursor;
        let count = rows.len();
        if self.bulk_cache.is_none() {
            // A snapshot writes rows by the hundred thousand: a page cache that holds the
            // tables' upper levels keeps each insert from reading pages back.
            let size: i64 = self
                .conn
                .pragma_query_value(None, "cache_size", |r| r.get(0))?;
            self.conn
                .pragma_update(None, "cache_size", BULK_CACHE_SIZE)?;
            self.bulk_cache = Some(size);
        }
        let r = self.in_txn(|e| {
            e.begin_sdk_writes(wall, notes)?;
            e.materialize_in_tx()?;
            // Own pending change sets, loaded only if a back-fill replaces a row they touch.
            let mut pending: Option<Vec<log::Pending>> = None;
            for row in rows {
                // Remote writes doom the pending guarded change sets they overtake, as in
                // the log (see `rollback`).
                let own = e.guard_pending.then_some(crate::rollback::Own {
                    id: e.me,
                    num: e.me_num,
                    cursor: e.cursor,
                });
                for h in &row.history {
                    e.clock.observe(h.hlc);
                    e.remote_hlc = e.remote_hlc.max(h.hlc);
                }
                let replace = replace && {
                    let t = e.cat.table(&row.table)?;
                    rows::load(&e.conn, t, &row.pk)?.is_some()
                };
                if replace {
                    // A row this replica holds already (it moved into a gained scope, was
                    // written here, or came in an earlier walk): its history is replayed from scratch,
                    // because a history folds each origin's counter additions into one and
                    // part of them may be in the row (see `holding`). Own writes not yet
                    // pushed go back on top.
                    let (table, pk) = (row.table.clone(), row.pk.clone());
                    if pending.is_none() {
                        pending = Some(log::pending_live(&e.conn)?);
                    }
                    let me_num = e.me_num;
                    let mut merge = e.merge(&mut out, own.as_ref());
                    merge.evict(&table, &pk)?;
                    merge.apply_history(row)?;
                    for p in pending.iter().flatten() {
                        merge.reapply_own(p, me_num, &table, &pk)?;
                    }
                } else {
                    e.merge(&mut out, own.as_ref()).apply_history(row)?;
                }
                if own.is_some() {
                    e.guard_pending = log::guard_pending(&e.conn)?;
                }
            }
            db::meta_set(&e.conn, "hlc", e.clock.last().0 as i64)?;
            db::meta_set(&e.conn, "remote_hlc", e.remote_hlc.0 as i64)?;
            match &end {
                Some(end) => {
                    // The snapshot is complete. A first one: the log continues from its
                    // position. A back-fill: from the cursor, as before (see `holding`).
                    if !end.backfill {
                        e.cursor = e.cursor.max(end.position);
                        db::meta_set(&e.conn, "cursor", e.cursor as i64)?;
                    }
                    db::meta_delete(&e.conn, "snapshot_resume")?;
                    crate::holding::snapshot_done(&e.conn, end, e.cursor)?;
                }
                None => db::meta_set(&e.conn, "snapshot_resume", resume)?,
            }
            e.sdk_writes(false)?;
            Ok(())
        });
        if let Err(e) = r {
            self.clock = clock_before;
            self.remote_hlc = remote_before;
            self.cursor = cursor_before;
            notes.discard();
            return Err(e);
        }
        if done && let Some(size) = self.bulk_cache.take() {
            self.conn.pragma_update(None, "cache_size", size)?;
        }
        report.applied += count;
        report.conflicts += out.conflicts.len();
        report.cursor = self.cursor;
        out.notify(notes);
        Ok(())
    }

    fn merge<'a>(
        &'a mut self,
        out: &'a mut Outcome,
        strict: Option<&'a crate::rollback::Own>,
    ) -> Merge<'a> {
        Merge {
            conn: &self.conn,
            cat: &self.cat,
            origins: &mut self.origins,
            out,
            strict,
        }
    }

    /// Applies the backfill and/or evictions of one scope move (inside the chunk's transaction).
    fn apply_move(
        &mut self,
        m: &Move,
        backfill: bool,
        evict: bool,
        out: &mut Outcome,
    ) -> Result<()> {
        if m.server_seq <= self.cursor {
            return Ok(()); // delivered before
        }
        if backfill {
            for b in &m.backfill {
                self.merge(out, None).apply(b)?;
                self.clock.observe(b.change_set.hlc);
                self.remote_hlc = self.remote_hlc.max(b.change_set.hlc);
            }
        }
        if evict {
            let mut merge = self.merge(out, None);
            for k in &m.evict {
                let t = merge.cat.table(&k.table)?;
                // A row whose state already includes a change at or after the move (a
                // snapshot page read later brought it) is where the move took it and back
                // again: the eviction is history. In log order this never happens.
                let newer = rows::load(merge.conn, t, &k.pk)?
                    .is_some_and(|s| s.meta.versions().any(|v| v.server_seq >= m.server_seq));
                if !newer {
                    merge.evict(&k.table, &k.pk)?;
                }
            }
        }
        Ok(())
    }
}
