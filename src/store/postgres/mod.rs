//! Postgres, the system of record. One module per aggregate; queries are
//! checked at run time (no database needed to build), and each constraint
//! violation that a caller can cause is turned into a domain error where the
//! query runs.

mod audit;
mod channels;
mod fallback;
mod keys;
mod listings;
mod lock_sales;
mod lost;
mod outbox;
mod pools;
mod sales;
mod statistics;
mod take_queue;
mod venues;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use audit::{AuditFilter, AuditRow};
pub use channels::{CardOnChannel, CardState, Listing, Satellite};
pub use fallback::{PgTake, SERVED_BY_FAST_PATH, Twin};
pub use keys::ApiKeyRow;
pub use listings::{Drift, DriftRow, EngageCard, EngageOutcome};
pub use lost::AuditedTake;
pub use outbox::{Behind, DeliveryRow, DeliveryState, DueDelivery, queued_for};
pub use pools::{AdjustOutcome, CapacityChange, InDoubtResolution, NewPool, PoolRow, Resolution};
pub use sales::{NewSale, SaleRow, product_pool};
pub use statistics::TABLES;
pub use take_queue::TakeQueue;
pub use venues::{ScheduleRows, VenueRow};

use crate::domain::TenantId;
use crate::error::Error;

/// The embedded migrations under `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The Postgres side: a connection pool and the queries.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects lazily-checked: fails fast if the server cannot be reached
    /// within `timeout`.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect(url)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot connect to postgres: {e}")))?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Starts a transaction, recording how long the pool made us wait for
    /// a connection (the `holdfast_pool_wait_seconds{pool="postgres"}`
    /// histogram: a busy pool shows there first).
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let started = std::time::Instant::now();
        let tx = self.pool.begin().await;
        metrics::histogram!(crate::telemetry::metric::POOL_WAIT_SECONDS, "pool" => "postgres")
            .record(started.elapsed().as_secs_f64());
        tx
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Postgres's clock: what its `now()` stamps rows with.
    pub async fn now(&self) -> Result<chrono::DateTime<chrono::Utc>, Error> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Runs the embedded migrations.
    pub async fn migrate(&self) -> Result<(), Error> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::Internal(e.into()))
    }

    /// Makes sure the tenant exists (tenants are created on first use).
    pub async fn ensure_tenant(&self, tenant: &TenantId) -> Result<(), Error> {
        sqlx::query("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(tenant.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every tenant, for the background jobs that visit each one.
    pub async fn tenants(&self) -> Result<Vec<TenantId>, Error> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|(id,)| TenantId::parse(&id)).collect()
    }
}
