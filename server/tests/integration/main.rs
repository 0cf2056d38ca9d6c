//! `ferry-relay`'s integration tests, one binary: real relay processes on 127.0.0.1 (on the
//! embedded store and on a throwaway PostgreSQL), the store suite, hostile input, crashes and
//! full disks, the seeded simulation and the process-kill soak. Shared helpers come from
//! `ferry-testkit`; each module says what it covers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod admission;
mod atomicity;
mod bad_input;
mod compaction;
mod consistency;
mod convergence;
mod crash;
mod disk;
mod flow;
mod holding;
mod hostile;
mod jwks;
mod lifecycle;
mod multinode;
mod outdated;
mod quarantine;
mod scopes;
mod simulation;
mod snapshots;
mod soak;
mod store_suite;
mod sync;
mod tls;
mod trust;
