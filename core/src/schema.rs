//! The app's declaration of what syncs: tables, columns, primary key, scope column, merge
//! policies, write mode, delete rule, app schema version and migrations.
//!
//! Declarations are plain data (serde-friendly records, never strings to parse beyond the
//! policy/mode names), validated once at open so that a bad declaration fails early with an
//! error naming the table and column at fault instead of corrupting sync later.

use crate::error::{Error, Result};
use crate::value::Value;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::str::FromStr;

pub use crate::policy::Policy;

/// Who may write a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TableMode {
    /// Every replica writes; conflicts resolve by policy.
    #[default]
    MultiWriter,
    /// Rows come from a primary; this replica's writes are refused at once.
    ReadOnly,
    /// The relay accepts a change only if no unseen change touched the same cells.
    ServerChecked,
}

impl FromStr for TableMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "multi_writer" => Ok(TableMode::MultiWriter),
            "read_only" => Ok(TableMode::ReadOnly),
            "server_checked" => Ok(TableMode::ServerChecked),
            _ => Err(Error::UnknownName {
                kind: "table mode",
                name: s.to_owned(),
                expected: "multi_writer, read_only, server_checked",
            }),
        }
    }
}

/// What happens when a delete meets a concurrent update of the same row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeleteRule {
    /// The delete wins; the concurrent update is dropped (and logged as a conflict).
    #[default]
    DeleteWins,
    /// The update wins; the row survives with its pre-delete values plus the update.
    UpdateWins,
}

impl FromStr for DeleteRule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "delete_wins" => Ok(DeleteRule::DeleteWins),
            "update_wins" => Ok(DeleteRule::UpdateWins),
            _ => Err(Error::UnknownName {
                kind: "delete rule",
                name: s.to_owned(),
                expected: "delete_wins, update_wins",
            }),
        }
    }
}

/// SQLite column type of a declared column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    /// TEXT
    Text,
    /// INTEGER
    Integer,
    /// REAL
    Real,
    /// BLOB
    Blob,
    /// No affinity (any storage class).
    Any,
}

impl ColumnType {
    fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "TEXT",
            ColumnType::Integer => "INTEGER",
            ColumnType::Real => "REAL",
            ColumnType::Blob => "BLOB",
            ColumnType::Any => "ANY",
        }
    }
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnDecl {
    /// Column name.
    pub name: String,
    /// SQLite type. JSON key `column_type`, as in the bindings' records (`ty` is read too).
    #[serde(rename = "column_type", alias = "ty")]
    pub ty: ColumnType,
    /// Merge policy (default `lww`).
    #[serde(default)]
    pub policy: Policy,
    /// `NOT NULL` constraint.
    #[serde(default)]
    pub not_null: bool,
    /// Default value for rows that do not set the column (counters default to 0). JSON key
    /// `default_value`, as in the bindings (`default` is read too), written as a plain JSON
    /// value (`0`, `1.5`, `"x"`; a blob as `{"Blob": [bytes]}`).
    #[serde(
        default,
        rename = "default_value",
        alias = "default",
        with = "default_json"
    )]
    pub default: Option<Value>,
}

/// A column default in JSON as the app writes it: `0`, `1.5`, `"x"`, `null`; earlier files'
/// tagged form (`{"Integer": 0}`) is read too.
mod default_json {
    use crate::value::Value;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Integer(i64),
        Real(f64),
        Text(String),
        Tagged(Value),
    }

    pub(super) fn serialize<S: Serializer>(v: &Option<Value>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None | Some(Value::Null) => s.serialize_none(),
            Some(Value::Integer(i)) => s.serialize_i64(*i),
            Some(Value::Real(r)) => s.serialize_f64(*r),
            Some(Value::Text(t)) => s.serialize_str(t),
            Some(b @ Value::Blob(_)) => b.serialize(s),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Ok(Option::<Form>::deserialize(d)?.and_then(|f| match f {
            Form::Integer(i) => Some(Value::Integer(i)),
            Form::Real(r) => Some(Value::Real(r)),
            Form::Text(t) => Some(Value::Text(t)),
            Form::Tagged(Value::Null) => None,
            Form::Tagged(v) => Some(v),
        }))
    }
}

