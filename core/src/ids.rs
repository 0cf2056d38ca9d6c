//! Identifiers: replica ids and ULID generation for application primary keys.
//!
//! A replica id is a ULID made when the replica file is created and never reused; it is the
//! `origin` of every change set the replica writes and the tie-breaker of last-writer-wins.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The 16-byte identity of a replica (a ULID).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub [u8; 16]);

impl ReplicaId {
    /// A fresh random replica id.
    pub fn generate() -> Self {
        ReplicaId(ulid::Ulid::generate().to_bytes())
    }

    /// Builds one from stored bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(b).ok().map(ReplicaId)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", ulid::Ulid::from_bytes(self.0))
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({self})")
    }
}

impl std::str::FromStr for ReplicaId {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(|u| ReplicaId(u.to_bytes()))
            .map_err(|e| crate::Error::InvalidInput(format!("replica id `{s}` is not a ULID: {e}")))
    }
}

/// A new ULID as its 26-character text form, for use as a globally unique primary key.
pub fn new_id() -> String {
    ulid::Ulid::generate().to_string()
}

/// The id of one local change set (a ULID), to follow its fate at the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeId(pub [u8; 16]);

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", ulid::Ulid::from_bytes(self.0))
    }
}

impl std::str::FromStr for ChangeId {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(|u| ChangeId(u.to_bytes()))
            .map_err(|e| {
                crate::error::Error::InvalidInput(format!("`{s}` is not a change id: {e}"))
            })
    }
}
