//! Read connections: the app's queries run on a small pool of read-only connections to the
//! replica file instead of the replica's one read-write connection.
//!
//! The writer connection is held, under the replica's lock, for every commit, every chunk of a
//! remote apply (up to `apply_chunk_ops` cells in one transaction) and every fold of foreign
//! writes; a UI read queued behind it waited for all of that (p99 in the hundreds of
//! milliseconds while 100k remote rows applied, `docs/benchmarks.md`, R3). SQLite's WAL mode lets
//! readers proceed while a writer commits: each read sees the last committed state when its
//! statement starts, which is what a read outside a transaction saw before, since commits
//! happen under the lock anyway. A read inside the app's own write transaction still goes
//! through that transaction (it must see its own writes).
//!
//! Connections are opened on demand and kept when idle, at most [`IDLE`]; more readers at once
//! each open their own (a read never waits for another). Each one has the SQL gate of the
//! writer (the same authorizer and statement checks; a read-only connection refuses writes
//! anyway) so errors read the same. Closing the replica closes the idle readers before the
//! writer, so the last connection to close is the writer and SQLite removes the WAL file.

use crate::db;
use crate::error::{Error, Result};
use crate::observer::Rows;
use crate::sqlgate::SqlGate;
use crate::tables::Tables;
use crate::value::Value;
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Idle read connections kept open.
const IDLE: usize = 4;

struct Reader {
    conn: Connection,
    gate: SqlGate,
}

/// The pool of read connections of one replica.
pub(crate) struct Readers {
    path: PathBuf,
    cat: Arc<Tables>,
    /// Idle connections; `None` once the replica is closed.
    idle: Mutex<Option<Vec<Reader>>>,
}

impl Readers {
    /// A pool for the file at `path` (nothing is opened until the first read).
    pub(crate) fn new(path: &Path, cat: Arc<Tables>) -> Readers {
        Readers {
            path: path.to_path_buf(),
            cat,
            idle: Mutex::new(Some(Vec::new())),
        }
    }

    fn open(&self) -> Result<Reader> {
        let mut conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        db::configure_reader(&conn)?;
        let gate = SqlGate::install(&mut conn, &self.cat)?;
        Ok(Reader { conn, gate })
    }

    /// Runs a read-only app query on an idle reader (or a new one).
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        let reader = match self.idle.lock().as_mut() {
            None => return Err(Error::Closed),
            Some(idle) => idle.pop(),
        };
        let reader = match reader {
            Some(r) => r,
            None => self.open()?,
        };
        let out = reader.gate.query(&reader.conn, sql, params);
        if let Some(idle) = self.idle.lock().as_mut()
            && idle.len() < IDLE
        {
            idle.push(reader);
        }
        out
    }

    /// Closes the idle readers; later queries fail with `Closed`. A read in flight closes its
    /// connection when it ends.
    pub(crate) fn close(&self) {
        let idle = self.idle.lock().take();
        for r in idle.into_iter().flatten() {
            if let Err((_, e)) = r.conn.close() {
                tracing::warn!(error = %e, "closing a read connection failed");
            }
        }
    }
}
