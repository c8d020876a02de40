//! A satellite back from an outage: its waiting webhooks go at once when
//! asked (`RetryDeliveries`), when it is moved (`PutSatellite`), or when
//! it gives its list (`Reconcile`), rather than after a backoff that may
//! be ten minutes long. Meanwhile the cards it was not told were sold stay
//! listed on its channel.

use holdfast::grpc::pb;
use tonic::Code;

use crate::cards::{
    SECRET, delivered_at_least, deliveries, dual_listing, engage, lock, satellite,
    satellite_taking, satellites,
};
use crate::helpers::{
    STORE_A_ADMIN, STORE_A_CHECKOUT, STORE_B_ADMIN, TestApp, spawn_app_with, spawn_two_stores,
    with_key,
};
use crate::satellite::Satellite;

/// A daemon whose outbox rounds are an hour apart, and which retries a
/// failed delivery an hour later: a webhook that goes out after a
/// failure goes because something asked for it.
pub async fn retrying_hourly() -> TestApp {
    const HOUR_MS: u64 = 3_600_000;
    spawn_app_with(|a| {
        a.outbox_interval_ms = HOUR_MS;
        a.webhook_backoff_base_ms = HOUR_MS;
    })
    .await
}

/// Cards `card-0`.. listed on the storefront and on eBay, whose satellite
/// (returned) fails the first bulk-disengage; then `sold` of them sold on
/// the storefront. Returns once the first failed and the rest wait
/// behind it.
async fn ebay_down_through_sales(app: &TestApp, sold: usize) -> Satellite {
    ebay_taking_batches_down_through_sales(app, sold, 0).await
}

