//! The app's schema records as the relay's `schema.json`, and back: one declaration
//! configures both sides (`schemaToJson(schema)` written next to the relay's config, or the
//! app loading the file the relay uses with `schemaFromJson`). The JSON names are the
//! records' names (`column_type`, `default_value`, `scope_column`, …).

use crate::error::{FerryError, Result};
use crate::types::{ColumnDecl, Migration, Schema, TableDecl};
use ferry_core as core;

/// The schema in the relay's JSON form (pretty-printed), checked as `Replica.open` checks it.
#[uniffi::export]
pub fn schema_to_json(schema: Schema) -> Result<String> {
    let s = core::Schema::try_from(schema)?;
    s.validate()?;
    Ok(s.to_json()?)
}

/// Reads a schema from the relay's JSON form; unknown keys and invalid declarations are
/// `InvalidInput` naming what is wrong.
#[uniffi::export]
pub fn schema_from_json(json: String) -> Result<Schema> {
    let s = core::Schema::from_json(&json)?;
    s.validate()?;
    Schema::try_from(s)
}

fn signed32(what: &str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| FerryError::InvalidInput {
        reason: format!("{what} {v} is above 2^31 - 1"),
    })
}

impl TryFrom<core::Schema> for Schema {
    type Error = FerryError;
    fn try_from(s: core::Schema) -> Result<Self> {
        Ok(Schema {
            version: signed32("schema version", s.version)?,
            tables: s
                .tables
                .into_iter()
                .map(|t| TableDecl {
                    name: t.name,
                    columns: t
                        .columns
                        .into_iter()
                        .map(|c| ColumnDecl {
                            name: c.name,
                            column_type: c.ty.into(),
                            policy: c.policy.into(),
                            not_null: c.not_null,
                            default_value: c.default.map(Into::into),
                        })
                        .collect(),
                    // Validated: every synced table names its key.
                    primary_key: t.primary_key.unwrap_or_default(),
                    mode: t.mode.into(),
                    delete_rule: t.delete_rule.into(),
                    scope_column: t.scope_column,
                })
                .collect(),
            migrations: s
                .migrations
                .into_iter()
                .map(|m| {
                    Ok(Migration {
                        version: signed32("migration version", m.version)?,
                        sql: m.sql,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ColumnType, DeleteRule, Policy, SqlValue, TableMode};

    #[test]
    fn records_and_json_round_trip() {
        let schema = Schema {
            version: 3,
            tables: vec![TableDecl {
                name: "notes".into(),
                columns: vec![
                    ColumnDecl {
                        name: "id".into(),
                        column_type: ColumnType::Text,
                        policy: Policy::Lww,
                        not_null: false,
                        default_value: None,
                    },
                    ColumnDecl {
                        name: "likes".into(),
                        column_type: ColumnType::Integer,
                        policy: Policy::Counter,
                        not_null: true,
                        default_value: Some(SqlValue::Integer { value: 0 }),
                    },
                ],
                primary_key: "id".into(),
                mode: TableMode::ServerChecked,
                delete_rule: DeleteRule::UpdateWins,
                scope_column: None,
            }],
            migrations: vec![Migration {
                version: 3,
                sql: "CREATE TABLE drafts(x)".into(),
            }],
        };
        let json = schema_to_json(schema.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert!(json.contains(r#""mode": "server_checked""#), "{json}");
        assert_eq!(schema_from_json(json).ok(), Some(schema));
        assert!(matches!(
            schema_from_json(r#"{"version":1,"tables":[{"name":"t","columns":[],"primary_key":"id","write_mode":"x"}]}"#.into()),
            Err(FerryError::InvalidInput { reason }) if reason.contains("write_mode")
        ));
    }
}
