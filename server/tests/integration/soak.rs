//! Soak test with real processes: client processes write continuously through a TCP fault
//! proxy to a relay process, while a fault driver SIGKILLs and restarts the relay and the
//! clients, and makes the proxy delay, stall (half-open) and reset connections. At the end
//! nothing acknowledged is missing or duplicated, no committed write is lost, counters are
//! exact, and every replica converges.
//!
//! Bounded in time: `FERRY_SOAK_SECS` (default 30) of faults, then healing.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{Replica, Value};
use ferry_testkit::proxy::{FaultProxy, Mode};
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "FERRY_SOAK_CHILD";

/// Runs in a child process: writes a transaction every few milliseconds, syncing, until
/// killed. Each transaction adds one `tag` row named after the client and one vote to the
/// shared `hits` counter.
#[test]
#[ignore = "child process of soak_with_process_kills_and_network_faults"]
fn soak_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let (path, url, name, token) = (parts[0], parts[1], parts[2].to_owned(), parts[3].to_owned());
    let r = Arc::new(Replica::open(path, &schema()).unwrap());
    let mut opts = fast_opts();
    opts.ping_interval = Duration::from_millis(500);
    let _h = r
        .connect_with(url, Arc::new(move || Ok(token.clone())), opts)
        .unwrap();
    // Writes start once the shared counter row has arrived (an update of a missing row
    // changes nothing, so it would not count).
    while r
        .query("SELECT 1 FROM todo WHERE id = 'hits'", &[])
        .unwrap()
        .rows
        .is_empty()
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let like = Value::Text(format!("{name}-%"));
    let mut k = match &r
        .query(
            "SELECT count(*) FROM tag WHERE id LIKE ?1",
            std::slice::from_ref(&like),
        )
        .unwrap()
        .rows[0][0]
    {
        Value::Integer(n) => *n,
        _ => 0,
    };
    loop {
        r.write(|tx| {
            tx.execute(
                "INSERT INTO tag (id, name) VALUES (?1, ?2)",
                &[
                    Value::Text(format!("{name}-{k}")),
                    Value::Text(name.clone()),
                ],
            )?;
            tx.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'hits'", &[])?;
            Ok(())
        })
        .unwrap();
        k += 1;
        std::thread::sleep(Duration::from_millis(15));
    }
}

struct Client {
    name: String,
    path: PathBuf,
    child: Option<Child>,
}

impl Client {
    fn spawn(&mut self, url: &str) {
        let token = admin_token(&self.name);
        self.child = Some(
            Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "soak::soak_child", "--nocapture"])
                .env(
                    CHILD_ENV,
                    format!("{}|{url}|{}|{token}", self.path.display(), self.name),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.kill();
    }
}

fn count(r: &Replica, sql: &str, params: &[Value]) -> i64 {
    match &r.query(sql, params).unwrap().rows[0][0] {
        Value::Integer(n) => *n,
        other => panic!("count is {other:?}"),
    }
}

fn prepare(dir: &Path, url: &str) {
    let seed = open(dir, "seed.db");
    seed.execute(
        "INSERT INTO todo (id, list, title, votes) VALUES ('hits', 'l', 'counter', 0)",
        &[],
    )
    .unwrap();
    let h = connect(&seed, url, admin_token("seed"));
    wait_synced(&h);
    drop(h);
    seed.close().unwrap();
}

#[test]
fn soak_with_process_kills_and_network_faults() {
    let secs: u64 = std::env::var("FERRY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("FERRY_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("soak seed {seed} ({secs} s); FERRY_SOAK_SEED={seed} repeats the fault schedule");
    let mut rng = StdRng::seed_from_u64(seed);
    let d = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&d.path().join("relay"));
    prepare(d.path(), &relay.url());
    let proxy = FaultProxy::start(relay.addr);
    let mut clients: Vec<Client> = (0..3)
        .map(|i| Client {
            name: format!("c{i}"),
            path: d.path().join(format!("c{i}.db")),
            child: None,
        })
        .collect();
    for c in &mut clients {
        c.spawn(&proxy.url());
    }
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..900)));
        let what = match rng.random_range(0..10) {
            0 => {
                relay.restart();
                "relay SIGKILL + restart"
            }
            1 | 2 => {
                let c = &mut clients[rng.random_range(0..3)];
                c.kill();
                c.spawn(&proxy.url());
                "client SIGKILL + restart"
            }
            3 => {
                proxy.set_mode(Mode::Delay(Duration::from_millis(
                    rng.random_range(20..300),
                )));
                "delay"
            }
            4 => {
                proxy.set_mode(Mode::Stall);
                "stall (half-open)"
            }
            5 | 6 => {
                proxy.reset_all();
                "reset connections"
            }
            _ => {
                proxy.set_mode(Mode::Pass);
                "heal"
            }
        };
        *faults.entry(what).or_default() += 1;
    }
    proxy.set_mode(Mode::Pass);
    for c in &mut clients {
        c.kill();
    }
    let total: u32 = faults.values().sum();
    eprintln!("soak: {total} faults in {secs} s: {faults:?}");

    // Everyone reconnects directly and catches up.
    let url = relay.url();
    let reference = open(d.path(), "reference.db");
    let href = connect(&reference, &url, admin_token("reference"));
    let mut committed = 0;
    let mut replicas = Vec::new();
    for c in &clients {
        let r = Arc::new(Replica::open(&c.path, &schema()).unwrap());
        let mine = count(
            &r,
            "SELECT count(*) FROM tag WHERE id LIKE ?1",
            &[Value::Text(format!("{}-%", c.name))],
        );
        assert!(mine > 0, "{} never committed anything", c.name);
        committed += mine;
        let h = connect(&r, &url, admin_token(&c.name));
        replicas.push((r, h));
    }
    for (r, h) in &replicas {
        wait_synced(h);
        assert_eq!(r.pending_count().unwrap(), 0);
    }
    wait_synced(&href);
    let n = check_log(&relay);
    assert!(n as i64 >= committed, "log {n} < committed {committed}");
    assert_eq!(
        count(&reference, "SELECT count(*) FROM tag", &[]),
        committed,
        "every committed transaction arrived exactly once"
    );
    assert_eq!(
        count(&reference, "SELECT votes FROM todo WHERE id = 'hits'", &[]),
        committed,
        "the counter equals the number of increments"
    );
    for (r, _) in &replicas {
        assert_eq!(r.dump().unwrap(), reference.dump().unwrap());
    }
    eprintln!("soak: {committed} transactions from 3 clients, {n} change sets in the log");
}
