//! What a store's writer works through, one job at a time in arrival order.
//!
//! Both stores funnel every write — pushes, lease requests, compaction rewrites — through
//! one writer per store (a thread for SQLite, a task per node for PostgreSQL), so that a
//! lease grant and a fence check, or a rewrite and a push, never interleave.

use crate::auth::Grants;
use crate::error::{RelayError, Result};
use crate::store::{PushOutcome, StoredSet};
use ferry_core::admission::Bounds;
use ferry_core::protocol::{LeaseOutcome, LeaseRequest};
use ferry_core::{ChangeSet, ReplicaId, Value};
use std::sync::Arc;
use tokio::sync::oneshot;

/// One unit of the writer's work, with where to send its answer.
pub enum Job {
    /// Sequence change sets (grouped with other pushes waiting at the same time).
    Push {
        /// The pushing connection's grants.
        grants: Arc<Grants>,
        /// Bounds on each change set (size, clock skew against the relay's clock).
        bounds: Bounds,
        /// Oldest first.
        sets: Vec<ChangeSet>,
        /// Outcomes, one per change set looked at.
        reply: oneshot::Sender<Result<Vec<PushOutcome>>>,
    },
    /// Replace compacted bodies and drop the history rows they no longer touch.
    Rewrite {
        /// Rewritten change sets and the `(table, pk)` each no longer touches.
        sets: Vec<(StoredSet, Vec<(String, Value)>)>,
        /// The new horizon.
        horizon: u64,
        /// Done.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Fold the log after the row histories' watermark into them (see `history`).
    Fold {
        /// About how many row changes to fold.
        max_rows: usize,
        /// The new watermark.
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Record which subject owns a replica id, if none does yet (see `Store::claim`).
    Claim {
        /// The replica id.
        replica: ReplicaId,
        /// The token's subject.
        sub: String,
        /// The owner's subject, as stored after this job.
        reply: oneshot::Sender<Result<String>>,
    },
    /// Decide a lease request.
    Lease {
        /// Who asks.
        holder: ReplicaId,
        /// What.
        request: LeaseRequest,
        /// The decision.
        reply: oneshot::Sender<Result<LeaseOutcome>>,
    },
}

/// A push waiting in a group commit.
pub type PushJob = (
    Arc<Grants>,
    Bounds,
    Vec<ChangeSet>,
    oneshot::Sender<Result<Vec<PushOutcome>>>,
);

/// The lease a request names.
pub fn lease_name(request: &LeaseRequest) -> &str {
    match request {
        LeaseRequest::Acquire { name, .. }
        | LeaseRequest::Renew { name, .. }
        | LeaseRequest::Release { name, .. } => name,
    }
}

/// Where a store's jobs go: its writer's queue.
pub trait JobQueue {
    /// Queues `job`, or fails when the writer has stopped (shutdown).
    fn put(&self, job: Job) -> Result<()>;
}

/// Queues a push and waits for its outcomes.
pub async fn push(
    q: &impl JobQueue,
    grants: Arc<Grants>,
    bounds: Bounds,
    sets: Vec<ChangeSet>,
) -> Result<Vec<PushOutcome>> {
    let (reply, rx) = oneshot::channel();
    q.put(Job::Push {
        grants,
        bounds,
        sets,
        reply,
    })?;
    rx.await.map_err(|_| RelayError::ShuttingDown)?
}

/// Queues a lease request and waits for the decision.
pub async fn lease(
    q: &impl JobQueue,
    holder: ReplicaId,
    request: LeaseRequest,
) -> Result<LeaseOutcome> {
    let (reply, rx) = oneshot::channel();
    q.put(Job::Lease {
        holder,
        request,
        reply,
    })?;
    rx.await.map_err(|_| RelayError::ShuttingDown)?
}

/// Queues a claim of `replica` for `sub` and waits for the owner's subject.
pub async fn claim(q: &impl JobQueue, replica: ReplicaId, sub: String) -> Result<String> {
    let (reply, rx) = oneshot::channel();
    q.put(Job::Claim {
        replica,
        sub,
        reply,
    })?;
    rx.await.map_err(|_| RelayError::ShuttingDown)?
}

/// Queues a compaction rewrite and waits until it is written.
pub async fn rewrite(
    q: &impl JobQueue,
    sets: Vec<(StoredSet, Vec<(String, Value)>)>,
    horizon: u64,
) -> Result<()> {
    let (reply, rx) = oneshot::channel();
    q.put(Job::Rewrite {
        sets,
        horizon,
        reply,
    })?;
    rx.await.map_err(|_| RelayError::ShuttingDown)?
}

/// Queues a fold of the row histories and waits for the new watermark.
pub async fn fold(q: &impl JobQueue, max_rows: usize) -> Result<u64> {
    let (reply, rx) = oneshot::channel();
    q.put(Job::Fold { max_rows, reply })?;
    rx.await.map_err(|_| RelayError::ShuttingDown)?
}
