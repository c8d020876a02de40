//! Escrow (ESCROW.md): how much of each pool Redis may sell. Postgres
//! records the grant first and Redis follows; Redis hands units back first
//! and Postgres follows. Grants come in chunks sized by the grant policy
//! (`grants.rs`), so the fallback always keeps a share to sell from while
//! Redis is down. Reads combine both stores' counts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::grants::LastGrant;
use super::{Engine, PoolView};
use crate::domain::{PoolId, TenantId};
use crate::error::Error;
use crate::store::postgres::PoolRow;
use crate::store::redis::{GrantReply, PoolGrant, RedisPool};

/// The longest a take waits for grants (for the grant lock, then for
/// Postgres and Redis to record one, as often as its script asks): as long
/// as it waits for a Postgres connection (startup.rs).
const TAKE_WAITS_FOR_GRANT: Duration = Duration::from_secs(5);

/// Pools granted per Postgres transaction when many are loaded at once
/// (a sale's products, an Engage's cards).
const GRANT_PART: usize = 100;

impl Engine {
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
    /// for pools that do not exist. Concurrent reads of a tenant are
    /// answered by one read of the stores (reads.rs).
    pub async fn pools_if_any(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Vec<Option<PoolView>>, Error> {
        self.reads.read(tenant, ids).await
    }

    /// [`Self::pools_if_any`], read from the stores: the rows from
    /// Postgres, then the counters from Redis.
    pub(super) async fn read_pools(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Vec<Option<PoolView>>, Error> {
        let rows = self.pg.get_pools(tenant, ids).await?;
        let redis = self.redis_counts(tenant, ids).await?;
        Ok(ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let counts = match &redis {
                    Some(pools) => Counts::Read(pools.get(i).and_then(Option::as_ref)),
                    None => Counts::Unreachable,
                };
                rows.iter()
                    .find(|row| row.pool_id == id.as_str())
                    .map(|row| view(id, row, counts))
            })
            .collect())
    }