/// [`ebay_down_through_sales`], with eBay's satellite taking up to
/// `batch_size` webhooks a request.
pub async fn ebay_taking_batches_down_through_sales(
    app: &TestApp,
    sold: usize,
    batch_size: u32,
) -> Satellite {
    dual_listing(app, true).await;
    let cards: Vec<String> = (0..sold).map(|i| format!("card-{i}")).collect();
    let cards: Vec<&str> = cards.iter().map(String::as_str).collect();
    engage(app, "storefront", &cards).await;
    engage(app, "ebay", &cards).await;
    let ebay = satellite_taking(app, "ebay", batch_size).await;
    ebay.fail_next("bulk-disengage", 1);
    for (i, card) in cards.iter().enumerate() {
        let name = format!("lock-{i}");
        lock(app, &name, "storefront", &[card]).await;
        app.locks()
            .complete_sale_locks(pb::CompleteSaleLocksRequest {
                lock_ref: name,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    app.eventually("the sales' webhooks queued, the first failed", || async {
        let d = deliveries(app, "ebay", "bulk-disengage").await;
        let cards: i32 = d.iter().map(|d| d.card_count).sum();
        (cards == sold as i32 && d.iter().any(|d| d.attempts == 1)).then_some(())
    })
    .await;
    ebay
}

/// Every bulk-disengage to `ebay` acknowledged, each once after the
/// failed attempt, in order.
async fn caught_up(app: &TestApp, ebay: &Satellite) {
    let queued = deliveries(app, "ebay", "bulk-disengage").await.len();
    delivered_at_least(app, "ebay", "bulk-disengage", queued).await;
    let got = ebay.received("bulk-disengage");
    assert_eq!(got.len(), queued + 1, "the failed attempt and each once");
    let ids: Vec<i64> = got.iter().map(|r| r.delivery.parse().unwrap()).collect();
    let mut in_order = ids.clone();
    in_order.sort_unstable();
    assert_eq!(ids, in_order, "one satellite's rows go in order");
}

/// What the satellite of `channel` waits on, as ListSatellites shows it.
pub async fn waiting_on(app: &TestApp, channel: &str) -> Option<pb::Delivery> {
    satellites(app)
        .await
        .into_iter()
        .find(|s| s.channel == channel)
        .expect("the satellite is listed")
        .waiting
}

fn retry(channel: &str) -> pb::RetryDeliveriesRequest {
    pb::RetryDeliveriesRequest {
        channel: channel.into(),
    }
}

/// Calls `RetryDeliveries` for `channel`; returns the channels it woke.
pub async fn retried(app: &TestApp, channel: &str) -> Vec<String> {
    app.channels()
        .retry_deliveries(retry(channel))
        .await
        .unwrap()
        .into_inner()
        .channels
}

#[tokio::test]
async fn a_satellite_back_from_an_outage_gets_its_backlog_when_retried() {
    let app = retrying_hourly().await;
    let ebay = ebay_down_through_sales(&app, 3).await;
    assert_eq!(ebay.received("bulk-disengage").len(), 1);
    // The satellite shows what it waits on: the oldest, failed once.
    let first = deliveries(&app, "ebay", "bulk-disengage")
        .await
        .into_iter()
        .map(|d| d.delivery_id)
        .min();
    let waiting = waiting_on(&app, "ebay").await.expect("ebay waits");
    assert_eq!(Some(waiting.delivery_id), first);
    assert_eq!(waiting.state(), pb::DeliveryState::Pending);
    assert_eq!((waiting.attempts, waiting.last_status), (1, 500));
    assert!(waiting.next_attempt_at.is_some(), "{waiting:?}");

    // The satellite is back (it answers 2xx from now on).
    assert_eq!(retried(&app, "ebay").await, ["ebay"]);
    caught_up(&app, &ebay).await;
    assert_eq!(waiting_on(&app, "ebay").await, None);

    // Nothing waits now: a second retry wakes nothing, and neither does
    // one for every channel.
    for channel in ["ebay", ""] {
        let woke = retried(&app, channel).await;
        assert!(woke.is_empty(), "{channel:?}: {woke:?}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_moved_to_a_new_address_is_sent_its_backlog_at_once() {
    let app = retrying_hourly().await;
    let old = ebay_down_through_sales(&app, 2).await;
    let new = satellite(&app, "ebay").await;
    let queued = deliveries(&app, "ebay", "bulk-disengage").await.len();
    delivered_at_least(&app, "ebay", "bulk-disengage", queued).await;
    assert_eq!(old.received("bulk-disengage").len(), 1);
    assert_eq!(new.received("bulk-disengage").len(), queued);
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_that_gives_its_list_is_sent_its_backlog_at_once() {
    let app = retrying_hourly().await;
    let ebay = ebay_down_through_sales(&app, 2).await;
    // It still lists the sold cards: it was not told.
    ebay.set_active(&["card-0", "card-1"]);
    app.channels()
        .reconcile(pb::ReconcileRequest {
            channel: "ebay".into(),
            active_card_ids: vec![],
            pull: true,
        })
        .await
        .unwrap();
    caught_up(&app, &ebay).await;
    app.shutdown().await;
}

#[tokio::test]
async fn retrying_needs_an_admin_key_and_a_channel_of_the_callers_with_a_satellite() {
    let app = spawn_two_stores().await;
    let mut channels = app.channels();
    channels
        .put_satellite(with_key(
            pb::PutSatelliteRequest {
                channel: "ebay".into(),
                base_url: "http://127.0.0.1:9".into(),
                secret: SECRET.into(),
                batch_size: 0,
            },
            STORE_A_ADMIN,
        ))
        .await
        .unwrap();
    let cases = [
        ("ebay", STORE_A_CHECKOUT, Code::PermissionDenied, ""),
        (
            "Not A Slug",
            STORE_A_ADMIN,
            Code::InvalidArgument,
            "channel",
        ),
        ("nowhere", STORE_A_ADMIN, Code::NotFound, "nowhere"),
        (
            "whatnot",
            STORE_A_ADMIN,
            Code::FailedPrecondition,
            "PutSatellite",
        ),
        // store A's satellite is not store B's.
        (
            "ebay",
            STORE_B_ADMIN,
            Code::FailedPrecondition,
            "no satellite",
        ),
    ];
    for (channel, key, code, names) in cases {
        let err = channels
            .retry_deliveries(with_key(retry(channel), key))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{channel} with {key}: {err:?}");
        assert!(err.message().contains(names), "{err:?}");
    }
    let woke = channels
        .retry_deliveries(with_key(retry("ebay"), STORE_A_ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert!(woke.channels.is_empty(), "nothing waits: {woke:?}");
    app.shutdown().await;
}
