//! The relay's wall clock.
//!
//! Connections read time through a [`RelayClock`] (the welcome's time, the clock-skew bound)
//! so a simulation can run the relay on a clock of its own; the stores judge lease expiry by
//! [`now_ms`] (the SQLite store) or the database's clock (PostgreSQL).

use std::sync::Arc;

/// A wall clock in milliseconds since the epoch.
pub type RelayClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock in milliseconds since the epoch (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
