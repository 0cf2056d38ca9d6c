//! `todo-cli`: a terminal todo list on a Ferry replica.
//!
//! Every command but `sync` works offline on the local SQLite file; `sync` connects to the
//! relay, pushes what was written offline, pulls what others wrote, and exits. Two copies on
//! two "devices" (two `--db` files) converge however their offline edits interleave.
//!
//! ```text
//! todo-cli --db phone.db add "Buy milk"
//! todo-cli --db phone.db list
//! todo-cli --db phone.db done 01J...        # id prefix is enough
//! todo-cli --db phone.db star 01J...        # a counter: concurrent stars add up
//! todo-cli --db phone.db sync --relay ws://127.0.0.1:7070/sync --token "$TOKEN"
//! ```
#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};
use ferry_core::{ConnState, Replica, Schema, SyncStatus, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The app schema; the relay is configured with the same file.
const SCHEMA: &str = include_str!("../schema.json");

#[derive(Parser, Debug)]
#[command(
    name = "todo-cli",
    about = "A todo list that works offline and syncs with a Ferry relay"
)]
struct Cli {
    /// The local replica file.
    #[arg(long, default_value = "todo.db", env = "TODO_DB")]
    db: PathBuf,
    /// The list this device works on (its scope).
    #[arg(long, default_value = "list:home", env = "TODO_LIST")]
    list: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Add an item.
    Add {
        /// What to do.
        title: String,
    },
    /// Show the list.
    List,
    /// Mark an item done (id or a unique prefix).
    Done {
        /// Item id or prefix.
        id: String,
    },
    /// Rename an item.
    Rename {
        /// Item id or prefix.
        id: String,
        /// New title.
        title: String,
    },
    /// Star an item (a counter: stars from every device add up).
    Star {
        /// Item id or prefix.
        id: String,
    },
    /// Remove an item.
    Rm {
        /// Item id or prefix.
        id: String,
    },
    /// Sync with the relay, then exit.
    Sync {
        /// Relay URL.
        #[arg(long, env = "FERRY_RELAY", default_value = "ws://127.0.0.1:7070/sync")]
        relay: String,
        /// Bearer token (see `ferry-relay token`).
        #[arg(long, env = "FERRY_TOKEN")]
        token: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print the schema JSON (the relay's `schema` setting).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("todo-cli: {e}");
            ExitCode::FAILURE
        }
    }
}

fn schema() -> ferry_core::Result<Schema> {
    serde_json::from_str(SCHEMA)
        .map_err(|e| ferry_core::Error::InvalidSchema(format!("schema.json: {e}")))
}

fn resolve(r: &Replica, list: &str, prefix: &str) -> ferry_core::Result<String> {
    let rows = r.query(
        "SELECT id FROM todo WHERE list = ?1 AND id LIKE ?2 || '%'",
        &[list.into(), prefix.into()],
    )?;
    match rows.rows.as_slice() {
        [row] => match &row[0] {
            Value::Text(id) => Ok(id.clone()),
            other => Err(ferry_core::Error::InvalidInput(format!("odd id {other:?}"))),
        },
        [] => Err(ferry_core::Error::InvalidInput(format!(
            "no item `{prefix}` in {list}"
        ))),
        _ => Err(ferry_core::Error::InvalidInput(format!(
            "`{prefix}` matches several items; type more of the id"
        ))),
    }
}

fn run(cli: Cli) -> ferry_core::Result<()> {
    if let Cmd::Schema = cli.cmd {
        println!("{SCHEMA}");
        return Ok(());
    }
    let replica = Arc::new(Replica::open(&cli.db, &schema()?)?);
    let list = cli.list.as_str();
    match cli.cmd {
        Cmd::Add { title } => {
            let id = replica.new_id();
            replica.execute(
                "INSERT INTO todo(id, list, title) VALUES (?1, ?2, ?3)",
                &[id.clone().into(), list.into(), title.into()],
            )?;
            println!("added {id}");
        }
        Cmd::List => {
            let rows = replica.query(
                "SELECT id, done, stars, title FROM todo WHERE list = ?1 ORDER BY id",
                &[list.into()],
            )?;
            println!(
                "{list} ({} items, {} changes not yet synced)",
                rows.rows.len(),
                replica.pending_count()?
            );
            for r in rows.rows {
                let (
                    Value::Text(id),
                    Value::Integer(done),
                    Value::Integer(stars),
                    Value::Text(title),
                ) = (&r[0], &r[1], &r[2], &r[3])
                else {
                    continue;
                };
                let mark = if *done != 0 { "x" } else { " " };
                let stars = "*".repeat((*stars).clamp(0, 10) as usize);
                println!(
                    "[{mark}] {} {title} {stars}",
                    &id[id.len().saturating_sub(6)..]
                );
            }
        }
        Cmd::Done { id } => {
            let id = resolve(&replica, list, &id)?;
            replica.execute("UPDATE todo SET done = 1 WHERE id = ?1", &[id.into()])?;
        }
        Cmd::Rename { id, title } => {
            let id = resolve(&replica, list, &id)?;
            replica.execute(
                "UPDATE todo SET title = ?2 WHERE id = ?1",
                &[id.into(), title.into()],
            )?;
        }
        Cmd::Star { id } => {
            let id = resolve(&replica, list, &id)?;
            replica.execute(
                "UPDATE todo SET stars = stars + 1 WHERE id = ?1",
                &[id.into()],
            )?;
        }
        Cmd::Rm { id } => {
            let id = resolve(&replica, list, &id)?;
            replica.execute("DELETE FROM todo WHERE id = ?1", &[id.into()])?;
        }
        Cmd::Sync {
            relay,
            token,
            timeout,
        } => {
            let pending = replica.pending_count()?;
            let handle = replica.connect(&relay, Arc::new(move || Ok(token.clone())))?;
            let _progress = handle.observe(Arc::new(|s: &SyncStatus| {
                if s.state == ConnState::Offline
                    && let Some(e) = &s.last_error
                {
                    eprintln!("  offline: {}", e.message);
                }
            }));
            handle.sync_now_blocking(Duration::from_secs(timeout))?;
            let s = handle.status();
            println!(
                "synced: pushed {pending} change sets, at relay position {} (head {})",
                s.cursor, s.head
            );
            handle.disconnect();
        }
        Cmd::Schema => {}
    }
    Ok(())
}
