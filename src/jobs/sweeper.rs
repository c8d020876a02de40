//! The sweeper: finalises expired holds.
//!
//! Scripts already treat an expired hold as absent at every instant, so the
//! sweeper is not what keeps expired holds from blocking sales; it makes
//! their end visible (state EXPIRED, the `expired` event, the audit row)
//! within one sweep interval even when no call touches the tenant.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Tenants;
use crate::store::redis::RedisStore;
use crate::telemetry::metric;

/// Most holds one script call finalises, so a burst of expiries never
/// blocks Redis for long; the sweeper calls again while more are due.
const BATCH: u32 = 500;

/// Runs until `stop` turns true.
pub async fn run(
    redis: RedisStore,
    tenants: Arc<Tenants>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        for tenant in tenants.list().await {
            loop {
                match redis.sweep(&tenant, BATCH).await {
                    Ok((finalised, left, lag_ms)) => {
                        if finalised > 0 {
                            metrics::counter!(metric::ENGINE_OUTCOMES, "job" => "any", "outcome" => "expired").increment(finalised.unsigned_abs());
                            metrics::histogram!(metric::SWEEPER_LAG_SECONDS)
                                .record(lag_ms as f64 / 1000.0);
                        }
                        if left == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%tenant, error = %e, "sweep failed; will retry");
                        break;
                    }
                }
            }
        }
    }
    tracing::debug!("sweeper stopped");
}
