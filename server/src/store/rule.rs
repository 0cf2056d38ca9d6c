//! The sequencing rule every store applies to one pushed change set, kept apart from SQL.
//!
//! Both stores run it inside their sequencing transaction, after reading what it needs: the
//! change set already stored under the same `(origin, origin_seq)` if any, the origin's
//! highest `origin_seq`, the tracked scopes and compare-and-set stamps of the rows it
//! touches, and the lease it is fenced by. The SQLite store reads these row by row through
//! the [`RowScopes`] and [`CasIndex`] traits; the PostgreSQL store fetches them for the whole
//! change set in one pipelined round trip and hands them over as maps ([`Fetched`]). Keeping
//! the decision here means the two stores cannot drift apart on what they accept.
//!
//! The order of the checks is part of the contract (the first failing one names the error):
//! idempotent retry → origin reuse → origin gap → scopes and write grants → fence → compare-and-set.

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::error::{RelayError, Result};
use crate::scoping::{self, RowScope, RowScopes, RowTag};
use ferry_core::cas::{self, CasIndex, CasUpdate, CellStamp, RowStamp};
use ferry_core::lease::{self, LeaseState};
use ferry_core::{ChangeSet, Value};
use std::collections::HashMap;

/// What the store knows about a change set's origin before deciding.
#[derive(Debug, Clone, Default)]
pub struct OriginState {
    /// `(server_seq, id)` of the change set stored under the same `(origin, origin_seq)`.
    pub existing: Option<(u64, Vec<u8>)>,
    /// Highest `origin_seq` stored for the origin (0 if none).
    pub max_seq: u64,
}

/// What to do with a change set.
#[derive(Debug)]
pub enum Decision {
    /// A retry of a change set stored at this position.
    Existing(u64),
    /// Refused; store nothing.
    Refused(RelayError),
    /// Store it, with these tags, scope updates and stamps.
    Accept(Accepted),
}

/// The writes an accepted change set causes.
#[derive(Debug)]
pub struct Accepted {
    /// One tag per row change.
    pub tags: Vec<RowTag>,
    /// Tracked row scopes to write.
    pub scopes: Vec<(String, Value, RowScope)>,
    /// Compare-and-set stamps to record.
    pub stamps: Vec<CasUpdate>,
}

/// Decides one change set. `fence_lease` is the current state of the lease named by
/// `cs.fence` (ignored when the change set is not fenced); `now_ms` is the store's clock.
/// Store failures are errors; refusals are [`Decision::Refused`].
#[allow(clippy::too_many_arguments)]
pub fn decide(
    cat: &RelayCatalog,
    grants: &Grants,
    cs: &ChangeSet,
    origin: &OriginState,
    rows: &mut dyn RowScopes,
    fence_lease: Option<LeaseState>,
    now_ms: u64,
    stamps: &mut dyn CasIndex,
) -> Result<Decision> {
    if let Some((seq, id)) = &origin.existing {
        if id.as_slice() == cs.id.as_slice() {
            return Ok(Decision::Existing(*seq));
        }
        return Ok(Decision::Refused(RelayError::OriginReused(format!(
            "origin {} already used origin_seq {} for a different change set (a restored or copied replica must take a new id)",
            cs.origin, cs.origin_seq
        ))));
    }
    if cs.origin_seq != origin.max_seq + 1 {
        return Ok(Decision::Refused(RelayError::InvalidChangeSet(format!(
            "origin {} sent origin_seq {} but the relay holds up to {}: change sets must arrive in order without gaps",
            cs.origin, cs.origin_seq, origin.max_seq
        ))));
    }
    let tagged = match scoping::tag(cat, grants, cs, rows) {
        Ok(t) => t,
        Err(e @ (RelayError::Store(_) | RelayError::Io(_) | RelayError::Core(_))) => {
            return Err(e);
        }
        Err(e) => return Ok(Decision::Refused(e)),
    };
    if let Some(f) = &cs.fence
        && let Err(m) = lease::check_fence(now_ms, fence_lease, f, cs.origin)
    {
        return Ok(Decision::Refused(RelayError::Fenced(m)));
    }
    let updates = match cas::check(|t| cat.tables.get(t).map(|t| &t.decl), cs, stamps)? {
        Ok(u) => u,
        Err(c) => {
            return Ok(Decision::Refused(RelayError::Conflict {
                message: c.to_string(),
                seq: c.seq,
            }));
        }
    };
    Ok(Decision::Accept(Accepted {
        tags: tagged.tags,
        scopes: tagged.updates,
        stamps: updates,
    }))
}

/// `(table, pk key)` of every row of `cs` in a table with a scope column: the rows whose
/// history is indexed for backfill.
pub fn history_keys(cat: &RelayCatalog, cs: &ChangeSet) -> Result<Vec<RowKey>> {
    let mut out = Vec::new();
    for rc in &cs.rows {
        let scoped = cat
            .tables
            .get(&rc.table)
            .is_some_and(|t| t.scope_column.is_some());
        if scoped {
            out.push((rc.table.clone(), scoping::pk_key(&rc.pk)?));
        }
    }
    Ok(out)
}

/// `(table, pk key)` of every row of `cs`, without repeats.
pub fn row_keys(cs: &ChangeSet) -> Result<Vec<RowKey>> {
    let mut out: Vec<RowKey> = Vec::with_capacity(cs.rows.len());
    for rc in &cs.rows {
        let k = (rc.table.clone(), scoping::pk_key(&rc.pk)?);
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// A row's identity in the store's tables: `(table, pk key)`.
pub type RowKey = (String, Vec<u8>);

/// Row scopes and compare-and-set stamps fetched ahead for the rows of one change set. A
/// row it does not hold has none (the fetch covered every row of the change set).
#[derive(Debug, Default)]
pub struct Fetched {
    /// Tracked scopes.
    pub scopes: HashMap<RowKey, RowScope>,
    /// Row stamps.
    pub rows: HashMap<RowKey, RowStamp>,
    /// Cell stamps.
    pub cells: HashMap<RowKey, Vec<(String, CellStamp)>>,
}

fn key_of(table: &str, pk: &Value) -> Result<RowKey> {
    Ok((table.to_owned(), scoping::pk_key(pk)?))
}

impl RowScopes for Fetched {
    fn get(&mut self, table: &str, pk: &Value) -> Result<Option<RowScope>> {
        Ok(self.scopes.get(&key_of(table, pk)?).cloned())
    }
}

impl CasIndex for Fetched {
    fn row(&mut self, table: &str, pk: &Value) -> ferry_core::Result<Option<RowStamp>> {
        let k =
            key_of(table, pk).map_err(|e| ferry_core::Error::InvalidChangeSet(e.to_string()))?;
        Ok(self.rows.get(&k).copied())
    }

    fn cells(&mut self, table: &str, pk: &Value) -> ferry_core::Result<Vec<(String, CellStamp)>> {
        let k =
            key_of(table, pk).map_err(|e| ferry_core::Error::InvalidChangeSet(e.to_string()))?;
        Ok(self.cells.get(&k).cloned().unwrap_or_default())
    }
}
