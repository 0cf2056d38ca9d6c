//! State checksums: a digest of the rows a replica holds, so that it can prove it holds
//! exactly what the relay says it should.
//!
//! The digest is SHA-256 over every row of the synced tables that pass a scope filter, in a
//! canonical order (tables by name, rows by primary key as SQLite orders them, columns by
//! name), each row encoded as MessagePack `(table, [(column, value)…])`. Column names rather
//! than positions are hashed because a table upgraded in place and one created fresh at the
//! latest schema version may order their columns differently. Two replicas at the same relay
//! position, with nothing pending and the same schema version, have equal digests exactly
//! when their rows are equal; the relay computes the same function over its own materialized
//! state.

use crate::error::Result;
use crate::schema::quote;
use crate::scope::{GLOBAL_SCOPE, scope_name};
use crate::tables::Tables;
use crate::value::Value;
use rusqlite::Connection;
use sha2::{Digest, Sha256};

/// A digest of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChecksum {
    /// SHA-256 over the rows.
    pub digest: [u8; 32],
    /// Number of rows summed.
    pub rows: u64,
}

impl StateChecksum {
    /// Lowercase hex of the digest.
    pub fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Sums the rows of every synced table whose scope passes `keep(table, scope)`.
pub fn compute(
    conn: &Connection,
    cat: &Tables,
    keep: &dyn Fn(&str, &str) -> bool,
) -> Result<StateChecksum> {
    let mut names: Vec<&String> = cat.tables.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    let mut rows = 0u64;
    for name in names {
        let t = cat.table(name)?;
        let mut cols: Vec<(usize, &str)> = t
            .cols
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.name.as_str()))
            .collect();
        cols.sort_by(|a, b| a.1.cmp(b.1));
        let scope_col = t
            .decl
            .scope_column
            .as_deref()
            .and_then(|c| t.by_name.get(c));
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            t.select_list(),
            quote(name),
            quote(&t.cols[t.pk].name)
        );
        let mut st = conn.prepare(&sql)?;
        let mut q = st.query([])?;
        while let Some(r) = q.next()? {
            let scope = match scope_col {
                Some(i) => scope_name(&r.get::<_, Value>(*i)?),
                None => GLOBAL_SCOPE.to_owned(),
            };
            if !keep(name, &scope) {
                continue;
            }
            let mut cells = Vec::with_capacity(cols.len());
            for (i, c) in &cols {
                cells.push((*c, r.get::<_, Value>(*i)?));
            }
            let bytes = rmp_serde::to_vec(&(name.as_str(), cells))?;
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
            rows += 1;
        }
    }
    Ok(StateChecksum {
        digest: h.finalize().into(),
        rows,
    })
}
