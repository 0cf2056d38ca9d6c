//! The admission rule: whether a pushed change set is sequenced, and if not, why.
//!
//! One function, [`admit`], decides for every party that sequences change sets — the
//! relay's SQLite and PostgreSQL stores (inside their sequencing transaction) and the
//! in-memory [`crate::sequencer::Sequencer`] of tests and simulation — so they cannot drift
//! apart on what they accept or on which refusal a change set with several faults gets. The
//! deciding party supplies what only it knows through [`Ledger`]: the declarations of its
//! tables, the scopes and grants it enforces, the leases it grants and its compare-and-set
//! stamps. The order of the checks is part of the contract (the first failing one names the
//! refusal):
//!
//! 1. **retry** — the same change set is already stored under its `(origin, origin_seq)`:
//!    answered with its position, nothing else is checked (it was admitted once);
//! 2. **origin reuse** — a different change set is stored there (a restored or copied
//!    replica must take a new id);
//! 3. **gap** — `origin_seq` is not the origin's next one;
//! 4. **size, clock skew, validation** — the change set itself: at most `max_ops` cell
//!    operations, stamped no further ahead of the decider's clock than the allowed skew,
//!    every row naming a declared table and well formed for it;
//! 5. **scopes and grants** — the writer may write every row it touches (the relay's
//!    business; the in-memory sequencer grants everything);
//! 6. **fence** — a lease-guarded change set's grant is still the lease's current one;
//! 7. **compare-and-set** — no unseen change touched its checked cells (see [`crate::cas`]).

use crate::cas::{CasConflict, CasUpdate};
use crate::changeset::{ChangeSet, check_row_change};
use crate::lease::{self, LeaseState};
use crate::protocol::ErrorCode;
use crate::schema::TableDecl;

/// Why a change set was refused (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol code.
    pub code: ErrorCode,
    /// What was wrong.
    pub message: String,
    /// For a compare-and-set conflict, the unseen change's position.
    pub conflict_seq: u64,
}

impl Refusal {
    /// A refusal without a conflict position.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            conflict_seq: 0,
        }
    }
}

impl From<CasConflict> for Refusal {
    fn from(c: CasConflict) -> Self {
        Refusal {
            code: ErrorCode::Conflict,
            message: c.to_string(),
            conflict_seq: c.seq,
        }
    }
}

/// What the decider knows about the change set's origin before deciding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginState {
    /// `(server_seq, id)` of the change set stored under the same `(origin, origin_seq)`.
    pub existing: Option<(u64, [u8; 16])>,
    /// Highest `origin_seq` stored for the origin (0 if none).
    pub max_seq: u64,
}

/// Bounds on the change set itself: its size, and how far ahead of the decider's clock it may
/// be stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The decider's wall clock (ms since the epoch) the skew is measured against.
    pub now_ms: u64,
    /// How far ahead of `now_ms` a change set may be stamped.
    pub max_clock_skew_ms: u64,
    /// Most cell operations in one change set.
    pub max_ops: usize,
}

impl Bounds {
    /// No size or skew limit (tests that exercise other rules).
    pub const NONE: Bounds = Bounds {
        now_ms: 0,
        max_clock_skew_ms: u64::MAX,
        max_ops: usize::MAX,
    };
}

/// What the deciding party supplies to [`admit`].
pub trait Ledger {
    /// What authorizing a change set yields for storing it (the relay's row tags).
    type Authorized;
    /// The decider's refusal type (a core [`Refusal`] converts into it).
    type Refused: From<Refusal>;
    /// The decider's failure type (its store failed; not a refusal).
    type Error: From<crate::Error>;

    /// The declaration of a synced table, `Err` with a refusal when the decider does not
    /// sync it, `Ok(None)` when the decider checks no declarations (an in-memory sequencer
    /// made without a schema).
    fn table(&self, name: &str) -> Result<Option<&TableDecl>, Refusal>;

