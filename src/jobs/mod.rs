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

use std::sync::{Arc, Mutex};
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

/// The tenants the jobs visit, read from Postgres at most once a second,
/// in the background once there is a list: a job never waits on Postgres
/// for it, so the Redis-side work (sweeping) goes on at its pace while
/// Postgres is slow or away (each read then waits out the pool's 5 s), with
/// the last list.
pub struct Tenants {
    pg: PgStore,
    cached: Arc<Mutex<Cached>>,
}

/// The last list, when it was read (or last tried), and whether a read is
/// under way.
#[derive(Default)]
struct Cached {
    list: Vec<TenantId>,
    at: Option<Instant>,
    reading: bool,
}

impl Tenants {
    /// A directory over `pg`.
    pub fn new(pg: PgStore) -> Self {
        Self {
            pg,
            cached: Arc::default(),
        }
    }

    /// The current tenants: the first call reads them; later ones answer
    /// the last list and, once a second, start reading it again.
    pub async fn list(&self) -> Vec<TenantId> {
        let first = {
            let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            match cached.at {
                Some(at) if at.elapsed() < TENANT_REFRESH || cached.reading => {
                    return cached.list.clone();
                }
                Some(_) => {
                    cached.reading = true;
                    false
                }
                None => true,
            }
        };
        let read = refresh(self.pg.clone(), self.cached.clone());
        if first {
            read.await;
        } else {
            tokio::spawn(read);
        }
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .clone()
    }
}

/// Reads the tenants into `cached`; on failure keeps the last list (tried
/// again a second later).
async fn refresh(pg: PgStore, cached: Arc<Mutex<Cached>>) {
    let read = pg.tenants().await;
    let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
    match read {
        Ok(list) => cached.list = list,
        Err(e) => tracing::warn!(error = %e, "cannot list tenants; using the last list"),
    }
    cached.at = Some(Instant::now());
    cached.reading = false;
}
