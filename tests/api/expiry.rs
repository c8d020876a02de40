//! Expiry by bucket through the API (lua/lib.lua, "Ending an expired hold
//! is two things"): a burst's units are back as it expires and its
//! EXPIRED states follow at the configured pace, and holds that end before
//! their bucket does are not given back again when it ends.

use std::collections::HashMap;
use std::time::Duration;

use holdfast::grpc::pb::{self, HoldState, Outcome};
use redis::AsyncCommands;
use tonic::Code;

use crate::helpers::{cart_hold, claim, spawn_app, spawn_app_with};
use crate::holds::{expired_at, expiry_ms, extend_to, make_hold, past_on_redis};

/// Four holds of 2 made together, so in one or two expiry buckets: one
/// committed, one released and one extended before they expire. When the
/// fourth expires, only its 2 units come back: a sum of the bucket that
/// still counted the other three would free 6 more than are free, and the
/// claim of 5 below would sell units that are sold or held.
#[tokio::test]
async fn holds_ended_before_their_bucket_are_not_given_back_again_when_it_ends() {
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(8))], 0).await;
    for id in ["h1", "h2", "h3", "h4"] {
        make_hold(&app, cart_hold(id, "s", &[("p", 2)], 1)).await;
    }
    let flash = app.flash();
    flash
        .clone()
        .commit_cart_hold(pb::CommitCartHoldRequest {
            hold_id: "h1".into(),
        })
        .await
        .unwrap();
    flash
        .clone()
        .release_cart_hold(pb::ReleaseCartHoldRequest {
            hold_id: "h2".into(),
        })
        .await
        .unwrap();
    flash
        .clone()
        .extend_cart_hold(extend_to("h3", 600, "x"))
        .await
        .unwrap();

    // The sweeper wrote h4's end: its bucket has been given back.
    expired_at(&app, "h4").await;
    let stock = app.stock("s", "p").await;
    assert_eq!((stock.sold, stock.held, stock.remaining), (2, 2, 4));
    let five = app.flash().claim(claim("c5", "s", &[("p", 5)])).await;
    assert_eq!(five.unwrap().into_inner().outcome(), Outcome::SoldOut);
    let four = app.flash().claim(claim("c4", "s", &[("p", 4)])).await;
    assert_eq!(four.unwrap().into_inner().outcome(), Outcome::Ok);
    let state = |id: &str| {
        let mut flash = app.flash();
        let id = id.to_owned();
        async move {
            flash
                .get_cart_hold(pb::GetCartHoldRequest { hold_id: id })
                .await
                .unwrap()
                .into_inner()
                .hold
                .unwrap()
                .state()
        }
    };
    assert_eq!(state("h3").await, HoldState::Active);
    assert_eq!(state("h4").await, HoldState::Expired);
    let gone = app
        .flash()
        .commit_cart_hold(pb::CommitCartHoldRequest {
            hold_id: "h4".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::FailedPrecondition);
    app.shutdown().await;
}

/// 40 holds expiring together, with the sweeper told to write 10 EXPIRED
/// states a second (one a round): the first call after they expire finds
/// all 40 units free, while their states, events and audit rows come over
/// the next four seconds, every one of them, once.
#[tokio::test]
async fn a_bursts_units_are_back_as_it_expires_and_its_states_follow_at_the_set_pace() {
    let app = spawn_app_with(|a| a.expired_states_per_sec = 10).await;
    app.live_sale("s", &[("p", Some(40))], 0).await;
    let mut last = 0;
    for i in 0..40 {
        let hold = make_hold(&app, cart_hold(&format!("h{i}"), "s", &[("p", 1)], 1)).await;
        last = last.max(expiry_ms(&hold));
    }
    past_on_redis(&app, last, 60).await;
    let all = app.flash().claim(claim("all", "s", &[("p", 40)])).await;
    assert_eq!(all.unwrap().into_inner().outcome(), Outcome::Ok);
    // The expired events in the stream, written with the states.
    let events = format!("{}:{{dev}}:events", app.redis_prefix);
    let expired = || {
        let (events, app) = (events.clone(), &app);
        async move {
            let mut con = app.redis().await;
            let all: Vec<(String, HashMap<String, String>)> =
                con.xrange_all(&events).await.unwrap();
            all.iter().filter(|(_, f)| f["k"] == "expired").count()
        }
    };
    let at_first = expired().await;
    assert!(at_first < 40, "{at_first} states already written");
    app.eventually_within(Duration::from_secs(30), "every EXPIRED state", || async {
        (expired().await == 40).then_some(())
    })
    .await;
    app.eventually("every expiry in the audit log", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE kind = 'expired'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (rows == 40).then_some(())
    })
    .await;
    let stock = app.stock("s", "p").await;
    assert_eq!((stock.sold, stock.held, stock.remaining), (40, 0, 0));
    app.shutdown().await;
}

/// A hold the build before bucket sums made (state `A`, in its index
/// `due`, no sum) still ends alone, units and all, with no call to find
/// it: the sweeper looks for an older build's index twice a second.
#[tokio::test]
async fn a_hold_an_older_build_made_still_ends_alone() {
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(5))], 0).await;
    // 3 s, for the rewrite below to come before the hold's expiry: at 1 s
    // a busy suite once let the sweeper end it first (no `xdue` to rename).
    make_hold(&app, cart_hold("h", "s", &[("p", 2)], 3)).await;
    let prefix = format!("{}:{{dev}}:", app.redis_prefix);
    let mut con = app.redis().await;
    let _: () = redis::Script::new(
        r"local P = ARGV[1]
          for _, b in ipairs(redis.call('ZRANGE', P .. 'xdue', 0, -1)) do
            if redis.call('EXISTS', P .. 'xdue:' .. b) == 1 then
              redis.call('RENAME', P .. 'xdue:' .. b, P .. 'due:' .. b)
              redis.call('DEL', P .. 'xsum:' .. b)
            end
          end
          redis.call('RENAME', P .. 'xdue', P .. 'due')
          redis.call('DEL', P .. 'xsums')
          redis.call('HSET', P .. 'hold:h', 'st', 'A')",
    )
    .arg(&prefix)
    .invoke_async::<()>(&mut con)
    .await
    .unwrap();

    expired_at(&app, "h").await;
    let stock = app.stock("s", "p").await;
    assert_eq!((stock.held, stock.remaining), (0, 5));
    let active: i64 = con.get(format!("{prefix}active")).await.unwrap();
    assert_eq!(active, 0);
    app.shutdown().await;
}
