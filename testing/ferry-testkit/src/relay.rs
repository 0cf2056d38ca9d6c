//! Real relay processes on 127.0.0.1 and replicas connected to them: a relay on the embedded
//! store (or several over one PostgreSQL database), started from the `ferry-relay` binary the
//! test build produced, with the relay schema and the test secret; checks of its stored log.

use ferry_core::{Replica, Schema, SyncHandle, SyncOptions};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::change::{i, t};
pub use crate::pg::{fresh_pg_db, pg_server};
pub use crate::token::{SECRET, Token, admin_token, token_for, token_until};
pub use crate::{eventually, proxy, raw, seeds};

/// The relay tests' schema ([`crate::schema::relay`] at version 1).
pub fn schema() -> Schema {
    crate::schema::relay(1)
}

/// The `ferry-relay` binary of this build: `FERRY_RELAY_BIN` when set, else the one beside the
/// running test binary's directory (`target/<profile>/`; cargo builds it for the relay's
/// integration tests).
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join(format!("ferry-relay{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build it (cargo build -p ferry-relay) or set FERRY_RELAY_BIN",
        bin.display()
    );
    bin
}

/// A relay process; killed when dropped.
pub struct RelayProc {
    /// Its folder (config, schema, data).
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its admin listener (`/metrics`, `/readyz`).
    pub admin: SocketAddr,
    /// The process, while it runs.
    pub child: Option<Child>,
    extra: String,
    store: String,
}

impl RelayProc {
    /// A relay on the embedded store in `dir`.
    pub fn start(dir: &Path) -> RelayProc {
        Self::start_with(dir, "")
    }

    /// `extra` is appended to the generated config (TOML), right after the `[auth]` table:
    /// bare keys extend `[auth]`, tables add sections.
    pub fn start_with(dir: &Path, extra: &str) -> RelayProc {
        Self::start_on(dir, "sqlite", extra)
    }

    /// A relay on `store` (`sqlite` or a postgres:// URL).
    pub fn start_on(dir: &Path, store: &str, extra: &str) -> RelayProc {
        std::fs::create_dir_all(dir).unwrap();
        let schema_path = dir.join("schema.json");
        std::fs::write(
            &schema_path,
            serde_json::to_string_pretty(&schema()).unwrap(),
        )
        .unwrap();
        let mut r = RelayProc {
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            child: None,
            extra: extra.to_owned(),
            store: store.to_owned(),
        };
        r.spawn();
        r
    }

    fn config(&self) -> PathBuf {
        let p = self.dir.join("relay.toml");
        let text = format!(
            "listen = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\nstore = \"{}\"\ndata = \"{}\"\nschema = \"{}\"\n[log]\nlevel = \"warn\"\n[auth]\nhs256_secret = \"{SECRET}\"\n{}",
            self.addr,
            self.store,
            self.dir.join("data").display(),
            self.dir.join("schema.json").display(),
            self.extra
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    fn spawn(&mut self) {
        let cfg = self.config();
        let mut child = Command::new(relay_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn relay");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(out);
        reader.read_line(&mut line).unwrap();
        let last = |line: &str| -> SocketAddr {
            line.trim()
                .rsplit(' ')
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("relay did not report its address: {line:?}"))
        };
        self.addr = last(&line);
        let mut admin = String::new();
        reader.read_line(&mut admin).unwrap();
        self.admin = last(&admin);
        self.child = Some(child);
    }

    /// Its sync URL.
    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    /// Resident memory of the relay process, in KiB (`VmRSS`, or `VmHWM` for the peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// The value of a metric from the relay's `/metrics` (0 when it was never recorded):
    /// `name` as the line starts, labels included (`name{label="value"}`).
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last())
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (graceful).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let c = self.child.take().expect("running");
        let pid = c.id();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let mut c = c;
        c.wait().unwrap()
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let cfg_addr = self.addr;
            let free = std::net::TcpListener::bind(cfg_addr).is_ok();
            if free || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sync options for tests: quick reconnects, pings every 2 s.
pub fn fast_opts() -> SyncOptions {
    SyncOptions {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        ping_interval: Duration::from_secs(2),
        ..SyncOptions::default()
    }
}

/// Opens replica `name` in `dir` with [`schema`].
pub fn open(dir: &Path, name: &str) -> Arc<Replica> {
    Arc::new(Replica::open(dir.join(name), &schema()).unwrap())
}

/// Connects a replica to `url` with a fixed token and [`fast_opts`].
pub fn connect(r: &Arc<Replica>, url: &str, token: String) -> SyncHandle {
    r.connect_with(url, Arc::new(move || Ok(token.clone())), fast_opts())
        .unwrap()
}

/// Waits (up to a minute) until a sync handle reports everything pushed and pulled.
pub fn wait_synced(h: &SyncHandle) {
    h.sync_now_blocking(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("not synced: {e}; status {:?}", h.status()));
}

/// Pauses a sync loop and waits until it is paused (nothing more goes out).
pub fn pause(h: &SyncHandle) {
    h.pause();
    eventually("sync paused", Duration::from_secs(10), || {
        h.status().state == ferry_core::ConnState::Paused
    });
}

/// Checks the relay's log: positions 1..=n without gaps, each `(origin, origin_seq)` once,
/// each origin's sequence without gaps.
pub fn check_log(relay: &RelayProc) -> usize {
    let log = store_dump(&relay.dir);
    let mut seen = std::collections::HashSet::new();
    let mut per_origin: std::collections::HashMap<Vec<u8>, i64> = Default::default();
    for (i, (seq, origin, oseq, _)) in log.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1, "gap in server_seq");
        assert!(
            seen.insert((origin.clone(), *oseq)),
            "duplicate (origin, origin_seq)"
        );
        let last = per_origin.entry(origin.clone()).or_insert(0);
        assert_eq!(*oseq, *last + 1, "gap in an origin's sequence");
        *last = *oseq;
    }
    log.len()
}

/// Every stored change set of the relay's SQLite file, for before/after comparisons.
pub fn store_dump(relay_dir: &Path) -> Vec<(i64, Vec<u8>, i64, Vec<u8>)> {
    let c = rusqlite::Connection::open_with_flags(
        relay_dir.join("data").join("relay.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut st = c
        .prepare("SELECT server_seq, origin, origin_seq, body FROM sets ORDER BY server_seq")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// One or more relay processes sharing a store: one SQLite relay, or `n` relays over one fresh
/// PostgreSQL database. Client `i` is pointed at node `i % n`.
pub struct Cluster {
    /// The relay processes.
    pub nodes: Vec<RelayProc>,
}

impl Cluster {
    /// One relay on the embedded store.
    pub fn sqlite(dir: &Path) -> Cluster {
        Cluster {
            nodes: vec![RelayProc::start(dir)],
        }
    }

    /// `n` relays over one fresh PostgreSQL database.
    pub fn postgres(dir: &Path, n: usize) -> Cluster {
        let url = fresh_pg_db();
        Cluster {
            nodes: (0..n)
                .map(|i| RelayProc::start_on(&dir.join(format!("node{i}")), &url, ""))
                .collect(),
        }
    }

    /// The URL client `i` uses.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i % self.nodes.len()].url()
    }
}
