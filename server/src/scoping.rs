//! Row scopes at the relay: which scope each row is in, decided at push time, and what each
//! receiver may see of a change set, decided at send time.
//!
//! At push time every row change of a table with a scope column is tagged with the row's
//! scope *after* the change, and with the scope it left if the change moved it. The relay
//! tracks each row's current scope with the same rule replicas use to merge the scope column
//! (the highest causal length wins, then the largest `(hlc, origin)`), so the relay and the
//! replicas agree on where a row is. Authorization uses the same tags: writing a row needs
//! write access to the scope it is in and, for a move, to the scope it goes to.
//!
//! At send time a receiver gets the row changes whose scope it may read; a row that moved
//! out of its read scopes is evicted, and a row that moved in comes with its earlier history
//! (backfill) so the receiver gets its full current state.

use crate::auth::Grants;
use crate::catalog::RelayCatalog;
use crate::error::{RelayError, Result};
use ferry_core::changeset::{Cell, ChangeSet, RowOp};
use ferry_core::hlc::Hlc;
use ferry_core::scope::{GLOBAL_SCOPE, scope_name};
use ferry_core::{ReplicaId, TableMode, Value};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The scope of one row change, as stored with the change set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowTag {
    /// The row's scope after the change.
    pub scope: String,
    /// The scope it was in before, when this change moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<String>,
}

/// What the relay remembers of a row of a scoped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowScope {
    /// Causal length of the row's latest incarnation seen.
    pub cl: u64,
    /// Current scope.
    pub scope: String,
    /// Version of the scope column's current value.
    pub hlc: Hlc,
    /// Origin of that value.
    pub origin: ReplicaId,
}

/// Access to tracked row scopes (the store implements it inside its sequencing transaction).
pub trait RowScopes {
    /// The row's tracked scope.
    fn get(&mut self, table: &str, pk: &Value) -> Result<Option<RowScope>>;
}

/// A change set with its row tags, ready to store.
#[derive(Debug, Clone)]
pub struct Tagged {
    /// One tag per row change.
    pub tags: Vec<RowTag>,
    /// New tracked scopes to write.
    pub updates: Vec<(String, Value, RowScope)>,
}

/// Tags each row of `cs` with its scope and checks that `grants` may write it.
pub fn tag(
    cat: &RelayCatalog,
    grants: &Grants,
    cs: &ChangeSet,
    rows: &mut dyn RowScopes,
) -> Result<Tagged> {
    let mut tags = Vec::with_capacity(cs.rows.len());
    let mut overlay: HashMap<(String, Vec<u8>), RowScope> = HashMap::new();
    let mut updates = Vec::new();
    for rc in &cs.rows {
        let t = cat.table(&rc.table)?;
        if t.mode == TableMode::ReadOnly && !grants.is_primary_for(&rc.table) {
            return Err(RelayError::Forbidden(format!(
                "table `{}` is read_only and this token ({}) is not a primary for it",
                rc.table, grants.sub
            )));
        }
        let Some(col) = &t.scope_column else {
            if !grants.can_write(GLOBAL_SCOPE) {
                return Err(RelayError::Forbidden(format!(
                    "table `{}` is in the `{GLOBAL_SCOPE}` scope, which this token ({}) may not write",
                    rc.table, grants.sub
                )));
            }
            tags.push(RowTag {
                scope: GLOBAL_SCOPE.to_owned(),
                moved_from: None,
            });
            continue;
        };
        let key = (rc.table.clone(), pk_key(&rc.pk)?);
        let current = match overlay.get(&key) {
            Some(s) => Some(s.clone()),
            None => rows.get(&rc.table, &rc.pk)?,
        };
        let written = match &rc.op {
            RowOp::Upsert(cells) => cells.iter().find_map(|c| match c {
                Cell::Set(n, v) if n == col => Some(v),
                _ => None,
            }),
            RowOp::Delete => None,
        };
        let update_wins = t.delete_rule == ferry_core::DeleteRule::UpdateWins;
        let next = next_scope(current.as_ref(), rc.cl, written, cs, update_wins);
        let before = current.as_ref().map(|c| c.scope.clone());
        let after = next
            .as_ref()
            .map_or_else(|| GLOBAL_SCOPE.to_owned(), |n| n.scope.clone());
        if after.len() > ferry_core::scope::MAX_SCOPE_BYTES {
            return Err(RelayError::InvalidChangeSet(format!(
                "row `{}` of table `{}` is written into a scope of {} bytes; at most {}",
                pk_text(&rc.pk),
                rc.table,
                after.len(),
                ferry_core::scope::MAX_SCOPE_BYTES
            )));
        }
        if let Some(b) = &before
            && !grants.can_write(b)
        {
            // Naming a scope the token cannot read would tell it where the row lives (often
            // a user id): the refusal then says only that this token may not write the row.
            return Err(RelayError::Forbidden(if grants.can_read(b) {
                format!(
                    "row `{}` of table `{}` is in scope `{b}`, which this token ({}) may not write",
                    pk_text(&rc.pk),
                    rc.table,
                    grants.sub
                )
            } else {
                format!(
                    "row `{}` of table `{}` may not be written with this token ({})",
                    pk_text(&rc.pk),
                    rc.table,
                    grants.sub
                )
            }));
        }
        if !grants.can_write(&after) {
            return Err(RelayError::Forbidden(format!(
                "writing row `{}` of table `{}` into scope `{after}` is outside this token's ({}) write scopes",
                pk_text(&rc.pk),
                rc.table,
                grants.sub
            )));
        }
        let moved_from = match &before {
            Some(b) if *b != after => Some(b.clone()),
            _ => None,
        };
        tags.push(RowTag {
            scope: after,
            moved_from,
        });
        if let Some(n) = next
            && current.as_ref() != Some(&n)
        {
            overlay.insert(key, n.clone());
            updates.push((rc.table.clone(), rc.pk.clone(), n));
        }
    }
    Ok(Tagged { tags, updates })
}

