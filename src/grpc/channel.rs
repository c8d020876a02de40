//! `holdfast.v1.ChannelService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::{self, to_timestamp};
use super::pb::channel_service_server::ChannelService;
use super::pb::{self, EngageConflictReason as Reason};
use super::{meter, observe};
use crate::domain::channel::{EngageConflict, NAME_LEN};
use crate::domain::{CardId, Channel, ChannelSlug, ListingStatus, parse_name};
use crate::error::Error;
use crate::satellite::check_base_url;
use crate::services::channels::Channels;
use crate::store::postgres::{
    CardState, DeliveryRow, DeliveryState, DriftRow, EngageCard, EngageOutcome,
};

const SERVICE: &str = "ChannelService";
/// Longest display name.
const DISPLAY_NAME_LEN: usize = 100;
/// Longest satellite base URL.
const URL_LEN: usize = 512;
/// Shortest and longest signing secret.
const SECRET_LEN: (usize, usize) = (16, 256);
/// Most webhooks in one request to a satellite (the column's check,
/// migration 0016): a hundred small ones are ~20 KB, and the outbox caps
/// a batch's bytes too.
const MAX_BATCH_SIZE: u32 = 100;
/// Longest external ref.
const EXTERNAL_REF_LEN: usize = 256;
/// Largest metadata JSON, bytes.
const METADATA_LEN: usize = 4096;

/// The adapter from gRPC to [`Channels`].
pub struct ChannelApi {
    channels: Arc<Channels>,
    auth: Arc<Auth>,
    /// Most cards per request.
    max_batch: usize,
}

impl ChannelApi {
    /// An adapter over `channels`, with at most `max_batch` cards per call.
    pub fn new(channels: Arc<Channels>, auth: Arc<Auth>, max_batch: usize) -> Self {
        Self {
            channels,
            auth,
            max_batch,
        }
    }
}

fn slug(field: &str, value: &str) -> Result<ChannelSlug, Error> {
    ChannelSlug::parse(field, value)
}

/// An optional channel filter: empty for all.
fn channel_filter(value: &str) -> Result<Option<ChannelSlug>, Error> {
    (!value.is_empty())
        .then(|| slug("channel", value))
        .transpose()
}

fn channel_pb(c: Channel) -> pb::Channel {
    pb::Channel {
        slug: c.slug.to_string(),
        name: c.name,
        exclusive: c.exclusive,
        for_sale: c.for_sale,
    }
}

fn ids(cards: &[CardId]) -> Vec<String> {
    cards.iter().map(ToString::to_string).collect()
}

