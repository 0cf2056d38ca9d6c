//! The one error type of `ferry-core`.
//!
//! Every failure that input can cause (an API call, a schema declaration, SQL from the app,
//! a frame from the relay) surfaces as a typed variant naming what was wrong, so that the FFI
//! layer can map it to an actionable public error in one place.

use thiserror::Error;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside Ferry's core.
///
/// Deliberately exhaustive: the FFI maps each kind to its own public error in one `match`
/// without a catch-all, so a new kind does not compile until it has one.
#[derive(Debug, Error)]
pub enum Error {
    /// The declared schema is not acceptable (names the table/column and the reason).
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// A merge policy, table mode or delete rule name that Ferry does not know.
    #[error("unknown {kind} `{name}` (expected one of: {expected})")]
    UnknownName {
        /// What kind of name it was (policy, mode, delete rule).
        kind: &'static str,
        /// The name that was given.
        name: String,
        /// The accepted names.
        expected: &'static str,
    },
    /// The file was written by a newer Ferry than this one.
    #[error(
        "database format version {found} is newer than this Ferry supports ({supported}); upgrade Ferry"
    )]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Highest version this build understands.
        supported: i64,
    },
    /// The app schema version in the file is newer than the one the app declared.
    #[error("app schema version {found} in the file is newer than the declared version {declared}")]
    AppSchemaTooNew {
        /// Version stored in the file.
        found: u32,
        /// Version the app declared at open.
        declared: u32,
    },
    /// A change set writes a column this replica's app schema does not declare: it comes from
    /// a newer app version. Downloads stop at it (nothing is skipped, so nothing is lost) and
    /// local writes keep uploading, until the app opens the replica with the newer schema.
    #[error(
        "a change writes column `{column}` of table `{table}`, which this app schema does not declare: it comes from a newer app version; upgrade the app (open the replica with the newer schema) to receive it"
    )]
    AppSchemaOutdated {
        /// Table.
        table: String,
        /// The unknown column.
        column: String,
    },
    /// A write to a `read_only` table through the SDK.
    #[error("table `{0}` is read_only on this replica: only its primary writes it")]
    ReadOnlyTable(String),
    /// An API argument is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A counter column was given a value that is not an integer.
    #[error("counter column `{table}.{column}` must hold integers, got {got}")]
    InvalidCounter {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
        /// What the app wrote.
        got: String,
    },
    /// A remote change set is not acceptable (malformed, out of order, unknown table...).
    #[error("invalid change set: {0}")]
    InvalidChangeSet(String),
    /// A protocol frame could not be understood.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The network or the relay connection failed (the sync loop retries on its own).
    #[error("sync transport: {0}")]
    Transport(String),
    /// The relay refused a pushed change set.
    #[error("the relay refused a change set ({}): {message}", code.as_str())]
    Refused {
        /// The relay's error code.
        code: crate::error_code::ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The relay refused one of this replica's changes and it was rolled back; the conflict
    /// log holds what was written. `code` is the relay's: `conflict` (compare-and-set),
    /// `fenced` (stale lease), or the permanent code a quarantined change set was refused
    /// with.
    #[error("change rejected by the relay ({}) and rolled back: {message}", code.as_str())]
    Rejected {
        /// The relay's code.
        code: crate::error_code::ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// Another replica holds the lease.
    #[error("lease `{name}` is held by another replica for {retry_after_ms} ms more")]
    LeaseBusy {
        /// Lease name.
        name: String,
        /// Milliseconds until the holder's grant expires.
        retry_after_ms: u64,
    },
    /// The grant is no longer the lease's current one (expired or superseded).
    #[error("lease `{name}` is lost: token {token} is not its current grant")]
    LeaseLost {
        /// Lease name.
        name: String,
        /// The token that was presented.
        token: u64,
    },
    /// No quarantined change set has this id (discarded or retried already).
    #[error("no quarantined change set {0}")]
    NotQuarantined(i64),
    /// The quarantined change set kept no before-images (an unguarded write), so it cannot
    /// be taken back exactly: retry it, or overwrite its rows.
    #[error(
        "quarantined change set {id} (origin_seq {origin_seq}) cannot be discarded: no before-images were kept for it (only server_checked and lease-guarded writes keep them); retry it or overwrite its rows"
    )]
    CannotDiscard {
        /// The quarantine id.
        id: i64,
        /// The `origin_seq` it was refused under.
        origin_seq: u64,
    },
    /// The quarantined change set kept no before-images and a checked (guarded) change set
    /// is pending: retried now it would sit behind that one with nothing to take it back
    /// should the relay refuse it, so the retry waits until the checked writes are decided.
    #[error(
        "quarantined change set {id} cannot be retried yet: it kept no before-images and checked writes are pending; retry once they are acknowledged"
    )]
    RetryWaits {
        /// The quarantine id.
        id: i64,
    },
    /// A transaction is larger than the relay accepts (its limits as last announced): it
    /// could never be uploaded, so it was refused at commit and nothing was written.
    #[error(
        "transaction too large for the relay: {ops} cell operations and about {bytes} bytes; the relay accepts {max_ops} and {max_bytes}; nothing was written (split it)"
    )]
    TransactionTooLarge {
        /// Cell operations in the transaction.
        ops: u64,
        /// Its approximate encoded size.
        bytes: u64,
        /// The relay's `max_change_set_ops`.
        max_ops: u64,
        /// What one change set may take of the relay's `max_frame_bytes`.
        max_bytes: u64,
    },
    /// The replica was closed.
    #[error("the replica is closed")]
    Closed,
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// The device's storage is full: the operation wrote nothing. Free space and retry.
    #[error("storage full: {0}; nothing was written (free space and retry)")]
    StorageFull(String),
    /// The replica's file or its folder cannot be written (read-only file system or
    /// permissions): the operation wrote nothing; reads still work.
    #[error("storage read-only: {0}; nothing was written (make the file writable and retry)")]
    StorageReadOnly(String),
    /// The replica's file cannot be opened (its folder is missing, not writable, or on
    /// read-only storage).
    #[error("cannot open the replica file: {0} (does its folder exist, and is it writable?)")]
    CannotOpen(String),
    /// Encoding or decoding of a stored or wire record failed.
    #[error("codec: {0}")]
    Codec(String),
    /// The file on disk is not a Ferry replica or is damaged.
    #[error("corrupt replica: {0}")]
    Corrupt(String),
}

impl From<rmp_serde::encode::Error> for Error {
    fn from(e: rmp_serde::encode::Error) -> Self {
        Error::Codec(e.to_string())
    }
}

impl From<rmp_serde::decode::Error> for Error {
    fn from(e: rmp_serde::decode::Error) -> Self {
        Error::Codec(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Codec(e.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Error::StorageFull(e.to_string()),
            Some(rusqlite::ErrorCode::ReadOnly) => Error::StorageReadOnly(e.to_string()),
            Some(rusqlite::ErrorCode::CannotOpen) => Error::CannotOpen(e.to_string()),
            _ => Error::Sqlite(e),
        }
    }
}
