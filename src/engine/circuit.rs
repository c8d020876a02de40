//! The circuit breaker in front of Redis: after a few failures in a row
//! (errors or timeouts), calls stop going to Redis and the engine serves
//! from the Postgres fallback; the Redis watch job closes it again when
//! Redis answers. Its state is a metric and every change is logged.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crate::telemetry::metric;

/// Consecutive Redis failures that open the circuit.
const THRESHOLD: u32 = 2;

/// Closed (Redis serves) or open (the fallback serves).
#[derive(Debug, Default)]
pub struct Circuit {
    failures: AtomicU32,
    opened_at: Mutex<Option<Instant>>,
}

impl Circuit {
    /// True while requests should go to Redis.
    pub fn closed(&self) -> bool {
        self.opened_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// A Redis call succeeded.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A Redis call failed; opens the circuit at the threshold.
    pub fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= THRESHOLD {
            self.open("Redis is failing");
        }
    }

    /// Opens the circuit now, for `why`: Redis answers, but must not be
    /// served from until a check is done (it came back with data that may
    /// be older: src/jobs/redis_watch.rs). The watch closes it after.
    pub fn open(&self, why: &str) {
        let mut opened = self.opened_at.lock().unwrap_or_else(|e| e.into_inner());
        if opened.is_none() {
            *opened = Some(Instant::now());
            metrics::gauge!(metric::CIRCUIT_OPEN).set(1.0);
            tracing::error!("{why}: circuit open, serving from the Postgres fallback");
        }
    }

    /// Redis answers again: close the circuit.
    pub fn close(&self) {
        self.failures.store(0, Ordering::Relaxed);
        let mut opened = self.opened_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = opened.take() {
            metrics::gauge!(metric::CIRCUIT_OPEN).set(0.0);
            tracing::warn!(open_for = ?at.elapsed(), "Redis answers again: circuit closed, serving from Redis");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_circuit_opens_after_consecutive_failures_and_closes_on_demand() {
        let c = Circuit::default();
        assert!(c.closed());
        c.failure();
        c.success();
        c.failure();
        assert!(c.closed(), "a success in between resets the count");
        c.failure();
        assert!(!c.closed());
        c.close();
        assert!(c.closed());
        c.open("a check is due");
        assert!(!c.closed(), "opened at once, without failures");
        c.close();
        assert!(c.closed());
    }
}
