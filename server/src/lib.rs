//! # ferry-relay
//!
//! The relay of Ferry, an offline-first sync SDK: it authenticates replicas, sequences their
//! change sets into one gap-free, commit-ordered log, stores them durably, and fans them out
//! to every replica that may read them, live. It is stateless over a [`store::Store`]
//! (embedded SQLite by default).
//!
//! The binary `ferry-relay` wraps [`server::run`]; `docs/operations.md` covers running it and
//! `docs/protocol.md` the wire protocol.

pub mod accept;
pub mod auth;
pub mod bucket;
pub mod catalog;
pub mod checksum_replica;
pub mod clock;
pub mod compact;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod feed;
pub mod history;
pub mod holding;
pub mod metrics;
pub mod outbox;
pub mod private;
pub mod resume;
pub mod scoping;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod stored;

pub use config::Config;
pub use error::{RelayError, Result};
