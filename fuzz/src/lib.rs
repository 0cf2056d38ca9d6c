//! The checks behind Ferry's fuzz targets (`fuzz/fuzz_targets`), kept in one place so that
//! `core/tests/integration/fuzz_replay.rs` replays the seed corpus and every crash ever found with plain
//! `cargo test`.
//!
//! * [`frame`]: bytes from the network decode to a message or an error, and a decoded
//!   message survives an encode/decode round trip unchanged (compared as bytes: a REAL
//!   value may be NaN, which no value equals);
//! * [`apply`]: a batch of change sets from the relay is applied or refused with an error;
//!   a refused batch leaves the replica exactly as it was, and the replica stays usable;
//! * [`schema`]: a declaration (JSON) is refused with an error or opens a replica.

use ferry_core::SyncPort;
use ferry_core::protocol::{ClientMsg, ServerMsg};
use ferry_core::{DeleteRule, Replica, Schema, Sequenced, TableDecl, TableMode};

/// Largest frame the relay accepts by default.
const MAX_FRAME: usize = 8 << 20;

/// Frame decoding, both directions.
pub fn frame(data: &[u8]) {
    if let Ok(m) = ClientMsg::decode_limited(data, MAX_FRAME) {
        let b = m.encode().expect("a decoded client frame encodes");
        let again = ClientMsg::decode(&b).expect("a re-encoded client frame decodes");
        // Compared as bytes: a REAL value may be NaN, which is never equal to itself.
        let b2 = again.encode().expect("a decoded client frame encodes");
        assert_eq!(b2, b, "client frame round trip");
    }
    if let Ok(m) = ServerMsg::decode_limited(data, MAX_FRAME) {
        let b = m.encode().expect("a decoded server frame encodes");
        let again = ServerMsg::decode(&b).expect("a re-encoded server frame decodes");
        let b2 = again.encode().expect("a decoded server frame encodes");
        assert_eq!(b2, b, "server frame round trip");
    }
}

/// The schema the apply target's replica declares: every write mode and delete rule.
pub fn apply_schema() -> Schema {
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
        .table(
            TableDecl::new("note")
                .text_key("id")
                .text("body")
                .counter("n")
                .delete_rule(DeleteRule::UpdateWins),
        )
        .table(
            TableDecl::new("price")
                .text_key("id")
                .integer("cents")
                .mode(TableMode::ReadOnly),
        )
        .table(
            TableDecl::new("acct")
                .text_key("id")
                .integer("balance")
                .mode(TableMode::ServerChecked),
        )
}

/// Change-set application: `data` is a MessagePack batch of sequenced change sets.
pub fn apply(data: &[u8]) {
    let Ok(sets) = rmp_serde::from_slice::<Vec<Sequenced>>(data) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let r = Replica::open(dir.path().join("r.db"), &apply_schema()).expect("open replica");
    r.execute(
        "INSERT INTO todo (id, list, title, done, votes) VALUES ('local', 'l', 'mine', 0, 1)",
        &[],
    )
    .expect("local write");
    let before = r.dump().expect("dump");
    let cursor = r.cursor().expect("cursor");
    let up_to = sets.last().map_or(0, |s| s.server_seq);
    match r.apply_remote(cursor, up_to, &sets) {
        Ok(_) => {
            assert!(r.cursor().expect("cursor") >= cursor, "cursor went back");
        }
        Err(_) => {
            assert_eq!(
                r.dump().expect("dump"),
                before,
                "a refused batch changed rows"
            );
            assert_eq!(
                r.cursor().expect("cursor"),
                cursor,
                "a refused batch moved the cursor"
            );
        }
    }
    // Still usable: local writes, reads and the checksum work.
    r.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'local'", &[])
        .expect("write after apply");
    r.checksum().expect("checksum after apply");
    r.prepare_push(16, 1 << 20).expect("pending after apply");
}

/// Schema declaration: `data` is the JSON an app (or the relay's config) declares.
pub fn schema(data: &[u8]) {
    let Ok(s) = serde_json::from_slice::<Schema>(data) else {
        return;
    };
    let valid = s.validate().is_ok();
    let dir = tempfile::tempdir().expect("temp dir");
    match Replica::open(dir.path().join("s.db"), &s) {
        Ok(r) => {
            assert!(valid, "an invalid schema opened a replica");
            r.dump().expect("dump");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
