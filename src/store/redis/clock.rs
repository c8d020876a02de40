//! The engine's clock: Redis's time, carried forward on this host's
//! monotonic clock.
//!
//! Every expiry is measured on one clock shared by every daemon on the same
//! Redis, so the clock is anchored to Redis's `TIME`. But Redis's `TIME` is
//! its host's wall clock, which an operator or a bad NTP step can move by
//! minutes; if the scripts read it directly, a forward jump would end every
//! hold early and sell units a customer is still paying for. So the daemon
//! reads `TIME` once, follows it on `Instant` (which no wall-clock step
//! moves), and passes the result to each script as its `now`.
//!
//! The Redis watch compares the two every round ([`RedisClock::observe`]):
//! a small difference (rate drift, the anchor's round trip) is slewed away
//! a little per round; a large one is a step of Redis's clock, which is
//! reported in the log and the `holdfast_redis_clock_offset_seconds` gauge
//! and not followed. What this does not cover is written in the README
//! ("Clocks").

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

/// A difference between Redis's clock and ours this large (ms) is a step,
/// not drift, and is not followed.
pub const STEP_MS: i64 = 1000;

/// The most the clock is moved per observation while it slews towards
/// Redis's (at one observation per 200 ms, 5% of real time).
const SLEW_MS: i64 = 10;

/// Redis's clock in milliseconds since the Unix epoch, followed on this
/// host's monotonic clock. Cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct RedisClock {
    start: Instant,
    /// Redis's time at `start`, in ms, as slewed so far.
    base_ms: Arc<AtomicI64>,
}

impl RedisClock {
    /// A clock that read `redis_ms` from Redis at about `at`.
    pub fn anchored(redis_ms: i64, at: Instant) -> Self {
        Self {
            start: at,
            base_ms: Arc::new(AtomicI64::new(redis_ms)),
        }
    }

    /// Now, in ms since the Unix epoch on Redis's timeline.
    pub fn now_ms(&self) -> i64 {
        self.at(Instant::now())
    }

    fn at(&self, instant: Instant) -> i64 {
        let elapsed = instant.saturating_duration_since(self.start).as_millis() as i64;
        self.base_ms.load(Ordering::Relaxed) + elapsed
    }

    /// Compares a fresh reading of Redis's clock (taken at about `at`) with
    /// ours. Drift below [`STEP_MS`] is slewed away by at most 10 ms; a larger
    /// difference is returned as a step (Redis minus ours, ms) and ignored.
    pub fn observe(&self, redis_ms: i64, at: Instant) -> Option<i64> {
        let diff = redis_ms - self.at(at);
        if diff.abs() >= STEP_MS {
            return Some(diff);
        }
        self.base_ms
            .fetch_add(diff.clamp(-SLEW_MS, SLEW_MS), Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn follows_the_monotonic_clock_from_the_anchor() {
        let t0 = Instant::now();
        let clock = RedisClock::anchored(1_000_000, t0);
        assert_eq!(clock.at(t0 + Duration::from_millis(250)), 1_000_250);
    }

    #[test]
    fn slews_small_drift_a_little_per_observation() {
        let t0 = Instant::now();
        let clock = RedisClock::anchored(1_000_000, t0);
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(clock.observe(1_000_200 + 300, t1), None);
        assert_eq!(clock.at(t1), 1_000_210, "moved by the slew bound only");
        assert_eq!(clock.observe(1_000_206, t1), None);
        assert_eq!(
            clock.at(t1),
            1_000_206,
            "a difference under the bound is closed"
        );
    }

    #[test]
    fn a_step_of_redis_clock_is_reported_and_not_followed() {
        let t0 = Instant::now();
        let clock = RedisClock::anchored(1_000_000, t0);
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(clock.observe(1_000_200 + 600_000, t1), Some(600_000));
        assert_eq!(clock.observe(1_000_200 - 5_000, t1), Some(-5_000));
        assert_eq!(clock.at(t1), 1_000_200);
    }
}
