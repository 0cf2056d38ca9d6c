//! A generated corpus of well over 1,000 malformed and hostile frames and tokens, each sent on
//! its own connection to a running relay while a well-behaved client keeps writing and a
//! follower keeps receiving. Every input gets a clear error (an error frame or a refusal with
//! a code and a message); the change sets stored before are byte-identical afterwards and
//! nothing from a hostile connection is stored; the good client's writes all arrive; the
//! relay's memory stays bounded.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::changeset::{Cell, ChangeSet};
use ferry_core::hlc::Hlc;
use ferry_core::protocol::{ClientMsg, LeaseOutcome, LeaseRequest, ServerMsg};
use ferry_core::{ReplicaId, RowChange, RowOp, Value};
use ferry_relay::auth::{Claims, mint_hs256, now_secs};
use ferry_testkit::change::*;
use ferry_testkit::relay::*;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What a case sends.
enum Send {
    /// Raw bytes as the first frame.
    Raw(Vec<u8>),
    /// A hello with this token.
    Hello(String),
    /// A valid hello, then this frame.
    After(ClientMsg),
    /// A valid hello, then these bytes.
    AfterRaw(Vec<u8>),
    /// A valid hello as replica `R` with this (read-only) token, then this frame.
    AfterAs(String, ClientMsg),
}

struct Case {
    family: &'static str,
    send: Send,
    /// An exact replay of an accepted change set may be acknowledged (idempotent).
    ack_ok: bool,
}

const H: ReplicaId = ReplicaId([0x66; 16]);
/// The replica of the read-only subject's cases (ids are bound to their first subject).
const R: ReplicaId = ReplicaId([0x67; 16]);

fn reader() -> String {
    token_until("reader", &["list:m"], &[], now_secs() + 3600)
}

fn mallory() -> String {
    token_until(
        "mallory",
        &["list:m", "global"],
        &["list:m"],
        now_secs() + 3600,
    )
}

fn row(table: &str, pk: Value, cl: u64, op: RowOp) -> RowChange {
    RowChange {
        table: table.into(),
        pk,
        cl,
        op,
    }
}

fn set_of(origin: ReplicaId, oseq: u64, rows: Vec<RowChange>) -> ChangeSet {
    change_set(origin, oseq).rows(rows).build()
}

fn todo_cells(list: &str) -> Vec<Cell> {
    vec![
        Cell::Set("list".into(), Value::Text(list.into())),
        Cell::Set("title".into(), Value::Text("x".into())),
    ]
}

fn push(sets: Vec<ChangeSet>) -> ClientMsg {
    ClientMsg::Push { change_sets: sets }
}

/// A push of one change set from the hostile connection's replica with one row change.
fn push_row(oseq: u64, table: &str, pk: Value, cl: u64, op: RowOp) -> Send {
    Send::After(push(vec![set_of(H, oseq, vec![row(table, pk, cl, op)])]))
}

/// The client frames of the protocol's golden files.
fn golden_client_frames() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/golden");
    let mut out = Vec::new();
    for name in [
        "hello",
        "push",
        "push_guarded",
        "ping",
        "checksum_request",
        "lease_acquire",
        "lease_renew",
        "lease_release",
    ] {
        out.push(ferry_testkit::golden::read(
            &dir.join(format!("{name}.hex")),
        ));
    }
    out
}

