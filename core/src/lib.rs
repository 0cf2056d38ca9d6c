//! # ferry-core
//!
//! The device side of Ferry, an offline-first sync SDK: a local SQLite replica the app reads
//! and writes with plain SQL; capture of every write (the SDK's and other connections') into
//! a version-vectored change log; deterministic merge of remote changes; and the protocol
//! types plus a sans-I/O sync state machine that the relay and the transport drive.
//!
//! Start with [`Replica::open`] and a [`Schema`]. The semantics are fixed in the project's
//! design document and explained in `docs/conflicts.md`.

pub mod apply;
pub mod capture;
pub mod cas;
pub mod catalog;
pub mod changeset;
pub mod checksum;
pub mod conflict;
pub mod db;
pub mod error;
pub mod hlc;
pub mod ids;
pub mod lease;
pub mod materialize;
pub mod observer;
pub mod protocol;
pub mod replica;
pub mod resolver;
pub mod rollback;
pub mod rowmeta;
pub mod rows;
pub mod schema;
pub mod scope;
pub mod sequencer;
pub mod sync;
pub mod transaction;
pub mod transport;
pub mod value;
pub mod vv;

pub use changeset::{Cell, ChangeSet, Fence, RowChange, RowOp, Sequenced};
pub use conflict::{Conflict, ConflictKind, Side, Winner};
pub use error::{Error, Result};
pub use hlc::{Hlc, WallClock};
pub use ids::{ChangeId, ReplicaId, new_id};
pub use observer::{ChangeEvent, ChangeSource, Observer, Rows, Subscription};
pub use replica::{ApplyReport, OpenOptions, Prepared, RefusalAction, Replica, WriteTx};
pub use resolver::{ConflictInput, Resolution, Resolver};
pub use rollback::Verdict;
pub use schema::{
    ColumnDecl, ColumnType, DeleteRule, Migration, Policy, Schema, TableDecl, TableMode,
};
pub use transaction::Transaction;
pub use transport::{
    ConnState, Lease, StatusObserver, SyncError, SyncHandle, SyncOptions, SyncStatus,
    TokenProvider, Verification,
};
pub use value::Value;
