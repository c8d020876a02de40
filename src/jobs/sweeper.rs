//! The sweeper: finalises expired holds.
//!
//! Scripts (and fallback transactions) already treat an expired hold as
//! absent at every instant, and give back the units of each expiry bucket
//! as it ends, so the sweeper is not what keeps expired holds from
//! blocking sales; it gives back buckets no call came for, and makes each
//! hold's end visible (state EXPIRED, the `expired` event, the audit row)
//! within one sweep interval even when no call touches the tenant, or,
//! after a burst of expiries, at `--expired-states-per-sec`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Rounds, Tenants};
use crate::domain::TenantId;
use crate::engine::Engine;
use crate::store::redis::Watcher;

/// Every this many rounds (half a second at the default interval, so a
/// hold another daemon made is still found within the second the promise
/// gives) the sweeper looks at every tenant's expiry index, and for an
/// older build's indexes (by bucket, and from before buckets), whose
/// holds are thus ended within that half second too. In between it
/// looks only at the tenants that had holds in the index last time, and
/// those this daemon sent operations for since (the only way a hold is
/// made here). Another daemon's holds are its own sweeper's to find each
/// round; one a stopped daemon left is found within this many rounds.
const EVERY_TENANT_EVERY: u32 = 5;

/// Runs until `stop` turns true. Each round asks Redis once which of the
/// tenants it looks at have holds due, and sweeps only those. A sweep per
/// tenant per round made a thousand idle shops cost the machine's two
/// cores, and looking at each tenant's index every round was half of what
/// ten thousand cost (deploy/BENCHMARKS.md, "idle tenants"). The
/// fallback's holds have a loop of their own ([`run_fallback`]), so that a
/// Postgres that hangs does not hold up Redis's.
///
/// Each round writes the EXPIRED state of at most `states_per_round`
/// holds per tenant whose units went back with their expiry bucket
/// ([`Engine::finish_due`]).
pub async fn run(
    engine: Arc<Engine>,
    tenants: Arc<Tenants>,
    interval: Duration,
    states_per_round: i64,
    stop: watch::Receiver<bool>,
) {
    let mut rounds = Rounds::every(interval, stop);
    let mut round: u32 = 0;
    // Tenants that had holds in the expiry index when last looked at.
    let mut holding: HashSet<TenantId> = HashSet::new();
    while rounds.next().await {
        round = round.wrapping_add(1);
        let touched = engine.redis().tenants_touched(Watcher::Sweeper);
        if engine.circuit().closed() {
            let everyone = round.is_multiple_of(EVERY_TENANT_EVERY);
            let looked_at: Vec<TenantId> = if everyone {
                tenants.list().await
            } else {
                let mut some = touched;
                some.retain(|t| !holding.contains(t));
                some.extend(holding.iter().cloned());
                some
            };
            match engine.redis().expiry_index(&looked_at, everyone).await {
                Ok(indexed) => {
                    for t in &looked_at {
                        holding.remove(t);
                    }
                    for i in indexed {
                        if i.due {
                            sweep_redis(&engine, &i.tenant, states_per_round).await;
                        }
                        holding.insert(i.tenant);
                    }
                }
                Err(e) => {
                    // Looked at again next round, with the holding ones.
                    holding.extend(looked_at);
                    tracing::warn!(error = %e, "cannot read which tenants have holds due; will retry");
                }
            }
        } else {
            // Not lost while Redis is away: looked at once it is back.
            holding.extend(touched);
        }
    }
    tracing::debug!("sweeper stopped");
}

/// The fallback's sweeper, until `stop`: each round asks Postgres once
/// which tenants have fallback holds due, and ends those (their units go
/// back to their pools). Redis may have been told such a pool is full, so
/// while Redis serves, the pools marked by the give-back are brought up to
/// date at once, rather than at the refiller's next look (while it is
/// away, each sync would wait out the Redis timeout, and the marks wait).
pub async fn run_fallback(engine: Arc<Engine>, interval: Duration, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every(interval, stop);
    while rounds.next().await {
        if sweep_fallback(&engine).await > 0 && engine.circuit().closed() {
            super::refiller::resync_marked(&engine).await;
        }
    }
    tracing::debug!("fallback sweeper stopped");
}

async fn sweep_redis(engine: &Engine, tenant: &TenantId, states: i64) {
    if let Err(e) = engine.finish_due(tenant, Some(states)).await {
        tracing::warn!(%tenant, error = %e, "sweep failed; will retry");
    }
}

/// Ends the fallback's due holds; returns how many.
async fn sweep_fallback(engine: &Engine) -> usize {
    let due = match engine.pg().fallback_tenants_due().await {
        Ok(due) => due,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read which tenants have fallback holds due; will retry");
            return 0;
        }
    };
    let mut ended = 0;
    for tenant in due {
        match engine.pg().fallback_sweep(&tenant).await {
            Ok(n) => ended += n,
            Err(e) => {
                tracing::debug!(%tenant, error = %e, "fallback sweep failed; will retry");
            }
        }
    }
    ended
}
