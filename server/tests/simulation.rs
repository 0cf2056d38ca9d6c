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
//! released and lost, with fenced writes.
//!
//! Invariants checked after every run (and atomicity after every step):
//! * convergence: every replica holds exactly what a fresh replica with full read rights
//!   receives, restricted to its own read scopes (isolation), on the columns its schema has;
//! * no lost writes: every transaction an app committed is either in the relay log exactly
//!   once or was refused (compare-and-set, fence) and rolled back, as documented;
//! * counters exact: every counter equals the sum of the accepted increments;
//! * compare-and-set: each balance equals the number of accepted increments on it;
//! * fencing: fenced change sets are sequenced with non-decreasing tokens;
//! * atomicity: no replica ever shows part of a transaction (marker pairs).
//!
//! `cargo test --release --test simulation` runs `FERRY_SIM_SEEDS` seeds (300 by default);
//! `FERRY_SIM_SEED=n` replays one; `FERRY_SIM_LONG=secs` runs seeds until the time is up
//! and reports how many ran (`scripts/sim-long`). A failure prints the seed and its trace.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::SECRET;
use ferry_core::protocol::{ClientMsg, ErrorCode, LeaseOutcome, LeaseRequest, ServerMsg};
use ferry_core::sync::SyncClient;
use ferry_core::{
    ChangeId, Fence, OpenOptions, Replica, ReplicaId, Schema, TableDecl, Value, Verdict, WallClock,
};
use ferry_relay::auth::{Claims, Verifier, mint_hs256, now_secs};
use ferry_relay::catalog::RelayCatalog;
use ferry_relay::endpoint::{Close, Endpoint};
use ferry_relay::state::RelayState;
use ferry_relay::store::Store;
use ferry_relay::store::sqlite::SqliteStore;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOUR: i64 = 3_600_000;
const LEASE: &str = "sim-lease";

/// The app schema at `version` 1 or 2 (2 adds `note.prio` and a local table).
fn schema(version: u32) -> Schema {
    let mut note = TableDecl::new("note")
        .text_key("id")
        .text("body")
        .counter("n")
        .delete_rule(ferry_core::DeleteRule::UpdateWins);
    if version >= 2 {
        note = note.integer("prio");
    }
    let s = Schema::new(version)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("list")
                .text("title")
                .counter("votes")
                .scope("list"),
        )
        .table(TableDecl::new("tag").text_key("id").text("name"))
        .table(note)
        .table(
            TableDecl::new("price")
                .text_key("id")
                .integer("cents")
                .mode(ferry_core::TableMode::ReadOnly),
        )
        .table(
            TableDecl::new("acct")
                .text_key("id")
                .integer("balance")
                .text("holder")
                .mode(ferry_core::TableMode::ServerChecked),
        );
    if version >= 2 {
        s.migration(
            2,
            "CREATE TABLE IF NOT EXISTS local_prefs (k TEXT PRIMARY KEY, v TEXT)",
        )
    } else {
        s
    }
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
}

fn token(sub: &str, read: &[String], primary: bool, expired: bool) -> String {
    let now = now_secs();
    let claims = Claims {
        sub: sub.into(),
        exp: if expired { now - 3600 } else { now + 3600 },
        read: read.to_vec(),
        write: read.to_vec(),
        primary: if primary {
            vec!["price".into()]
        } else {
            vec![]
        },
        iss: None,
        aud: None,
    };
    mint_hs256(SECRET.as_bytes(), &claims).unwrap()
}

fn is_crash(e: &ferry_core::Error) -> bool {
    let s = e.to_string();
    s.contains("interrupt")
}

impl Sim {
    fn new(seed: u64, dir: &Path) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(2..=8usize);
        let start = (now_secs() * 1000 / HOUR as u64) * HOUR as u64;
        let time = Arc::new(AtomicU64::new(start));
        let mut sim = Sim {
            seed,
            rng,
            dir: dir.to_path_buf(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            time,
            shared: None,
            nodes: Vec::new(),
            links: Vec::new(),
            step: 0,
            trace: String::new(),
            seen_pushes: Vec::new(),
            faults: BTreeMap::new(),
        };
        for i in 0..n {
            let skew = match sim.rng.random_range(0..6) {
                0 => -3 * HOUR,
                1 => 2 * HOUR,
                2 => 30_000,
                _ => 0,
            };
            let v = if sim.rng.random_bool(0.3) { 2 } else { 1 };
            sim.nodes.push(Node {
                path: dir.join(format!("n{i}.db")),
                replica: None,
                schema_version: v,
                skew,
                client: SyncClient::new().with_batch(3, 1 << 20),
                link: None,
                cut_until: 0,
                stale_token: false,
                countdown: Arc::new(AtomicI64::new(i64::MAX)),
                committed: Vec::new(),
                lease: None,
                lease_pending: false,
                outdated: false,
                seq: 0,
                primary: i == 0,
            });
            sim.open_node(i);
            assert!(sim.nodes[i].replica.is_some(), "node {i} failed to open");
        }
        sim.start_relay();
        let _ = writeln!(sim.trace, "seed {seed}: {n} nodes");
        sim
    }

