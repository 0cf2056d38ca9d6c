//! Token expiry and refresh, graceful shutdown, health and metrics endpoints, the CLI.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{ConnState, Value};
use ferry_testkit::relay::*;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    (code, out)
}

#[test]
fn an_expired_token_ends_the_connection_and_a_fresh_one_resumes() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let issued = Arc::new(AtomicUsize::new(0));
    let i2 = Arc::clone(&issued);
    // Tokens that expire 1 s after they are minted (the relay allows 5 s of leeway), so
    // they expire mid-connection.
    let provider = Arc::new(move || {
        i2.fetch_add(1, Ordering::Relaxed);
        let claims = ferry_relay::auth::Claims {
            sub: "short".into(),
            exp: ferry_relay::auth::now_secs().saturating_sub(4),
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: vec![],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        };
        ferry_relay::auth::mint_hs256(SECRET.as_bytes(), &claims).map_err(|e| e.to_string())
    });
    let ha = a.connect_with(&relay.url(), provider, fast_opts()).unwrap();
    let hb = connect(&b, &relay.url(), admin_token("b"));
    wait_synced(&ha);
    let saw_expiry = Arc::new(AtomicUsize::new(0));
    let s2 = Arc::clone(&saw_expiry);
    let _obs = ha.observe(Arc::new(move |s: &ferry_core::SyncStatus| {
        if s.last_error
            .as_ref()
            .is_some_and(|e| e.message.contains("expired"))
        {
            s2.fetch_add(1, Ordering::Relaxed);
        }
    }));
    for n in 0..8 {
        a.execute(
            "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
            &[Value::Text(format!("e{n}"))],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_synced(&ha);
    wait_synced(&hb);
    assert_eq!(
        b.query("SELECT count(*) FROM todo", &[]).unwrap().rows[0][0],
        Value::Integer(8)
    );
    assert!(
        saw_expiry.load(Ordering::Relaxed) > 0,
        "the relay should have ended a connection for expiry"
    );
    assert!(
        issued.load(Ordering::Relaxed) >= 3,
        "a fresh token is asked for at each reconnect"
    );
    assert!(ha.status().connects >= 2);
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(&d.path().join("relay"));
    let (code, body) = http_get(relay.addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(relay.admin, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("head=0"), "{body}");
    // Metrics and readiness are on the admin listener (loopback) only, not the sync port.
    assert!(relay.admin.ip().is_loopback());
    for path in ["/metrics", "/readyz"] {
        let (code, _) = http_get(relay.addr, path);
        assert_eq!(code, 404, "{path} is served on the sync port");
    }
    let a = open(d.path(), "a.db");
    let ha = connect(&a, &relay.url(), admin_token("a"));
    for n in 0..50 {
        a.execute(
            "INSERT INTO todo(id, list, title) VALUES (?1, 'l', 'x')",
            &[Value::Text(format!("t{n}"))],
        )
        .unwrap();
    }
    wait_synced(&ha);
    let (code, metrics) = http_get(relay.admin, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "ferry_connections",
        "ferry_change_sets_in_total",
        "ferry_bytes_in_total",
        "ferry_bytes_out_total",
        "ferry_push_seconds",
        "ferry_replica_lag",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    // Replica ids are not published: they would let anyone name a device in a hello.
    let me = a.replica_id().unwrap().to_string();
    assert!(
        !metrics.contains("replica=") && !metrics.contains(&me),
        "metrics name replicas:\n{metrics}"
    );
    let status = relay.terminate();
    assert!(status.success(), "graceful exit: {status:?}");
    ferry_core::transport::runtime().unwrap();
    eventually("the client to notice", Duration::from_secs(10), || {
        ha.status().state != ConnState::Online
    });
    let last = ha.status().last_error;
    assert!(
        last.as_ref()
            .is_some_and(|e| e.message.contains("shutting down")
                || e.message.contains("closed")
                || e.message.contains("connect")),
        "{last:?}"
    );
    assert_eq!(
        store_dump(&relay.dir).len(),
        50,
        "everything acknowledged is stored"
    );
    relay.restart();
    a.execute(
        "INSERT INTO todo(id, list, title) VALUES ('after', 'l', 'x')",
        &[],
    )
    .unwrap();
    wait_synced(&ha);
    assert_eq!(store_dump(&relay.dir).len(), 51);
}

#[test]
fn cli_token_and_check_config() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let cfg = relay.dir.join("relay.toml");
    let bin = env!("CARGO_BIN_EXE_ferry-relay");
    let check_config = || {
        Command::new(bin)
            .args(["--config"])
            .arg(&cfg)
            .arg("check-config")
            .output()
            .unwrap()
    };
    let out = check_config();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("valid") && text.contains("<redacted>"),
        "{text}"
    );
    // It prints each table with its mode, key and scope, and each column's policy.
    assert!(
        text.contains("#   table acct: mode server_checked, key id, scope (global)")
            && text.contains("#   table todo: mode multi_writer, key id, scope list")
            && text.contains("#     votes integer counter"),
        "{text}"
    );
    // A typo in a schema key is refused, not ignored (it once left a table multi-writer).
    let schema_path = relay.dir.join("schema.json");
    let good = std::fs::read_to_string(&schema_path).unwrap();
    let typo = good.replacen("\"mode\"", "\"write_mode\"", 1);
    assert_ne!(typo, good, "the test schema names a mode");
    std::fs::write(&schema_path, typo).unwrap();
    let out = check_config();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("write_mode"), "{err}");
    std::fs::write(&schema_path, good).unwrap();
    let out = Command::new(bin)
        .args(["--config"])
        .arg(&cfg)
        .args([
            "token",
            "--sub",
            "zoe",
            "--read",
            "list:{sub}",
            "--write",
            "list:{sub}",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let a = open(d.path(), "a.db");
    let h = connect(&a, &relay.url(), token);
    a.execute(
        "INSERT INTO todo(id, list, title) VALUES ('z', 'list:zoe', 'mine')",
        &[],
    )
    .unwrap();
    wait_synced(&h);
    // Bad configurations name what is wrong.
    let bad = d.path().join("bad.toml");
    for (text, mention) in [
        (
            "listen = \"nowhere\"\nschema = \"x.json\"\n[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"",
            "listen",
        ),
        (
            "schema = \"/nonexistent.json\"\n[auth]\nhs256_secret = \"0123456789abcdef0123456789abcdef\"",
            "nonexistent",
        ),
        ("[auth]\nhs256_secret = \"short\"", "schema"),
        ("bogus = 1", "bogus"),
        (
            &format!(
                "schema = \"{}\"\n[auth]\nhs256_secret = \"short\"",
                relay.dir.join("schema.json").display()
            ),
            "at least 32",
        ),
        (
            "store = \"postgres://u@localhost:notaport/x\"\nschema = \"x\"",
            "not a usable postgres:// URL",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = Command::new(bin)
            .arg("--config")
            .arg(&bad)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(mention), "{err:?} should mention {mention}");
    }
}

struct Ahead(u64);
impl ferry_core::WallClock for Ahead {
    fn now_millis(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + self.0
    }
}

#[test]
fn a_device_clock_hours_ahead_is_corrected_after_hello() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&d.path().join("relay"));
    let opts = ferry_core::OpenOptions {
        wall_clock: Arc::new(Ahead(2 * 3600 * 1000)),
        ..Default::default()
    };
    let fast = Arc::new(
        ferry_core::Replica::open_with(d.path().join("fast.db"), &schema(), opts).unwrap(),
    );
    let h = connect(&fast, &relay.url(), admin_token("fast"));
    wait_synced(&h);
    fast.execute(
        "INSERT INTO todo(id, list, title) VALUES ('x', 'l', 'stamped right')",
        &[],
    )
    .unwrap();
    wait_synced(&h);
    let other = open(d.path(), "other.db");
    let ho = connect(&other, &relay.url(), admin_token("other"));
    wait_synced(&ho);
    assert_eq!(
        other.query("SELECT title FROM todo", &[]).unwrap().rows[0][0],
        Value::Text("stamped right".into())
    );
    // A later write elsewhere still wins over it: the fast clock did not poison LWW.
    other
        .execute("UPDATE todo SET title = 'later' WHERE id = 'x'", &[])
        .unwrap();
    wait_synced(&ho);
    wait_synced(&h);
    assert_eq!(
        fast.query("SELECT title FROM todo", &[]).unwrap().rows[0][0],
        Value::Text("later".into())
    );
}
