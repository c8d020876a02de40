//! The hold engine: reserve, commit, release, extend, claim and reads, on
//! top of the stores. The rules themselves live in the Lua scripts (atomic
//! in Redis); the engine's own job is escrow: when a script answers "need
//! grant", it asks Postgres to delegate the pool's capacity to Redis
//! (Postgres first, then Redis: ESCROW.md's one rule) and tries again.

use std::time::Duration;

use tokio::sync::Mutex;

use crate::domain::{Hold, HoldId, Job, Lines, PoolId, TakeOutcome, TenantId};
use crate::error::Error;
use crate::store::postgres::{AdjustOutcome, CapacityChange, PgStore, PoolRow};
use crate::store::redis::{
    CustomerLimit, GrantReply, HoldReply, PoolGrant, RedisPool, RedisStore, ReturnReply,
};
use crate::telemetry::metric;

/// How many times a take is retried after granting missing pools. One
/// grant settles a pool, so a second "need grant" means a concurrent reload.
const GRANT_ATTEMPTS: usize = 3;

/// A pool's counts across Redis and Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The pool.
    pub pool: PoolId,
    /// Capacity (lowered to the pool's ceiling, if it has one); `None` when
    /// unlimited.
    pub capacity: Option<i64>,
    /// Units sold, on either path.
    pub sold: i64,
    /// Units in active holds.
    pub held: i64,
    /// Units in doubt after a store failure.
    pub in_doubt: i64,
    /// Units that can be taken now (0 when unlimited).
    pub available: i64,
    /// Units currently delegated to Redis.
    pub granted_to_redis: i64,
    /// The epoch of that grant.
    pub epoch: i64,
    /// Available units at or below which a low-stock alert fires.
    pub low_stock_threshold: Option<i64>,
}

/// A request to take units: a hold, or a claim when `ttl` is `None`.
#[derive(Debug, Clone)]
pub struct Take {
    /// The hold or claim id.
    pub id: HoldId,
    /// The job taking.
    pub job: Job,
    /// What to take.
    pub lines: Lines,
    /// How long to hold; `None` to sell at once (a claim).
    pub ttl: Option<Duration>,
    /// The customer's limit, if the pool's owner set one.
    pub customer: Option<CustomerLimit>,
    /// The caller's reference (cart, session).
    pub reference: String,
}

/// The engine. Cheap to share behind an `Arc`.
pub struct Engine {
    redis: RedisStore,
    pg: PgStore,
    /// Serialises grants, so that a pool being loaded is never mistaken for
    /// a pool that Redis lost.
    grant_lock: Mutex<()>,
    max_extensions: u32,
}

impl Engine {
    /// An engine over the two stores.
    pub fn new(redis: RedisStore, pg: PgStore, max_extensions: u32) -> Self {
        Self {
            redis,
            pg,
            grant_lock: Mutex::new(()),
            max_extensions,
        }
    }

    /// The Redis store.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The Postgres store.
    pub fn pg(&self) -> &PgStore {
        &self.pg
    }

