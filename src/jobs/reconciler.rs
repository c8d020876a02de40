//! The reconciler: every interval, pulls each satellite's canonical list
//! of active cards and reconciles its channel with it (stale rows cleared,
//! drift recorded). A satellite that cannot be reached is skipped until the
//! next round; its rows are left as they are.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Rounds;

use crate::domain::{ChannelSlug, TenantId};
use crate::services::channels::Channels;

/// Runs until `stop` turns true; the first round is one interval after
/// start.
pub async fn run(channels: Arc<Channels>, interval: Duration, stop: watch::Receiver<bool>) {
    let mut rounds = Rounds::every_after(interval, stop);
    while rounds.next().await {
        round(&channels).await;
    }
    tracing::debug!("reconciler stopped");
}

async fn round(channels: &Channels) {
    let satellites = match channels.all_satellites().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list satellites; reconcile skipped");
            return;
        }
    };
    for sat in satellites {
        let (Ok(ws), slug) = (
            TenantId::parse(&sat.workspace),
            ChannelSlug::from_store(sat.channel.clone()),
        ) else {
            continue;
        };
        match channels.reconcile(&ws, &slug, None).await {
            Ok(drift) => tracing::info!(workspace = %ws, channel = %slug,
                cleared = drift.missing_on_satellite.len(),
                unknown = drift.unknown_to_holdfast.len(), "reconciled with satellite"),
            Err(e) => {
                tracing::warn!(workspace = %ws, channel = %slug, error = %e, "reconcile failed; will retry next round")
            }
        }
    }
}
