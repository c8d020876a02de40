//! `holdfast.v1.FlashSaleService`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::{self, ms_timestamp, to_timestamp};
use super::pb::flash_sale_service_server::FlashSaleService;
use super::pb::{self, Outcome};
use super::{meter, observe};
use crate::domain::{Hold, HoldId, Limits, Quantity, TakeOutcome, check_batch, parse_name};
use crate::error::Error;
use crate::services::flash_sale::{FlashSales, ProductLine, SaleTake, SaleView, product_of};
use crate::store::postgres::NewSale;

const SERVICE: &str = "FlashSaleService";
/// Longest sale and product id.
const NAME_LEN: usize = 64;

/// The adapter from gRPC to [`FlashSales`].
pub struct FlashSaleApi {
    sales: Arc<FlashSales>,
    auth: Arc<Auth>,
    limits: Limits,
}

impl FlashSaleApi {
    /// An adapter over `sales`.
    pub fn new(sales: Arc<FlashSales>, auth: Arc<Auth>, limits: Limits) -> Self {
        Self {
            sales,
            auth,
            limits,
        }
    }

    fn hold_id(&self, field: &str, value: &str) -> Result<HoldId, Error> {
        HoldId::parse(field, value, self.limits.max_id_len)
    }

    /// A claim's (`ttl` `None`) or a cart hold's take, its request's
    /// fields checked.
    fn take(
        &self,
        id: HoldId,
        ttl: Option<Duration>,
        sale_id: String,
        customer_id: String,
        lines: Vec<pb::ClaimLine>,
    ) -> Result<SaleTake, Error> {
        Ok(SaleTake {
            id,
            sale_id: parse_name("sale_id", &sale_id, NAME_LEN)?,
            customer_id: convert::optional_name(
                "customer_id",
                customer_id,
                self.limits.max_id_len,
            )?,
            lines: self.lines(lines)?,
            ttl,
        })
    }

    fn lines(&self, lines: Vec<pb::ClaimLine>) -> Result<Vec<ProductLine>, Error> {
        check_batch("lines", lines.len(), self.limits.max_batch, "line")?;
        lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(ProductLine {
                    product_id: parse_name(
                        &format!("lines[{i}].product_id"),
                        &l.product_id,
                        NAME_LEN,
                    )?,
                    quantity: Quantity::parse(
                        &format!("lines[{i}].quantity"),
                        l.quantity,
                        self.limits.max_quantity,
                    )?,
                })
            })
            .collect()
    }

    /// A read's `product_ids`: none (every product), or at most
    /// `max_batch` distinct ones.
    fn product_ids(&self, ids: &[String]) -> Result<Vec<String>, Error> {
        let max = self.limits.max_batch;
        if ids.len() > max {
            return Err(Error::invalid(
                "product_ids",
                format!("must have at most {max} products, got {}", ids.len()),
            ));
        }
        let mut parsed: Vec<String> = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let field = format!("product_ids[{i}]");
            let id = parse_name(&field, id, NAME_LEN)?;
            if parsed.contains(&id) {
                return Err(Error::invalid(field, format!("{id} appears twice")));
            }
            parsed.push(id);
        }
        Ok(parsed)
    }

    fn create_sale_request(&self, r: pb::CreateSaleRequest) -> Result<NewSale, Error> {
        let sale_id = parse_name("sale_id", &r.sale_id, NAME_LEN)?;
        let name = convert::text("name", r.name, 200)?;
        let starts_at = convert::timestamp("starts_at", r.starts_at)?;
        let ends_at = convert::timestamp("ends_at", r.ends_at)?;
        if ends_at <= starts_at {
            return Err(Error::invalid("ends_at", "must be after starts_at"));
        }
        let max = self.limits.max_batch;
        check_batch("products", r.products.len(), max, "product")?;
        let mut products: Vec<(String, Option<i64>)> = Vec::with_capacity(r.products.len());
        for (i, p) in r.products.into_iter().enumerate() {
            let id = parse_name(
                &format!("products[{i}].product_id"),
                &p.product_id,
                NAME_LEN,
            )?;
            if products.iter().any(|(seen, _)| *seen == id) {
                return Err(Error::invalid(
                    format!("products[{i}].product_id"),
                    format!("{id} appears twice"),
                ));
            }
            if let Some(cap) = p.unit_cap
                && !(0..=i64::from(u32::MAX) * 1000).contains(&cap)
            {
                return Err(Error::invalid(
                    format!("products[{i}].unit_cap"),
                    format!(
                        "must be between 0 and {}, got {cap}",
                        i64::from(u32::MAX) * 1000
                    ),
                ));
            }
            products.push((id, p.unit_cap));
        }
        // Postgres keeps the limit as an integer; a larger one is no limit
        // in practice, and stored clamped it would make a retry differ.
        if i32::try_from(r.per_customer_limit).is_err() {
            return Err(Error::invalid(
                "per_customer_limit",
                format!("must be at most {}, or 0 for none", i32::MAX),
            ));
        }
        Ok(NewSale {
            sale_id,
            name,
            starts_at,
            ends_at,
            products,
            per_customer_limit: r.per_customer_limit,
        })
    }
}