    /// Takes units: holds them for `ttl`, or sells them at once when `ttl` is
    /// `None`. All-or-nothing across the lines; business refusals are
    /// outcomes, not errors.
    pub async fn take(&self, tenant: &TenantId, take: &Take) -> Result<TakeOutcome, Error> {
        for _ in 0..GRANT_ATTEMPTS {
            let reply = match take.ttl {
                Some(ttl) => {
                    self.redis
                        .reserve(
                            tenant,
                            &take.id,
                            take.job,
                            ttl,
                            &take.lines,
                            take.customer.as_ref(),
                            &take.reference,
                        )
                        .await?
                }
                None => {
                    self.redis
                        .claim(
                            tenant,
                            &take.id,
                            take.job,
                            &take.lines,
                            take.customer.as_ref(),
                        )
                        .await?
                }
            };
            let outcome = match reply {
                HoldReply::NeedGrant(pools) => {
                    self.grant(tenant, &pools).await?;
                    continue;
                }
                HoldReply::Hold(hold) => TakeOutcome::Taken(hold),
                HoldReply::Short(short) => TakeOutcome::SoldOut(short),
                HoldReply::NotActive(pool) => TakeOutcome::NotActive(pool),
                HoldReply::CustomerLimit(used) => TakeOutcome::CustomerLimit(used),
                HoldReply::IdReused => {
                    return Err(Error::AlreadyExists(format!(
                        "id {} was already used for a different request; use a new id",
                        take.id
                    )));
                }
                other => {
                    return Err(Error::internal(format!(
                        "unexpected reply to a take: {other:?}"
                    )));
                }
            };
            record_outcome(take, &outcome);
            return Ok(outcome);
        }
        Err(Error::Unavailable(
            "pools kept changing while being loaded; retry with the same id".into(),
        ))
    }

    /// Sells an active hold's units, once. With an order id, a hold already
    /// consumed by a different order is refused.
    pub async fn commit(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        order_id: &str,
    ) -> Result<Hold, Error> {
        let hold = settle(id, self.redis.commit(tenant, id, job, order_id).await?)?;
        metrics::counter!(metric::ENGINE_OUTCOMES, "job" => job.as_str(), "outcome" => "committed")
            .increment(1);
        Ok(hold)
    }

    /// Gives an active hold's units back. Idempotent; a committed hold is
    /// refused.
    pub async fn release(&self, tenant: &TenantId, id: &HoldId, job: Job) -> Result<Hold, Error> {
        let hold = settle(id, self.redis.release(tenant, id, job).await?)?;
        metrics::counter!(metric::ENGINE_OUTCOMES, "job" => job.as_str(), "outcome" => "released")
            .increment(1);
        Ok(hold)
    }

    /// Moves an active hold's expiry to `ttl` from now, within the server's
    /// extension budget.
    pub async fn extend(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        extension_id: &str,
    ) -> Result<Hold, Error> {
        self.extend_within(tenant, id, job, ttl, extension_id, self.max_extensions)
            .await
    }

    /// [`Engine::extend`] with this call's own extension budget, for jobs
    /// whose holds may be refreshed any number of times (sale locks).
    pub async fn extend_within(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        extension_id: &str,
        max_extensions: u32,
    ) -> Result<Hold, Error> {
        settle(
            id,
            self.redis
                .extend(tenant, id, job, ttl, max_extensions, extension_id)
                .await?,
        )
    }

    /// Reads a hold.
    pub async fn get_hold(&self, tenant: &TenantId, id: &HoldId, job: Job) -> Result<Hold, Error> {
        settle(id, self.redis.get_hold(tenant, id, job).await?)
    }

    /// Reads pools' counts across both stores, in the order asked. Unknown
    /// pools are NOT_FOUND.
    pub async fn pools(&self, tenant: &TenantId, ids: &[PoolId]) -> Result<Vec<PoolView>, Error> {
        self.pools_if_any(tenant, ids)
            .await?
            .into_iter()
            .zip(ids)
            .map(|(v, id)| v.ok_or_else(|| Error::NotFound(format!("pool {id}"))))
            .collect()
    }

