//! The one public error of the bindings, and the one place core errors are mapped to it.
//!
//! Core errors are rich and internal; host apps need to know what to *do*: fix their input,
//! stop writing a read-only table, get a new token, wait for the network, re-resolve a
//! refused write, upgrade the app. Each variant is one such action, carrying the core's
//! explanation in `reason` (host exceptions show fields, so the text lives in a field).

use crate::num::Signed;
use ferry_core::Error as Core;
use ferry_core::protocol::{CodeKind, ErrorCode};

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
        /// When another replica holds it: how long until its grant runs out (ms); try
        /// again then. None when this replica's grant was lost.
        retry_after_ms: Option<i64>,
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
    /// No quarantined change set has this id (discarded or retried already): list them again.
    #[error("not quarantined: {reason}")]
    NotQuarantined {
        /// Which id.
        reason: String,
    },
    /// Downloads paused at a change from a newer app version (a column this schema lacks):
    /// upgrade the app; uploads go on.
    #[error("app schema outdated: {reason}")]
    SchemaOutdated {
        /// The table and column the change needs.
        reason: String,
    },
    /// The disk is full: nothing was written; free space and retry.
    #[error("storage full: {reason}")]
    StorageFull {
        /// What SQLite said.
        reason: String,
    },
    /// The replica's file or folder cannot be written (read-only storage, permissions):
    /// nothing was written; reads still work.
    #[error("storage read-only: {reason}")]
    StorageReadOnly {
        /// What SQLite said.
        reason: String,
    },
    /// The replica's file cannot be opened (missing or unwritable folder).
    #[error("cannot open: {reason}")]
    CannotOpen {
        /// What SQLite said.
        reason: String,
    },
    /// The file is not a Ferry replica or is damaged (or a stored record cannot be read).
    #[error("corrupt: {reason}")]
    Corrupt {
        /// What is damaged.
        reason: String,
    },
    /// The relay and this build disagree: it sent something no correct relay sends (nothing
    /// was applied; the sync loop reconnects), or it refused a change set as invalid (a table
    /// or column its schema does not declare: deploy the relay's schema), or speaks another
    /// protocol version. Worth reporting.
    #[error("protocol: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// SQLite failed for a reason that is neither the app's statement nor a full, read-only
    /// or damaged store (an I/O error, a lock held elsewhere): retry; worth reporting.
    #[error("storage: {reason}")]
    Storage {
        /// What SQLite said.
        reason: String,
    },
    /// A callback the app implemented (token provider, resolver, listener) failed.
    #[error("app callback failed: {reason}")]
    Callback {
        /// What the host language reported.
        reason: String,
    },
    /// The replica (or the object) was closed; open it again.
    #[error("closed: {reason}")]
    Closed {
        /// What was closed.
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
            Core::SchemaTooNew { .. } | Core::AppSchemaTooNew { .. } => {
                FerryError::SchemaTooNew { reason }
            }
            Core::AppSchemaOutdated { .. } => FerryError::SchemaOutdated { reason },
            Core::ReadOnlyTable(table) => FerryError::ReadOnlyTable { table },
            Core::Transport(_) => FerryError::Offline { reason },
            Core::Refused { code, message } => match code.kind() {
                CodeKind::Auth => FerryError::Unauthorized { reason: message },
                CodeKind::Lost => FerryError::ConflictRejected {
                    code: code.as_str().to_owned(),
                    reason: message,
                },
                CodeKind::Invalid if code == ErrorCode::TooLarge => {
                    FerryError::TransactionTooLarge { reason: message }
                }
                // The relay and this app disagree (a table or column the relay's schema does
                // not declare, an incompatible version): not a conflict to retry.
                CodeKind::Invalid | CodeKind::Incompatible | CodeKind::SelfHealing => {
                    FerryError::Protocol {
                        reason: format!("{}: {message}", code.as_str()),
                    }
                }
                CodeKind::Unavailable => FerryError::Offline {
                    reason: format!("{}: {message}", code.as_str()),
                },
            },
            Core::Rejected { code, message } => FerryError::ConflictRejected {
                code: code.as_str().to_owned(),
                reason: message,
            },
            Core::LeaseBusy {
                name,
                retry_after_ms,
            } => FerryError::LeaseUnavailable {
                name,
                reason,
                retry_after_ms: Some(retry_after_ms.signed()),
            },
            Core::LeaseLost { name, .. } => FerryError::LeaseUnavailable {
                name,
                reason,
                retry_after_ms: None,
            },
            Core::CannotDiscard { .. } => FerryError::CannotDiscard { reason },
            Core::NotQuarantined(_) => FerryError::NotQuarantined { reason },
            Core::RetryWaits { .. } => FerryError::RetryWaits { reason },
            Core::TransactionTooLarge { .. } => FerryError::TransactionTooLarge { reason },
            Core::StorageFull(_) => FerryError::StorageFull { reason },
            Core::StorageReadOnly(_) => FerryError::StorageReadOnly { reason },
            Core::CannotOpen(_) => FerryError::CannotOpen { reason },
            Core::Corrupt(_) | Core::Codec(_) => FerryError::Corrupt { reason },
            Core::Protocol(_) | Core::InvalidChangeSet(_) => FerryError::Protocol { reason },
            Core::Closed => FerryError::Closed { reason },
            Core::Sqlite(ref s) if sql_from_app(s) => FerryError::InvalidInput { reason },
            Core::Sqlite(ref s) if sql_corrupt(s) => FerryError::Corrupt { reason },
            Core::Sqlite(_) => {
                tracing::error!(error = %reason, "ferry call failed in SQLite");
                FerryError::Storage { reason }
            }
        }
    }
}

