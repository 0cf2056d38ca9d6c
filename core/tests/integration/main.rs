//! `ferry-core`'s integration tests, one binary: capture, merge, the protocol's device side,
//! crash safety, upgrades and the fuzz corpus replayed. Shared helpers come from
//! `ferry-testkit`; each module says what it covers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod capture;
mod checked;
mod convergence;
mod crash;
mod custom;
mod format;
mod fuzz_replay;
mod merge;
mod primary;
mod protocol;
mod reset;
mod skew;
mod space;
mod transaction;
mod upgrade;
