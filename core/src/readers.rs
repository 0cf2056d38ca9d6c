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
    /// The file generation it was opened on (see [`Readers::reopen`]).
    generation: u64,
}

struct Pool {
    cat: Arc<Tables>,
    idle: Vec<Reader>,
    /// Bumped when the file is replaced (`Replica::clear`): older readers are not reused.
    generation: u64,
    open: bool,
}

/// The pool of read connections of one replica.
pub(crate) struct Readers {
    path: PathBuf,
    pool: Mutex<Pool>,
}

impl Readers {
    /// A pool for the file at `path` (nothing is opened until the first read).
    pub(crate) fn new(path: &Path, cat: Arc<Tables>) -> Readers {
        Readers {
            path: path.to_path_buf(),
            pool: Mutex::new(Pool {
                cat,
                idle: Vec::new(),
                generation: 0,
                open: true,
            }),
        }
    }

    fn open(&self, cat: &Tables, generation: u64) -> Result<Reader> {
        let mut conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        db::configure_reader(&conn)?;
        let gate = SqlGate::install(&mut conn, cat)?;
        Ok(Reader {
            conn,
            gate,
            generation,
        })
    }

    /// Runs a read-only app query on an idle reader (or a new one).
    pub(crate) fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        let (reader, cat, generation) = {
            let mut p = self.pool.lock();
            if !p.open {
                return Err(Error::Closed);
            }
            (p.idle.pop(), Arc::clone(&p.cat), p.generation)
        };
        let reader = match reader {
            Some(r) => r,
            None => self.open(&cat, generation)?,
        };
        let out = reader.gate.query(&reader.conn, sql, params);
        let mut p = self.pool.lock();
        if p.open && p.generation == reader.generation && p.idle.len() < IDLE {
            p.idle.push(reader);
        }
        out
    }

    /// Closes the idle readers; later queries fail with `Closed` until [`Readers::reopen`].
    /// A read in flight closes its connection when it ends.
    pub(crate) fn close(&self) {
        let idle = {
            let mut p = self.pool.lock();
            p.open = false;
            std::mem::take(&mut p.idle)
        };
        for r in idle {
            if let Err((_, e)) = r.conn.close() {
                tracing::warn!(error = %e, "closing a read connection failed");
            }
        }
    }

    /// Serves reads again, of a new file at the same path with the tables `cat`.
    pub(crate) fn reopen(&self, cat: Arc<Tables>) {
        let mut p = self.pool.lock();
        p.cat = cat;
        p.generation += 1;
        p.open = true;
    }
}
