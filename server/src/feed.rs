//! The feed: the relay's head position and a window of recently sequenced change sets.
//!
//! Every store publishes here after a commit, in `server_seq` order. Connection tasks wait on
//! the head and serve live changes from the window, so one write fans out to a thousand
//! connections without a thousand store reads; a connection that is further behind than the
//! window reads from the store.

use crate::stored::StoredSet;
use parking_lot::RwLock;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::watch;

/// Head and recent change sets.
#[derive(Debug)]
pub struct Feed {
    head: watch::Sender<u64>,
    recent: RwLock<Window>,
    capacity: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Window {
    sets: VecDeque<Arc<StoredSet>>,
    bytes: usize,
}

impl Feed {
    /// A feed starting at `head`, keeping up to `capacity` recent change sets and about
    /// `max_bytes` of memory for them (see [`StoredSet::heap_bytes`]).
    pub fn new(head: u64, capacity: usize, max_bytes: usize) -> Feed {
        Feed {
            head: watch::Sender::new(head),
            recent: RwLock::new(Window::default()),
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    /// The current head.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// A receiver that wakes when the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Publishes newly committed change sets (consecutive, in order, after the head).
    pub fn publish(&self, sets: Vec<Arc<StoredSet>>) {
        let Some(last) = sets.last().map(|s| s.server_seq) else {
            return;
        };
        {
            let mut w = self.recent.write();
            if w.sets
                .back()
                .is_some_and(|b| b.server_seq + 1 != sets[0].server_seq)
            {
                w.sets.clear();
                w.bytes = 0;
            }
            for s in sets {
                w.bytes += s.heap_bytes();
                w.sets.push_back(s);
            }
            while w.sets.len() > self.capacity || (w.bytes > self.max_bytes && w.sets.len() > 1) {
                if let Some(old) = w.sets.pop_front() {
                    w.bytes = w.bytes.saturating_sub(old.heap_bytes());
                }
            }
        }
        self.head.send_if_modified(|h| {
            if last > *h {
                *h = last;
                true
            } else {
                false
            }
        });
    }

    /// Change sets in `(after, ..]`, at most `max`, if the window still holds `after + 1`.
    pub fn window_after(&self, after: u64, max: usize) -> Option<Vec<Arc<StoredSet>>> {
        let w = self.recent.read();
        let first = w.sets.front()?.server_seq;
        if after + 1 < first {
            return None;
        }
        let start = (after + 1 - first) as usize;
        if start > w.sets.len() {
            return None;
        }
        Some(w.sets.iter().skip(start).take(max).cloned().collect())
    }

    /// Drops the window (after compaction rewrote stored bodies).
    pub fn clear_window(&self) {
        let mut w = self.recent.write();
        w.sets.clear();
        w.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_core::{ChangeSet, Hlc, ReplicaId};

    fn set(seq: u64, payload: usize) -> Arc<StoredSet> {
        Arc::new(StoredSet {
            server_seq: seq,
            change_set: ChangeSet {
                id: [0; 16],
                origin: ReplicaId([1; 16]),
                origin_seq: seq,
                hlc: Hlc::new(1, 0),
                base: 0,
                schema_version: 1,
                fence: None,
                guarded: false,
                rows: vec![ferry_core::RowChange {
                    table: "t".into(),
                    pk: "k".into(),
                    cl: 1,
                    op: ferry_core::RowOp::Upsert(vec![ferry_core::Cell::Set(
                        "c".into(),
                        ferry_core::Value::Text("x".repeat(payload)),
                    )]),
                }],
            },
            tags: vec![],
        })
    }

    /// The window is bounded by what its sets hold in memory, where every cell is an
    /// allocation or two: a set of many small cells counts far more than its encoded size
    /// (a 64 MiB window of 1,000-row sets held ~190 MB before).
    #[test]
    fn window_bytes_count_allocations_not_encoded_size() {
        let mut s = (*set(1, 1)).clone();
        let rc = s.change_set.rows[0].clone();
        s.change_set.rows = vec![rc; 1000];
        s.tags = vec![
            crate::scoping::RowTag {
                scope: "global".into(),
                moved_from: None
            };
            1000
        ];
        assert!(s.heap_bytes() >= 1000 * (96 + 48 + 48));
        assert!(s.heap_bytes() > 3 * s.approx_bytes());
        let f = Feed::new(0, 100, s.heap_bytes() * 2);
        f.publish(
            (1..=5)
                .map(|i| {
                    let mut x = s.clone();
                    x.server_seq = i;
                    Arc::new(x)
                })
                .collect(),
        );
        assert_eq!(
            f.window_after(3, 10).map(|w| w.len()),
            Some(2),
            "two such sets fit"
        );
        assert!(f.window_after(2, 10).is_none(), "a third does not");
    }

    #[test]
    fn window_serves_what_it_holds_and_stays_bounded() {
        let f = Feed::new(0, 100, 12_000);
        f.publish((1..=5).map(|i| set(i, 10)).collect());
        assert_eq!(f.head(), 5);
        let w = f.window_after(2, 10).unwrap();
        assert_eq!(
            w.iter().map(|s| s.server_seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert!(f.window_after(5, 10).unwrap().is_empty());
        // Large sets push old ones out by bytes; a position no longer held is a miss.
        f.publish((6..=10).map(|i| set(i, 3_000)).collect());
        assert!(f.window_after(0, 10).is_none(), "position 1 was evicted");
        let held = f.window_after(7, 10).unwrap();
        assert_eq!(held.first().map(|s| s.server_seq), Some(8));
        // A gap (positions published elsewhere) resets the window rather than mislead.
        f.publish(vec![set(20, 1)]);
        assert!(f.window_after(10, 10).is_none());
        assert_eq!(f.head(), 20);
    }
}
