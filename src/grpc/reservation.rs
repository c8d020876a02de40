//! `holdfast.v1.ReservationService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::{self, ms_timestamp, to_timestamp};
use super::pb::reservation_service_server::ReservationService;
use super::pb::{self, ReserveOutcome};
use super::{meter, observe};
use crate::domain::{
    Hold, HoldId, HoldState, Limits, PoolId, Quantity, TakeOutcome, check_batch, parse_name,
};
use crate::error::Error;
use crate::services::reservations::{Reservations, StockKey, StockLevel, StockLine};
use crate::store::postgres::AuditRow;

const SERVICE: &str = "ReservationService";
/// Longest product and variant id.
const NAME_LEN: usize = 64;
/// Longest free-text reason.
const REASON_LEN: usize = 200;

/// The adapter from gRPC to [`Reservations`].
pub struct ReservationApi {
    reservations: Arc<Reservations>,
    auth: Arc<Auth>,
    limits: Limits,
}

impl ReservationApi {
    /// An adapter over `reservations`.
    pub fn new(reservations: Arc<Reservations>, auth: Arc<Auth>, limits: Limits) -> Self {
        Self {
            reservations,
            auth,
            limits,
        }
    }

    fn id(&self, field: &str, value: &str) -> Result<HoldId, Error> {
        HoldId::parse(field, value, self.limits.max_id_len)
    }

    fn adjustment_id(&self, value: &str) -> Result<String, Error> {
        parse_name("adjustment_id", value, self.limits.max_id_len)
    }
}

fn key(field: &str, k: Option<pb::StockKey>) -> Result<StockKey, Error> {
    let k = k.ok_or_else(|| Error::invalid(field, "is required"))?;
    Ok(StockKey {
        product_id: parse_name(&format!("{field}.product_id"), &k.product_id, NAME_LEN)?,
        variant_id: convert::optional_name(&format!("{field}.variant_id"), k.variant_id, NAME_LEN)?,
    })
}

fn key_pb(k: &StockKey) -> pb::StockKey {
    pb::StockKey {
        product_id: k.product_id.clone(),
        variant_id: k.variant_id.clone(),
    }
}

fn level_pb(l: StockLevel) -> pb::StockLevel {
    pb::StockLevel {
        key: Some(key_pb(&l.key)),
        on_hand: l.on_hand,
        reserved: l.reserved,
        available: l.available,
        sold: l.sold,
        in_doubt: l.in_doubt,
        low_stock_threshold: l.low_stock_threshold,
    }
}

fn line_pb(pool: &PoolId, quantity: i64) -> pb::ReservationLine {
    pb::ReservationLine {
        key: Some(key_pb(&StockKey::of_pool(pool))),
        quantity,
    }
}

fn reservation_pb(h: Hold) -> pb::Reservation {
    let state = match h.state {
        HoldState::Active => pb::ReservationState::Active,
        HoldState::Committed => pb::ReservationState::Consumed,
        HoldState::Released => pb::ReservationState::Released,
        HoldState::Expired => pb::ReservationState::Expired,
    };
    pb::Reservation {
        reservation_id: h.id.to_string(),
        reference: h.reference.clone(),
        lines: h.lines.iter().map(|(p, q)| line_pb(p, *q)).collect(),
        state: state as i32,
        expires_at: Some(ms_timestamp(h.expires_at_ms)),
        extended: h.extensions > 0,
        order_id: h.order_id.clone(),
        created_at: Some(ms_timestamp(h.created_at_ms)),
    }
}

