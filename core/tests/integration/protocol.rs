//! Protocol frames: round trips, a frozen golden frame, and bad input that must be refused
//! with a clear error rather than a panic. Plus the sans-I/O client surviving a connection
//! dropped mid-push.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::protocol::{Ack, ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg};
use ferry_core::scope::{HeldScopes, Pattern, ScopeSet};
use ferry_core::sequencer::Sequencer;
use ferry_core::sync::SyncClient;
use ferry_core::{Error, ReplicaId};
use ferry_testkit::local::*;

fn hello() -> ClientMsg {
    ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        replica_id: ReplicaId([1; 16]),
        token: "t".into(),
        cursor: 7,
        schema_version: 1,
        snapshots: false,
        resume: None,
        subscriptions: None,
        held: None,
    }
}

#[test]
fn frames_round_trip() {
    let msgs = vec![
        hello(),
        ClientMsg::Ping { nonce: 9 },
        ClientMsg::Push {
            change_sets: vec![],
        },
    ];
    for m in msgs {
        assert_eq!(ClientMsg::decode(&m.encode().unwrap()).unwrap(), m);
    }
    let s = ServerMsg::Acks {
        acks: vec![Ack {
            origin_seq: 1,
            server_seq: 2,
        }],
    };
    assert_eq!(ServerMsg::decode(&s.encode().unwrap()).unwrap(), s);
    let e = ServerMsg::Error {
        code: ErrorCode::Unauthorized,
        message: "expired".into(),
    };
    assert_eq!(ServerMsg::decode(&e.encode().unwrap()).unwrap(), e);
}

/// Changing the wire format must be a visible decision: this frame is frozen.
#[test]
fn golden_hello_frame() {
    let hex: String = hello()
        .encode()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        "46590100\
         81a548656c6c6f85a870726f746f636f6c01aa7265706c6963615f6964dc0010\
         01010101010101010101010101010101a5746f6b656ea174a6637572736f7207\
         ae736368656d615f76657273696f6e01"
    );
}