    /// Redis's counters of `ids`, or `None` while Redis cannot answer (the
    /// circuit is open, or this read failed and opened it): a read then
    /// answers from Postgres alone, as the takes do, rather than
    /// UNAVAILABLE while the fallback sells.
    async fn redis_counts(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Option<Vec<Option<RedisPool>>>, Error> {
        if !self.circuit.closed() {
            return Ok(None);
        }
        match self.redis.get_pools(tenant, ids).await {
            Ok(pools) => {
                self.circuit.success();
                Ok(Some(pools))
            }
            Err(Error::RedisUnavailable(why)) => {
                tracing::warn!(%tenant, error = %why, "redis failed; reading pools from postgres alone");
                self.circuit.failure();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Delegates capacity to Redis for pools a script found short, `needed`
    /// units each at least (ESCROW.md "Refill"), for a take: waits until
    /// `until` at most (the take's first grant wait plus
    /// [`TAKE_WAITS_FOR_GRANT`]), then answers UNAVAILABLE (the grant goes
    /// on without the take, which a retry by id may find done). The
    /// wait is bounded for the lock too: against a Postgres that hangs
    /// (frozen, or a network dropping packets) each grant gave up after the
    /// pool's 5 s, one after another, so the n-th take in the lock's queue
    /// waited 5n s (16.9 s in a 20 s freeze: deploy/BENCHMARKS.md, "the
    /// pg-outage probe").
    ///
    /// Every take in flight when a pool runs dry in Redis asks for a grant
    /// at once (a stampede on a cold pool, or each of a sale's grants), and
    /// the first grant serves most of them. So a take that waited for the
    /// lock while another's work ran lets go of it at once, and its script
    /// looks again (with the other takes' scripts, in the batcher's calls);
    /// it grants only when it gets the lock with nothing moved since its
    /// script looked. A thousand claims on a cold pool of ten had each read
    /// Postgres and reloaded the pool in turn, ~5 ms each, and the last
    /// passed their 5 s (deploy/BENCHMARKS.md, "a sale's opening").
    pub(super) async fn grant(
        &self,
        tenant: &TenantId,
        needed: &[(PoolId, i64)],
        until: tokio::time::Instant,
    ) -> Result<(), Error> {
        if tokio::time::Instant::now() >= until {
            return Err(not_granted_in_time());
        }
        let escrow = self.escrows.of(tenant);
        let seen = escrow.passes.load(Ordering::Acquire);
        let serial = escrow.lock_until(Some(until)).await?;
        if escrow.passes.load(Ordering::Acquire) != seen {
            // The tenant's units moved while this take waited: its script
            // looks again.
            return Ok(());
        }
        let (tenant, needed) = (tenant.clone(), needed.to_vec());
        self.locked(escrow, serial, Some(until), move |me| async move {
            me.sync_locked(&tenant, &needed).await
        })
        .await
    }

    /// Brings Redis's copy of pools up to date with Postgres (grant,
    /// window, threshold, ceiling), granting a chunk where Redis runs low.
    /// Call after changing a pool in Postgres; the refiller calls it too.
    pub async fn sync(&self, tenant: &TenantId, pools: &[PoolId]) -> Result<(), Error> {
        let needed: Vec<(PoolId, i64)> = pools.iter().map(|p| (p.clone(), 0)).collect();
        let owned = tenant.clone();
        self.serially(tenant, None, move |me| async move {
            me.sync_locked(&owned, &needed).await
        })
        .await
    }

    /// Runs `work` under `tenant`'s grant lock, in a task of its own.
    /// Everything that moves units between the stores runs here, because
    /// it writes one store and then the other, and must not stop half-way
    /// when its caller goes away (a client's deadline or hang-up drops the
    /// call's future): a grant Postgres recorded must reach Redis, or the
    /// pool's next load finds Redis short of it (`LOST`) and puts it in
    /// doubt; units Redis handed back must be recorded in Postgres, or
    /// neither store sells them again. `wait`, if any, bounds how long the
    /// caller waits, for the lock and then for the work, which goes on
    /// without it. Each tenant's work touches only its own pools, so
    /// tenants' works run beside each other.
    pub(super) async fn serially<T, F, Fut>(
        &self,
        tenant: &TenantId,
        wait: Option<Duration>,
        work: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Engine>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let until = wait.map(|w| tokio::time::Instant::now() + w);
        let escrow = self.escrows.of(tenant);
        let serial = escrow.lock_until(until).await?;
        self.locked(escrow, serial, until, work).await
    }

    /// [`Self::serially`] once `escrow`'s lock is held: runs `work` in a
    /// task that keeps `serial` until it is done, and counts it in
    /// `escrow`'s passes before letting go.
    async fn locked<T, F, Fut>(
        &self,
        escrow: Arc<Escrow>,
        serial: OwnedMutexGuard<()>,
        until: Option<tokio::time::Instant>,
        work: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Engine>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Error::Unavailable("the engine is shutting down".into()))?;
        let task = tokio::spawn(async move {
            let done = work(me).await;
            escrow.passes.fetch_add(1, Ordering::Release);
            drop(serial);
            done
        });
        let joined = match until {
            Some(t) => tokio::time::timeout_at(t, task)
                .await
                .map_err(|_| not_granted_in_time())?,
            None => task.await,
        };
        joined.map_err(|e| {
            Error::internal(format!(
                "a task moving units between the stores failed: {e}"
            ))
        })?
    }

    /// Checks every pool that has a grant outstanding against Redis (after
    /// Redis came back empty): lost grants become in doubt, and the pools
    /// are loaded again.
    pub async fn recover_pools(&self) -> Result<usize, Error> {
        let mut n = 0;
        for (tenant, pools) in self.pg.pools_with_grants().await? {
            n += pools.len();
            self.sync(&tenant, &pools).await?;
        }
        Ok(n)
    }

    /// Brings pools to Redis. A pool Redis turns out to have lost data of
    /// (its load answered `Lost`) now has a new epoch in Postgres and is
    /// planned and loaded once more, from nothing.
    pub(super) async fn sync_locked(
        &self,
        tenant: &TenantId,
        needed: &[(PoolId, i64)],
    ) -> Result<(), Error> {
        let lost = self.sync_pass(tenant, needed).await?;
        if lost.is_empty() {
            return Ok(());
        }
        let again: Vec<(PoolId, i64)> = needed
            .iter()
            .filter(|(p, _)| lost.contains(p))
            .cloned()
            .collect();
        match self.sync_pass(tenant, &again).await?.first() {
            None => Ok(()),
            Some(pool) => Err(Error::Unavailable(format!(
                "redis lost pool {pool} again while it was being reloaded; retry"
            ))),
        }
    }

    /// One pass of [`Self::sync_locked`]; returns the pools whose load found
    /// that Redis lost data (each given a new epoch, not loaded).
    async fn sync_pass(
        &self,
        tenant: &TenantId,
        needed: &[(PoolId, i64)],
    ) -> Result<Vec<PoolId>, Error> {
        let pools: Vec<PoolId> = needed.iter().map(|(p, _)| p.clone()).collect();
        let mut rows = self.pg.get_pools(tenant, &pools).await?;
        if self.swept_for(tenant, needed, &rows).await {
            rows = self.pg.get_pools(tenant, &pools).await?;
        }
        let in_redis = self.redis.get_pools(tenant, &pools).await?;
        // First what each pool needs, then every grant in one Postgres
        // transaction, then each pool to Redis (Postgres first). Whether
        // Redis lost data is not judged from this read but by the load
        // itself (grant.lua): Redis may restart empty between the two.
        let mut plans = Vec::with_capacity(needed.len());
        for ((pool, need), redis) in needed.iter().zip(in_redis) {
            let row = rows
                .iter()
                .find(|r| r.pool_id == pool.as_str())
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("pool {pool}")))?;
            let headroom = match &redis {
                Some(r) if r.epoch == row.epoch => r.headroom(),
                _ => 0,
            };
            let undelegated = row.undelegated().unwrap_or(0);
            let limit = self.grant_limit(tenant, pool, row.epoch);
            let chunk = if undelegated > 0
                && (headroom < *need || headroom <= self.policy.low_water(limit, undelegated))
            {
                self.policy.size(limit, undelegated, *need - headroom)
            } else {
                0
            };
            plans.push((pool, row, chunk, limit));
        }
        // A refused grant fails the call, but only after the others of its
        // part reached Redis: a grant Postgres recorded and Redis never got
        // would later read as lost (in doubt: never resold, but not sold
        // either). So the grants go in parts, each recorded in Postgres
        // just before it goes to Redis, and a Redis failure stops before
        // the next part: at most one part's grants are left in the air.
        let mut refused = None;
        let mut lost = Vec::new();
        for part in plans.chunks(GRANT_PART) {
            let asks: Vec<(&PoolId, i64, i64)> = part
                .iter()
                .filter(|(_, _, chunk, _)| *chunk > 0)
                .map(|(pool, row, chunk, _)| (*pool, row.epoch, *chunk))
                .collect();
            let granted = self.pg.grant(tenant, &asks).await?;
            let mut loads = Vec::with_capacity(part.len());
            for (pool, row, chunk, limit) in part {
                match (*chunk, granted.get(pool.as_str())) {
                    (0, _) => loads.push((*pool, row, row.granted, 0, *limit)),
                    (chunk, Some(g)) => loads.push((*pool, row, *g, chunk, *limit)),
                    (_, None) => {
                        refused.get_or_insert_with(|| (*pool).clone());
                    }
                }
            }
            // The part's pools go to Redis at once (one connection carries
            // them all): one after the other, a Redis that lost 10,000
            // pools kept the circuit open ~1 ms a pool.
            let loaded = join_all(loads.iter().map(|(pool, row, granted, chunk, limit)| {
                self.load(tenant, pool, row, *granted, *chunk, *limit)
            }))
            .await;
            // Every answer is kept before the first failure is returned: a
            // pool lost or loaded beside a failed one was still lost or
            // loaded.
            let mut failed = None;
            let mut closing = Vec::new();
            for ((pool, row, _, chunk, _), loaded) in loads.iter().zip(loaded) {
                match loaded {
                    Ok(false) => closing.push((*pool, row.epoch, *chunk)),
                    Ok(true) if *chunk > 0 => self.remember_grant(tenant, pool, row.epoch, *chunk),
                    Ok(true) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some((pool, epoch, _)) = closing.first() {
                tracing::warn!(%tenant, pools = closing.len(), %pool, epoch, "redis lost these pools' grants (the first named); opening new epochs, the outstanding grants are in doubt");
                self.pg.open_epochs(tenant, &closing).await?;
                lost.extend(closing.iter().map(|(pool, _, _)| (*pool).clone()));
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        // A pool marked for a resync (a give-back, a capacity change) is
        // now up to date as of the mark this read: recorded, so that the
        // refiller does not sync it again. A pool refused or lost is not.
        let synced: Vec<(PoolId, i64)> = plans
            .iter()
            .filter(|(pool, row, _, _)| {
                row.resync_seq > row.synced_seq
                    && refused.as_ref() != Some(*pool)
                    && !lost.contains(*pool)
            })
            .map(|(pool, row, _, _)| ((*pool).clone(), row.resync_seq))
            .collect();
        if !synced.is_empty() {
            self.pg.resynced(tenant, &synced).await?;
        }
        match refused {
            Some(pool) => Err(Error::Unavailable(format!(
                "pool {pool} changed while granting; retry"
            ))),
            None => Ok(lost),
        }
    }

    /// Fallback holds past their expiry count in `held_pg` until the
    /// fallback's sweep ends them. Their units are free now: planned as
    /// taken, a pool would be loaded full (or short of a take's need) and
    /// answer sold out. So where that could happen (a pool with fallback
    /// holds and no more undelegated than it needs), the tenant's due ones
    /// are ended first. True if any were, and the rows must be read again.
    /// A failure only leaves them to the fallback's sweeper.
    async fn swept_for(
        &self,
        tenant: &TenantId,
        needed: &[(PoolId, i64)],
        rows: &[PoolRow],
    ) -> bool {
        if !rows.iter().any(|r| r.held_pg > 0) {
            return false;
        }
        let need: HashMap<&str, i64> = needed.iter().map(|(p, n)| (p.as_str(), *n)).collect();
        let tight = rows.iter().any(|r| {
            r.held_pg > 0
                && r.undelegated()
                    .is_some_and(|u| u <= need.get(r.pool_id.as_str()).copied().unwrap_or(0))
        });
        if !tight {
            return false;
        }
        match self.pg.fallback_sweep(tenant).await {
            Ok(ended) => ended > 0,
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "cannot end the fallback's due holds before a grant");
                false
            }
        }
    }

    /// The most `pool`'s next grant may move ([`GrantPolicy::limit`]).
    fn grant_limit(&self, tenant: &TenantId, pool: &PoolId, epoch: i64) -> i64 {
        let last = self
            .last_grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant, pool);
        self.policy.limit(
            last.filter(|l| l.epoch == epoch)
                .map(|l| (l.units, l.at.elapsed())),
        )
    }

    /// Remembers `pool`'s grant of `units` now, to size the next one.
    fn remember_grant(&self, tenant: &TenantId, pool: &PoolId, epoch: i64, units: i64) {
        let grant = LastGrant {
            epoch,
            units,
            at: Instant::now(),
        };
        self.last_grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant, pool, grant);
    }

    /// Sends one pool's grant (already recorded in Postgres) to Redis; false
    /// when Redis lost data of the pool's epoch, which the caller then
    /// closes (ESCROW.md "Losing Redis": its outstanding grant goes in
    /// doubt, less this `chunk`, which Redis refused and so never had,
    /// `PgStore::open_epochs`). `limit` is what
    /// this grant was sized by; half of the next one under it is when
    /// Redis asks for more.
    async fn load(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        row: &PoolRow,
        granted: i64,
        chunk: i64,
        limit: i64,
    ) -> Result<bool, Error> {
        let undelegated = row.undelegated().unwrap_or(0);
        let window = (
            row.starts_at.map_or(0, |t| t.timestamp_millis()),
            row.ends_at.map_or(0, |t| t.timestamp_millis()),
        );
        let grant = PoolGrant {
            epoch: row.epoch,
            granted,
            prior: row.granted,
            reported_sold: row.reported_sold,
            full: undelegated - chunk <= 0,
            unlimited: row.capacity.is_none(),
            window_ms: window,
            low_stock_threshold: row.low_stock_threshold,
            // What is taken outside Redis counts against the ceiling too.
            // Only the fallback adds to it, taking only what Redis was never
            // granted and counting Redis's whole grant as taken; every grant
            // sends it afresh, and until the next Redis sells no more than
            // this one.
            ceiling: row.ceiling.map(|c| (c - row.taken_outside_redis()).max(0)),
            low_water: self.policy.low_water(limit, undelegated - chunk),
            undelegated: undelegated - chunk,
        };
        match self.redis.grant(tenant, pool, &grant).await? {
            GrantReply::Loaded | GrantReply::Granted(_) => {}
            GrantReply::Lost => return Ok(false),
            GrantReply::Stale(e) => {
                return Err(Error::internal(format!(
                    "redis runs epoch {e} of pool {pool}, newer than postgres's {}",
                    row.epoch
                )));
            }
        }
        tracing::debug!(%tenant, %pool, epoch = row.epoch, granted, chunk, "granted pool to redis");
        Ok(true)
    }
}

/// One tenant's grant lock, and how many works have run under it: a take
/// that waited for the lock while the count moved may find its grant
/// made ([`Engine::grant`]). A count per tenant wakes only the takes whose
/// pools the work could have touched; one for the whole daemon woke every
/// waiting take of every shop at each grant.
#[derive(Default)]
pub(super) struct Escrow {
    lock: Arc<Mutex<()>>,
    passes: AtomicU64,
}

impl Escrow {
    /// The lock, waited for until `until` at most.
    async fn lock_until(
        &self,
        until: Option<tokio::time::Instant>,
    ) -> Result<OwnedMutexGuard<()>, Error> {
        let lock = Arc::clone(&self.lock).lock_owned();
        match until {
            Some(t) => tokio::time::timeout_at(t, lock)
                .await
                .map_err(|_| not_granted_in_time()),
            None => Ok(lock.await),
        }
    }
}

/// Every tenant's [`Escrow`], made when the tenant first moves units and
/// kept (an entry of ~100 bytes a tenant). Tenants' grants run beside
/// each other: with one lock for the daemon, 64 shops opening their sales
/// at once granted one after another, and took 7.8 s to sell out what
/// one shop sells in 0.3 s (deploy/BENCHMARKS.md, "shops opening at
/// once").
#[derive(Default)]
pub(super) struct Escrows(std::sync::Mutex<HashMap<TenantId, Arc<Escrow>>>);

impl Escrows {
    /// `tenant`'s escrow.
    pub(super) fn of(&self, tenant: &TenantId) -> Arc<Escrow> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match all.get(tenant) {
            Some(e) => Arc::clone(e),
            None => Arc::clone(all.entry(tenant.clone()).or_default()),
        }
    }
}

