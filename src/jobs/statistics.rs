//! The statistics keeper: analyses holdfast's tables soon after they grow,
//! so that batch statements keep their index plans
//! (store/postgres/statistics.rs says why autovacuum alone is too late).

use std::time::Duration;

use tokio::sync::watch;

use super::Rounds;
use crate::store::postgres::PgStore;

/// How often the tables' sizes are read: one catalog query.
const INTERVAL: Duration = Duration::from_secs(2);

/// Runs until `stop` turns true.
pub async fn run(pg: PgStore, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every(INTERVAL, stop);
    while rounds.next().await {
        match pg.refresh_statistics().await {
            Ok(tables) if tables.is_empty() => {}
            Ok(tables) => tracing::debug!(?tables, "refreshed the planner's statistics"),
            Err(e) => {
                tracing::debug!(error = %e, "cannot refresh the planner's statistics; will retry");
            }
        }
    }
}