/// One frame of every message kind, frozen in `core/tests/golden/<name>.hex`. Set
/// `FERRY_BLESS=1` to rewrite the files after a deliberate format change (and bump
/// `PROTOCOL_VERSION` when an existing field changes meaning).
#[test]
fn golden_frames_of_every_message() {
    use ferry_core::changeset::{Cell, ChangeSet, RowChange, RowOp, Sequenced};
    use ferry_core::protocol::{LeaseOutcome, LeaseRequest, Limits, Move, RowKey};
    use ferry_core::{Hlc, Value};
    let cs = ChangeSet {
        id: [2; 16],
        origin: ReplicaId([1; 16]),
        origin_seq: 3,
        hlc: Hlc::new(1_700_000_000_000, 5),
        base: 41,
        schema_version: 1,
        fence: None,
        guarded: false,
        rows: vec![
            RowChange {
                table: "todo".into(),
                pk: Value::Text("k1".into()),
                cl: 1,
                op: RowOp::Upsert(vec![
                    Cell::Set("title".into(), Value::Text("milk".into())),
                    Cell::Set("done".into(), Value::Integer(0)),
                    Cell::Set("price".into(), Value::Real(1.5)),
                    Cell::Set("photo".into(), Value::Blob(vec![0xde, 0xad])),
                    Cell::Set("note".into(), Value::Null),
                    Cell::Add("votes".into(), -2),
                ]),
            },
            RowChange {
                table: "todo".into(),
                pk: Value::Blob(vec![9, 9]),
                cl: 2,
                op: RowOp::Delete,
            },
        ],
    };
    let seq = Sequenced {
        server_seq: 42,
        change_set: cs.clone(),
    };
    let client: Vec<(&str, ClientMsg)> = vec![
        ("hello", hello()),
        (
            "hello_resume",
            ClientMsg::Hello {
                protocol: PROTOCOL_VERSION,
                replica_id: ReplicaId([1; 16]),
                token: "t".into(),
                cursor: 0,
                schema_version: 1,
                snapshots: true,
                resume: Some(vec![1, 2, 3]),
                subscriptions: None,
                held: None,
            },
        ),
        (
            "hello_scopes",
            ClientMsg::Hello {
                protocol: PROTOCOL_VERSION,
                replica_id: ReplicaId([1; 16]),
                token: "t".into(),
                cursor: 7,
                schema_version: 1,
                snapshots: true,
                resume: None,
                subscriptions: Some(vec!["project:42".into(), "project:7*".into()]),
                held: Some(HeldScopes {
                    scopes: ScopeSet::any_of(vec![Pattern::parse("project:*").unwrap()]),
                    below: Some((5, ScopeSet::any_of(vec![Pattern::literal("project:7")]))),
                }),
            },
        ),
        (
            "push",
            ClientMsg::Push {
                change_sets: vec![cs.clone()],
            },
        ),
        ("ping", ClientMsg::Ping { nonce: 7 }),
        ("checksum_request", ClientMsg::Checksum { nonce: 8 }),
        (
            "push_guarded",
            ClientMsg::Push {
                change_sets: vec![ChangeSet {
                    fence: Some(ferry_core::Fence {
                        lease: "leader".into(),
                        token: 3,
                    }),
                    guarded: true,
                    ..cs.clone()
                }],
            },
        ),
        (
            "lease_acquire",
            ClientMsg::Lease {
                nonce: 9,
                request: LeaseRequest::Acquire {
                    name: "leader".into(),
                    ttl_ms: 5000,
                },
            },
        ),
        (
            "lease_renew",
            ClientMsg::Lease {
                nonce: 10,
                request: LeaseRequest::Renew {
                    name: "leader".into(),
                    token: 3,
                    ttl_ms: 5000,
                },
            },
        ),
        (
            "lease_release",
            ClientMsg::Lease {
                nonce: 11,
                request: LeaseRequest::Release {
                    name: "leader".into(),
                    token: 3,
                },
            },
        ),
    ];
    let server: Vec<(&str, ServerMsg)> = vec![
        (
            "welcome",
            ServerMsg::Welcome {
                protocol: 1,
                head: 42,
                server_time_ms: 1_700_000_000_123,
                max_origin_seq: 2,
                limits: Limits::default(),
                horizon: 10,
                snapshot: false,
                scopes: None,
            },
        ),
        (
            "welcome_scopes",
            ServerMsg::Welcome {
                protocol: 1,
                head: 42,
                server_time_ms: 1_700_000_000_123,
                max_origin_seq: 2,
                limits: Limits::default(),
                horizon: 10,
                snapshot: true,
                scopes: Some(
                    ScopeSet::any_of(vec![Pattern::parse("project:*").unwrap()])
                        .and(&ScopeSet::any_of(vec![Pattern::literal("project:42")])),
                ),
            },
        ),
        (
            "acks",
            ServerMsg::Acks {
                acks: vec![Ack {
                    origin_seq: 3,
                    server_seq: 42,
                }],
            },
        ),
        (
            "refused",
            ServerMsg::Refused {
                origin_seq: 4,
                code: ErrorCode::Forbidden,
                message: "scope `list:b`".into(),
                conflict_seq: 0,
            },
        ),
        (
            "refused_conflict",
            ServerMsg::Refused {
                origin_seq: 5,
                code: ErrorCode::Conflict,
                message: "`acct`.`balance` of row 'a' was changed at relay position 40".into(),
                conflict_seq: 40,
            },
        ),
        (
            "refused_fenced",
            ServerMsg::Refused {
                origin_seq: 6,
                code: ErrorCode::Fenced,
                message: "fencing token 2 of lease `leader` is stale".into(),
                conflict_seq: 0,
            },
        ),
        (
            "lease_granted",
            ServerMsg::Lease {
                nonce: 9,
                outcome: LeaseOutcome::Granted {
                    name: "leader".into(),
                    token: 3,
                    ttl_ms: 5000,
                },
            },
        ),
        (
            "lease_busy",
            ServerMsg::Lease {
                nonce: 9,
                outcome: LeaseOutcome::Busy {
                    name: "leader".into(),
                    retry_after_ms: 1200,
                },
            },
        ),
        (
            "lease_released",
            ServerMsg::Lease {
                nonce: 11,
                outcome: LeaseOutcome::Released {
                    name: "leader".into(),
                },
            },
        ),
        (
            "lease_lost",
            ServerMsg::Lease {
                nonce: 10,
                outcome: LeaseOutcome::Lost {
                    name: "leader".into(),
                    current: 4,
                },
            },
        ),
        (
            "changes",
            ServerMsg::Changes {
                after: 41,
                up_to: 43,
                change_sets: vec![seq.clone()],
                head: 43,
                moves: vec![Move {
                    server_seq: 43,
                    evict: vec![RowKey {
                        table: "todo".into(),
                        pk: Value::Text("k2".into()),
                    }],
                    backfill: vec![seq],
                }],
            },
        ),
        (
            "snapshot",
            ServerMsg::Snapshot {
                position: 40,
                rows: vec![ferry_core::snapshot::SnapshotRow {
                    table: "todo".into(),
                    pk: Value::Text("k1".into()),
                    history: vec![
                        ferry_core::snapshot::HistEntry {
                            server_seq: 12,
                            origin: ReplicaId([1; 16]),
                            origin_seq: 2,
                            hlc: Hlc::new(1_700_000_000_000, 1),
                            base: 11,
                            cl: 1,
                            op: RowOp::Upsert(vec![
                                Cell::Set("title".into(), Value::Text("milk".into())),
                                Cell::Add("votes".into(), 3),
                            ]),
                        },
                        ferry_core::snapshot::HistEntry {
                            server_seq: 40,
                            origin: ReplicaId([3; 16]),
                            origin_seq: 9,
                            hlc: Hlc::new(1_700_000_000_500, 0),
                            base: 39,
                            cl: 2,
                            op: RowOp::Delete,
                        },
                    ],
                }],
                resume: vec![0xaa, 0xbb],
                done: false,
                total_rows: 1000,
                total_bytes: 64_000,
                bytes: 130,
            },
        ),
        ("pong", ServerMsg::Pong { nonce: 7, head: 43 }),
        (
            "checksum",
            ServerMsg::Checksum {
                nonce: 8,
                position: 43,
                digest: [0xab; 32],
                rows: 12,
            },
        ),
        (
            "error",
            ServerMsg::Error {
                code: ErrorCode::Unauthorized,
                message: "token expired".into(),
            },
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let check = |name: &str, bytes: Vec<u8>| {
        ferry_testkit::golden::check(
            &dir.join(format!("{name}.hex")),
            &bytes,
            &format!("frame `{name}` (the wire format)"),
        );
    };
    for (name, m) in client {
        let b = m.encode_plain().unwrap();
        assert_eq!(ClientMsg::decode(&b).unwrap(), m);
        check(name, b);
    }
    for (name, m) in server {
        let b = m.encode_plain().unwrap();
        assert_eq!(ServerMsg::decode(&b).unwrap(), m);
        check(name, b);
    }
}

/// Large frames are compressed; the compressed form decodes to the same message.
#[test]
fn large_frames_are_compressed_and_round_trip() {
    use ferry_core::changeset::{Cell, ChangeSet, RowChange, RowOp};
    use ferry_core::{Hlc, Value};
    let rows = (0..500)
        .map(|i| RowChange {
            table: "todo".into(),
            pk: Value::Text(format!("row-{i:05}")),
            cl: 1,
            op: RowOp::Upsert(vec![Cell::Set(
                "title".into(),
                Value::Text("the same title again".into()),
            )]),
        })
        .collect();
    let m = ClientMsg::Push {
        change_sets: vec![ChangeSet {
            id: [0; 16],
            origin: ReplicaId([1; 16]),
            origin_seq: 1,
            hlc: Hlc::new(1, 0),
            base: 0,
            schema_version: 1,
            fence: None,
            guarded: false,
            rows,
        }],
    };
    let plain = m.encode_plain().unwrap();
    let packed = m.encode().unwrap();
    assert_eq!(packed[3], ferry_core::protocol::FLAG_LZ4);
    assert!(
        packed.len() * 3 < plain.len(),
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    assert_eq!(ClientMsg::decode(&packed).unwrap(), m);
    // A compressed frame announcing more than the limit is refused before decompression.
    let small_limit = ClientMsg::decode_limited(&packed, plain.len() / 2);
    assert!(matches!(small_limit, Err(Error::Protocol(e)) if e.contains("limit")));
}

#[test]
fn bad_frames_are_clear_errors() {
    let good = hello().encode().unwrap();
    let mut wrong_version = good.clone();
    wrong_version[2] = 99;
    let mut flags = good.clone();
    flags[3] = 0x80;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "header"),
        (b"GET / HTTP/1.1".to_vec(), "header"),
        (good[..good.len() - 3].to_vec(), "undecodable"),
        (wrong_version, "version 99"),
        (flags, "flags"),
        (
            [&good[..4], &[0xc1, 0xff, 0x00][..]].concat(),
            "undecodable",
        ),
        (
            vec![b'F', b'Y', 1, 0]
                .into_iter()
                .chain(std::iter::repeat_n(0x91, 64))
                .collect(),
            "undecodable",
        ),
    ];
    for (bytes, want) in cases {
        match ClientMsg::decode(&bytes) {
            Err(Error::Protocol(m)) => assert!(m.contains(want), "{m} should mention {want}"),
            other => panic!("expected a protocol error for {bytes:?}, got {other:?}"),
        }
    }
    let huge = vec![0u8; ferry_core::protocol::MAX_FRAME_BYTES + 1];
    assert!(matches!(ClientMsg::decode(&huge), Err(Error::Protocol(m)) if m.contains("limit")));
}

#[test]
fn client_resumes_after_a_dropped_connection_without_duplicates() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let b = open(d.path(), "b.db");
    for n in 0..10 {
        a.execute(
            "INSERT INTO todo(id, votes) VALUES (?1, 1)",
            &[t(&format!("r{n}"))],
        )
        .unwrap();
    }
    let mut relay = Sequencer::new();
    // First connection: the push reaches the relay but the acks are lost with the link.
    let mut client = SyncClient::new().with_batch(3, 1 << 20);
    let mut session = relay.session();
    let replies = relay.handle(&mut session, client.start(&a, "t").unwrap());
    let step = client.handle(&a, replies[0].clone()).unwrap();
    let first_push = step.send.into_iter().next().unwrap();
    let _lost = relay.handle(&mut session, first_push);
    client.disconnected();
    assert_eq!(relay.head(), 3);
    // Second connection: everything is pushed again; the relay deduplicates.
    let mut session = relay.session();
    let mut outbox = std::collections::VecDeque::from([client.start(&a, "t").unwrap()]);
    while let Some(msg) = outbox.pop_front() {
        for reply in relay.handle(&mut session, msg) {
            outbox.extend(client.handle(&a, reply).unwrap().send);
        }
    }
    assert!(client.is_synced(&a).unwrap());
    assert_eq!(relay.head(), 10, "no change set was sequenced twice");
    let mut seq = relay;
    pull(&seq, &b);
    push(&mut seq, &b);
    assert_eq!(a.dump().unwrap(), b.dump().unwrap());
    assert_eq!(rows(&b, "SELECT sum(votes) FROM todo"), vec![vec![i(10)]]);
}

