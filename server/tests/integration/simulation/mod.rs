//! Deterministic simulation: 2–8 replicas and the relay in one thread, driven by a seeded
//! scheduler that injects faults between every two messages.
//!
//! Real parts: each replica is a `ferry_core::Replica` on its own SQLite file driven by the
//! sans-I/O `SyncClient`; the relay is `ferry_relay::endpoint::Endpoint` (the exact code
//! behind every WebSocket) over the real SQLite store, with real token verification. Only
//! the network is simulated: every connection is a pair of in-order queues, as TCP gives,
//! and the scheduler picks at each step what happens next.
//!
//! Faults: partitions and heals; a message lost (which resets its connection, as on TCP);
//! a connection left half-open whose frames still reach the relay later, after the replica
//! reconnected (so pushes arrive duplicated and out of order across connections); push
//! frames replayed by a middlebox; delay (messages wait in queues while everything else
//! runs); replica crash at any SQLite instruction (mid-apply, mid-write, between push and
//! ack, during a schema migration) through `OpenOptions::crash_countdown`; relay crash and
//! restart (in-flight answers lost); device clocks hours behind or ahead; expired tokens at
//! hello and mid-connection; schema upgrades on some replicas but not others; leases taken,
//! released and lost, with fenced writes; tokens that lose the grant to write a shared
//! list for a while, so that writes made offline are refused for good, quarantined, and
//! afterwards discarded or retried by the app. Links hold a few frames each way (2 to 16, per
//! seed), so flow control is part of every run, and one seed in 75 starts with a node
//! holding a backlog of 10,000 change sets.
//!
//! Invariants checked after every run (and atomicity after every step):
//! * convergence: every replica holds exactly what a fresh replica with full read rights
//!   receives, restricted to its own read scopes (isolation), on the columns its schema has;
//! * no lost writes: every transaction an app committed is either in the relay log exactly
//!   once or was refused (compare-and-set, fence) and rolled back, or quarantined (then
//!   discarded, or retried as a new change set that is itself held to these rules), as
//!   documented; no refusal ever stops a node's uploads;
//! * counters exact: every counter equals the sum of the accepted increments;
//! * compare-and-set: each balance equals the number of accepted increments on it;
//! * fencing: fenced change sets are sequenced with non-decreasing tokens;
//! * atomicity: no replica ever shows part of a transaction (marker pairs).
//!
//! `cargo test --release -p ferry-relay --test integration deterministic_simulation_seeds`
//! runs `FERRY_SIM_SEEDS` seeds (300 by default); `FERRY_SIM_SEED=n` replays one;
//! `FERRY_SIM_LONG=secs` runs seeds until the time is up and reports how many ran (`scripts/sim-long`). A failure prints the seed and its trace.
//!
//! Rooms: this file holds the world's state and the seed loop; `world` brings the relay and
//! the nodes up and down and runs the scheduler; `network` the connections; `workload` what
//! the apps do; `oracle` the invariants and the failure reports.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod network;
mod oracle;
mod workload;
mod world;

use ferry_core::protocol::{ClientMsg, ErrorCode, LeaseOutcome, LeaseRequest, ServerMsg};
use ferry_core::sync::SyncClient;
use ferry_core::{
    ChangeId, Fence, OpenOptions, Replica, ReplicaId, Schema, Value, Verdict, WallClock,
};
use ferry_relay::auth::{Verifier, now_secs};
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::endpoint::{Close, Endpoint};
use ferry_relay::state::RelayState;
use ferry_relay::store::Store;
use ferry_relay::store::sqlite::SqliteStore;
use ferry_testkit::token::{SECRET, Token};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOUR: i64 = 3_600_000;
const LEASE: &str = "lease:sim";

/// The app schema at `version` 1 or 2 (2 adds `note.prio` and a local table).
fn schema(version: u32) -> Schema {
    ferry_testkit::schema::relay(version)
}

/// Columns compared per table (those of schema 1; `note.prio` too when both sides have it).
fn columns(table: &str, v2: bool) -> &'static str {
    match table {
        "todo" => "id, list, title, votes",
        "tag" => "id, name",
        "note" if v2 => "id, body, n, prio",
        "note" => "id, body, n",
        "price" => "id, cents",
        "acct" => "id, balance, holder",
        _ => unreachable!(),
    }
}

const TABLES: [&str; 5] = ["todo", "tag", "note", "price", "acct"];

fn list_of(node: usize) -> String {
    format!("list:g{}", node % 2)
}

/// One device's wall clock: the simulation's time plus a fixed skew.
struct SimClock(Arc<AtomicU64>, i64);
impl WallClock for SimClock {
    fn now_millis(&self) -> u64 {
        (self.0.load(Ordering::SeqCst) as i64 + self.1).max(0) as u64
    }
}

/// A write the app committed, with what the checks need to know of it.
#[derive(Debug, Clone)]
struct Committed {
    id: ChangeId,
    votes: Vec<(String, i64)>,
    cas: Option<String>,
    /// Checked by the relay (compare-and-set, fenced, or written while such was pending).
    checked: bool,
    marker: String,
    /// Issued again from quarantine: the change set it re-issues (whose verdict stays
    /// `Rejected`).
    retry_of: Option<ChangeId>,
}