/// A take's wait for grants: when it began and the one deadline all its
/// grant waits share ([`TAKE_WAITS_FOR_GRANT`]). Recorded in
/// `holdfast_grant_wait_seconds` when it ends, however it ends (granted,
/// given up, or its caller gone): what operators watch for grants that
/// queue (deploy/BENCHMARKS.md, "shops opening at once") or a Postgres
/// that grants slowly.
#[derive(Default)]
pub(super) struct GrantWait(Option<(Instant, tokio::time::Instant)>);

impl GrantWait {
    /// Until when the take may still wait for grants; its first call
    /// starts the wait.
    pub(super) fn until(&mut self) -> tokio::time::Instant {
        self.0
            .get_or_insert_with(|| {
                let until = tokio::time::Instant::now() + TAKE_WAITS_FOR_GRANT;
                (Instant::now(), until)
            })
            .1
    }
}

impl Drop for GrantWait {
    fn drop(&mut self) {
        if let Some((started, _)) = self.0 {
            metrics::histogram!(crate::telemetry::metric::GRANT_WAIT_SECONDS)
                .record(started.elapsed().as_secs_f64());
        }
    }
}

/// What a take that waited for a grant past its time is answered.
fn not_granted_in_time() -> Error {
    Error::Unavailable(
        "postgres did not grant this pool more units in time; retry with the same id".into(),
    )
}

