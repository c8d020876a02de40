//! Helpers shared by the sale-lock and channel tests: engaging cards,
//! locking them, reading their channel state, wiring a test satellite.

use holdfast::grpc::pb::{self, AcquireOutcome, EngageOutcome};

use crate::helpers::TestApp;
use crate::satellite::Satellite;

/// The secret every test satellite uses.
pub const SECRET: &str = "satellite-secret-0123456789";

/// Engages cards on a channel and expects it to work.
pub async fn engage(app: &TestApp, channel: &str, cards: &[&str]) -> pb::EngageResponse {
    let resp = try_engage(app, channel, cards).await;
    assert_eq!(resp.outcome(), EngageOutcome::Engaged, "{resp:?}");
    resp
}

/// Engages cards on a channel, whatever the outcome.
pub async fn try_engage(app: &TestApp, channel: &str, cards: &[&str]) -> pb::EngageResponse {
    app.channels()
        .engage(pb::EngageRequest {
            channel: channel.into(),
            cards: cards
                .iter()
                .map(|c| pb::EngageCard {
                    card_id: (*c).into(),
                    external_ref: format!("{channel}-{c}"),
                    metadata_json: String::new(),
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Turns dual listing on or off.
pub async fn dual_listing(app: &TestApp, on: bool) {
    app.channels()
        .update_channel_settings(pb::UpdateChannelSettingsRequest { dual_listing: on })
        .await
        .unwrap();
}

/// Starts a satellite and registers it for `channel`, sent one webhook
/// at a time.
pub async fn satellite(app: &TestApp, channel: &str) -> Satellite {
    satellite_taking(app, channel, 0).await
}

/// Starts a satellite and registers it for `channel`, taking up to
/// `batch_size` webhooks a request.
pub async fn satellite_taking(app: &TestApp, channel: &str, batch_size: u32) -> Satellite {
    let sat = Satellite::start(SECRET).await;
    app.channels()
        .put_satellite(pb::PutSatelliteRequest {
            channel: channel.into(),
            base_url: sat.base_url.clone(),
            secret: SECRET.into(),
            batch_size,
        })
        .await
        .unwrap();
    sat
}

/// The workspace's satellites, as ListSatellites shows them.
pub async fn satellites(app: &TestApp) -> Vec<pb::Satellite> {
    app.channels()
        .list_satellites(pb::ListSatellitesRequest {})
        .await
        .unwrap()
        .into_inner()
        .satellites
}

/// An acquire request with a TTL in seconds.
pub fn acquire(
    lock_ref: &str,
    channel: &str,
    cards: &[&str],
    ttl_secs: i64,
) -> pb::AcquireSaleLocksRequest {
    pb::AcquireSaleLocksRequest {
        lock_ref: lock_ref.into(),
        channel: channel.into(),
        card_ids: cards.iter().map(|c| (*c).to_owned()).collect(),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

/// Acquires and expects the lock.
pub async fn lock(app: &TestApp, lock_ref: &str, channel: &str, cards: &[&str]) -> pb::SaleLock {
    let resp = app
        .locks()
        .acquire_sale_locks(acquire(lock_ref, channel, cards, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outcome(), AcquireOutcome::Acquired, "{resp:?}");
    resp.lock.unwrap()
}

/// One card's channel state.
pub async fn card(app: &TestApp, card_id: &str) -> pb::CardChannels {
    app.channels()
        .get_card_channels(pb::GetCardChannelsRequest {
            card_ids: vec![card_id.into()],
        })
        .await
        .unwrap()
        .into_inner()
        .cards
        .remove(0)
}

/// A card's channel state once the drainer has recorded it sold.
pub async fn sold_card(app: &TestApp, card_id: &str) -> pb::CardChannels {
    app.eventually(&format!("{card_id} sold"), || async {
        let c = card(app, card_id).await;
        c.sold.then_some(c)
    })
    .await
}

/// The status of a card on a channel, if it was ever engaged there.
pub fn status_on(card: &pb::CardChannels, channel: &str) -> Option<pb::ListingStatus> {
    card.listings
        .iter()
        .find(|l| l.channel == channel)
        .map(|l| l.status())
}

/// The workspace's deliveries of `event` to `channel`.
pub async fn deliveries(app: &TestApp, channel: &str, event: &str) -> Vec<pb::Delivery> {
    app.channels()
        .list_deliveries(pb::ListDeliveriesRequest {
            channel: channel.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries
        .into_iter()
        .filter(|d| d.event == event)
        .collect()
}

/// Waits until every delivery of `event` to `channel` is acknowledged and
/// there is at least one; returns them.
pub async fn delivered(app: &TestApp, channel: &str, event: &str) -> Vec<pb::Delivery> {
    delivered_at_least(app, channel, event, 1).await
}

/// Waits until there are at least `count` deliveries of `event` to
/// `channel` and every one is acknowledged; returns them.
pub async fn delivered_at_least(
    app: &TestApp,
    channel: &str,
    event: &str,
    count: usize,
) -> Vec<pb::Delivery> {
    app.eventually(
        &format!("{count} {event} to {channel} delivered"),
        || async {
            let d = deliveries(app, channel, event).await;
            (d.len() >= count && d.iter().all(|d| d.state() == pb::DeliveryState::Delivered))
                .then_some(d)
        },
    )
    .await
}
