//! Merge policies in one room: everything that depends on a column's policy is answered
//! here, so adding a policy is a new variant and the arms of the methods below (the compiler
//! lists them), not a search through capture, materialize, merge, validation, the relay's
//! compare-and-set and compaction.
//!
//! Two shapes of write exist. A **value** policy (`lww`, `custom`) captures the new value,
//! sends it as `Cell::Set`, and merges by last writer on `(hlc, origin)`. An **additive**
//! policy (`counter`) captures the difference, sends it as `Cell::Add`, merges by summing
//! (additions commute: never a conflict), and compaction keeps every addition. Which cell
//! shape a policy takes is `Cell::fits` and `Cell::whole` (in `changeset`, beside `Cell`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// How concurrent writes to one column merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Last writer wins on `(hlc, origin)`.
    #[default]
    Lww,
    /// Integer deltas add up; concurrent increments are never lost.
    Counter,
    /// Merged as `lww` everywhere; the app's resolver runs on the device whose pending write
    /// met a concurrent one and its answer is written as a new change.
    Custom,
}

impl FromStr for Policy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lww" => Ok(Policy::Lww),
            "counter" => Ok(Policy::Counter),
            "custom" => Ok(Policy::Custom),
            _ => Err(Error::UnknownName {
                kind: "merge policy",
                name: s.to_owned(),
                expected: "lww, counter, custom",
            }),
        }
    }
}

impl Policy {
    /// The policy's name as written in declarations.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Lww => "lww",
            Policy::Counter => "counter",
            Policy::Custom => "custom",
        }
    }
}

impl Policy {
    /// Writes are additions (captured as a difference, sent as `Cell::Add`, summed on merge,
    /// never in conflict, never compacted away) rather than values.
    pub fn is_additive(self) -> bool {
        match self {
            Policy::Counter => true,
            Policy::Lww | Policy::Custom => false,
        }
    }

    /// Concurrent writes are handed to the app's resolver (after the built-in last-writer
    /// pick every replica makes), and a refused write is rebased rather than rolled back.
    pub fn resolved_by_app(self) -> bool {
        match self {
            Policy::Custom => true,
            Policy::Lww | Policy::Counter => false,
        }
    }

    /// The relay tracks writes to such a cell for compare-and-set, in a `server_checked`
    /// table or not.
    pub fn checked_by_relay(self, server_checked_table: bool) -> bool {
        !self.is_additive() && (server_checked_table || self.resolved_by_app())
    }
}
