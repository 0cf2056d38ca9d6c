//! Numbers at the FFI. Apps in Kotlin, Swift and Python count with signed integers (Kotlin's
//! `ULong` does not mix with `Long`, Swift's `UInt64` not with `Int`), so every count,
//! position, token and duration crosses as `i64`, versions and limits as `i32`. Outward
//! values above `i64::MAX` do not occur (relay positions, counters and fencing tokens stay
//! below 2^63, `docs/protocol.md`) and saturate rather than wrap; inward values are checked:
//! a negative duration, limit or version is `InvalidInput` naming the argument.

use crate::error::{FerryError, Result};
use std::time::Duration;

/// An unsigned count or position as the bindings' `Long`.
pub(crate) trait Signed {
    /// The value, saturating at `i64::MAX`.
    fn signed(self) -> i64;
}

impl Signed for u64 {
    fn signed(self) -> i64 {
        i64::try_from(self).unwrap_or(i64::MAX)
    }
}

impl Signed for usize {
    fn signed(self) -> i64 {
        i64::try_from(self).unwrap_or(i64::MAX)
    }
}

/// `v` as an unsigned value, or `InvalidInput` naming `what` when it is negative.
pub(crate) fn unsigned(what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| FerryError::InvalidInput {
        reason: format!("{what} must not be negative, got {v}"),
    })
}

/// `v` as a 32-bit unsigned value (versions, limits), or `InvalidInput` naming `what`.
pub(crate) fn unsigned32(what: &str, v: i32) -> Result<u32> {
    u32::try_from(v).map_err(|_| FerryError::InvalidInput {
        reason: format!("{what} must not be negative, got {v}"),
    })
}

/// `ms` milliseconds as a duration, or `InvalidInput` naming `what` when negative.
pub(crate) fn millis(what: &str, ms: i64) -> Result<Duration> {
    Ok(Duration::from_millis(unsigned(what, ms)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outward_values_saturate_and_inward_negatives_are_named() {
        assert_eq!(7u64.signed(), 7);
        assert_eq!(u64::MAX.signed(), i64::MAX);
        assert_eq!(unsigned("ttl_ms", 5).ok(), Some(5));
        match millis("ttl_ms", -1) {
            Err(FerryError::InvalidInput { reason }) => {
                assert!(reason.contains("ttl_ms"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            unsigned32("version", -3),
            Err(FerryError::InvalidInput { .. })
        ));
        assert_eq!(unsigned32("version", 3).ok(), Some(3));
    }
}
