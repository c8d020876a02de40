//! Stock reservations: a product's stock (per optional variant) is the pool
//! `stock/<product>` or `stock/<product>/<variant>`, whose capacity is every
//! unit ever stocked; on hand is capacity minus sold. A reservation is a hold
//! with a time to live; consuming it is a commit carrying the order id.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Hold, HoldId, Job, Line, Lines, PoolId, Quantity, TakeOutcome, TenantId};
use crate::engine::{Capacity, Engine, PoolView, Take};
use crate::error::Error;
use crate::store::postgres::{AdjustOutcome, AuditFilter, AuditRow, NewPool};

/// A product, and optionally one of its variants (both valid names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockKey {
    /// The product.
    pub product_id: String,
    /// The variant, or empty.
    pub variant_id: String,
}

impl StockKey {
    /// The pool holding this product's stock.
    pub fn pool(&self) -> PoolId {
        if self.variant_id.is_empty() {
            PoolId::from_parts(&["stock", &self.product_id])
        } else {
            PoolId::from_parts(&["stock", &self.product_id, &self.variant_id])
        }
    }

    /// The key of a stock pool id (`stock/<product>[/<variant>]`).
    pub fn of_pool(pool: &PoolId) -> Self {
        let mut parts = pool.as_str().splitn(3, '/').skip(1);
        Self {
            product_id: parts.next().unwrap_or_default().to_owned(),
            variant_id: parts.next().unwrap_or_default().to_owned(),
        }
    }
}

/// A product's stock as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockLevel {
    /// Which product.
    pub key: StockKey,
    /// Units not yet consumed by an order.
    pub on_hand: i64,
    /// Units in active reservations.
    pub reserved: i64,
    /// Units that can be reserved now.
    pub available: i64,
    /// Units consumed by orders.
    pub sold: i64,
    /// Units in doubt after a store failure.
    pub in_doubt: i64,
    /// The low-stock threshold, if set.
    pub low_stock_threshold: Option<i64>,
}

impl StockLevel {
    fn of(view: &PoolView) -> Self {
        Self {
            key: StockKey::of_pool(&view.pool),
            on_hand: view.capacity.unwrap_or(0) - view.sold,
            reserved: view.held,
            available: view.available,
            sold: view.sold,
            in_doubt: view.in_doubt,
            low_stock_threshold: view.low_stock_threshold,
        }
    }
}

/// One line of a reservation.
#[derive(Debug, Clone)]
pub struct StockLine {
    /// The product.
    pub key: StockKey,
    /// The units.
    pub quantity: Quantity,
}

/// The stock-reservation use cases.
pub struct Reservations {
    engine: Arc<Engine>,
    max_batch: usize,
}

impl Reservations {
    /// Reservations on top of `engine`.
    pub fn new(engine: Arc<Engine>, max_batch: usize) -> Self {
        Self { engine, max_batch }
    }

    /// Sets on-hand units, creating the product's stock on first use.
    pub async fn set_stock(
        &self,
        tenant: &TenantId,
        key: &StockKey,
        on_hand: i64,
        adjustment_id: &str,
        reason: &str,
    ) -> Result<StockLevel, Error> {
        let pool = key.pool();
        // Recorded even when nothing changes, so that the id is taken. A
        // retry, or an id already used for another product, is answered
        // from that record before anything is weighed; a first count
        // creates the product's stock in the transaction that records it,
        // so one refused for its id (another call took it first) leaves no
        // stock behind.
        let new = NewPool {
            pool_id: pool.clone(),
            job: Job::Stock.as_str(),
            capacity: Some(0),
            starts_at: None,
            ends_at: None,
        };
        let outcome = self
            .engine
            .adjust_capacity(
                tenant,
                &pool,
                Capacity::Unsold(on_hand),
                adjustment_id,
                reason,
                Some(new),
            )
            .await?;
        // A retry is relative to the stock as it is now: only the product
        // must be the same.
        same_change(&outcome, &pool, None, adjustment_id)?;
        self.level(tenant, key).await
    }

    /// Adds or removes on-hand units.
    pub async fn adjust_stock(
        &self,
        tenant: &TenantId,
        key: &StockKey,
        delta: i64,
        adjustment_id: &str,
        reason: &str,
    ) -> Result<StockLevel, Error> {
        let pool = key.pool();
        let outcome = self
            .engine
            .adjust_capacity(
                tenant,
                &pool,
                Capacity::By(delta),
                adjustment_id,
                reason,
                None,
            )
            .await?;
        same_change(&outcome, &pool, Some(delta), adjustment_id)?;
        self.level(tenant, key).await
    }

