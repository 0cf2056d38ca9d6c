//! Hostile and malformed input against a running relay: every case gets a clear, typed
//! error; stored change sets are unchanged; a well-behaved client keeps syncing throughout.
#![allow(clippy::unwrap_used, missing_docs)]

use base64::Engine;
use ferry_core::changeset::{Cell, ChangeSet};
use ferry_core::hlc::Hlc;
use ferry_core::protocol::{ClientMsg, ErrorCode, ServerMsg};
use ferry_core::{ReplicaId, Value};
use ferry_relay::auth::{Claims, mint_hs256, now_secs};
use ferry_testkit::relay::*;
use std::time::Duration;

fn cs(origin: ReplicaId, oseq: u64, table: &str, pk: &str, cl: u64, cells: Vec<Cell>) -> ChangeSet {
    raw::change_set(origin, oseq, table, pk, cl, cells)
}

fn set(c: &str, v: Value) -> Cell {
    Cell::Set(c.into(), v)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn claims(sub: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        exp,
        read: vec!["*".into()],
        write: vec!["*".into()],
        primary: vec![],
        iss: None,
        aud: None,
        nbf: None,
        iat: None,
    }
}

/// Connects, says hello with `token`, and returns the socket after the welcome.
async fn hello_ok(url: &str, replica: ReplicaId, token: &str) -> raw::Ws {
    let mut ws = raw::connect(url).await;
    raw::send(&mut ws, &raw::hello(replica, token, 0)).await;
    match raw::recv(&mut ws).await {
        Some(ServerMsg::Welcome { .. }) => ws,
        other => panic!("expected welcome, got {other:?}"),
    }
}

async fn expect_error(ws: &mut raw::Ws, code: ErrorCode, mentions: &str) {
    let (c, m) = raw::recv_error(ws)
        .await
        .unwrap_or_else(|| panic!("no error frame (wanted {code:?})"));
    assert_eq!(c, code, "wrong code; message: {m}");
    assert!(
        m.to_lowercase().contains(&mentions.to_lowercase()),
        "error message {m:?} should mention {mentions:?}"
    );
    assert!(
        raw::closed(ws).await,
        "connection should close after an error frame"
    );
}

async fn expect_refused(ws: &mut raw::Ws, code: ErrorCode, mentions: &str) {
    loop {
        match raw::recv(ws).await {
            Some(ServerMsg::Refused {
                code: c, message, ..
            }) => {
                assert_eq!(c, code, "wrong code; message: {message}");
                assert!(
                    message.to_lowercase().contains(&mentions.to_lowercase()),
                    "refusal {message:?} should mention {mentions:?}"
                );
                return;
            }
            Some(ServerMsg::Changes { .. }) | Some(ServerMsg::Acks { .. }) => continue,
            other => panic!("expected a refusal ({code:?}), got {other:?}"),
        }
    }
}

/// The connection survives a refusal: a ping is still answered.
async fn still_open(ws: &mut raw::Ws) {
    raw::send(ws, &ClientMsg::Ping { nonce: 77 }).await;
    loop {
        match raw::recv(ws).await {
            Some(ServerMsg::Pong { nonce: 77, .. }) => return,
            Some(_) => continue,
            None => panic!("connection closed after a refusal"),
        }
    }
}