/// What a read knows of a pool's counts in Redis.
#[derive(Debug, Clone, Copy)]
pub(super) enum Counts<'a> {
    /// Redis answered: its counters, or `None` where it has no copy.
    Read(Option<&'a RedisPool>),
    /// Redis could not be asked.
    Unreachable,
}

/// Combines Postgres's ledger with Redis's counters into one view.
pub(super) fn view(id: &PoolId, row: &PoolRow, redis: Counts<'_>) -> PoolView {
    let (redis_sold, redis_held) = match redis {
        Counts::Read(Some(r)) if r.epoch == row.epoch => (r.sold.max(row.reported_sold), r.held),
        _ => (row.reported_sold, 0),
    };
    // While Redis cannot be asked, what it was granted and has not
    // reported sold may be sold, held or free there: none of it can be
    // taken now (the fallback sells only Postgres's share), so none of it
    // is available.
    let in_redis = match redis {
        Counts::Unreachable => (row.outstanding_grant() - row.reported_sold).max(0),
        Counts::Read(_) => 0,
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
            .map_or(0, |c| (c - sold - held - row.in_doubt - in_redis).max(0)),
        granted_to_redis: row.outstanding_grant(),
        epoch: row.epoch,
        low_stock_threshold: row.low_stock_threshold,
    }
}
