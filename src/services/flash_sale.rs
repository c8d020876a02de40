//! Flash sales: a sale's product is the pool `sale/<sale_id>/<product_id>`
//! with the product's unit cap as capacity (unlimited products have none);
//! a claim is a take that sells at once; a cart hold is a take with a time
//! to live. The per-customer limit is a counter `cust:<sale_id>:<customer>`
//! checked and bumped in the same script as the take.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::Cache;
use crate::domain::{Hold, HoldId, Job, Line, Lines, PoolId, Quantity, TakeOutcome, TenantId};
use crate::engine::{Engine, PoolView, Take};
use crate::error::Error;
use crate::store::postgres::{NewSale, SaleRow, product_pool};
use crate::store::redis::CustomerLimit;

/// One requested line: a product of the sale and a quantity.
#[derive(Debug, Clone)]
pub struct ProductLine {
    /// The product's id (already a valid name).
    pub product_id: String,
    /// The quantity.
    pub quantity: Quantity,
}

/// A claim or cart hold, parsed.
#[derive(Debug, Clone)]
pub struct SaleTake {
    /// The claim or hold id.
    pub id: HoldId,
    /// The sale.
    pub sale_id: String,
    /// The shopper, or empty.
    pub customer_id: String,
    /// What to take.
    pub lines: Vec<ProductLine>,
    /// For a cart hold, how long; `None` for a claim.
    pub ttl: Option<Duration>,
}

/// A sale with each product's live counts.
#[derive(Debug, Clone)]
pub struct SaleView {
    /// The definition.
    pub sale: SaleRow,
    /// The counts, one per product in the sale's order.
    pub stock: Vec<PoolView>,
}

/// The flash-sale use cases.
pub struct FlashSales {
    engine: Arc<Engine>,
    /// Sales never change once created, so their definitions are cached:
    /// a claim touches Redis only. A sale missing from the cache is read
    /// once however many claims ask (src/cache.rs).
    sales: Cache<(TenantId, String), Arc<Sale>>,
    max_batch: usize,
}

/// Sales whose definitions are cached at most; past it the cache starts
/// over, and each sale is read once more.
const SALES_CACHED: usize = 10_000;

/// A sale as claims and reads find it: its definition, and its products'
/// unit caps by id, so that a claim (or a read naming products) finds a
/// product in one look-up however many the sale has (it was a scan of the
/// list: up to `--max-batch` string comparisons a product, 500 by
/// default).
struct Sale {
    row: SaleRow,
    products: HashMap<String, Option<i64>>,
}

impl Sale {
    fn new(row: SaleRow) -> Arc<Self> {
        let products = row.products.iter().cloned().collect();
        Arc::new(Self { row, products })
    }
}

impl FlashSales {
    /// Flash sales on top of `engine`.
    pub fn new(engine: Arc<Engine>, max_batch: usize) -> Self {
        Self {
            engine,
            sales: Cache::new(Duration::MAX, SALES_CACHED),
            max_batch,
        }
    }

    /// Creates a sale (idempotent by sale id and definition).
    pub async fn create_sale(&self, tenant: &TenantId, sale: NewSale) -> Result<SaleView, Error> {
        let stored = self.engine.pg().create_sale(tenant, &sale).await?;
        // Grant every pool to Redis now rather than on each pool's first
        // claim: grants are serial, so a stampede over thousands of fresh
        // pools would queue behind them (deploy/BENCHMARKS.md, claim-10k).
        // The sale exists either way; a pool left ungranted is granted on
        // first use.
        let pools: Vec<PoolId> = stored
            .products
            .iter()
            .map(|(p, _)| product_pool(&stored.sale_id, p))
            .collect();
        if let Err(e) = self.engine.sync(tenant, &pools).await {
            tracing::warn!(%tenant, sale = %stored.sale_id, error = %e, "cannot grant the sale's pools yet; they are granted on first use");
        }
        let sale = Sale::new(stored);
        self.sales
            .put((tenant.clone(), sale.row.sale_id.clone()), sale.clone());
        self.view(tenant, &sale.row).await
    }

