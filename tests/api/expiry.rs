//! Expiry by bucket through the API (lua/lib.lua, "Ending an expired hold
//! is two things"): holds that end before their bucket does are not given
//! back again when it ends.

use holdfast::grpc::pb::{self, HoldState, Outcome};
use tonic::Code;

use crate::helpers::{cart_hold, claim, spawn_app};
use crate::holds::{expired_at, make_hold};

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
        .extend_cart_hold(pb::ExtendCartHoldRequest {
            hold_id: "h3".into(),
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            extension_id: "x".into(),
        })
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