fn audit_pb(r: AuditRow) -> pb::AuditEntry {
    let action = match r.kind.as_str() {
        "reserved" => "created",
        "committed" => "consumed",
        other => other,
    };
    let lines: Vec<(String, i64, i64)> = r
        .lines
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| {
                    Some((
                        l.get("pool")?.as_str()?.to_owned(),
                        l.get("qty")?.as_i64()?,
                        0,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    pb::AuditEntry {
        event_id: r.event_id,
        action: action.to_owned(),
        reservation_id: r.hold_id,
        lines: lines
            .into_iter()
            .map(|(p, q, _)| line_pb(&PoolId::from_store(p), q))
            .collect(),
        reference: r.reference,
        order_id: r.order_id,
        at: Some(to_timestamp(r.at)),
    }
}

#[tonic::async_trait]
impl ReservationService for ReservationApi {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        observe(meter!(SERVICE, "SetStock"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().adjustment_id)
                .await?;
            let r = request.into_inner();
            let key = key("key", r.key)?;
            if !(0..=self.limits.max_quantity.saturating_mul(1000)).contains(&r.on_hand) {
                return Err(Error::invalid(
                    "on_hand",
                    format!(
                        "must be between 0 and {}",
                        self.limits.max_quantity.saturating_mul(1000)
                    ),
                ));
            }
            let adjustment_id = self.adjustment_id(&r.adjustment_id)?;
            let reason = convert::text("reason", r.reason, REASON_LEN)?;
            let level = self
                .reservations
                .set_stock(&caller.tenant, &key, r.on_hand, &adjustment_id, &reason)
                .await?;
            Ok(pb::SetStockResponse {
                level: Some(level_pb(level)),
            })
        })
        .await
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::AdjustStockResponse>, Status> {
        observe(meter!(SERVICE, "AdjustStock"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().adjustment_id)
                .await?;
            let r = request.into_inner();
            let key = key("key", r.key)?;
            let bound = self.limits.max_quantity.saturating_mul(1000);
            // `unsigned_abs`, since `i64::MIN.abs()` overflows: it panics in
            // a debug build and stays negative (so passes) in a release one.
            if r.delta == 0 || r.delta.unsigned_abs() > bound.unsigned_abs() {
                return Err(Error::invalid(
                    "delta",
                    format!("must be non-zero and within ±{bound}, got {}", r.delta),
                ));
            }
            let adjustment_id = self.adjustment_id(&r.adjustment_id)?;
            let reason = convert::text("reason", r.reason, REASON_LEN)?;
            let level = self
                .reservations
                .adjust_stock(&caller.tenant, &key, r.delta, &adjustment_id, &reason)
                .await?;
            Ok(pb::AdjustStockResponse {
                level: Some(level_pb(level)),
            })
        })
        .await
    }

    async fn get_stock_levels(
        &self,
        request: Request<pb::GetStockLevelsRequest>,
    ) -> Result<Response<pb::GetStockLevelsResponse>, Status> {
        observe(meter!(SERVICE, "GetStockLevels"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let r = request.into_inner();
            check_batch("keys", r.keys.len(), self.limits.max_batch, "key")?;
            let keys = r
                .keys
                .into_iter()
                .enumerate()
                .map(|(i, k)| key(&format!("keys[{i}]"), Some(k)))
                .collect::<Result<Vec<_>, _>>()?;
            let levels = self.reservations.levels(&caller.tenant, &keys).await?;
            Ok(pb::GetStockLevelsResponse {
                levels: levels.into_iter().map(level_pb).collect(),
            })
        })
        .await
    }

    async fn set_low_stock_threshold(
        &self,
        request: Request<pb::SetLowStockThresholdRequest>,
    ) -> Result<Response<pb::SetLowStockThresholdResponse>, Status> {
        observe(meter!(SERVICE, "SetLowStockThreshold"), async {
            let caller = self.auth.caller(&request, Role::Admin, "").await?;
            let r = request.into_inner();
            let key = key("key", r.key)?;
            if let Some(t) = r.threshold
                && t < 0
            {
                return Err(Error::invalid(
                    "threshold",
                    format!("must not be negative, got {t}"),
                ));
            }
            let level = self
                .reservations
                .set_threshold(&caller.tenant, &key, r.threshold)
                .await?;
            Ok(pb::SetLowStockThresholdResponse {
                level: Some(level_pb(level)),
            })
        })
        .await
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        observe(meter!(SERVICE, "Reserve"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let r = request.into_inner();
            let id = self.id("reservation_id", &r.reservation_id)?;
            let reference =
                convert::optional_name("reference", r.reference, self.limits.max_id_len)?;
            check_batch("lines", r.lines.len(), self.limits.max_batch, "line")?;
            let lines = r
                .lines
                .into_iter()
                .enumerate()
                .map(|(i, l)| {
                    Ok(StockLine {
                        key: key(&format!("lines[{i}].key"), l.key)?,
                        quantity: Quantity::parse(
                            &format!("lines[{i}].quantity"),
                            l.quantity,
                            self.limits.max_quantity,
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let ttl = convert::ttl("ttl", r.ttl, &self.limits)?;
            let mut resp = pb::ReserveResponse::default();
            match self
                .reservations
                .reserve(&caller.tenant, id, reference, lines, ttl)
                .await?
            {
                TakeOutcome::Taken(hold) => {
                    resp.set_outcome(ReserveOutcome::Reserved);
                    resp.reservation = Some(reservation_pb(hold));
                }
                TakeOutcome::SoldOut(short) => {
                    resp.set_outcome(ReserveOutcome::InsufficientStock);
                    resp.shortages = short
                        .into_iter()
                        .map(|s| pb::StockShortage {
                            key: Some(key_pb(&StockKey::of_pool(&s.pool))),
                            requested: s.requested,
                            available: s.available,
                        })
                        .collect();
                }
                other => {
                    return Err(Error::internal(format!(
                        "unexpected outcome for a stock reservation: {other:?}"
                    )));
                }
            }
            Ok(resp)
        })
        .await
    }

    async fn get_reservation(
        &self,
        request: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::GetReservationResponse>, Status> {
        observe(meter!(SERVICE, "GetReservation"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let id = self.id("reservation_id", &request.get_ref().reservation_id)?;
            let hold = self.reservations.get(&caller.tenant, &id).await?;
            Ok(pb::GetReservationResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }

    async fn extend_reservation(
        &self,
        request: Request<pb::ExtendReservationRequest>,
    ) -> Result<Response<pb::ExtendReservationResponse>, Status> {
        observe(meter!(SERVICE, "ExtendReservation"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let r = request.into_inner();
            let id = self.id("reservation_id", &r.reservation_id)?;
            let ttl = convert::ttl("ttl", r.ttl, &self.limits)?;
            let extension_id =
                convert::optional_name("extension_id", r.extension_id, self.limits.max_id_len)?;
            let hold = self
                .reservations
                .extend(&caller.tenant, &id, ttl, &extension_id)
                .await?;
            Ok(pb::ExtendReservationResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }

    async fn consume_reservation(
        &self,
        request: Request<pb::ConsumeReservationRequest>,
    ) -> Result<Response<pb::ConsumeReservationResponse>, Status> {
        observe(meter!(SERVICE, "ConsumeReservation"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let r = request.into_inner();
            let id = self.id("reservation_id", &r.reservation_id)?;
            let order_id = parse_name("order_id", &r.order_id, self.limits.max_id_len)?;
            let hold = self
                .reservations
                .consume(&caller.tenant, &id, &order_id)
                .await?;
            Ok(pb::ConsumeReservationResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        observe(meter!(SERVICE, "ReleaseReservation"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let id = self.id("reservation_id", &request.get_ref().reservation_id)?;
            let hold = self.reservations.release(&caller.tenant, &id).await?;
            Ok(pb::ReleaseReservationResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }

    async fn list_audit_log(
        &self,
        request: Request<pb::ListAuditLogRequest>,
    ) -> Result<Response<pb::ListAuditLogResponse>, Status> {
        observe(meter!(SERVICE, "ListAuditLog"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let r = request.into_inner();
            let key = r.key.map(|k| key("key", Some(k))).transpose()?;
            let reference =
                convert::optional_name("reference", r.reference, self.limits.max_id_len)?;
            let page_size = convert::page_size(r.page_size)?;
            let after = convert::page_token(&r.page_token)?;
            let reference = (!reference.is_empty()).then_some(reference);
            let rows = self
                .reservations
                .audit(
                    &caller.tenant,
                    key.as_ref(),
                    reference.as_deref(),
                    after,
                    page_size,
                )
                .await?;
            let next_page_token = if rows.len() as i64 == page_size {
                rows.last().map(|r| r.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListAuditLogResponse {
                entries: rows.into_iter().map(audit_pb).collect(),
                next_page_token,
            })
        })
        .await
    }
}
