//! The per-scope read path: the positions a connection may see, found through an index of
//! the scopes each change set touches rather than by reading every position of the log.
//!
//! Why: a relay serves many tenants. Catch-up used to read every position from the
//! client's cursor to the head and filter by scope, so a device's reconnect cost in
//! proportion to everybody's writes. Both stores now keep, in the sequencing transaction:
//!
//! * `set_scopes(scope, server_seq)`: one entry per scope a change set's rows are in or
//!   leave (a row moving out of a scope must reach that scope's readers, who evict it);
//! * `scopes(name, last_seq)`: every scope with its last position, so the scopes matching a
//!   token's patterns are found by a range over their literal prefix.
//!
//! A catch-up read for patterns `P` after cursor `c`:
//! 1. read the head `H`. Both stores expose a prefix `1..=n` of the log to any reader, and
//!    the index is written by the transaction that sequences, so everything at or below `H`
//!    is indexed in whatever is read afterwards;
//! 2. list the scopes under `P`'s literal prefixes whose last write is after `c`, keeping
//!    those the grants may read ([`ReadFilter`]);
//! 3. read each one's next positions in `(c, H]`, at most `per` each, and [`merge`] them:
//!    every readable position up to the lowest last position of a scope that hit its limit
//!    has been seen, so the read is complete up to there;
//! 4. read those change sets.
//!
//! The answer ([`ScopedRead`]) says how far it is complete, so the connection can tell the
//! client that the positions in between are skipped (a `Changes` frame still covers every
//! position). A token that may read every scope (a pattern starting with `*`) or more than
//! [`MAX_SCOPES`] scopes with news reads the log in order instead: most positions are its
//! business then.

use crate::auth::Grants;
use crate::stored::StoredSet;
use ferry_core::scope::ScopeSet;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Positions per block of SQLite's block-major index.
pub const BLOCK: u64 = 4096;

/// Most scopes one read merges; beyond this the log is read in order.
pub const MAX_SCOPES: usize = 256;

/// The least positions read per scope in one merge.
const MIN_PER_SCOPE: usize = 64;

/// What a connection may read, as the stores need it: the scopes its token and its
/// subscriptions allow (its view), less those a back-fill skips because the replica holds
/// them already.
#[derive(Debug, Clone)]
pub struct ReadFilter {
    sub: String,
    view: Arc<ScopeSet>,
    except: Option<Arc<ScopeSet>>,
    prefixes: Option<Vec<String>>,
}

impl ReadFilter {
    /// The filter of a token's grants: everything it may read.
    pub fn new(grants: Arc<Grants>) -> ReadFilter {
        Self::of(&grants, grants.read_set())
    }

    /// The filter of `grants` reading the scopes of `view` (already narrowed to what the
    /// grants may read).
    pub fn of(grants: &Grants, view: ScopeSet) -> ReadFilter {
        let prefixes = view.prefixes();
        ReadFilter {
            sub: grants.sub.clone(),
            view: Arc::new(view),
            except: None,
            prefixes,
        }
    }

    /// The same filter without the scopes of `held` (a back-fill of what a replica gained).
    pub fn except(mut self, held: ScopeSet) -> ReadFilter {
        self.except = Some(Arc::new(held));
        self
    }

    /// The scopes the connection reads (not narrowed by [`ReadFilter::except`]).
    pub fn view(&self) -> &ScopeSet {
        &self.view
    }

    /// A digest of what the filter lets through (subject, view and exception): a snapshot
    /// resume token is bound to it.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [
            self.sub.as_bytes().to_vec(),
            rmp_serde::to_vec(&*self.view).unwrap_or_default(),
            rmp_serde::to_vec(&self.except.as_deref()).unwrap_or_default(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(&part);
        }
        h.finalize().into()
    }

    /// Literal prefixes covering every readable scope, or `None` for "any scope".
    pub fn prefixes(&self) -> Option<&[String]> {
        self.prefixes.as_deref()
    }

    /// May the connection read `scope`?
    pub fn can_read(&self, scope: &str) -> bool {
        self.view.matches(scope) && !self.except.as_ref().is_some_and(|e| e.matches(scope))
    }
}

/// Change sets a connection may read after a position, and how far that is complete.
#[derive(Debug, Default)]
pub struct ScopedRead {
    /// The change sets, in position order. Each touches a readable scope; the caller still
    /// filters their rows.
    pub sets: Vec<Arc<StoredSet>>,
    /// Every position in `(after, up_to]` that touches a readable scope is in `sets`.
    pub up_to: u64,
    /// Change sets read from the store to answer (what the read cost).
    pub examined: usize,
}

impl ScopedRead {
    /// Nothing after `after`: the cursor is at the head.
    pub fn at_head(after: u64) -> ScopedRead {
        ScopedRead {
            sets: Vec::new(),
            up_to: after,
            examined: 0,
        }
    }

