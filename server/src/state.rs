//! What every connection of one relay process shares: configuration, tables, token
//! verification, the store, the checksum replica, the clock, and which connection of each
//! replica is current. Built once by the server (or a simulation) with [`RelayState::new`].

use crate::auth::Verifier;
use crate::catalog::RelayCatalog;
use crate::checksum_replica::ChecksumReplica;
use crate::clock::RelayClock;
use crate::config::Config;
use crate::store::Store;
use ferry_core::ReplicaId;
use ferry_core::protocol::Limits;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every connection shares.
pub struct RelayState {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Tables.
    pub cat: Arc<RelayCatalog>,
    /// Token verification.
    pub verifier: Verifier,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// The replica that answers checksum requests, when enabled.
    pub checksums: Option<Arc<ChecksumReplica>>,
    /// Fired on shutdown.
    pub shutdown: CancellationToken,
    /// Open connections.
    pub connections: AtomicUsize,
    /// Accepted sockets not (yet) upgraded to a sync connection: bare TCP, HTTP requests,
    /// slow headers. They count against `max_connections` with `connections`.
    pub sockets: AtomicUsize,
    /// Open sockets per peer address, upgraded or not (`limits.max_connections_per_ip`).
    pub per_ip: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Connection tasks still running (shutdown waits for them).
    pub tasks: tokio_util::task::TaskTracker,
    /// The relay's wall clock in milliseconds (welcome time, clock-skew checks); the system
    /// clock except in simulations.
    pub clock: RelayClock,
    /// The latest connection of each replica (see [`Sessions`]).
    pub sessions: Sessions,
    /// Frame bytes of client frames being handled, across connections
    /// (`limits.push_memory_bytes`): what bounds the memory of many pushes at once.
    pub frame_memory: Arc<tokio::sync::Semaphore>,
}

/// Which connection of each replica is current. A replica's new hello supersedes its older
/// connections: frames still arriving on one of those (a connection the device left, whose
/// data was still in flight) are refused, and a push in progress on it finishes before the
/// new connection's first push starts. So the relay never sequences a late copy of a change
/// set after the device, on its new connection, withdrew it. One relay process: on several
/// nodes over PostgreSQL, connections on different nodes are not ordered this way.
#[derive(Debug, Default)]
pub struct Sessions {
    current: std::sync::Mutex<std::collections::HashMap<ReplicaId, Arc<tokio::sync::Mutex<u64>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Sessions {
    fn slot(&self, replica: ReplicaId) -> Arc<tokio::sync::Mutex<u64>> {
        let mut map = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(map.entry(replica).or_default())
    }

    /// Makes a new connection of `replica` current; returns its number.
    pub async fn begin(&self, replica: ReplicaId) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        *self.slot(replica).lock().await = n;
        n
    }

    /// Connection `n` of `replica` closed: forgets the replica if it was the current one (so
    /// the table holds connected replicas only).
    pub fn end(&self, replica: ReplicaId, n: u64) {
        let mut map = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only when nobody holds the slot (a connection starting or pushing keeps a clone of
        // it, so it cannot be forgotten under it) and it is still this connection's.
        let idle = map.get(&replica).is_some_and(|slot| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|g| *g == n)
        });
        if idle {
            map.remove(&replica);
        }
    }

    /// Replicas with a current connection.
    pub fn len(&self) -> usize {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// True when no replica is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds `replica`'s slot while connection `n` pushes, if it is still current.
    pub async fn current(
        &self,
        replica: ReplicaId,
        n: u64,
    ) -> Option<tokio::sync::OwnedMutexGuard<u64>> {
        let g = self.slot(replica).lock_owned().await;
        (*g == n).then_some(g)
    }
}

impl std::fmt::Debug for RelayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayState")
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish()
    }
}

impl RelayState {
    /// The state of a relay that starts now (no connections, no sessions); `shutdown` is
    /// fired to stop it.
    pub fn new(
        cfg: Arc<Config>,
        cat: Arc<RelayCatalog>,
        verifier: Verifier,
        store: Arc<dyn Store>,
        checksums: Option<Arc<ChecksumReplica>>,
        clock: RelayClock,
        shutdown: CancellationToken,
    ) -> RelayState {
        RelayState {
            cat,
            verifier,
            store,
            checksums,
            shutdown,
            connections: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            per_ip: parking_lot::Mutex::new(std::collections::HashMap::new()),
            tasks: TaskTracker::new(),
            frame_memory: Arc::new(tokio::sync::Semaphore::new(
                cfg.limits.push_memory_bytes.min(u32::MAX as usize),
            )),
            cfg,
            clock,
            sessions: Sessions::default(),
        }
    }

    /// The limits announced to clients.
    pub fn limits(&self) -> Limits {
        let l = &self.cfg.limits;
        Limits {
            max_frame_bytes: l.max_frame_bytes as u64,
            max_change_set_ops: l.max_change_set_ops as u64,
            max_push_sets: l.max_push_sets as u64,
            push_window_bytes: l.push_window_bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Sessions;
    use ferry_core::ReplicaId;

    #[tokio::test]
    async fn a_new_connection_supersedes_and_closing_forgets() {
        let s = Sessions::default();
        let r = ReplicaId([1; 16]);
        let a = s.begin(r).await;
        assert!(s.current(r, a).await.is_some());
        let b = s.begin(r).await;
        assert!(
            s.current(r, a).await.is_none(),
            "the old connection is superseded"
        );
        assert!(s.current(r, b).await.is_some());
        s.end(r, a);
        assert!(
            s.current(r, b).await.is_some(),
            "closing the old one keeps the new one"
        );
        {
            let _pushing = s.current(r, b).await;
            s.end(r, b);
            assert_eq!(s.len(), 1, "not forgotten while a push holds it");
        }
        s.end(r, b);
        assert_eq!(s.len(), 0);
    }
}