    fn note(&mut self, what: &'static str, detail: String) {
        *self.faults.entry(what).or_default() += 1;
        let _ = writeln!(self.trace, "{:>5} {what} {detail}", self.step);
    }

    fn reads(&self, i: usize) -> Vec<String> {
        vec!["global".into(), "list:shared".into(), list_of(i)]
    }

    fn start_relay(&mut self) {
        let cat = Arc::new(RelayCatalog::from_schema(schema(2)).unwrap());
        let cfg = ferry_relay::Config::from_toml(&format!(
            "schema = \"none.json\"\n[auth]\nhs256_secret = \"{SECRET}\"\n[checksums]\nenabled = false\n"
        ))
        .unwrap();
        let verifier = Verifier::from_config(&cfg.auth).unwrap();
        let store: Arc<dyn Store> = SqliteStore::open(&self.dir.join("relay"), cat.clone(), 256)
            .expect("relay store opens");
        let time = Arc::clone(&self.time);
        self.shared = Some(Arc::new(RelayState::new(
            Arc::new(cfg),
            cat,
            verifier,
            store,
            None,
            Arc::new(move || time.load(Ordering::SeqCst)),
            tokio_util::sync::CancellationToken::new(),
        )));
    }

    fn stop_relay(&mut self) {
        // Answers not yet delivered are lost with the process; what the store made durable stays.
        if let Some(shared) = self.shared.take() {
            for l in 0..self.links.len() {
                self.close_link(l);
            }
            self.links.clear();
            self.rt.block_on(shared.store.shutdown());
        }
    }