/// SQLite errors that say the file is damaged or not a database.
fn sql_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
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
        FerryError::Callback { reason: e.reason }
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
                    code: ErrorCode::Conflict,
                    message: "m".into(),
                },
                |e| matches!(e, FerryError::ConflictRejected { code, .. } if code == "conflict"),
            ),
            (
                Core::Closed,
                |e| matches!(e, FerryError::Closed { reason } if !reason.is_empty()),
            ),
            (Core::Corrupt("bad page".into()), |e| {
                matches!(e, FerryError::Corrupt { .. })
            }),
            (
                Core::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
                    None,
                )),
                |e| matches!(e, FerryError::Corrupt { .. }),
            ),
            (
                Core::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                    None,
                )),
                |e| matches!(e, FerryError::Storage { .. }),
            ),
            (
                Core::from(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    None,
                )),
                |e| matches!(e, FerryError::StorageFull { .. }),
            ),
        ];
        for (core, ok) in cases {
            let shown = core.to_string();
            let mapped = FerryError::from(core);
            assert!(ok(&mapped), "{shown} mapped to {mapped:?}");
        }
    }

    /// One error of every core kind. The match below has no catch-all: a new core kind does
    /// not compile until it is listed here, and so checked by the test after it.
    fn every_kind() -> Vec<Core> {
        let all = vec![
            Core::InvalidSchema("s".into()),
            Core::UnknownName {
                kind: "mode",
                name: "n".into(),
                expected: "m",
            },
            Core::SchemaTooNew {
                found: 9,
                supported: 2,
            },
            Core::AppSchemaTooNew {
                found: 3,
                declared: 2,
            },
            Core::AppSchemaOutdated {
                table: "t".into(),
                column: "c".into(),
            },
            Core::ReadOnlyTable("t".into()),
            Core::InvalidInput("i".into()),
            Core::InvalidCounter {
                table: "t".into(),
                column: "c".into(),
                got: "g".into(),
            },
            Core::InvalidChangeSet("c".into()),
            Core::Protocol("p".into()),
            Core::Transport("t".into()),
            Core::Refused {
                code: ErrorCode::Conflict,
                message: "m".into(),
            },
            Core::Refused {
                code: ErrorCode::Forbidden,
                message: "m".into(),
            },
            Core::Rejected {
                code: ErrorCode::Fenced,
                message: "r".into(),
            },
            Core::LeaseBusy {
                name: "l".into(),
                retry_after_ms: 5,
            },
            Core::LeaseLost {
                name: "l".into(),
                token: 1,
            },
            Core::NotQuarantined(1),
            Core::CannotDiscard {
                id: 1,
                origin_seq: 2,
            },
            Core::RetryWaits { id: 1 },
            Core::TransactionTooLarge {
                ops: 1,
                bytes: 2,
                max_ops: 0,
                max_bytes: 0,
            },
            Core::Closed,
            Core::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                None,
            )),
            Core::StorageFull("f".into()),
            Core::StorageReadOnly("r".into()),
            Core::CannotOpen("o".into()),
            Core::Codec("c".into()),
            Core::Corrupt("c".into()),
        ];
        for e in &all {
            match e {
                Core::InvalidSchema(_)
                | Core::UnknownName { .. }
                | Core::SchemaTooNew { .. }
                | Core::AppSchemaTooNew { .. }
                | Core::AppSchemaOutdated { .. }
                | Core::ReadOnlyTable(_)
                | Core::InvalidInput(_)
                | Core::InvalidCounter { .. }
                | Core::InvalidChangeSet(_)
                | Core::Protocol(_)
                | Core::Transport(_)
                | Core::Refused { .. }
                | Core::Rejected { .. }
                | Core::LeaseBusy { .. }
                | Core::LeaseLost { .. }
                | Core::NotQuarantined(_)
                | Core::CannotDiscard { .. }
                | Core::RetryWaits { .. }
                | Core::TransactionTooLarge { .. }
                | Core::Closed
                | Core::Sqlite(_)
                | Core::StorageFull(_)
                | Core::StorageReadOnly(_)
                | Core::CannotOpen(_)
                | Core::Codec(_)
                | Core::Corrupt(_) => {}
            }
        }
        all
    }

    #[test]
    fn relay_refusals_map_to_the_category_of_their_cause() {
        let refused = |code| {
            FerryError::from(Core::Refused {
                code,
                message: "m".into(),
            })
        };
        assert!(matches!(
            refused(ErrorCode::InvalidChangeSet),
            FerryError::Protocol { reason } if reason.starts_with("invalid_change_set")
        ));
        assert!(matches!(
            refused(ErrorCode::Fenced),
            FerryError::ConflictRejected { code, .. } if code == "fenced"
        ));
        assert!(matches!(
            refused(ErrorCode::ShuttingDown),
            FerryError::Offline { .. }
        ));
        assert!(matches!(
            refused(ErrorCode::Forbidden),
            FerryError::Unauthorized { .. }
        ));
        // A verdict carries the relay's code, as `docs/protocol.md` lists it.
        for code in [ErrorCode::Conflict, ErrorCode::Fenced] {
            let lost = FerryError::from(Core::Rejected {
                code,
                message: "m".into(),
            });
            assert!(
                matches!(&lost, FerryError::ConflictRejected { code: c, .. } if c == code.as_str()),
                "{lost:?}"
            );
        }
    }

    #[test]
    fn every_core_kind_has_its_own_error_and_a_message() {
        let mut seen = std::collections::BTreeSet::new();
        for core in every_kind() {
            let shown = core.to_string();
            let mapped = FerryError::from(core);
            let name = format!("{mapped:?}");
            let variant = name.split([' ', '{', '(']).next().unwrap_or("").to_owned();
            assert!(
                !mapped.to_string().trim().is_empty(),
                "{shown}: an empty message"
            );
            seen.insert(variant);
        }
        // Every variant the bindings declare is reached (but `Callback`, which only an app's
        // callback raises): no kind shares a catch-all.
        assert_eq!(seen.len(), 19, "{seen:?}");
        let busy = FerryError::from(Core::LeaseBusy {
            name: "l".into(),
            retry_after_ms: 5,
        });
        assert!(
            matches!(
                busy,
                FerryError::LeaseUnavailable {
                    retry_after_ms: Some(5),
                    ..
                }
            ),
            "{busy:?}"
        );
        assert!(!seen.contains("Callback"), "{seen:?}");
    }
}
