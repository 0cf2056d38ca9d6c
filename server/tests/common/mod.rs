//! Test harness: a real relay process on 127.0.0.1, replicas, tokens.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use ferry_core::{Replica, Schema, SyncHandle, SyncOptions, TableDecl};
use ferry_relay::auth::{Claims, mint_hs256, now_secs};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// Tables used across the relay tests: a scoped lww/counter table, a global table, an
/// `update_wins` table, a read-only table, a `server_checked` table, a table with a `custom`
/// column.
pub fn schema() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("todo")
                .text_key("id")
                .text("list")
                .text("title")
                .integer("done")
                .counter("votes")
                .scope("list"),
        )
        .table(TableDecl::new("tag").text_key("id").text("name"))
        .table(
            TableDecl::new("note")
                .text_key("id")
                .text("body")
                .counter("n")
                .delete_rule(ferry_core::DeleteRule::UpdateWins),
        )
        .table(
            TableDecl::new("doc")
                .text_key("id")
                .text("owner")
                .text("body")
                .scope("owner")
                .delete_rule(ferry_core::DeleteRule::UpdateWins),
        )
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
        )
        .table(TableDecl::new("memo").text_key("id").column(
            "body",
            ferry_core::ColumnType::Text,
            ferry_core::Policy::Custom,
        ))
}

pub struct RelayProc {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub child: Option<Child>,
    extra: String,
    store: String,
}

impl RelayProc {
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
            "listen = \"{}\"\nstore = \"{}\"\ndata = \"{}\"\nschema = \"{}\"\n[log]\nlevel = \"warn\"\n[auth]\nhs256_secret = \"{SECRET}\"\n{}",
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn relay");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("relay did not report its address: {line:?}"));
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
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

pub fn token_for(sub: &str, read: &[&str], write: &[&str], ttl: Duration) -> String {
    token_until(sub, read, write, now_secs() + ttl.as_secs())
}

/// A token that expires at `exp` (seconds since the epoch; may be in the past).
pub fn token_until(sub: &str, read: &[&str], write: &[&str], exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp,
        read: read.iter().map(|s| s.to_string()).collect(),
        write: write.iter().map(|s| s.to_string()).collect(),
        primary: vec![],
        iss: None,
        aud: None,
    };
    mint_hs256(SECRET.as_bytes(), &claims).unwrap()
}

/// A token that reads and writes everything.
pub fn admin_token(sub: &str) -> String {
    token_for(sub, &["*"], &["*"], Duration::from_secs(3600))
}

pub fn fast_opts() -> SyncOptions {
    SyncOptions {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        ping_interval: Duration::from_secs(2),
        ..SyncOptions::default()
    }
}

pub fn open(dir: &Path, name: &str) -> Arc<Replica> {
    Arc::new(Replica::open(dir.join(name), &schema()).unwrap())
}

pub fn connect(r: &Arc<Replica>, url: &str, token: String) -> SyncHandle {
    r.connect_with(url, Arc::new(move || Ok(token.clone())), fast_opts())
        .unwrap()
}

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

/// A bare protocol client for hostile-input and fan-out tests.
pub mod proxy;

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

pub mod raw {
    use ferry_core::ReplicaId;
    use ferry_core::protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg};
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::Message;

    pub type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    pub async fn connect(url: &str) -> Ws {
        tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect")
            .0
    }

    pub fn hello(replica: ReplicaId, token: &str, cursor: u64) -> ClientMsg {
        ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            replica_id: replica,
            token: token.to_owned(),
            cursor,
            schema_version: 1,
        }
    }

    pub async fn send(ws: &mut Ws, m: &ClientMsg) {
        ws.send(Message::Binary(m.encode().unwrap().into()))
            .await
            .unwrap();
    }

    pub async fn send_bytes(ws: &mut Ws, b: Vec<u8>) {
        let _ = ws.send(Message::Binary(b.into())).await;
    }

    /// Next server frame (None when the connection closed or nothing came in 10 s).
    pub async fn recv(ws: &mut Ws) -> Option<ServerMsg> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .ok()??;
            match next {
                Ok(Message::Binary(b)) => {
                    return Some(ServerMsg::decode(&b).expect("server frame"));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Reads frames until an error frame (returned) or the end.
    pub async fn recv_error(ws: &mut Ws) -> Option<(ferry_core::protocol::ErrorCode, String)> {
        while let Some(m) = recv(ws).await {
            if let ServerMsg::Error { code, message } = m {
                return Some((code, message));
            }
        }
        None
    }

    /// A one-row change set as a (possibly hostile) client would craft it: an upsert for odd
    /// `cl`, a delete for even, stamped now.
    pub fn change_set(
        origin: ReplicaId,
        oseq: u64,
        table: &str,
        pk: &str,
        cl: u64,
        cells: Vec<ferry_core::Cell>,
    ) -> ferry_core::ChangeSet {
        use ferry_core::{RowChange, RowOp, Value};
        ferry_core::ChangeSet {
            id: ulid::Ulid::generate().to_bytes(),
            origin,
            origin_seq: oseq,
            hlc: ferry_core::Hlc::new(ferry_relay::auth::now_secs() * 1000, 0),
            base: 0,
            schema_version: 1,
            fence: None,
            guarded: false,
            rows: vec![RowChange {
                table: table.into(),
                pk: Value::Text(pk.into()),
                cl,
                op: if cl % 2 == 1 {
                    RowOp::Upsert(cells)
                } else {
                    RowOp::Delete
                },
            }],
        }
    }

    /// True when the server closed the connection (no further frames).
    pub async fn closed(ws: &mut Ws) -> bool {
        recv(ws).await.is_none()
    }
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

/// How many seeds a randomized test runs: the environment variable `var` when set (to run
/// more), else `default`.
pub fn seeds(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One or more relay processes sharing a store: one SQLite relay, or `n` relays over one fresh
/// PostgreSQL database. Client `i` is pointed at node `i % n`.
pub struct Cluster {
    pub nodes: Vec<RelayProc>,
}

impl Cluster {
    pub fn sqlite(dir: &Path) -> Cluster {
        Cluster {
            nodes: vec![RelayProc::start(dir)],
        }
    }

    pub fn postgres(dir: &Path, n: usize) -> Cluster {
        let url = fresh_pg_db();
        Cluster {
            nodes: (0..n)
                .map(|i| RelayProc::start_on(&dir.join(format!("node{i}")), &url, ""))
                .collect(),
        }
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i % self.nodes.len()].url()
    }
}

/// The throwaway PostgreSQL server of this test run (`scripts/pg-throwaway` starts one; the
/// README's test command and CI do it for you).
pub fn pg_server() -> String {
    std::env::var("FERRY_TEST_PG").unwrap_or_else(|_| {
        panic!(
            "FERRY_TEST_PG is not set: these tests need a PostgreSQL server. Run scripts/test-all, \
             or `eval \"$(scripts/pg-throwaway start)\"` first"
        )
    })
}

/// A new, empty database on the test server; returns its URL.
pub fn fresh_pg_db() -> String {
    let server = pg_server();
    let name = format!(
        "ferry_{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );
    let url = server.clone();
    let create = name.clone();
    // On its own thread: callers may be inside a runtime already.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = url;
            let name = create;
            let (client, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to FERRY_TEST_PG={server}: {e}"));
            let driver = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            drop(client);
            let _ = driver.await;
        });
    })
    .join()
    .unwrap();
    match server.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{name}", &server[..i]),
        _ => format!("{server}/{name}"),
    }
}
