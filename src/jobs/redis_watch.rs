//! The Redis watch: while the circuit is open, probes Redis and closes the
//! circuit when it answers; every round it checks the marker key that tells
//! whether Redis came back empty, restarted or was replaced, and if so checks every
//! pool's grant, so lost grants are counted in doubt at once rather than
//! when a pool is next used. It also compares Redis's clock with the
//! engine's (store/redis/clock.rs), and keeps the in-doubt gauge current.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Rounds;

use crate::engine::Engine;
use crate::telemetry::metric;

/// How often Redis is probed.
const INTERVAL: Duration = Duration::from_millis(200);
/// How often the in-doubt gauge is refreshed from Postgres.
const GAUGE_EVERY: Duration = Duration::from_secs(2);

/// Checks every pool's grant against Redis after `check_marker` found
/// the marker not naming Redis process `run_id` (new, come back empty, or
/// restarted, perhaps with older data), writes back the ended holds it
/// lost (`Engine::restore_lost_takes`), then leaves the marker for it. On
/// failure the marker stays as it was, so that the next check retries. The
/// daemon runs a first check before it serves (src/startup.rs), then this
/// job every round.
pub async fn recover(engine: &Engine, run_id: &str) -> Result<(), crate::error::Error> {
    let started = Instant::now();
    let checked = async {
        let pools = engine.recover_pools().await?;
        let restored = engine.restore_lost_takes().await?;
        engine.redis().leave_marker(run_id).await?;
        Ok::<_, crate::error::Error>((pools, restored))
    }
    .await;
    match checked {
        Ok((pools, restored)) => {
            tracing::info!(
                pools,
                restored,
                run_id,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Redis is new, emptied or restarted: checked every pool's grant and wrote back the ended holds it lost"
            );
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check pools after Redis came back; will retry");
            Err(e)
        }
    }
}

/// Runs until `stop` turns true.
pub async fn run(engine: Arc<Engine>, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every(INTERVAL, stop);
    let mut gauge_at = Instant::now() - GAUGE_EVERY;
    let mut step_ms: Option<i64> = None;
    while rounds.next().await {
        match engine.redis().check_marker().await {
            Ok(unchecked) => {
                if let Some(run_id) = unchecked {
                    // Redis may be back with older counts: nothing is sold
                    // from them until every pool is checked. A check that
                    // fails (Postgres down) leaves the circuit open.
                    engine.circuit().open("Redis is new, emptied or restarted");
                    if recover(&engine, &run_id).await.is_err() {
                        continue;
                    }
                }
                engine.circuit().close();
                if let Ok(step) = engine.redis().observe_clock().await {
                    report_step(step_ms, step);
                    step_ms = step;
                }
            }
            Err(e) => {
                if engine.circuit().closed() {
                    tracing::warn!(error = %e, "Redis probe failed");
                }
                engine.circuit().failure();
            }
        }
        if gauge_at.elapsed() >= GAUGE_EVERY {
            gauge_at = Instant::now();
            if let Ok(n) = engine.pg().total_in_doubt().await {
                metrics::gauge!(metric::IN_DOUBT_UNITS).set(n as f64);
            }
        }
    }
}

/// Logs a step of Redis's clock when it is first seen (or moves again) and
/// when it ends, and keeps the offset gauge current.
fn report_step(before: Option<i64>, now: Option<i64>) {
    let seconds = now.unwrap_or(0) as f64 / 1000.0;
    metrics::gauge!(metric::REDIS_CLOCK_OFFSET).set(seconds);
    let moved = match (before, now) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => (a - b).abs() >= crate::store::redis::STEP_MS,
        _ => false,
    };
    if moved {
        tracing::warn!(
            offset_seconds = seconds,
            "Redis's clock was stepped; holdfast keeps its own (holds end on time, not early). \
             Fix the Redis host's clock (NTP) and restart holdfast to re-anchor"
        );
    } else if before.is_some() && now.is_none() {
        tracing::info!("Redis's clock agrees with holdfast's again");
    }
}
