//! The relay's side of the admission rule, kept apart from SQL.
//!
//! Whether a change set is sequenced is decided by one function for every party that
//! sequences, [`ferry_core::admission::admit`] (its module docs give the order of the
//! checks). Both stores call [`decide`] inside their sequencing transaction, after reading
//! what the rule needs: the change set already stored under the same `(origin, origin_seq)`
//! if any, the origin's highest `origin_seq`, the tracked scopes and compare-and-set stamps of
//! the rows it touches, and the lease it is fenced by. The SQLite store reads these row by
//! row through the [`RowScopes`] and [`CasIndex`] traits; the PostgreSQL store fetches them
//! for the whole change set in one pipelined round trip and hands them over as maps
//! ([`Fetched`]). What the relay adds to the core rule is its catalog and its scopes and
//! write grants ([`scoping::tag`]).

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::error::{RelayError, Result};
use crate::scoping::{self, RowScope, RowScopes, RowTag, Tagged};
use ferry_core::admission::{self, Bounds, Ledger, OriginState, Refusal};
use ferry_core::cas::{self, CasConflict, CasIndex, CasUpdate, CellStamp, RowStamp};
use ferry_core::lease::LeaseState;
use ferry_core::protocol::ErrorCode;
use ferry_core::schema::TableDecl;
use ferry_core::{ChangeSet, Value};
use std::collections::HashMap;

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

/// What the relay knows when deciding one change set.
pub struct Context<'a> {
    /// The relay's tables.
    pub cat: &'a RelayCatalog,
    /// The pushing connection's grants.
    pub grants: &'a Grants,
    /// Tracked row scopes.
    pub rows: &'a mut dyn RowScopes,
    /// The lease named by the change set's fence (ignored when it is not fenced).
    pub fence_lease: Option<LeaseState>,
    /// The store's clock, which leases expire by.
    pub now_ms: u64,
    /// Compare-and-set stamps.
    pub stamps: &'a mut dyn CasIndex,
}

impl Ledger for Context<'_> {
    type Authorized = Tagged;
    type Refused = RelayError;
    type Error = RelayError;

    fn table(&self, name: &str) -> std::result::Result<Option<&TableDecl>, Refusal> {
        match self.cat.tables.get(name) {
            Some(t) => Ok(Some(&t.decl)),
            None => Err(Refusal::new(
                ErrorCode::InvalidChangeSet,
                format!("table `{name}` is not in the relay's schema"),
            )),
        }
    }

    fn authorize(&mut self, cs: &ChangeSet) -> Result<std::result::Result<Tagged, RelayError>> {
        match scoping::tag(self.cat, self.grants, cs, self.rows) {
            Ok(t) => Ok(Ok(t)),
            Err(e) if e.code() == ErrorCode::Internal => Err(e),
            Err(e) => Ok(Err(e)),
        }
    }

    fn lease(&mut self, _name: &str) -> Result<(Option<LeaseState>, u64)> {
        Ok((self.fence_lease, self.now_ms))
    }

    fn compare_and_set(
        &mut self,
        cs: &ChangeSet,
    ) -> Result<std::result::Result<Vec<CasUpdate>, CasConflict>> {
        let cat = self.cat;
        Ok(cas::check(
            |t| cat.tables.get(t).map(|t| &t.decl),
            cs,
            self.stamps,
        )?)
    }
}

/// Decides one change set by the admission rule. Store failures are errors; refusals are
/// [`Decision::Refused`].
pub fn decide(
    cs: &ChangeSet,
    origin: &OriginState,
    bounds: &Bounds,
    cx: &mut Context<'_>,
) -> Result<Decision> {
    Ok(match admission::admit(cs, origin, bounds, cx)? {
        admission::Decision::Existing(seq) => Decision::Existing(seq),
        admission::Decision::Refused(e) => Decision::Refused(e),
        admission::Decision::Accept { authorized, stamps } => Decision::Accept(Accepted {
            tags: authorized.tags,
            scopes: authorized.updates,
            stamps,
        }),
    })
}

/// The stored id of a change set as the admission rule compares it.
pub fn stored_id(id: &[u8]) -> Result<[u8; 16]> {
    id.try_into()
        .map_err(|_| RelayError::Store("a stored change set id is not 16 bytes".into()))
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
