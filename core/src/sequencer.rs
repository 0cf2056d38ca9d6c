//! An in-memory sequencer: the relay's ordering rules without I/O, for tests and simulation.
//!
//! It assigns gap-free `server_seq` in arrival order, is idempotent on
//! `(origin, origin_seq)`, refuses per-origin gaps and origin reuse, and answers the sync
//! protocol so [`crate::sync::SyncClient`] can be driven against it. Given the schema
//! ([`Sequencer::with_schema`]) it also runs the relay's compare-and-set check ([`crate::cas`])
//! and grants leases ([`crate::lease`]) on its `now_ms` clock.

use crate::cas::{self, MemIndex};
use crate::changeset::{ChangeSet, Sequenced};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::lease::{self, LeaseState};
use crate::protocol::{
    Ack, ClientMsg, ErrorCode, LeaseOutcome, Limits, PROTOCOL_VERSION, ServerMsg,
};
use crate::schema::{Schema, TableDecl};
use std::collections::HashMap;

/// Why the sequencer refused a change set (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol code.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
    /// For a compare-and-set conflict, the unseen change's position.
    pub conflict_seq: u64,
}

/// Per-origin bookkeeping.
#[derive(Debug, Default)]
struct OriginLog {
    /// server_seq and id of each origin_seq (index = origin_seq - 1).
    seqs: Vec<(u64, [u8; 16])>,
}

/// The in-memory relay log.
#[derive(Debug, Default)]
pub struct Sequencer {
    log: Vec<Sequenced>,
    origins: HashMap<ReplicaId, OriginLog>,
    /// Wall clock reported at hello, and the clock leases expire by.
    pub now_ms: u64,
    tables: HashMap<String, TableDecl>,
    cas: MemIndex,
    leases: HashMap<String, LeaseState>,
}

/// State of one in-memory connection.
#[derive(Debug, Default)]
pub struct Session {
    replica: Option<ReplicaId>,
    sent_up_to: u64,
}

impl Sequencer {
    /// An empty log.
    pub fn new() -> Self {
        Sequencer::default()
    }

    /// A sequencer that knows the app's tables, so it checks `server_checked` tables and
    /// `custom` columns like the relay does.
    pub fn with_schema(schema: &Schema) -> Self {
        Sequencer {
            tables: schema
                .tables
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            ..Sequencer::default()
        }
    }

    /// Sequences one change set, or refuses it like the relay would (compare-and-set
    /// conflict, stale fence) without storing anything. Errors are protocol violations.
    pub fn push_checked(&mut self, cs: ChangeSet) -> Result<std::result::Result<u64, Refusal>> {
        let known = self
            .origins
            .get(&cs.origin)
            .and_then(|o| o.seqs.get((cs.origin_seq as usize).wrapping_sub(1)))
            .is_some();
        if known || cs.origin_seq == 0 {
            return self.push(cs).map(Ok);
        }
        if let Some(f) = &cs.fence
            && let Err(message) = lease::check_fence(
                self.now_ms,
                self.leases.get(&f.lease).copied(),
                f,
                cs.origin,
            )
        {
            return Ok(Err(Refusal {
                code: ErrorCode::Fenced,
                message,
                conflict_seq: 0,
            }));
        }
        let tables = &self.tables;
        let updates = match cas::check(|t| tables.get(t), &cs, &mut self.cas)? {
            Ok(u) => u,
            Err(c) => {
                return Ok(Err(Refusal {
                    code: ErrorCode::Conflict,
                    message: c.to_string(),
                    conflict_seq: c.seq,
                }));
            }
        };
        let origin = cs.origin;
        let seq = self.push(cs)?;
        self.cas.record(&updates, seq, origin);
        Ok(Ok(seq))
    }

    /// Highest position assigned.
    pub fn head(&self) -> u64 {
        self.log.len() as u64
    }

    /// Sequences one change set; returns its position (the existing one for a retry).
    pub fn push(&mut self, cs: ChangeSet) -> Result<u64> {
        let next = self.log.len() as u64 + 1;
        let o = self.origins.entry(cs.origin).or_default();
        let oseq = cs.origin_seq;
        if oseq == 0 {
            return Err(Error::InvalidChangeSet("origin_seq starts at 1".into()));
        }
        if let Some((s, id)) = o.seqs.get(oseq as usize - 1) {
            if *id != cs.id {
                return Err(Error::InvalidChangeSet(format!(
                    "origin {} reused origin_seq {oseq} for a different change set",
                    cs.origin
                )));
            }
            return Ok(*s);
        }
        if oseq != o.seqs.len() as u64 + 1 {
            return Err(Error::InvalidChangeSet(format!(
                "origin {} skipped from origin_seq {} to {oseq}",
                cs.origin,
                o.seqs.len()
            )));
        }
        o.seqs.push((next, cs.id));
        self.log.push(Sequenced {
            server_seq: next,
            change_set: cs,
        });
        Ok(next)
    }