struct Node {
    path: PathBuf,
    replica: Option<Replica>,
    schema_version: u32,
    skew: i64,
    client: SyncClient,
    /// The current connection (index into `Sim::links`).
    link: Option<usize>,
    /// Partitioned until this step.
    cut_until: u64,
    /// The next hello presents an expired token.
    stale_token: bool,
    countdown: Arc<AtomicI64>,
    committed: Vec<Committed>,
    lease: Option<u64>,
    lease_pending: bool,
    /// Stopped downloading at a change from a newer app schema.
    outdated: bool,
    seq: u64,
    primary: bool,
    /// Its token may not write `list:shared` until this step (an app whose user lost a
    /// grant while offline): such writes are refused for good and quarantined. Zero: never
    /// narrowed, and a quarantine is a bug. Once the step has passed, the app decides about
    /// each quarantined change set (discard or retry).
    narrow_until: u64,
}

struct Link {
    node: usize,
    /// Still the node's connection (a half-open one only carries frames to the relay).
    live: bool,
    /// The relay closed its end (after an error frame).
    relay_closed: bool,
    ep: Option<Endpoint>,
    up: VecDeque<ClientMsg>,
    down: VecDeque<ServerMsg>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    time: Arc<AtomicU64>,
    shared: Option<Arc<RelayState>>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    step: u64,
    trace: String,
    /// Push frames seen on the wire, for replays.
    seen_pushes: Vec<(usize, ClientMsg)>,
    faults: BTreeMap<&'static str, u64>,
    /// Frames a link holds each way (the socket buffers): a client writes no push while its
    /// side is full, the relay reads nothing from a link whose answers fill the other side,
    /// and sends catch-up only while half of it is free. Both keep reading what they can,
    /// so a full link in both directions must still drain (see `docs/protocol.md`, Flow
    /// control); `settle` fails if it does not.
    cap: usize,
}

/// A token reading `read` and writing `write`; every node may also take the simulation's
/// lease (leases need a grant on their name, read to probe and write to hold).
fn token(sub: &str, read: &[String], write: &[String], primary: bool, expired: bool) -> String {
    let now = now_secs();
    let primary: &[&str] = if primary { &["price"] } else { &[] };
    let lease = |scopes: &[String]| {
        let mut s = scopes.to_vec();
        s.push("lease:*".to_owned());
        s
    };
    Token::new(sub)
        .read(&lease(read))
        .write(&lease(write))
        .primary(primary)
        .expires_at(if expired { now - 3600 } else { now + 3600 })
        .mint()
}

fn is_crash(e: &ferry_core::Error) -> bool {
    let s = e.to_string();
    s.contains("interrupt")
}

fn run_seed(seed: u64) -> BTreeMap<&'static str, u64> {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Sim::new(seed, dir.path());
    if seed.is_multiple_of(BACKLOG_EVERY) {
        // A device back from a long time offline: a backlog of its own, pushed through the
        // same bounded links and faults.
        sim.backlog(0, BACKLOG_SETS);
    }
    let steps = 300 + sim.rng.random_range(0..400);
    sim.run(steps);
    sim.settle();
    if std::env::var_os("FERRY_SIM_DUMP").is_some() {
        eprintln!("{}", sim.trace);
    }
    sim.check();
    sim.stop_relay();
    std::mem::take(&mut sim.faults)
}

/// One seed in this many starts with a node holding a backlog of [`BACKLOG_SETS`].
const BACKLOG_EVERY: u64 = 75;
/// Change sets in a backlog seed's backlog.
const BACKLOG_SETS: usize = 10_000;
/// The marker of a backlog's transactions (which write no atomicity marker rows).
const BACKLOG_MARKER: &str = "backlog ";

#[test]
fn deterministic_simulation_seeds() {
    if let Ok(s) = std::env::var("FERRY_SIM_SEED") {
        run_seed(s.parse().expect("FERRY_SIM_SEED is a number"));
        return;
    }
    let long = std::env::var("FERRY_SIM_LONG")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("FERRY_SIM_LONG is seconds")));
    let seeds: u64 = std::env::var("FERRY_SIM_SEEDS")
        .ok()
        .map_or(300, |s| s.parse().expect("FERRY_SIM_SEEDS is a number"));
    let first: u64 = std::env::var("FERRY_SIM_FIRST")
        .ok()
        .map_or(1, |s| s.parse().unwrap());
    let started = Instant::now();
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut ran = 0;
    let mut seed = first;
    loop {
        match long {
            Some(limit) if started.elapsed() >= limit => break,
            None if ran >= seeds => break,
            _ => {}
        }
        for (k, v) in run_seed(seed) {
            *totals.entry(k).or_default() += v;
        }
        ran += 1;
        seed += 1;
    }
    eprintln!(
        "simulation: {ran} seeds ({first}..{}) in {:.1} s; faults injected: {totals:?}",
        seed - 1,
        started.elapsed().as_secs_f64()
    );
}
