//! `holdfast.v1.SlotService`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, Utc};
use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::{self, ms_timestamp, to_timestamp};
use super::pb::slot_service_server::SlotService;
use super::pb::{self, SlotOutcome as Outcome};
use super::{meter, observe};
use crate::domain::{Hold, HoldId, Limits, parse_name};
use crate::error::Error;
use crate::services::slots::{SlotOutcome, Slots, window_start_of};

const SERVICE: &str = "SlotService";
/// Longest venue id.
const NAME_LEN: usize = 64;
/// A slot reservation's time to live when the caller gives none.
const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);

/// The adapter from gRPC to [`Slots`].
pub struct SlotApi {
    slots: Arc<Slots>,
    auth: Arc<Auth>,
    limits: Limits,
}

impl SlotApi {
    /// An adapter over `slots`.
    pub fn new(slots: Arc<Slots>, auth: Arc<Auth>, limits: Limits) -> Self {
        Self {
            slots,
            auth,
            limits,
        }
    }

    fn id(&self, value: &str) -> Result<HoldId, Error> {
        HoldId::parse("reservation_id", value, self.limits.max_id_len)
    }
}

fn venue(value: &str) -> Result<String, Error> {
    parse_name("venue_id", value, NAME_LEN)
}

fn hours(
    field: &str,
    hours: &[pb::HourSlots],
    weekly: bool,
) -> Result<Vec<(u32, u32, u32)>, Error> {
    let mut seen = std::collections::HashSet::new();
    hours
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if weekly && !(1..=7).contains(&h.weekday) {
                return Err(Error::invalid(
                    format!("{field}[{i}].weekday"),
                    format!("must be 1 (Monday) to 7 (Sunday), got {}", h.weekday),
                ));
            }
            if h.hour > 23 {
                return Err(Error::invalid(
                    format!("{field}[{i}].hour"),
                    format!("must be 0-23, got {}", h.hour),
                ));
            }
            let slots = u32::try_from(h.slots_per_hour)
                .ok()
                .filter(|s| *s <= 100_000)
                .ok_or_else(|| {
                    Error::invalid(
                        format!("{field}[{i}].slots_per_hour"),
                        format!("must be 0 to 100000, got {}", h.slots_per_hour),
                    )
                })?;
            let day = if weekly { h.weekday } else { 0 };
            if !seen.insert((day, h.hour)) {
                return Err(Error::invalid(
                    format!("{field}[{i}]"),
                    "this hour appears twice",
                ));
            }
            Ok((day, h.hour, slots))
        })
        .collect()
}

fn reservation_pb(h: Hold) -> pb::SlotReservation {
    let pool = h.lines.first().map(|(p, _)| p.clone());
    let state = convert::hold_state(h.state);
    pb::SlotReservation {
        reservation_id: h.id.to_string(),
        venue_id: pool
            .as_ref()
            .and_then(|p| p.as_str().split('/').nth(1))
            .unwrap_or_default()
            .to_owned(),
        window_start: pool.as_ref().and_then(window_start_of).map(to_timestamp),
        state: state as i32,
        expires_at: Some(ms_timestamp(h.expires_at_ms)),
        payment_id: h.order_id,
    }
}

fn outcome(o: SlotOutcome, done: Outcome) -> (Outcome, Option<pb::SlotReservation>, bool) {
    match o {
        SlotOutcome::Done(hold, late) => (done, Some(reservation_pb(hold)), late),
        SlotOutcome::Full => (Outcome::WindowFull, None, false),
        SlotOutcome::Closed => (Outcome::Closed, None, false),
        SlotOutcome::Over => (Outcome::WindowOver, None, false),
    }
}

