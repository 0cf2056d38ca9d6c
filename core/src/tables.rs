//! The synced tables: what Ferry knows about each synced table at run time, and the triggers that
//! capture writes made by other connections.
//!
//! Column ids are SQLite column positions: columns are only ever appended to a synced table,
//! so a position never changes meaning. Ids are local to the file; the wire uses names.
//!
//! Foreign capture: SQLite admits one writer at a time, so the SDK marks its own write
//! transactions by setting `ferry_gate.sdk = 1` inside them (invisible to every other
//! connection until commit, and reset before commit). Triggers fire only when the gate is 0,
//! i.e. for writes by another connection (the app's ORM), and log the keys and changed
//! columns into `ferry_foreign`; the SDK folds that log into change sets. The SDK's own writes
//! are captured in memory by the pre-update hook, which costs far less than a trigger insert.

use crate::error::{Error, Result};
use crate::schema::{DeleteRule, Policy, Schema, TableDecl, TableMode, quote};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;

/// One column as SQLite orders it.
#[derive(Debug, Clone)]
pub struct ColInfo {
    /// Name.
    pub name: String,
    /// Merge policy.
    pub policy: Policy,
}

/// Run-time description of a synced table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Local table id (`ferry_tables.id`).
    pub id: u32,
    /// The declaration.
    pub decl: TableDecl,
    /// Columns in SQLite order (index = column id).
    pub cols: Vec<ColInfo>,
    /// Index of the primary key column.
    pub pk: usize,
    /// Column id by name.
    pub by_name: HashMap<String, usize>,
    /// `INSERT OR REPLACE` of a whole row: the key, then every other column in order. Rows
    /// arrive whole far more often than not (every insert, every snapshot row), so the
    /// statement text is built once rather than per row.
    pub insert_whole: String,
}

impl TableInfo {
    /// Table name.
    pub fn name(&self) -> &str {
        &self.decl.name
    }
    /// Write mode.
    pub fn mode(&self) -> TableMode {
        self.decl.mode
    }
    /// Delete rule.
    pub fn update_wins(&self) -> bool {
        self.decl.delete_rule == DeleteRule::UpdateWins
    }
    /// Column id for a name, or an error naming the table.
    pub fn col(&self, name: &str) -> Result<usize> {
        self.by_name.get(name).copied().ok_or_else(|| {
            Error::InvalidChangeSet(format!("table `{}` has no column `{name}`", self.name()))
        })
    }
    /// `SELECT` list of every column, in order.
    pub fn select_list(&self) -> String {
        self.cols
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// All synced tables.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    /// By name.
    pub tables: HashMap<String, TableInfo>,
    /// Name by id.
    pub names: HashMap<u32, String>,
}

impl Tables {
    /// Looks up a table by name.
    pub fn get(&self, name: &str) -> Option<&TableInfo> {
        self.tables.get(name)
    }
    /// Looks up a table by name, for remote input: an unknown table is an error.
    pub fn table(&self, name: &str) -> Result<&TableInfo> {
        self.get(name)
            .ok_or_else(|| Error::InvalidChangeSet(format!("unknown synced table `{name}`")))
    }
    /// Looks up by local id.
    pub fn by_id(&self, id: u32) -> Result<&TableInfo> {
        self.names
            .get(&id)
            .and_then(|n| self.tables.get(n))
            .ok_or_else(|| Error::Corrupt(format!("unknown table id {id}")))
    }

