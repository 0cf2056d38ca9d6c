//! The SQL gate: what app SQL may do on the replica's connection, and what it touches.
//!
//! App SQL runs on the same connection as Ferry's own statements, so one SQLite authorizer
//! tells them apart: while app SQL is being prepared (`app_sql`), writes to `read_only`
//! tables, to Ferry's own `ferry_*` tables and DDL on synced tables are refused, and the
//! refusal is turned into a typed error naming the table. The same authorizer records what
//! a statement reads (so a watch knows which commits can change its result) and which columns
//! it updates (so capture compares only those columns; see [`StatementCols`]). Ferry's own
//! statements are never checked: they are prepared with `app_sql` off.

use crate::capture::{HookState, StmtCols};
use crate::error::{Error, Result};
use crate::observer::Rows;
use crate::tables::Tables;
use crate::value::Value;
use parking_lot::Mutex;
use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// What the authorizer refused, so the error can name it.
#[derive(Debug, Clone)]
enum Denied {
    ReadOnly(String),
    Internal(String),
    SyncedDdl(String),
}

#[derive(Debug, Default)]
struct AuthState {
    /// True while app SQL is being prepared (internal statements are always allowed).
    app_sql: bool,
    read_only: HashSet<String>,
    synced: HashSet<String>,
    denied: Option<Denied>,
    /// When set, tables read by statements being prepared are recorded (for watch).
    reads: Option<BTreeSet<String>>,
    /// When set, `(table, column)` pairs a top-level statement updates are recorded.
    updates: Option<Vec<(String, String)>>,
}

fn is_internal(name: &str) -> bool {
    name.len() >= 6 && name[..6].eq_ignore_ascii_case("ferry_")
}

/// Upper bound of SQL texts whose updated columns are remembered.
const STATEMENT_CACHE: usize = 512;

/// The gate of one connection: the authorizer's state and the columns each app statement
/// updates (learnt once per SQL text).
pub(crate) struct SqlGate {
    auth: Arc<Mutex<AuthState>>,
    statement_cols: Mutex<HashMap<String, Arc<StmtCols>>>,
}

impl SqlGate {
    /// Installs the authorizer on `conn` for the tables of `cat`.
    pub(crate) fn install(conn: &mut Connection, cat: &Tables) -> Result<SqlGate> {
        let auth = Arc::new(Mutex::new(AuthState {
            read_only: cat
                .tables
                .values()
                .filter(|t| t.mode() == crate::schema::TableMode::ReadOnly)
                .map(|t| t.name().to_owned())
                .collect(),
            synced: cat.tables.keys().cloned().collect(),
            ..AuthState::default()
        }));
        install_authorizer(conn, Arc::clone(&auth))?;
        Ok(SqlGate {
            auth,
            statement_cols: Mutex::new(HashMap::new()),
        })
    }

    /// Runs app SQL with the authorizer in app mode, mapping refusals to typed errors.
    fn app_sql<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.auth.lock().app_sql = true;
        let r = f();
        let denied = {
            let mut a = self.auth.lock();
            a.app_sql = false;
            a.denied.take()
        };
        match (r, denied) {
            (Err(_), Some(Denied::ReadOnly(t))) => Err(Error::ReadOnlyTable(t)),
            (Err(_), Some(Denied::Internal(t))) => Err(Error::InvalidInput(format!(
                "`{t}` is Ferry's own table; apps must not write it"
            ))),
            (Err(_), Some(Denied::SyncedDdl(t))) => Err(Error::InvalidInput(format!(
                "synced table `{t}` can only be changed by declaring a new schema version"
            ))),
            (r, _) => r,
        }
    }

    /// Runs a read-only app query.
    pub(crate) fn query(&self, conn: &Connection, sql: &str, params: &[Value]) -> Result<Rows> {
        self.app_sql(|| {
            let mut st = conn.prepare_cached(sql)?;
            if !st.readonly() {
                return Err(Error::InvalidInput(
                    "query() only reads; use execute() or write() for statements that change data"
                        .into(),
                ));
            }
            let columns: Vec<String> = st.column_names().map(|s| s.to_owned()).collect();
            let n = columns.len();
            let rows = st
                .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                    (0..n)
                        .map(|i| r.get::<_, Value>(i))
                        .collect::<rusqlite::Result<Vec<Value>>>()
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Rows { columns, rows })
        })
    }

    /// The tables `sql` reads (prepared fresh, not cached, so the authorizer sees them all).
    pub(crate) fn tables_read(&self, conn: &Connection, sql: &str) -> Result<BTreeSet<String>> {
        self.auth.lock().reads = Some(BTreeSet::new());
        let prep = self.app_sql(|| {
            conn.prepare(sql)?;
            Ok(())
        });
        let tables = self.auth.lock().reads.take().unwrap_or_default();
        prep?;
        Ok(tables)
    }

    /// Runs one app statement that may write; returns rows changed.
    pub(crate) fn execute(
        &self,
        conn: &Connection,
        hook: &Mutex<HookState>,
        cat: &Tables,
        sql: &str,
        params: &[Value],
    ) -> Result<usize> {
        let cols = self.statement_cols(conn, cat, sql)?;
        let _scope = StatementScope::new(hook, cols);
        self.app_sql(|| {
            let mut st = conn.prepare_cached(sql)?;
            Ok(st.execute(rusqlite::params_from_iter(params.iter()))?)
        })
    }

    /// Prepares an app statement once for many executions.
    pub(crate) fn prepare<'c>(
        &'c self,
        conn: &'c Connection,
        hook: &'c Mutex<HookState>,
        cat: &Tables,
        sql: &str,
    ) -> Result<Prepared<'c>> {
        let cols = self.statement_cols(conn, cat, sql)?;
        let stmt = self.app_sql(|| Ok(conn.prepare_cached(sql)?))?;
        Ok(Prepared {
            stmt,
            gate: self,
            hook,
            cols,
        })
    }

    /// The columns `sql` updates per synced table, learnt once per SQL text by preparing it
    /// with the authorizer recording (bounded cache).
    fn statement_cols(&self, conn: &Connection, cat: &Tables, sql: &str) -> Result<Arc<StmtCols>> {
        if let Some(c) = self.statement_cols.lock().get(sql) {
            return Ok(Arc::clone(c));
        }
        self.auth.lock().updates = Some(Vec::new());
        let prepared = self.app_sql(|| {
            conn.prepare(sql)?;
            Ok(())
        });
        let updates = self.auth.lock().updates.take().unwrap_or_default();
        prepared?;
        let mut cols: StmtCols = Vec::new();
        let mut unknown: BTreeSet<u32> = BTreeSet::new();
        for (table, column) in updates {
            let Some(t) = cat.get(&table) else {
                continue;
            };
            match t.by_name.get(&column) {
                Some(i) => match cols.iter_mut().find(|(id, _)| *id == t.id) {
                    Some((_, v)) => v.push(*i),
                    None => cols.push((t.id, vec![*i])),
                },
                // A name we cannot map: compare every column of that table.
                None => {
                    unknown.insert(t.id);
                }
            }
        }
        cols.retain(|(id, _)| !unknown.contains(id));
        let cols = Arc::new(cols);
        let mut cache = self.statement_cols.lock();
        if cache.len() >= STATEMENT_CACHE {
            cache.clear();
        }
        cache.insert(sql.to_owned(), Arc::clone(&cols));
        Ok(cols)
    }
}

