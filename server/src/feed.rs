//! The feed: the relay's head position and a window of recently sequenced change sets.
//!
//! Every store publishes here after a commit, in `server_seq` order. Connection tasks wait on
//! the head and serve live changes from the window, so one write fans out to a thousand
//! connections without a thousand store reads; a connection that is further behind than the
//! window reads from the store.

use crate::store::StoredSet;
use parking_lot::RwLock;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::watch;

/// Head and recent change sets.
#[derive(Debug)]
pub struct Feed {
    head: watch::Sender<u64>,
    recent: RwLock<VecDeque<Arc<StoredSet>>>,
    capacity: usize,
}

impl Feed {
    /// A feed starting at `head`, keeping up to `capacity` recent change sets.
    pub fn new(head: u64, capacity: usize) -> Feed {
        Feed {
            head: watch::Sender::new(head),
            recent: RwLock::new(VecDeque::new()),
            capacity: capacity.max(1),
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
            let mut r = self.recent.write();
            if r.back()
                .is_some_and(|b| b.server_seq + 1 != sets[0].server_seq)
            {
                r.clear();
            }
            r.extend(sets);
            while r.len() > self.capacity {
                r.pop_front();
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
        let r = self.recent.read();
        let first = r.front()?.server_seq;
        if after + 1 < first {
            return None;
        }
        let start = (after + 1 - first) as usize;
        if start > r.len() {
            return None;
        }
        Some(r.iter().skip(start).take(max).cloned().collect())
    }

    /// Drops the window (after compaction rewrote stored bodies).
    pub fn clear_window(&self) {
        self.recent.write().clear();
    }
}