fn corpus(rng: &mut StdRng, replay: &ChangeSet) -> Vec<Case> {
    let mut c = Vec::new();
    let mut add = |family, send, ack_ok| {
        c.push(Case {
            family,
            send,
            ack_ok,
        })
    };
    let golden = golden_client_frames();
    // Truncated frames.
    for f in &golden {
        let step = (f.len() / 25).max(1);
        for n in (0..f.len()).step_by(step) {
            add("truncated frame", Send::Raw(f[..n].to_vec()), false);
        }
    }
    // Bit flips and garbage.
    for _ in 0..200 {
        let mut f = golden[rng.random_range(0..golden.len())].clone();
        let i = rng.random_range(0..f.len());
        f[i] ^= 1 << rng.random_range(0..8);
        add("bit flip", Send::Raw(f), false);
    }
    for _ in 0..150 {
        let n = rng.random_range(1..3000);
        add(
            "garbage",
            Send::Raw((0..n).map(|_| rng.random()).collect()),
            false,
        );
    }
    // Wrong protocol versions.
    let hello = &golden[0];
    for v in 0..=255u8 {
        if v == ferry_core::protocol::PROTOCOL_VERSION {
            continue;
        }
        let mut f = hello.clone();
        f[2] = v;
        add("wrong version", Send::Raw(f), false);
    }
    // Huge length prefixes (array, map, str, bin claiming 4 GiB), raw and after a hello.
    for prefix in [
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![0xdb, 0xff, 0xff, 0xff, 0xff],
        vec![0xc6, 0xff, 0xff, 0xff, 0xff],
        vec![0xc5, 0xff, 0xff],
    ] {
        for flags in 0..4u8 {
            let mut f = hello[..4].to_vec();
            f[3] = flags;
            f.extend(&prefix);
            f.extend([0u8; 16]);
            add("huge length prefix", Send::Raw(f.clone()), false);
            add("huge length prefix", Send::AfterRaw(f), false);
        }
    }
    // Compressed frames whose stated size is a lie (decompression bombs).
    for claimed in [u32::MAX, 1 << 30, 64 << 20, 10] {
        let mut f = hello[..4].to_vec();
        f[3] = 1;
        f.extend(claimed.to_le_bytes());
        f.extend([0x1f, 0, 0, 0, 0xff, 0xff]);
        add("decompression bomb", Send::Raw(f), false);
    }
    // Tokens.
    let now = now_secs();
    let forged = {
        let claims = Claims {
            sub: "mallory".into(),
            exp: now + 3600,
            read: vec!["*".into()],
            write: vec!["*".into()],
            primary: vec!["*".into()],
            iss: None,
            aud: None,
            nbf: None,
            iat: None,
        };
        mint_hs256(b"not-the-relay-secret-not-the-relay-secret", &claims).unwrap()
    };
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let payload = b64(&format!(
        r#"{{"sub":"mallory","exp":{},"read":["*"],"write":["*"]}}"#,
        now + 3600
    ));
    let mut tokens = vec![
        token_until("mallory", &["*"], &["*"], now - 3600),
        token_until("mallory", &["*"], &["*"], 0),
        token_until("", &["*"], &["*"], now + 3600),
        forged.clone(),
        format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#)),
        format!("{}.{payload}.", b64(r#"{"alg":"NONE"}"#)),
        format!("{}.{payload}.c2ln", b64(r#"{"alg":"HS512"}"#)),
        format!("{}.{payload}.c2ln", b64(r#"{"alg":"RS256","kid":"nope"}"#)),
        String::new(),
        "Bearer".into(),
        "a.b.c".into(),
        "x".repeat(200_000),
        "🦀.🦀.🦀".into(),
        format!("{}.{payload}", b64(r#"{"alg":"HS256"}"#)),
    ];
    // Scope patterns that try to escalate (the token is valid; its patterns are data).
    tokens.push(token_until("m{sub}", &["{sub}*"], &["*"], now - 1));
    for i in 0..40 {
        let mut t = forged.clone().into_bytes();
        let k = rng.random_range(0..t.len());
        t[k] = b"abcdefghijklmnopqrstuvwxyz0123456789-_."[i % 39];
        tokens.push(String::from_utf8_lossy(&t).into_owned());
    }
    for t in tokens {
        add("bad token", Send::Hello(t), false);
    }
    // Names and identifiers.
    let names = [
        "",
        "nope",
        "ferry_meta",
        "sqlite_master",
        "sets",
        "todo; DROP TABLE sets;--",
        "\"todo\"",
        "todo'--",
        "TODO",
        "todo\0",
        "tödö",
        "a.b",
        "[todo]",
        "`todo`",
    ];
    for n in names {
        add(
            "invalid table name",
            push_row(
                1,
                n,
                Value::Text("k".into()),
                1,
                RowOp::Upsert(todo_cells("list:m")),
            ),
            false,
        );
        let mut cells = todo_cells("list:m");
        cells.push(Cell::Set(n.into(), Value::Integer(1)));
        add(
            "invalid column name",
            push_row(1, "todo", Value::Text("k".into()), 1, RowOp::Upsert(cells)),
            false,
        );
    }
    let long = "n".repeat(100_000);
    add(
        "invalid table name",
        push_row(1, &long, Value::Text("k".into()), 1, RowOp::Delete),
        false,
    );
    // Keys and values.
    for pk in [
        Value::Integer(1),
        Value::Null,
        Value::Real(1.5),
        Value::Text("k".repeat(300_000)),
        Value::Blob(vec![0; 300_000]),
    ] {
        add(
            "bad or oversized key",
            push_row(1, "todo", pk, 1, RowOp::Upsert(todo_cells("list:m"))),
            false,
        );
    }
    for v in [
        Value::Text("v".repeat(300_000)),
        Value::Blob(vec![7; 300_000]),
    ] {
        let mut cells = todo_cells("list:m");
        cells[1] = Cell::Set("title".into(), v);
        add(
            "oversized value",
            push_row(1, "todo", Value::Text("k".into()), 1, RowOp::Upsert(cells)),
            false,
        );
    }
    // Counters: wrong kind, overflowing.
    for (col, cell) in [
        (
            "votes",
            Cell::Set("votes".into(), Value::Text("many".into())),
        ),
        ("title", Cell::Add("title".into(), 1)),
        ("votes", Cell::Add("votes".into(), i64::MAX)),
        ("votes", Cell::Add("votes".into(), i64::MIN)),
    ] {
        let _ = col;
        let mut cells = todo_cells("list:m");
        cells.push(cell.clone());
        add(
            "bad counter",
            push_row(
                1,
                "todo",
                Value::Text("k".into()),
                1,
                RowOp::Upsert(cells.clone()),
            ),
            false,
        );
        cells.push(cell);
        add(
            "bad counter",
            push_row(1, "todo", Value::Text("k".into()), 1, RowOp::Upsert(cells)),
            false,
        );
    }
    // Causal lengths, sequence numbers, clocks.
    for (cl, op) in [
        (0, RowOp::Upsert(todo_cells("list:m"))),
        (2, RowOp::Upsert(todo_cells("list:m"))),
        (1, RowOp::Delete),
        (u64::MAX, RowOp::Delete),
    ] {
        add(
            "bad causal length",
            push_row(1, "todo", Value::Text("k".into()), cl, op),
            false,
        );
    }
    for oseq in [0, 2, 1000, u64::MAX] {
        add(
            "bad origin_seq",
            push_row(
                oseq,
                "todo",
                Value::Text("k".into()),
                1,
                RowOp::Upsert(todo_cells("list:m")),
            ),
            false,
        );
    }
    for hlc in [Hlc(u64::MAX), Hlc::new((now + 86_400) * 1000, 0)] {
        let mut s = set_of(
            H,
            1,
            vec![row(
                "todo",
                Value::Text("k".into()),
                1,
                RowOp::Upsert(todo_cells("list:m")),
            )],
        );
        s.hlc = hlc;
        add("clock far ahead", Send::After(push(vec![s])), false);
    }
    // Forged origins, replays, scope escalation.
    for i in 0..30u8 {
        add(
            "forged origin",
            Send::After(push(vec![set_of(
                ReplicaId([i; 16]),
                1,
                vec![row(
                    "todo",
                    Value::Text("k".into()),
                    1,
                    RowOp::Upsert(todo_cells("list:m")),
                )],
            )])),
            false,
        );
    }
    add(
        "replayed change set of another replica",
        Send::After(push(vec![replay.clone()])),
        false,
    );
    let mut altered = replay.clone();
    altered.id = ulid::Ulid::generate().to_bytes();
    add(
        "replayed change set of another replica",
        Send::After(push(vec![altered])),
        false,
    );
    for list in [
        "list:w",
        "list:shared",
        "list:",
        "*",
        "list:m*",
        "LIST:M",
        "global",
    ] {
        add(
            "scope escalation",
            push_row(
                1,
                "todo",
                Value::Text("k".into()),
                1,
                RowOp::Upsert(todo_cells(list)),
            ),
            false,
        );
    }
    for table in ["price", "tag", "note"] {
        add(
            "scope escalation",
            Send::After(push(vec![set_of(
                H,
                1,
                vec![row(
                    table,
                    Value::Text("k".into()),
                    1,
                    RowOp::Upsert(vec![Cell::Set("cents".into(), Value::Integer(1))]),
                )],
            )])),
            false,
        );
    }
    // Too many change sets, second hello, leases.
    add(
        "too many change sets",
        Send::After(push(
            (1..=2000)
                .map(|i| {
                    set_of(
                        H,
                        i,
                        vec![row("todo", Value::Text(format!("k{i}")), 1, RowOp::Delete)],
                    )
                })
                .collect(),
        )),
        false,
    );
    add(
        "second hello",
        Send::After(raw::hello(H, &mallory(), 0)),
        false,
    );
    for name in [
        String::new(),
        "l".repeat(10_000),
        "a\0b".into(),
        "\u{7}".into(),
    ] {
        for ttl in [0, 1000, u64::MAX] {
            add(
                "bad lease request",
                Send::After(ClientMsg::Lease {
                    nonce: 1,
                    request: LeaseRequest::Acquire {
                        name: name.clone(),
                        ttl_ms: ttl,
                    },
                }),
                false,
            );
        }
    }
    // Operations the token has no grant for: empty change sets from a read-only token (which
    // used to be stored), pushes of any kind from it, and leases outside the write grants.
    for oseq in [1, 2, 1 << 40] {
        add(
            "empty change set without a write grant",
            Send::AfterAs(reader(), push(vec![set_of(R, oseq, Vec::new())])),
            false,
        );
        add(
            "push without a write grant",
            Send::AfterAs(
                reader(),
                push(vec![set_of(
                    R,
                    oseq,
                    vec![row(
                        "todo",
                        Value::Text("r".into()),
                        1,
                        RowOp::Upsert(todo_cells("list:m")),
                    )],
                )]),
            ),
            false,
        );
    }
    for name in ["payroll", "list:w", "list:m:x", "*"] {
        for request in [
            LeaseRequest::Acquire {
                name: name.into(),
                ttl_ms: 1000,
            },
            LeaseRequest::Renew {
                name: name.into(),
                token: 1,
                ttl_ms: 1000,
            },
            LeaseRequest::Release {
                name: name.into(),
                token: 1,
            },
        ] {
            add(
                "lease outside the write grants",
                Send::After(ClientMsg::Lease { nonce: 1, request }),
                false,
            );
        }
    }
    c
}

/// What a case got back.
async fn run_case(url: &str, case: &Case) -> Result<String, String> {
    let mut ws = raw::connect(url).await;
    match &case.send {
        Send::Raw(b) => raw::send_bytes(&mut ws, b.clone()).await,
        Send::Hello(t) => raw::send(&mut ws, &raw::hello(H, t, 0)).await,
        Send::After(_) | Send::AfterRaw(_) | Send::AfterAs(..) => {
            let hello = match &case.send {
                Send::AfterAs(token, _) => raw::hello(R, token, 0),
                _ => raw::hello(H, &mallory(), 0),
            };
            raw::send(&mut ws, &hello).await;
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Welcome { .. }) => {}
                other => return Err(format!("no welcome: {other:?}")),
            }
            match &case.send {
                Send::After(m) => raw::send_bytes(&mut ws, m.encode().unwrap()).await,
                Send::AfterRaw(b) => raw::send_bytes(&mut ws, b.clone()).await,
                Send::AfterAs(_, m) => raw::send_bytes(&mut ws, m.encode().unwrap()).await,
                _ => unreachable!(),
            }
        }
    }
    loop {
        match raw::recv(&mut ws).await {
            Some(ServerMsg::Error { code, message })
            | Some(ServerMsg::Refused { code, message, .. }) => {
                if message.trim().is_empty() {
                    return Err(format!("{code:?} without a message"));
                }
                return Ok(format!("{code:?}"));
            }
            Some(ServerMsg::Acks { .. }) if case.ack_ok => return Ok("acked (replay)".into()),
            // A lease the token has no grant for: a typed answer that says nothing about it.
            Some(ServerMsg::Lease {
                outcome: LeaseOutcome::Forbidden { .. },
                ..
            }) => return Ok("lease forbidden".into()),
            Some(ServerMsg::Changes { .. }) | Some(ServerMsg::Welcome { .. }) => continue,
            other => return Err(format!("{other:?}")),
        }
    }
}

#[test]
fn generated_hostile_corpus_harms_nothing() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nmax_frame_bytes = 262144\nmax_push_sets = 64\nframes_per_second = 100000\nframe_burst = 100000\n",
    );
    let url = relay.url();
    // The well-behaved client and a follower.
    let w = open(d.path(), "w.db");
    let hw = connect(
        &w,
        &url,
        token_until(
            "w",
            &["list:w", "global"],
            &["list:w", "global"],
            now_secs() + 3600,
        ),
    );
    w.execute(
        "INSERT INTO todo (id, list, title) VALUES ('w0', 'list:w', 'first')",
        &[],
    )
    .unwrap();
    wait_synced(&hw);
    let follower = open(d.path(), "f.db");
    let hf = connect(
        &follower,
        &url,
        token_until("f", &["list:w"], &[], now_secs() + 3600),
    );
    wait_synced(&hf);
    let replay = store_dump(&relay.dir)
        .last()
        .map(|(_, _, _, body)| {
            let (cs, _): (ChangeSet, Vec<ferry_relay::scoping::RowTag>) =
                ferry_core::envelope::open(body).unwrap();
            cs
        })
        .unwrap();
    let before = store_dump(&relay.dir);
    let rss_before = relay.memory_kib("VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let w = Arc::clone(&w);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut k = 1;
            while !stop.load(Ordering::SeqCst) {
                w.execute(
                    "INSERT INTO todo (id, list, title) VALUES (?1, 'list:w', 'x')",
                    &[Value::Text(format!("w{k}"))],
                )
                .unwrap();
                k += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            k
        })
    };
    let mut rng = StdRng::seed_from_u64(0xF377);
    let cases = corpus(&mut rng, &replay);
    assert!(cases.len() >= 1000, "only {} cases", cases.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut outcomes: BTreeMap<(&str, String), u32> = BTreeMap::new();
    let mut failures = Vec::new();
    rt.block_on(async {
        for case in &cases {
            match run_case(&url, case).await {
                Ok(code) => *outcomes.entry((case.family, code)).or_default() += 1,
                Err(e) => failures.push(format!("{}: {e}", case.family)),
            }
        }
    });
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} cases without a clear error: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    // The good client's writes all arrived, during the barrage.
    wait_synced(&hw);
    wait_synced(&hf);
    assert_eq!(follower.dump().unwrap(), w.dump().unwrap());
    let n = follower
        .query("SELECT count(*) FROM todo", &[])
        .unwrap()
        .rows[0][0]
        .clone();
    assert_eq!(n, Value::Integer(written));
    // Stored change sets: the old ones byte-identical, the new ones all the good client's.
    let after = store_dump(&relay.dir);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "stored change sets changed"
    );
    let w_origin = w.replica_id().unwrap().0.to_vec();
    for (seq, origin, _, _) in &after[before.len()..] {
        assert_eq!(
            origin, &w_origin,
            "change set {seq} did not come from the good client"
        );
    }
    check_log(&relay);
    let rss_after = relay.memory_kib("VmRSS");
    eprintln!(
        "hostile: {} cases, relay RSS {} -> {} KiB; outcomes: {outcomes:?}",
        cases.len(),
        rss_before,
        rss_after
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "relay memory grew from {rss_before} to {rss_after} KiB"
    );
}