    /// The answer of a read of the log in order: the sets of `read` that touch a readable
    /// scope, complete up to the last set read, or to `head` when there was nothing to read.
    pub fn in_order(read: Vec<Arc<StoredSet>>, head: u64, filter: &ReadFilter) -> ScopedRead {
        let up_to = read.last().map_or(head, |s| s.server_seq);
        Self::complete_to(read, up_to, filter)
    }

    /// The answer of a read complete up to `up_to`: the sets of `read` that touch a readable
    /// scope (an index entry may outlive the rows that made it, when compaction pruned them).
    pub fn complete_to(read: Vec<Arc<StoredSet>>, up_to: u64, filter: &ReadFilter) -> ScopedRead {
        let examined = read.len();
        let sets = read
            .into_iter()
            .filter(|s| scopes_of(s).iter().any(|sc| filter.can_read(sc)))
            .collect();
        ScopedRead {
            sets,
            up_to,
            examined,
        }
    }
}

/// Positions to read next and how far they make the read complete.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Positions to read, ascending.
    pub positions: Vec<u64>,
    /// Every readable position in `(after, up_to]` is in `positions`.
    pub up_to: u64,
}

/// Positions read per scope when `scopes` scopes are merged for `max_sets` sets.
pub fn per_scope(scopes: usize, max_sets: usize) -> usize {
    (max_sets / scopes.max(1)).max(MIN_PER_SCOPE)
}

/// Merges the next positions of several scopes (each ascending, at most `per`, all at or
/// below `head`) into at most `max_sets` positions and the point up to which they are
/// complete.
pub fn merge(head: u64, per: usize, lists: &[Vec<u64>], max_sets: usize) -> Plan {
    // A scope that returned fewer than `per` positions has none left below `head`; one that
    // hit the limit may have more after its last.
    let bound = lists
        .iter()
        .filter(|l| l.len() >= per)
        .filter_map(|l| l.last().copied())
        .min()
        .unwrap_or(head);
    let all: BTreeSet<u64> = lists
        .iter()
        .flatten()
        .copied()
        .filter(|p| *p <= bound)
        .collect();
    let max_sets = max_sets.max(1);
    if all.len() > max_sets {
        let positions: Vec<u64> = all.into_iter().take(max_sets).collect();
        let up_to = positions.last().copied().unwrap_or(bound);
        Plan { positions, up_to }
    } else {
        Plan {
            positions: all.into_iter().collect(),
            up_to: bound,
        }
    }
}

/// The scopes a stored change set touches (where its rows are, and where moved rows left),
/// each once.
pub fn scopes_of(s: &StoredSet) -> Vec<&str> {
    let mut out: Vec<&str> = s
        .tags
        .iter()
        .flat_map(|t| std::iter::once(t.scope.as_str()).chain(t.moved_from.as_deref()))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The least string greater than every string starting with `prefix` in byte order, if any
/// (for a range `name >= prefix AND name < end` over an index in byte order).
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // The next scalar value after `last` (skipping the surrogate gap).
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_ends_bound_the_prefix_in_byte_order() {
        assert_eq!(prefix_end("list:").as_deref(), Some("list;"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }

    proptest! {
        #[test]
        fn prefix_end_is_above_every_extension(p in "[a-z\u{7f}-\u{10ffff}]{0,4}", tail in ".{0,4}", other in ".{0,6}") {
            let s = format!("{p}{tail}");
            if let Some(end) = prefix_end(&p) {
                prop_assert!(s.as_bytes() < end.as_bytes());
                prop_assert!(p.as_bytes() < end.as_bytes());
                // Nothing between the prefix and the end is outside the prefix.
                if other.as_bytes() >= p.as_bytes() && other.as_bytes() < end.as_bytes() {
                    prop_assert!(other.starts_with(&p));
                }
            } else {
                prop_assert!(p.chars().all(|c| c == char::MAX));
            }
        }

        /// Merging per-scope prefixes of the positions gives exactly the readable positions
        /// up to where it says it is complete, and always makes progress.
        #[test]
        fn merge_is_complete_up_to_its_bound(
            scopes in prop::collection::vec(prop::collection::btree_set(1u64..400, 0..80), 1..6),
            after in 0u64..200,
            max_sets in 1usize..50,
            per in 1usize..30,
        ) {
            let head = 400;
            let lists: Vec<Vec<u64>> = scopes
                .iter()
                .map(|s| s.iter().copied().filter(|p| *p > after).take(per).collect())
                .collect();
            let plan = merge(head, per, &lists, max_sets);
            let truth: BTreeSet<u64> = scopes
                .iter()
                .flatten()
                .copied()
                .filter(|p| *p > after && *p <= plan.up_to)
                .collect();
            prop_assert_eq!(plan.positions.iter().copied().collect::<BTreeSet<_>>(), truth.clone());
            prop_assert!(plan.positions.len() <= max_sets);
            prop_assert!(plan.up_to > after, "a merge always moves forward");
            let remaining = scopes.iter().flatten().any(|p| *p > after);
            if !remaining {
                prop_assert_eq!(plan.up_to, head);
            } else {
                prop_assert!(!plan.positions.is_empty() || plan.up_to == head);
            }
        }
    }
}
