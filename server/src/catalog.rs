//! What the relay knows of the app's tables: scope column, write mode, delete rule.
//!
//! Loaded from the same schema JSON the app declares (`ferry_core::Schema`), and validated
//! with the same rules, so the relay and the replicas cannot disagree about which column
//! decides a row's scope.

use crate::config::Config;
use crate::error::{RelayError, Result};
use ferry_core::{DeleteRule, Schema, TableDecl, TableMode};
use std::collections::HashMap;

/// One synced table as the relay sees it.
#[derive(Debug, Clone)]
pub struct RelayTable {
    /// Scope column, if any.
    pub scope_column: Option<String>,
    /// Write mode.
    pub mode: TableMode,
    /// Delete rule.
    pub delete_rule: DeleteRule,
    /// The full declaration (columns and policies, for validating change sets).
    pub decl: TableDecl,
}

/// The tables, by name, and the schema they came from.
#[derive(Debug, Clone)]
pub struct RelayCatalog {
    /// The app schema.
    pub schema: Schema,
    /// Tables by name.
    pub tables: HashMap<String, RelayTable>,
}

/// Reads the schema file the configuration names (unknown keys refused): its path and
/// the schema.
pub fn read_schema(config: &Config) -> Result<(&std::path::Path, Schema)> {
    let path = config
        .schema
        .as_deref()
        .ok_or_else(|| RelayError::Config("schema is not set".into()))?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        RelayError::Config(format!("cannot read schema file {}: {e}", path.display()))
    })?;
    let schema: Schema = serde_json::from_str(&text).map_err(|e| {
        RelayError::Config(format!(
            "schema file {} is not a Ferry schema: {e}",
            path.display()
        ))
    })?;
    Ok((path, schema))
}

impl RelayCatalog {
    /// Loads the schema named by the configuration.
    pub fn load(config: &Config) -> Result<Self> {
        let (path, schema) = read_schema(config)?;
        Self::from_schema(schema)
            .map_err(|e| RelayError::Config(format!("schema file {}: {e}", path.display())))
    }

    /// Builds from a schema value.
    pub fn from_schema(schema: Schema) -> Result<Self> {
        schema.validate().map_err(RelayError::Core)?;
        let tables = schema
            .tables
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    RelayTable {
                        scope_column: t.scope_column.clone(),
                        mode: t.mode,
                        delete_rule: t.delete_rule,
                        decl: t.clone(),
                    },
                )
            })
            .collect();
        Ok(RelayCatalog { schema, tables })
    }

    /// A table, or an error naming it.
    pub fn table(&self, name: &str) -> Result<&RelayTable> {
        self.tables.get(name).ok_or_else(|| {
            RelayError::InvalidChangeSet(format!("table `{name}` is not in the relay's schema"))
        })
    }
}
