//! Background jobs, each a loop that runs until the stop signal and
//! reports what each round did:
//!
//! - [`drainer`]: reads every tenant's event stream (consumer group) and
//!   writes each event to Postgres exactly once, with its effects.
//! - [`sweeper`]: finalises expired holds (state EXPIRED, event) within the
//!   sweep interval of their expiry, in Redis and in the fallback.
//! - [`refiller`]: grants Redis another chunk of pools running low.
//! - [`redis_watch`]: probes Redis to close the circuit, notices a Redis
//!   that came back empty, keeps the in-doubt gauge current.
//! - [`outbox`]: delivers signed webhooks to satellites, with retries.
//! - [`reconciler`]: pulls satellites' canonical card lists and clears
//!   drift.
//! - [`statistics`]: analyses holdfast's tables soon after a burst of
//!   growth, so that batch statements keep their index plans.

pub mod drainer;
pub mod outbox;
pub mod reconciler;
pub mod redis_watch;
pub mod refiller;
pub mod statistics;
pub mod sweeper;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

use crate::domain::TenantId;
use crate::store::postgres::PgStore;

/// A job's rounds: one every interval (a slow round delays the next rather
/// than causing a burst) until the stop signal.
pub struct Rounds {
    ticker: Interval,
    stop: watch::Receiver<bool>,
}

impl Rounds {
    /// Rounds every `interval`, the first at once.
    pub fn every(interval: Duration, stop: watch::Receiver<bool>) -> Self {
        Self::with(tokio::time::interval(interval), stop)
    }

    /// Rounds every `interval`, the first one interval from now.
    pub fn every_after(interval: Duration, stop: watch::Receiver<bool>) -> Self {
        let first = tokio::time::Instant::now() + interval;
        Self::with(tokio::time::interval_at(first, interval), stop)
    }

    fn with(mut ticker: Interval, stop: watch::Receiver<bool>) -> Self {
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { ticker, stop }
    }

    /// Waits for the next round: false once the daemon is stopping.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => {}
            _ = self.stop.changed() => return false,
        }
        !*self.stop.borrow()
    }
}

/// How often the list of tenants is read again.
const TENANT_REFRESH: Duration = Duration::from_secs(1);

/// The tenants the jobs visit, read from Postgres at most once a second.
/// While Postgres is down the last list is kept, so the Redis-side work
/// (sweeping) goes on.
pub struct Tenants {
    pg: PgStore,
    cached: Mutex<(Vec<TenantId>, Option<Instant>)>,
}

impl Tenants {
    /// A directory over `pg`.
    pub fn new(pg: PgStore) -> Self {
        Self {
            pg,
            cached: Mutex::new((Vec::new(), None)),
        }
    }

    /// The current tenants.
    pub async fn list(&self) -> Vec<TenantId> {
        {
            let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = cached.1
                && at.elapsed() < TENANT_REFRESH
            {
                return cached.0.clone();
            }
        }
        match self.pg.tenants().await {
            Ok(list) => {
                *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
                    (list.clone(), Some(Instant::now()));
                list
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list tenants; using the last list");
                let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
                cached.1 = Some(Instant::now());
                cached.0.clone()
            }
        }
    }
}
