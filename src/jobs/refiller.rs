//! The refiller: grants Redis another chunk of each pool a script flagged
//! as running low, ahead of need, so takes rarely wait for a grant.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Rounds, Tenants};
use crate::engine::Engine;

/// How often flagged pools are looked at.
const INTERVAL: Duration = Duration::from_millis(50);

/// Runs until `stop` turns true.
pub async fn run(engine: Arc<Engine>, tenants: Arc<Tenants>, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every(INTERVAL, stop);
    while rounds.next().await {
        if !engine.circuit().closed() {
            continue;
        }
        let flagged = match engine.redis().pop_refills(&tenants.list().await, 100).await {
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
    }
}
