//! `ferry-demo`: three replicas edit a todo list offline, with conflicting edits, counters and
//! a delete, then sync through the sans-I/O protocol against the in-memory sequencer (the
//! relay's ordering rules; the networked relay is a later milestone) and converge.
//!
//! `cargo run --release -p ferry-core --bin ferry-demo [-- --dir DIR]`
#![allow(clippy::print_stdout)]

use ferry_core::sequencer::Sequencer;
use ferry_core::sync::SyncClient;
use ferry_core::{Replica, Schema, TableDecl, Value};
use std::path::PathBuf;

fn schema() -> Schema {
    Schema::new(1).table(
        TableDecl::new("todo")
            .text_key("id")
            .text("title")
            .integer("done")
            .counter("votes"),
    )
}

fn show(name: &str, r: &Replica) -> ferry_core::Result<()> {
    println!("  {name}:");
    for row in r
        .query("SELECT id, title, done, votes FROM todo ORDER BY id", &[])?
        .rows
    {
        let cell = |v: &Value| match v {
            Value::Text(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            other => format!("{other:?}"),
        };
        println!(
            "    {:<8} {:<24} done={} votes={}",
            cell(&row[0]),
            cell(&row[1]),
            cell(&row[2]),
            cell(&row[3])
        );
    }
    Ok(())
}

/// One protocol session between a replica and the sequencer, until both sides are idle.
fn sync(relay: &mut Sequencer, r: &Replica) -> ferry_core::Result<usize> {
    let mut client = SyncClient::new();
    let mut session = relay.session();
    let mut outbox = std::collections::VecDeque::from([client.start(r, "demo-token")?]);
    let mut applied = 0;
    while let Some(msg) = outbox.pop_front() {
        for reply in relay.handle(&mut session, msg) {
            let step = client.handle(r, reply)?;
            applied += step.applied;
            outbox.extend(step.send);
        }
    }
    Ok(applied)
}

fn main() -> ferry_core::Result<()> {
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: ferry-demo [--dir DIR]");
                std::process::exit(2);
            }
        }
    }
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ferry_core::Error::InvalidInput(format!("{}: {e}", dir.display())))?;
    let s = schema();
    let phone = Replica::open(dir.join("phone.db"), &s)?;
    let laptop = Replica::open(dir.join("laptop.db"), &s)?;
    let tablet = Replica::open(dir.join("tablet.db"), &s)?;
    let mut relay = Sequencer::new();

    println!("Ferry demo — replica files in {}", dir.display());
    println!("\n1. The phone creates a list and syncs it to everyone.");
    phone.write(|tx| {
        tx.execute(
            "INSERT INTO todo(id, title, done) VALUES ('milk', 'Buy milk', 0)",
            &[],
        )?;
        tx.execute(
            "INSERT INTO todo(id, title, done) VALUES ('bike', 'Fix the bike', 0)",
            &[],
        )?;
        tx.execute(
            "INSERT INTO todo(id, title, done) VALUES ('taxes', 'File taxes', 0)",
            &[],
        )
    })?;
    for r in [&phone, &laptop, &tablet] {
        sync(&mut relay, r)?;
    }

    println!("\n2. All three go offline and edit the same rows.");
    phone.execute(
        "UPDATE todo SET title = 'Buy oat milk' WHERE id = 'milk'",
        &[],
    )?;
    laptop.execute(
        "UPDATE todo SET title = 'Buy milk and eggs' WHERE id = 'milk'",
        &[],
    )?;
    tablet.execute("UPDATE todo SET done = 1 WHERE id = 'milk'", &[])?;
    for r in [&phone, &laptop, &laptop, &tablet] {
        r.execute("UPDATE todo SET votes = votes + 1 WHERE id = 'bike'", &[])?;
    }
    laptop.execute("DELETE FROM todo WHERE id = 'taxes'", &[])?;
    tablet.execute(
        "UPDATE todo SET title = 'File taxes (urgent)' WHERE id = 'taxes'",
        &[],
    )?;
    let id = phone.new_id();
    phone.execute(
        "INSERT INTO todo(id, title, done) VALUES (?1, 'Call mom', 0)",
        &[Value::Text(id)],
    )?;
    for (n, r) in [("phone", &phone), ("laptop", &laptop), ("tablet", &tablet)] {
        show(n, r)?;
    }

    println!("\n3. They come back online in some order and sync (twice, so all see all).");
    for r in [&tablet, &phone, &laptop, &tablet, &phone, &laptop] {
        sync(&mut relay, r)?;
    }
    for (n, r) in [("phone", &phone), ("laptop", &laptop), ("tablet", &tablet)] {
        show(n, r)?;
    }
    println!("\n   Conflicts the laptop logged:");
    for c in laptop.conflicts()? {
        println!(
            "    {} {:?} column={:?} policy={} winner={:?}",
            c.table, c.pk, c.column, c.policy, c.winner
        );
    }
    let converged = phone.dump()? == laptop.dump()? && laptop.dump()? == tablet.dump()?;
    println!(
        "\nRelay log: {} change sets. Replicas converged: {}",
        relay.head(),
        if converged { "yes" } else { "NO" }
    );
    if !converged {
        std::process::exit(1);
    }
    Ok(())
}
