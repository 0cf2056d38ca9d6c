//! Retention: compacting history so that a replica that was away for long downloads about the
//! current state rather than every write ever made.
//!
//! Compaction rewrites change sets at or below a horizon, dropping each cell write that a
//! later change set overwrites for certain: a later `Set` of the same cell, in the same row
//! incarnation (causal length), with a larger `(hlc, origin)`. Such a write can never be the
//! winning value again, whatever order or starting point a replica replays from, so a
//! replica replaying the compacted log from any cursor ends in the same state as one that
//! replayed everything. Row changes left with no cells are dropped; change sets keep their
//! position (and their `(origin, origin_seq)` for deduplication) even when empty, so the
//! stream stays gap-free.
//!
//! What is never dropped: counter additions (each one counts), deletes, row changes of
//! `update_wins` tables (a delete there is decided against every concurrent write of the
//! row, so earlier writes still matter), and anything above the horizon. The compacted
//! prefix followed by the uncompacted tail is the "snapshot + tail" a stale replica receives.

use crate::catalog::RelayCatalog;
use crate::stored::{StoredSet, decode_set, encode_set};
use ferry_core::changeset::{Cell, RowOp};
use ferry_core::hlc::Hlc;
use ferry_core::{DeleteRule, ReplicaId, Value};
use std::collections::HashMap;

type CellKey = (String, Vec<u8>, String);

/// One compaction pass over a store's log, fed newest first: what to rewrite and the report.
#[derive(Debug)]
pub struct Compaction<'a> {
    pruner: Pruner<'a>,
    horizon: u64,
    /// The report so far (`horizon` is the new horizon).
    pub report: CompactReport,
    /// Rewritten change sets and the rows each no longer touches.
    pub rewrites: Vec<(StoredSet, Vec<(String, Value)>)>,
}

impl<'a> Compaction<'a> {
    /// A pass pruning at or below `horizon` of a store compacted up to `old` so far.
    pub fn new(cat: &'a RelayCatalog, horizon: u64, old: u64) -> Self {
        Compaction {
            pruner: Pruner::new(cat),
            horizon,
            report: CompactReport {
                horizon: horizon.max(old),
                ..Default::default()
            },
            rewrites: Vec::new(),
        }
    }

    /// Visits the next older stored body.
    pub fn visit(&mut self, seq: i64, body: &[u8]) -> crate::error::Result<()> {
        self.report.bytes_before += body.len() as u64;
        let s = decode_set(seq, body)?;
        match self.pruner.visit(&s, seq as u64 <= self.horizon) {
            Some(p) => {
                self.report.rewritten += 1;
                self.report.cells_dropped += p.cells_dropped;
                self.report.bytes_after += encode_set(&p.set)?.len() as u64;
                self.rewrites.push((p.set, p.rows_dropped));
            }
            None => self.report.bytes_after += body.len() as u64,
        }
        Ok(())
    }
}

/// Walks the log newest first and prunes superseded cell writes.
#[derive(Debug)]
pub struct Pruner<'a> {
    cat: &'a RelayCatalog,
    later: HashMap<CellKey, Vec<(u64, Hlc, ReplicaId)>>,
}

/// A rewritten change set.
#[derive(Debug)]
pub struct Pruned {
    /// The new stored form.
    pub set: StoredSet,
    /// Cell writes dropped.
    pub cells_dropped: u64,
    /// Rows no longer touched by this change set.
    pub rows_dropped: Vec<(String, Value)>,
}

impl<'a> Pruner<'a> {
    /// A pruner for the relay's tables.
    pub fn new(cat: &'a RelayCatalog) -> Self {
        Pruner {
            cat,
            later: HashMap::new(),
        }
    }

    /// Visits the next older change set. When `prune` is set (it is at or below the horizon)
    /// and something can be dropped, returns its rewritten form.
    pub fn visit(&mut self, s: &StoredSet, prune: bool) -> Option<Pruned> {
        let cs = &s.change_set;
        let me = (cs.hlc, cs.origin);
        let mut out: Option<Pruned> = None;
        if prune {
            let mut rows = Vec::with_capacity(cs.rows.len());
            let mut tags = Vec::with_capacity(s.tags.len());
            let mut dropped = 0u64;
            let mut rows_dropped = Vec::new();
            for (i, rc) in cs.rows.iter().enumerate() {
                let prunable = self
                    .cat
                    .tables
                    .get(&rc.table)
                    .is_some_and(|t| t.delete_rule == DeleteRule::DeleteWins);
                let keep_row = match (&rc.op, prunable) {
                    (RowOp::Upsert(cells), true) if !cells.is_empty() => {
                        let pk = key_bytes(&rc.pk);
                        let kept: Vec<Cell> = cells
                            .iter()
                            .filter(|c| match c {
                                Cell::Set(col, _) => {
                                    let k = (rc.table.clone(), pk.clone(), col.clone());
                                    let superseded = self.later.get(&k).is_some_and(|v| {
                                        v.iter().any(|(cl, h, o)| *cl == rc.cl && (*h, *o) > me)
                                    });
                                    !superseded
                                }
                                Cell::Add(..) => true,
                            })
                            .cloned()
                            .collect();
                        dropped += (cells.len() - kept.len()) as u64;
                        if kept.is_empty() {
                            None
                        } else {
                            let mut r = rc.clone();
                            r.op = RowOp::Upsert(kept);
                            Some(r)
                        }
                    }
                    _ => Some(rc.clone()),
                };
                match keep_row {
                    Some(r) => {
                        rows.push(r);
                        if let Some(t) = s.tags.get(i) {
                            tags.push(t.clone());
                        }
                    }
                    None => rows_dropped.push((rc.table.clone(), rc.pk.clone())),
                }
            }
            if dropped > 0 {
                let mut set = s.clone();
                set.change_set.rows = rows;
                set.tags = tags;
                out = Some(Pruned {
                    set,
                    cells_dropped: dropped,
                    rows_dropped,
                });
            }
        }
        for rc in &cs.rows {
            if let RowOp::Upsert(cells) = &rc.op {
                let pk = key_bytes(&rc.pk);
                for c in cells {
                    if let Cell::Set(col, _) = c {
                        let v = self
                            .later
                            .entry((rc.table.clone(), pk.clone(), col.clone()))
                            .or_default();
                        match v.iter_mut().find(|(cl, _, _)| *cl == rc.cl) {
                            Some(e) => {
                                if me > (e.1, e.2) {
                                    *e = (rc.cl, me.0, me.1);
                                }
                            }
                            None => v.push((rc.cl, me.0, me.1)),
                        }
                    }
                }
            }
        }
        out
    }
}

fn key_bytes(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec(v).unwrap_or_default()
}

/// What compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// New horizon.
    pub horizon: u64,
    /// Change sets rewritten.
    pub rewritten: u64,
    /// Cell writes dropped.
    pub cells_dropped: u64,
    /// Bytes before and after.
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
}