    /// Creates missing synced tables, adds newly declared columns, checks existing ones.
    pub fn reconcile(conn: &Connection, schema: &Schema) -> Result<Tables> {
        let mut cat = Tables::default();
        for decl in &schema.tables {
            let exists: bool = conn
                .query_row(
                    "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                    [&decl.name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !exists {
                conn.execute_batch(&decl.create_sql())?;
            }
            let mut actual = table_columns(conn, &decl.name)?;
            let mut added = Vec::new();
            for c in &decl.columns {
                if !actual.iter().any(|(n, _, _)| n == &c.name) {
                    if c.name == decl.pk() {
                        return Err(Error::InvalidSchema(format!(
                            "table `{}` exists without its declared primary key `{}`",
                            decl.name, c.name
                        )));
                    }
                    if c.not_null && c.default.is_none() && !c.policy.is_additive() {
                        return Err(Error::InvalidSchema(format!(
                            "new column `{}.{}` is NOT NULL without a default: existing rows could not keep it",
                            decl.name, c.name
                        )));
                    }
                    conn.execute_batch(&format!(
                        "ALTER TABLE {} ADD COLUMN {}",
                        quote(&decl.name),
                        decl.column_sql(c)
                    ))?;
                    tracing::info!(table = %decl.name, column = %c.name, "added declared column");
                    added.push(c.name.clone());
                }
            }
            actual = table_columns(conn, &decl.name)?;
            let mut cols = Vec::new();
            let mut pk_idx = None;
            let mut by_name = HashMap::new();
            for (i, (name, ty, is_pk)) in actual.iter().enumerate() {
                let Some(d) = decl.columns.iter().find(|c| &c.name == name) else {
                    return Err(Error::InvalidSchema(format!(
                        "column `{}.{name}` exists but is not declared: declare it so it syncs",
                        decl.name
                    )));
                };
                if *is_pk > 0 {
                    if name != decl.pk() {
                        return Err(Error::InvalidSchema(format!(
                            "table `{}` has primary key `{name}` but declares `{}`",
                            decl.name,
                            decl.pk()
                        )));
                    }
                    if ty.eq_ignore_ascii_case("INTEGER") {
                        return Err(Error::InvalidSchema(format!(
                            "synced table `{}` has an integer rowid key `{name}`: use a TEXT or BLOB key",
                            decl.name
                        )));
                    }
                    pk_idx = Some(i);
                }
                by_name.insert(name.clone(), i);
                cols.push(ColInfo {
                    name: name.clone(),
                    policy: d.policy,
                });
            }
            let pk = pk_idx.ok_or_else(|| {
                Error::InvalidSchema(format!(
                    "table `{}` has no primary key in SQLite",
                    decl.name
                ))
            })?;
            if actual.iter().filter(|(_, _, p)| *p > 0).count() > 1 {
                return Err(Error::InvalidSchema(format!(
                    "table `{}` has a composite primary key; Ferry syncs single-column keys",
                    decl.name
                )));
            }
            let decl_json = serde_json::to_string(decl)?;
            conn.execute(
                "INSERT INTO ferry_tables(name, decl) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET decl = excluded.decl",
                params![decl.name, decl_json],
            )?;
            let id: i64 = conn.query_row(
                "SELECT id FROM ferry_tables WHERE name = ?1",
                [&decl.name],
                |r| r.get(0),
            )?;
            let id = id as u32;
            let insert_whole = crate::rows::insert_sql(
                &decl.name,
                &cols,
                pk,
                (0..cols.len()).filter(|i| *i != pk),
            );
            let info = TableInfo {
                id,
                decl: decl.clone(),
                cols,
                pk,
                by_name,
                insert_whole,
            };
            if exists && !added.is_empty() {
                mark_unwritten(conn, &info, &added)?;
            }
            cat.names.insert(id, decl.name.clone());
            cat.tables.insert(decl.name.clone(), info);
        }
        Ok(cat)
    }

    /// Installs foreign-capture and read-only triggers for every synced table.
    pub fn install_triggers(&self, conn: &Connection) -> Result<()> {
        for t in self.tables.values() {
            conn.execute_batch(&trigger_sql(t))?;
        }
        Ok(())
    }
}

/// Drops every trigger Ferry installed.
pub fn drop_triggers(conn: &Connection) -> Result<()> {
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name LIKE 'ferry\\_%' ESCAPE '\\'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for n in names {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&n)))?;
    }
    Ok(())
}