    /// Reads stock levels, in the order asked.
    pub async fn levels(
        &self,
        tenant: &TenantId,
        keys: &[StockKey],
    ) -> Result<Vec<StockLevel>, Error> {
        let pools: Vec<PoolId> = keys.iter().map(StockKey::pool).collect();
        let views = self
            .engine
            .pools(tenant, &pools)
            .await
            .map_err(|e| match e {
                Error::NotFound(what) => {
                    Error::NotFound(format!("stock of {}", what.trim_start_matches("pool ")))
                }
                other => other,
            })?;
        Ok(views.iter().map(StockLevel::of).collect())
    }

    async fn level(&self, tenant: &TenantId, key: &StockKey) -> Result<StockLevel, Error> {
        let mut levels = self.levels(tenant, std::slice::from_ref(key)).await?;
        levels
            .pop()
            .ok_or_else(|| Error::internal("one level per key"))
    }

    /// Sets or clears the low-stock threshold.
    pub async fn set_threshold(
        &self,
        tenant: &TenantId,
        key: &StockKey,
        threshold: Option<i64>,
    ) -> Result<StockLevel, Error> {
        let pool = key.pool();
        if !self
            .engine
            .pg()
            .set_low_stock_threshold(tenant, &pool, threshold)
            .await?
        {
            return Err(Error::NotFound(format!("stock of {pool}")));
        }
        self.engine
            .sync(tenant, std::slice::from_ref(&pool))
            .await?;
        self.level(tenant, key).await
    }

    /// Reserves a batch of lines for `ttl`.
    pub async fn reserve(
        &self,
        tenant: &TenantId,
        id: HoldId,
        reference: String,
        lines: Vec<StockLine>,
        ttl: Duration,
    ) -> Result<TakeOutcome, Error> {
        let lines = lines
            .into_iter()
            .map(|l| Line {
                pool: l.key.pool(),
                quantity: l.quantity,
            })
            .collect();
        let take = Take {
            id,
            job: Job::Stock,
            lines: Lines::parse("lines", lines, self.max_batch)?,
            ttl: Some(ttl),
            customer: None,
            reference,
        };
        self.engine.take(tenant, &take).await.map_err(|e| match e {
            Error::NotFound(what) => Error::NotFound(format!(
                "stock of {} (set it with SetStock first)",
                what.trim_start_matches("pool ")
            )),
            other => other,
        })
    }

    /// Reads a reservation.
    pub async fn get(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        self.engine
            .get_hold(tenant, id, Job::Stock)
            .await
            .map_err(reservation_words)
    }

    /// Extends a reservation.
    pub async fn extend(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        ttl: Duration,
        extension_id: &str,
    ) -> Result<Hold, Error> {
        self.engine
            .extend(tenant, id, Job::Stock, ttl, extension_id)
            .await
            .map_err(reservation_words)
    }

    /// Consumes a reservation for an order.
    pub async fn consume(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        order_id: &str,
    ) -> Result<Hold, Error> {
        self.engine
            .commit(tenant, id, Job::Stock, order_id)
            .await
            .map_err(reservation_words)
    }

    /// Releases a reservation.
    pub async fn release(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        self.engine
            .release(tenant, id, Job::Stock)
            .await
            .map_err(reservation_words)
    }

    /// Pages the audit log of stock events.
    pub async fn audit(
        &self,
        tenant: &TenantId,
        key: Option<&StockKey>,
        reference: Option<&str>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRow>, Error> {
        let pool = key.map(StockKey::pool);
        let filter = AuditFilter {
            job: Job::Stock.as_str(),
            pool: pool.as_ref().map(PoolId::as_str),
            reference,
            after,
            limit,
        };
        self.engine.pg().audit_page(tenant, &filter).await
    }
}

/// An engine error about a hold, in a reservation's words.
fn reservation_words(e: Error) -> Error {
    super::in_words(e, "reservation", "consumed")
}

/// Whether an adjustment's `outcome` is this change: a retry (the id was
/// used before for the same `pool` and, if given, `delta`) gets the stock
/// as it is now; an id used before for another change is ALREADY_EXISTS.
fn same_change(
    outcome: &AdjustOutcome,
    pool: &PoolId,
    delta: Option<i64>,
    adjustment_id: &str,
) -> Result<(), Error> {
    match outcome {
        AdjustOutcome::Repeated {
            pool_id,
            delta: first,
        } if pool_id != pool.as_str() || delta.is_some_and(|d| d != *first) => {
            Err(Error::AlreadyExists(format!(
                "adjustment_id {adjustment_id} was used for another change: {first:+} units of {pool_id}"
            )))
        }
        _ => Ok(()),
    }
}
