//! A change set as the relay stores it: its position, the change set, the scope of each
//! row, and the sealed bytes both stores keep (see `ferry_core::envelope`).

use crate::error::Result;
use crate::scoping::RowTag;
use ferry_core::{ChangeSet, Value};
use serde::{Deserialize, Serialize};

/// A change set as stored: its position, the change set, and the scope of each row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSet {
    /// Position.
    pub server_seq: u64,
    /// The change set (rows may have been pruned by compaction).
    pub change_set: ChangeSet,
    /// One tag per row of `change_set`.
    pub tags: Vec<RowTag>,
}

impl StoredSet {
    /// Rough encoded size, for frame budgets and memory bounds.
    pub fn approx_bytes(&self) -> usize {
        self.change_set
            .rows
            .iter()
            .map(approx_row_bytes)
            .sum::<usize>()
            + 96
    }
}

impl StoredSet {
    /// Rough memory held by this set once decoded: each row, cell and text value is its own
    /// allocation, which the encoded size ([`StoredSet::approx_bytes`]) leaves out. Bounds
    /// what the feed's window keeps.
    pub fn heap_bytes(&self) -> usize {
        fn value(v: &Value) -> usize {
            match v {
                Value::Text(s) => s.len() + 16,
                Value::Blob(b) => b.len() + 16,
                _ => 0,
            }
        }
        let rows: usize = self
            .change_set
            .rows
            .iter()
            .map(|rc| {
                let cells = match &rc.op {
                    ferry_core::RowOp::Upsert(cells) => cells
                        .iter()
                        .map(|c| match c {
                            ferry_core::Cell::Set(n, v) => 48 + n.len() + 16 + value(v),
                            ferry_core::Cell::Add(n, _) => 48 + n.len() + 16,
                        })
                        .sum(),
                    ferry_core::RowOp::Delete => 0,
                };
                96 + rc.table.len() + 16 + value(&rc.pk) + cells
            })
            .sum();
        let tags: usize = self
            .tags
            .iter()
            .map(|t| 48 + t.scope.len() + 16 + t.moved_from.as_ref().map_or(0, |m| m.len() + 16))
            .sum();
        std::mem::size_of::<StoredSet>() + rows + tags
    }
}

/// Rough encoded size of a row change.
pub fn approx_row_bytes(rc: &ferry_core::RowChange) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::Text(s) => s.len() + 5,
            Value::Blob(b) => b.len() + 5,
            _ => 9,
        }
    }
    let cells = match &rc.op {
        ferry_core::RowOp::Upsert(cells) => cells
            .iter()
            .map(|c| match c {
                ferry_core::Cell::Set(n, v) => n.len() + value(v) + 4,
                ferry_core::Cell::Add(n, _) => n.len() + 13,
            })
            .sum(),
        ferry_core::RowOp::Delete => 8,
    };
    rc.table.len() + value(&rc.pk) + cells + 24
}

/// A stored body back into a [`StoredSet`] at `seq`.
pub(crate) fn decode_set(seq: i64, body: &[u8]) -> Result<StoredSet> {
    let (change_set, tags): (ChangeSet, Vec<RowTag>) = ferry_core::envelope::open(body)?;
    Ok(StoredSet {
        server_seq: seq as u64,
        change_set,
        tags,
    })
}

/// The stored body of a change set (the same bytes in every store), sealed with its stored
/// format's version (see `ferry_core::envelope`).
pub(crate) fn encode_set(s: &StoredSet) -> Result<Vec<u8>> {
    Ok(ferry_core::envelope::seal(&(&s.change_set, &s.tags))?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::scoping::RowTag;
    use ferry_core::{Hlc, ReplicaId};
    use ferry_testkit::change::{change_set, set};

    /// The stored body of a sequenced change set, frozen in `server/tests/golden/stored_set.hex`
    /// (both stores write these bytes). `FERRY_BLESS=1` rewrites it after a deliberate change;
    /// a change to the wire form must not change it silently (see `ferry_core::envelope`).
    #[test]
    fn golden_stored_set() {
        let s = StoredSet {
            server_seq: 9,
            change_set: change_set(ReplicaId([1; 16]), 3)
                .id([2; 16])
                .hlc(Hlc::new(1_700_000_000_000, 5))
                .base(41)
                .upsert("todo", "k1", 1, vec![set("list", "home")])
                .build(),
            tags: vec![RowTag {
                scope: "home".into(),
                moved_from: Some("work".into()),
            }],
        };
        let body = encode_set(&s).unwrap();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/stored_set.hex");
        ferry_testkit::golden::check(&path, &body, "the stored form of a change set");
        let back = decode_set(9, &body).unwrap();
        assert_eq!(back.change_set, s.change_set);
        assert_eq!(back.tags, s.tags);
        // Bodies stored before envelopes still open.
        let unsealed = rmp_serde::to_vec_named(&(&s.change_set, &s.tags)).unwrap();
        assert_eq!(decode_set(9, &unsealed).unwrap().tags, s.tags);
    }
}
