//! Protocol frames: round trips, a frozen golden frame, and bad input that must be refused
//! with a clear error rather than a panic. Plus the sans-I/O client surviving a connection
//! dropped mid-push.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;
use ferry_core::protocol::{Ack, ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg};
use ferry_core::sequencer::Sequencer;
use ferry_core::sync::SyncClient;
use ferry_core::{Error, ReplicaId};

fn hello() -> ClientMsg {
    ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        replica_id: ReplicaId([1; 16]),
        token: "t".into(),
        cursor: 7,
        schema_version: 1,
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

#[test]
fn bad_frames_are_clear_errors() {
    let good = hello().encode().unwrap();
    let mut wrong_version = good.clone();
    wrong_version[2] = 99;
    let mut flags = good.clone();
    flags[3] = 1;
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
