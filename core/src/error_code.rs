//! The protocol's error codes: what the relay answers a frame or refuses a change set with.
//!
//! A leaf (no imports from the crate), so the crate's error type can carry a code without
//! depending on the protocol module.

use serde::{Deserialize, Serialize};

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded.
    BadFrame,
    /// Protocol version not supported.
    UnsupportedVersion,
    /// Token missing, invalid, forged or expired.
    Unauthorized,
    /// Write outside the token's write scopes or to a read-only table.
    Forbidden,
    /// Frame or change set too large.
    TooLarge,
    /// Too many frames or connections.
    RateLimited,
    /// A change set is invalid (origin, sequence, content, unknown table).
    InvalidChangeSet,
    /// A change set's clock is further ahead of the relay's than it allows.
    ClockSkew,
    /// The origin id is already used by different changes (restored backup).
    OriginReused,
    /// The relay is shutting down; connect again (to it or another node).
    ShuttingDown,
    /// Compare-and-set failed: a change the pusher had not seen (see `conflict_seq`) touched
    /// the same cells of a `server_checked` table or `custom` column since its `base`.
    Conflict,
    /// The change set's fencing token is not the lease's current grant.
    Fenced,
    /// Something failed on the relay.
    Internal,
    /// The hello's replica id belongs to another subject (the `sub` of the token it first
    /// connected with): another user signed in on this replica file, or a forged hello. The
    /// replica takes a new id.
    IdentityMismatch,
}

impl ErrorCode {
    /// The code's wire name (as in `docs/protocol.md`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidChangeSet => "invalid_change_set",
            ErrorCode::ClockSkew => "clock_skew",
            ErrorCode::OriginReused => "origin_reused",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Fenced => "fenced",
            ErrorCode::Internal => "internal",
            ErrorCode::IdentityMismatch => "identity_mismatch",
        }
    }

    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::InvalidChangeSet,
        ErrorCode::ClockSkew,
        ErrorCode::OriginReused,
        ErrorCode::ShuttingDown,
        ErrorCode::Conflict,
        ErrorCode::Fenced,
        ErrorCode::Internal,
        ErrorCode::IdentityMismatch,
    ];

    /// What the code means for the client: the one place that sorts relay codes into the
    /// categories the SDK and the bindings act on.
    pub fn kind(self) -> CodeKind {
        match self {
            ErrorCode::Unauthorized | ErrorCode::Forbidden => CodeKind::Auth,
            ErrorCode::RateLimited | ErrorCode::ShuttingDown | ErrorCode::Internal => {
                CodeKind::Unavailable
            }
            ErrorCode::BadFrame | ErrorCode::UnsupportedVersion => CodeKind::Incompatible,
            ErrorCode::ClockSkew | ErrorCode::OriginReused | ErrorCode::IdentityMismatch => {
                CodeKind::SelfHealing
            }
            ErrorCode::Conflict | ErrorCode::Fenced => CodeKind::Lost,
            ErrorCode::TooLarge | ErrorCode::InvalidChangeSet => CodeKind::Invalid,
        }
    }

    /// The code with wire name `name` ([`ErrorCode::as_str`]).
    pub fn parse(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// The categories of [`ErrorCode`] ([`ErrorCode::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// The token was refused or does not grant the request: a new token is needed.
    Auth,
    /// The relay cannot serve now (busy, restarting, failing): try again later.
    Unavailable,
    /// The relay and this build do not speak the same protocol.
    Incompatible,
    /// The session answers by itself (re-stamps its clock, takes a new replica id).
    SelfHealing,
    /// A change set lost to another writer (compare-and-set, fencing): rolled back.
    Lost,
    /// A change set the relay will never accept as it is (too large, invalid for its schema).
    Invalid,
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_parses_back_from_its_wire_name() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", c.as_str()), "serde agrees");
        }
        assert_eq!(ErrorCode::parse("nonsense"), None);
    }
}