    /// Change sets after `cursor`, at most `max`, and the position they cover up to.
    pub fn changes_after(&self, cursor: u64, max: usize) -> (Vec<Sequenced>, u64) {
        let start = (cursor as usize).min(self.log.len());
        let end = start.saturating_add(max).min(self.log.len());
        (self.log[start..end].to_vec(), end as u64)
    }

    /// Highest origin_seq held for an origin.
    pub fn max_origin_seq(&self, origin: &ReplicaId) -> u64 {
        self.origins.get(origin).map_or(0, |o| o.seqs.len() as u64)
    }

    /// A new connection.
    pub fn session(&self) -> Session {
        Session::default()
    }

    /// Answers one client frame (including every change the session has not yet been sent).
    pub fn handle(&mut self, session: &mut Session, msg: ClientMsg) -> Vec<ServerMsg> {
        let mut out = Vec::new();
        match msg {
            ClientMsg::Hello {
                protocol,
                replica_id,
                cursor,
                ..
            } => {
                if protocol != PROTOCOL_VERSION {
                    return vec![ServerMsg::Error {
                        code: ErrorCode::UnsupportedVersion,
                        message: format!("protocol {protocol} is not supported"),
                    }];
                }
                session.replica = Some(replica_id);
                session.sent_up_to = cursor.min(self.head());
                out.push(ServerMsg::Welcome {
                    protocol: PROTOCOL_VERSION,
                    head: self.head(),
                    server_time_ms: self.now_ms,
                    max_origin_seq: self.max_origin_seq(&replica_id),
                    limits: Limits::default(),
                    horizon: 0,
                });
            }
            ClientMsg::Push { change_sets } => {
                let mut acks = Vec::new();
                for cs in change_sets {
                    if Some(cs.origin) != session.replica {
                        out.push(ServerMsg::Error {
                            code: ErrorCode::InvalidChangeSet,
                            message: "change set origin is not this connection's replica".into(),
                        });
                        return out;
                    }
                    let oseq = cs.origin_seq;
                    match self.push_checked(cs) {
                        Ok(Ok(s)) => acks.push(Ack {
                            origin_seq: oseq,
                            server_seq: s,
                        }),
                        Ok(Err(r)) => {
                            out.push(ServerMsg::Acks { acks });
                            out.push(ServerMsg::Refused {
                                origin_seq: oseq,
                                code: r.code,
                                message: r.message,
                                conflict_seq: r.conflict_seq,
                            });
                            acks = Vec::new();
                            break;
                        }
                        Err(e) => {
                            // Like the relay: a refusal, and the connection stays open.
                            out.push(ServerMsg::Acks { acks });
                            out.push(ServerMsg::Refused {
                                origin_seq: oseq,
                                code: if e.to_string().contains("reused") {
                                    ErrorCode::OriginReused
                                } else {
                                    ErrorCode::InvalidChangeSet
                                },
                                message: e.to_string(),
                                conflict_seq: 0,
                            });
                            acks = Vec::new();
                            break;
                        }
                    }
                }
                if !acks.is_empty() {
                    out.push(ServerMsg::Acks { acks });
                }
            }
            ClientMsg::Lease { nonce, request } => {
                let Some(holder) = session.replica else {
                    return vec![ServerMsg::Error {
                        code: ErrorCode::BadFrame,
                        message: "lease before hello".into(),
                    }];
                };
                if let Err(e) = lease::validate(&request) {
                    return vec![ServerMsg::Error {
                        code: ErrorCode::BadFrame,
                        message: e.to_string(),
                    }];
                }
                let name = match &request {
                    crate::protocol::LeaseRequest::Acquire { name, .. }
                    | crate::protocol::LeaseRequest::Renew { name, .. }
                    | crate::protocol::LeaseRequest::Release { name, .. } => name.clone(),
                };
                let (outcome, next): (LeaseOutcome, _) = lease::decide(
                    self.now_ms,
                    self.leases.get(&name).copied(),
                    holder,
                    &request,
                );
                if let Some(n) = next {
                    self.leases.insert(name, n);
                }
                out.push(ServerMsg::Lease { nonce, outcome });
            }
            ClientMsg::Ping { nonce } => out.push(ServerMsg::Pong {
                nonce,
                head: self.head(),
            }),
            ClientMsg::Checksum { .. } => out.push(ServerMsg::Error {
                code: ErrorCode::Internal,
                message: "the in-memory sequencer keeps no state to checksum".into(),
            }),
        }
        if session.replica.is_some() && session.sent_up_to < self.head() {
            let (sets, up_to) = self.changes_after(session.sent_up_to, usize::MAX);
            out.push(ServerMsg::Changes {
                after: session.sent_up_to,
                up_to,
                change_sets: sets,
                head: self.head(),
                moves: Vec::new(),
            });
            session.sent_up_to = up_to;
        }
        out
    }
}