    /// Reads pools' counts across both stores, in the order asked; `None`
    /// for pools that do not exist.
    pub async fn pools_if_any(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Vec<Option<PoolView>>, Error> {
        let rows = self.pg.get_pools(tenant, ids).await?;
        let redis = self.redis.get_pools(tenant, ids).await?;
        Ok(ids
            .iter()
            .zip(redis)
            .map(|(id, r)| {
                rows.iter()
                    .find(|row| row.pool_id == id.as_str())
                    .map(|row| view(id, row, r.as_ref()))
            })
            .collect())
    }

    /// Delegates capacity to Redis for pools it asked about (ESCROW.md
    /// "Refill"). Today the grant is all of what Postgres has left; chunked
    /// refills change only the size computed here.
    async fn grant(&self, tenant: &TenantId, pools: &[PoolId]) -> Result<(), Error> {
        let _serial = self.grant_lock.lock().await;
        self.sync_locked(tenant, pools).await
    }

    /// Brings Redis's copy of pools up to date with Postgres (grant,
    /// window, threshold). Call after changing a pool in Postgres.
    pub async fn sync(&self, tenant: &TenantId, pools: &[PoolId]) -> Result<(), Error> {
        let _serial = self.grant_lock.lock().await;
        self.sync_locked(tenant, pools).await
    }

    /// Changes a pool's capacity by `delta` (idempotent by
    /// `adjustment_id`). Growing: Postgres first, then the new units are
    /// granted to Redis. Shrinking: Redis hands back what Postgres lacks
    /// first (ESCROW.md "Return"), then Postgres lowers the capacity under
    /// its guard. Refused with FAILED_PRECONDITION when the pool would end up
    /// with less than is sold and held.
    pub async fn adjust_capacity(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        delta: i64,
        adjustment_id: &str,
        reason: &str,
    ) -> Result<AdjustOutcome, Error> {
        let _serial = self.grant_lock.lock().await;
        let row = self
            .pg
            .get_pools(tenant, std::slice::from_ref(pool))
            .await?
            .pop()
            .ok_or_else(|| Error::NotFound(format!("pool {pool}")))?;
        let mut returned = None;
        if delta < 0
            && let Some(undelegated) = row.undelegated()
            && undelegated < -delta
        {
            let k = -delta - undelegated;
            match self.redis.return_units(tenant, pool, row.epoch, k).await? {
                ReturnReply::Returned(r) => returned = Some((row.epoch, r)),
                ReturnReply::Short(available) => {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove {} units from {pool}: only {} are neither sold nor held",
                        -delta,
                        available + undelegated
                    )));
                }
                // Redis does not run this pool: everything is in Postgres.
                ReturnReply::NoPool => {}
            }
        }
        let change = CapacityChange {
            adjustment_id,
            pool,
            delta,
            reason,
            returned,
        };
        let outcome = self.pg.adjust_capacity(tenant, &change).await?;
        self.sync_locked(tenant, std::slice::from_ref(pool)).await?;
        if outcome == AdjustOutcome::Refused {
            return Err(Error::FailedPrecondition(format!(
                "cannot change {pool} by {delta}: it would drop below the units sold and held"
            )));
        }
        Ok(outcome)
    }

    async fn sync_locked(&self, tenant: &TenantId, pools: &[PoolId]) -> Result<(), Error> {
        let rows = self.pg.get_pools(tenant, pools).await?;
        let in_redis = self.redis.get_pools(tenant, pools).await?;
        for (pool, redis) in pools.iter().zip(in_redis) {
            let mut row = rows
                .iter()
                .find(|r| r.pool_id == pool.as_str())
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("pool {pool}")))?;
            // Pools are never deleted from Redis while they hold a grant, so a
            // missing pool with an outstanding grant means Redis lost data.
            if redis.is_none() && row.outstanding_grant() > 0 {
                tracing::warn!(%tenant, %pool, epoch = row.epoch, "redis lost this pool's grant; opening a new epoch, the outstanding grant is in doubt");
                row = self.pg.open_epoch(tenant, pool, row.epoch).await?;
            }
            let mut granted = row.granted;
            if let Some(k) = row.undelegated().filter(|k| *k > 0) {
                granted = self
                    .pg
                    .grant(tenant, pool, row.epoch, k)
                    .await?
                    .ok_or_else(|| {
                        Error::Unavailable(format!("pool {pool} changed while granting; retry"))
                    })?;
            }
            let window = (
                row.starts_at.map_or(0, |t| t.timestamp_millis()),
                row.ends_at.map_or(0, |t| t.timestamp_millis()),
            );
            match self
                .redis
                .grant(
                    tenant,
                    pool,
                    &PoolGrant {
                        epoch: row.epoch,
                        granted,
                        full: true,
                        unlimited: row.capacity.is_none(),
                        window_ms: window,
                        low_stock_threshold: row.low_stock_threshold,
                        ceiling: row.ceiling,
                    },
                )
                .await?
            {
                GrantReply::Loaded | GrantReply::Granted(_) => {}
                GrantReply::Stale(e) => {
                    return Err(Error::internal(format!(
                        "redis runs epoch {e} of pool {pool}, newer than postgres's {}",
                        row.epoch
                    )));
                }
            }
            tracing::debug!(%tenant, %pool, epoch = row.epoch, granted, "granted pool to redis");
        }
        Ok(())
    }
}

