//! Change sets the relay refused for a permanent reason, set aside so uploads go on.
//!
//! A change set can be refused for a reason that pushing it again will not cure: the token
//! may not write a row's scope any more (an admin moved the row while the device was
//! offline), the set is larger than the relay accepts, or the relay finds it invalid. Were it
//! left at the head of the upload queue, every later write of the device would wait behind
//! it forever: the relay sequences an origin's change sets in order.
//!
//! So such a change set is **quarantined**: its body is moved to `ferry_quarantine` with the
//! code and the relay's reason, and its place in the origin's sequence is kept by an empty
//! placeholder (as a rolled-back compare-and-set write keeps it), which the relay sequences,
//! so the uploads behind it continue. The rows keep what the app wrote; nothing is lost
//! before the app decides, through [`crate::Replica::quarantined`]:
//!
//! * **discard** takes the writes back exactly as a refused compare-and-set write is taken
//!   back (see `rollback`), cell by cell where nothing newer replaced them, and writes each
//!   to the conflict log. That needs the rows' before-images, which are kept for guarded
//!   change sets only (`server_checked` tables, lease-guarded transactions): keeping them
//!   for every write would double the write path's cost. Discarding an unguarded change set
//!   is refused with [`Error::CannotDiscard`]; retry it or overwrite its rows. (Guarded
//!   change sets are not set aside at all, below: only entries an earlier version set aside
//!   hold before-images.)
//! * **retry** issues the change set again at the end of the queue, with a fresh
//!   `origin_seq` and clock, carrying only the cells nothing has overwritten since (after
//!   the app fixed the cause, e.g. a token with a wider grant). While a guarded change set
//!   is pending it waits ([`Error::RetryWaits`]): issued behind that one unguarded, it
//!   could not be withdrawn with it were the relay to refuse it (`rollback` withdraws what
//!   was written on top).
//!
//! A **guarded** change set refused for good is not set aside ([`SetAside::Guarded`]): the
//! relay decides strict writes, so the sync client rolls it back with what was written on
//! top of it, as for a compare-and-set conflict (see `refusal`). Set aside, a later write on
//! top of it (a `server_checked` balance read from it) would upload a value computed from
//! one the relay never took, and remote changes merged under it would leave its
//! before-images stale.
//!
//! Undo records of a quarantined change set are kept under `-id` (not its log row, which
//! the placeholder's acknowledgement would clear).

use crate::changeset::{Cell, ChangeSet, RowOp};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::error_code::ErrorCode;
use crate::hlc::WallClock;
use crate::log::{self, Pending};
use crate::observer::{ChangeEvent, ChangeSource, Notifications};
use crate::rowmeta::RowMeta;
use crate::vv::Version;
use rusqlite::{Connection, OptionalExtension, params};

/// A change set set aside after a permanent refusal (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Handle for [`crate::Replica::discard_quarantined`] / `retry_quarantined`.
    pub id: i64,
    /// The `origin_seq` it was refused under.
    pub origin_seq: u64,
    /// Why the relay refused it.
    pub code: ErrorCode,
    /// The relay's explanation.
    pub reason: String,
    /// Tables it writes (sorted).
    pub tables: Vec<String>,
    /// Rows it writes.
    pub rows: u64,
    /// Whether discarding can take it back (its before-images were kept: only entries an
    /// earlier version set aside for a guarded write; guarded ones are rolled back now).
    pub discardable: bool,
    /// When it was set aside (ms since the Unix epoch).
    pub at_ms: u64,
}

/// What became of a change set the relay refused for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// Its rows were set aside; an empty placeholder now holds its place in the sequence.
    Rows,
    /// It had been withdrawn here already (rolled back by a change it lost to, after it was
    /// sent): its placeholder holds its place, and the refusal was about rows it no longer
    /// carries.
    Withdrawn,
    /// It is guarded (a strict write: `server_checked`, lease-guarded, or written while
    /// one was pending): nothing was set aside; the caller rolls it back, with what was
    /// written on top of it, as a compare-and-set refusal is (see `refusal`).
    Guarded,
    /// Nothing to set aside: an empty change set was refused.
    Nothing,
}

/// True for the refusal codes that quarantine a change set: pushing it again cannot help.
pub(crate) fn is_permanent(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Forbidden | ErrorCode::TooLarge | ErrorCode::InvalidChangeSet
    )
}

struct Entry {
    origin: u32,
    origin_seq: u64,
    code: ErrorCode,
    reason: String,
    cs: ChangeSet,
    at_ms: u64,
}

fn load(conn: &Connection, id: i64) -> Result<Entry> {
    let row: Option<(i64, i64, String, String, Vec<u8>, i64)> = conn
        .prepare_cached(
            "SELECT origin, origin_seq, code, reason, wire, at_ms FROM ferry_quarantine WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })
        .optional()?;
    let Some((origin, origin_seq, code, reason, wire, at_ms)) = row else {
        return Err(Error::NotQuarantined(id));
    };
    Ok(Entry {
        origin: origin as u32,
        origin_seq: origin_seq as u64,
        code: ErrorCode::parse(&code).unwrap_or(ErrorCode::Internal),
        reason,
        cs: log::decode(&wire)?,
        at_ms: at_ms as u64,
    })
}

fn has_undo(conn: &Connection, id: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM ferry_undo WHERE seq = ?1)")?
        .query_row([-id], |r| r.get(0))?)
}

