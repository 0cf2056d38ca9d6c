//! The one public error of the bindings, and the one place core errors are mapped to it.
//!
//! Core errors are rich and internal; host apps need to know what to *do*: fix their input,
//! stop writing a read-only table, get a new token, wait for the network, re-resolve a
//! refused write, upgrade the app. Each variant is one such action, carrying the core's
//! explanation in `reason` (host exceptions show fields, so the text lives in a field).

use ferry_core::Error as Core;
use ferry_core::protocol::ErrorCode;

/// Everything a Ferry call can fail with, as the host language sees it.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum FerryError {
    /// An argument, schema declaration, SQL statement or value was not acceptable.
    #[error("invalid input: {reason}")]
    InvalidInput {
        /// What was wrong.
        reason: String,
    },
    /// A write to a `read_only` table: only its primary (a token granted write) writes it.
    #[error("read-only table `{table}`")]
    ReadOnlyTable {
        /// The table.
        table: String,
    },
    /// The relay refused the token or the write's scope: get a new token or write elsewhere.
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// The relay's explanation.
        reason: String,
    },
    /// The relay could not be reached or the connection ended; the sync loop keeps retrying.
    #[error("offline: {reason}")]
    Offline {
        /// What happened.
        reason: String,
    },
    /// The relay refused a pushed change set (not for authorization reasons); for a strict
    /// write (`server_checked`, lease-guarded) it was rolled back: re-read and retry.
    #[error("rejected by the relay ({code}): {reason}")]
    ConflictRejected {
        /// The relay's error code.
        code: String,
        /// The relay's explanation.
        reason: String,
    },
    /// A lease is held by another replica, or the grant presented is no longer current:
    /// wait and acquire again.
    #[error("lease `{name}` unavailable: {reason}")]
    LeaseUnavailable {
        /// The lease.
        name: String,
        /// Why.
        reason: String,
    },
    /// The file or its app schema is newer than this build: upgrade the app.
    #[error("schema too new: {reason}")]
    SchemaTooNew {
        /// Which version was found and which is supported.
        reason: String,
    },
    /// A quarantined change set cannot be discarded (it kept no before-images) or no longer
    /// exists: retry it, or overwrite its rows.
    #[error("cannot discard: {reason}")]
    CannotDiscard {
        /// Why.
        reason: String,
    },
    /// A quarantined change set that kept no before-images cannot be retried while checked
    /// writes are pending: retry once they are acknowledged.
    #[error("retry waits: {reason}")]
    RetryWaits {
        /// Why.
        reason: String,
    },
    /// A transaction larger than the relay accepts: nothing was written; split it.
    #[error("transaction too large: {reason}")]
    TransactionTooLarge {
        /// Its size and the relay's limits.
        reason: String,
    },
    /// The replica (or the object) was closed; open it again.
    #[error("closed")]
    Closed,
    /// Anything else (disk, corruption, internal); worth reporting.
    #[error("{reason}")]
    Other {
        /// What happened.
        reason: String,
    },
}

/// Result alias of the bindings.
pub type Result<T, E = FerryError> = std::result::Result<T, E>;

impl From<Core> for FerryError {
    fn from(e: Core) -> Self {
        let reason = e.to_string();
        match e {
            Core::InvalidSchema(_)
            | Core::UnknownName { .. }
            | Core::InvalidInput(_)
            | Core::InvalidCounter { .. } => FerryError::InvalidInput { reason },
            Core::SchemaTooNew { .. }
            | Core::AppSchemaTooNew { .. }
            | Core::AppSchemaOutdated { .. } => FerryError::SchemaTooNew { reason },
            Core::ReadOnlyTable(table) => FerryError::ReadOnlyTable { table },
            Core::Transport(_) => FerryError::Offline { reason },
            Core::Refused { code, message } => match code {
                ErrorCode::Unauthorized | ErrorCode::Forbidden => {
                    FerryError::Unauthorized { reason: message }
                }
                _ => FerryError::ConflictRejected {
                    code: code.as_str().to_owned(),
                    reason: message,
                },
            },
            Core::Rejected(why) => FerryError::ConflictRejected {
                code: "rejected".to_owned(),
                reason: why,
            },
            Core::LeaseBusy { name, .. } | Core::LeaseLost { name, .. } => {
                FerryError::LeaseUnavailable { name, reason }
            }
            Core::CannotDiscard { .. } | Core::NotQuarantined(_) => {
                FerryError::CannotDiscard { reason }
            }
            Core::RetryWaits { .. } => FerryError::RetryWaits { reason },
            Core::TransactionTooLarge { .. } => FerryError::TransactionTooLarge { reason },
            Core::Closed => FerryError::Closed,
            Core::Sqlite(ref s) if sql_from_app(s) => FerryError::InvalidInput { reason },
            _ => {
                tracing::error!(error = %reason, "ferry call failed");
                FerryError::Other { reason }
            }
        }
    }
}

