//! The checksum state: a materialized copy of everything the relay has sequenced, kept so a
//! replica can prove it holds exactly what it should.
//!
//! It is an ordinary Ferry replica (the same merge code every device runs) that never writes
//! and applies the whole log, unfiltered, in order, off the push path. Asked for a checksum,
//! the relay sums the rows of this state that the asking token may read, at the position the
//! state has reached; a replica at that cursor with nothing pending computes the same digest
//! over what it holds (`ferry_core::checksum`).

use crate::auth::Grants;
use crate::error::{RelayError, Result};
use crate::metrics as m;
use crate::store::Store;
use ferry_core::checksum::StateChecksum;
use ferry_core::{Replica, Schema, Sequenced};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The materialized state.
pub struct Shadow {
    replica: Mutex<Replica>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shadow")
    }
}

impl Shadow {
    /// Opens `dir/checksum.db`, rebuilding it when it is ahead of the store (a store restored
    /// from a backup).
    pub fn open(dir: &Path, schema: &Schema, head: u64) -> Result<Shadow> {
        let path = dir.join("checksum.db");
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
        Ok(Shadow {
            replica: Mutex::new(replica),
        })
    }

    /// Position applied.
    pub fn position(&self) -> Result<u64> {
        Ok(self.replica.lock().cursor()?)
    }

    /// Applies the log as it grows until cancelled.
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>, cancel: CancellationToken) {
        let mut head = store.feed().subscribe();
        loop {
            let pos = match self.position() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "checksum state unreadable; checksums disabled");
                    return;
                }
            };
            metrics::gauge!(m::SHADOW_POSITION).set(pos as f64);
            if *head.borrow_and_update() <= pos {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = head.changed() => if r.is_err() { return },
                }
                continue;
            }
            let sets = match store.read(pos, 2000, 8 << 20).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "checksum state: read failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(up_to) = sets.last().map(|s| s.server_seq) else {
                continue;
            };
            let batch: Vec<Sequenced> = sets
                .iter()
                .map(|s| Sequenced {
                    server_seq: s.server_seq,
                    change_set: s.change_set.clone(),
                })
                .collect();
            let me = Arc::clone(&self);
            let r = tokio::task::spawn_blocking(move || {
                me.replica.lock().apply_remote(pos, up_to, &batch)
            })
            .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, position = pos, "checksum state cannot apply the log; checksums stop here");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "checksum task failed");
                    return;
                }
            }
        }
    }

    /// The checksum of what `grants` may read, and the position it describes.
    pub fn checksum(&self, grants: &Grants) -> Result<(u64, StateChecksum)> {
        let r = self.replica.lock();
        let pos = r.cursor()?;
        let sum = r
            .checksum_where(&|_, scope| grants.can_read(scope))
            .map_err(RelayError::Core)?;
        Ok((pos, sum))
    }
}
