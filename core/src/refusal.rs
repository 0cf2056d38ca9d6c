//! What the device does when the relay refuses one of its change sets.
//!
//! Three refusals change what the device holds; the others (bad input, limits, scopes) are
//! the sync client's business (see `quarantine`) and reach here only for a guarded change
//! set:
//!
//! * **compare-and-set conflict or stale fence** on a guarded change set — or any refusal
//!   for good of one (a scope it may no longer write, a size beyond the relay's limits): the
//!   relay decides strict writes, so it is withdrawn with those written on top of it (see
//!   `rollback`), observers are told;
//! * **conflict on `custom` columns** of an unguarded change set: once caught up past the
//!   conflicting change, the change set is *rebased* — new base, fresh clock, the custom
//!   cells carrying the values the replica now shows — and pushed again;
//! * **clock skew** (stamped too far ahead of the relay's clock): the pending change sets
//!   from it on are *re-stamped* with the corrected clock.
//!
//! Each runs inside one engine transaction.

use crate::changeset::{Cell, RowOp};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::hlc::{HlcState, WallClock};
use crate::log;
use crate::observer::{ChangeEvent, ChangeSource, Notifications};
use crate::protocol::ErrorCode;
use crate::vv::Version;

/// What handling a refusal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalAction {
    /// These change sets (by `origin_seq`) were rolled back and replaced by empty ones; push
    /// again. Empty when it had been rolled back already.
    Withdrawn(Vec<u64>),
    /// Catch up past the conflicting change, then rebase it and push again.
    Rebase,
}

