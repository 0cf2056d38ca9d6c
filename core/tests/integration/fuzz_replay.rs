//! Replays the fuzz targets' seed corpus and every input that ever crashed them
//! (`fuzz/corpus/<target>`, `fuzz/regressions/<target>`) through the same checks, so a
//! crash once fixed stays fixed under plain `cargo test`. `scripts/fuzz` runs the
//! coverage-guided fuzzers themselves.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use ferry_core::SyncPort;
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if path.file_name().is_some_and(|f| f == ".gitkeep") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{target}: {} fails", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn frame_corpus_and_crashes() {
    assert!(replay("frame", harness::frame) > 0, "no frame corpus");
}

#[test]
fn apply_corpus_and_crashes() {
    assert!(replay("apply", harness::apply) > 0, "no apply corpus");
}

#[test]
fn schema_corpus_and_crashes() {
    assert!(replay("schema", harness::schema) > 0, "no schema corpus");
}

/// Writes the seed corpus from real frames, change sets and schemas (run once with
/// `cargo test -p ferry-core --test integration fuzz_replay:: -- --ignored`; the files are committed).
#[test]
#[ignore = "regenerates the committed seed corpus"]
fn write_seed_corpus() {
    use ferry_core::sequencer::Sequencer;
    use ferry_core::{Replica, Value};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    // Frames: the protocol's golden files.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for e in std::fs::read_dir(&golden).unwrap() {
        let p = e.unwrap().path();
        let hex = std::fs::read_to_string(&p).unwrap();
        let hex: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        std::fs::write(root.join("frame").join(name), bytes).unwrap();
    }
    // Change sets: real writes of every kind from two replicas, sequenced.
    let dir = tempfile::tempdir().unwrap();
    let schema = harness::apply_schema();
    let a = Replica::open(dir.path().join("a.db"), &schema).unwrap();
    let b = Replica::open(dir.path().join("b.db"), &schema).unwrap();
    let mut seq = Sequencer::with_schema(&schema);
    let t = |s: &str| Value::Text(s.into());
    a.execute("INSERT INTO todo VALUES ('1', 'l', 'milk', 0, 2)", &[])
        .unwrap();
    a.execute("INSERT INTO note VALUES ('n', 'hello', 1)", &[])
        .unwrap();
    b.execute("INSERT INTO todo VALUES ('2', 'm', 'eggs', 1, 0)", &[])
        .unwrap();
    b.execute("INSERT INTO acct VALUES ('x', 10)", &[]).unwrap();
    a.execute(
        "UPDATE todo SET votes = votes + 3, title = ?1 WHERE id = '1'",
        &[t("oat milk")],
    )
    .unwrap();
    a.execute("DELETE FROM note WHERE id = 'n'", &[]).unwrap();
    b.execute("UPDATE todo SET list = 'l' WHERE id = '2'", &[])
        .unwrap();
    for r in [&a, &b] {
        for cs in r.prepare_push(64, 1 << 20).unwrap() {
            seq.push(cs).unwrap();
        }
    }
    let (all, _) = seq.changes_after(0, usize::MAX);
    std::fs::write(
        root.join("apply").join("all"),
        rmp_serde::to_vec(&all).unwrap(),
    )
    .unwrap();
    for (i, s) in all.iter().enumerate() {
        let one = vec![s.clone()];
        std::fs::write(
            root.join("apply").join(format!("one-{i}")),
            rmp_serde::to_vec(&one).unwrap(),
        )
        .unwrap();
    }
    // Schemas.
    std::fs::write(
        root.join("schema").join("apply"),
        serde_json::to_vec_pretty(&schema).unwrap(),
    )
    .unwrap();
    let bad = r#"{"version":1,"tables":[{"name":"t","columns":[{"name":"id","column_type":"integer","policy":"lww"}]}]}"#;
    std::fs::write(root.join("schema").join("integer-key"), bad).unwrap();
}