#[tonic::async_trait]
impl SlotService for SlotApi {
    async fn set_venue(
        &self,
        request: Request<pb::SetVenueRequest>,
    ) -> Result<Response<pb::SetVenueResponse>, Status> {
        observe(meter!(SERVICE, "SetVenue"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().venue_id)
                .await?;
            let r = request.into_inner();
            let venue_id = venue(&r.venue_id)?;
            let zone = convert::text("time_zone", r.time_zone, 64)?;
            let minutes = if r.window_minutes == 0 {
                15
            } else {
                r.window_minutes
            };
            let v = self
                .slots
                .set_venue(&caller.tenant, &venue_id, &zone, minutes)
                .await?;
            Ok(pb::SetVenueResponse {
                venue: Some(pb::Venue {
                    venue_id: v.venue_id,
                    time_zone: zone,
                    window_minutes: v.window_minutes,
                }),
            })
        })
        .await
    }

    async fn set_schedule(
        &self,
        request: Request<pb::SetScheduleRequest>,
    ) -> Result<Response<pb::SetScheduleResponse>, Status> {
        observe(meter!(SERVICE, "SetSchedule"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().venue_id)
                .await?;
            let r = request.into_inner();
            let venue_id = venue(&r.venue_id)?;
            let hours = hours("hours", &r.hours, true)?;
            self.slots
                .set_weekly(&caller.tenant, &venue_id, &hours)
                .await?;
            Ok(pb::SetScheduleResponse {})
        })
        .await
    }

    async fn set_date_override(
        &self,
        request: Request<pb::SetDateOverrideRequest>,
    ) -> Result<Response<pb::SetDateOverrideResponse>, Status> {
        observe(meter!(SERVICE, "SetDateOverride"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().venue_id)
                .await?;
            let r = request.into_inner();
            let venue_id = venue(&r.venue_id)?;
            let day = NaiveDate::parse_from_str(&r.date, "%Y-%m-%d")
                .map_err(|_| Error::invalid("date", "must be a date like 2026-12-25"))?;
            let hours: Vec<(u32, u32)> = hours("hours", &r.hours, false)?
                .into_iter()
                .map(|(_, h, s)| (h, s))
                .collect();
            if r.clear && !hours.is_empty() {
                // Either would be a guess at what the caller meant.
                return Err(Error::invalid(
                    "hours",
                    "must be empty when clear removes the override",
                ));
            }
            let hours = (!r.clear).then_some(hours.as_slice());
            self.slots
                .set_override(&caller.tenant, &venue_id, day, hours)
                .await?;
            Ok(pb::SetDateOverrideResponse {})
        })
        .await
    }

    async fn get_availability(
        &self,
        request: Request<pb::GetAvailabilityRequest>,
    ) -> Result<Response<pb::GetAvailabilityResponse>, Status> {
        observe(meter!(SERVICE, "GetAvailability"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().venue_id)
                .await?;
            let r = request.into_inner();
            let venue_id = venue(&r.venue_id)?;
            let from = convert::timestamp("from", r.from)?;
            let to = convert::timestamp("to", r.to)?;
            if to <= from {
                return Err(Error::invalid("to", "must be after from"));
            }
            let windows = self
                .slots
                .availability(&caller.tenant, &venue_id, from, to)
                .await?;
            Ok(pb::GetAvailabilityResponse {
                windows: windows
                    .into_iter()
                    .map(|w| pb::WindowAvailability {
                        start: Some(to_timestamp(w.start)),
                        end: Some(to_timestamp(w.end)),
                        capacity: w.capacity,
                        confirmed: w.confirmed,
                        pending: w.pending,
                        available: w.available,
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn reserve_slot(
        &self,
        request: Request<pb::ReserveSlotRequest>,
    ) -> Result<Response<pb::ReserveSlotResponse>, Status> {
        observe(meter!(SERVICE, "ReserveSlot"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let r = request.into_inner();
            let id = self.id(&r.reservation_id)?;
            let venue_id = venue(&r.venue_id)?;
            let at = match r.at {
                Some(ts) => convert::timestamp("at", Some(ts))?,
                None => Utc::now(),
            };
            let limits = Limits {
                default_ttl: DEFAULT_TTL,
                ..self.limits.clone()
            };
            let ttl = convert::ttl("ttl", r.ttl, &limits)?;
            let reference =
                convert::optional_name("reference", r.reference, self.limits.max_id_len)?;
            let (o, reservation, _) = outcome(
                self.slots
                    .reserve(&caller.tenant, id, &venue_id, at, ttl, reference)
                    .await?,
                Outcome::Reserved,
            );
            Ok(pb::ReserveSlotResponse {
                outcome: o as i32,
                reservation,
            })
        })
        .await
    }

    async fn confirm_slot(
        &self,
        request: Request<pb::ConfirmSlotRequest>,
    ) -> Result<Response<pb::ConfirmSlotResponse>, Status> {
        observe(meter!(SERVICE, "ConfirmSlot"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let r = request.into_inner();
            let id = self.id(&r.reservation_id)?;
            let payment_id = parse_name("payment_id", &r.payment_id, self.limits.max_id_len)?;
            let (o, reservation, late) = outcome(
                self.slots.confirm(&caller.tenant, &id, &payment_id).await?,
                Outcome::Confirmed,
            );
            Ok(pb::ConfirmSlotResponse {
                outcome: o as i32,
                reservation,
                late,
            })
        })
        .await
    }

    async fn release_slot(
        &self,
        request: Request<pb::ReleaseSlotRequest>,
    ) -> Result<Response<pb::ReleaseSlotResponse>, Status> {
        observe(meter!(SERVICE, "ReleaseSlot"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let id = self.id(&request.get_ref().reservation_id)?;
            let hold = self.slots.release(&caller.tenant, &id).await?;
            Ok(pb::ReleaseSlotResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }

    async fn get_slot_reservation(
        &self,
        request: Request<pb::GetSlotReservationRequest>,
    ) -> Result<Response<pb::GetSlotReservationResponse>, Status> {
        observe(meter!(SERVICE, "GetSlotReservation"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().reservation_id)
                .await?;
            let id = self.id(&request.get_ref().reservation_id)?;
            let hold = self.slots.get(&caller.tenant, &id).await?;
            Ok(pb::GetSlotReservationResponse {
                reservation: Some(reservation_pb(hold)),
            })
        })
        .await
    }
}
