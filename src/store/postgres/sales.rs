//! Flash sales: a sale row, its products, and one pool per product.

use chrono::{DateTime, Utc};

use super::{NewPool, PgStore};
use crate::domain::{PoolId, TenantId};
use crate::error::Error;

/// A sale to create, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSale {
    /// The sale's id.
    pub sale_id: String,
    /// Its name.
    pub name: String,
    /// Claims open.
    pub starts_at: DateTime<Utc>,
    /// Claims close (exclusive).
    pub ends_at: DateTime<Utc>,
    /// Products and their caps (`None`: unlimited), in order.
    pub products: Vec<(String, Option<i64>)>,
    /// Most units per customer, 0 for none.
    pub per_customer_limit: u32,
}

/// A stored sale: its definition, as given.
pub type SaleRow = NewSale;

/// The pool of one product of a sale.
pub fn product_pool(sale_id: &str, product_id: &str) -> PoolId {
    PoolId::from_parts(&["sale", sale_id, product_id])
}

impl PgStore {
    /// Creates a sale with its pools, or returns the existing one when the
    /// same definition was created before (an idempotent retry). A different
    /// definition under the same id is ALREADY_EXISTS.
    pub async fn create_sale(&self, tenant: &TenantId, sale: &NewSale) -> Result<SaleRow, Error> {
        self.ensure_tenant(tenant).await?;
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO sales (tenant, sale_id, name, starts_at, ends_at, per_customer_limit)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(&sale.sale_id)
        .bind(&sale.name)
        .bind(sale.starts_at)
        .bind(sale.ends_at)
        .bind(i32::try_from(sale.per_customer_limit).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            let existing = self
                .get_sale(tenant, &sale.sale_id)
                .await?
                .ok_or_else(|| Error::internal("sale vanished after a conflicting insert"))?;
            if existing == *sale {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "sale {} already exists with a different definition",
                sale.sale_id
            )));
        }
        for (position, (product_id, _)) in sale.products.iter().enumerate() {
            sqlx::query("INSERT INTO sale_products (tenant, sale_id, product_id, position) VALUES ($1, $2, $3, $4)")
                .bind(tenant.as_str())
                .bind(&sale.sale_id)
                .bind(product_id)
                .bind(i32::try_from(position).unwrap_or(i32::MAX))
                .execute(&mut *tx)
                .await?;
        }
        let pools: Vec<NewPool> = sale
            .products
            .iter()
            .map(|(product_id, cap)| NewPool {
                pool_id: product_pool(&sale.sale_id, product_id),
                job: "flash",
                capacity: *cap,
                starts_at: Some(sale.starts_at),
                ends_at: Some(sale.ends_at),
            })
            .collect();
        Self::insert_pools(&mut tx, tenant, &pools).await?;
        tx.commit().await?;
        Ok(sale.clone())
    }

    /// Reads a sale's definition.
    pub async fn get_sale(
        &self,
        tenant: &TenantId,
        sale_id: &str,
    ) -> Result<Option<SaleRow>, Error> {
        let head: Option<(String, DateTime<Utc>, DateTime<Utc>, i32)> =
            sqlx::query_as("SELECT name, starts_at, ends_at, per_customer_limit FROM sales WHERE tenant = $1 AND sale_id = $2")
                .bind(tenant.as_str())
                .bind(sale_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((name, starts_at, ends_at, limit)) = head else {
            return Ok(None);
        };
        let products: Vec<(String, Option<i64>)> = sqlx::query_as(
            "SELECT sp.product_id, p.capacity
             FROM sale_products sp
             JOIN pools p ON p.tenant = sp.tenant AND p.pool_id = 'sale/' || sp.sale_id || '/' || sp.product_id
             WHERE sp.tenant = $1 AND sp.sale_id = $2
             ORDER BY sp.position",
        )
        .bind(tenant.as_str())
        .bind(sale_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(NewSale {
            sale_id: sale_id.to_owned(),
            name,
            starts_at,
            ends_at,
            products,
            per_customer_limit: u32::try_from(limit).unwrap_or(0),
        }))
    }
}