fn table_columns(conn: &Connection, table: &str) -> Result<Vec<(String, String, i64)>> {
    let mut st = conn.prepare(&format!("PRAGMA table_info({})", quote(table)))?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(5)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

const GATE_OPEN: &str = "(SELECT sdk FROM ferry_gate WHERE id = 1) = 0";

/// The triggers for one table (foreign capture, or refusal for read-only tables).
fn trigger_sql(t: &TableInfo) -> String {
    let tq = quote(t.name());
    let id = t.id;
    let pk = quote(&t.cols[t.pk].name);
    let name = |kind: &str| quote(&format!("ferry_{kind}_{}", t.name()));
    if t.mode() == TableMode::ReadOnly {
        let mut s = String::new();
        for ev in ["INSERT", "UPDATE", "DELETE"] {
            s.push_str(&format!(
                "CREATE TRIGGER {} BEFORE {ev} ON {tq} WHEN {GATE_OPEN} BEGIN \
                 SELECT RAISE(ABORT, 'ferry: table {} is read_only on this replica: only its primary writes it'); END;\n",
                name(&format!("ro_{}", ev.to_ascii_lowercase())),
                t.name()
            ));
        }
        return s;
    }
    let counters: Vec<&ColInfo> = t.cols.iter().filter(|c| c.policy.is_additive()).collect();
    let stash_vals = if counters.is_empty() {
        "NULL".to_owned()
    } else {
        format!(
            "json_object({})",
            counters
                .iter()
                .map(|c| format!("'{}', {}", c.name, quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let ins_deltas = if counters.is_empty() {
        "NULL".to_owned()
    } else {
        format!(
            "json_object({})",
            counters
                .iter()
                .map(|c| format!(
                    "'{n}', NEW.{q} - coalesce((SELECT json_extract(vals, '$.{n}') FROM ferry_stash WHERE tbl = {id} AND pk = NEW.{pk}), 0)",
                    n = c.name,
                    q = quote(&c.name)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let upd_deltas = if counters.is_empty() {
        "NULL".to_owned()
    } else {
        format!(
            "json_object({})",
            counters
                .iter()
                .map(|c| format!(
                    "'{n}', json_array(OLD.{q}, NEW.{q})",
                    n = c.name,
                    q = quote(&c.name)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let del_deltas = if counters.is_empty() {
        "NULL".to_owned()
    } else {
        format!(
            "json_object({})",
            counters
                .iter()
                .map(|c| format!("'{n}', -OLD.{q}", n = c.name, q = quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let changed = format!(
        "json_array({})",
        t.cols
            .iter()
            .map(|c| format!(
                "CASE WHEN NEW.{q} IS NOT OLD.{q} THEN '{n}' END",
                q = quote(&c.name),
                n = c.name
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let oldvals = if t.update_wins() {
        format!(
            "INSERT INTO ferry_oldvals(seq, cid, val) VALUES {};",
            t.cols
                .iter()
                .enumerate()
                .map(|(i, c)| format!("(last_insert_rowid(), {i}, OLD.{})", quote(&c.name)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        String::new()
    };
    let mut s = String::new();
    if !counters.is_empty() {
        // A REPLACE from a foreign connection deletes the old row without firing DELETE
        // triggers; stash its counters first so the insert can log a true delta.
        s.push_str(&format!(
            "CREATE TRIGGER {} BEFORE INSERT ON {tq} WHEN {GATE_OPEN} BEGIN \
             DELETE FROM ferry_stash WHERE tbl = {id} AND pk = NEW.{pk}; \
             INSERT INTO ferry_stash(tbl, pk, vals) SELECT {id}, {pk}, {stash_vals} FROM {tq} WHERE {pk} = NEW.{pk}; END;\n",
            name("stash")
        ));
    }
    s.push_str(&format!(
        "CREATE TRIGGER {} AFTER INSERT ON {tq} WHEN {GATE_OPEN} BEGIN \
         INSERT INTO ferry_foreign(tbl, pk, op, deltas, existed) VALUES ({id}, NEW.{pk}, 1, {ins_deltas}, \
         EXISTS(SELECT 1 FROM ferry_stash WHERE tbl = {id} AND pk = NEW.{pk})); \
         DELETE FROM ferry_stash WHERE tbl = {id} AND pk = NEW.{pk}; END;\n",
        name("ins")
    ));
    s.push_str(&format!(
        "CREATE TRIGGER {} AFTER UPDATE ON {tq} WHEN {GATE_OPEN} BEGIN \
         INSERT INTO ferry_foreign(tbl, pk, op, newpk, cols, deltas) VALUES ({id}, OLD.{pk}, 2, NEW.{pk}, {changed}, {upd_deltas}); \
         {oldvals} END;\n",
        name("upd")
    ));
    s.push_str(&format!(
        "CREATE TRIGGER {} AFTER DELETE ON {tq} WHEN {GATE_OPEN} BEGIN \
         INSERT INTO ferry_foreign(tbl, pk, op, deltas) VALUES ({id}, OLD.{pk}, 3, {del_deltas}); \
         {oldvals} END;\n",
        name("del")
    ));
    s
}

/// Columns just added to a table hold no write in any existing row: their cells are marked
/// [`crate::vv::Version::UNWRITTEN`], so they do not inherit the version of the write that
/// created the row (which, made on the older schema, never wrote them).
fn mark_unwritten(conn: &Connection, t: &TableInfo, added: &[String]) -> Result<()> {
    let ids: Vec<u32> = added
        .iter()
        .filter_map(|n| t.by_name.get(n).map(|i| *i as u32))
        .collect();
    let mut st = conn.prepare("SELECT pk, cl, meta FROM ferry_rows WHERE tbl = ?1")?;
    let rows: Vec<(crate::Value, i64, Vec<u8>)> = st
        .query_map([t.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut up = conn.prepare("UPDATE ferry_rows SET meta = ?3 WHERE tbl = ?1 AND pk = ?2")?;
    for (pk, cl, meta) in rows {
        let mut m = crate::rowmeta::RowMeta::decode(cl as u64, &meta)?;
        for id in &ids {
            if m.cells.iter().all(|(c, _)| c != id) {
                m.set_cell(*id, crate::vv::Version::UNWRITTEN);
            }
        }
        up.execute(params![t.id, pk, m.encode()])?;
    }
    Ok(())
}
