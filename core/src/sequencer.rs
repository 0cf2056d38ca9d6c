//! An in-memory sequencer: the relay's ordering rules without I/O, for tests and simulation.
//!
//! It assigns gap-free `server_seq` in arrival order, is idempotent on
//! `(origin, origin_seq)`, refuses per-origin gaps and origin reuse, and answers the sync
//! protocol so [`crate::sync::SyncClient`] can be driven against it. Given the schema
//! ([`Sequencer::with_schema`]) it also runs the relay's compare-and-set check ([`crate::cas`])
//! and grants leases ([`crate::lease`]) on its `now_ms` clock.

use crate::admission::{self, Bounds, Decision, Ledger, OriginState};
use crate::cas::{self, CasConflict, CasUpdate, MemIndex};
use crate::changeset::{ChangeSet, Sequenced};
use crate::error::{Error, Result};
use crate::ids::ReplicaId;
use crate::lease::{self, LeaseState};
use crate::protocol::{
    Ack, ClientMsg, ErrorCode, LeaseOutcome, LeaseRequest, Limits, PROTOCOL_VERSION, ServerMsg,
};
use crate::schema::{Schema, TableDecl};
use std::collections::HashMap;

pub use crate::admission::Refusal;

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

    /// Sequences one change set, or refuses it like the relay would (the one admission
    /// rule, [`admission::admit`]; no size or skew limit) without storing anything. Errors
    /// are failures of the sequencer itself.
    pub fn push_checked(&mut self, cs: ChangeSet) -> Result<std::result::Result<u64, Refusal>> {
        self.push_bounded(cs, &Bounds::NONE)
    }

    /// [`Sequencer::push_checked`] within `bounds` (size, clock skew).
    pub fn push_bounded(
        &mut self,
        cs: ChangeSet,
        bounds: &Bounds,
    ) -> Result<std::result::Result<u64, Refusal>> {
        let o = self.origins.get(&cs.origin);
        let origin = OriginState {
            existing: o.and_then(|o| {
                o.seqs
                    .get((cs.origin_seq as usize).wrapping_sub(1))
                    .copied()
            }),
            max_seq: o.map_or(0, |o| o.seqs.len() as u64),
        };
        let mut ledger = MemLedger {
            tables: &self.tables,
            cas: &mut self.cas,
            leases: &self.leases,
            now_ms: self.now_ms,
        };
        let stamps = match admission::admit(&cs, &origin, bounds, &mut ledger)? {
            Decision::Existing(seq) => return Ok(Ok(seq)),
            Decision::Refused(r) => return Ok(Err(r)),
            Decision::Accept { stamps, .. } => stamps,
        };
        let next = self.log.len() as u64 + 1;
        let origin = cs.origin;
        self.origins
            .entry(origin)
            .or_default()
            .seqs
            .push((next, cs.id));
        self.log.push(Sequenced {
            server_seq: next,
            change_set: cs,
        });
        self.cas.record(&stamps, next, origin);
        Ok(Ok(next))
    }

    /// Decides a (validated) lease request by `holder` on the `now_ms` clock.
    pub fn lease(&mut self, holder: ReplicaId, request: &LeaseRequest) -> LeaseOutcome {
        let name = match request {
            LeaseRequest::Acquire { name, .. }
            | LeaseRequest::Renew { name, .. }
            | LeaseRequest::Release { name, .. } => name.clone(),
        };
        let (outcome, next) = lease::decide(
            self.now_ms,
            self.leases.get(&name).copied(),
            0,
            holder,
            request,
        );
        if let Some(n) = next {
            self.leases.insert(name, n);
        }
        outcome
    }

    /// Highest position assigned.
    pub fn head(&self) -> u64 {
        self.log.len() as u64
    }

    /// Sequences one change set; returns its position (the existing one for a retry), or
    /// [`Error::Refused`] when the admission rule refuses it.
    pub fn push(&mut self, cs: ChangeSet) -> Result<u64> {
        self.push_checked(cs)?.map_err(|r| Error::Refused {
            code: r.code,
            message: r.message,
        })
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
                    snapshot: false,
                    scopes: None,
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
                            out.push(ServerMsg::Acks { acks });
                            out.push(ServerMsg::Error {
                                code: ErrorCode::Internal,
                                message: e.to_string(),
                            });
                            return out;
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
                let outcome = self.lease(holder, &request);
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

/// The in-memory sequencer's side of the admission rule.
struct MemLedger<'a> {
    tables: &'a HashMap<String, TableDecl>,
    cas: &'a mut MemIndex,
    leases: &'a HashMap<String, LeaseState>,
    now_ms: u64,
}

impl Ledger for MemLedger<'_> {
    type Authorized = ();
    type Refused = Refusal;
    type Error = Error;

    fn table(&self, name: &str) -> std::result::Result<Option<&TableDecl>, Refusal> {
        if self.tables.is_empty() {
            return Ok(None);
        }
        self.tables.get(name).map(Some).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidChangeSet,
                format!("table `{name}` is not in the relay's schema"),
            )
        })
    }

    fn authorize(&mut self, _cs: &ChangeSet) -> Result<std::result::Result<(), Refusal>> {
        Ok(Ok(()))
    }

    fn lease(&mut self, name: &str) -> Result<(Option<LeaseState>, u64)> {
        Ok((self.leases.get(name).copied(), self.now_ms))
    }

    fn compare_and_set(
        &mut self,
        cs: &ChangeSet,
    ) -> Result<std::result::Result<Vec<CasUpdate>, CasConflict>> {
        let tables = self.tables;
        cas::check(|t| tables.get(t), cs, self.cas)
    }
}