    fn open_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let opts = OpenOptions {
            wall_clock: Arc::new(SimClock(Arc::clone(&self.time), n.skew)),
            apply_chunk_ops: 6,
            new_replica_id: Some(ReplicaId([i as u8 + 1; 16])),
            primary_tables: if n.primary {
                vec!["price".into()]
            } else {
                vec![]
            },
            crash_countdown: Some(Arc::clone(&n.countdown)),
        };
        match Replica::open_with(&n.path, &schema(n.schema_version), opts) {
            Ok(r) => self.nodes[i].replica = Some(r),
            Err(e) if is_crash(&e) => {
                self.crash_node(i, "open");
            }
            Err(e) => panic!("seed {}: node {i} cannot reopen: {e}", self.seed),
        }
    }

    fn crash_node(&mut self, i: usize, during: &str) {
        self.note("replica crash", format!("node {i} during {during}"));
        self.take_down(i);
    }

    /// The node's process ends: its replica is dropped mid-whatever, its connection closes.
    fn take_down(&mut self, i: usize) {
        if let Some(l) = self.nodes[i].link.take() {
            self.close_link(l);
        }
        if let Some(r) = self.nodes[i].replica.take() {
            drop(r);
        }
        self.nodes[i].client.disconnected();
        self.nodes[i].lease_pending = false;
        self.nodes[i].countdown.store(i64::MAX, Ordering::SeqCst);
    }

    /// Ends a connection: the client hears of it at once; frames already on their way to the
    /// relay may still arrive (half-open) unless the relay is gone.
    fn close_link(&mut self, l: usize) {
        let link = &mut self.links[l];
        if !link.live {
            return;
        }
        link.live = false;
        link.down.clear();
        let node = link.node;
        if self.nodes[node].link == Some(l) {
            self.nodes[node].link = None;
            self.nodes[node].client.disconnected();
            self.nodes[node].lease_pending = false;
        }
    }

    /// Runs `f` on node `i`'s replica; an injected crash takes the node down.
    fn with_replica<T>(
        &mut self,
        i: usize,
        what: &str,
        f: impl FnOnce(&Replica, &mut Node) -> ferry_core::Result<T>,
    ) -> Option<T> {
        let r = self.nodes[i].replica.take()?;
        let out = f(&r, &mut self.nodes[i]);
        self.nodes[i].replica = Some(r);
        match out {
            Ok(v) => Some(v),
            Err(e) if is_crash(&e) => {
                self.crash_node(i, what);
                None
            }
            Err(e) => panic!("seed {}: node {i} {what}: {e}\n{}", self.seed, self.trace),
        }
    }

    fn check_atomic(&mut self, i: usize) {
        let Some(r) = self.nodes[i].replica.as_ref() else {
            return;
        };
        let rows = match r.query(
            "SELECT (SELECT count(*) FROM tag WHERE id LIKE 'a/%'), (SELECT count(*) FROM tag WHERE id LIKE 'b/%'), \
             (SELECT count(*) FROM tag a WHERE a.id LIKE 'a/%' AND NOT EXISTS (SELECT 1 FROM tag b WHERE b.id = 'b/' || substr(a.id, 3)))",
            &[],
        ) {
            Ok(r) => r,
            Err(e) if is_crash(&e) => {
                self.crash_node(i, "query");
                return;
            }
            Err(e) => panic!("seed {}: {e}", self.seed),
        };
        let row = &rows.rows[0];
        assert!(
            row[0] == row[1] && row[2] == Value::Integer(0),
            "seed {}: node {i} shows part of a transaction: {row:?}\n{}",
            self.seed,
            self.trace
        );
    }

    /// A random local transaction of several operations.
    fn write(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.seq += 1;
        let marker = format!("{i}/{}", node.seq);
        let list = if self.rng.random_bool(0.5) {
            "list:shared".to_owned()
        } else {
            list_of(i)
        };
        let kinds: Vec<u8> = (0..self.rng.random_range(1..=3))
            .map(|_| self.rng.random_range(0..8u8))
            .collect();
        let key = self.rng.random_range(0..3u8);
        let delta = self.rng.random_range(-3..=5i64);
        let word = format!("w{}", self.rng.random_range(0..1000));
        let fenced = kinds.contains(&7) && self.nodes[i].lease.is_some();
        let primary = self.nodes[i].primary;
        let v2 = self.nodes[i].schema_version >= 2;
        let seed = self.seed;
        let res = self.with_replica(i, "write", |r, node| {
            // Documented: while a checked change set is pending, later ones are checked too.
            let mut behind_checked = false;
            for c in node.committed.iter().rev().filter(|c| c.checked) {
                if r.verdict(&c.id)? == Verdict::Pending {
                    behind_checked = true;
                    break;
                }
            }
            let mut tx = r.begin()?;
            if fenced {
                tx.guard(Fence {
                    lease: LEASE.into(),
                    token: node.lease.unwrap_or(0),
                })?;
            }
            let mut votes = Vec::new();
            let mut cas = None;
            for k in &kinds {
                match k {
                    0 | 1 => {
                        let id = format!("{list}/k{key}");
                        if tx.execute(
                            "UPDATE todo SET title = ? WHERE id = ?",
                            &[Value::Text(word.clone()), Value::Text(id.clone())],
                        )? == 0
                        {
                            tx.execute(
                                "INSERT INTO todo (id, list, title, votes) VALUES (?, ?, ?, 0)",
                                &[
                                    Value::Text(id),
                                    Value::Text(list.clone()),
                                    Value::Text(word.clone()),
                                ],
                            )?;
                        }
                    }
                    2 => {
                        let id = format!("{list}/k{key}");
                        if tx.execute(
                            "UPDATE todo SET votes = votes + ? WHERE id = ?",
                            &[Value::Integer(delta), Value::Text(id.clone())],
                        )? == 1
                        {
                            votes.push((id, delta));
                        }
                    }
                    3 => {
                        let id = format!("n{key}");
                        let prio = if v2 { ", prio = 7" } else { "" };
                        if tx.execute(
                            &format!("UPDATE note SET body = ?, n = n + 1{prio} WHERE id = ?"),
                            &[Value::Text(word.clone()), Value::Text(id.clone())],
                        )? == 0
                        {
                            tx.execute(
                                "INSERT INTO note (id, body, n) VALUES (?, ?, 1)",
                                &[Value::Text(id), Value::Text(word.clone())],
                            )?;
                        }
                    }
                    4 => {
                        tx.execute(
                            "DELETE FROM note WHERE id = ?",
                            &[Value::Text(format!("n{key}"))],
                        )?;
                    }
                    5 if primary => {
                        tx.execute(
                            "INSERT OR REPLACE INTO price (id, cents) VALUES (?, ?)",
                            &[Value::Text(format!("p{key}")), Value::Integer(delta + 100)],
                        )?;
                    }
                    6 if cas.is_none() => {
                        let id = format!("a{}", key % 2);
                        let b = tx.query(
                            "SELECT balance FROM acct WHERE id = ?",
                            &[Value::Text(id.clone())],
                        )?;
                        match b.rows.first().map(|r| r[0].clone()) {
                            Some(Value::Integer(b)) => {
                                tx.execute(
                                    "UPDATE acct SET balance = ?, holder = ? WHERE id = ?",
                                    &[
                                        Value::Integer(b + 1),
                                        Value::Text(format!("n{i}")),
                                        Value::Text(id.clone()),
                                    ],
                                )?;
                            }
                            other => {
                                assert!(other.is_none(), "seed {seed}: balance {other:?}");
                                tx.execute(
                                    "INSERT INTO acct (id, balance, holder) VALUES (?, 1, ?)",
                                    &[Value::Text(id.clone()), Value::Text(format!("n{i}"))],
                                )?;
                            }
                        }
                        cas = Some(id);
                    }
                    _ => {
                        tx.execute(
                            "INSERT OR REPLACE INTO note (id, body, n) VALUES ('fenced', ?, 0)",
                            &[Value::Text(format!("n{i}"))],
                        )?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO tag (id, name) VALUES (?, ?), (?, ?)",
                &[
                    Value::Text(format!("a/{marker}")),
                    Value::Text(word.clone()),
                    Value::Text(format!("b/{marker}")),
                    Value::Text(word.clone()),
                ],
            )?;
            let id = tx.commit_change()?.expect("synced rows were written");
            node.committed.push(Committed {
                id,
                votes,
                checked: cas.is_some() || fenced || behind_checked,
                cas,
                marker: marker.clone(),
            });
            Ok(())
        });
        if res.is_some() {
            let checked = self.nodes[i].committed.last().is_some_and(|c| c.checked);
            let _ = writeln!(
                self.trace,
                "{:>5} write node {i} {marker} {kinds:?}{}",
                self.step,
                if checked { " checked" } else { "" }
            );
        }
    }

    fn connect(&mut self, i: usize) {
        let node = &self.nodes[i];
        if node.link.is_some()
            || node.replica.is_none()
            || node.cut_until > self.step
            || self.shared.is_none()
        {
            return;
        }
        let expired = std::mem::take(&mut self.nodes[i].stale_token);
        let tok = token(
            &format!("n{i}"),
            &self.reads(i),
            self.nodes[i].primary,
            expired,
        );
        let Some(hello) = self.with_replica(i, "hello", |r, node| node.client.start(r, &tok))
        else {
            return;
        };
        self.links.push(Link {
            node: i,
            live: true,
            relay_closed: false,
            ep: None,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
        });
        self.nodes[i].link = Some(self.links.len() - 1);
        let _ = writeln!(
            self.trace,
            "{:>5} connect node {i}{}",
            self.step,
            if expired { " (expired token)" } else { "" }
        );
    }

    /// The relay reads one frame of link `l`.
    fn deliver_up(&mut self, l: usize) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.links[l].relay_closed {
            self.links[l].up.clear();
            return;
        }
        let Some(msg) = self.links[l].up.pop_front() else {
            return;
        };
        if let ClientMsg::Push { .. } = &msg {
            self.seen_pushes.push((self.links[l].node, msg.clone()));
        }
        let kind = msg.kind();
        let result: Result<Vec<ServerMsg>, Close> = self.rt.block_on(async {
            match self.links[l].ep.as_mut() {
                None => match Endpoint::open(&shared, msg).await {
                    Ok((ep, welcome)) => {
                        self.links[l].ep = Some(ep);
                        Ok(vec![welcome])
                    }
                    Err(c) => Err(c),
                },
                Some(ep) => ep.handle(msg).await,
            }
        });
        let node = self.links[l].node;
        let _ = writeln!(
            self.trace,
            "{:>5} relay <- node {node} {kind} (link {l}){}",
            self.step,
            match &result {
                Err(c) => format!(" closed: {:?} {}", c.code, c.message),
                Ok(_) => String::new(),
            }
        );
        match result {
            Ok(replies) => {
                if self.links[l].live {
                    self.links[l].down.extend(replies);
                }
            }
            Err(close) => {
                if self.links[l].live {
                    self.links[l].down.push_back(ServerMsg::Error {
                        code: close.code,
                        message: close.message,
                    });
                }
                self.links[l].up.clear();
                self.links[l].ep = None;
                self.links[l].relay_closed = true;
            }
        }
    }

    /// The client of link `l` reads one frame.
    fn deliver_down(&mut self, l: usize) {
        let node = self.links[l].node;
        if !self.links[l].live || self.nodes[node].link != Some(l) {
            return;
        }
        let Some(msg) = self.links[l].down.pop_front() else {
            return;
        };
        let is_error = matches!(msg, ServerMsg::Error { .. });
        let kind = match &msg {
            ServerMsg::Refused {
                origin_seq,
                code,
                message,
                ..
            } => {
                format!("refused {origin_seq} {code:?} {message}")
            }
            ServerMsg::Error { code, message } => format!("error {code:?} {message}"),
            ServerMsg::Changes {
                after,
                up_to,
                change_sets,
                ..
            } => {
                format!("changes ({after}, {up_to}] {} sets", change_sets.len())
            }
            ServerMsg::Acks { acks } => format!("acks {acks:?}"),
            other => format!("{:?}", std::mem::discriminant(other)),
        };
        let out = self.with_replica(node, "handle", |r, n| {
            let step = n.client.handle(r, msg);
            Ok(step)
        });
        let _ = writeln!(self.trace, "{:>5} node {node} <- {kind}", self.step);
        let Some(step) = out else { return };
        match step {
            Ok(step) => {
                if let Some((_, outcome)) = step.lease {
                    let n = &mut self.nodes[node];
                    n.lease_pending = false;
                    match outcome {
                        LeaseOutcome::Granted { token, .. } => n.lease = Some(token),
                        LeaseOutcome::Released { .. } | LeaseOutcome::Lost { .. } => n.lease = None,
                        LeaseOutcome::Busy { .. } => {}
                    }
                }
                if let Some(refused) = step.refused {
                    panic!(
                        "seed {}: node {node} push refused for good: {refused:?}\n{}",
                        self.seed, self.trace
                    );
                }
                if step.reconnect {
                    self.close_link(l);
                } else {
                    self.links[l].up.extend(step.send);
                }
                self.check_atomic(node);
            }
            Err(e) if is_crash(&e) => self.crash_node(node, "apply"),
            Err(e) if e.to_string().contains("newer app version") => {
                // Documented policy: downloads stop here until the app is upgraded.
                self.note("outdated schema stop", format!("node {node}"));
                self.nodes[node].outdated = true;
                self.close_link(l);
            }
            Err(e) => {
                assert!(
                    is_error,
                    "seed {}: node {node} failed: {e}\n{}",
                    self.seed, self.trace
                );
                let msg = e.to_string();
                assert!(
                    msg.contains("Unauthorized") || msg.contains("ShuttingDown"),
                    "seed {}: node {node} was refused: {msg}\n{}",
                    self.seed,
                    self.trace
                );
                self.close_link(l);
            }
        }
    }

    /// The relay sends what each live connection has not been told yet.
    fn fan_out(&mut self) {
        if self.shared.is_none() {
            return;
        }
        for l in 0..self.links.len() {
            if !self.links[l].live || self.links[l].relay_closed {
                continue;
            }
            let Some(ep) = self.links[l].ep.as_mut() else {
                continue;
            };
            let mut out = Vec::new();
            let r = self.rt.block_on(ep.changes(true, 4, &mut out));
            match r {
                Ok(_) => self.links[l].down.extend(out),
                Err(c) => panic!("seed {}: fan-out failed: {c:?}", self.seed),
            }
        }
    }

    fn pump(&mut self, i: usize) {
        let Some(l) = self.nodes[i].link else { return };
        if let Some(Some(push)) = self.with_replica(i, "push", |r, n| n.client.poll_push(r)) {
            self.links[l].up.push_back(push);
        }
    }

    fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step += 1;
            self.time
                .fetch_add(self.rng.random_range(1..50), Ordering::SeqCst);
            let n = self.nodes.len();
            let i = self.rng.random_range(0..n);
            match self.rng.random_range(0..100u32) {
                0..=17 => self.write(i),
                18..=27 => self.connect(i),
                28..=52 => {
                    let l = self.random_link(true);
                    if let Some(l) = l {
                        self.deliver_up(l);
                    }
                }
                53..=77 => {
                    if let Some(l) = self.random_link(false) {
                        self.deliver_down(l);
                    }
                }
                78..=82 => self.fan_out(),
                83..=85 => self.pump(i),
                86 => {
                    // Partition: the node's link goes away and stays down for a while.
                    if let Some(l) = self.nodes[i].link {
                        self.close_link(l);
                    }
                    self.nodes[i].cut_until = self.step + self.rng.random_range(5..200);
                    self.note(
                        "partition",
                        format!("node {i} until {}", self.nodes[i].cut_until),
                    );
                }
                87 => {
                    // A lost message resets the connection; half of the time its frames to
                    // the relay are still delivered later (half-open).
                    if let Some(l) = self.nodes[i].link {
                        let half_open = self.rng.random_bool(0.5);
                        if !half_open {
                            self.links[l].up.clear();
                        }
                        self.close_link(l);
                        self.note(
                            "connection reset",
                            format!("node {i} link {l} half_open={half_open}"),
                        );
                    }
                }
                88 => {
                    // A push sent earlier arrives again, late, on an older connection of the
                    // same node that the relay still holds open (a duplicated segment from a
                    // connection the node has left): the relay must not take it.
                    if !self.seen_pushes.is_empty() {
                        let k = self.rng.random_range(0..self.seen_pushes.len());
                        let (from, msg) = self.seen_pushes[k].clone();
                        let old: Vec<usize> = (0..self.links.len())
                            .filter(|&l| {
                                let k = &self.links[l];
                                k.node == from && !k.live && !k.relay_closed && k.ep.is_some()
                            })
                            .collect();
                        if !old.is_empty() {
                            let l = old[self.rng.random_range(0..old.len())];
                            self.links[l].up.push_back(msg);
                            self.note("replayed push", format!("node {from} link {l}"));
                        }
                    }
                }
                89 => {
                    // Crash at a random SQLite instruction of whatever the node does next.
                    if self.nodes[i].replica.is_some() {
                        let at = self.rng.random_range(0..400);
                        self.nodes[i].countdown.store(at, Ordering::SeqCst);
                        let _ =
                            writeln!(self.trace, "{:>5} node {i} will crash in {at}", self.step);
                    }
                }
                90 => {
                    if self.nodes[i].replica.is_none() {
                        if self.nodes[i].schema_version == 1 && self.rng.random_bool(0.3) {
                            self.nodes[i].schema_version = 2;
                            self.note("schema upgrade", format!("node {i}"));
                        }
                        self.open_node(i);
                        let _ = writeln!(self.trace, "{:>5} node {i} restarted", self.step);
                    }
                }
                91 => {
                    if self.shared.is_some() && self.rng.random_bool(0.3) {
                        self.stop_relay();
                        self.note("relay crash", String::new());
                    } else if self.shared.is_none() {
                        self.start_relay();
                        let _ = writeln!(self.trace, "{:>5} relay restarted", self.step);
                    }
                }
                92 => {
                    // Token expiry: mid-connection the relay closes with an auth error; the
                    // next hello presents the expired token once and is refused too.
                    if let Some(l) = self.nodes[i].link {
                        self.links[l].down.push_back(ServerMsg::Error {
                            code: ErrorCode::Unauthorized,
                            message: "token expired; connect again with a fresh token".into(),
                        });
                        self.links[l].up.clear();
                        self.links[l].ep = None;
                        self.links[l].relay_closed = true;
                    }
                    self.nodes[i].stale_token = true;
                    self.note("token expiry", format!("node {i}"));
                }
                93..=94 => self.lease(i),
                _ => {
                    // Delay: time passes with everything queued.
                    self.time
                        .fetch_add(self.rng.random_range(100..5_000), Ordering::SeqCst);
                }
            }
        }
    }

    fn lease(&mut self, i: usize) {
        let Some(l) = self.nodes[i].link else { return };
        if self.nodes[i].lease_pending || self.links[l].ep.is_none() && self.links[l].up.is_empty()
        {
            return;
        }
        let request = match self.nodes[i].lease {
            Some(token) => LeaseRequest::Release {
                name: LEASE.into(),
                token,
            },
            None => LeaseRequest::Acquire {
                name: LEASE.into(),
                ttl_ms: 600_000,
            },
        };
        self.nodes[i].lease_pending = true;
        self.links[l].up.push_back(ClientMsg::Lease {
            nonce: self.step,
            request,
        });
        self.note("lease request", format!("node {i}"));
    }

    fn random_link(&mut self, up: bool) -> Option<usize> {
        let cands: Vec<usize> = (0..self.links.len())
            .filter(|&l| {
                let k = &self.links[l];
                if up {
                    !k.up.is_empty()
                } else {
                    k.live && !k.down.is_empty()
                }
            })
            .collect();
        if cands.is_empty() {
            None
        } else {
            Some(cands[self.rng.random_range(0..cands.len())])
        }
    }

    /// Heals everything and runs the protocol until every replica is synced.
    fn settle(&mut self) {
        let _ = writeln!(self.trace, "{:>5} settle", self.step);
        if self.shared.is_none() {
            self.start_relay();
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].cut_until = 0;
            self.nodes[i].stale_token = false;
            self.nodes[i].countdown.store(i64::MAX, Ordering::SeqCst);
            if self.nodes[i].replica.is_none() {
                self.open_node(i);
            }
        }
        for round in 0..20_000 {
            self.step += 1;
            let mut busy = false;
            for i in 0..self.nodes.len() {
                if std::mem::take(&mut self.nodes[i].outdated) {
                    // The remedy the error names: the app upgrades.
                    self.take_down(i);
                    self.nodes[i].schema_version = 2;
                    self.open_node(i);
                }
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].link.is_none() {
                    self.connect(i);
                    busy = true;
                }
            }
            for l in 0..self.links.len() {
                while !self.links[l].up.is_empty() {
                    self.deliver_up(l);
                    busy = true;
                }
            }
            self.fan_out();
            for l in 0..self.links.len() {
                while self.links[l].live && !self.links[l].down.is_empty() {
                    self.deliver_down(l);
                    busy = true;
                }
            }
            for i in 0..self.nodes.len() {
                self.pump(i);
            }
            let all_synced = (0..self.nodes.len()).all(|i| {
                let n = &self.nodes[i];
                n.replica
                    .as_ref()
                    .is_some_and(|r| n.client.is_synced(r).unwrap_or(false))
            });
            if all_synced && !busy {
                // Ping so every cursor reaches the head.
                let head = self
                    .rt
                    .block_on(self.shared.as_ref().unwrap().store.head())
                    .unwrap();
                if (0..self.nodes.len())
                    .all(|i| self.nodes[i].replica.as_ref().unwrap().cursor().unwrap() >= head)
                {
                    let _ = writeln!(self.trace, "settled after {round} rounds at head {head}");
                    return;
                }
            }
            if round > 0 && round % 3 == 0 {
                for i in 0..self.nodes.len() {
                    if let Some(l) = self.nodes[i].link {
                        self.links[l].up.push_back(ClientMsg::Ping { nonce: round });
                    }
                }
            }
        }
        panic!("seed {}: did not settle\n{}", self.seed, self.trace);
    }

    fn rows(
        r: &Replica,
        table: &str,
        v2: bool,
        filter: &dyn Fn(&[Value]) -> bool,
    ) -> Vec<Vec<Value>> {
        let q = r
            .query(
                &format!("SELECT {} FROM {table} ORDER BY id", columns(table, v2)),
                &[],
            )
            .unwrap();
        q.rows.into_iter().filter(|row| filter(row)).collect()
    }

    /// Every invariant, once settled.
    fn check(&mut self) {
        let seed = self.seed;
        // The reference: a fresh replica that may read everything.
        let refdir = self.dir.join("reference.db");
        let reference = Replica::open_with(
            &refdir,
            &schema(2),
            OpenOptions {
                new_replica_id: Some(ReplicaId([0xEE; 16])),
                ..Default::default()
            },
        )
        .unwrap();
        let shared = Arc::clone(self.shared.as_ref().unwrap());
        let mut client = SyncClient::new();
        let tok = token("reference", &["*".into()], false, false);
        let mut outbox = VecDeque::from([client.start(&reference, &tok).unwrap()]);
        let mut ep: Option<Endpoint> = None;
        while let Some(msg) = outbox.pop_front() {
            let replies = self.rt.block_on(async {
                match ep.as_mut() {
                    None => {
                        let (e, w) = Endpoint::open(&shared, msg).await.unwrap();
                        ep = Some(e);
                        vec![w]
                    }
                    Some(e) => {
                        let mut out = e.handle(msg).await.unwrap();
                        e.changes(true, 1000, &mut out).await.unwrap();
                        out
                    }
                }
            });
            for reply in replies {
                outbox.extend(client.handle(&reference, reply).unwrap().send);
            }
            if outbox.is_empty() && !client.is_synced(&reference).unwrap() {
                outbox.push_back(ClientMsg::Ping { nonce: 1 });
            }
        }
        let head = self.rt.block_on(shared.store.head()).unwrap();
        assert_eq!(reference.cursor().unwrap(), head);

        // The relay's log: every committed change set exactly once, or refused.
        let log = self
            .rt
            .block_on(shared.store.read(0, usize::MAX, usize::MAX))
            .unwrap();
        assert_eq!(log.len() as u64, head, "seed {seed}: gap in the log");
        let mut in_log: BTreeMap<[u8; 16], u64> = BTreeMap::new();
        let mut last_fence = 0;
        for s in &log {
            *in_log.entry(s.change_set.id).or_default() += 1;
            if let Some(f) = &s.change_set.fence {
                assert!(
                    f.token >= last_fence,
                    "seed {seed}: fenced write with token {} sequenced after token {last_fence}",
                    f.token
                );
                last_fence = f.token;
            }
        }
        let mut votes: BTreeMap<String, i64> = BTreeMap::new();
        let mut balance: BTreeMap<String, i64> = BTreeMap::new();
        let mut markers = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let r = node.replica.as_ref().unwrap();
            for c in &node.committed {
                match r.verdict(&c.id).unwrap() {
                    Verdict::Accepted(_) => {
                        assert_eq!(
                            in_log.get(&c.id.0),
                            Some(&1),
                            "seed {seed}: node {i} write {} acknowledged but not in the log once\n{}",
                            c.marker,
                            self.trace
                        );
                        for (k, d) in &c.votes {
                            *votes.entry(k.clone()).or_default() += d;
                        }
                        if let Some(a) = &c.cas {
                            *balance.entry(a.clone()).or_default() += 1;
                        }
                        markers.insert(c.marker.clone());
                    }
                    Verdict::Rejected(why) => {
                        assert!(
                            c.checked
                                || why.contains("fence")
                                || why.contains("lease")
                                || why.contains("written on top of"),
                            "seed {seed}: node {i} write {} refused: {why}\n{}",
                            c.marker,
                            self.trace
                        );
                        // Withdrawn: at most an empty placeholder keeps its origin_seq.
                        assert!(
                            log.iter()
                                .all(|s| s.change_set.id != c.id.0 || s.change_set.rows.is_empty()),
                            "seed {seed}: node {i} write {} refused ({why}) yet in the log: {:?}\n{}",
                            c.marker,
                            log.iter().find(|s| s.change_set.id == c.id.0),
                            self.trace
                        );
                    }
                    Verdict::Pending => panic!(
                        "seed {seed}: node {i} write {} still pending after settling\n{}",
                        c.marker, self.trace
                    ),
                }
            }
        }
        // Counters and balances from what was accepted.
        for row in Self::rows(&reference, "todo", false, &|_| true) {
            let Value::Text(id) = &row[0] else { panic!() };
            let expect = votes.get(id).copied().unwrap_or(0);
            assert_eq!(
                row[3],
                Value::Integer(expect),
                "seed {seed}: votes of {id}\n{}",
                self.trace
            );
        }
        for row in Self::rows(&reference, "acct", false, &|_| true) {
            let Value::Text(id) = &row[0] else { panic!() };
            let expect = balance.get(id).copied().unwrap_or(0);
            assert_eq!(
                row[1],
                Value::Integer(expect),
                "seed {seed}: balance of {id} (compare-and-set); history:\n{}\n{}",
                history(&log, "acct"),
                self.trace
            );
        }
        let tags: BTreeSet<String> = Self::rows(&reference, "tag", false, &|_| true)
            .into_iter()
            .filter_map(|r| match &r[0] {
                Value::Text(t) if t.starts_with("a/") => Some(t[2..].to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            tags, markers,
            "seed {seed}: accepted transactions vs markers"
        );
        // Convergence and isolation.
        for (i, node) in self.nodes.iter().enumerate() {
            let r = node.replica.as_ref().unwrap();
            let lists = ["list:shared".to_owned(), list_of(i)];
            let v2 = node.schema_version >= 2;
            for t in TABLES {
                let visible = |row: &[Value]| {
                    t != "todo" || matches!(&row[1], Value::Text(l) if lists.contains(l))
                };
                let mine = Self::rows(r, t, v2, &|_| true);
                let want = Self::rows(&reference, t, v2, &visible);
                assert_eq!(
                    mine,
                    want,
                    "seed {seed}: node {i} table {t} differs; its history:\n{}\nits conflict log: {:#?}\n{}",
                    history(&log, t),
                    meta_dump(&node.path, t),
                    self.trace
                );
            }
        }
    }
}