/// Counts engine outcomes for the metrics.
fn record_outcome(take: &Take, outcome: &TakeOutcome) {
    let name = match (outcome, take.ttl) {
        (TakeOutcome::Taken(_), None) => "claimed",
        (TakeOutcome::Taken(_), Some(_)) => "reserved",
        (TakeOutcome::SoldOut(_), _) => "sold_out",
        (TakeOutcome::NotActive(_), _) => "not_active",
        (TakeOutcome::CustomerLimit(_), _) => "customer_limit",
    };
    metrics::counter!(metric::ENGINE_OUTCOMES, "job" => take.job.as_str(), "outcome" => name)
        .increment(1);
}

/// Turns a reply about an existing hold into the hold, or the error that
/// says why the call does not fit the hold's life.
fn settle(id: &HoldId, reply: HoldReply) -> Result<Hold, Error> {
    match reply {
        HoldReply::Hold(hold) => Ok(hold),
        HoldReply::NoHold => Err(Error::NotFound(format!("hold {id}"))),
        HoldReply::NotActiveHold(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} is {}; only an active hold can change",
            state_word(&hold)
        ))),
        HoldReply::OrderMismatch(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} was already consumed by order {}",
            hold.order_id
        ))),
        HoldReply::Committed(_) => Err(Error::FailedPrecondition(format!(
            "hold {id} is committed; it cannot be released"
        ))),
        HoldReply::ExtendLimit(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} was already extended {} time(s), the most allowed",
            hold.extensions
        ))),
        HoldReply::StaleEpoch(pool) => Err(Error::FailedPrecondition(format!(
            "hold {id} was made before pool {pool} was reloaded after a Redis failure; its units are in doubt"
        ))),
        other => Err(Error::internal(format!(
            "unexpected reply about hold {id}: {other:?}"
        ))),
    }
}

fn state_word(hold: &Hold) -> &'static str {
    use crate::domain::HoldState::*;
    match hold.state {
        Active => "active",
        Committed => "committed",
        Released => "released",
        Expired => "expired",
    }
}

/// Combines Postgres's ledger with Redis's counters into one view.
fn view(id: &PoolId, row: &PoolRow, redis: Option<&RedisPool>) -> PoolView {
    let (redis_sold, redis_held) = match redis {
        Some(r) if r.epoch == row.epoch => (r.sold.max(row.reported_sold), r.held),
        _ => (row.reported_sold, 0),
    };
    let sold = row.sold_pg + row.sold_prior + redis_sold;
    let held = row.held_pg + redis_held;
    let capacity = match (row.capacity, row.ceiling) {
        (Some(c), Some(ceiling)) => Some(c.min(ceiling)),
        (c, _) => c,
    };
    PoolView {
        pool: id.clone(),
        capacity,
        sold,
        held,
        in_doubt: row.in_doubt,
        available: row
            .capacity
            .map_or(0, |c| (c - sold - held - row.in_doubt).max(0)),
        granted_to_redis: row.outstanding_grant(),
        epoch: row.epoch,
        low_stock_threshold: row.low_stock_threshold,
    }
}