fn sale_pb(v: SaleView) -> pb::Sale {
    pb::Sale {
        sale_id: v.sale.sale_id.clone(),
        name: v.sale.name.clone(),
        starts_at: Some(to_timestamp(v.sale.starts_at)),
        ends_at: Some(to_timestamp(v.sale.ends_at)),
        per_customer_limit: v.sale.per_customer_limit,
        products: v
            .stock
            .iter()
            .map(|s| pb::ProductStock {
                product_id: product_of(&s.pool).to_owned(),
                unlimited: s.capacity.is_none(),
                unit_cap: s.capacity.unwrap_or(0),
                sold: s.sold,
                held: s.held,
                remaining: s.available,
                in_doubt: s.in_doubt,
            })
            .collect(),
    }
}

fn hold_pb(h: Hold) -> pb::CartHold {
    let sale_id = h
        .lines
        .first()
        .and_then(|(p, _)| p.as_str().split('/').nth(1))
        .unwrap_or_default()
        .to_owned();
    pb::CartHold {
        hold_id: h.id.to_string(),
        sale_id,
        lines: h
            .lines
            .iter()
            .map(|(p, q)| pb::ClaimLine {
                product_id: product_of(p).to_owned(),
                quantity: *q,
            })
            .collect(),
        state: convert::hold_state(h.state) as i32,
        expires_at: Some(ms_timestamp(h.expires_at_ms)),
        extensions: h.extensions,
    }
}

/// What a claim and a cart hold answer alike.
struct Answer {
    outcome: Outcome,
    /// Each short line, when sold out.
    shortages: Vec<pb::Shortage>,
    /// The customer's units already taken, when over their limit.
    customer_units: i64,
    /// The hold, when taken.
    taken: Option<Hold>,
}

impl Answer {
    fn of(outcome: TakeOutcome) -> Self {
        let ok = Answer {
            outcome: Outcome::Ok,
            shortages: Vec::new(),
            customer_units: 0,
            taken: None,
        };
        match outcome {
            TakeOutcome::Taken(hold) => Answer {
                taken: Some(hold),
                ..ok
            },
            TakeOutcome::SoldOut(short) => Answer {
                outcome: Outcome::SoldOut,
                shortages: shortages(short),
                ..ok
            },
            TakeOutcome::NotActive(_) => Answer {
                outcome: Outcome::NotActive,
                ..ok
            },
            TakeOutcome::CustomerLimit(used) => Answer {
                outcome: Outcome::CustomerLimit,
                customer_units: used,
                ..ok
            },
        }
    }
}

fn shortages(short: Vec<crate::domain::Shortage>) -> Vec<pb::Shortage> {
    short
        .into_iter()
        .map(|s| pb::Shortage {
            product_id: product_of(&s.pool).to_owned(),
            requested: s.requested,
            available: s.available,
        })
        .collect()
}

