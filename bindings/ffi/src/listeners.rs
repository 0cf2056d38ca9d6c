//! Foreign traits: what the host app implements (listeners, the resolver, the token
//! provider), and the adapters that let core call them.
//!
//! Every method returns a `Result` so that an exception thrown by app code arrives in Rust as
//! an error that is logged, never as a panic on one of Ferry's threads.

use crate::error::FerryError;
use crate::types::{
    ChangeEvent, ConflictInput, ConflictRecord, QueryResult, Resolution, SyncStatus,
};
use ferry_core as core;
use std::sync::Arc;

/// Receives table changes and conflicts (see `Replica.subscribe`).
#[uniffi::export(with_foreign)]
pub trait ChangeListener: Send + Sync {
    /// A commit touched synced tables.
    fn on_change(&self, event: ChangeEvent) -> Result<(), FerryError>;
    /// A conflict was detected while merging.
    fn on_conflict(&self, conflict: ConflictRecord) -> Result<(), FerryError>;
}

/// Receives a watched query's results whenever they change.
#[uniffi::export(with_foreign)]
pub trait QueryListener: Send + Sync {
    /// The query's current results.
    fn on_rows(&self, rows: QueryResult) -> Result<(), FerryError>;
}

/// Decides conflicts on `custom` columns of one table.
#[uniffi::export(with_foreign)]
pub trait ConflictResolver: Send + Sync {
    /// The answer for one conflicting cell. An error keeps the built-in (lww) result.
    fn resolve(&self, conflict: ConflictInput) -> Result<Resolution, FerryError>;
}

/// Supplies the bearer token before every connection attempt (on a background thread; it may
/// block, e.g. to refresh the token over the network). An error is reported in the sync
/// status and the connection is retried later.
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    /// The token to present.
    fn token(&self) -> Result<String, FerryError>;
}

/// Supplies the bearer token asynchronously before every connection attempt: a Kotlin
/// `suspend fun`, a Swift `async` function, a Python coroutine, which may refresh the token
/// over the network. An error is reported in the sync status and the connection is retried
/// later.
#[uniffi::export(with_foreign)]
#[async_trait::async_trait]
pub trait TokenFetcher: Send + Sync {
    /// The token to present.
    async fn fetch_token(&self) -> Result<String, FerryError>;
}

/// Receives sync status updates (on Ferry's sync thread: keep it short).
#[uniffi::export(with_foreign)]
pub trait SyncStatusListener: Send + Sync {
    /// The status changed.
    fn on_status(&self, status: SyncStatus) -> Result<(), FerryError>;
}

fn logged(what: &str, r: Result<(), FerryError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "the app's {what} failed");
    }
}

pub(crate) struct Changes(pub Arc<dyn ChangeListener>);

impl core::Observer for Changes {
    fn on_change(&self, event: &core::ChangeEvent) {
        logged("change listener", self.0.on_change(event.into()));
    }
    fn on_conflict(&self, conflict: &core::Conflict) {
        logged(
            "change listener",
            self.0.on_conflict(conflict.clone().into()),
        );
    }
}

pub(crate) struct Resolver(pub Arc<dyn ConflictResolver>);

impl core::Resolver for Resolver {
    fn resolve(&self, conflict: &core::ConflictInput) -> core::Resolution {
        match self.0.resolve(conflict.into()) {
            Ok(r) => r.into(),
            Err(e) => {
                tracing::warn!(error = %e, table = %conflict.table, "the app's resolver failed; keeping the lww result");
                core::Resolution::Value(conflict.merged.clone())
            }
        }
    }
}

pub(crate) struct Tokens(pub Arc<dyn TokenProvider>);

impl core::TokenProvider for Tokens {
    fn token(&self) -> Result<String, String> {
        self.0.token().map_err(|e| e.to_string())
    }
}

/// How long a `TokenFetcher` may take before the attempt counts as failed (and is retried
/// after the usual backoff).
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) struct Fetched(pub Arc<dyn TokenFetcher>);

impl core::TokenProvider for Fetched {
    /// Called on a blocking thread of the sync runtime: waits there for the app's coroutine.
    fn token(&self) -> Result<String, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "the token fetcher needs Ferry's sync runtime".to_owned())?;
        match handle.block_on(tokio::time::timeout(FETCH_TIMEOUT, self.0.fetch_token())) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the app's token fetcher did not answer within {} s",
                FETCH_TIMEOUT.as_secs()
            )),
        }
    }
}

pub(crate) struct Status(pub Arc<dyn SyncStatusListener>);

impl core::StatusObserver for Status {
    fn on_status(&self, status: &core::SyncStatus) {
        logged("sync status listener", self.0.on_status(status.into()));
    }
}

/// Calls `listener` with a watched query's rows.
pub(crate) fn query_callback(listener: Arc<dyn QueryListener>) -> core::WatchCallback {
    Box::new(move |rows: &core::Rows| {
        logged("query listener", listener.on_rows(rows.clone().into()))
    })
}