/// Tells the capture hook which columns the running statement updates, until dropped.
struct StatementScope<'a>(&'a Mutex<HookState>);

impl<'a> StatementScope<'a> {
    fn new(hook: &'a Mutex<HookState>, cols: Arc<StmtCols>) -> Self {
        hook.lock().stmt_cols = Some(cols);
        StatementScope(hook)
    }
}

impl Drop for StatementScope<'_> {
    fn drop(&mut self) {
        self.0.lock().stmt_cols = None;
    }
}

/// A statement prepared inside a [`crate::Transaction`] for many executions.
pub struct Prepared<'a> {
    stmt: rusqlite::CachedStatement<'a>,
    gate: &'a SqlGate,
    hook: &'a Mutex<HookState>,
    cols: Arc<StmtCols>,
}

impl Prepared<'_> {
    /// Executes with positional parameters; returns rows changed.
    pub fn execute(&mut self, params: &[Value]) -> Result<usize> {
        let _scope = StatementScope::new(self.hook, Arc::clone(&self.cols));
        let stmt = &mut self.stmt;
        self.gate
            .app_sql(|| Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))?))
    }
}

fn install_authorizer(conn: &mut Connection, auth: Arc<Mutex<AuthState>>) -> Result<()> {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        let mut a = auth.lock();
        if let (Some(reads), AuthAction::Read { table_name, .. }) = (&mut a.reads, &ctx.action) {
            reads.insert((*table_name).to_owned());
        }
        if let (
            Some(updates),
            AuthAction::Update {
                table_name,
                column_name,
            },
            None,
        ) = (&mut a.updates, &ctx.action, ctx.accessor)
        {
            updates.push(((*table_name).to_owned(), (*column_name).to_owned()));
        }
        if !a.app_sql || ctx.accessor.is_some_and(is_internal) {
            return Authorization::Allow;
        }
        let denied = match ctx.action {
            AuthAction::Insert { table_name }
            | AuthAction::Delete { table_name }
            | AuthAction::Update { table_name, .. } => {
                if is_internal(table_name) {
                    Some(Denied::Internal(table_name.to_owned()))
                } else if a.read_only.contains(table_name) {
                    Some(Denied::ReadOnly(table_name.to_owned()))
                } else {
                    None
                }
            }
            AuthAction::CreateTrigger { table_name, .. }
            | AuthAction::DropTrigger { table_name, .. } => {
                // App triggers on synced tables are fine (their writes are captured).
                is_internal(table_name).then(|| Denied::Internal(table_name.to_owned()))
            }
            AuthAction::DropTable { table_name } | AuthAction::AlterTable { table_name, .. } => {
                if is_internal(table_name) {
                    Some(Denied::Internal(table_name.to_owned()))
                } else if a.synced.contains(table_name) {
                    Some(Denied::SyncedDdl(table_name.to_owned()))
                } else {
                    None
                }
            }
            _ => None,
        };
        match denied {
            Some(d) => {
                a.denied = Some(d);
                Authorization::Deny
            }
            None => Authorization::Allow,
        }
    }))?;
    Ok(())
}
