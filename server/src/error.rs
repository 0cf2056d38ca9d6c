//! The relay's error type.
//!
//! Errors that a client caused map to a protocol [`ErrorCode`] (sent in an error or refusal
//! frame); errors of the relay itself (storage, configuration) are logged and reported as
//! `internal` without details a client should not see.

use ferry_core::protocol::ErrorCode;
use thiserror::Error;

/// Result alias of the relay.
pub type Result<T, E = RelayError> = std::result::Result<T, E>;

/// Everything that can go wrong in the relay.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The configuration is not acceptable.
    #[error("configuration: {0}")]
    Config(String),
    /// A token was missing, malformed, forged or expired.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A write outside the token's grants.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A change set the relay will not sequence.
    #[error("invalid change set: {0}")]
    InvalidChangeSet(String),
    /// A change set stamped too far ahead of the relay's clock.
    #[error("clock skew: {0}")]
    ClockSkew(String),
    /// The `(origin, origin_seq)` pair names a different change set.
    #[error("origin reused: {0}")]
    OriginReused(String),
    /// Too large.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Storage failed.
    #[error("store: {0}")]
    Store(String),
    /// The store's disk is full or read-only: nothing was stored; it recovers by itself
    /// once space (or write access) returns.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// Ferry core failed.
    #[error(transparent)]
    Core(#[from] ferry_core::Error),
    /// I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The relay is shutting down.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// Compare-and-set failed against the change at `seq`.
    #[error("conflict: {message}")]
    Conflict {
        /// What was changed, where.
        message: String,
        /// The unseen change's position.
        seq: u64,
    },
    /// A lease-guarded change set whose token is not the current grant.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl From<ferry_core::admission::Refusal> for RelayError {
    fn from(r: ferry_core::admission::Refusal) -> Self {
        let m = r.message;
        match r.code {
            ErrorCode::Unauthorized => RelayError::Unauthorized(m),
            ErrorCode::Forbidden => RelayError::Forbidden(m),
            ErrorCode::TooLarge => RelayError::TooLarge(m),
            ErrorCode::ClockSkew => RelayError::ClockSkew(m),
            ErrorCode::OriginReused => RelayError::OriginReused(m),
            ErrorCode::ShuttingDown => RelayError::ShuttingDown,
            ErrorCode::Conflict => RelayError::Conflict {
                message: m,
                seq: r.conflict_seq,
            },
            ErrorCode::Fenced => RelayError::Fenced(m),
            ErrorCode::Internal => RelayError::Store(m),
            // The rule refuses change sets for what they hold; the codes of frames and
            // connections name no change set and are reported as an invalid one.
            ErrorCode::InvalidChangeSet
            | ErrorCode::BadFrame
            | ErrorCode::UnsupportedVersion
            | ErrorCode::RateLimited
            | ErrorCode::IdentityMismatch => RelayError::InvalidChangeSet(m),
        }
    }
}

impl From<rusqlite::Error> for RelayError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::ReadOnly) => {
                RelayError::StorageUnavailable(e.to_string())
            }
            _ => RelayError::Store(e.to_string()),
        }
    }
}

impl From<rmp_serde::encode::Error> for RelayError {
    fn from(e: rmp_serde::encode::Error) -> Self {
        RelayError::Store(format!("encode: {e}"))
    }
}

impl From<rmp_serde::decode::Error> for RelayError {
    fn from(e: rmp_serde::decode::Error) -> Self {
        RelayError::Store(format!("decode: {e}"))
    }
}

impl RelayError {
    /// The protocol code a client sees.
    pub fn code(&self) -> ErrorCode {
        match self {
            RelayError::Unauthorized(_) => ErrorCode::Unauthorized,
            RelayError::Forbidden(_) => ErrorCode::Forbidden,
            RelayError::InvalidChangeSet(_) => ErrorCode::InvalidChangeSet,
            RelayError::ClockSkew(_) => ErrorCode::ClockSkew,
            RelayError::OriginReused(_) => ErrorCode::OriginReused,
            RelayError::TooLarge(_) => ErrorCode::TooLarge,
            RelayError::ShuttingDown => ErrorCode::ShuttingDown,
            RelayError::Conflict { .. } => ErrorCode::Conflict,
            RelayError::Fenced(_) => ErrorCode::Fenced,
            RelayError::Config(_)
            | RelayError::Store(_)
            | RelayError::StorageUnavailable(_)
            | RelayError::Core(_)
            | RelayError::Io(_) => ErrorCode::Internal,
        }
    }

    /// The message a client sees (internal details stay in the relay's log).
    pub fn client_message(&self) -> String {
        if let RelayError::StorageUnavailable(_) = self {
            return "the relay's storage is full or read-only: nothing was stored; try again later"
                .to_owned();
        }
        match self.code() {
            ErrorCode::Internal => "the relay failed; try again later".to_owned(),
            _ => self.to_string(),
        }
    }
}