    /// Checks that the change set's writer may write every row it touches.
    fn authorize(
        &mut self,
        cs: &ChangeSet,
    ) -> Result<Result<Self::Authorized, Self::Refused>, Self::Error>;

    /// The lease named `name`, and the clock (ms) its expiry is judged by.
    fn lease(&mut self, name: &str) -> Result<(Option<LeaseState>, u64), Self::Error>;

    /// Runs the compare-and-set check ([`crate::cas::check`]) against the decider's stamps.
    fn compare_and_set(
        &mut self,
        cs: &ChangeSet,
    ) -> Result<Result<Vec<CasUpdate>, CasConflict>, Self::Error>;
}

/// What to do with a change set.
#[derive(Debug)]
pub enum Decision<A, R> {
    /// A retry of the change set stored at this position.
    Existing(u64),
    /// Refused; store nothing.
    Refused(R),
    /// Store it.
    Accept {
        /// What authorizing it yielded.
        authorized: A,
        /// Compare-and-set stamps to record with it.
        stamps: Vec<CasUpdate>,
    },
}

/// Decides one pushed change set (see the module docs for the order of the checks).
/// Failures of the decider are errors; refusals are [`Decision::Refused`].
pub fn admit<L: Ledger>(
    cs: &ChangeSet,
    origin: &OriginState,
    limits: &Bounds,
    ledger: &mut L,
) -> Result<Decision<L::Authorized, L::Refused>, L::Error> {
    let refuse = |code, message: String| Ok(Decision::Refused(Refusal::new(code, message).into()));
    if let Some((seq, id)) = &origin.existing {
        if *id == cs.id {
            return Ok(Decision::Existing(*seq));
        }
        return refuse(
            ErrorCode::OriginReused,
            format!(
                "origin {} already used origin_seq {} for a different change set (a restored or copied replica must take a new id)",
                cs.origin, cs.origin_seq
            ),
        );
    }
    if cs.origin_seq != origin.max_seq.saturating_add(1) {
        return refuse(
            ErrorCode::InvalidChangeSet,
            format!(
                "origin {} sent origin_seq {} but the relay holds up to {}: change sets must arrive in order without gaps",
                cs.origin, cs.origin_seq, origin.max_seq
            ),
        );
    }
    let ops = cs.op_count();
    if ops > limits.max_ops {
        return refuse(
            ErrorCode::TooLarge,
            format!(
                "change set {} has {ops} cell operations; the limit is {}",
                cs.origin_seq, limits.max_ops
            ),
        );
    }
    let horizon = limits.now_ms.saturating_add(limits.max_clock_skew_ms);
    if cs.hlc.millis() > horizon {
        return refuse(
            ErrorCode::ClockSkew,
            format!(
                "change set {} is stamped {} ms ahead of the relay's clock; the limit is {} ms",
                cs.origin_seq,
                cs.hlc.millis().saturating_sub(limits.now_ms),
                limits.max_clock_skew_ms
            ),
        );
    }
    for rc in &cs.rows {
        match ledger.table(&rc.table) {
            Err(r) => return Ok(Decision::Refused(r.into())),
            Ok(None) => {}
            Ok(Some(decl)) => {
                if let Err(e) = check_row_change(decl, rc) {
                    return refuse(ErrorCode::InvalidChangeSet, e.to_string());
                }
            }
        }
    }
    let authorized = match ledger.authorize(cs)? {
        Ok(a) => a,
        Err(r) => return Ok(Decision::Refused(r)),
    };
    if let Some(f) = &cs.fence {
        let (state, now_ms) = ledger.lease(&f.lease)?;
        if let Err(m) = lease::check_fence(now_ms, state, f, cs.origin) {
            return refuse(ErrorCode::Fenced, m);
        }
    }
    match ledger.compare_and_set(cs)? {
        Ok(stamps) => Ok(Decision::Accept { authorized, stamps }),
        Err(c) => Ok(Decision::Refused(Refusal::from(c).into())),
    }
}