/// Every quarantined change set, oldest first.
pub(crate) fn list(conn: &Connection) -> Result<Vec<Quarantined>> {
    let ids: Vec<i64> = conn
        .prepare_cached("SELECT id FROM ferry_quarantine ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    ids.into_iter()
        .map(|id| {
            let e = load(conn, id)?;
            Ok(Quarantined {
                id,
                origin_seq: e.origin_seq,
                code: e.code,
                reason: e.reason,
                tables: e.cs.tables(),
                rows: e.cs.rows.len() as u64,
                discardable: e.cs.rows.is_empty() || has_undo(conn, id)?,
                at_ms: e.at_ms,
            })
        })
        .collect()
}

/// Number of quarantined change sets.
pub(crate) fn count(conn: &Connection) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM ferry_quarantine")?
        .query_row([], |r| r.get::<_, i64>(0))? as u64)
}

impl Engine {
    /// Sets own pending change set `origin_seq` aside after a permanent refusal (inside the
    /// caller's transaction), unless it is guarded. A change set withdrawn already (a
    /// placeholder) has nothing left to set aside: whether its placeholder was what the
    /// relay refused only the sync client knows (it sent the frames).
    pub(crate) fn quarantine(
        &mut self,
        origin_seq: u64,
        code: ErrorCode,
        reason: &str,
        wall: &dyn WallClock,
    ) -> Result<SetAside> {
        self.materialize_in_tx()?;
        match log::standing(&self.conn, self.me_num, origin_seq)? {
            None => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which this replica never issued"
                )));
            }
            Some(log::Standing {
                server_seq: Some(s),
                ..
            }) => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which it had acknowledged at {s}"
                )));
            }
            Some(s) if s.rejected.is_some() => return Ok(SetAside::Withdrawn),
            Some(s) if s.guarded => return Ok(SetAside::Guarded),
            Some(_) => {}
        }
        let Some(Pending { seq, cs }) = log::pending_one(&self.conn, self.me_num, origin_seq)?
        else {
            return Ok(SetAside::Nothing);
        };
        if cs.rows.is_empty() {
            // An empty set refused: there is nothing to set aside, and its placeholder would
            // be the same empty set.
            return Ok(SetAside::Nothing);
        }
        self.conn
            .prepare_cached(
                "INSERT INTO ferry_quarantine(origin, origin_seq, code, reason, wire, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                self.me_num,
                origin_seq as i64,
                code.as_str(),
                reason,
                log::encode(&cs)?,
                wall.now_millis() as i64
            ])?;
        let id = self.conn.last_insert_rowid();
        self.conn
            .prepare_cached("UPDATE ferry_undo SET seq = ?1 WHERE seq = ?2")?
            .execute(params![-id, seq])?;
        let placeholder = ChangeSet {
            rows: Vec::new(),
            base: self.cursor,
            fence: None,
            guarded: false,
            ..cs
        };
        log::withdraw(
            &self.conn,
            seq,
            (code, &format!("quarantined ({}): {reason}", code.as_str())),
            &placeholder,
        )?;
        self.guard_pending = log::guard_pending(&self.conn)?;
        tracing::warn!(
            origin_seq,
            id,
            code = code.as_str(),
            reason,
            "change set quarantined; the uploads behind it go on"
        );
        Ok(SetAside::Rows)
    }

    /// Takes quarantined change set `id` back (see the module docs; inside the caller's
    /// transaction).
    pub(crate) fn discard_quarantined(&mut self, id: i64, notes: &mut Notifications) -> Result<()> {
        self.materialize_in_tx()?;
        let e = load(&self.conn, id)?;
        if !e.cs.rows.is_empty() && !has_undo(&self.conn, id)? {
            return Err(Error::CannotDiscard {
                id,
                origin_seq: e.origin_seq,
            });
        }
        let seq = log::entry_of(&self.conn, e.origin, e.origin_seq)?.ok_or_else(|| {
            Error::Corrupt(format!(
                "quarantined change set {id} has no log entry for origin_seq {}",
                e.origin_seq
            ))
        })?;
        let own = crate::rollback::Own {
            id: self.me,
            num: self.me_num,
            cursor: self.cursor,
        };
        let mut out = crate::rollback::Withdrawal::default();
        let why = format!("discarded after the relay refused it: {}", e.reason);
        crate::rollback::undo_set(
            &self.conn,
            &self.cat,
            &own,
            &Pending { seq, cs: e.cs },
            -id,
            ("quarantine", &why),
            &mut out,
        )?;
        self.conn
            .prepare_cached("DELETE FROM ferry_undo WHERE seq = ?1")?
            .execute([-id])?;
        self.conn
            .prepare_cached("DELETE FROM ferry_quarantine WHERE id = ?1")?
            .execute([id])?;
        if !out.tables.is_empty() {
            notes.events.push(ChangeEvent {
                tables: out.tables,
                source: ChangeSource::Rollback,
            });
        }
        notes.conflicts.extend(out.conflicts);
        tracing::info!(
            id,
            origin_seq = e.origin_seq,
            "quarantined change set discarded"
        );
        Ok(())
    }

    /// Issues quarantined change set `id` again at the end of the queue (see the module
    /// docs; inside the caller's transaction). Returns the new `origin_seq`, or `None` when
    /// nothing of it was left to push (every cell overwritten since).
    pub(crate) fn retry_quarantined(
        &mut self,
        id: i64,
        wall: &dyn WallClock,
    ) -> Result<Option<u64>> {
        self.materialize_in_tx()?;
        let e = load(&self.conn, id)?;
        let undo = has_undo(&self.conn, id)?;
        if !undo && self.guard_pending {
            // Issued now it would follow a pending guarded change set without being guarded
            // itself: were that one refused, what it wrote on top could not be taken back
            // with it (see `rollback`).
            return Err(Error::RetryWaits { id });
        }
        let seq = log::entry_of(&self.conn, e.origin, e.origin_seq)?;
        let origin_seq = self.next_oseq;
        let hlc = self.clock.tick(wall.now_millis());
        let new = Version {
            hlc,
            origin: self.me_num,
            origin_seq,
            server_seq: 0,
            base: self.cursor,
        };
        // Whether a version is the quarantined change set's (following a re-issue under a
        // new replica id); a lookup that fails fails the retry.
        let conn = &self.conn;
        let failed = std::cell::RefCell::new(None);
        let mine = |v: &Version| match log::entry_of(conn, v.origin, v.origin_seq) {
            Ok(s) => s.is_some() && s == seq,
            Err(err) => {
                failed.borrow_mut().get_or_insert(err);
                false
            }
        };
        let mut rows = Vec::with_capacity(e.cs.rows.len());
        for mut rc in e.cs.rows {
            let t = self.cat.table(&rc.table)?;
            let Some(mut stored) = crate::rows::load(conn, t, &rc.pk)? else {
                continue;
            };
            if stored.meta.cl != rc.cl {
                continue; // replaced by a later incarnation: nothing of it is left
            }
            let row_level = stored.meta.row.as_ref().is_some_and(&mine);
            match &mut rc.op {
                RowOp::Delete if !row_level => continue,
                RowOp::Delete => {}
                RowOp::Upsert(cells) => {
                    let m = &stored.meta;
                    cells.retain(|c| match c {
                        Cell::Add(..) => true,
                        Cell::Set(name, _) => t
                            .col(name)
                            .is_ok_and(|i| m.cell(i as u32).is_some_and(|v| mine(&v))),
                    });
                    if cells.is_empty() && !row_level {
                        continue;
                    }
                }
            }
            retarget(&mut stored.meta, &mine, new);
            crate::rows::store(conn, t, &rc.pk, &stored)?;
            rows.push(rc);
        }
        if let Some(err) = failed.into_inner() {
            return Err(err);
        }
        self.conn
            .prepare_cached("DELETE FROM ferry_quarantine WHERE id = ?1")?
            .execute([id])?;
        if rows.is_empty() {
            self.conn
                .prepare_cached("DELETE FROM ferry_undo WHERE seq = ?1")?
                .execute([-id])?;
            tracing::info!(id, "quarantined change set retried: nothing of it was left");
            return Ok(None);
        }
        let cs = ChangeSet {
            id: ulid::Ulid::generate().to_bytes(),
            origin: self.me,
            origin_seq,
            hlc,
            base: self.cursor,
            schema_version: e.cs.schema_version,
            rows,
            guarded: e.cs.guarded,
            fence: e.cs.fence,
        };
        let log_seq = log::append_materialized(&self.conn, self.me_num, &cs, undo)?;
        self.conn
            .prepare_cached("UPDATE ferry_undo SET seq = ?1 WHERE seq = ?2")?
            .execute(params![log_seq, -id])?;
        self.next_oseq += 1;
        self.guard_pending |= undo;
        crate::db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
        tracing::info!(id, origin_seq, "quarantined change set issued again");
        Ok(Some(origin_seq))
    }
}

/// Gives every version in `m` that `mine` recognizes the version `new`.
fn retarget(m: &mut RowMeta, mine: &dyn Fn(&Version) -> bool, new: Version) {
    let mut swap = |v: &mut Version| {
        if mine(v) {
            *v = new;
        }
    };
    m.row.iter_mut().for_each(&mut swap);
    m.cells.iter_mut().for_each(|(_, v)| swap(v));
    m.writes.iter_mut().for_each(&mut swap);
}