/// SQLite errors caused by the statement or values the app passed (syntax, unknown column,
/// constraint, type, parameter count), as opposed to disk or internal failures.
fn sql_from_app(e: &rusqlite::Error) -> bool {
    use rusqlite::{Error as E, ErrorCode as C};
    match e {
        E::SqliteFailure(f, _) => matches!(
            f.code,
            C::Unknown
                | C::ConstraintViolation
                | C::TypeMismatch
                | C::ParameterOutOfRange
                | C::AuthorizationForStatementDenied
                | C::TooBig
        ),
        E::InvalidParameterCount(..)
        | E::InvalidParameterName(_)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_)
        | E::MultipleStatement
        | E::ExecuteReturnedResults
        | E::Empty
        | E::InvalidQuery
        | E::SqlInputError { .. }
        | E::Utf8Error(..)
        | E::NulError(_)
        | E::ToSqlConversionFailure(_) => true,
        _ => false,
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for FerryError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        FerryError::Other {
            reason: format!("a callback implemented by the app failed: {}", e.reason),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sql_error(sql: &str) -> Core {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t(a NOT NULL)").unwrap();
        Core::Sqlite(c.execute(sql, []).unwrap_err())
    }

    type Expect = fn(&FerryError) -> bool;

    #[test]
    fn each_core_error_maps_to_its_action() {
        let cases: Vec<(Core, Expect)> = vec![
            (Core::InvalidSchema("x".into()), |e| {
                matches!(e, FerryError::InvalidInput { .. })
            }),
            (Core::InvalidInput("x".into()), |e| {
                matches!(e, FerryError::InvalidInput { .. })
            }),
            (sql_error("SELEC 1"), |e| {
                matches!(e, FerryError::InvalidInput { .. })
            }),
            (sql_error("INSERT INTO t VALUES (NULL)"), |e| {
                matches!(e, FerryError::InvalidInput { .. })
            }),
            (sql_error("INSERT INTO nope VALUES (1)"), |e| {
                matches!(e, FerryError::InvalidInput { .. })
            }),
            (
                Core::SchemaTooNew {
                    found: 9,
                    supported: 2,
                },
                |e| matches!(e, FerryError::SchemaTooNew { .. }),
            ),
            (
                Core::AppSchemaTooNew {
                    found: 3,
                    declared: 2,
                },
                |e| matches!(e, FerryError::SchemaTooNew { .. }),
            ),
            (
                Core::ReadOnlyTable("ref".into()),
                |e| matches!(e, FerryError::ReadOnlyTable { table } if table == "ref"),
            ),
            (Core::Transport("down".into()), |e| {
                matches!(e, FerryError::Offline { .. })
            }),
            (
                Core::Refused {
                    code: ErrorCode::Forbidden,
                    message: "m".into(),
                },
                |e| matches!(e, FerryError::Unauthorized { reason } if reason == "m"),
            ),
            (
                Core::Refused {
                    code: ErrorCode::InvalidChangeSet,
                    message: "m".into(),
                },
                |e| matches!(e, FerryError::ConflictRejected { code, .. } if code == "invalid_change_set"),
            ),
            (Core::Closed, |e| matches!(e, FerryError::Closed)),
            (Core::Corrupt("bad page".into()), |e| {
                matches!(e, FerryError::Other { .. })
            }),
            (
                Core::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    None,
                )),
                |e| matches!(e, FerryError::Other { .. }),
            ),
        ];
        for (core, ok) in cases {
            let shown = core.to_string();
            let mapped = FerryError::from(core);
            assert!(ok(&mapped), "{shown} mapped to {mapped:?}");
        }
    }
}
