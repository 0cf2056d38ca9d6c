//! Hybrid logical clock: 48 bits of wall-clock milliseconds and a 16-bit counter.
//!
//! Every change set is stamped with an HLC. The clock is advanced on every receive, so a change
//! made after seeing another always carries a larger HLC; last-writer-wins compares
//! `(hlc, origin)`, and therefore never lets an older write beat a newer one it caused.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An HLC timestamp: `millis << 16 | counter`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc(pub u64);

impl Hlc {
    /// Builds a timestamp from parts.
    pub fn new(millis: u64, counter: u16) -> Self {
        Hlc(((millis & 0xFFFF_FFFF_FFFF) << 16) | u64::from(counter))
    }
    /// Wall-clock milliseconds part.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }
    /// Logical counter part.
    pub fn counter(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.millis(), self.counter())
    }
}

/// Source of physical time, replaceable in tests.
pub trait WallClock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_millis(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A replica's physical clock, corrected by what it learnt of the relay's clock: when the
/// device's clock runs ahead of the relay's by more than a second, new timestamps follow the
/// relay's instead, so the relay (which refuses change sets stamped too far in its future)
/// accepts them. A clock that runs behind needs no correction: receiving advances the HLC.
pub struct CorrectedClock {
    inner: std::sync::Arc<dyn WallClock>,
    ahead_ms: std::sync::atomic::AtomicU64,
}

impl CorrectedClock {
    /// Wraps a physical clock with no correction.
    pub fn new(inner: std::sync::Arc<dyn WallClock>) -> Self {
        CorrectedClock {
            inner,
            ahead_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Learns the relay's clock (`relay_ms` read just now); returns how far ahead of it the
    /// local clock is taken to be (0 when it is not ahead by more than a second).
    pub fn learn(&self, relay_ms: u64) -> u64 {
        let local = self.inner.now_millis();
        let ahead = local.saturating_sub(relay_ms);
        let ahead = if ahead > 1000 { ahead } else { 0 };
        self.ahead_ms
            .store(ahead, std::sync::atomic::Ordering::Relaxed);
        ahead
    }
}

impl WallClock for CorrectedClock {
    fn now_millis(&self) -> u64 {
        self.inner
            .now_millis()
            .saturating_sub(self.ahead_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The clock state of one replica.
#[derive(Debug, Clone, Copy, Default)]
pub struct HlcState {
    last: Hlc,
}

impl HlcState {
    /// Resumes from the largest timestamp this replica has issued or seen.
    pub fn resume(last: Hlc) -> Self {
        HlcState { last }
    }

    /// The largest timestamp issued or seen.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event: larger than every one issued or seen.
    pub fn tick(&mut self, wall_millis: u64) -> Hlc {
        let next = if wall_millis > self.last.millis() {
            Hlc::new(wall_millis, 0)
        } else {
            self.bump(self.last)
        };
        self.last = next;
        next
    }

    /// Folds in a received timestamp, so the next `tick` exceeds it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }

    fn bump(&self, from: Hlc) -> Hlc {
        match from.counter().checked_add(1) {
            Some(c) => Hlc::new(from.millis(), c),
            // Counter overflow: borrow a millisecond from the future; still monotonic.
            None => Hlc::new(from.millis() + 1, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_monotonic_even_when_wall_clock_goes_back() {
        let mut c = HlcState::default();
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(1000);
        assert!(a < b && b < d);
        assert_eq!(a, Hlc::new(1000, 0));
        assert_eq!(b, Hlc::new(1000, 1));
    }

    #[test]
    fn observe_moves_clock_past_remote() {
        let mut c = HlcState::default();
        c.tick(10);
        let remote = Hlc::new(5000, 7);
        c.observe(remote);
        let next = c.tick(20);
        assert!(next > remote);
        assert_eq!(next, Hlc::new(5000, 8));
    }

    #[test]
    fn counter_overflow_carries_into_millis() {
        let mut c = HlcState::resume(Hlc::new(7, u16::MAX));
        let n = c.tick(1);
        assert_eq!(n, Hlc::new(8, 0));
        assert!(n > Hlc::new(7, u16::MAX));
    }

    #[test]
    fn parts_roundtrip() {
        let h = Hlc::new(0xABCD_1234_5678, 0x9F);
        assert_eq!(h.millis(), 0xABCD_1234_5678);
        assert_eq!(h.counter(), 0x9F);
    }
}