    /// Reads a sale with its live counts: of `only` its products, in that
    /// order, or of every product when `only` is empty.
    pub async fn get_sale(
        &self,
        tenant: &TenantId,
        sale_id: &str,
        only: &[String],
    ) -> Result<SaleView, Error> {
        let sale = self.sale(tenant, sale_id).await?;
        if only.is_empty() {
            return self.view(tenant, &sale.row).await;
        }
        let mut products = Vec::with_capacity(only.len());
        for (i, p) in only.iter().enumerate() {
            let cap = sale.products.get(p).ok_or_else(|| {
                Error::NotFound(format!("product {p} in sale {sale_id} (product_ids[{i}])"))
            })?;
            products.push((p.clone(), *cap));
        }
        let row = SaleRow {
            products,
            ..sale.row.clone()
        };
        self.view(tenant, &row).await
    }

    /// Claims or holds units of a sale.
    pub async fn take(&self, tenant: &TenantId, req: SaleTake) -> Result<TakeOutcome, Error> {
        let sale = self.sale(tenant, &req.sale_id).await?;
        let mut lines = Vec::with_capacity(req.lines.len());
        for (i, l) in req.lines.iter().enumerate() {
            if !sale.products.contains_key(&l.product_id) {
                return Err(Error::NotFound(format!(
                    "product {} in sale {} (lines[{i}].product_id)",
                    l.product_id, req.sale_id
                )));
            }
            lines.push(Line {
                pool: product_pool(&req.sale_id, &l.product_id),
                quantity: l.quantity,
            });
        }
        let lines = Lines::parse("lines", lines, self.max_batch)?;
        let customer = match (sale.row.per_customer_limit, req.customer_id.is_empty()) {
            (0, _) => None,
            (_, true) => {
                return Err(Error::invalid(
                    "customer_id",
                    format!(
                        "is required: sale {} limits units per customer",
                        req.sale_id
                    ),
                ));
            }
            (limit, false) => Some(CustomerLimit {
                key: format!("cust:{}:{}", req.sale_id, req.customer_id),
                limit,
            }),
        };
        let take = Take {
            id: req.id,
            job: Job::Flash,
            lines,
            ttl: req.ttl,
            customer,
            reference: req.customer_id,
        };
        self.engine.take(tenant, &take).await
    }

    /// Reads a cart hold.
    pub async fn get_hold(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        self.engine.get_hold(tenant, id, Job::Flash).await
    }

    /// Extends a cart hold.
    pub async fn extend_hold(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        ttl: Duration,
        extension_id: &str,
    ) -> Result<Hold, Error> {
        self.engine
            .extend(tenant, id, Job::Flash, ttl, extension_id)
            .await
    }

    /// Commits a cart hold.
    pub async fn commit_hold(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        self.engine.commit(tenant, id, Job::Flash, "").await
    }

    /// Releases a cart hold.
    pub async fn release_hold(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        self.engine.release(tenant, id, Job::Flash).await
    }

    async fn sale(&self, tenant: &TenantId, sale_id: &str) -> Result<Arc<Sale>, Error> {
        let key = (tenant.clone(), sale_id.to_owned());
        self.sales
            .get_or_load(&key, || async {
                let row = self.engine.pg().get_sale(tenant, sale_id).await?;
                let row = row.ok_or_else(|| Error::NotFound(format!("sale {sale_id}")))?;
                Ok(Sale::new(row))
            })
            .await
    }

    async fn view(&self, tenant: &TenantId, sale: &SaleRow) -> Result<SaleView, Error> {
        let pools: Vec<PoolId> = sale
            .products
            .iter()
            .map(|(p, _)| product_pool(&sale.sale_id, p))
            .collect();
        let stock = self.engine.pools(tenant, &pools).await?;
        Ok(SaleView {
            sale: sale.clone(),
            stock,
        })
    }
}

/// The product id inside a sale pool id (`sale/<sale>/<product>`).
pub fn product_of(pool: &PoolId) -> &str {
    pool.as_str().rsplit('/').next().unwrap_or_default()
}
