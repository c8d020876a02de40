//! Pools and their escrow ledger (ESCROW.md).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::PgStore;
use crate::domain::{PoolId, TenantId};
use crate::error::Error;

/// How a transaction writes its pool rows, which says how it takes the
/// tenant's pool lock (`lock_tenant_pools`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store::postgres) enum PoolWrites {
    /// Row by row in pool order (the fallback's takes, commits, releases
    /// and expiries): such transactions never deadlock with each other, so
    /// they share the lock.
    InPoolOrder,
    /// Many rows in one statement, in whatever order its plan visits them
    /// (the drainer's write-back, grants): one at a time, alone.
    InAnyOrder,
}

/// Takes `tenant`'s pool lock until `tx` ends: shared or exclusive, as
/// `writes` says.
///
/// The rule for writing pools: a transaction that writes more than one
/// pool row, or a pool row and then other rows, takes this lock first:
/// after the hold-id locks it needs (`fallback::lock_ids`), before any row
/// lock. Writers in pool order share it and cannot deadlock with each
/// other (each waits only for rows after those it holds); a writer in any
/// order holds it alone. A statement that writes one pool row on its own
/// holds nothing while it waits, so it needs no lock.
///
/// Before this lock, every multi-pool writer locked its rows in pool order
/// with a `SELECT ... FOR UPDATE` before writing them. Locking a row
/// writes to it, and for the drainer's write-back across many pools that
/// pass cost Postgres as much as the write-back itself: claim-10k ran
/// 12-25% faster without it (deploy/BENCHMARKS.md, 2026-12-04, "the
/// write-back's lock pass"). Advisory locks per pool were no cheaper than
/// the row locks (1.8 against 0.7 µs a pool for 500).
pub(in crate::store::postgres) async fn lock_tenant_pools(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    writes: PoolWrites,
) -> Result<(), Error> {
    // Its own hash seed keeps it apart from the hold-id locks.
    let sql = match writes {
        PoolWrites::InPoolOrder => {
            "SELECT pg_advisory_xact_lock_shared(hashtextextended('pools/' || $1, 9))"
        }
        PoolWrites::InAnyOrder => {
            "SELECT pg_advisory_xact_lock(hashtextextended('pools/' || $1, 9))"
        }
    };
    sqlx::query(sql)
        .bind(tenant.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A pool to create.
#[derive(Debug, Clone)]
pub struct NewPool {
    /// Its id.
    pub pool_id: PoolId,
    /// The job it serves (`flash`, `stock`, ...).
    pub job: &'static str,
    /// Its capacity; `None` for unlimited.
    pub capacity: Option<i64>,
    /// Takes are refused before this instant, if set.
    pub starts_at: Option<DateTime<Utc>>,
    /// Takes are refused from this instant on, if set.
    pub ends_at: Option<DateTime<Utc>>,
}

/// A pool as Postgres records it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PoolRow {
    /// Its id.
    pub pool_id: String,
    /// Capacity, `None` when unlimited.
    pub capacity: Option<i64>,
    /// Window start.
    pub starts_at: Option<DateTime<Utc>>,
    /// Window end.
    pub ends_at: Option<DateTime<Utc>>,
    /// Sold by the fallback.
    pub sold_pg: i64,
    /// Held by the fallback.
    pub held_pg: i64,
    /// Current epoch.
    pub epoch: i64,
    /// Cumulative grant to Redis this epoch.
    pub granted: i64,
    /// Cumulative units returned by Redis this epoch.
    pub returned: i64,
    /// Redis's sales this epoch, as written back.
    pub reported_sold: i64,
    /// Redis's sales in earlier epochs.
    pub sold_prior: i64,
    /// Units lost with an epoch, unavailable until resolved.
    pub in_doubt: i64,
    /// Available units at or below which a low-stock alert fires.
    pub low_stock_threshold: Option<i64>,
    /// Ceiling on sold + held below the capacity, if any.
    pub ceiling: Option<i64>,
    /// Marks for a resync, and the mark a sync last covered
    /// (migrations/0012_pools_resync_seq.sql).
    pub resync_seq: i64,
    /// See `resync_seq`.
    pub synced_seq: i64,
}

impl PoolRow {
    /// The row `pool` will have once created, before any grant or sale:
    /// what a change that creates its pool is weighed against.
    pub fn unsaved(pool: &NewPool) -> Self {
        Self {
            pool_id: pool.pool_id.to_string(),
            capacity: pool.capacity,
            starts_at: pool.starts_at,
            ends_at: pool.ends_at,
            sold_pg: 0,
            held_pg: 0,
            epoch: 1,
            granted: 0,
            returned: 0,
            reported_sold: 0,
            sold_prior: 0,
            in_doubt: 0,
            low_stock_threshold: None,
            ceiling: None,
            resync_seq: 0,
            synced_seq: 0,
        }
    }

    /// Units taken outside this epoch's Redis grant: sold or held by the
    /// fallback, sold in earlier epochs, or in doubt. A ceiling bounds these
    /// and Redis's own sold and held together, but Redis counts only its
    /// own, so it is handed the ceiling less these (`Escrow::load`).
    pub fn taken_outside_redis(&self) -> i64 {
        self.sold_pg + self.held_pg + self.sold_prior + self.in_doubt
    }

    /// Units neither taken, delegated nor in doubt: what Postgres may still
    /// grant to Redis or sell itself. `None` when unlimited.
    pub fn undelegated(&self) -> Option<i64> {
        self.capacity.map(|c| {
            c - self.sold_pg
                - self.held_pg
                - self.sold_prior
                - self.in_doubt
                - (self.granted - self.returned)
        })
    }

    /// Units Redis holds a grant for and has not returned.
    pub fn outstanding_grant(&self) -> i64 {
        self.granted - self.returned
    }
}

const COLUMNS: &str = "pool_id, capacity, starts_at, ends_at, sold_pg, held_pg, epoch, granted, returned, reported_sold, sold_prior, in_doubt, low_stock_threshold, ceiling, resync_seq, synced_seq";

impl PgStore {
    /// Inserts pools in a transaction the caller owns.
    pub async fn insert_pools(
        tx: &mut Transaction<'_, Postgres>,
        tenant: &TenantId,
        pools: &[NewPool],
    ) -> Result<(), Error> {
        for p in pools {
            sqlx::query("INSERT INTO pools (tenant, pool_id, job, capacity, starts_at, ends_at) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(tenant.as_str())
                .bind(p.pool_id.as_str())
                .bind(p.job)
                .bind(p.capacity)
                .bind(p.starts_at)
                .bind(p.ends_at)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Reads pools, in no particular order; missing ones are left out.
    pub async fn get_pools(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Vec<PoolRow>, Error> {
        let ids: Vec<&str> = ids.iter().map(PoolId::as_str).collect();
        let rows = sqlx::query_as::<_, PoolRow>(&format!(
            "SELECT {COLUMNS} FROM pools WHERE tenant = $1 AND pool_id = ANY($2)"
        ))
        .bind(tenant.as_str())
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Delegates more units to Redis, for each `(pool, epoch, k)`: `k` more
    /// in `epoch` (ESCROW.md "Refill": Postgres first). The guard re-checks
    /// the invariant on each row itself, so two daemons granting at once
    /// cannot overdraw. Returns the new cumulative grant of each pool
    /// granted; a pool the guard refused (or whose epoch moved) is absent.
    ///
    /// One transaction for all of them: engaging thousands of cards, or
    /// creating a sale of many products, grants each one, and a commit per
    /// pool made that a flush to disk per pool. It holds the tenant's pool
    /// lock, as every multi-pool writer does (`lock_tenant_pools`), so that
    /// it never deadlocks with the drainer or a fallback take.
    pub async fn grant(
        &self,
        tenant: &TenantId,
        asks: &[(&PoolId, i64, i64)],
    ) -> Result<HashMap<String, i64>, Error> {
        if asks.is_empty() {
            return Ok(HashMap::new());
        }
        let pools: Vec<&str> = asks.iter().map(|a| a.0.as_str()).collect();
        let epochs: Vec<i64> = asks.iter().map(|a| a.1).collect();
        let ks: Vec<i64> = asks.iter().map(|a| a.2).collect();
        let mut tx = self.begin().await?;
        lock_tenant_pools(&mut tx, tenant, PoolWrites::InAnyOrder).await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE pools p SET granted = p.granted + d.k
             FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) AS d(pool, epoch, k)
             WHERE p.tenant = $1 AND p.pool_id = d.pool AND p.epoch = d.epoch
               AND (p.capacity IS NULL
                    OR p.sold_pg + p.held_pg + p.sold_prior + p.in_doubt + (p.granted + d.k - p.returned) <= p.capacity)
             RETURNING p.pool_id, p.granted",
        )
        .bind(tenant.as_str())
        .bind(&pools)
        .bind(&epochs)
        .bind(&ks)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.into_iter().collect())
    }

    /// Opens a new epoch of each of `lost`, `(pool, lost epoch, unsent)`,
    /// after Redis lost them (ESCROW.md "Losing Redis"): what the old epoch
    /// had granted and not reported sold becomes in doubt, never resold
    /// until an operator resolves it; except the last `unsent` units
    /// granted, which Redis refused, so never had. A pool already past its
    /// lost epoch (another daemon opened it first) is left as it is. One
    /// statement for them all: a Redis that lost 10,000 pools cost 10,000
    /// round trips with the circuit open.
    pub async fn open_epochs(
        &self,
        tenant: &TenantId,
        lost: &[(&PoolId, i64, i64)],
    ) -> Result<(), Error> {
        if lost.is_empty() {
            return Ok(());
        }
        let pools: Vec<&str> = lost.iter().map(|l| l.0.as_str()).collect();
        let epochs: Vec<i64> = lost.iter().map(|l| l.1).collect();
        let unsent: Vec<i64> = lost.iter().map(|l| l.2).collect();
        let mut tx = self.begin().await?;
        lock_tenant_pools(&mut tx, tenant, PoolWrites::InAnyOrder).await?;
        sqlx::query(
            "UPDATE pools p SET
                 epoch = p.epoch + 1,
                 in_doubt = p.in_doubt + GREATEST(p.granted - d.unsent - p.returned - p.reported_sold, 0),
                 sold_prior = p.sold_prior + p.reported_sold,
                 granted = 0, returned = 0, reported_sold = 0
             FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) AS d(pool, epoch, unsent)
             WHERE p.tenant = $1 AND p.pool_id = d.pool AND p.epoch = d.epoch",
        )
        .bind(tenant.as_str())
        .bind(&pools)
        .bind(&epochs)
        .bind(&unsent)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates a pool if it does not exist yet; true when it was created.
    pub async fn ensure_pool(&self, tenant: &TenantId, pool: &NewPool) -> Result<bool, Error> {
        self.ensure_tenant(tenant).await?;
        let n = insert_pool(tenant, pool).execute(&self.pool).await?;
        Ok(n.rows_affected() == 1)
    }

    /// Takes the lock that orders changes to `pool`'s capacity across
    /// daemons, held until the returned transaction ends (it does nothing
    /// else). A change weighs the capacity as it finds it (`Capacity::To`,
    /// `Capacity::Unsold`): each daemon runs its own changes one at a time,
    /// but two daemons counting one product at once each weighed the
    /// capacity before the other's change, and the two added up.
    /// Its own hash seed keeps it apart from the pool and hold-id locks.
    pub async fn lock_capacity_changes(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
    ) -> Result<Transaction<'static, Postgres>, Error> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 11))")
            .bind(tenant.as_str())
            .bind(pool.as_str())
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Changes a pool's capacity by `delta` in one transaction with the
    /// record of the adjustment (idempotent by `adjustment_id`) and, when
    /// Redis handed units back for it, the new `returned` count. The guard
    /// keeps the escrow invariant: capacity never drops below what is sold,
    /// held, delegated or in doubt.
    pub async fn adjust_capacity(
        &self,
        tenant: &TenantId,
        adj: &CapacityChange<'_>,
    ) -> Result<AdjustOutcome, Error> {
        if adj.create.is_some() {
            self.ensure_tenant(tenant).await?;
        }
        let mut tx = self.begin().await?;
        if let Some(pool) = adj.create {
            insert_pool(tenant, pool).execute(&mut *tx).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO stock_adjustments (tenant, adjustment_id, pool_id, delta, reason) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(adj.adjustment_id)
        .bind(adj.pool.as_str())
        .bind(adj.delta)
        .bind(adj.reason)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return self
                .adjustment(tenant, adj.adjustment_id)
                .await?
                .ok_or_else(|| Error::internal("a stock adjustment vanished while read"));
        }
        if let Some((epoch, returned)) = adj.returned {
            sqlx::query("UPDATE pools SET returned = GREATEST(returned, $4), resync_seq = resync_seq + 1 WHERE tenant = $1 AND pool_id = $2 AND epoch = $3")
                .bind(tenant.as_str())
                .bind(adj.pool.as_str())
                .bind(epoch)
                .bind(returned)
                .execute(&mut *tx)
                .await?;
        }
        let changed = sqlx::query(
            "UPDATE pools SET capacity = capacity + $3, resync_seq = resync_seq + 1
             WHERE tenant = $1 AND pool_id = $2 AND capacity IS NOT NULL
               AND sold_pg + held_pg + sold_prior + in_doubt + (granted - returned) <= capacity + $3",
        )
        .bind(tenant.as_str())
        .bind(adj.pool.as_str())
        .bind(adj.delta)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            // Commit the returned count anyway: Redis already gave those units back.
            sqlx::query("DELETE FROM stock_adjustments WHERE tenant = $1 AND adjustment_id = $2")
                .bind(tenant.as_str())
                .bind(adj.adjustment_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(AdjustOutcome::Refused);
        }
        tx.commit().await?;
        Ok(AdjustOutcome::Applied)
    }

    /// The change recorded under `adjustment_id`, as
    /// [`AdjustOutcome::Repeated`]; `None` if there is none.
    pub async fn adjustment(
        &self,
        tenant: &TenantId,
        adjustment_id: &str,
    ) -> Result<Option<AdjustOutcome>, Error> {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT pool_id, delta FROM stock_adjustments WHERE tenant = $1 AND adjustment_id = $2",
        )
        .bind(tenant.as_str())
        .bind(adjustment_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(pool_id, delta)| AdjustOutcome::Repeated { pool_id, delta }))
    }

    /// Settles a pool's units in doubt under `resolution_id`, if the pool
    /// has exactly `r.in_doubt` of them (what the operator checked): `sold`
    /// of them were really sold, the rest are available again. The id is
    /// recorded in the same transaction, so a retry finds it and changes
    /// nothing.
    pub async fn resolve_in_doubt(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        r: &InDoubtResolution,
    ) -> Result<Resolution, Error> {
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO in_doubt_resolutions (tenant, resolution_id, pool_id, in_doubt, sold_units)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(&r.resolution_id)
        .bind(pool.as_str())
        .bind(r.in_doubt)
        .bind(r.sold)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            let (pool_id, in_doubt, sold): (String, i64, i64) = sqlx::query_as(
                "SELECT pool_id, in_doubt, sold_units FROM in_doubt_resolutions
                 WHERE tenant = $1 AND resolution_id = $2",
            )
            .bind(tenant.as_str())
            .bind(&r.resolution_id)
            .fetch_one(&self.pool)
            .await?;
            let same = pool_id == pool.as_str() && (in_doubt, sold) == (r.in_doubt, r.sold);
            return Ok(if same {
                Resolution::Repeated
            } else {
                Resolution::IdTaken {
                    pool_id,
                    in_doubt,
                    sold,
                }
            });
        }
        let changed = sqlx::query(
            "UPDATE pools SET sold_prior = sold_prior + $4, in_doubt = 0
             WHERE tenant = $1 AND pool_id = $2 AND in_doubt = $3 AND $4 BETWEEN 0 AND $3",
        )
        .bind(tenant.as_str())
        .bind(pool.as_str())
        .bind(r.in_doubt)
        .bind(r.sold)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await?;
            return Ok(Resolution::Refused);
        }
        tx.commit().await?;
        Ok(Resolution::Applied)
    }

    /// Every pool with a grant outstanding, by tenant.
    pub async fn pools_with_grants(&self) -> Result<Vec<(TenantId, Vec<PoolId>)>, Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant, pool_id FROM pools WHERE granted > returned ORDER BY tenant, pool_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<(TenantId, Vec<PoolId>)> = Vec::new();
        for (tenant, pool) in rows {
            let tenant = TenantId::parse(&tenant)?;
            match out.last_mut() {
                Some((t, pools)) if *t == tenant => pools.push(PoolId::from_store(pool)),
                _ => out.push((tenant, vec![PoolId::from_store(pool)])),
            }
        }
        Ok(out)
    }

    /// Units in doubt, summed over every pool (for the metric): a read of
    /// the index of pools in doubt, not of every pool.
    pub async fn total_in_doubt(&self) -> Result<i64, Error> {
        let (n,): (Option<i64>,) =
            sqlx::query_as("SELECT sum(in_doubt)::bigint FROM pools WHERE in_doubt > 0")
                .fetch_one(&self.pool)
                .await?;
        Ok(n.unwrap_or(0))
    }

    /// Pools of a tenant with units in doubt.
    pub async fn pools_in_doubt(&self, tenant: &TenantId) -> Result<Vec<PoolId>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT pool_id FROM pools WHERE tenant = $1 AND in_doubt > 0 ORDER BY pool_id",
        )
        .bind(tenant.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| PoolId::from_store(r.0)).collect())
    }

    /// Up to `limit` pools marked for a resync since their last one (units
    /// the fallback gave back, a capacity change: migrations/0012). The
    /// mark stays until a sync has covered it ([`PgStore::resynced`]),
    /// whatever happens to the daemon in between.
    pub async fn marked_for_resync(&self, limit: i64) -> Result<Vec<(TenantId, PoolId)>, Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant, pool_id FROM pools WHERE resync_seq > synced_seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(t, p)| Ok((TenantId::parse(&t)?, PoolId::from_store(p))))
            .collect()
    }

    /// Records that `pools` were synced as of their marks' counts (read
    /// with the rows the sync planned from); a pool marked again since
    /// stays marked.
    pub async fn resynced(&self, tenant: &TenantId, pools: &[(PoolId, i64)]) -> Result<(), Error> {
        let ids: Vec<&str> = pools.iter().map(|(p, _)| p.as_str()).collect();
        let seqs: Vec<i64> = pools.iter().map(|(_, s)| *s).collect();
        sqlx::query(
            "UPDATE pools p SET synced_seq = GREATEST(p.synced_seq, s.seq)
               FROM UNNEST($2::text[], $3::bigint[]) AS s(pool_id, seq)
              WHERE p.tenant = $1 AND p.pool_id = s.pool_id",
        )
        .bind(tenant.as_str())
        .bind(&ids)
        .bind(&seqs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets or clears a pool's ceiling.
    pub async fn set_ceiling(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        ceiling: Option<i64>,
    ) -> Result<(), Error> {
        sqlx::query("UPDATE pools SET ceiling = $3 WHERE tenant = $1 AND pool_id = $2")
            .bind(tenant.as_str())
            .bind(pool.as_str())
            .bind(ceiling)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets or clears a pool's low-stock threshold.
    pub async fn set_low_stock_threshold(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        threshold: Option<i64>,
    ) -> Result<bool, Error> {
        let n = sqlx::query(
            "UPDATE pools SET low_stock_threshold = $3 WHERE tenant = $1 AND pool_id = $2",
        )
        .bind(tenant.as_str())
        .bind(pool.as_str())
        .bind(threshold)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}

/// A change of a pool's capacity (see [`PgStore::adjust_capacity`]).
#[derive(Debug, Clone)]
pub struct CapacityChange<'a> {
    /// The caller's id for the change.
    pub adjustment_id: &'a str,
    /// The pool.
    pub pool: &'a PoolId,
    /// Units to add (negative: remove).
    pub delta: i64,
    /// Why (restock, correction...).
    pub reason: &'a str,
    /// Redis's new cumulative `returned` in an epoch, if it gave units back.
    pub returned: Option<(i64, i64)>,
    /// The pool to create with the change if it does not exist yet: in the
    /// change's transaction, so that a change refused for its id (used
    /// for another pool by a call that won a race) creates nothing.
    pub create: Option<&'a NewPool>,
}

/// The insert of `pool` if `tenant` has no pool of its id.
fn insert_pool<'q>(
    tenant: &'q TenantId,
    pool: &'q NewPool,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "INSERT INTO pools (tenant, pool_id, job, capacity, starts_at, ends_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT DO NOTHING",
    )
    .bind(tenant.as_str())
    .bind(pool.pool_id.as_str())
    .bind(pool.job)
    .bind(pool.capacity)
    .bind(pool.starts_at)
    .bind(pool.ends_at)
}

/// An operator's resolution of a pool's units in doubt.
#[derive(Debug, Clone)]
pub struct InDoubtResolution {
    /// The caller's id for it.
    pub resolution_id: String,
    /// The units in doubt the operator checked: all the pool has.
    pub in_doubt: i64,
    /// How many of them were sold.
    pub sold: i64,
}

/// How a resolution of units in doubt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The units in doubt are settled.
    Applied,
    /// This resolution was made before, under the same id: nothing changed.
    Repeated,
    /// The id was used before for another resolution, given here.
    IdTaken {
        /// The pool it settled.
        pool_id: String,
        /// The units in doubt it settled.
        in_doubt: i64,
        /// Of which sold.
        sold: i64,
    },
    /// The pool is unknown, or its units in doubt are not the count given:
    /// nothing changed, and the id stays free.
    Refused,
}

/// How a capacity change went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdjustOutcome {
    /// The capacity changed.
    Applied,
    /// This adjustment id was used before, for this pool and delta.
    Repeated {
        /// The pool it changed.
        pool_id: String,
        /// By how much.
        delta: i64,
    },
    /// The change would put the capacity below what is taken.
    Refused,
}