fn engage_card(i: usize, c: pb::EngageCard) -> Result<EngageCard, Error> {
    let field = format!("cards[{i}]");
    let metadata = if c.metadata_json.is_empty() {
        serde_json::json!({})
    } else {
        if c.metadata_json.len() > METADATA_LEN {
            return Err(Error::invalid(
                format!("{field}.metadata_json"),
                format!("must be at most {METADATA_LEN} bytes"),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&c.metadata_json).map_err(|e| {
            Error::invalid(
                format!("{field}.metadata_json"),
                format!("is not JSON: {e}"),
            )
        })?;
        if !v.is_object() {
            return Err(Error::invalid(
                format!("{field}.metadata_json"),
                "must be a JSON object",
            ));
        }
        if has_nul(&v) {
            return Err(Error::invalid(
                format!("{field}.metadata_json"),
                "must not contain \\u0000, which Postgres cannot store",
            ));
        }
        v
    };
    Ok(EngageCard {
        card_id: CardId::parse(&format!("{field}.card_id"), &c.card_id)?,
        external_ref: convert::text(
            &format!("{field}.external_ref"),
            c.external_ref,
            EXTERNAL_REF_LEN,
        )?,
        metadata,
    })
}

/// Whether a JSON value has U+0000 in any key or string.
fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn engage_conflict_pb((card, why): (CardId, EngageConflict)) -> pb::EngageConflict {
    let (reason, channel) = match why {
        EngageConflict::Sold(c) => (Reason::Sold, c),
        EngageConflict::Exclusive(c) => (Reason::Exclusive, c),
        EngageConflict::DualListingOff(c) => (Reason::DualListingOff, c),
    };
    pb::EngageConflict {
        card_id: card.to_string(),
        reason: reason as i32,
        channel: channel.to_string(),
    }
}

fn card_pb(s: CardState) -> pb::CardChannels {
    let active_channels = s
        .listings
        .iter()
        .filter(|l| l.status == ListingStatus::Active)
        .map(|l| l.channel.to_string())
        .collect();
    pb::CardChannels {
        card_id: s.card_id.to_string(),
        sold: s.sold_channel.is_some(),
        sold_channel: s.sold_channel.map(|c| c.to_string()).unwrap_or_default(),
        sold_at: s.sold_at.map(to_timestamp),
        listings: s
            .listings
            .into_iter()
            .map(|l| {
                let status = match l.status {
                    ListingStatus::Active => pb::ListingStatus::Active,
                    ListingStatus::Inactive => pb::ListingStatus::Inactive,
                    ListingStatus::Sold => pb::ListingStatus::Sold,
                };
                pb::Listing {
                    channel: l.channel.to_string(),
                    status: status as i32,
                    external_ref: l.external_ref,
                    metadata_json: l.metadata.to_string(),
                    engaged_at: Some(to_timestamp(l.engaged_at)),
                    disengaged_at: l.disengaged_at.map(to_timestamp),
                }
            })
            .collect(),
        active_channels,
    }
}

fn drift_pb(d: DriftRow) -> pb::DriftEntry {
    let direction = match d.direction.as_str() {
        "missing_on_satellite" => pb::DriftDirection::MissingOnSatellite,
        _ => pb::DriftDirection::UnknownToHoldfast,
    };
    pb::DriftEntry {
        channel: d.channel,
        card_id: d.card_id,
        direction: direction as i32,
        cleared: d.cleared,
        detected_at: Some(to_timestamp(d.detected_at)),
    }
}

fn delivery_pb(d: DeliveryRow) -> pb::Delivery {
    let state = match d.state.as_str() {
        "delivered" => pb::DeliveryState::Delivered,
        _ => pb::DeliveryState::Pending,
    };
    pb::Delivery {
        delivery_id: d.id,
        channel: d.channel,
        event: d.event,
        card_count: d.card_count,
        state: state as i32,
        attempts: d.attempts,
        last_status: d.last_status.unwrap_or(0),
        last_error: d.last_error,
        next_attempt_at: (d.state == "pending").then(|| to_timestamp(d.next_attempt_at)),
        created_at: Some(to_timestamp(d.created_at)),
        delivered_at: d.delivered_at.map(to_timestamp),
        body: d.body,
    }
}

/// The next page token of a page of `len` rows of `size`, by `last` id.
fn next_token(len: usize, size: i64, last: Option<i64>) -> String {
    match last {
        Some(id) if len as i64 == size => id.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl ChannelService for ChannelApi {
    async fn list_channels(
        &self,
        request: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        observe(meter!(SERVICE, "ListChannels"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let channels = self.channels.list(&caller.tenant).await?;
            Ok(pb::ListChannelsResponse {
                channels: channels.into_iter().map(channel_pb).collect(),
                dual_listing: self.channels.dual_listing(&caller.tenant).await?,
            })
        })
        .await
    }

    async fn put_channel(
        &self,
        request: Request<pb::PutChannelRequest>,
    ) -> Result<Response<pb::PutChannelResponse>, Status> {
        observe(meter!(SERVICE, "PutChannel"), async {
            let caller = self.auth.caller(&request, Role::Admin, "").await?;
            let c = request
                .into_inner()
                .channel
                .ok_or_else(|| Error::invalid("channel", "is required"))?;
            let name = convert::text("channel.name", c.name, DISPLAY_NAME_LEN)?;
            if name.trim().is_empty() {
                return Err(Error::invalid("channel.name", "must not be empty"));
            }
            let channel = Channel {
                slug: slug("channel.slug", &c.slug)?,
                name,
                exclusive: c.exclusive,
                for_sale: true,
            };
            let stored = self.channels.put(&caller.tenant, channel).await?;
            Ok(pb::PutChannelResponse {
                channel: Some(channel_pb(stored)),
            })
        })
        .await
    }

    async fn update_channel_settings(
        &self,
        request: Request<pb::UpdateChannelSettingsRequest>,
    ) -> Result<Response<pb::UpdateChannelSettingsResponse>, Status> {
        observe(meter!(SERVICE, "UpdateChannelSettings"), async {
            let caller = self.auth.caller(&request, Role::Admin, "").await?;
            let on = request.get_ref().dual_listing;
            self.channels.set_dual_listing(&caller.tenant, on).await?;
            Ok(pb::UpdateChannelSettingsResponse {
                dual_listing: self.channels.dual_listing(&caller.tenant).await?,
            })
        })
        .await
    }

    async fn put_satellite(
        &self,
        request: Request<pb::PutSatelliteRequest>,
    ) -> Result<Response<pb::PutSatelliteResponse>, Status> {
        observe(meter!(SERVICE, "PutSatellite"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().channel)
                .await?;
            let r = request.into_inner();
            let channel = slug("channel", &r.channel)?;
            if r.base_url.len() > URL_LEN {
                return Err(Error::invalid(
                    "base_url",
                    format!("must be at most {URL_LEN} characters"),
                ));
            }
            let base_url =
                check_base_url(&r.base_url).map_err(|e| Error::invalid("base_url", e))?;
            if !(SECRET_LEN.0..=SECRET_LEN.1).contains(&r.secret.len()) {
                return Err(Error::invalid(
                    "secret",
                    format!("must be {}-{} characters", SECRET_LEN.0, SECRET_LEN.1),
                ));
            }
            convert::printable("secret", &r.secret)?;
            if r.batch_size > MAX_BATCH_SIZE {
                return Err(Error::invalid(
                    "batch_size",
                    format!("must be at most {MAX_BATCH_SIZE} (0 or 1 sends each webhook alone)"),
                ));
            }
            let batch_size = i32::try_from(r.batch_size.max(1)).expect("at most MAX_BATCH_SIZE");
            let sat = self
                .channels
                .put_satellite(&caller.tenant, &channel, &base_url, &r.secret, batch_size)
                .await?;
            Ok(pb::PutSatelliteResponse {
                satellite: Some(pb::Satellite {
                    channel: sat.channel,
                    base_url: sat.base_url,
                    updated_at: Some(to_timestamp(sat.updated_at)),
                    waiting: None,
                    batch_size: u32::try_from(sat.batch_size).unwrap_or(1),
                }),
            })
        })
        .await
    }

    async fn list_satellites(
        &self,
        request: Request<pb::ListSatellitesRequest>,
    ) -> Result<Response<pb::ListSatellitesResponse>, Status> {
        observe(meter!(SERVICE, "ListSatellites"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let sats = self.channels.satellites(&caller.tenant).await?;
            let mut waiting = self.channels.waiting_deliveries(&caller.tenant).await?;
            Ok(pb::ListSatellitesResponse {
                satellites: sats
                    .into_iter()
                    .map(|s| pb::Satellite {
                        waiting: waiting
                            .iter()
                            .position(|d| d.channel == s.channel)
                            .map(|i| delivery_pb(waiting.swap_remove(i))),
                        channel: s.channel,
                        base_url: s.base_url,
                        updated_at: Some(to_timestamp(s.updated_at)),
                        batch_size: u32::try_from(s.batch_size).unwrap_or(1),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn engage(
        &self,
        request: Request<pb::EngageRequest>,
    ) -> Result<Response<pb::EngageResponse>, Status> {
        observe(meter!(SERVICE, "Engage"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().channel)
                .await?;
            let r = request.into_inner();
            let channel = slug("channel", &r.channel)?;
            let cards = r
                .cards
                .into_iter()
                .enumerate()
                .map(|(i, c)| engage_card(i, c))
                .collect::<Result<Vec<_>, _>>()?;
            // The same batch checks as a card id list (size, duplicates).
            convert::card_ids(
                "cards",
                cards.iter().map(|c| c.card_id.to_string()).collect(),
                self.max_batch,
            )?;
            let mut resp = pb::EngageResponse::default();
            match self
                .channels
                .engage(&caller.tenant, &channel, &cards)
                .await?
            {
                EngageOutcome::Engaged {
                    engaged, already, ..
                } => {
                    resp.set_outcome(pb::EngageOutcome::Engaged);
                    resp.engaged_card_ids = ids(&engaged);
                    resp.already_active_card_ids = ids(&already);
                }
                EngageOutcome::Conflicts(conflicts) => {
                    resp.set_outcome(pb::EngageOutcome::Conflict);
                    resp.conflicts = conflicts.into_iter().map(engage_conflict_pb).collect();
                }
            }
            Ok(resp)
        })
        .await
    }

    async fn disengage(
        &self,
        request: Request<pb::DisengageRequest>,
    ) -> Result<Response<pb::DisengageResponse>, Status> {
        observe(meter!(SERVICE, "Disengage"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().channel)
                .await?;
            let r = request.into_inner();
            let channel = slug("channel", &r.channel)?;
            let cards = match (r.all_cards, r.card_ids.is_empty()) {
                (true, true) => None,
                (true, false) => {
                    return Err(Error::invalid(
                        "card_ids",
                        "must be empty when all_cards is set",
                    ));
                }
                (false, _) => Some(convert::card_ids("card_ids", r.card_ids, self.max_batch)?),
            };
            let pulled = self
                .channels
                .disengage(&caller.tenant, &channel, cards.as_deref())
                .await?;
            Ok(pb::DisengageResponse {
                disengaged_card_ids: ids(&pulled),
            })
        })
        .await
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        observe(meter!(SERVICE, "Reconcile"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().channel)
                .await?;
            let r = request.into_inner();
            let channel = slug("channel", &r.channel)?;
            let listed = match (r.pull, r.active_card_ids.is_empty()) {
                (true, true) => None,
                (true, false) => {
                    return Err(Error::invalid(
                        "active_card_ids",
                        "must be empty when pull is set",
                    ));
                }
                // An empty list is a satellite with nothing live.
                (false, true) => Some(Vec::new()),
                (false, false) => Some(convert::card_ids(
                    "active_card_ids",
                    r.active_card_ids,
                    self.max_batch,
                )?),
            };
            let drift = self
                .channels
                .reconcile(&caller.tenant, &channel, listed)
                .await?;
            Ok(pb::ReconcileResponse {
                cleared_card_ids: ids(&drift.missing_on_satellite),
                unknown_card_ids: ids(&drift.unknown_to_holdfast),
            })
        })
        .await
    }

    async fn get_card_channels(
        &self,
        request: Request<pb::GetCardChannelsRequest>,
    ) -> Result<Response<pb::GetCardChannelsResponse>, Status> {
        observe(meter!(SERVICE, "GetCardChannels"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let asked = request.into_inner().card_ids;
            // Parse for errors, but answer in the order asked.
            convert::card_ids("card_ids", asked.clone(), self.max_batch)?;
            let cards: Vec<CardId> = asked.into_iter().map(CardId::from_store).collect();
            let states = self.channels.card_states(&caller.tenant, &cards).await?;
            Ok(pb::GetCardChannelsResponse {
                cards: states.into_iter().map(card_pb).collect(),
            })
        })
        .await
    }

    async fn list_conflicts(
        &self,
        request: Request<pb::ListConflictsRequest>,
    ) -> Result<Response<pb::ListConflictsResponse>, Status> {
        observe(meter!(SERVICE, "ListConflicts"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let r = request.into_inner();
            let size = convert::page_size(r.page_size)?;
            let after = if r.page_token.is_empty() {
                String::new()
            } else {
                parse_name("page_token", &r.page_token, NAME_LEN)?
            };
            let rows = self
                .channels
                .conflicts(&caller.tenant, &after, size)
                .await?;
            let next_page_token = match rows.last() {
                Some((card, _)) if rows.len() as i64 == size => card.to_string(),
                _ => String::new(),
            };
            Ok(pb::ListConflictsResponse {
                conflicts: rows
                    .into_iter()
                    .map(|(card, channels)| pb::ListingConflict {
                        card_id: card.to_string(),
                        channels: channels.into_iter().map(|c| c.slug.to_string()).collect(),
                    })
                    .collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn list_drift(
        &self,
        request: Request<pb::ListDriftRequest>,
    ) -> Result<Response<pb::ListDriftResponse>, Status> {
        observe(meter!(SERVICE, "ListDrift"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let r = request.into_inner();
            let channel = channel_filter(&r.channel)?;
            let size = convert::page_size(r.page_size)?;
            let before = convert::page_token(&r.page_token)?;
            let rows = self
                .channels
                .drift(&caller.tenant, channel.as_ref(), before, size)
                .await?;
            let next_page_token = next_token(rows.len(), size, rows.last().map(|r| r.id));
            Ok(pb::ListDriftResponse {
                drift: rows.into_iter().map(drift_pb).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        observe(meter!(SERVICE, "ListDeliveries"), async {
            let caller = self.auth.caller(&request, Role::Checkout, "").await?;
            let r = request.into_inner();
            let channel = channel_filter(&r.channel)?;
            let state = match pb::DeliveryState::try_from(r.state) {
                Ok(pb::DeliveryState::Unspecified) => None,
                Ok(pb::DeliveryState::Pending) => Some(DeliveryState::Pending),
                Ok(pb::DeliveryState::Delivered) => Some(DeliveryState::Delivered),
                Err(_) => {
                    return Err(Error::invalid(
                        "state",
                        format!("unknown delivery state {}", r.state),
                    ));
                }
            };
            let size = convert::page_size(r.page_size)?;
            let before = convert::page_token(&r.page_token)?;
            let rows = self
                .channels
                .deliveries(&caller.tenant, channel.as_ref(), state, before, size)
                .await?;
            let next_page_token = next_token(rows.len(), size, rows.last().map(|r| r.id));
            Ok(pb::ListDeliveriesResponse {
                deliveries: rows.into_iter().map(delivery_pb).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn retry_deliveries(
        &self,
        request: Request<pb::RetryDeliveriesRequest>,
    ) -> Result<Response<pb::RetryDeliveriesResponse>, Status> {
        observe(meter!(SERVICE, "RetryDeliveries"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().channel)
                .await?;
            let channel = channel_filter(&request.get_ref().channel)?;
            let channels = self
                .channels
                .retry_deliveries(&caller.tenant, channel.as_ref())
                .await?;
            Ok(pb::RetryDeliveriesResponse { channels })
        })
        .await
    }
}
