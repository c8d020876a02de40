//! The sweeper: finalises expired holds.
//!
//! Scripts (and fallback transactions) already treat an expired hold as
//! absent at every instant, so the sweeper is not what keeps expired holds
//! from blocking sales; it makes their end visible (state EXPIRED, the
//! `expired` event, the audit row) within one sweep interval even when no
//! call touches the tenant.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Rounds, Tenants};
use crate::domain::TenantId;
use crate::engine::Engine;

/// The fallback's due holds are looked for every this many rounds (they
/// are rare).
const FALLBACK_EVERY: u32 = 4;
/// The expiry index from before buckets (a Redis an older build wrote) is
/// looked for every this many rounds: it holds what was active at the
/// upgrade, and once swept it is gone.
const OLD_INDEX_EVERY: u32 = 10;

/// Runs until `stop` turns true. Each round asks each store once which
/// tenants have holds due, and sweeps only those: a sweep per tenant per
/// round made a thousand idle shops cost the machine's two cores
/// (deploy/BENCHMARKS.md, "idle tenants").
pub async fn run(
    engine: Arc<Engine>,
    tenants: Arc<Tenants>,
    interval: Duration,
    stop: watch::Receiver<bool>,
) {
    let mut rounds = Rounds::every(interval, stop);
    let mut round: u32 = 0;
    while rounds.next().await {
        round = round.wrapping_add(1);
        if engine.circuit().closed() {
            let old_index = round.is_multiple_of(OLD_INDEX_EVERY);
            match engine
                .redis()
                .tenants_due(&tenants.list().await, old_index)
                .await
            {
                Ok(due) => {
                    for tenant in due {
                        sweep_redis(&engine, &tenant).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read which tenants have holds due; will retry")
                }
            }
        }
        if round.is_multiple_of(FALLBACK_EVERY) {
            sweep_fallback(&engine).await;
        }
    }
    tracing::debug!("sweeper stopped");
}

async fn sweep_redis(engine: &Engine, tenant: &TenantId) {
    if let Err(e) = engine.finish_due(tenant, false).await {
        tracing::warn!(%tenant, error = %e, "sweep failed; will retry");
    }
}

async fn sweep_fallback(engine: &Engine) {
    let due = match engine.pg().fallback_tenants_due().await {
        Ok(due) => due,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read which tenants have fallback holds due; will retry");
            return;
        }
    };
    for tenant in due {
        if let Err(e) = engine.pg().fallback_sweep(&tenant).await {
            tracing::debug!(%tenant, error = %e, "fallback sweep failed; will retry");
        }
    }
}
