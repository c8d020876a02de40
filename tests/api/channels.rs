//! Channels: the registry, the listing rules on engage, disengage,
//! reconcile and the drift it reports.

use holdfast::grpc::pb::{
    self, DriftDirection, EngageConflictReason, EngageOutcome, ListingStatus,
};
use tonic::Code;

use crate::cards::{
    card, delivered, dual_listing, engage, satellite, sold_card, status_on, try_engage,
};
use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn the_registry_is_seeded_on_first_use_and_can_grow() {
    let app = spawn_app().await;
    let list = app
        .channels()
        .list_channels(pb::ListChannelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let slugs: Vec<(&str, bool, bool)> = list
        .channels
        .iter()
        .map(|c| (c.slug.as_str(), c.exclusive, c.for_sale))
        .collect();
    assert_eq!(
        slugs,
        vec![
            ("ebay", false, true),
            ("personal", false, false),
            ("repack", true, true),
            ("showcase", true, true),
            ("storefront", false, true),
            ("thisorthat", false, true),
            ("whatnot", false, true),
        ]
    );
    assert!(!list.dual_listing, "dual listing is off by default");

    let etsy = app
        .channels()
        .put_channel(pb::PutChannelRequest {
            channel: Some(pb::Channel {
                slug: "etsy".into(),
                name: "Etsy".into(),
                exclusive: false,
                for_sale: false,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .channel
        .unwrap();
    assert!(etsy.for_sale, "every channel but personal is for sale");
    engage(&app, "etsy", &["card-1"]).await;
    let err = app
        .channels()
        .put_channel(pb::PutChannelRequest {
            channel: Some(pb::Channel {
                slug: "personal".into(),
                name: "Mine".into(),
                exclusive: true,
                for_sale: true,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    app.shutdown().await;
}

#[tokio::test]
async fn engage_follows_exclusivity_and_dual_listing_all_or_nothing() {
    let app = spawn_app().await;
    let ebay = satellite(&app, "ebay").await;
    engage(&app, "storefront", &["card-1"]).await;

    // Dual listing off: a card live on the storefront cannot go on eBay,
    // and the batch's other card does not go either.
    let r = try_engage(&app, "ebay", &["card-1", "card-2"]).await;
    assert_eq!(r.outcome(), EngageOutcome::Conflict);
    assert_eq!(r.conflicts.len(), 1);
    assert_eq!(r.conflicts[0].card_id, "card-1");
    assert_eq!(
        r.conflicts[0].reason(),
        EngageConflictReason::DualListingOff
    );
    assert_eq!(r.conflicts[0].channel, "storefront");
    let err = app
        .channels()
        .get_card_channels(pb::GetCardChannelsRequest {
            card_ids: vec!["card-2".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the refused batch left no trace"
    );

    // Dual listing on: non-exclusive channels share the card.
    dual_listing(&app, true).await;
    let r = engage(&app, "ebay", &["card-1", "card-2"]).await;
    assert_eq!(r.engaged_card_ids, vec!["card-1", "card-2"]);
    let c1 = card(&app, "card-1").await;
    assert_eq!(c1.active_channels, vec!["ebay", "storefront"]);
    // Engaging again changes nothing.
    let again = engage(&app, "ebay", &["card-2"]).await;
    assert!(again.engaged_card_ids.is_empty());
    assert_eq!(again.already_active_card_ids, vec!["card-2"]);

    // Exclusive channels refuse company, with or without dual listing.
    let r = try_engage(&app, "showcase", &["card-1"]).await;
    assert_eq!(r.outcome(), EngageOutcome::Conflict);
    assert_eq!(r.conflicts[0].reason(), EngageConflictReason::Exclusive);
    engage(&app, "repack", &["card-3"]).await;
    let r = try_engage(&app, "ebay", &["card-3"]).await;
    assert_eq!(r.conflicts[0].reason(), EngageConflictReason::Exclusive);
    assert_eq!(r.conflicts[0].channel, "repack");

    // eBay's satellite heard of its two new cards, in one webhook.
    delivered(&app, "ebay", "engage").await;
    let got = ebay.received("engage");
    assert_eq!(got.len(), 1);
    assert!(got[0].signed);
    assert_eq!(got[0].body["cards"].as_array().unwrap().len(), 2);

    // Turning dual listing off delists nothing, but shows the conflict.
    dual_listing(&app, false).await;
    let conflicts = app
        .channels()
        .list_conflicts(pb::ListConflictsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .conflicts;
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].card_id, "card-1");
    assert_eq!(conflicts[0].channels, vec!["ebay", "storefront"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_of_thousands_engages_at_once_and_refreshes_the_planner_statistics() {
    let app = spawn_app().await;
    // Tables the planner has never seen analyzed; a large load must not
    // leave them so until autovacuum comes (jobs/statistics.rs).
    let analyzed = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_user_tables
             WHERE relname IN ('cards', 'card_channels', 'pools') AND last_analyze IS NOT NULL",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap()
    };
    assert_eq!(analyzed().await, 0);
    let ids: Vec<String> = (0..3000).map(|i| format!("card-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let r = engage(&app, "thisorthat", &refs).await;
    assert_eq!(r.engaged_card_ids.len(), 3000);
    let r = try_engage(&app, "showcase", &refs[2990..]).await;
    assert_eq!(r.conflicts.len(), 10);
    app.eventually("the card tables analyzed", async || {
        (analyzed().await == 3).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn disengage_one_card_or_wipe_a_channel_and_tell_the_satellite() {
    let app = spawn_app().await;
    let sat = satellite(&app, "whatnot").await;
    engage(&app, "whatnot", &["card-1", "card-2", "card-3"]).await;
    let one = |cards: Vec<String>, all: bool| pb::DisengageRequest {
        channel: "whatnot".into(),
        card_ids: cards,
        all_cards: all,
    };
    let r = app
        .channels()
        .disengage(one(vec!["card-1".into()], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.disengaged_card_ids, vec!["card-1"]);
    let r = app
        .channels()
        .disengage(one(vec!["card-1".into()], false))
        .await
        .unwrap()
        .into_inner();
    assert!(r.disengaged_card_ids.is_empty(), "idempotent");
    let r = app
        .channels()
        .disengage(one(vec![], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.disengaged_card_ids, vec!["card-2", "card-3"]);
    assert_eq!(
        status_on(&card(&app, "card-3").await, "whatnot"),
        Some(ListingStatus::Inactive)
    );
    let err = app
        .channels()
        .disengage(one(vec!["ghost".into()], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    delivered(&app, "whatnot", "disengage").await;
    let got = sat.received("disengage");
    let reasons: Vec<&str> = got
        .iter()
        .map(|r| r.body["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["delisted", "wipe"]);
    app.shutdown().await;
}

/// Reconciles `channel` with the list its satellite gives now.
async fn pulled(app: &crate::helpers::TestApp, channel: &str) -> pb::ReconcileResponse {
    app.channels()
        .reconcile(pb::ReconcileRequest {
            channel: channel.into(),
            active_card_ids: vec![],
            pull: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// A card whose `engage` webhook the satellite has not had yet is missing
/// from its list, and is not drift: reconcile leaves it live.
#[tokio::test]
async fn reconcile_leaves_a_card_the_satellite_was_not_told_of_yet() {
    let app = spawn_app().await;
    let sat = satellite(&app, "thisorthat").await;
    engage(&app, "thisorthat", &["card-1"]).await;
    delivered(&app, "thisorthat", "engage").await;
    sat.fail_next("engage", 1_000);
    engage(&app, "thisorthat", &["card-9"]).await;
    sat.set_active(&["card-1"]);
    let r = pulled(&app, "thisorthat").await;
    assert!(r.cleared_card_ids.is_empty(), "{r:?}");
    assert_eq!(
        card(&app, "card-9").await.active_channels,
        vec!["thisorthat"]
    );
    // Without card-1, which the satellite was told of, it is drift.
    sat.set_active(&[]);
    let r = pulled(&app, "thisorthat").await;
    assert_eq!(r.cleared_card_ids, vec!["card-1"]);
    app.shutdown().await;
}

#[tokio::test]
async fn reconcile_clears_drift_pushed_or_pulled_and_reports_it() {
    let app = spawn_app().await;
    let sat = satellite(&app, "thisorthat").await;
    engage(&app, "thisorthat", &["card-1", "card-2", "card-3"]).await;
    // Once the satellite was told (until then, a list without the cards is
    // no drift: see the next test).
    delivered(&app, "thisorthat", "engage").await;

    // Pushed: the satellite lost card-1 and lists a card holdfast never had.
    let r = app
        .channels()
        .reconcile(pb::ReconcileRequest {
            channel: "thisorthat".into(),
            active_card_ids: vec!["card-2".into(), "card-3".into(), "stray".into()],
            pull: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cleared_card_ids, vec!["card-1"]);
    assert_eq!(r.unknown_card_ids, vec!["stray"]);
    assert_eq!(
        status_on(&card(&app, "card-1").await, "thisorthat"),
        Some(ListingStatus::Inactive)
    );

    // Pulled from the satellite's own list.
    sat.set_active(&["card-2"]);
    let r = pulled(&app, "thisorthat").await;
    assert_eq!(r.cleared_card_ids, vec!["card-3"]);
    assert!(r.unknown_card_ids.is_empty());
    assert_eq!(
        card(&app, "card-2").await.active_channels,
        vec!["thisorthat"]
    );

    let drift = app
        .channels()
        .list_drift(pb::ListDriftRequest::default())
        .await
        .unwrap()
        .into_inner()
        .drift;
    let seen: Vec<(&str, DriftDirection, bool)> = drift
        .iter()
        .map(|d| (d.card_id.as_str(), d.direction(), d.cleared))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("card-3", DriftDirection::MissingOnSatellite, true),
            ("card-1", DriftDirection::MissingOnSatellite, true),
        ],
        "the stray card is no longer listed by the satellite, so no longer drift"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bad_channel_requests_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let engage_with = |channel: &str, cards: Vec<pb::EngageCard>| pb::EngageRequest {
        channel: channel.into(),
        cards,
    };
    let c = |id: &str, meta: &str| pb::EngageCard {
        card_id: id.into(),
        external_ref: String::new(),
        metadata_json: meta.into(),
    };
    let cases = vec![
        (engage_with("ebay", vec![]), Code::InvalidArgument, "cards"),
        (
            engage_with("ebay", vec![c("a", ""), c("a", "")]),
            Code::InvalidArgument,
            "cards[1]",
        ),
        (
            engage_with("ebay", vec![c("a", "[1]")]),
            Code::InvalidArgument,
            "cards[0].metadata_json",
        ),
        (
            engage_with("ebay", vec![c("a", r#"{"k": {"\u0000": 1}}"#)]),
            Code::InvalidArgument,
            "cards[0].metadata_json",
        ),
        (
            engage_with(
                "ebay",
                vec![pb::EngageCard {
                    external_ref: "ref\0".into(),
                    ..c("a", "")
                }],
            ),
            Code::InvalidArgument,
            "cards[0].external_ref",
        ),
        (
            engage_with("ebay", vec![c(&"a".repeat(65), "")]),
            Code::InvalidArgument,
            "cards[0].card_id",
        ),
        (
            engage_with("etsy", vec![c("a", "")]),
            Code::NotFound,
            "etsy",
        ),
        (
            engage_with("personal", vec![c("a", "")]),
            Code::InvalidArgument,
            "channel",
        ),
    ];
    for (req, code, names) in cases {
        let err = app.channels().engage(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(names), "{names}: {err:?}");
    }
    let sat = |url: &str, secret: &str| pb::PutSatelliteRequest {
        channel: "ebay".into(),
        base_url: url.into(),
        secret: secret.into(),
        batch_size: 0,
    };
    for (req, names) in [
        (
            sat("https://ebay.example", crate::cards::SECRET),
            "base_url",
        ),
        (sat("http://ebay.example", "short"), "secret"),
        (
            sat(
                "http://ebay.example",
                &format!("{}\0", crate::cards::SECRET),
            ),
            "secret",
        ),
        (
            pb::PutSatelliteRequest {
                batch_size: 101,
                ..sat("http://ebay.example", crate::cards::SECRET)
            },
            "batch_size",
        ),
    ] {
        let err = app.channels().put_satellite(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(names), "{err:?}");
    }
    let sats = crate::cards::satellites(&app).await;
    assert!(sats.is_empty());
    let err = app
        .channels()
        .get_card_channels(pb::GetCardChannelsRequest {
            card_ids: vec!["a".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no refused engage left a card");
    for pull in [false, true] {
        let err = app
            .channels()
            .reconcile(pb::ReconcileRequest {
                channel: "nowhere".into(),
                active_card_ids: vec![],
                pull,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "pull {pull}: {err:?}");
        assert!(err.message().contains("nowhere"), "{err:?}");
    }
    let list = |state, page_size, token: &str| pb::ListDeliveriesRequest {
        channel: String::new(),
        state,
        page_size,
        page_token: token.into(),
    };
    for (req, names) in [
        (list(99, 0, ""), "state"),
        (list(0, 1001, ""), "page_size"),
        (list(0, 0, "not-a-token"), "page_token"),
    ] {
        let err = app.channels().list_deliveries(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{names}: {err:?}");
        assert!(err.message().contains(names), "{names}: {err:?}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn the_reconciler_pulls_each_satellites_list_periodically() {
    let app = spawn_app_with(|a| a.reconcile_interval_secs = 1).await;
    let sat = satellite(&app, "ebay").await;
    sat.set_active(&["card-2"]);
    engage(&app, "ebay", &["card-1", "card-2"]).await;
    app.eventually("the reconciler to clear card-1", || async {
        let c = card(&app, "card-1").await;
        (status_on(&c, "ebay") == Some(ListingStatus::Inactive)).then_some(())
    })
    .await;
    assert_eq!(card(&app, "card-2").await.active_channels, vec!["ebay"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_satellite_still_listing_a_sold_card_is_told_to_pull_it() {
    let app = spawn_app().await;
    let ebay = satellite(&app, "ebay").await;
    engage(&app, "storefront", &["card-1"]).await;
    crate::cards::lock(&app, "lock-a", "storefront", &["card-1"]).await;
    app.locks()
        .complete_sale_locks(pb::CompleteSaleLocksRequest {
            lock_ref: "lock-a".into(),
            order_id: String::new(),
        })
        .await
        .unwrap();
    sold_card(&app, "card-1").await;

    // eBay's satellite lists the card anyway (a manual listing, say).
    let r = app
        .channels()
        .reconcile(pb::ReconcileRequest {
            channel: "ebay".into(),
            active_card_ids: vec!["card-1".into()],
            pull: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.unknown_card_ids, vec!["card-1"]);
    delivered(&app, "ebay", "bulk-disengage").await;
    let got = ebay.received("bulk-disengage");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["cards"][0]["card_id"], "card-1");
    assert_eq!(got[0].body["reason"], "sold");
    app.shutdown().await;
}

/// With `--satellite-hosts`, satellites are kept to the hosts the operator
/// allows: PutSatellite refuses another host (naming `base_url`) and
/// records nothing, and a satellite put before the list was narrowed is
/// sent nothing (its deliveries fail, saying why).
#[tokio::test]
async fn satellites_are_kept_to_the_hosts_the_operator_allows() {
    let open = spawn_app().await;
    let sat = satellite(&open, "ebay").await;
    let args = open.same_stores();
    open.shutdown().await;
    let mut args = args;
    args.satellite_hosts = vec!["*.shop.example".into()];
    let app = crate::helpers::start(args).await;

    let put = |url: &str| pb::PutSatelliteRequest {
        channel: "ebay".into(),
        base_url: url.into(),
        secret: crate::cards::SECRET.into(),
        batch_size: 0,
    };
    for refused in [
        "http://169.254.169.254/latest",
        "http://127.0.0.1:5432",
        "http://shop.example.attacker.example",
    ] {
        let err = app
            .channels()
            .put_satellite(put(refused))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{refused}: {err:?}");
        assert!(err.message().contains("base_url"), "{err:?}");
    }
    let before = crate::cards::satellites(&app).await;
    assert_eq!(before.len(), 1, "only the one put before: {before:?}");
    assert_eq!(before[0].base_url, sat.base_url);

    // The satellite put before (on 127.0.0.1) hears nothing of an engage.
    engage(&app, "ebay", &["a"]).await;
    let failed = app
        .eventually("the engage's delivery refused", || async {
            let d = crate::cards::deliveries(&app, "ebay", "engage").await;
            d.into_iter()
                .find(|d| d.last_error.contains("--satellite-hosts"))
        })
        .await;
    assert_eq!(failed.state(), pb::DeliveryState::Pending);
    assert!(sat.received("engage").is_empty(), "nothing was sent");

    app.channels()
        .put_satellite(put("http://tot.shop.example:8080/hooks"))
        .await
        .unwrap();
    app.shutdown().await;
}
