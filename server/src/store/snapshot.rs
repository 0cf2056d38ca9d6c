//! Snapshot reads: the current rows of the scopes a connection may read, page by page, from
//! the row histories both stores keep (see [`crate::history`]).
//!
//! Rows are walked in `(scope, table, pk key)` order, so a page ends at a key and the next
//! page starts after it, on any relay node. Scopes are found through the `scopes` list by a
//! range per literal prefix of the token's patterns (as the per-scope read path does), so a
//! page costs in proportion to the rows it returns, not to other tenants' rows. Each page is
//! its own read: it reports the position its rows are as of (the folded watermark when it
//! was read), and pages of one walk may be as of different positions (see ADR 0003 for how
//! a device continues the log from there).

use crate::error::Result;
use crate::store::ReadFilter;
use crate::store::scoped::prefix_end;
use ferry_core::Value;
use ferry_core::snapshot::SnapshotRow;
use serde::{Deserialize, Serialize};

/// A place in the walk: just after this row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotKey {
    /// The row's scope.
    pub scope: String,
    /// Its table.
    pub table: String,
    /// Its primary key, as the stores key it (`scoping::pk_key`).
    pub pk: Vec<u8>,
}

/// One page of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotPage {
    /// The log position the rows are as of.
    pub position: u64,
    /// The rows, each with its scope, in walk order.
    pub rows: Vec<(String, SnapshotRow)>,
    /// Where the next page starts; `None` when the walk is complete.
    pub next: Option<SnapshotKey>,
    /// Stored bytes of the rows' histories (the unit of the byte progress devices show).
    pub bytes: u64,
}

/// How much a walk will return: announced to the device before its first page, so it can
/// show progress. Counted from the scope index alone (a page's bytes are known only once
/// its rows are read, so the endpoint estimates the total bytes from the first page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotSize {
    /// Rows.
    pub rows: u64,
}

/// The ranges of scope names to walk, in order and without overlaps: one per literal
/// prefix of the readable patterns, or everything.
pub fn ranges(filter: &ReadFilter) -> Vec<(String, Option<String>)> {
    let Some(prefixes) = filter.prefixes() else {
        return vec![(String::new(), None)];
    };
    let mut p: Vec<&String> = prefixes.iter().collect();
    p.sort();
    p.dedup();
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for prefix in p {
        // A prefix under one already listed adds nothing.
        if out
            .last()
            .is_some_and(|(last, _)| prefix.starts_with(last.as_str()))
        {
            continue;
        }
        out.push((prefix.clone(), prefix_end(prefix)));
    }
    out
}

/// Fills a page within its budgets.
#[derive(Debug)]
pub struct PageBuilder {
    max_rows: usize,
    max_bytes: usize,
    bytes: usize,
    /// The page so far.
    pub page: SnapshotPage,
}

impl PageBuilder {
    /// An empty page as of `position`, of at most `max_rows` rows and about `max_bytes`
    /// (always at least one row when there is one).
    pub fn new(position: u64, max_rows: usize, max_bytes: usize) -> Self {
        PageBuilder {
            max_rows: max_rows.max(1),
            max_bytes,
            bytes: 0,
            page: SnapshotPage {
                position,
                ..SnapshotPage::default()
            },
        }
    }

    /// Rows the page still has room for.
    pub fn room(&self) -> usize {
        if self.bytes >= self.max_bytes && !self.page.rows.is_empty() {
            0
        } else {
            self.max_rows - self.page.rows.len()
        }
    }

    /// Adds a stored row; returns whether there is room for more.
    pub fn push(&mut self, scope: &str, table: String, pk: &[u8], history: &[u8]) -> Result<bool> {
        let pk_value: Value = rmp_serde::from_slice(pk).map_err(|e| {
            crate::error::RelayError::Store(format!("stored row key is damaged: {e}"))
        })?;
        let row = SnapshotRow {
            table,
            pk: pk_value,
            history: crate::history::decode(history)?,
        };
        self.bytes += row.approx_bytes();
        let key = SnapshotKey {
            scope: scope.to_owned(),
            table: row.table.clone(),
            pk: pk.to_vec(),
        };
        self.page.rows.push((scope.to_owned(), row));
        self.page.bytes += history.len() as u64;
        self.page.next = Some(key);
        Ok(self.room() > 0)
    }

    /// The page; `done` when the walk found nothing after its last row.
    pub fn finish(mut self, done: bool) -> SnapshotPage {
        if done {
            self.page.next = None;
        }
        self.page
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    fn filter(read: &[&str]) -> ReadFilter {
        ReadFilter::new(Arc::new(crate::auth::reading("u", read)))
    }

    #[test]
    fn ranges_are_ordered_and_do_not_overlap() {
        let r = ranges(&filter(&["list:b*", "list:*", "user:7", "list:a"]));
        assert_eq!(
            r,
            vec![
                ("list:".to_owned(), Some("list;".to_owned())),
                ("user:7".to_owned(), Some("user:8".to_owned())),
            ]
        );
        assert_eq!(ranges(&filter(&["*"])), vec![(String::new(), None)]);
    }
}