/// One synced table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableDecl {
    /// Table name.
    pub name: String,
    /// Columns, including the primary key.
    pub columns: Vec<ColumnDecl>,
    /// Primary key column (TEXT or BLOB; globally unique, e.g. a ULID).
    pub primary_key: Option<String>,
    /// Column whose value names the partition a row belongs to.
    #[serde(default)]
    pub scope_column: Option<String>,
    /// Who may write.
    #[serde(default)]
    pub mode: TableMode,
    /// Delete vs concurrent update.
    #[serde(default)]
    pub delete_rule: DeleteRule,
}

impl TableDecl {
    /// Starts a declaration of table `name` with no columns.
    pub fn new(name: &str) -> Self {
        TableDecl {
            name: name.to_owned(),
            columns: Vec::new(),
            primary_key: None,
            scope_column: None,
            mode: TableMode::MultiWriter,
            delete_rule: DeleteRule::DeleteWins,
        }
    }
    /// Adds a column with the given type and policy.
    pub fn column(mut self, name: &str, ty: ColumnType, policy: Policy) -> Self {
        self.columns.push(ColumnDecl {
            name: name.to_owned(),
            ty,
            policy,
            not_null: false,
            default: None,
        });
        self
    }
    /// Adds a TEXT primary key column.
    pub fn text_key(mut self, name: &str) -> Self {
        self = self.column(name, ColumnType::Text, Policy::Lww);
        self.primary_key = Some(name.to_owned());
        self
    }
    /// Adds an `lww` TEXT column.
    pub fn text(self, name: &str) -> Self {
        self.column(name, ColumnType::Text, Policy::Lww)
    }
    /// Adds an `lww` INTEGER column.
    pub fn integer(self, name: &str) -> Self {
        self.column(name, ColumnType::Integer, Policy::Lww)
    }
    /// Adds an `lww` REAL column.
    pub fn real(self, name: &str) -> Self {
        self.column(name, ColumnType::Real, Policy::Lww)
    }
    /// Adds an `lww` BLOB column.
    pub fn blob(self, name: &str) -> Self {
        self.column(name, ColumnType::Blob, Policy::Lww)
    }
    /// Adds a `counter` column (INTEGER NOT NULL DEFAULT 0).
    pub fn counter(self, name: &str) -> Self {
        self.column(name, ColumnType::Integer, Policy::Counter)
    }
    /// Sets the scope column.
    pub fn scope(mut self, column: &str) -> Self {
        self.scope_column = Some(column.to_owned());
        self
    }
    /// Sets the write mode.
    pub fn mode(mut self, mode: TableMode) -> Self {
        self.mode = mode;
        self
    }
    /// Sets the delete rule.
    pub fn delete_rule(mut self, rule: DeleteRule) -> Self {
        self.delete_rule = rule;
        self
    }

    /// The primary key column's name (validated: present).
    pub fn pk(&self) -> &str {
        self.primary_key.as_deref().unwrap_or("")
    }

