//! # ferry-core
//!
//! The device side of Ferry, an offline-first sync SDK: a local SQLite replica the app reads
//! and writes with plain SQL; capture of every write (the SDK's and other connections') into
//! a version-vectored change log; deterministic merge of remote changes; and the protocol
//! types plus a sans-I/O sync state machine that the relay and the transport drive.
//!
//! Start with [`Replica::open`] and a [`Schema`]; merge semantics are explained in
//! `docs/conflicts.md`, the modules and the path of a change set in `docs/architecture.md`.
//!
//! The public modules are the ones apps, the relay and tools use: the protocol and its
//! types (`protocol`, `changeset`, `ids`, `hlc`, `vv`, `schema`, `scope`), the sans-I/O
//! client and its port (`sync`, `port`), the rules the relay shares with devices (`cas`,
//! `lease`, `checksum`), the in-memory relay (`sequencer`) and the WebSocket transport
//! (`transport`, behind the default `client` feature). Everything else — capture, the change
//! log, the write engine, merge, rollback, storage — is private.

pub mod admission;
pub(crate) mod apply;
mod capture;
pub mod cas;
pub mod changeset;
pub mod checksum;
mod conflict;
mod db;
mod engine;
pub mod envelope;
mod error;
mod error_code;
pub mod hlc;
mod holding;
pub mod ids;
pub mod lease;
mod log;
mod materialize;
mod observer;
mod policy;
pub mod port;
pub mod protocol;
mod quarantine;
mod readers;
mod refusal;
mod replica;
mod resolver;
mod rollback;
mod rowmeta;
mod rows;
pub mod schema;
pub mod scope;
pub mod sequencer;
pub mod snapshot;
#[cfg(feature = "client")]
mod socket;
mod sqlgate;
#[cfg(feature = "client")]
mod status_board;
pub mod sync;
mod tables;
#[cfg(feature = "client")]
pub mod tls;
mod transaction;
#[cfg(feature = "client")]
pub mod transport;
mod value;
pub mod vv;

pub use apply::ApplyReport;
pub use changeset::{Cell, ChangeSet, Fence, RowChange, RowOp, Sequenced};
pub use conflict::{Conflict, ConflictKind, Side, Winner};
pub use db::{
    FORMAT_VERSION, configure as configure_sqlite, reclaim_space as reclaim_sqlite_space,
};
pub use error::{Error, Result};
pub use hlc::{Hlc, WallClock};
pub use holding::{Eviction, MAX_SUBSCRIPTIONS};
pub use ids::{ChangeId, ReplicaId, new_id};
pub use log::Verdict;
pub use observer::{ChangeEvent, ChangeSource, Observer, Rows, Subscription, WatchCallback};
pub use port::SyncPort;
pub use quarantine::{Quarantined, SetAside};
pub use refusal::RefusalAction;
pub use replica::{OpenOptions, Replica};
pub use resolver::{ConflictInput, Resolution, Resolver};
pub use schema::{
    ColumnDecl, ColumnType, DeleteRule, Migration, Policy, Schema, TableDecl, TableMode,
};
pub use sqlgate::Prepared;
pub use transaction::Transaction;
#[cfg(feature = "client")]
pub use transport::{
    ConnState, Lease, StatusObserver, SyncError, SyncHandle, SyncOptions, SyncStatus,
    TokenProvider, Verification,
};
pub use value::Value;

/// Reading a replica file's internals, for tests and tools that diagnose one.
pub mod inspect {
    use crate::error::Result;

    /// A `ferry_rows` entry's metadata (causal length `cl`, stored `meta` blob), formatted
    /// for a failure message.
    pub fn row_metadata(cl: u64, meta: &[u8]) -> Result<String> {
        Ok(format!("{:?}", crate::rowmeta::RowMeta::decode(cl, meta)?))
    }
}
