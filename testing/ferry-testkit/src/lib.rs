//! Ferry's shared test kit: what the integration tests of every crate build on, written once.
//!
//! Before this crate, each test binary carried its own copy of the schemas, the token minting,
//! change-set literals, the relay-process harness and the golden-file check, and the store
//! suite was private to one file, so a new store backend could not run it. Here:
//!
//! - [`schema`]: the app schemas the tests use (a local two-table schema, the relay's
//!   multi-policy schema at version 1 or 2);
//! - [`token`]: HS256 tokens for the test relays' shared secret;
//! - [`change`]: a [`ChangeSet`](ferry_core::ChangeSet) builder, so a test names only the fields it
//!   is about;
//! - [`golden`]: frozen byte files (`FERRY_BLESS=1` rewrites them after a deliberate change);
//! - [`local`]: replicas synced through the in-memory [`Sequencer`](ferry_core::sequencer::Sequencer);
//! - [`relay`]: real relay processes on 127.0.0.1 (one SQLite node, or several over a fresh
//!   PostgreSQL database), replicas connected to them, and checks of a relay's stored log;
//! - [`raw`]: a bare protocol client for hostile-input tests, [`proxy`]: a TCP fault proxy;
//! - [`store_suite`](mod@store_suite): the store properties every backend must have, and the
//!   [`store_suite!`] macro that runs them against a backend in one line.
//!
//! It is a dev-dependency only: tests may `unwrap`, and a failed step panics with what failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod change;
pub mod golden;
pub mod local;
pub mod pg;
pub mod proxy;
pub mod raw;
pub mod relay;
pub mod schema;
pub mod store_snapshot;
pub mod store_suite;
pub mod tls;
pub mod token;

use std::time::{Duration, Instant};

/// Waits until `f` holds (polling), or panics with `what`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// How many seeds a randomized test runs: the environment variable `var` when set (to run
/// more), else `default`.
pub fn seeds(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