#[test]
fn hostile_input_gets_clear_errors_and_harms_nothing() {
    let d = tempfile::tempdir().unwrap();
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        "[limits]\nmax_frame_bytes = 65536\nmax_push_sets = 16\nmax_clock_skew = \"1m\"\n",
    );
    let url = relay.url();
    // A well-behaved pair that keeps syncing throughout.
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    let ha = connect(&a, &url, admin_token("a"));
    let hb = connect(&b, &url, admin_token("b"));
    let mut n = 0;
    let mut good_write = || {
        n += 1;
        a.execute(
            "INSERT INTO todo(id, list, title) VALUES (?1, 'good', 'x')",
            &[Value::Text(format!("good{n}"))],
        )
        .unwrap();
        wait_synced(&ha);
        let want = n;
        eventually(
            "the good client's write to reach its peer",
            Duration::from_secs(20),
            || {
                let r = b
                    .query("SELECT count(*) FROM todo WHERE list = 'good'", &[])
                    .unwrap();
                r.rows[0][0] == Value::Integer(want)
            },
        );
    };
    good_write();
    let before = store_dump(&relay.dir);
    let good_origins = [a.replica_id().unwrap(), b.replica_id().unwrap()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tok = admin_token("mallory");
    let secret = SECRET.as_bytes();
    let hello_frame = raw::hello(ReplicaId([9; 16]), &tok, 0).encode().unwrap();

    // Frames that are not Ferry frames, or broken ones.
    let mut wrong_version = hello_frame.clone();
    wrong_version[2] = 7;
    let mut flags = hello_frame.clone();
    flags[3] = 0x80;
    let mut bomb = vec![b'F', b'Y', 1, 1];
    bomb.extend_from_slice(&(1u32 << 30).to_le_bytes());
    bomb.extend_from_slice(&[0u8; 32]);
    let mut huge_array = vec![b'F', b'Y', 1, 0, 0x81, 0xa4];
    huge_array.extend_from_slice(b"Push");
    huge_array.extend_from_slice(&[0x81, 0xab]);
    huge_array.extend_from_slice(b"change_sets");
    huge_array.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
    let frame_cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ErrorCode::BadFrame,
            "header",
        ),
        (
            "truncated",
            hello_frame[..hello_frame.len() - 5].to_vec(),
            ErrorCode::BadFrame,
            "undecodable",
        ),
        ("empty", vec![], ErrorCode::BadFrame, "header"),
        (
            "wrong version",
            wrong_version,
            ErrorCode::UnsupportedVersion,
            "version 7",
        ),
        ("unknown flags", flags, ErrorCode::BadFrame, "flags"),
        ("compression bomb", bomb, ErrorCode::TooLarge, "limit"),
        (
            "huge length prefix",
            huge_array,
            ErrorCode::BadFrame,
            "undecodable",
        ),
        (
            "oversized",
            vec![b'F'; 100_000],
            ErrorCode::TooLarge,
            "large",
        ),
    ];
    for (name, bytes, code, mention) in frame_cases {
        rt.block_on(async {
            let mut ws = raw::connect(&url).await;
            raw::send_bytes(&mut ws, bytes).await;
            expect_error(&mut ws, code, mention).await;
        });
        eprintln!("ok: {name}");
        good_write();
    }

    // Tokens.
    let mut hdr_none = b64(r#"{"alg":"none","typ":"JWT"}"#);
    hdr_none.push('.');
    hdr_none.push_str(&b64(&serde_json::to_string(&claims(
        "root",
        now_secs() + 600,
    ))
    .unwrap()));
    hdr_none.push('.');
    let token_cases: Vec<(&str, String, &str)> = vec![
        (
            "forged",
            mint_hs256(
                b"another-secret-another-secret-another",
                &claims("x", now_secs() + 600),
            )
            .unwrap(),
            "signature",
        ),
        (
            "expired",
            mint_hs256(secret, &claims("x", now_secs() - 3600)).unwrap(),
            "expired",
        ),
        ("alg none", hdr_none, "none"),
        ("garbage token", "not.a.jwt".into(), "token"),
        ("empty token", String::new(), "token"),
        (
            "empty sub",
            mint_hs256(secret, &claims("", now_secs() + 600)).unwrap(),
            "sub",
        ),
    ];
    for (name, token, mention) in token_cases {
        rt.block_on(async {
            let mut ws = raw::connect(&url).await;
            raw::send(&mut ws, &raw::hello(ReplicaId([8; 16]), &token, 0)).await;
            expect_error(&mut ws, ErrorCode::Unauthorized, mention).await;
        });
        eprintln!("ok: {name}");
        good_write();
    }

    // Protocol misuse after a valid hello.
    let me = ReplicaId::generate();
    rt.block_on(async {
        let mut ws = raw::connect(&url).await;
        raw::send(&mut ws, &ClientMsg::Ping { nonce: 1 }).await;
        expect_error(&mut ws, ErrorCode::BadFrame, "hello").await;

        let mut ws = raw::connect(&url).await;
        raw::send(&mut ws, &raw::hello(me, &tok, 0)).await;
        raw::send(&mut ws, &ClientMsg::Ping { nonce: 1 }).await; // fine
        raw::send(&mut ws, &raw::hello(me, &tok, 0)).await;
        expect_error(&mut ws, ErrorCode::BadFrame, "twice").await;

        let mut ws = hello_ok(&url, me, &tok).await;
        ws_text(&mut ws).await;
        expect_error(&mut ws, ErrorCode::BadFrame, "text").await;

        let mut ws = raw::connect(&url).await;
        raw::send(&mut ws, &raw::hello(me, &tok, 1_000_000)).await;
        expect_error(&mut ws, ErrorCode::InvalidChangeSet, "beyond").await;

        // Origin spoofing: pushing another replica's change set (a replay of the good one's).
        let mut ws = hello_ok(&url, me, &tok).await;
        let spoof = cs(
            good_origins[0],
            99,
            "todo",
            "spoof",
            1,
            vec![set("list", "good".into())],
        );
        raw::send(
            &mut ws,
            &ClientMsg::Push {
                change_sets: vec![spoof],
            },
        )
        .await;
        expect_error(&mut ws, ErrorCode::InvalidChangeSet, "origin").await;

        let mut ws = hello_ok(&url, me, &tok).await;
        let many: Vec<ChangeSet> = (1..=17)
            .map(|i| cs(me, i, "tag", &format!("t{i}"), 1, vec![]))
            .collect();
        raw::send(&mut ws, &ClientMsg::Push { change_sets: many }).await;
        expect_error(&mut ws, ErrorCode::TooLarge, "limit").await;
    });
    good_write();

    // Change sets the relay refuses without closing the connection.
    rt.block_on(async {
        let mut ws = hello_ok(&url, me, &tok).await;
        let refusals: Vec<(&str, ChangeSet, ErrorCode, &str)> = vec![
            (
                "unknown table",
                cs(me, 1, "nope", "k", 1, vec![]),
                ErrorCode::InvalidChangeSet,
                "nope",
            ),
            (
                "sql-looking table",
                cs(me, 1, "todo; DROP TABLE todo", "k", 1, vec![]),
                ErrorCode::InvalidChangeSet,
                "not in the relay's schema",
            ),
            (
                "unknown column",
                cs(me, 1, "todo", "k", 1, vec![set("nope", 1.into())]),
                ErrorCode::InvalidChangeSet,
                "nope",
            ),
            (
                "even cl upsert",
                {
                    let mut c = cs(me, 1, "todo", "k", 1, vec![]);
                    c.rows[0].cl = 2;
                    c
                },
                ErrorCode::InvalidChangeSet,
                "causal length",
            ),
            (
                "counter set",
                cs(me, 1, "todo", "k", 1, vec![set("votes", 5.into())]),
                ErrorCode::InvalidChangeSet,
                "counter",
            ),
            (
                "integer key",
                {
                    let mut c = cs(me, 1, "tag", "k", 1, vec![]);
                    c.rows[0].pk = Value::Integer(4);
                    c
                },
                ErrorCode::InvalidChangeSet,
                "primary key",
            ),
            (
                "gap",
                cs(me, 5, "tag", "k", 1, vec![]),
                ErrorCode::InvalidChangeSet,
                "gaps",
            ),
            (
                "zero origin_seq",
                cs(me, 0, "tag", "k", 1, vec![]),
                ErrorCode::InvalidChangeSet,
                "origin_seq",
            ),
            (
                "clock skew",
                {
                    let mut c = cs(me, 1, "tag", "k", 1, vec![]);
                    c.hlc = Hlc::new(now_secs() * 1000 + 3_600_000, 0);
                    c
                },
                ErrorCode::ClockSkew,
                "ahead",
            ),
            (
                "read_only table",
                cs(me, 1, "price", "p1", 1, vec![set("cents", 100.into())]),
                ErrorCode::Forbidden,
                "read_only",
            ),
        ];
        for (name, c, code, mention) in refusals {
            raw::send(
                &mut ws,
                &ClientMsg::Push {
                    change_sets: vec![c],
                },
            )
            .await;
            expect_refused(&mut ws, code, mention).await;
            still_open(&mut ws).await;
            eprintln!("ok: {name}");
        }
    });
    good_write();

    // Scope escalation: a token limited to `list:mine` writes elsewhere.
    rt.block_on(async {
        let limited = token_for(
            "eve",
            &["list:mine", "global"],
            &["list:mine"],
            Duration::from_secs(600),
        );
        let eve = ReplicaId::generate();
        let mut ws = hello_ok(&url, eve, &limited).await;
        let c = cs(
            eve,
            1,
            "todo",
            "e1",
            1,
            vec![set("list", "list:other".into())],
        );
        raw::send(
            &mut ws,
            &ClientMsg::Push {
                change_sets: vec![c],
            },
        )
        .await;
        expect_refused(&mut ws, ErrorCode::Forbidden, "list:other").await;
        let c = cs(eve, 1, "tag", "e1", 1, vec![set("name", "x".into())]);
        raw::send(
            &mut ws,
            &ClientMsg::Push {
                change_sets: vec![c],
            },
        )
        .await;
        expect_refused(&mut ws, ErrorCode::Forbidden, "global").await;
        // Taking over another list's existing row by moving it into one's own scope.
        let c = cs(
            eve,
            1,
            "todo",
            "good1",
            1,
            vec![set("list", "list:mine".into())],
        );
        raw::send(
            &mut ws,
            &ClientMsg::Push {
                change_sets: vec![c],
            },
        )
        .await;
        // The refusal does not say where the row lives (eve cannot read that scope).
        expect_refused(&mut ws, ErrorCode::Forbidden, "may not be written").await;
    });
    good_write();

    let after = store_dump(&relay.dir);
    assert!(after.len() > before.len(), "the good client kept writing");
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "stored change sets unchanged"
    );
    for (seq, origin, _, _) in &after[before.len()..] {
        assert!(
            good_origins
                .iter()
                .any(|o| o.0.as_slice() == origin.as_slice()),
            "change set {seq} came from a hostile connection"
        );
    }
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    drop((ha, hb));
}

async fn ws_text(ws: &mut raw::Ws) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello?".into(),
    ))
    .await
    .unwrap();
}
