//! Operators' changes to what a pool can sell: a capacity raised, lowered
//! or set to a count ([`Engine::adjust_capacity`]), and units in doubt
//! resolved ([`Engine::resolve_in_doubt`]). Each writes one store and then
//! the other, so each runs `serially` with the grants (escrow.rs), and
//! each ends by bringing the pool to Redis as it now stands.

use super::Engine;
use super::escrow::{Counts, view};
use crate::domain::{PoolId, TenantId};
use crate::error::Error;
use crate::store::postgres::{
    AdjustOutcome, CapacityChange, InDoubtResolution, NewPool, PoolRow, Resolution,
};
use crate::store::redis::ReturnReply;

/// A capacity change ([`Engine::adjust_capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// Add these units (negative: remove).
    By(i64),
    /// Set the capacity to this, from what it is when the change runs.
    To(i64),
    /// Set what is left unsold (capacity less what both stores sold) to
    /// this, from what it is when the change runs: a stock count.
    Unsold(i64),
}

impl Engine {
    /// An operator states how many of a pool's units in doubt were really
    /// sold, having checked `r.in_doubt` of them; the rest become available
    /// again. Refused when the pool has another count in doubt now. A
    /// retry under the same id changes nothing but finishes the job (loads
    /// the pool into Redis); the same id for another resolution is
    /// ALREADY_EXISTS. Runs `serially`.
    pub async fn resolve_in_doubt(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        r: &InDoubtResolution,
    ) -> Result<(), Error> {
        let (owned, pool, r) = (tenant.clone(), pool.clone(), r.clone());
        self.serially(tenant, None, move |me| async move {
            me.resolve_in_doubt_locked(&owned, &pool, &r).await
        })
        .await
    }

    async fn resolve_in_doubt_locked(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        r: &InDoubtResolution,
    ) -> Result<(), Error> {
        match self.pg.resolve_in_doubt(tenant, pool, r).await? {
            Resolution::Applied | Resolution::Repeated => {}
            Resolution::IdTaken {
                pool_id,
                in_doubt,
                sold,
            } => {
                return Err(Error::AlreadyExists(format!(
                    "resolution {} already settled {in_doubt} units in doubt of {pool_id}, {sold} of them sold; use a new id",
                    r.resolution_id
                )));
            }
            Resolution::Refused => {
                let row = self
                    .pg
                    .get_pools(tenant, std::slice::from_ref(pool))
                    .await?
                    .pop();
                return Err(match row {
                    None => Error::NotFound(format!("pool {pool}")),
                    Some(row) => Error::FailedPrecondition(format!(
                        "pool {pool} has {} units in doubt, not {}: look again and resolve what is there",
                        row.in_doubt, r.in_doubt
                    )),
                });
            }
        }
        self.sync_locked(tenant, &[(pool.clone(), 0)]).await
    }

    /// Changes a pool's capacity by or to `change` (idempotent by
    /// `adjustment_id`). Growing: Postgres first, then the new units are
    /// granted to Redis. Shrinking: Redis hands back what Postgres lacks
    /// first (ESCROW.md "Return"), then Postgres lowers the capacity under
    /// its guard. Refused with FAILED_PRECONDITION when the pool would end up
    /// with less than is sold and held. Runs `serially`, so a
    /// change whose caller gave up still lands in both stores, and, under
    /// a lock in Postgres, after any other daemon's change to the pool: a
    /// change *to* a capacity is weighed against the capacity the one
    /// before it left (two at once added up).
    ///
    /// `create`, if given, is the pool (of id `pool`) to create with the
    /// change when there is none yet, in the transaction that records the
    /// change: a first stock count. Without it, an unknown pool is
    /// NOT_FOUND.
    pub async fn adjust_capacity(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        change: Capacity,
        adjustment_id: &str,
        reason: &str,
        create: Option<NewPool>,
    ) -> Result<AdjustOutcome, Error> {
        // Another daemon's change to this pool goes first
        // (`lock_capacity_changes`). The lock is taken before the tenant's
        // grant lock in this daemon, so that waiting for it holds up none
        // of the tenant's grants here, and the work keeps it to its end,
        // even when its caller goes away.
        let order = self.pg.lock_capacity_changes(tenant, pool).await?;
        let (owned, pool) = (tenant.clone(), pool.clone());
        let (adjustment_id, reason) = (adjustment_id.to_owned(), reason.to_owned());
        self.serially(tenant, None, move |me| async move {
            let create = create.as_ref();
            let changed = me
                .adjust_capacity_locked(&owned, &pool, change, &adjustment_id, &reason, create)
                .await;
            // A commit that fails ends the session, which lets go too.
            let _ = order.commit().await;
            changed
        })
        .await
    }

    async fn adjust_capacity_locked(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        change: Capacity,
        adjustment_id: &str,
        reason: &str,
        create: Option<&NewPool>,
    ) -> Result<AdjustOutcome, Error> {
        // A retry is answered from the record, before anything is weighed
        // against the pool as it is now: since the change, its units may
        // have been sold, and a retry that asked Redis for units back would
        // be refused, or take units Postgres then never hears of.
        if let Some(repeated) = self.pg.adjustment(tenant, adjustment_id).await? {
            return Ok(repeated);
        }
        // A pool that exists needs no creating: only a missing one goes to
        // the change's transaction to be made there.
        let (row, create) = match (
            self.pg
                .get_pools(tenant, std::slice::from_ref(pool))
                .await?
                .pop(),
            create,
        ) {
            (Some(row), _) => (row, None),
            (None, Some(new)) => (PoolRow::unsaved(new), Some(new)),
            (None, None) => return Err(Error::NotFound(format!("pool {pool}"))),
        };
        let delta = match change {
            Capacity::By(delta) => delta,
            Capacity::To(capacity) => capacity - row.capacity.unwrap_or(0),
            Capacity::Unsold(unsold) => {
                let redis = self
                    .redis
                    .get_pools(tenant, std::slice::from_ref(pool))
                    .await?;
                // Redis's own count: a level set from a guess would be wrong.
                let counts = Counts::Read(redis.first().and_then(Option::as_ref));
                let sold = view(pool, &row, counts).sold;
                unsold - (row.capacity.unwrap_or(0) - sold)
            }
        };
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
            create,
        };
        let outcome = self.pg.adjust_capacity(tenant, &change).await?;
        // A change another call made under this id (it won a race since
        // the check above) changed nothing here, and may name another pool.
        if let AdjustOutcome::Repeated { .. } = outcome {
            return Ok(outcome);
        }
        self.sync_locked(tenant, &[(pool.clone(), 0)]).await?;
        if outcome == AdjustOutcome::Refused {
            return Err(Error::FailedPrecondition(format!(
                "cannot change {pool} by {delta}: it would drop below the units sold and held"
            )));
        }
        Ok(outcome)
    }
}