    /// `CREATE TABLE` for this declaration.
    pub(crate) fn create_sql(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| self.column_sql(c)).collect();
        format!(
            "CREATE TABLE {} ({}, PRIMARY KEY ({}))",
            quote(&self.name),
            cols.join(", "),
            quote(self.pk())
        )
    }

    pub(crate) fn column_sql(&self, c: &ColumnDecl) -> String {
        let mut s = format!("{} {}", quote(&c.name), c.ty.sql());
        if c.policy.is_additive() {
            s.push_str(" NOT NULL DEFAULT 0");
            return s;
        }
        if c.not_null || c.name == self.pk() {
            s.push_str(" NOT NULL");
        }
        if let Some(d) = &c.default {
            s.push_str(" DEFAULT ");
            s.push_str(&literal(d));
        }
        s
    }

    /// Checks the declaration on its own.
    pub fn validate(&self) -> Result<()> {
        let t = &self.name;
        check_ident(t, "table")?;
        if self.columns.is_empty() {
            return Err(Error::InvalidSchema(format!(
                "synced table `{t}` declares no columns"
            )));
        }
        let mut seen = HashSet::new();
        for c in &self.columns {
            check_ident(&c.name, "column")?;
            if !seen.insert(c.name.to_ascii_lowercase()) {
                return Err(Error::InvalidSchema(format!(
                    "table `{t}` declares column `{}` twice",
                    c.name
                )));
            }
            if c.policy.is_additive() && c.ty != ColumnType::Integer {
                return Err(Error::InvalidSchema(format!(
                    "counter column `{t}.{}` must have type integer",
                    c.name
                )));
            }
        }
        let Some(pk) = &self.primary_key else {
            return Err(Error::InvalidSchema(format!(
                "synced table `{t}` has no primary key: declare a TEXT or BLOB key (e.g. a ULID from ferry::new_id())"
            )));
        };
        let Some(pkc) = self.columns.iter().find(|c| &c.name == pk) else {
            return Err(Error::InvalidSchema(format!(
                "primary key `{pk}` of table `{t}` is not among its columns"
            )));
        };
        match pkc.ty {
            ColumnType::Text | ColumnType::Blob => {}
            ColumnType::Integer => {
                return Err(Error::InvalidSchema(format!(
                    "synced table `{t}` has an integer primary key `{pk}`: integer rowid keys collide across devices; use a TEXT or BLOB key such as a ULID"
                )));
            }
            _ => {
                return Err(Error::InvalidSchema(format!(
                    "primary key `{t}.{pk}` must be TEXT or BLOB"
                )));
            }
        }
        if pkc.policy != Policy::Lww {
            return Err(Error::InvalidSchema(format!(
                "primary key `{t}.{pk}` cannot have a merge policy"
            )));
        }
        if let Some(sc) = &self.scope_column {
            let Some(c) = self.columns.iter().find(|c| &c.name == sc) else {
                return Err(Error::InvalidSchema(format!(
                    "scope column `{sc}` of table `{t}` is not among its columns"
                )));
            };
            if c.policy.is_additive() {
                return Err(Error::InvalidSchema(format!(
                    "scope column `{t}.{sc}` cannot be a counter"
                )));
            }
        }
        Ok(())
    }
}

/// A migration step: SQL run once when the stored app schema version is below `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    /// The app schema version this step upgrades to.
    pub version: u32,
    /// SQL statements (may create local tables, backfill data, ...).
    pub sql: String,
}

/// Everything the app declares at open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// App schema version (starts at 1, only grows).
    pub version: u32,
    /// Synced tables. Ferry creates them, and adds newly declared columns to existing ones.
    pub tables: Vec<TableDecl>,
    /// Migrations for local tables and data; run in version order inside one transaction
    /// each, without capture (every replica runs them itself).
    #[serde(default)]
    pub migrations: Vec<Migration>,
}

impl Schema {
    /// The schema as the relay's `schema.json` holds it (pretty-printed): what
    /// `Schema.toJson()` in the bindings exports from the app's records, so the relay and
    /// the app are configured from one declaration.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Reads a schema from the relay's JSON form; unknown keys are refused, naming the key.
    pub fn from_json(json: &str) -> Result<Schema> {
        serde_json::from_str(json).map_err(|e| Error::InvalidSchema(format!("schema JSON: {e}")))
    }

