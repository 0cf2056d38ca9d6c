//! Relay benchmarks on loopback, against a real `ferry-relay` process.
//!
//! * `w4`: replica A commits N rows in T transactions; replica B receives all of them through
//!   the relay. Reported as rows/s and as a ratio to plain rusqlite inserting the same rows in
//!   the same transactions on both sides (same pragmas), measured in the same run.
//! * `w5`: C lightweight protocol clients subscribed to one scope; one write; time until every
//!   client has it (p50/p99 over several writes), and the relay's resident memory per idle
//!   connection.
//! * `w6`: noisy neighbours. `--noise` change sets (1M by default) written to 1,000 other
//!   scopes and 10 to the device's; a device of that scope connects: catch-up time and the
//!   change sets the relay read from its store for it.
//! * `b2`: backlog push. `--rows` rows (1M by default) written offline in `--txns`
//!   transactions (1,000), then connect with the default options: time until every change
//!   set is acknowledged, against plain rusqlite inserting the same rows the same way.
//! * `b1`: bootstrap. A relay holds `--rows` rows (1M by default, written in `--txns`
//!   transactions); an empty replica in a separate process connects: time from connect to
//!   caught up, against plain rusqlite inserting the same rows in one transaction; the
//!   client's and the relay's peak RSS; replica file bytes per row against the plain table's.
//!   With `--cuts K` (B3) the connection is also cut K times during the download, through a
//!   proxy that counts the bytes: bytes downloaded against the clean run's.
//! * `wire`: bytes on the wire per changed cell against the raw value bytes.
//! * `scale`: push throughput (change sets/s from P closed-loop pushers) and fan-out latency
//!   (one write to S subscribers spread over the nodes) for one relay on SQLite and for 1, 2
//!   and 3 relays over one PostgreSQL database (a fresh database per configuration on the
//!   server named by `--pg` or `FERRY_TEST_PG`), same workload, same run.
//!
//! `cargo run --release -p ferry-relay --bin ferry-relay-bench -- all`
//! (`scale` is not part of `all`: it needs a PostgreSQL server, see `docs/benchmarks.md`)
#![allow(clippy::print_stdout)]

use ferry_core::SyncPort;
use ferry_core::protocol::{ClientMsg, PROTOCOL_VERSION, ServerMsg};
use ferry_core::{Replica, ReplicaId, Schema, TableDecl, Value};
use ferry_relay::auth::{Claims, mint_hs256, now_secs};
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn schema() -> Schema {
    Schema::new(1)
        .table(
            TableDecl::new("t")
                .text_key("id")
                .text("a")
                .integer("b")
                .real("c")
                .text("d")
                .integer("e"),
        )
        .table(
            TableDecl::new("s")
                .text_key("id")
                .text("scope")
                .integer("v")
                .scope("scope"),
        )
}

const INSERT: &str = "INSERT INTO t (id, a, b, c, d, e) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

fn row(i: usize) -> [Value; 6] {
    [
        Value::Text(format!("{:026}", i * 7919 % 1_000_003)),
        Value::Text(format!("title number {i}")),
        Value::Integer(i as i64),
        Value::Real(i as f64 * 0.5),
        Value::Text("lorem ipsum dolor".into()),
        Value::Integer((i % 7) as i64),
    ]
}

fn raw_value_bytes(i: usize) -> usize {
    row(i)
        .iter()
        .skip(1)
        .map(|v| match v {
            Value::Text(s) => s.len(),
            Value::Blob(b) => b.len(),
            Value::Null => 0,
            _ => 8,
        })
        .sum()
}

struct RelayProc {
    child: Child,
    addr: String,
    /// The admin listener (`/metrics`).
    admin: String,
}

impl RelayProc {
    fn start(dir: &Path) -> Res<RelayProc> {
        Self::start_on(dir, "sqlite")
    }

