//! The listing mirror (src/services/listing_mirror.rs): a sale lock on
//! cards live on the checkout's channel skips Postgres, so the copy in
//! Redis must never say "live" where Postgres no longer does.

use holdfast::grpc::pb::{self, AcquireOutcome, CardConflictReason, ListingStatus};

use crate::cards::{acquire, card, engage, lock, status_on};
use crate::helpers::{TestApp, spawn_app};

/// The mirror's entry for `card` on `channel`: its version, negative when
/// not live there.
async fn mirrored(app: &TestApp, card: &str, channel: &str) -> Option<i64> {
    let key = format!("{}:{{dev}}:listed:{card}", app.redis_prefix);
    redis::cmd("HGET")
        .arg(&key)
        .arg(channel)
        .query_async(&mut app.redis().await)
        .await
        .unwrap()
}

/// Acquires and expects every card refused as not listed.
async fn refused_as_not_listed(app: &TestApp, lock_ref: &str, channel: &str, cards: &[&str]) {
    let r = app
        .locks()
        .acquire_sale_locks(acquire(lock_ref, channel, cards, 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), AcquireOutcome::Conflict, "{r:?}");
    assert_eq!(r.conflicts.len(), cards.len(), "{r:?}");
    assert!(
        r.conflicts
            .iter()
            .all(|c| c.reason() == CardConflictReason::NotListed),
        "{r:?}"
    );
}

/// Takes `cards` off `channel` (every card there when empty).
async fn disengage(app: &TestApp, channel: &str, cards: &[&str]) {
    app.channels()
        .disengage(pb::DisengageRequest {
            channel: channel.into(),
            card_ids: cards.iter().map(|c| (*c).to_owned()).collect(),
            all_cards: cards.is_empty(),
        })
        .await
        .unwrap();
}

async fn release(app: &TestApp, lock_ref: &str) {
    app.locks()
        .release_sale_locks(pb::ReleaseSaleLocksRequest {
            lock_ref: lock_ref.into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_card_disengaged_from_a_channel_cannot_be_locked_there_at_once() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    assert!(
        mirrored(&app, "card-1", "storefront")
            .await
            .is_some_and(|v| v > 0),
        "engage copies the listing to Redis"
    );
    lock(&app, "lock-a", "storefront", &["card-1", "card-2"]).await;
    release(&app, "lock-a").await;

    disengage(&app, "storefront", &["card-1"]).await;
    refused_as_not_listed(&app, "lock-b", "storefront", &["card-1"]).await;
    // Its neighbour is still live, and still lockable.
    lock(&app, "lock-c", "storefront", &["card-2"]).await;
    release(&app, "lock-c").await;

    // A wipe of the channel takes the rest.
    disengage(&app, "storefront", &[]).await;
    refused_as_not_listed(&app, "lock-d", "storefront", &["card-2"]).await;

    // Engaged again, both lock again.
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    lock(&app, "lock-e", "storefront", &["card-1", "card-2"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_card_reconcile_cleared_cannot_be_locked_on_that_channel() {
    let app = spawn_app().await;
    engage(&app, "thisorthat", &["card-1", "card-2"]).await;
    let r = app
        .channels()
        .reconcile(pb::ReconcileRequest {
            channel: "thisorthat".into(),
            active_card_ids: vec!["card-2".into()],
            pull: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cleared_card_ids, vec!["card-1"]);
    refused_as_not_listed(&app, "lock-a", "thisorthat", &["card-1"]).await;
    lock(&app, "lock-b", "thisorthat", &["card-2"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_late_copy_of_an_engage_never_undoes_a_later_disengage() {
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1"]).await;
    let engaged = mirrored(&app, "card-1", "storefront").await.unwrap();
    disengage(&app, "storefront", &["card-1"]).await;
    let gone = mirrored(&app, "card-1", "storefront").await.unwrap();
    assert!(gone < 0 && -gone > engaged, "{engaged} then {gone}");

    // The engage's copy arrives late (its daemon was slow): it is older
    // than the disengage's, so the mirror keeps "not live".
    let redis = app.redis_store().await;
    let dev = holdfast::domain::TenantId::parse("dev").unwrap();
    let storefront = holdfast::domain::ChannelSlug::parse("channel", "storefront").unwrap();
    let card = holdfast::domain::CardId::parse("card_ids", "card-1").unwrap();
    let changed = redis
        .set_listings(&dev, &storefront, engaged, true, &[card])
        .await
        .unwrap();
    assert_eq!(changed, 0);
    assert_eq!(mirrored(&app, "card-1", "storefront").await, Some(gone));
    refused_as_not_listed(&app, "lock-a", "storefront", &["card-1"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_card_missing_from_the_mirror_is_checked_in_postgres() {
    // What a Redis that came back empty, or cards engaged before the
    // mirror existed, look like: no copy, so Postgres decides, and the
    // acquire copies them.
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1", "card-2"]).await;
    let key = format!("{}:{{dev}}:listed:card-1", app.redis_prefix);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    refused_as_not_listed(&app, "lock-a", "ebay", &["card-1", "card-2"]).await;
    lock(&app, "lock-b", "storefront", &["card-1", "card-2"]).await;
    // A retry of the same lock answers as the first call did.
    let again = lock(&app, "lock-b", "storefront", &["card-1", "card-2"]).await;
    assert_eq!(again.lock_ref, "lock-b");
    // That acquire copied them, so the next one skips Postgres.
    app.eventually("the copy of card-1", || async {
        mirrored(&app, "card-1", "storefront")
            .await
            .filter(|v| *v > 0)
    })
    .await;
    // A copy that a delisting overtook stays overtaken.
    disengage(&app, "storefront", &["card-2"]).await;
    refused_as_not_listed(&app, "lock-c", "storefront", &["card-2"]).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_card_sold_long_ago_is_refused_with_the_channel_it_sold_on() {
    // Redis forgets the lock that sold a card after --retention-secs; the
    // refusal still names the channel, from Postgres's record of the sale.
    let app = spawn_app().await;
    engage(&app, "storefront", &["card-1"]).await;
    lock(&app, "lock-a", "storefront", &["card-1"]).await;
    app.locks()
        .complete_sale_locks(pb::CompleteSaleLocksRequest {
            lock_ref: "lock-a".into(),
            order_id: String::new(),
        })
        .await
        .unwrap();
    app.eventually("the sale in postgres", || async {
        (status_on(&card(&app, "card-1").await, "storefront") == Some(ListingStatus::Sold))
            .then_some(())
    })
    .await;
    let key = format!("{}:{{dev}}:hold:lock-a", app.redis_prefix);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();

    let r = app
        .locks()
        .acquire_sale_locks(acquire("lock-b", "storefront", &["card-1"], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), AcquireOutcome::Conflict, "{r:?}");
    assert_eq!(r.conflicts[0].reason(), CardConflictReason::Sold);
    assert_eq!(r.conflicts[0].channel, "storefront");
    app.shutdown().await;
}