    /// Each table with its mode, key, scope column, delete rule and each column's type and
    /// policy, one line per table and one per column (what `ferry-relay check-config` prints).
    pub fn describe(&self) -> String {
        fn name<T: Serialize>(v: &T) -> String {
            serde_json::to_string(v)
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned()
        }
        let mut out = String::new();
        for t in &self.tables {
            out.push_str(&format!(
                "table {}: mode {}, key {}, scope {}, deletes {}\n",
                t.name,
                name(&t.mode),
                t.primary_key.as_deref().unwrap_or("(none)"),
                t.scope_column.as_deref().unwrap_or("(global)"),
                name(&t.delete_rule),
            ));
            for c in &t.columns {
                out.push_str(&format!(
                    "  {} {} {}{}\n",
                    c.name,
                    name(&c.ty),
                    name(&c.policy),
                    if c.not_null { " not null" } else { "" }
                ));
            }
        }
        out
    }

    /// A schema at `version` with no tables.
    pub fn new(version: u32) -> Self {
        Schema {
            version,
            tables: Vec::new(),
            migrations: Vec::new(),
        }
    }
    /// Adds a synced table.
    pub fn table(mut self, t: TableDecl) -> Self {
        self.tables.push(t);
        self
    }
    /// Adds a migration.
    pub fn migration(mut self, version: u32, sql: &str) -> Self {
        self.migrations.push(Migration {
            version,
            sql: sql.to_owned(),
        });
        self
    }

    /// Checks the whole declaration.
    pub fn validate(&self) -> Result<()> {
        if self.version == 0 {
            return Err(Error::InvalidSchema(
                "schema version must be at least 1".into(),
            ));
        }
        let mut names = HashSet::new();
        for t in &self.tables {
            t.validate()?;
            if !names.insert(t.name.to_ascii_lowercase()) {
                return Err(Error::InvalidSchema(format!(
                    "table `{}` is declared twice",
                    t.name
                )));
            }
        }
        let mut last = 0;
        for m in &self.migrations {
            if m.version <= last || m.version > self.version {
                return Err(Error::InvalidSchema(format!(
                    "migration to version {} is out of order or beyond the schema version {}",
                    m.version, self.version
                )));
            }
            last = m.version;
        }
        Ok(())
    }
}