/// A replica file's merge metadata of `table`, for failure messages.
fn meta_dump(path: &Path, table: &str) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT r.pk, r.cl, r.meta FROM ferry_rows r JOIN ferry_tables t ON t.id = r.tbl WHERE t.name = ?1")
        .unwrap();
    let rows: Vec<(Value, i64, Vec<u8>)> = st
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut out = String::new();
    for (pk, cl, meta) in rows {
        let m = ferry_core::inspect::row_metadata(cl as u64, &meta).unwrap();
        let _ = writeln!(out, "  {pk:?}: {m}");
    }
    out
}

/// Every change to `table` in the relay's log, for failure messages.
fn history(log: &[Arc<ferry_relay::store::StoredSet>], table: &str) -> String {
    let mut h = String::new();
    for s in log {
        for rc in s.change_set.rows.iter().filter(|rc| rc.table == table) {
            let _ = writeln!(
                h,
                "  @{} {} #{} {:?} base {} {:?} cl {} {:?}",
                s.server_seq,
                s.change_set.origin,
                s.change_set.origin_seq,
                s.change_set.hlc,
                s.change_set.base,
                rc.pk,
                rc.cl,
                rc.op
            );
        }
    }
    h
}

fn run_seed(seed: u64) -> BTreeMap<&'static str, u64> {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Sim::new(seed, dir.path());
    let steps = 300 + sim.rng.random_range(0..400);
    sim.run(steps);
    sim.settle();
    sim.check();
    sim.stop_relay();
    std::mem::take(&mut sim.faults)
}

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