#[tonic::async_trait]
impl FlashSaleService for FlashSaleApi {
    async fn create_sale(
        &self,
        request: Request<pb::CreateSaleRequest>,
    ) -> Result<Response<pb::CreateSaleResponse>, Status> {
        observe(meter!(SERVICE, "CreateSale"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().sale_id)
                .await?;
            let sale = self.create_sale_request(request.into_inner())?;
            let view = self.sales.create_sale(&caller.tenant, sale).await?;
            Ok(pb::CreateSaleResponse {
                sale: Some(sale_pb(view)),
            })
        })
        .await
    }

    async fn get_sale(
        &self,
        request: Request<pb::GetSaleRequest>,
    ) -> Result<Response<pb::GetSaleResponse>, Status> {
        observe(meter!(SERVICE, "GetSale"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().sale_id)
                .await?;
            let sale_id = parse_name("sale_id", &request.get_ref().sale_id, NAME_LEN)?;
            let only = self.product_ids(&request.get_ref().product_ids)?;
            let view = self.sales.get_sale(&caller.tenant, &sale_id, &only).await?;
            Ok(pb::GetSaleResponse {
                sale: Some(sale_pb(view)),
            })
        })
        .await
    }

    async fn claim(
        &self,
        request: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        observe(meter!(SERVICE, "Claim"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().claim_id)
                .await?;
            let r = request.into_inner();
            let id = self.hold_id("claim_id", &r.claim_id)?;
            let take = self.take(id, None, r.sale_id, r.customer_id, r.lines)?;
            let a = Answer::of(self.sales.take(&caller.tenant, take).await?);
            Ok(pb::ClaimResponse {
                outcome: a.outcome.into(),
                shortages: a.shortages,
                claimed_at: a.taken.map(|hold| ms_timestamp(hold.created_at_ms)),
                customer_units: a.customer_units,
            })
        })
        .await
    }

    async fn create_cart_hold(
        &self,
        request: Request<pb::CreateCartHoldRequest>,
    ) -> Result<Response<pb::CreateCartHoldResponse>, Status> {
        observe(meter!(SERVICE, "CreateCartHold"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().hold_id)
                .await?;
            let r = request.into_inner();
            let id = self.hold_id("hold_id", &r.hold_id)?;
            let ttl = convert::ttl("ttl", r.ttl, &self.limits)?;
            let take = self.take(id, Some(ttl), r.sale_id, r.customer_id, r.lines)?;
            let a = Answer::of(self.sales.take(&caller.tenant, take).await?);
            Ok(pb::CreateCartHoldResponse {
                outcome: a.outcome.into(),
                hold: a.taken.map(hold_pb),
                shortages: a.shortages,
                customer_units: a.customer_units,
            })
        })
        .await
    }

    async fn get_cart_hold(
        &self,
        request: Request<pb::GetCartHoldRequest>,
    ) -> Result<Response<pb::GetCartHoldResponse>, Status> {
        observe(meter!(SERVICE, "GetCartHold"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().hold_id)
                .await?;
            let id = self.hold_id("hold_id", &request.get_ref().hold_id)?;
            let hold = self.sales.get_hold(&caller.tenant, &id).await?;
            Ok(pb::GetCartHoldResponse {
                hold: Some(hold_pb(hold)),
            })
        })
        .await
    }

    async fn extend_cart_hold(
        &self,
        request: Request<pb::ExtendCartHoldRequest>,
    ) -> Result<Response<pb::ExtendCartHoldResponse>, Status> {
        observe(meter!(SERVICE, "ExtendCartHold"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().hold_id)
                .await?;
            let r = request.into_inner();
            let id = self.hold_id("hold_id", &r.hold_id)?;
            let ttl = convert::ttl("ttl", r.ttl, &self.limits)?;
            let extension_id =
                convert::optional_name("extension_id", r.extension_id, self.limits.max_id_len)?;
            let hold = self
                .sales
                .extend_hold(&caller.tenant, &id, ttl, &extension_id)
                .await?;
            Ok(pb::ExtendCartHoldResponse {
                hold: Some(hold_pb(hold)),
            })
        })
        .await
    }

    async fn commit_cart_hold(
        &self,
        request: Request<pb::CommitCartHoldRequest>,
    ) -> Result<Response<pb::CommitCartHoldResponse>, Status> {
        observe(meter!(SERVICE, "CommitCartHold"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().hold_id)
                .await?;
            let id = self.hold_id("hold_id", &request.get_ref().hold_id)?;
            let hold = self.sales.commit_hold(&caller.tenant, &id).await?;
            Ok(pb::CommitCartHoldResponse {
                hold: Some(hold_pb(hold)),
            })
        })
        .await
    }

    async fn release_cart_hold(
        &self,
        request: Request<pb::ReleaseCartHoldRequest>,
    ) -> Result<Response<pb::ReleaseCartHoldResponse>, Status> {
        observe(meter!(SERVICE, "ReleaseCartHold"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().hold_id)
                .await?;
            let id = self.hold_id("hold_id", &request.get_ref().hold_id)?;
            let hold = self.sales.release_hold(&caller.tenant, &id).await?;
            Ok(pb::ReleaseCartHoldResponse {
                hold: Some(hold_pb(hold)),
            })
        })
        .await
    }
}
