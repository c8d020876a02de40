//! Pools and their escrow ledger (ESCROW.md).

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::PgStore;
use crate::domain::{PoolId, TenantId};
use crate::error::Error;

/// A pool to create.
#[derive(Debug, Clone)]
pub struct NewPool {
    /// Its id.
    pub pool_id: PoolId,
    /// The job it serves (`flash`, `stock`, ...).
    pub job: &'static str,
    /// Its capacity; `None` for unlimited.
    pub capacity: Option<i64>,
    /// The window in which it may be taken from, if any.
    pub window: Option<(DateTime<Utc>, DateTime<Utc>)>,
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
}

impl PoolRow {
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

const COLUMNS: &str = "pool_id, capacity, starts_at, ends_at, sold_pg, held_pg, epoch, granted, returned, reported_sold, sold_prior, in_doubt";

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
                .bind(p.window.map(|w| w.0))
                .bind(p.window.map(|w| w.1))
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

    /// Delegates `k` more units to Redis in `epoch` (ESCROW.md "Refill":
    /// Postgres first). The guard re-checks the invariant on the row itself,
    /// so two daemons granting at once cannot overdraw. Returns the new
    /// cumulative grant, or `None` when the guard refused.
    pub async fn grant(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        epoch: i64,
        k: i64,
    ) -> Result<Option<i64>, Error> {
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE pools SET granted = granted + $4
             WHERE tenant = $1 AND pool_id = $2 AND epoch = $3
               AND (capacity IS NULL
                    OR sold_pg + held_pg + sold_prior + in_doubt + (granted + $4 - returned) <= capacity)
             RETURNING granted",
        )
        .bind(tenant.as_str())
        .bind(pool.as_str())
        .bind(epoch)
        .bind(k)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Opens a new epoch after Redis lost the pool (ESCROW.md "Losing
    /// Redis"): what the old epoch had granted and not reported sold becomes
    /// in doubt, never resold until an operator resolves it.
    pub async fn open_epoch(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        lost_epoch: i64,
    ) -> Result<PoolRow, Error> {
        let row = sqlx::query_as::<_, PoolRow>(&format!(
            "UPDATE pools SET
                 epoch = epoch + 1,
                 in_doubt = in_doubt + GREATEST(granted - returned - reported_sold, 0),
                 sold_prior = sold_prior + reported_sold,
                 granted = 0, returned = 0, reported_sold = 0
             WHERE tenant = $1 AND pool_id = $2 AND epoch = $3
             RETURNING {COLUMNS}"
        ))
        .bind(tenant.as_str())
        .bind(pool.as_str())
        .bind(lost_epoch)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(r),
            // Someone else opened it first: read what they left.
            None => self
                .get_pools(tenant, std::slice::from_ref(pool))
                .await?
                .pop()
                .ok_or_else(|| Error::NotFound(format!("pool {pool}"))),
        }
    }
}
