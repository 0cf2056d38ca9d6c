//! The simulated world: the relay and the nodes coming up, crashing and restarting, and the
//! scheduler that picks what happens at each step.

use super::*;

impl Sim {
    pub(crate) fn new(seed: u64, dir: &Path) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(2..=8usize);
        let cap = rng.random_range(2..=16usize);
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
            cap,
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
                narrow_until: 0,
            });
            sim.open_node(i);
            assert!(sim.nodes[i].replica.is_some(), "node {i} failed to open");
        }
        sim.start_relay();
        let _ = writeln!(sim.trace, "seed {seed}: {n} nodes, links of {cap} frames");
        sim
    }

    pub(crate) fn note(&mut self, what: &'static str, detail: String) {
        *self.faults.entry(what).or_default() += 1;
        let _ = writeln!(self.trace, "{:>5} {what} {detail}", self.step);
    }

    pub(crate) fn reads(&self, i: usize) -> Vec<String> {
        vec!["global".into(), "list:shared".into(), list_of(i)]
    }

    pub(crate) fn start_relay(&mut self) {
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

    pub(crate) fn stop_relay(&mut self) {
        // Answers not yet delivered are lost with the process; what the store made durable stays.
        if let Some(shared) = self.shared.take() {
            for l in 0..self.links.len() {
                self.close_link(l);
            }
            self.links.clear();
            self.rt.block_on(shared.store.shutdown());
        }
    }

    pub(crate) fn open_node(&mut self, i: usize) {
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

    pub(crate) fn crash_node(&mut self, i: usize, during: &str) {
        self.note("replica crash", format!("node {i} during {during}"));
        self.take_down(i);
    }

    /// The node's process ends: its replica is dropped mid-whatever, its connection closes.
    pub(crate) fn take_down(&mut self, i: usize) {
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

    /// Runs `f` on node `i`'s replica; an injected crash takes the node down.
    pub(crate) fn with_replica<T>(
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

    pub(crate) fn run(&mut self, steps: u64) {
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
                95..=96 => {
                    // The relay folds its row histories some way forward, so a node's first
                    // connection (and a reconnection cut off during it) gets a snapshot of
                    // whatever the others wrote by then.
                    if let Some(shared) = &self.shared {
                        let rows = self.rng.random_range(1..400);
                        let at = self.rt.block_on(shared.store.fold_rows(rows));
                        if let Ok(at) = at {
                            let _ = writeln!(self.trace, "{:>5} relay folded to {at}", self.step);
                        }
                    }
                }
                97 => {
                    // The user loses the grant to write the shared list for a while (the
                    // next hello shows it); once it is back, the app decides about what was
                    // quarantined meanwhile.
                    let until = self.nodes[i].narrow_until;
                    if until > self.step {
                        // Still narrowed: nothing changes.
                    } else if until != 0 && self.rng.random_bool(0.7) {
                        self.decide_quarantined(i);
                    } else {
                        self.nodes[i].narrow_until = self.step + self.rng.random_range(20..200);
                        if let Some(l) = self.nodes[i].link {
                            self.close_link(l);
                        }
                        self.note(
                            "narrowed token",
                            format!("node {i} until {}", self.nodes[i].narrow_until),
                        );
                    }
                }
                _ => {
                    // Delay: time passes with everything queued.
                    self.time
                        .fetch_add(self.rng.random_range(100..5_000), Ordering::SeqCst);
                }
            }
        }
    }

    /// Heals everything and runs the protocol until every replica is synced.
    pub(crate) fn settle(&mut self) {
        let _ = writeln!(self.trace, "{:>5} settle", self.step);
        if self.shared.is_none() {
            self.start_relay();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].narrow_until > 1 {
                // The grant is back: the next hello shows it.
                self.nodes[i].narrow_until = 1;
                if let Some(l) = self.nodes[i].link {
                    self.close_link(l);
                }
            }
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
                if self.nodes[i].narrow_until != 0 && self.decide_quarantined(i) {
                    busy = true;
                }
                if self.nodes[i].link.is_none() {
                    self.connect(i);
                    busy = true;
                }
            }
            for l in 0..self.links.len() {
                while self.relay_reads(l) {
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
                // As many pushes as the link and the client's window take.
                for _ in 0..self.cap {
                    self.pump(i);
                }
            }
            let all_synced = (0..self.nodes.len()).all(|i| {
                let n = &self.nodes[i];
                n.replica.as_ref().is_some_and(|r| {
                    n.client.is_synced(r).unwrap_or(false)
                        && r.quarantined().is_ok_and(|q| q.is_empty())
                })
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
}