/// Names Ferry accepts for tables and columns: ASCII identifiers, not reserved prefixes.
fn check_ident(name: &str, what: &str) -> Result<()> {
    let ok_chars = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok_chars {
        return Err(Error::InvalidSchema(format!(
            "{what} name `{name}` is not a plain identifier (letters, digits, _; at most 64)"
        )));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("ferry_") || lower.starts_with("sqlite_") {
        return Err(Error::InvalidSchema(format!(
            "{what} name `{name}` uses a reserved prefix (ferry_, sqlite_)"
        )));
    }
    Ok(())
}

/// Double-quotes an identifier (already validated; quotes doubled anyway).
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => format!("{f:?}"),
        Value::Text(s) => format!("'{}'", s.replace('\'', "''")),
        Value::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
            format!("X'{hex}'")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn todo() -> TableDecl {
        TableDecl::new("todo")
            .text_key("id")
            .text("title")
            .counter("votes")
    }

    #[test]
    fn accepts_a_plain_table() {
        assert!(todo().validate().is_ok());
    }

    #[test]
    fn refuses_missing_and_integer_keys() {
        let t = TableDecl::new("t").text("a");
        assert!(
            matches!(t.validate(), Err(Error::InvalidSchema(m)) if m.contains("no primary key"))
        );
        let mut t = TableDecl::new("t").integer("id");
        t.primary_key = Some("id".into());
        assert!(
            matches!(t.validate(), Err(Error::InvalidSchema(m)) if m.contains("integer primary key"))
        );
    }

    #[test]
    fn unknown_keys_are_refused_not_ignored() {
        // A typo in a mode key used to pass silently and leave the table multi-writer.
        let json = r#"{"name":"t","columns":[{"name":"id","column_type":"text"}],"primary_key":"id","write_mode":"server_checked"}"#;
        let err = serde_json::from_str::<TableDecl>(json)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("write_mode")));
        let json = r#"{"name":"id","column_type":"text","polciy":"lww"}"#;
        assert!(serde_json::from_str::<ColumnDecl>(json).is_err());
        let json = r#"{"version":1,"tables":[],"migration":[]}"#;
        assert!(serde_json::from_str::<Schema>(json).is_err());
        let ok = r#"{"name":"t","columns":[{"name":"id","column_type":"text"},{"name":"n","column_type":"integer","policy":"counter"}],"primary_key":"id","mode":"server_checked"}"#;
        let t: TableDecl = serde_json::from_str(ok).unwrap_or_else(|e| panic!("{e}"));
        let shown = Schema {
            version: 1,
            tables: vec![t],
            migrations: Vec::new(),
        }
        .describe();
        assert!(
            shown.contains("table t: mode server_checked, key id, scope (global)")
                && shown.contains("  n integer counter"),
            "{shown}"
        );
    }

    #[test]
    fn the_json_form_round_trips_and_reads_earlier_names() {
        let mut t = TableDecl::new("t");
        for (name, ty, default) in [
            ("id", ColumnType::Text, None),
            ("n", ColumnType::Integer, Some(Value::Integer(3))),
            ("r", ColumnType::Real, Some(Value::Real(1.5))),
            ("s", ColumnType::Text, Some(Value::Text("x".into()))),
            ("b", ColumnType::Blob, Some(Value::Blob(vec![1, 2]))),
        ] {
            t.columns.push(ColumnDecl {
                name: name.into(),
                ty,
                policy: Policy::Lww,
                not_null: false,
                default,
            });
        }
        t.primary_key = Some("id".into());
        let s = Schema {
            version: 2,
            tables: vec![t],
            migrations: vec![Migration {
                version: 2,
                sql: "CREATE TABLE l(x)".into(),
            }],
        };
        let json = s.to_json().unwrap_or_else(|e| panic!("{e}"));
        // The bindings' names, plain JSON defaults.
        assert!(json.contains(r#""column_type": "integer""#), "{json}");
        assert!(json.contains(r#""default_value": 3"#), "{json}");
        assert!(json.contains(r#""default_value": "x""#), "{json}");
        assert_eq!(Schema::from_json(&json).ok(), Some(s));
        // Files written with the earlier names still read.
        let old = r#"{"version":1,"tables":[{"name":"t","primary_key":"id","columns":[{"name":"id","ty":"text"},{"name":"n","ty":"integer","default":{"Integer":0}}]}]}"#;
        let read = Schema::from_json(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.tables[0].columns[1].default, Some(Value::Integer(0)));
        assert!(matches!(
            Schema::from_json(r#"{"version":1,"tables":[],"extra":1}"#),
            Err(Error::InvalidSchema(m)) if m.contains("extra")
        ));
    }

    #[test]
    fn refuses_unknown_names() {
        assert!(matches!(
            "lwww".parse::<Policy>(),
            Err(Error::UnknownName { .. })
        ));
        assert!(matches!(
            "rw".parse::<TableMode>(),
            Err(Error::UnknownName { .. })
        ));
        assert!(matches!(
            "x".parse::<DeleteRule>(),
            Err(Error::UnknownName { .. })
        ));
        let json = r#"{"name":"t","columns":[{"name":"id","column_type":"text","policy":"sum"}],"primary_key":"id"}"#;
        let err = serde_json::from_str::<TableDecl>(json)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("sum")));
    }

    #[test]
    fn refuses_bad_identifiers_and_counter_types() {
        assert!(TableDecl::new("ferry_x").text_key("id").validate().is_err());
        assert!(TableDecl::new("a b").text_key("id").validate().is_err());
        assert!(
            TableDecl::new("t")
                .text_key("id")
                .text("x;drop")
                .validate()
                .is_err()
        );
        let t = TableDecl::new("t")
            .text_key("id")
            .column("c", ColumnType::Text, Policy::Counter);
        assert!(t.validate().is_err());
    }

    #[test]
    fn create_sql_shape() {
        let sql = todo().create_sql();
        assert_eq!(
            sql,
            "CREATE TABLE \"todo\" (\"id\" TEXT NOT NULL, \"title\" TEXT, \"votes\" INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (\"id\"))"
        );
    }
}
