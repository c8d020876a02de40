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

/// The fallback's holds are swept every this many rounds (they are rare,
/// and a Postgres round trip per tenant is not free).
const FALLBACK_EVERY: u32 = 4;

/// Runs until `stop` turns true.
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
        for tenant in tenants.list().await {
            if engine.circuit().closed() {
                sweep_redis(&engine, &tenant).await;
            }
            if round.is_multiple_of(FALLBACK_EVERY)
                && let Err(e) = engine.pg().fallback_sweep(&tenant).await
            {
                tracing::debug!(%tenant, error = %e, "fallback sweep failed; will retry");
            }
        }
    }
    tracing::debug!("sweeper stopped");
}

async fn sweep_redis(engine: &Engine, tenant: &TenantId) {
    if let Err(e) = engine.finish_due(tenant, false).await {
        tracing::warn!(%tenant, error = %e, "sweep failed; will retry");
    }
}
