//! Sale locks: one card, many channels, never sold twice.

use holdfast::grpc::pb::{self, AcquireOutcome, CardConflictReason, ListingStatus, SaleLockState};
use tonic::Code;

use crate::cards::{
    acquire, delivered, delivered_at_least, deliveries, dual_listing, engage, lock, satellite,
    sold_card, status_on,
};
use crate::helpers::{
    STORE_A_ADMIN, STORE_A_CHECKOUT, STORE_B_ADMIN, claim, spawn_app, spawn_app_with,
    spawn_two_stores, with_key,
};

fn lock_ref(r: &str) -> pb::CompleteSaleLocksRequest {
    pb::CompleteSaleLocksRequest {
        lock_ref: r.into(),
        order_id: String::new(),
    }
}

#[tokio::test]
async fn the_checkout_race_sells_the_card_once_and_tells_the_other_satellite_once() {
    let app = spawn_app().await;
    dual_listing(&app, true).await;
    let tot = satellite(&app, "thisorthat").await;
    let storefront = satellite(&app, "storefront").await;
    engage(&app, "storefront", &["card-1"]).await;
    engage(&app, "thisorthat", &["card-1", "card-2"]).await;

    // Buyer A enters checkout on the storefront.
    let a = lock(&app, "lock-a", "storefront", &["card-1"]).await;
    assert_eq!(a.state(), SaleLockState::Active);
    assert!(a.fencing_token > 0);

    // Buyer B's pull on ThisOrThat includes the same card: refused, naming
    // the card and the channel holding it, and nothing is locked.
    let b = app
        .locks()
        .acquire_sale_locks(acquire("lock-b", "thisorthat", &["card-2", "card-1"], 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.outcome(), AcquireOutcome::Conflict);
    assert_eq!(b.conflicts.len(), 1, "{b:?}");
    assert_eq!(b.conflicts[0].card_id, "card-1");
    assert_eq!(b.conflicts[0].reason(), CardConflictReason::Locked);
    assert_eq!(b.conflicts[0].channel, "storefront");
    let err = app
        .locks()
        .get_sale_lock(pb::GetSaleLockRequest {
            lock_ref: "lock-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a refused batch locks nothing");
    let c2 = lock(&app, "lock-c", "thisorthat", &["card-2"]).await;
    assert!(c2.fencing_token > a.fencing_token, "tokens grow");

    // A pays: sold on the storefront, pulled from ThisOrThat.
    let done = app
        .locks()
        .complete_sale_locks(pb::CompleteSaleLocksRequest {
            lock_ref: "lock-a".into(),
            order_id: "cs_test_1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(done.state(), SaleLockState::Completed);
    assert_eq!(done.fencing_token, a.fencing_token);
    let c1 = sold_card(&app, "card-1").await;
    assert_eq!(c1.sold_channel, "storefront");
    assert_eq!(status_on(&c1, "storefront"), Some(ListingStatus::Sold));
    assert_eq!(status_on(&c1, "thisorthat"), Some(ListingStatus::Inactive));
    assert!(c1.active_channels.is_empty());

    // ThisOrThat's satellite gets exactly one signed bulk-disengage.
    let d = delivered(&app, "thisorthat", "bulk-disengage").await;
    assert_eq!(d.len(), 1);
    let got = tot.received("bulk-disengage");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].signed, "the signature verifies");
    assert_eq!(got[0].delivery, d[0].delivery_id.to_string());
    assert_eq!(got[0].body["cards"][0]["card_id"], "card-1");
    assert_eq!(got[0].body["cards"][0]["external_ref"], "thisorthat-card-1");
    assert_eq!(got[0].body["sold_on"], "storefront");
    assert_eq!(got[0].body["lock_ref"], "lock-a");
    // The selling channel made the sale; it is not told to delist.
    assert!(
        deliveries(&app, "storefront", "bulk-disengage")
            .await
            .is_empty()
    );
    assert!(storefront.received("bulk-disengage").is_empty());

    // The card is gone for good: a new lock is refused as sold.
    let again = app
        .locks()
        .acquire_sale_locks(acquire("lock-d", "storefront", &["card-1"], 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), AcquireOutcome::Conflict);
    assert_eq!(again.conflicts[0].reason(), CardConflictReason::Sold);
    assert_eq!(again.conflicts[0].channel, "storefront");
    // Completing again is a retry: the same answer, no second sale.
    let retry = app.locks().complete_sale_locks(lock_ref("lock-a")).await;
    assert_eq!(
        retry.unwrap().into_inner().lock.unwrap().order_id,
        "cs_test_1"
    );

    // Neither the retry nor a later outbox pass tells ThisOrThat twice:
    // once a later sale's webhook has arrived, card-1's is still the only
    // one of its kind, as a row and as a request.
    engage(&app, "storefront", &["card-3"]).await;
    engage(&app, "thisorthat", &["card-3"]).await;
    lock(&app, "lock-e", "storefront", &["card-3"]).await;
    app.locks()
        .complete_sale_locks(lock_ref("lock-e"))
        .await
        .unwrap();
    let d = delivered_at_least(&app, "thisorthat", "bulk-disengage", 2).await;
    assert_eq!(d.len(), 2, "{d:?}");
    let got = tot.received("bulk-disengage");
    let lock_refs: Vec<_> = got.iter().map(|r| r.body["lock_ref"].clone()).collect();
    assert_eq!(lock_refs, ["lock-a", "lock-e"], "{got:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_that_fails_twice_then_recovers_still_gets_the_webhook() {
    let app = spawn_app_with(|a| a.webhook_backoff_base_ms = 20).await;
    dual_listing(&app, true).await;
    let ebay = satellite(&app, "ebay").await;
    ebay.fail_next("bulk-disengage", 2);
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    engage(&app, "ebay", &["card-1", "card-2"]).await;
    lock(&app, "lock-a", "storefront", &["card-1", "card-2"]).await;
    app.locks()
        .complete_sale_locks(lock_ref("lock-a"))
        .await
        .unwrap();

    let d = delivered(&app, "ebay", "bulk-disengage").await;
    assert_eq!(d.len(), 1, "one webhook for both cards");
    assert_eq!(d[0].attempts, 3);
    assert_eq!(d[0].last_status, 200);
    assert_eq!(d[0].card_count, 2);
    let got = ebay.received("bulk-disengage");
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert!(
        got.iter()
            .all(|r| r.signed && r.delivery == got[0].delivery)
    );
    let page = crate::ops::scrape(&app).await;
    assert!(
        page.contains("holdfast_outbox_delivery_failures_total"),
        "{page}"
    );
    assert!(page.contains("holdfast_outbox_backlog"));
    app.shutdown().await;
}

/// An outbox round an hour apart, and a failed delivery retried an hour
/// later: in these tests a webhook that goes out at all goes out because
/// its queueing woke the outbox, not because a round came.
const HOUR_MS: u64 = 3_600_000;

/// Sells `card` through lock `name` on the storefront.
async fn sell(app: &crate::helpers::TestApp, name: &str, card: &str) {
    lock(app, name, "storefront", &[card]).await;
    app.locks()
        .complete_sale_locks(lock_ref(name))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sale_wakes_the_outbox_without_waiting_for_its_round() {
    let app = spawn_app_with(|a| a.outbox_interval_ms = HOUR_MS).await;
    let ebay = locked_on_storefront_and_listed_on_ebay(&app).await;
    app.locks()
        .complete_sale_locks(lock_ref("lock-a"))
        .await
        .unwrap();
    let d = delivered(&app, "ebay", "bulk-disengage").await;
    assert_eq!(d.len(), 1);
    assert_eq!(ebay.received("bulk-disengage").len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_that_stops_answering_holds_up_no_other() {
    let app = spawn_app_with(|a| {
        a.outbox_interval_ms = HOUR_MS;
        a.webhook_timeout_ms = HOUR_MS;
    })
    .await;
    dual_listing(&app, true).await;
    let cards = ["card-1", "card-2"];
    for channel in ["storefront", "ebay", "thisorthat"] {
        engage(&app, channel, &cards).await;
    }
    let ebay = satellite(&app, "ebay").await;
    let tot = satellite(&app, "thisorthat").await;
    tot.silence(true);
    sell(&app, "lock-1", "card-1").await;
    delivered(&app, "ebay", "bulk-disengage").await;
    app.eventually("thisorthat's webhook held", || async {
        (tot.held() == 1).then_some(())
    })
    .await;
    // ThisOrThat's attempt waits on; ebay hears of the next sale anyway.
    sell(&app, "lock-2", "card-2").await;
    let d = delivered_at_least(&app, "ebay", "bulk-disengage", 2).await;
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(ebay.received("bulk-disengage").len(), 2);
    assert!(tot.received("bulk-disengage").is_empty());
    // Answering again, ThisOrThat gets both, in order.
    tot.silence(false);
    delivered_at_least(&app, "thisorthat", "bulk-disengage", 2).await;
    let got = tot.received("bulk-disengage");
    let refs: Vec<_> = got.iter().map(|r| r.body["lock_ref"].clone()).collect();
    assert_eq!(refs, ["lock-1", "lock-2"], "{got:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_back_from_an_outage_gets_its_backlog_at_once_in_order() {
    let app = spawn_app_with(|a| {
        a.outbox_interval_ms = HOUR_MS;
        a.webhook_backoff_base_ms = 1_000;
    })
    .await;
    dual_listing(&app, true).await;
    let cards: Vec<String> = (0..13).map(|i| format!("card-{i}")).collect();
    let cards: Vec<&str> = cards.iter().map(String::as_str).collect();
    engage(&app, "storefront", &cards).await;
    engage(&app, "ebay", &cards).await;
    let ebay = satellite(&app, "ebay").await;
    ebay.fail_next("bulk-disengage", 1);
    for (i, card) in cards[..12].iter().enumerate() {
        sell(&app, &format!("lock-{i}"), card).await;
    }
    // The first webhook failed and waits out its backoff; the other
    // eleven queue behind it.
    let queued = app
        .eventually("twelve webhooks queued, the first attempted", || async {
            let d = deliveries(&app, "ebay", "bulk-disengage").await;
            (d.len() == 12 && d.iter().any(|d| d.attempts == 1)).then_some(d)
        })
        .await;
    assert!(
        queued
            .iter()
            .all(|d| d.state() == pb::DeliveryState::Pending),
        "{queued:?}"
    );
    assert_eq!(ebay.received("bulk-disengage").len(), 1);

    // The backoff passes (the satellite is back); with the rounds an hour
    // apart, only the next sale's webhook wakes the outbox, and the one
    // due head takes the rest behind it.
    app.eventually("the backoff to pass", || async {
        let due: bool = sqlx::query_scalar(
            "SELECT bool_and(next_attempt_at <= now()) FROM outbox WHERE state = 'pending'",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap();
        due.then_some(())
    })
    .await;
    sell(&app, "lock-12", cards[12]).await;
    let d = delivered_at_least(&app, "ebay", "bulk-disengage", 13).await;
    assert_eq!(d.iter().map(|d| d.attempts).sum::<i32>(), 14, "{d:?}");
    let got = ebay.received("bulk-disengage");
    assert_eq!(got.len(), 14, "the failed attempt and each once: {got:?}");
    let ids: Vec<i64> = got.iter().map(|r| r.delivery.parse().unwrap()).collect();
    let mut in_order = ids.clone();
    in_order.sort_unstable();
    assert_eq!(ids, in_order, "one satellite's rows go in order");
    assert!(got.iter().all(|r| r.signed));
    app.shutdown().await;
}

#[tokio::test]
async fn an_expired_lock_frees_its_cards_and_cannot_be_completed() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1"]).await;
    let a = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1"], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), AcquireOutcome::Acquired);

    // Once A's time is up, B gets the card (polled, not slept for).
    let b = app
        .eventually("the card to be free again", || async {
            let r = app
                .locks()
                .acquire_sale_locks(acquire("lock-b", "storefront", &["card-1"], 600))
                .await
                .unwrap()
                .into_inner();
            (r.outcome() == AcquireOutcome::Acquired).then_some(r)
        })
        .await;
    assert!(b.lock.unwrap().fencing_token > a.lock.unwrap().fencing_token);

    let err = app
        .locks()
        .complete_sale_locks(lock_ref("lock-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    let a = app
        .locks()
        .get_sale_lock(pb::GetSaleLockRequest {
            lock_ref: "lock-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(a.state(), SaleLockState::Expired);
    // Re-acquiring a finished lock is refused too: a new checkout needs a new ref.
    let err = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1"], 600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    app.shutdown().await;
}

#[tokio::test]
async fn acquiring_again_is_idempotent_and_refreshes_release_is_idempotent() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    let first = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1", "card-2"], 60))
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    // The same request, cards in another order, a longer TTL: the same
    // lock, same token, later expiry; and again, any number of times.
    let mut previous = first.clone();
    for ttl in [600, 900, 1200] {
        let again = app
            .locks()
            .acquire_sale_locks(acquire("lock-a", "storefront", &["card-2", "card-1"], ttl))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.outcome(), AcquireOutcome::Acquired);
        let again = again.lock.unwrap();
        assert_eq!(again.fencing_token, first.fencing_token);
        assert!(
            again.expires_at.unwrap().seconds > previous.expires_at.unwrap().seconds,
            "the TTL was refreshed"
        );
        previous = again;
    }
    // The same ref for other cards, or from another channel, is a misuse.
    let err = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1"], 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let released = app
        .locks()
        .release_sale_locks(pb::ReleaseSaleLocksRequest {
            lock_ref: "lock-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(released.state(), SaleLockState::Released);
    let twice = app
        .locks()
        .release_sale_locks(pb::ReleaseSaleLocksRequest {
            lock_ref: "lock-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(twice.state(), SaleLockState::Released);
    let err = app
        .locks()
        .complete_sale_locks(lock_ref("lock-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // A released lock is not taken again under its old lockRef.
    let err = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1", "card-2"], 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("released"), "{err:?}");
    // Every answer is what a read then finds (lua/lib.lua, HOLD_FIELDS).
    let get = async |lock_ref: &str| {
        app.locks()
            .get_sale_lock(pb::GetSaleLockRequest {
                lock_ref: lock_ref.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .lock
            .unwrap()
    };
    assert!(released.finished_at.is_some());
    assert_eq!(released, get("lock-a").await);
    // Released cards are free at once, for any channel's checkout.
    let acquired = lock(&app, "lock-b", "storefront", &["card-1", "card-2"]).await;
    assert_eq!(acquired, get("lock-b").await);
    let completed = app.locks().complete_sale_locks(lock_ref("lock-b")).await;
    let completed = completed.unwrap().into_inner().lock.unwrap();
    assert_eq!(completed.state(), SaleLockState::Completed);
    assert_eq!(completed.fencing_token, acquired.fencing_token);
    assert!(completed.finished_at.is_some());
    assert_eq!(completed, get("lock-b").await);
    app.shutdown().await;
}

#[tokio::test]
async fn cards_not_live_on_the_channel_or_unknown_are_refused() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    let r = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "thisorthat", &["card-1", "card-2"], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), AcquireOutcome::Conflict);
    assert_eq!(r.conflicts.len(), 2);
    assert!(
        r.conflicts
            .iter()
            .all(|c| c.reason() == CardConflictReason::NotListed)
    );
    let err = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1", "nope"], 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"), "{err:?}");
    lock(&app, "lock-a", "storefront", &["card-1", "card-2"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn bad_lock_requests_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1"]).await;
    let cases: Vec<(pb::AcquireSaleLocksRequest, Code, &str)> = vec![
        (
            acquire("l", "storefront", &[], 60),
            Code::InvalidArgument,
            "card_ids",
        ),
        (
            acquire("l", "storefront", &["card-1", "card-1"], 60),
            Code::InvalidArgument,
            "card_ids[1]",
        ),
        (
            acquire(&"x".repeat(129), "storefront", &["card-1"], 60),
            Code::InvalidArgument,
            "lock_ref",
        ),
        (
            acquire("l", "storefront", &[&"c".repeat(65)], 60),
            Code::InvalidArgument,
            "card_ids[0]",
        ),
        (
            acquire("l", "storefront", &["{card}:1"], 60),
            Code::InvalidArgument,
            "card_ids[0]",
        ),
        (
            acquire("l", "storefront", &["card-1"], 0),
            Code::InvalidArgument,
            "ttl",
        ),
        (
            acquire("l", "Store Front", &["card-1"], 60),
            Code::InvalidArgument,
            "channel",
        ),
        (
            acquire("l", "personal", &["card-1"], 60),
            Code::InvalidArgument,
            "channel",
        ),
        (
            acquire("l", "storefront", &["card-1"], -1),
            Code::InvalidArgument,
            "ttl",
        ),
        (
            acquire("l", "storefront", &["card-1"], 100 * 86_400),
            Code::InvalidArgument,
            "ttl",
        ),
        (
            acquire("l", "etsy", &["card-1"], 60),
            Code::NotFound,
            "etsy",
        ),
    ];
    let many: Vec<String> = (0..501).map(|i| format!("card-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut cases = cases;
    cases.push((
        acquire("l", "storefront", &many, 60),
        Code::InvalidArgument,
        "at most 500 cards",
    ));
    for (req, code, names) in cases {
        let err = app.locks().acquire_sale_locks(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(names), "{names}: {err:?}");
    }
    // Nothing was locked by any of them.
    lock(&app, "lock-ok", "storefront", &["card-1"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn another_workspaces_locks_and_cards_are_not_found() {
    let app = spawn_two_stores().await;
    let mut channels = app.channels();
    let mut locks = app.locks();
    let engage = pb::EngageRequest {
        channel: "storefront".into(),
        cards: vec![pb::EngageCard {
            card_id: "card-1".into(),
            ..Default::default()
        }],
    };
    let err = channels
        .engage(with_key(engage.clone(), STORE_A_CHECKOUT))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "channels are an admin's"
    );
    channels
        .engage(with_key(engage.clone(), STORE_A_ADMIN))
        .await
        .unwrap();
    let a = locks
        .acquire_sale_locks(with_key(
            acquire("lock-a", "storefront", &["card-1"], 60),
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), AcquireOutcome::Acquired);

    let get = pb::GetSaleLockRequest {
        lock_ref: "lock-a".into(),
    };
    let codes = [
        locks
            .get_sale_lock(with_key(get, STORE_B_ADMIN))
            .await
            .unwrap_err()
            .code(),
        locks
            .complete_sale_locks(with_key(lock_ref("lock-a"), STORE_B_ADMIN))
            .await
            .unwrap_err()
            .code(),
        locks
            .release_sale_locks(with_key(
                pb::ReleaseSaleLocksRequest {
                    lock_ref: "lock-a".into(),
                },
                STORE_B_ADMIN,
            ))
            .await
            .unwrap_err()
            .code(),
        channels
            .get_card_channels(with_key(
                pb::GetCardChannelsRequest {
                    card_ids: vec!["card-1".into()],
                },
                STORE_B_ADMIN,
            ))
            .await
            .unwrap_err()
            .code(),
        locks
            .acquire_sale_locks(with_key(
                acquire("lock-b", "storefront", &["card-1"], 60),
                STORE_B_ADMIN,
            ))
            .await
            .unwrap_err()
            .code(),
    ];
    assert_eq!(codes, [Code::NotFound; 5]);
    let still = locks
        .get_sale_lock(with_key(
            pb::GetSaleLockRequest {
                lock_ref: "lock-a".into(),
            },
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    assert_eq!(
        still.state(),
        SaleLockState::Active,
        "B's complete and release left A's lock as it was"
    );

    // B's own card of the same id is a different card: B can lock it while
    // A's lock holds A's.
    channels
        .engage(with_key(engage, STORE_B_ADMIN))
        .await
        .unwrap();
    let b = locks
        .acquire_sale_locks(with_key(
            acquire("lock-a", "storefront", &["card-1"], 60),
            STORE_B_ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.outcome(), AcquireOutcome::Acquired);
    app.shutdown().await;
}

/// card-1 listed on the storefront and on ebay (whose satellite is
/// returned), and locked on the storefront by lock-a.
async fn locked_on_storefront_and_listed_on_ebay(
    app: &crate::helpers::TestApp,
) -> crate::satellite::Satellite {
    dual_listing(app, true).await;
    let ebay = satellite(app, "ebay").await;
    engage(app, "storefront", &["card-1"]).await;
    engage(app, "ebay", &["card-1"]).await;
    lock(app, "lock-a", "storefront", &["card-1"]).await;
    ebay
}

#[tokio::test]
async fn a_sale_committed_in_redis_just_before_a_crash_reaches_postgres_exactly_once() {
    use holdfast::domain::{HoldId, Job, TenantId};
    use holdfast::engine::Engine;
    use holdfast::store::postgres::PgStore;
    use holdfast::store::redis::{RedisStore, RedisTimeouts, decode_event};

    let app = spawn_app().await;
    let ebay = locked_on_storefront_and_listed_on_ebay(&app).await;
    let args = app.same_stores();
    app.shutdown().await;

    // The daemon "crashed" right after Redis committed: the commit event is
    // in the stream and Postgres has heard nothing of it.
    let redis = RedisStore::connect(
        &crate::helpers::redis_url(),
        &args.redis_prefix,
        std::time::Duration::from_secs(3600),
        RedisTimeouts::default(),
    )
    .await
    .unwrap();
    let pg = PgStore::connect(&args.db.database_url, 2, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let engine = Engine::new(redis.clone(), pg.clone(), args.grant_policy(), 1);
    let dev = TenantId::parse("dev").unwrap();
    let id = HoldId::parse("lock_ref", "lock-a", 128).unwrap();
    engine.commit(&dev, &id, Job::Lock, "").await.unwrap();

    // The next daemon's drainer finishes the job.
    let again = crate::helpers::start(args).await;
    let c = sold_card(&again, "card-1").await;
    assert_eq!(status_on(&c, "ebay"), Some(ListingStatus::Inactive));
    delivered(&again, "ebay", "bulk-disengage").await;

    // Replaying the whole stream changes nothing: exactly once by event id.
    let mut con = redis.multiplexed();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(redis.keys().events(&dev))
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    let events: Vec<_> = entries
        .ids
        .iter()
        .map(|e| decode_event(e).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.job == "lock" && e.kind == "committed")
    );
    assert_eq!(pg.record_events(&dev, &events).await.unwrap().0, 0);
    assert_eq!(deliveries(&again, "ebay", "bulk-disengage").await.len(), 1);
    assert_eq!(ebay.received("bulk-disengage").len(), 1);
    again.shutdown().await;
}

#[tokio::test]
async fn engaging_a_card_grants_it_to_redis_before_its_first_lock() {
    // Grants are serial; a checkout rush over fresh cards must not queue
    // behind one grant per card, so Engage grants them up front.
    // 250 cards: the grants go to Postgres in parts of 100, each part to
    // Redis right after, so every part must arrive.
    let app = spawn_app().await;
    let names: Vec<String> = (1..=250).map(|i| format!("card-{i}")).collect();
    let cards: Vec<&str> = names.iter().map(String::as_str).collect();
    engage(&app, "storefront", &cards).await;
    let granted: i64 = sqlx::query_scalar(
        "SELECT sum(granted)::bigint FROM pools WHERE tenant = 'dev' AND pool_id LIKE 'card/%'",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(granted, 250, "each card's one unit is granted in Postgres");
    let mut con = app.redis().await;
    for card in &cards {
        let key = format!("{}:{{dev}}:pool:card/{card}", app.redis_prefix);
        let grant: Option<i64> = redis::cmd("HGET")
            .arg(&key)
            .arg("grant")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(grant, Some(1), "{card} is granted to Redis at Engage");
    }
    let a = app
        .locks()
        .acquire_sale_locks(acquire("lock-a", "storefront", &["card-1", "card-2"], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), AcquireOutcome::Acquired);
    app.shutdown().await;
}

/// A completed lock whose own listing row is gone from Postgres (removed by
/// hand: the API has no such path) still records its sale: the drainer
/// writes the sold listing rather than stall on the missing row, and the
/// other channel is pulled as usual.
#[tokio::test]
async fn a_lock_whose_listing_row_was_removed_still_records_its_sale() {
    let app = spawn_app().await;
    let ebay = locked_on_storefront_and_listed_on_ebay(&app).await;
    sqlx::query("DELETE FROM card_channels WHERE card_id = 'card-1' AND channel = 'storefront'")
        .execute(&app.pg)
        .await
        .unwrap();
    let done = app.locks().complete_sale_locks(lock_ref("lock-a")).await;
    let done = done.unwrap().into_inner().lock.unwrap();
    assert_eq!(done.state(), SaleLockState::Completed);
    let c = sold_card(&app, "card-1").await;
    assert_eq!(c.sold_channel, "storefront");
    assert_eq!(status_on(&c, "storefront"), Some(ListingStatus::Sold));
    assert_eq!(status_on(&c, "ebay"), Some(ListingStatus::Inactive));
    delivered(&app, "ebay", "bulk-disengage").await;
    assert_eq!(ebay.received("bulk-disengage").len(), 1);
    app.shutdown().await;
}

/// Every job's ids share one namespace per tenant: a lockRef that names a
/// flash-sale claim is refused, and neither the claim nor the card changes.
/// (The acquire reads its lockRef once, for an earlier lock, and the rules
/// trust that read: this is the case where the id is taken, but not by a
/// lock.)
#[tokio::test]
async fn a_lock_ref_that_names_a_claim_is_refused_and_takes_no_card() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1"]).await;
    app.live_sale("drop", &[("p", Some(5))], 0).await;
    let order = || claim("order-7", "drop", &[("p", 2)]);
    let claimed = app.flash().claim(order()).await.unwrap().into_inner();

    let err = app
        .locks()
        .acquire_sale_locks(acquire("order-7", "storefront", &["card-1"], 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("order-7"), "{err:?}");

    let again = app.flash().claim(order()).await.unwrap().into_inner();
    assert_eq!(again, claimed, "the claim answers as before");
    assert_eq!(app.stock("drop", "p").await.sold, 2);
    lock(&app, "lock-b", "storefront", &["card-1"]).await;
    app.shutdown().await;
}

/// One drainer batch that completes several sale locks queues every
/// pulled listing's webhook in one statement (`listings.rs` `enqueue_all`):
/// one per lock and channel with a satellite, in the order of the sales
/// and then of the channels, each naming its own lock's cards; a channel
/// without a satellite gets none.
#[tokio::test]
async fn one_batch_of_completed_locks_queues_each_pulled_channels_webhook_in_order() {
    use holdfast::domain::{Event, EventLine, TenantId};
    use holdfast::store::postgres::PgStore;

    let app = spawn_app().await;
    dual_listing(&app, true).await;
    let _ebay = satellite(&app, "ebay").await;
    let _tot = satellite(&app, "thisorthat").await;
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    engage(&app, "ebay", &["card-1", "card-2"]).await;
    engage(&app, "thisorthat", &["card-1"]).await;
    engage(&app, "whatnot", &["card-2"]).await;
    let db = app.pg.clone();
    app.shutdown().await;

    // The committed events of two locks taken on the storefront, as the
    // drainer reads them from the stream in one batch.
    let epoch: i64 = sqlx::query_scalar(
        "SELECT epoch FROM pools WHERE tenant = 'dev' AND pool_id = 'card/card-1'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let committed = |event_id: &str, lock_ref: &str, card: &str| Event {
        event_id: event_id.into(),
        kind: "committed".into(),
        job: "lock".into(),
        hold_id: lock_ref.into(),
        lines: vec![EventLine {
            pool: format!("card/{card}"),
            qty: 1,
            epoch,
        }],
        reference: "storefront".into(),
        order_id: String::new(),
        customer: String::new(),
        at: chrono::Utc::now(),
    };
    let batch = [
        committed("9-1", "lock-x", "card-1"),
        committed("9-2", "lock-y", "card-2"),
    ];
    let dev = TenantId::parse("dev").unwrap();
    let pg = PgStore::from_pool(db.clone());
    assert_eq!(pg.record_events(&dev, &batch).await.unwrap().0, 2);

    let queued: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT channel, body::jsonb FROM outbox WHERE workspace = 'dev' AND event = 'bulk-disengage' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let seen: Vec<(&str, &str, Vec<&str>)> = queued
        .iter()
        .map(|(channel, body)| {
            let cards = body["cards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["card_id"].as_str().unwrap())
                .collect();
            (channel.as_str(), body["lock_ref"].as_str().unwrap(), cards)
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ebay", "lock-x", vec!["card-1"]),
            ("thisorthat", "lock-x", vec!["card-1"]),
            ("ebay", "lock-y", vec!["card-2"]),
        ],
        "{queued:?}"
    );
    for (channel, body) in &queued {
        assert_eq!(body["channel"], channel.as_str());
        assert_eq!(body["event"], "bulk-disengage");
        assert_eq!(body["workspace"], "dev");
        assert_eq!(body["sold_on"], "storefront");
    }
}