    /// A relay on `store` (`sqlite` or a postgres:// URL).
    fn start_on(dir: &Path, store: &str) -> Res<RelayProc> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("schema.json"), serde_json::to_string(&schema())?)?;
        let cfg = dir.join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nstore = \"{store}\"\ndata = \"data\"\nschema = \"schema.json\"\n[auth]\nhs256_secret = \"{SECRET}\"\n[log]\nlevel = \"warn\"\n[limits]\nmax_connections = 100000\nframes_per_second = 100000\nframe_burst = 100000\n"
            ),
        )?;
        let exe = std::env::current_exe()?
            .parent()
            .map(|p| p.join("ferry-relay"))
            .ok_or("no exe dir")?;
        let mut child = Command::new(exe)
            .arg("--config")
            .arg(&cfg)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut reader = BufReader::new(child.stdout.take().ok_or("stdout")?);
        let mut last = || -> Res<String> {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            Ok(line
                .trim()
                .rsplit(' ')
                .next()
                .ok_or("no address")?
                .to_owned())
        };
        let addr = last()?;
        let admin = last()?;
        Ok(RelayProc { child, addr, admin })
    }

    fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    fn rss_kib(&self) -> Res<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
    }

    fn peak_kib(&self) -> Res<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = s
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .ok_or("no VmHWM")?;
        Ok(line.split_whitespace().nth(1).ok_or("bad VmHWM")?.parse()?)
    }

    fn metric(&self, name: &str) -> Res<f64> {
        let mut s = std::net::TcpStream::connect(&self.admin)?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let v = out
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().last())
            .ok_or_else(|| format!("metric {name} missing"))?;
        Ok(v.parse()?)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(sub: &str) -> Res<String> {
    scoped_token(sub, &["*"])
}

/// A token reading and writing the scope patterns `scopes`.
fn scoped_token(sub: &str, scopes: &[&str]) -> Res<String> {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    Ok(mint_hs256(
        SECRET.as_bytes(),
        &Claims {
            sub: sub.into(),
            exp: now_secs() + 3600,
            read: scopes.clone(),
            write: scopes,
            primary: vec![],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        },
    )?)
}