#[test]
fn data_before_welcome_and_relay_errors_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    let mut client = SyncClient::new();
    client.start(&a, "t").unwrap();
    let early = ServerMsg::Acks { acks: vec![] };
    assert!(matches!(client.handle(&a, early), Err(Error::Protocol(_))));
    let refused = ServerMsg::Error {
        code: ErrorCode::Unauthorized,
        message: "token expired".into(),
    };
    let e = client.handle(&a, refused).unwrap_err();
    assert!(e.to_string().contains("token expired"), "{e}");
}

/// When several pushes are in flight and the first is refused, the later refusals (gaps
/// caused by the first) do not hide the cause.
#[test]
fn the_first_refusal_is_the_one_reported() {
    use ferry_core::protocol::Limits;
    let d = tempfile::tempdir().unwrap();
    let a = open(d.path(), "a.db");
    for n in 0..3 {
        a.execute(
            "INSERT INTO todo(id, votes) VALUES (?1, 1)",
            &[t(&format!("r{n}"))],
        )
        .unwrap();
    }
    let mut client = SyncClient::new().with_batch(1, 1 << 20);
    client.start(&a, "t").unwrap();
    let welcome = ServerMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        head: 0,
        server_time_ms: 0,
        max_origin_seq: 0,
        limits: Limits::default(),
        horizon: 0,
        snapshot: false,
        scopes: None,
    };
    let step = client.handle(&a, welcome).unwrap();
    assert_eq!(step.send.len(), 1);
    while client.poll_push(&a).unwrap().is_some() {}
    let refused = |o: u64, code: ErrorCode, m: &str| ServerMsg::Refused {
        origin_seq: o,
        code,
        message: m.into(),
        conflict_seq: 0,
    };
    // (A refusal that is neither permanent, which would quarantine the change set, nor one
    // the device recovers from by itself.)
    let first = client
        .handle(&a, refused(1, ErrorCode::Internal, "store failed"))
        .unwrap();
    assert_eq!(first.refused.map(|r| r.code), Some(ErrorCode::Internal));
    let later = client
        .handle(&a, refused(2, ErrorCode::InvalidChangeSet, "gap"))
        .unwrap();
    assert!(later.refused.is_none());
    assert_eq!(client.refused().map(|r| r.code), Some(ErrorCode::Internal));
    assert!(
        client.poll_push(&a).unwrap().is_none(),
        "uploads stop after a refusal"
    );
}
