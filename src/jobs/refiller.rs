//! The refiller: grants Redis another chunk of each pool a script flagged
//! as running low, ahead of need, so takes rarely wait for a grant; and
//! once a second brings Redis up to date on pools marked for a resync that
//! no sync has covered yet (units the Postgres fallback gave back, a
//! capacity change whose own sync failed). The fallback's sweeper asks for
//! the same at once after it gives units back (`sweeper::run_fallback`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Rounds, Tenants};
use crate::domain::{PoolId, TenantId};
use crate::engine::Engine;
use crate::store::redis::Watcher;

/// How often flagged pools are looked at.
const INTERVAL: Duration = Duration::from_millis(50);
/// Every this many rounds (1 s) the refiller looks at every tenant's
/// flags; in between only at the tenants this daemon sent operations for
/// since its last round, whose takes are what flag a pool here. Another
/// daemon's takes are its own refiller's; a flag left by a daemon that
/// stopped waits a second at most, and a take that finds its pool dry asks
/// for a grant itself. Looking at every tenant every round was 20 SPOPs a
/// second per tenant, half of what 10,000 idle shops cost
/// (deploy/BENCHMARKS.md, "idle tenants").
const EVERY_TENANT_EVERY: u32 = 20;

/// Runs until `stop` turns true.
pub async fn run(engine: Arc<Engine>, tenants: Arc<Tenants>, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every(INTERVAL, stop);
    let mut round: u32 = 0;
    while rounds.next().await {
        round = round.wrapping_add(1);
        let touched = engine.redis().tenants_touched(Watcher::Refiller);
        if !engine.circuit().closed() {
            continue;
        }
        let looked_at = if round.is_multiple_of(EVERY_TENANT_EVERY) {
            tenants.list().await
        } else {
            touched
        };
        let flagged = match engine.redis().pop_refills(&looked_at, 100).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read refill flags");
                continue;
            }
        };
        for (tenant, pools) in flagged {
            if let Err(e) = engine.sync(&tenant, &pools).await {
                tracing::warn!(%tenant, error = %e, "refill failed; the next take that runs dry asks again");
            }
        }
        if round.is_multiple_of(EVERY_TENANT_EVERY) {
            resync_marked(&engine).await;
        }
    }
}

/// Most marked pools one round brings up to date.
const RESYNC_BATCH: i64 = 500;

/// Brings Redis up to date on the pools whose units the fallback gave
/// back, or whose capacity changed (migrations/0012_pools_resync_seq.sql):
/// Redis may still say such a pool is full, and a full pool answers sold
/// out without asking for a grant, so those units would otherwise stay
/// blocked for good. Once a second; a pool's mark is cleared only once its
/// sync ran, so one that fails, or a daemon that stops mid-way, leaves it
/// for the next round (of any daemon).
pub(super) async fn resync_marked(engine: &Engine) {
    let marked = match engine.pg().marked_for_resync(RESYNC_BATCH).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the pools to resync");
            return;
        }
    };
    let mut by_tenant: BTreeMap<TenantId, Vec<PoolId>> = BTreeMap::new();
    for (tenant, pool) in marked {
        by_tenant.entry(tenant).or_default().push(pool);
    }
    for (tenant, pools) in by_tenant {
        // The sync records each mark it covered (`sync_pass`).
        if let Err(e) = engine.sync(&tenant, &pools).await {
            tracing::warn!(%tenant, error = %e, "cannot bring redis up to date on pools marked for a resync; trying again next round");
        }
    }
}
