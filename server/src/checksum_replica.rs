//! The checksum state: a materialized copy of everything the relay has sequenced, kept so a
//! replica can prove it holds exactly what it should.
//!
//! It is an ordinary Ferry replica (the same merge code every device runs) that never writes
//! and applies the whole log, unfiltered, in order, off the push path: in the background once
//! the log has been quiet for a moment, and on demand when a checksum is asked for (up to the
//! asker's position). Asked for a checksum, the relay sums the rows of this state that the
//! asking token may read, at the position the state has reached; a replica at that cursor with
//! nothing pending computes the same digest over what it holds (`ferry_core::checksum`).

use crate::error::{RelayError, Result};
use crate::metrics as m;
use crate::store::Store;
use ferry_core::SyncPort;
use ferry_core::checksum::StateChecksum;
use ferry_core::scope::ScopeSet;
use ferry_core::{Replica, Schema, Sequenced};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The materialized state.
pub struct ChecksumReplica {
    replica: Mutex<Replica>,
    catching_up: tokio::sync::Mutex<()>,
    /// Recent answers by position and scopes: many devices of one user (or one device asking
    /// again) at a quiet position cost one scan.
    cache: Mutex<VecDeque<(u64, ScopeSet, StateChecksum)>>,
}

/// Answers kept in the cache.
const CACHED: usize = 256;

/// Quiet time before the background catch-up.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(1500);
/// Longest the background catch-up waits for quiet.
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for ChecksumReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChecksumReplica")
    }
}

impl ChecksumReplica {
    /// Opens `dir/checksum.db`, rebuilding it when it is ahead of the store (a store restored
    /// from a backup).
    pub fn open(dir: &Path, schema: &Schema, head: u64) -> Result<ChecksumReplica> {
        crate::private::dir(dir)?;
        let path = dir.join("checksum.db");
        crate::private::file(&path)?;
        let replica = Replica::open(&path, schema)?;
        let replica = if replica.cursor()? > head {
            tracing::warn!(
                cursor = replica.cursor()?,
                head,
                "checksum state is ahead of the store; rebuilding it"
            );
            replica.close()?;
            for suffix in ["", "-wal", "-shm"] {
                let p = dir.join(format!("checksum.db{suffix}"));
                if p.exists() {
                    std::fs::remove_file(&p)?;
                }
            }
            Replica::open(&path, schema)?
        } else {
            replica
        };
        Ok(ChecksumReplica {
            replica: Mutex::new(replica),
            catching_up: tokio::sync::Mutex::new(()),
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// Position applied.
    pub fn position(&self) -> Result<u64> {
        Ok(self.replica.lock().cursor()?)
    }

    /// Keeps the state close to the head without competing with pushes: after the head moves
    /// it waits until the log has been quiet for a moment (at most `SETTLE_MAX`), then
    /// catches up. Checksum requests catch up on demand ([`ChecksumReplica::catch_up`]).
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>, cancel: CancellationToken) {
        let mut head = store.feed().subscribe();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = head.changed() => if r.is_err() { return },
            }
            let first = tokio::time::Instant::now();
            loop {
                let quiet = tokio::time::sleep(SETTLE);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = quiet => break,
                    r = head.changed() => if r.is_err() { return },
                }
                if first.elapsed() > SETTLE_MAX {
                    break;
                }
            }
            if let Err(e) = self.catch_up(&store, None).await {
                tracing::error!(error = %e, "checksum state cannot follow the log; checksums stop here");
                return;
            }
        }
    }

    /// Applies the log up to at least `target` (or the head). Returns the position reached.
    pub async fn catch_up(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        target: Option<u64>,
    ) -> Result<u64> {
        let _one = self.catching_up.lock().await;
        loop {
            let pos = self.position()?;
            metrics::gauge!(m::SHADOW_POSITION).set(pos as f64);
            let goal = target.unwrap_or_else(|| store.feed().head());
            if pos >= goal {
                return Ok(pos);
            }
            let sets = store.read(pos, 2000, 8 << 20).await?;
            let Some(up_to) = sets.last().map(|s| s.server_seq) else {
                return Ok(pos);
            };
            let batch: Vec<Sequenced> = sets
                .iter()
                .map(|s| Sequenced {
                    server_seq: s.server_seq,
                    change_set: s.change_set.clone(),
                })
                .collect();
            let me = Arc::clone(self);
            tokio::task::spawn_blocking(move || me.replica.lock().apply_remote(pos, up_to, &batch))
                .await
                .map_err(|e| RelayError::Store(format!("checksum task failed: {e}")))??;
        }
    }

    /// The checksum of the scopes of `view` (what a connection delivers), and the position
    /// it describes.
    pub fn checksum(&self, view: &ScopeSet) -> Result<(u64, StateChecksum)> {
        let r = self.replica.lock();
        let pos = r.cursor()?;
        let cached = self
            .cache
            .lock()
            .iter()
            .find(|(p, v, _)| *p == pos && v == view)
            .map(|(_, _, sum)| *sum);
        if let Some(sum) = cached {
            metrics::counter!(m::CHECKSUMS, "cached" => "true").increment(1);
            return Ok((pos, sum));
        }
        let sum = r
            .checksum_where(&|_, scope| view.matches(scope))
            .map_err(RelayError::Core)?;
        metrics::counter!(m::CHECKSUMS, "cached" => "false").increment(1);
        let mut cache = self.cache.lock();
        // Answers for older positions are of no use once the state moved on.
        cache.retain(|(p, _, _)| *p == pos);
        if cache.len() >= CACHED {
            cache.pop_front();
        }
        cache.push_back((pos, view.clone(), sum));
        Ok((pos, sum))
    }
}
