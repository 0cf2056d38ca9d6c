//! # ferry-ffi
//!
//! Ferry for Kotlin, Swift and Python, through UniFFI proc-macros. This crate is deliberately
//! thin: each exported object wraps one `ferry-core` object and each method is a line of
//! conversion, so behaviour lives (and is tested) in Rust once, and the bindings' own tests
//! cover only the surface. One public error ([`FerryError`]) is mapped from core errors in
//! one place (`error.rs`). Listeners, the conflict resolver and the token provider are
//! foreign traits; registering a listener returns a [`Subscription`] that cancels on drop.
//!
//! Generated code and the small idiomatic layers (Kotlin `Flow`s, Swift `AsyncStream`s, a
//! Python package) live next to this crate in `bindings/`; `docs/bindings.md` explains how
//! they are built and tested.

mod compact;
mod error;
mod fast;
mod listeners;
mod logging;
mod marshal;
mod num;
mod packed;
mod replica;
mod schema_json;
mod subscription;
mod sync;
mod transaction;
mod types;

pub use error::FerryError;
pub use fast::fast_call_error;
pub use listeners::{
    ChangeListener, ConflictResolver, QueryListener, SyncStatusListener, TokenFetcher,
    TokenProvider,
};
pub use logging::{LogLevel, LogRecord, LogSink, set_logger};
pub use replica::{Replica, ReplicaOptions, ferry_version, new_id};
pub use schema_json::{schema_from_json, schema_to_json};
pub use subscription::Subscription;
pub use sync::{SyncOptions, SyncSession, Verification};
pub use transaction::WriteTransaction;
pub use types::{
    ChangeEvent, ChangeSource, ColumnDecl, ColumnType, ConflictInput, ConflictRecord, ConflictSide,
    ConnState, DeleteRule, LeaseGrant, Migration, Policy, QueryResult, Resolution, Schema,
    SqlValue, SyncStatus, TableDecl, TableMode,
};

uniffi::setup_scaffolding!();