impl Engine {
    /// Handles a compare-and-set or fence refusal of own change set `origin_seq`, or a
    /// refusal for good of a guarded one (inside the caller's transaction).
    pub(crate) fn handle_refusal(
        &mut self,
        origin_seq: u64,
        code: ErrorCode,
        message: &str,
        notes: &mut Notifications,
    ) -> Result<RefusalAction> {
        self.materialize_in_tx()?;
        let guarded = match log::standing(&self.conn, self.me_num, origin_seq)? {
            None => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which this replica never issued"
                )));
            }
            Some(s) if s.rejected.is_some() => return Ok(RefusalAction::Withdrawn(Vec::new())),
            Some(log::Standing {
                server_seq: Some(s),
                ..
            }) => {
                return Err(Error::Protocol(format!(
                    "the relay refused origin_seq {origin_seq}, which it had acknowledged at {s}"
                )));
            }
            Some(s) => s.guarded,
        };
        let policy = match code {
            ErrorCode::Fenced => "lease",
            ErrorCode::Conflict if guarded => "server_checked",
            ErrorCode::Conflict => return Ok(RefusalAction::Rebase),
            // A strict write refused for good (see `quarantine`): the relay decides strict
            // writes, whatever the reason, so it is rolled back like a conflict.
            other if guarded && crate::quarantine::is_permanent(other) => other.as_str(),
            other => {
                return Err(Error::InvalidInput(format!(
                    "a `{}` refusal is not rolled back",
                    other.as_str()
                )));
            }
        };
        let own = crate::rollback::Own {
            id: self.me,
            num: self.me_num,
            cursor: self.cursor,
        };
        let w = crate::rollback::withdraw(
            &self.conn,
            &self.cat,
            &own,
            origin_seq,
            policy,
            (code, message),
        )?;
        self.guard_pending = log::guard_pending(&self.conn)?;
        if !w.tables.is_empty() {
            notes.events.push(ChangeEvent {
                tables: w.tables,
                source: ChangeSource::Rollback,
            });
        }
        notes.conflicts.extend(w.conflicts);
        Ok(RefusalAction::Withdrawn(w.withdrawn))
    }

    /// Re-issues pending change set `origin_seq`, refused for its `custom` columns, on top of
    /// what the replica now holds (inside the caller's transaction). False if it is no
    /// longer pending.
    pub(crate) fn rebase(&mut self, origin_seq: u64, wall: &dyn WallClock) -> Result<bool> {
        self.materialize_in_tx()?;
        let Some(log::Pending { seq, mut cs }) =
            log::pending_one(&self.conn, self.me_num, origin_seq)?
        else {
            return Ok(false);
        };
        let old = Version {
            hlc: cs.hlc,
            origin: self.me_num,
            origin_seq,
            server_seq: 0,
            base: cs.base,
        };
        let hlc = self.clock.tick(wall.now_millis());
        let new = Version {
            hlc,
            base: self.cursor,
            ..old
        };
        for rc in &mut cs.rows {
            let t = self.cat.table(&rc.table)?;
            let current = crate::rows::read_row(&self.conn, t, &rc.pk)?;
            let Some(mut stored) = crate::rows::load(&self.conn, t, &rc.pk)? else {
                continue;
            };
            crate::rollback::swap_in_undo(&self.conn, t, &rc.pk, &|m| m.swap_version(&old, &new))?;
            let m = &mut stored.meta;
            m.swap_version(&old, &new);
            if let RowOp::Upsert(cells) = &mut rc.op {
                // A plain (`lww`) cell the device no longer holds from this change set lost to a
                // write it has applied since (or was overwritten by its own later one): the
                // rebased set, whose clock is newer than both, must not carry it, or it would
                // win on every other replica while this one keeps the winner.
                let me = self.me_num;
                let same_incarnation = m.cl == rc.cl;
                let mut kept = Vec::with_capacity(cells.len());
                for c in std::mem::take(cells) {
                    if let Cell::Set(name, _) = &c {
                        let i = t.col(name)?;
                        let holds = m
                            .cell(i as u32)
                            .is_some_and(|cv| cv.origin == me && cv.origin_seq == origin_seq);
                        if same_incarnation && !t.cols[i].policy.resolved_by_app() && !holds {
                            continue;
                        }
                    }
                    kept.push(c);
                }
                *cells = kept;
                for c in cells.iter_mut() {
                    let Cell::Set(name, v) = c else {
                        continue;
                    };
                    let i = t.col(name)?;
                    if !t.cols[i].policy.resolved_by_app() {
                        continue;
                    }
                    if let Some(now) = current.as_ref().and_then(|r| r.get(i)) {
                        *v = now.clone();
                    }
                    let later_own = m
                        .cell(i as u32)
                        .is_some_and(|cv| cv.origin == self.me_num && cv.origin_seq > origin_seq);
                    if !later_own && m.cl == rc.cl {
                        m.set_cell(i as u32, new);
                    }
                }
            }
            crate::rows::store(&self.conn, t, &rc.pk, &stored)?;
        }
        // A row left with no cell to set lost all of them to writes the others hold already.
        cs.rows
            .retain(|rc| !matches!(&rc.op, RowOp::Upsert(cells) if cells.is_empty()));
        cs.hlc = hlc;
        cs.base = self.cursor;
        log::rewrite(&self.conn, seq, &cs)?;
        crate::db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
        tracing::info!(
            origin_seq,
            base = self.cursor,
            "change set rebased after a custom-column conflict"
        );
        Ok(true)
    }

    /// Re-stamps this replica's pending change sets from `origin_seq` on, after the relay
    /// refused one as stamped too far ahead of its clock (the device clock ran ahead before
    /// the replica learnt the relay's). Nobody else has seen them, so each gets a fresh HLC
    /// from the corrected clock, above every timestamp received from the relay and every own
    /// earlier one: a local merge they won against a received write (whose HLC is below
    /// that) is still won, so the replica keeps what the others will compute. Returns how
    /// many were re-stamped. Withdrawn ones are re-stamped too: their empty placeholders
    /// still have to be sequenced to keep the device's sequence gap-free.
    pub(crate) fn restamp(&mut self, origin_seq: u64, wall: &dyn WallClock) -> Result<usize> {
        self.materialize_in_tx()?;
        // Own change sets before it keep their stamps (acknowledged, or pending and in order
        // before it): the re-stamped ones must stay above them, or an older write of this
        // device would win over a newer one everywhere else.
        let own_before = log::own_hlc_before(&self.conn, self.me_num, origin_seq)?;
        let pending = log::pending_from(&self.conn, self.me_num, origin_seq)?;
        if pending
            .first()
            .is_none_or(|p| p.cs.origin_seq != origin_seq)
        {
            // Not pending any more (a stale refusal of an old frame): nothing to re-stamp.
            return Ok(0);
        }
        self.clock = HlcState::resume(self.remote_hlc.max(own_before));
        let count = pending.len();
        for log::Pending { seq, mut cs } in pending {
            let hlc = self.clock.tick(wall.now_millis());
            for rc in &cs.rows {
                let t = self.cat.table(&rc.table)?;
                let (me, oseq) = (self.me_num, cs.origin_seq);
                crate::rollback::swap_in_undo(&self.conn, t, &rc.pk, &|m| {
                    m.restamp(me, oseq, hlc)
                })?;
                let Some(mut stored) = crate::rows::load(&self.conn, t, &rc.pk)? else {
                    continue;
                };
                if stored.meta.restamp(me, oseq, hlc) {
                    crate::rows::store(&self.conn, t, &rc.pk, &stored)?;
                }
            }
            cs.hlc = hlc;
            log::rewrite(&self.conn, seq, &cs)?;
        }
        crate::db::meta_set(&self.conn, "hlc", self.clock.last().0 as i64)?;
        tracing::warn!(
            from = origin_seq,
            count,
            "pending change sets re-stamped after a clock-skew refusal"
        );
        Ok(count)
    }
}
