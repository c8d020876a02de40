//! The drainer: every tenant's event stream to Postgres, exactly once.
//!
//! It reads with a consumer group, writes a batch in one Postgres
//! transaction (each event keyed by its stream id, so a re-read event is
//! skipped with its effects), and acknowledges the batch only after the
//! commit. After a failure or a restart it first re-reads what it had read
//! and not acknowledged. Postgres being down only makes it wait and retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::watch;

use super::Tenants;
use crate::domain::{HoldId, HoldState, Job, TenantId};
use crate::error::Error;
use crate::store::HoldReply;
use crate::store::postgres::{PgStore, Twin};
use crate::store::redis::{RedisStore, decode_event};
use crate::telemetry::metric;

/// The consumer group's name.
pub const GROUP: &str = "drainer";
/// Most events per read.
const BATCH: usize = 500;
/// How long one read blocks waiting for events.
const BLOCK: Duration = Duration::from_millis(100);
/// The longest one read-and-write round may take.
const ROUND_LIMIT: Duration = Duration::from_secs(5);
/// How long drained events stay in the stream (for subscribers that
/// resume from an id).
const KEEP: Duration = Duration::from_secs(3600);
/// How often the backlog gauge is sampled (XINFO per tenant stream).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop` turns true.
pub async fn run(
    redis: RedisStore,
    pg: PgStore,
    tenants: Arc<Tenants>,
    consumer: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut drainer = Drainer {
        redis,
        pg,
        consumer,
        grouped: HashMap::new(),
        pending_first: true,
        lag_sampled: std::time::Instant::now() - LAG_EVERY,
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            break;
        }
        let list = tenants.list().await;
        // Bounded: a round stuck on a frozen Redis is abandoned (its events
        // stay pending and are read again).
        let round = tokio::select! {
            r = tokio::time::timeout(ROUND_LIMIT, drainer.round(&list)) => {
                r.unwrap_or_else(|_| Err(Error::RedisUnavailable("drainer round timed out".into())))
            }
            _ = stop.changed() => break,
        };
        match round {
            Ok(_) => backoff = Duration::from_millis(50),
            Err(e) => {
                metrics::counter!(metric::DRAINER_ERRORS).increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "drainer round failed; events stay pending and will be retried");
                drainer.pending_first = true;
                // A Redis that lost its data lost the consumer groups too:
                // create them again (creating an existing one is harmless).
                drainer.grouped.clear();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        if list.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(BLOCK) => {}
                _ = stop.changed() => break,
            }
        }
    }
    tracing::debug!("drainer stopped");
}

struct Drainer {
    redis: RedisStore,
    pg: PgStore,
    consumer: String,
    /// Streams whose consumer group exists, by key, with their tenant.
    grouped: HashMap<String, TenantId>,
    /// Re-read our unacknowledged events before new ones.
    pending_first: bool,
    /// When the lag gauge was last sampled.
    lag_sampled: std::time::Instant,
}

impl Drainer {
    /// One read and write; returns how many events were new to Postgres.
    async fn round(&mut self, tenants: &[TenantId]) -> Result<usize, Error> {
        if tenants.is_empty() {
            return Ok(0);
        }
        let mut con = self.redis.pooled().await?;
        for t in tenants {
            let key = self.redis.keys().events(t);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.grouped.entry(key) {
                let created: redis::RedisResult<()> =
                    con.xgroup_create_mkstream(slot.key(), GROUP, "0").await;
                match created {
                    Ok(()) => {}
                    Err(e) if e.code() == Some("BUSYGROUP") => {}
                    Err(e) => return Err(e.into()),
                }
                slot.insert(t.clone());
            }
        }
        let keys: Vec<String> = tenants
            .iter()
            .map(|t| self.redis.keys().events(t))
            .collect();
        let start = if self.pending_first { "0" } else { ">" };
        let ids: Vec<&str> = vec![start; keys.len()];
        let mut opts = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(BATCH);
        if !self.pending_first {
            opts = opts.block(BLOCK.as_millis() as usize);
        }
        let reply: Option<StreamReadReply> = con.xread_options(&keys, &ids, &opts).await?;
        let mut new = 0;
        let mut read = 0;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(tenant) = self.grouped.get(&stream.key).cloned() else {
                continue;
            };
            if stream.ids.is_empty() {
                continue;
            }
            read += stream.ids.len();
            let events = stream
                .ids
                .iter()
                .map(decode_event)
                .collect::<Result<Vec<_>, _>>()?;
            let (recorded, twins) = self.pg.record_events(&tenant, &events).await?;
            new += recorded;
            for (hold_id, job, twin) in twins {
                self.settle_twin(&tenant, &hold_id, &job, twin).await?;
            }
            let acked: Vec<&str> = stream.ids.iter().map(|e| e.id.as_str()).collect();
            let _: i64 = con.xack(&stream.key, GROUP, &acked).await?;
            if let Some(last) = events.last() {
                let age = (Utc::now() - last.at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::gauge!(metric::DRAINER_LAG_SECONDS).set(age);
                let keep_from = last.at.timestamp_millis() - KEEP.as_millis() as i64;
                if keep_from > 0 {
                    let _: redis::RedisResult<i64> = redis::cmd("XTRIM")
                        .arg(&stream.key)
                        .arg("MINID")
                        .arg("~")
                        .arg(keep_from)
                        .query_async(&mut *con)
                        .await;
                }
            }
        }
        metrics::counter!(metric::DRAINED_EVENTS).increment(new as u64);
        if self.lag_sampled.elapsed() >= LAG_EVERY {
            self.lag_sampled = std::time::Instant::now();
            let mut backlog = 0;
            for key in &keys {
                backlog += backlog_of(&mut con, key).await;
            }
            metrics::gauge!(metric::DRAINER_LAG_EVENTS).set(backlog as f64);
        }
        if self.pending_first && read == 0 {
            self.pending_first = false;
        }
        Ok(new)
    }
}

/// Events of one stream not yet written to Postgres: delivered but not
/// acknowledged, plus not yet delivered (Redis 7's `lag`; unknown counts
/// as none rather than failing the round).
async fn backlog_of(con: &mut deadpool_redis::Connection, key: &str) -> usize {
    let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
        con.xinfo_groups(key).await;
    groups
        .map(|g| {
            g.groups
                .iter()
                .filter(|g| g.name == GROUP)
                .map(|g| g.pending + g.lag.unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

impl Drainer {
    /// Finishes, in Redis, what a twin found by `record_events` needs: the
    /// fallback committed a hold Redis only reserved, so Redis's twin is
    /// committed (then the fallback's undone); or the fallback ended it, so
    /// Redis's twin is released.
    async fn settle_twin(
        &self,
        tenant: &TenantId,
        hold_id: &str,
        job: &str,
        twin: Twin,
    ) -> Result<(), Error> {
        let (Some(job), id) = (Job::parse(job), HoldId::from_store(hold_id.to_owned())) else {
            return Ok(());
        };
        match twin {
            Twin::Committed(order_id) => {
                if let HoldReply::Hold(h) = self.redis.commit(tenant, &id, job, &order_id).await?
                    && h.state == HoldState::Committed
                {
                    self.pg.undo_committed_twin(tenant, hold_id).await?;
                }
            }
            Twin::Ended => {
                self.redis.release(tenant, &id, job).await?;
            }
            Twin::None | Twin::Undone => {}
        }
        tracing::warn!(%tenant, hold_id, "a retried call reached both Redis and the fallback; kept one");
        Ok(())
    }
}
