//! A replica that is the primary of a `read_only` table writes it (through the SDK and through
//! other connections, both captured); every other replica, and the same file opened without
//! the option, refuses writes to it at once.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::{Error, OpenOptions, Replica, Schema, TableDecl, TableMode};
use ferry_testkit::local::*;

fn ref_schema() -> Schema {
    Schema::new(1)
        .table(TableDecl::new("todo").text_key("id").text("title"))
        .table(
            TableDecl::new("price")
                .text_key("id")
                .integer("cents")
                .mode(TableMode::ReadOnly),
        )
}

fn open_primary(path: &std::path::Path, tables: &[&str]) -> ferry_core::Result<Replica> {
    Replica::open_with(
        path,
        &ref_schema(),
        OpenOptions {
            primary_tables: tables.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

#[test]
fn the_primary_writes_and_everyone_else_receives_read_only() {
    let d = tempfile::tempdir().unwrap();
    let primary = open_primary(&d.path().join("p.db"), &["price"]).unwrap();
    let replica = Replica::open(d.path().join("r.db"), &ref_schema()).unwrap();
    primary
        .execute("INSERT INTO price VALUES ('tea', 250)", &[])
        .unwrap();
    // Another connection on the primary's file (an ORM, a backend job) is captured too.
    {
        let c = rusqlite::Connection::open(d.path().join("p.db")).unwrap();
        c.execute("INSERT INTO price VALUES ('milk', 99)", [])
            .unwrap();
    }
    let mut seq = ferry_core::sequencer::Sequencer::new();
    sync_all(&mut seq, &[&primary, &replica]);
    let want = vec![vec![t("milk"), i(99)], vec![t("tea"), i(250)]];
    assert_eq!(
        rows(&replica, "SELECT id, cents FROM price ORDER BY id"),
        want
    );
    assert!(matches!(
        replica.execute("UPDATE price SET cents = 1", &[]),
        Err(Error::ReadOnlyTable(ref t)) if t == "price"
    ));
    // A foreign connection on a non-primary replica is refused by the trigger.
    let c = rusqlite::Connection::open(d.path().join("r.db")).unwrap();
    assert!(c.execute("UPDATE price SET cents = 1", []).is_err());
    assert_eq!(
        rows(&replica, "SELECT id, cents FROM price ORDER BY id"),
        want
    );
}

#[test]
fn reopening_without_the_option_makes_the_table_read_only_again() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("p.db");
    open_primary(&path, &["price"])
        .unwrap()
        .execute("INSERT INTO price VALUES ('tea', 250)", &[])
        .unwrap();
    let r = Replica::open(&path, &ref_schema()).unwrap();
    assert!(matches!(
        r.execute("UPDATE price SET cents = 1", &[]),
        Err(Error::ReadOnlyTable(_))
    ));
    assert_eq!(r.pending_count().unwrap(), 1, "the primary's write is kept");
}

#[test]
fn only_declared_read_only_tables_can_have_a_primary() {
    let d = tempfile::tempdir().unwrap();
    for bad in ["todo", "nope"] {
        let e = open_primary(&d.path().join(format!("{bad}.db")), &[bad]).unwrap_err();
        assert!(
            matches!(e, Error::InvalidInput(ref m) if m.contains(bad)),
            "{e}"
        );
    }
}