/// The row's tracked scope after a change, by the rules replicas merge with
/// (`ferry_core::apply`): a newer incarnation takes its scope value; the same incarnation takes
/// it when it wins last-writer-wins; in an `update_wins` table an update of the incarnation a
/// concurrent delete removed revives it (and merges like the same incarnation); anything
/// else is stale and keeps the current scope.
fn next_scope(
    current: Option<&RowScope>,
    cl: u64,
    written: Option<&Value>,
    cs: &ChangeSet,
    update_wins: bool,
) -> Option<RowScope> {
    let fresh = |v: Option<&Value>| RowScope {
        cl,
        scope: v.map_or_else(|| GLOBAL_SCOPE.to_owned(), scope_name),
        hlc: cs.hlc,
        origin: cs.origin,
    };
    match current {
        None => Some(match written {
            Some(v) => fresh(Some(v)),
            None => RowScope {
                cl,
                scope: GLOBAL_SCOPE.to_owned(),
                hlc: Hlc(0),
                origin: ReplicaId([0; 16]),
            },
        }),
        Some(c) if cl > c.cl && cl % 2 == 1 => match written {
            Some(v) => Some(fresh(Some(v))),
            // A newer incarnation without the scope column keeps the row where it was.
            None => Some(RowScope { cl, ..c.clone() }),
        },
        Some(c) if cl > c.cl => Some(RowScope { cl, ..c.clone() }),
        Some(c) if cl == c.cl => match written {
            Some(v) if (cs.hlc, cs.origin) > (c.hlc, c.origin) => Some(fresh(Some(v))),
            _ => Some(c.clone()),
        },
        Some(c) if update_wins && cl % 2 == 1 && c.cl % 2 == 0 && cl + 1 == c.cl => {
            let revived = RowScope { cl, ..c.clone() };
            match written {
                Some(v) if (cs.hlc, cs.origin) > (c.hlc, c.origin) => Some(fresh(Some(v))),
                _ => Some(revived),
            }
        }
        Some(c) => Some(c.clone()),
    }
}

/// A primary key's stable byte form (for maps and store keys).
pub fn pk_key(pk: &Value) -> Result<Vec<u8>> {
    rmp_serde::to_vec(pk).map_err(|e| RelayError::InvalidChangeSet(format!("bad key: {e}")))
}

fn pk_text(pk: &Value) -> String {
    match pk {
        Value::Text(s) => s.clone(),
        other => other.describe(),
    }
}