fn plain_insert(path: &Path, rows: usize, txns: usize) -> Res<Duration> {
    let mut c = rusqlite::Connection::open(path)?;
    ferry_core::configure_sqlite(&c)?;
    c.execute_batch(
        "CREATE TABLE t (id TEXT NOT NULL, a TEXT, b INTEGER, c REAL, d TEXT, e INTEGER, PRIMARY KEY (id))",
    )?;
    let per = rows / txns;
    let t0 = Instant::now();
    for k in 0..txns {
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(INSERT)?;
            for i in k * per..(k + 1) * per {
                st.execute(rusqlite::params_from_iter(row(i).iter()))?;
            }
        }
        tx.commit()?;
    }
    Ok(t0.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn w4(dir: &Path, rows: usize, txns: usize, repeat: usize) -> Res<()> {
    let mut plain_ms = Vec::new();
    let mut ferry_ms = Vec::new();
    let mut bytes = (0.0, 0.0);
    for round in 0..repeat {
        let d = dir.join(format!("w4-{round}"));
        std::fs::create_dir_all(&d)?;
        let p = plain_insert(&d.join("plain-a.db"), rows, txns)?
            + plain_insert(&d.join("plain-b.db"), rows, txns)?;
        let relay = RelayProc::start(&d.join("relay"))?;
        let a = Arc::new(Replica::open(d.join("a.db"), &schema())?);
        let b = Arc::new(Replica::open(d.join("b.db"), &schema())?);
        let ta = token("a")?;
        let tb = token("b")?;
        let ha = a.connect(&relay.url(), Arc::new(move || Ok(ta.clone())))?;
        let hb = b.connect(&relay.url(), Arc::new(move || Ok(tb.clone())))?;
        ha.sync_now_blocking(Duration::from_secs(30))?;
        hb.sync_now_blocking(Duration::from_secs(30))?;
        let t0 = Instant::now();
        write_rows(&a, rows, txns)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while hb.status().cursor < txns as u64 {
            if Instant::now() > deadline {
                return Err("w4: B did not receive everything in 10 minutes".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let f = t0.elapsed();
        let n: i64 = match &b.query("SELECT count(*) FROM t", &[])?.rows[0][0] {
            Value::Integer(n) => *n,
            _ => 0,
        };
        if n != rows as i64 {
            return Err(format!("w4: B holds {n} rows, expected {rows}").into());
        }
        let cells = rows as f64 * 5.0;
        bytes = (
            relay.metric("ferry_bytes_in_total")? / cells,
            relay.metric("ferry_bytes_out_total")? / cells / 2.0,
        );
        plain_ms.push(p.as_secs_f64() * 1e3);
        ferry_ms.push(f.as_secs_f64() * 1e3);
        println!(
            "w4 round {round}: plain (both sides) {:.0} ms, Ferry end to end {:.0} ms",
            p.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3
        );
        drop((ha, hb));
    }
    let (p, f) = (median(plain_ms), median(ferry_ms));
    println!(
        "W4 {rows} rows in {txns} transactions, A -> relay -> B: plain {p:.0} ms, Ferry {f:.0} ms, {:.0} rows/s end to end, ratio {:.2}x",
        rows as f64 / (f / 1e3),
        f / p
    );
    let raw: f64 = (0..1000).map(raw_value_bytes).sum::<usize>() as f64 / 5000.0;
    println!(
        "W4 wire: {:.1} B in and {:.1} B out per changed cell (raw value bytes {raw:.1} per cell, compressed frames)",
        bytes.0, bytes.1
    );
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscriber(url: &str, tok: &str, head: u64) -> Res<Ws> {
    subscriber_as(url, tok, head, ReplicaId::generate()).await
}

async fn subscriber_as(url: &str, tok: &str, head: u64, me: ReplicaId) -> Res<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    let hello = ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        replica_id: me,
        token: tok.to_owned(),
        cursor: head,
        schema_version: 1,
        snapshots: false,
        resume: None,
        subscriptions: None,
        held: None,
    };
    ws.send(Message::Binary(hello.encode()?.into())).await?;
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => match ServerMsg::decode(&b)? {
            ServerMsg::Welcome { .. } => Ok(ws),
            other => Err(format!("expected welcome, got {other:?}").into()),
        },
        other => Err(format!("no welcome: {other:?}").into()),
    }
}

/// Writes `writes` rows on `writer`, one at a time, and returns, for every subscriber and
/// write, the milliseconds from the commit until that subscriber had it. Row numbers start at
/// `first`; the log is at `head` before the first write.
fn fan_out(
    rt: &tokio::runtime::Runtime,
    writer: &Replica,
    socks: Vec<Ws>,
    head: u64,
    first: usize,
    writes: usize,
    label: &str,
) -> Res<Vec<f64>> {
    let subs = socks.len();
    // Each subscriber reads on its own task and reports when it sees each write's position.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let mut tasks = Vec::new();
    for mut ws in socks {
        let tx = tx.clone();
        tasks.push(rt.spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = m
                    && let Ok(ServerMsg::Changes {
                        up_to, change_sets, ..
                    }) = ServerMsg::decode(&b)
                    && !change_sets.is_empty()
                {
                    let _ = tx.send((up_to, Instant::now()));
                }
            }
        }));
    }
    drop(tx);
    let mut lat = Vec::new();
    for w in 0..writes {
        let t0 = Instant::now();
        writer.execute(INSERT, &row(first + w))?;
        let target = head + w as u64 + 1;
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < subs {
            let r = rt.block_on(async {
                tokio::time::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    rx.recv(),
                )
                .await
            });
            match r {
                Ok(Some((up_to, at))) if up_to >= target => {
                    got += 1;
                    lat.push(at.duration_since(t0).as_secs_f64() * 1e3);
                }
                Ok(Some(_)) => {}
                _ => {
                    return Err(
                        format!("{label}: only {got} of {subs} clients got write {w}").into(),
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for t in tasks {
        t.abort();
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

fn w5(dir: &Path, clients: usize, writes: usize) -> Res<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let relay = RelayProc::start(&dir.join("w5"))?;
    let url = relay.url();
    let tok = token("sub")?;
    let writer = Arc::new(Replica::open(dir.join("w5-writer.db"), &schema())?);
    let tw = token("writer")?;
    let hw = writer.connect(&url, Arc::new(move || Ok(tw.clone())))?;
    hw.sync_now_blocking(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = relay.rss_kib()?;
    let head = hw.status().head;
    let socks = rt.block_on(async {
        let mut v = Vec::with_capacity(clients);
        for _ in 0..clients {
            v.push(subscriber(&url, &tok, head).await?);
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(v)
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let rss1 = relay.rss_kib()?;
    let per_conn = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / clients as f64;
    let lat = fan_out(&rt, &writer, socks, head, 1_000_000, writes, "w5")?;
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    println!(
        "W5 fan-out to {clients} clients, {writes} writes: commit -> every client p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    println!(
        "W5 relay memory: {rss0} KiB before, {rss1} KiB with {clients} idle connections: {:.1} KiB per connection",
        per_conn / 1024.0
    );
    drop(hw);
    Ok(())
}

/// A change set of `origin` at `oseq` upserting one row, stamped now.
fn one_row_set(
    origin: ReplicaId,
    oseq: u64,
    table: &str,
    pk: Value,
    cells: Vec<ferry_core::Cell>,
) -> ferry_core::ChangeSet {
    ferry_core::ChangeSet {
        id: ulid::Ulid::generate().to_bytes(),
        origin,
        origin_seq: oseq,
        hlc: ferry_core::Hlc::new(now_secs() * 1000, 0),
        base: 0,
        schema_version: 1,
        fence: None,
        guarded: false,
        rows: vec![ferry_core::RowChange {
            table: table.into(),
            pk,
            cl: 1,
            op: ferry_core::RowOp::Upsert(cells),
        }],
    }
}

/// One change set of one new row of `t`, as a replica would push it.
fn bench_set(origin: ReplicaId, oseq: u64, i: usize) -> ferry_core::ChangeSet {
    let [pk, rest @ ..] = row(i);
    let cells = rest
        .into_iter()
        .zip(["a", "b", "c", "d", "e"])
        .map(|(v, n)| ferry_core::Cell::Set(n.into(), v))
        .collect();
    one_row_set(origin, oseq, "t", pk, cells)
}

/// A closed-loop pusher: one change set per push, the next after its ack.
async fn pusher(url: String, tok: String, n: usize, first: usize) -> Res<()> {
    let me = ReplicaId::generate();
    let mut ws = subscriber_as(&url, &tok, 0, me).await?;
    for k in 0..n {
        push_all(&mut ws, vec![bench_set(me, k as u64 + 1, first + k)]).await?;
    }
    Ok(())
}

/// One change set writing row `i` of the scoped table `s` into `scope`.
fn scoped_set(origin: ReplicaId, oseq: u64, i: usize, scope: &str) -> ferry_core::ChangeSet {
    let cells = vec![
        ferry_core::Cell::Set("scope".into(), Value::Text(scope.into())),
        ferry_core::Cell::Set("v".into(), Value::Integer(i as i64)),
    ];
    one_row_set(origin, oseq, "s", Value::Text(format!("r{i}")), cells)
}

/// Pushes `sets` in frames of up to 1,000, each after the previous one's acks (reading and
/// dropping everything else the relay sends meanwhile).
async fn push_all(ws: &mut Ws, sets: Vec<ferry_core::ChangeSet>) -> Res<()> {
    let mut sets = sets.into_iter().peekable();
    while sets.peek().is_some() {
        let frame: Vec<_> = sets.by_ref().take(1000).collect();
        let n = frame.len();
        let push = ClientMsg::Push { change_sets: frame };
        ws.send(Message::Binary(push.encode()?.into())).await?;
        let mut acked = 0;
        while acked < n {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => match ServerMsg::decode(&b)? {
                    ServerMsg::Acks { acks } => acked += acks.len(),
                    ServerMsg::Refused { message, .. } | ServerMsg::Error { message, .. } => {
                        return Err(format!("push refused: {message}").into());
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                other => return Err(format!("pusher connection ended: {other:?}").into()),
            }
        }
    }
    Ok(())
}

/// W6 noisy neighbours: `noise` change sets written to 1,000 other scopes with 10 of the
/// device's own spread among them; then devices with the device's token connect and catch
/// up. Reports the catch-up time (connect to caught up) and the change sets the relay read
/// from its store to serve it.
fn w6(dir: &Path, noise: usize, repeat: usize) -> Res<()> {
    let relay = RelayProc::start(&dir.join("w6"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let noisy = scoped_token("noisy", &["noise:*", "dev:1"])?;
    rt.block_on(async {
        let me = ReplicaId::generate();
        // The pusher's cursor stays at the head it saw, so it is sent little besides acks.
        let mut ws = subscriber_as(&relay.url(), &noisy, 0, me).await?;
        let mut sets = Vec::with_capacity(noise + 10);
        for i in 0..noise + 10 {
            let scope = if i % (noise / 10 + 1) == 0 && sets.len() < noise + 10 {
                "dev:1".to_owned()
            } else {
                format!("noise:{}", i % 1000)
            };
            sets.push(scoped_set(me, i as u64 + 1, i, &scope));
        }
        push_all(&mut ws, sets).await
    })?;
    println!(
        "w6: {} change sets pushed in {:.1} s",
        noise + 10,
        t0.elapsed().as_secs_f64()
    );
    let own: i64 = (0..noise + 10)
        .filter(|i| i % (noise / 10 + 1) == 0)
        .count() as i64;
    let tok = scoped_token("dev", &["dev:1"])?;
    let mut ms = Vec::new();
    let mut read = Vec::new();
    for round in 0..repeat.max(1) {
        let d = Replica::open(dir.join(format!("w6-device-{round}.db")), &schema())?;
        let d = Arc::new(d);
        let before = relay.metric("ferry_store_sets_read_total").unwrap_or(0.0);
        let tok = tok.clone();
        let t = Instant::now();
        let h = d.connect(&relay.url(), Arc::new(move || Ok(tok.clone())))?;
        h.sync_now_blocking(Duration::from_secs(60))?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        let n = match &d.query("SELECT count(*) FROM s", &[])?.rows[0][0] {
            Value::Integer(n) => *n,
            _ => 0,
        };
        if n != own {
            return Err(format!("w6: the device holds {n} rows, expected {own}").into());
        }
        // NaN from a relay that does not count store reads (an older build).
        let r = relay
            .metric("ferry_store_sets_read_total")
            .unwrap_or(f64::NAN)
            - before;
        println!("w6 round {round}: catch-up {took:.1} ms, {r:.0} change sets read from the store");
        ms.push(took);
        read.push(r);
        drop(h);
    }
    println!(
        "W6 noisy neighbours: {noise} change sets in 1,000 other scopes, {own} in the device's: catch-up {:.1} ms (median of {}), {:.0} change sets read from the store",
        median(ms),
        repeat.max(1),
        median(read)
    );
    Ok(())
}

/// A replica at `path` holding `rows` rows written offline in `txns` transactions.
fn written_offline(path: &Path, rows: usize, txns: usize) -> Res<Arc<Replica>> {
    let a = Arc::new(Replica::open(path, &schema())?);
    write_rows(&a, rows, txns)?;
    Ok(a)
}

/// Writes rows `0..rows` on `a` in `txns` transactions.
fn write_rows(a: &Replica, rows: usize, txns: usize) -> Res<()> {
    let per = rows / txns;
    for k in 0..txns {
        a.write(|tx| {
            let mut st = tx.prepare(INSERT)?;
            for i in k * per..(k + 1) * per {
                st.execute(&row(i))?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Writes `rows` rows in `txns` transactions on a replica at `path` and pushes them all to
/// `relay`.
fn load_relay(path: &Path, relay: &RelayProc, rows: usize, txns: usize) -> Res<()> {
    let a = written_offline(path, rows, txns)?;
    let ta = token("loader")?;
    let h = a.connect(&relay.url(), Arc::new(move || Ok(ta.clone())))?;
    h.sync_now_blocking(Duration::from_secs(1800))?;
    Ok(())
}

/// Peak resident memory of this process, in KiB.
fn own_peak_kib() -> Res<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmHWM")?.parse()?)
}

/// File bytes of an SQLite database and its WAL.
fn db_bytes(path: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The bootstrap client of `b1`, run as its own process so its memory is its own: opens an
/// empty replica, connects and waits until it holds `--rows` rows at relay position `--head`.
/// Prints `elapsed_ms peak_kib`.
fn b1_client(args: &[String]) -> Res<()> {
    let s = |name: &str| -> Res<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .ok_or_else(|| format!("b1-client needs {name}").into())
    };
    let (url, db, tok) = (s("--url")?, s("--db")?, s("--token")?);
    let head: u64 = s("--head")?.parse()?;
    let rows: i64 = s("--rows")?.parse()?;
    let replica = Arc::new(Replica::open(&db, &schema())?);
    let t0 = Instant::now();
    let h = replica.connect(&url, Arc::new(move || Ok(tok.clone())))?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let st = h.status();
        if st.cursor >= head && st.state == ferry_core::ConnState::Online {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("b1: not caught up in 30 minutes: {st:?}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = t0.elapsed();
    let n: i64 = match &replica.query("SELECT count(*) FROM t", &[])?.rows[0][0] {
        Value::Integer(n) => *n,
        _ => -1,
    };
    if n != rows {
        return Err(format!("b1: the replica holds {n} rows, expected {rows}").into());
    }
    h.disconnect();
    println!("{} {}", elapsed.as_millis(), own_peak_kib()?);
    Ok(())
}

/// A TCP proxy on 127.0.0.1 counting the bytes it forwards from the relay, able to cut every
/// connection through it.
struct CutProxy {
    addr: std::net::SocketAddr,
    down: Arc<std::sync::atomic::AtomicU64>,
    live: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CutProxy {
    fn start(upstream: &str) -> Res<CutProxy> {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let down = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let live: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, l, up) = (Arc::clone(&down), Arc::clone(&live), upstream.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&up) else {
                    continue;
                };
                let pipe =
                    |mut from: TcpStream,
                     mut to: TcpStream,
                     count: Option<Arc<std::sync::atomic::AtomicU64>>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if let Some(c) = &count {
                                    c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    if let Ok(mut v) = l.lock() {
                        v.push(c2);
                        v.push(s2);
                    }
                    if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                        pipe(c3, s3, None);
                        pipe(server, client, Some(Arc::clone(&d)));
                    }
                }
            }
        });
        Ok(CutProxy { addr, down, live })
    }

    fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    fn down(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn cut(&self) {
        if let Ok(mut v) = self.live.lock() {
            for s in v.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// One bootstrap through `proxy` in a child process, cutting the connection whenever the
/// bytes downloaded pass one of `cut_at`. Returns (elapsed, client peak KiB).
fn bootstrap_once(
    proxy: &CutProxy,
    db: &Path,
    head: u64,
    rows: usize,
    cut_at: &[u64],
) -> Res<(Duration, u64)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "b1-client",
            "--url",
            &proxy.url(),
            "--token",
            &token("fresh")?,
        ])
        .arg("--db")
        .arg(db)
        .args(["--head", &head.to_string(), "--rows", &rows.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let start = proxy.down();
    let mut cuts = cut_at.iter().peekable();
    while child.try_wait()?.is_none() {
        if let Some(&&at) = cuts.peek()
            && proxy.down() - start >= at
        {
            proxy.cut();
            cuts.next();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or("stdout")?
        .read_to_string(&mut out)?;
    if !child.wait()?.success() {
        return Err("b1: the bootstrap client failed".into());
    }
    if cuts.next().is_some() {
        return Err("b1: the bootstrap ended before every cut was made".into());
    }
    let mut it = out.split_whitespace();
    let ms: u64 = it.next().ok_or("b1-client printed nothing")?.parse()?;
    let kib: u64 = it.next().ok_or("b1-client printed no memory")?.parse()?;
    Ok((Duration::from_millis(ms), kib))
}

fn b1(dir: &Path, rows: usize, txns: usize, repeat: usize, cuts: usize) -> Res<()> {
    let d = dir.join("b1");
    std::fs::create_dir_all(&d)?;
    {
        let relay = RelayProc::start(&d.join("relay"))?;
        let t0 = Instant::now();
        load_relay(&d.join("loader.db"), &relay, rows, txns)?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        while relay.metric("ferry_rows_position")? < txns as f64 {
            if Instant::now() > deadline {
                return Err("b1: the relay did not fold its log in 30 minutes".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "b1: relay loaded with {rows} rows in {txns} change sets and folded in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    // A fresh relay process on the same data, so its peak memory is the bootstrap's.
    let relay = RelayProc::start(&d.join("relay"))?;
    let proxy = CutProxy::start(&relay.addr)?;
    let head = txns as u64;
    let mut plain_ms = Vec::new();
    let mut ferry_ms = Vec::new();
    let mut clean_bytes = Vec::new();
    let mut client_peak = 0;
    let (mut plain_size, mut replica_size) = (0, 0);
    for round in 0..repeat.max(1) {
        let plain_db = d.join(format!("plain-{round}.db"));
        let p = plain_insert(&plain_db, rows, 1)?;
        plain_size = db_bytes(&plain_db);
        let db = d.join(format!("fresh-{round}.db"));
        let before = proxy.down();
        let (f, kib) = bootstrap_once(&proxy, &db, head, rows, &[])?;
        clean_bytes.push((proxy.down() - before) as f64);
        replica_size = db_bytes(&db);
        client_peak = client_peak.max(kib);
        println!(
            "b1 round {round}: plain {:.0} ms, Ferry connect -> caught up {:.0} ms, client peak RSS {} MiB",
            p.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            kib / 1024
        );
        plain_ms.push(p.as_secs_f64() * 1e3);
        ferry_ms.push(f.as_secs_f64() * 1e3);
        std::fs::remove_file(&plain_db)?;
    }
    let (p, f) = (median(plain_ms), median(ferry_ms));
    println!(
        "B1 bootstrap, {rows} rows: plain (one transaction) {p:.0} ms, Ferry {f:.0} ms, {:.0} rows/s, ratio {:.2}x; client peak RSS {} MiB, relay peak RSS {} MiB; replica file {:.0} B/row, plain {:.0} B/row ({:.2}x); downloaded {:.1} MiB",
        rows as f64 / (f / 1e3),
        f / p,
        client_peak / 1024,
        relay.peak_kib()? / 1024,
        replica_size as f64 / rows as f64,
        plain_size as f64 / rows as f64,
        replica_size as f64 / plain_size.max(1) as f64,
        median(clean_bytes.clone()) / (1024.0 * 1024.0)
    );
    if cuts > 0 {
        let clean = median(clean_bytes);
        let at: Vec<u64> = (1..=cuts)
            .map(|k| (clean * k as f64 / (cuts + 1) as f64) as u64)
            .collect();
        let before = proxy.down();
        let (f, _) = bootstrap_once(&proxy, &d.join("cut.db"), head, rows, &at)?;
        let bytes = (proxy.down() - before) as f64;
        println!(
            "B3 interrupted bootstrap, {rows} rows, {cuts} cuts: {:.1} MiB downloaded against {:.1} MiB clean ({:.2}x), {:.0} ms",
            bytes / (1024.0 * 1024.0),
            clean / (1024.0 * 1024.0),
            bytes / clean,
            f.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// B2 backlog push: a replica writes `rows` rows offline in `txns` transactions, then
/// connects with the default options; timed from connect until every change set is
/// acknowledged, against plain rusqlite inserting the same rows in the same transactions.
fn b2(dir: &Path, rows: usize, txns: usize, repeat: usize) -> Res<()> {
    let mut plain_ms = Vec::new();
    let mut ferry_ms = Vec::new();
    for round in 0..repeat.max(1) {
        let d = dir.join(format!("b2-{round}"));
        std::fs::create_dir_all(&d)?;
        let p = plain_insert(&d.join("plain.db"), rows, txns)?;
        let relay = RelayProc::start(&d.join("relay"))?;
        let a = written_offline(&d.join("a.db"), rows, txns)?;
        let ta = token("a")?;
        let t0 = Instant::now();
        let ha = a.connect(&relay.url(), Arc::new(move || Ok(ta.clone())))?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let s = ha.status();
            if s.pending == 0 && s.connects > 0 {
                break;
            }
            if let Some(r) = s.refused {
                return Err(format!("b2: push refused: {r:?}").into());
            }
            if Instant::now() > deadline {
                return Err(format!("b2: not acknowledged in 30 minutes: {s:?}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let f = t0.elapsed();
        let acked = relay.metric("ferry_change_sets_in_total")?;
        if acked < txns as f64 {
            return Err(format!("b2: the relay acknowledged {acked} of {txns} change sets").into());
        }
        println!(
            "b2 round {round}: plain {:.0} ms, Ferry connect -> all acknowledged {:.0} ms, relay peak RSS {} MiB",
            p.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            relay.peak_kib()? / 1024
        );
        plain_ms.push(p.as_secs_f64() * 1e3);
        ferry_ms.push(f.as_secs_f64() * 1e3);
        drop(ha);
        drop(relay);
        std::fs::remove_dir_all(&d)?;
    }
    let (p, f) = (median(plain_ms), median(ferry_ms));
    println!(
        "B2 backlog push, {rows} rows in {txns} transactions written offline: plain {p:.0} ms, Ferry {f:.0} ms, {:.0} rows/s, ratio {:.2}x",
        rows as f64 / (f / 1e3),
        f / p
    );
    Ok(())
}

/// The workload of `scale`, the same for every deployment.
#[derive(Debug, Clone, Copy)]
struct ScaleLoad {
    pushers: usize,
    per: usize,
    subs: usize,
    writes: usize,
}

/// Push throughput and fan-out latency for one deployment: `nodes` relays on `store`.
fn scale_one(dir: &Path, label: &str, store: &str, nodes: usize, load: ScaleLoad) -> Res<()> {
    let ScaleLoad {
        pushers,
        per,
        subs,
        writes,
    } = load;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let relays: Vec<RelayProc> = (0..nodes)
        .map(|i| RelayProc::start_on(&dir.join(format!("{label}-{i}")), store))
        .collect::<Res<_>>()?;
    let urls: Vec<String> = relays.iter().map(RelayProc::url).collect();
    // Fan-out: one writer on node 0, subscribers spread over every node.
    let writer = Arc::new(Replica::open(
        dir.join(format!("{label}-writer.db")),
        &schema(),
    )?);
    let tw = token("writer")?;
    let hw = writer.connect(&urls[0], Arc::new(move || Ok(tw.clone())))?;
    hw.sync_now_blocking(Duration::from_secs(30))?;
    let tok = token("sub")?;
    let socks = rt.block_on(async {
        let mut v = Vec::with_capacity(subs);
        for i in 0..subs {
            v.push(subscriber(&urls[i % nodes], &tok, 0).await?);
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(v)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let lat = fan_out(&rt, &writer, socks, 0, 2_000_000, writes, label)?;
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    // Push throughput: closed-loop pushers spread over the nodes.
    let tp = token("pusher")?;
    let t0 = Instant::now();
    rt.block_on(async {
        let mut js = Vec::new();
        for i in 0..pushers {
            js.push(tokio::spawn(pusher(
                urls[i % nodes].clone(),
                tp.clone(),
                per,
                3_000_000 + i * per,
            )));
        }
        for j in js {
            j.await.map_err(|e| format!("pusher task: {e}"))??;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let sets = (pushers * per) as f64;
    println!(
        "scale {label:<11} push {:>6.0} change sets/s ({pushers} pushers x {per} in {secs:.2} s); fan-out of one write to {subs} subscribers on {nodes} node(s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        sets / secs,
        p(0.5),
        p(0.99),
        p(1.0)
    );
    drop(hw);
    drop(relays);
    Ok(())
}

/// Runs `scale_one` for one SQLite relay and for 1, 2 and 3 relays on PostgreSQL (a fresh
/// database each on the server at `pg`).
fn scale(dir: &Path, pg: &str, load: ScaleLoad) -> Res<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    scale_one(dir, "sqlite-1", "sqlite", 1, load)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for nodes in 1..=3 {
        let name = format!(
            "ferry_bench_{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        );
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(pg, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(conn);
            c.batch_execute(&format!("CREATE DATABASE {name}")).await?;
            drop(c);
            let _ = driver.await;
            Ok::<_, tokio_postgres::Error>(())
        })?;
        let base = pg.rsplit_once('/').map_or(pg, |(b, _)| b);
        let url = format!("{base}/{name}");
        scale_one(dir, &format!("postgres-{nodes}"), &url, nodes, load)?;
    }
    Ok(())
}

fn wire() -> Res<()> {
    let dir = tempdir()?;
    let a = Replica::open(dir.join("wire.db"), &schema())?;
    let n = 1000;
    for i in 0..n {
        a.execute(INSERT, &row(i))?;
    }
    let inserts = a.prepare_push(n, usize::MAX)?;
    let one_frame = |sets: &[ferry_core::ChangeSet]| -> Res<usize> {
        Ok(ClientMsg::Push {
            change_sets: sets.to_vec(),
        }
        .encode()?
        .len()
            + 4)
    };
    let raw: usize = (0..n).map(raw_value_bytes).sum();
    let single: usize = inserts
        .iter()
        .map(|c| one_frame(std::slice::from_ref(c)))
        .sum::<Res<usize>>()?;
    let batched = one_frame(&inserts)?;
    let cells = (n * 5) as f64;
    println!(
        "wire, inserts of 5 cells: raw values {:.1} B/cell; one change set per frame {:.1} B/cell; 1000 per frame {:.1} B/cell (ratio to raw {:.2}x / {:.2}x)",
        raw as f64 / cells,
        single as f64 / cells,
        batched as f64 / cells,
        single as f64 / raw as f64,
        batched as f64 / raw as f64
    );
    let acks: Vec<(u64, u64)> = inserts
        .iter()
        .enumerate()
        .map(|(i, c)| (c.origin_seq, i as u64 + 1))
        .collect();
    a.acknowledge(&acks)?;
    for i in 0..n {
        a.execute(
            "UPDATE t SET b = ?1 WHERE id = ?2",
            &[Value::Integer(i as i64 * 3), row(i)[0].clone()],
        )?;
    }
    let updates = a.prepare_push(n, usize::MAX)?;
    let single: usize = updates
        .iter()
        .map(|c| one_frame(std::slice::from_ref(c)))
        .sum::<Res<usize>>()?;
    let batched = one_frame(&updates)?;
    println!(
        "wire, one INTEGER cell updated per transaction: raw 8 B/cell; one change set per frame {single_b:.1} B/cell; 1000 per frame {batched_b:.1} B/cell",
        single_b = single as f64 / n as f64,
        batched_b = batched as f64 / n as f64
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempdir() -> Res<PathBuf> {
    let d = std::env::temp_dir().join(format!("ferry-relay-bench-{}", ulid::Ulid::generate()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().cloned().unwrap_or_else(|| "all".into());
    let rows = arg(&args, "--rows", 100_000usize);
    let txns = arg(&args, "--txns", 100usize);
    let repeat = arg(&args, "--repeat", 3usize);
    let clients = arg(&args, "--clients", 1000usize);
    let writes = arg(&args, "--writes", 20usize);
    let dir = tempdir()?;
    let r = (|| -> Res<()> {
        if what == "w4" || what == "all" {
            w4(&dir, rows, txns, repeat)?;
        }
        if what == "w5" || what == "all" {
            w5(&dir, clients, writes)?;
        }
        if what == "b1" {
            b1(
                &dir,
                arg(&args, "--rows", 1_000_000usize),
                arg(&args, "--txns", 1000usize),
                repeat,
                arg(&args, "--cuts", 0usize),
            )?;
        }
        if what == "b1-client" {
            return b1_client(&args);
        }
        if what == "b2" {
            b2(
                &dir,
                arg(&args, "--rows", 1_000_000usize),
                arg(&args, "--txns", 1000usize),
                repeat,
            )?;
        }
        if what == "w6" || what == "all" {
            w6(&dir, arg(&args, "--noise", 1_000_000usize), repeat)?;
        }
        if what == "wire" || what == "all" {
            wire()?;
        }
        if what == "scale" {
            let pg = args
                .iter()
                .position(|a| a == "--pg")
                .and_then(|i| args.get(i + 1).cloned())
                .or_else(|| std::env::var("FERRY_TEST_PG").ok())
                .ok_or("scale needs a PostgreSQL server: --pg postgres://... or FERRY_TEST_PG")?;
            let load = ScaleLoad {
                pushers: arg(&args, "--pushers", 12usize),
                per: arg(&args, "--per", 200usize),
                subs: arg(&args, "--subs", 300usize),
                writes,
            };
            scale(&dir, &pg, load)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}
