//! Token buckets: how a connection is held to a rate without being refused.
//!
//! Above its rate a connection is not closed: the relay stops reading from it (or answering
//! it) until the bucket refills. A well-behaved client never notices; a flooding one slows
//! only itself, since each connection is a task of its own and holds no shared lock while it
//! waits.

use std::time::{Duration, Instant};

/// A bucket of `burst` tokens refilled at `rate` per second.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket. `rate` is per second; both are raised to a minimum that lets one
    /// request through (a zero rate would wait forever).
    pub fn new(rate: f64, burst: f64) -> Bucket {
        let burst = burst.max(1.0);
        Bucket {
            rate: rate.max(1e-3),
            burst,
            level: burst,
            at: Instant::now(),
        }
    }

    /// How long to wait before a token is free (zero when one is), taking it.
    fn wait(&mut self, now: Instant) -> Duration {
        self.level =
            (self.level + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.level -= 1.0;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate)
        }
    }

    /// Takes a token, waiting until one is free.
    pub async fn take(&mut self) {
        let wait = self.wait(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let mut b = Bucket::new(10.0, 3.0);
        let t0 = b.at;
        for _ in 0..3 {
            assert_eq!(b.wait(t0), Duration::ZERO);
        }
        // The 4th waits a tenth of a second, the 5th two tenths (tokens are owed in order).
        assert_eq!(b.wait(t0), Duration::from_millis(100));
        assert_eq!(b.wait(t0), Duration::from_millis(200));
        // A second later the debt is paid and the bucket refills up to its burst only.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(b.wait(later), Duration::ZERO);
        }
        assert!(b.wait(later) > Duration::ZERO);
    }
}
