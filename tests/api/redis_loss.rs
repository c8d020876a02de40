//! Redis losing data (ESCROW.md "Losing Redis"): a pool whose grant Redis
//! no longer has is never sold again from that grant. Its outstanding units
//! go in doubt and the pool starts a new epoch. The fault suite restarts a
//! real Redis empty under load; these pin the rule down one step at a time.

use holdfast::domain::{PoolId, TenantId};
use holdfast::grpc::pb::{self, Outcome};
use holdfast::store::redis::{GrantReply, PoolGrant};
use redis::AsyncCommands;
use tonic::Code;

use crate::helpers::{TestApp, claim, spawn_app};

/// A sale of 10 units whose pool Redis lost after 2 were sold and written
/// back, and one claim after the loss: the pool as it is then.
async fn lose_a_grant(app: &TestApp, sale: &str) -> (pb::Pool, pb::Pool) {
    app.live_sale(sale, &[("p", Some(10))], 0).await;
    let pool = format!("sale/{sale}/p");
    let r = app
        .flash()
        .claim(claim("before", sale, &[("p", 2)]))
        .await
        .unwrap();
    assert_eq!(r.get_ref().outcome(), Outcome::Ok);
    app.eventually("the drainer wrote the sale back", || async {
        (app.pg_sold(sale, "p").await == 2).then_some(())
    })
    .await;
    let before = app.pool(&pool).await;
    assert_eq!(
        before.granted_to_redis, 5,
        "half the capacity went to Redis"
    );

    // Redis loses the pool (as after a restart with no AOF). The daemon's
    // marker key is untouched, so no recovery pass runs: the next take must
    // find the loss by itself.
    let mut con = app.redis().await;
    let gone: i64 = con.del(app.pool_key("dev", &pool).await).await.unwrap();
    assert_eq!(gone, 1, "the pool was in Redis");

    let r = app
        .flash()
        .claim(claim("after", sale, &[("p", 1)]))
        .await
        .unwrap();
    assert_eq!(r.get_ref().outcome(), Outcome::Ok, "sales go on");
    (before, app.pool(&pool).await)
}

/// Claims one unit at a time `tries` times: how many were sold.
async fn sell_one_by_one(app: &TestApp, sale: &str, tries: usize) -> usize {
    let mut ok = 0;
    for i in 0..tries {
        let r = app
            .flash()
            .claim(claim(&format!("rest-{i}"), sale, &[("p", 1)]))
            .await
            .unwrap();
        match r.get_ref().outcome() {
            Outcome::Ok => ok += 1,
            Outcome::SoldOut => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    ok
}

#[tokio::test]
async fn a_pool_redis_lost_is_reloaded_in_a_new_epoch_with_its_grant_in_doubt() {
    let app = spawn_app().await;
    let (before, after) = lose_a_grant(&app, "lost").await;
    assert_eq!(after.epoch, before.epoch + 1, "a new epoch");
    assert_eq!(
        after.in_doubt, 3,
        "the lost grant less what was reported sold (5 - 2) is in doubt"
    );
    assert_eq!(after.sold, 3);

    // What is left to sell: 10 - 3 sold - 3 in doubt = 4, and not one more.
    let ok = sell_one_by_one(&app, "lost", 8).await;
    assert_eq!(ok, 4, "the units in doubt are never sold again");
    app.shutdown().await;
}

/// ListInDoubtPools: each pool listed, with its units in doubt.
async fn in_doubt(app: &TestApp) -> Vec<(String, i64)> {
    let listed = app
        .admin()
        .list_in_doubt_pools(pb::ListInDoubtPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    listed
        .into_iter()
        .map(|p| (p.pool_id, p.in_doubt))
        .collect()
}

/// What the in-doubt gauge reads (the recorder is process-wide, so the
/// page's figure is whichever test's daemon set it last: the test reads
/// the gauge's source).
async fn in_doubt_total_is(app: &TestApp, units: i64) {
    let pg = holdfast::store::postgres::PgStore::from_pool(app.pg.clone());
    assert_eq!(pg.total_in_doubt().await.unwrap(), units);
}

#[tokio::test]
async fn an_operator_lists_and_resolves_units_in_doubt_and_the_unsold_sell_again() {
    let app = spawn_app().await;
    let (_, lost) = lose_a_grant(&app, "doubt").await;
    assert_eq!((lost.in_doubt, lost.sold), (3, 3), "{lost:?}");
    let mut admin = app.admin();
    assert_eq!(in_doubt(&app).await, [("sale/doubt/p".to_string(), 3)]);
    in_doubt_total_is(&app, 3).await;

    // Each request says how many units in doubt the operator checked.
    let resolve = |pool: &str, in_doubt_units, sold_units, id: &str| pb::ResolveInDoubtRequest {
        pool_id: pool.into(),
        in_doubt_units,
        sold_units,
        resolution_id: id.into(),
    };
    let pool = "sale/doubt/p";
    let cases = [
        // Not the count the pool has: the operator's look is stale.
        (
            resolve(pool, 2, 1, "r1"),
            Code::FailedPrecondition,
            "3 units in doubt, not 2",
        ),
        (
            resolve(pool, 3, 4, "r1"),
            Code::InvalidArgument,
            "sold_units",
        ),
        (
            resolve(pool, 3, -1, "r1"),
            Code::InvalidArgument,
            "sold_units",
        ),
        (
            resolve(pool, -1, 0, "r1"),
            Code::InvalidArgument,
            "in_doubt_units",
        ),
        (resolve("", 3, 0, "r1"), Code::InvalidArgument, "pool_id"),
        (
            resolve("sale/none/p", 3, 0, "r1"),
            Code::NotFound,
            "sale/none/p",
        ),
        (
            resolve(pool, 3, 1, ""),
            Code::InvalidArgument,
            "resolution_id",
        ),
        (
            resolve(pool, 3, 1, "bad id!"),
            Code::InvalidArgument,
            "resolution_id",
        ),
    ];
    for (req, code, names) in cases {
        let err = admin.resolve_in_doubt(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(names), "{names}: {err:?}");
    }
    assert_eq!(app.pool(pool).await, lost, "refusals changed nothing");

    // The shop's orders show that 1 of the 3 was sold: the other 2 are
    // released to sell again. (The refusals above left the id unused.)
    let resolved = async |req| {
        let r = admin.clone().resolve_in_doubt(req).await;
        r.unwrap().into_inner().pool.unwrap()
    };
    let done = resolved(resolve(pool, 3, 1, "r1")).await;
    assert_eq!((done.in_doubt, done.sold), (0, 4), "{done:?}");
    assert_eq!(in_doubt(&app).await, []);
    in_doubt_total_is(&app, 0).await;

    // A retry repeats the answer and counts nothing twice; the same id
    // for another resolution, or a new one of what is no longer in doubt,
    // is refused.
    assert_eq!(resolved(resolve(pool, 3, 1, "r1")).await, done);
    for (req, code) in [
        (resolve(pool, 3, 2, "r1"), Code::AlreadyExists),
        (resolve("sale/other/p", 3, 1, "r1"), Code::AlreadyExists),
        (resolve(pool, 3, 1, "r2"), Code::FailedPrecondition),
    ] {
        let err = admin.resolve_in_doubt(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    assert_eq!(app.pool(pool).await, done);

    // 10 - 4 sold = 6 to sell, and not one more.
    assert_eq!(sell_one_by_one(&app, "doubt", 9).await, 6);
    app.shutdown().await;
}

#[tokio::test]
async fn a_daemon_started_on_an_emptied_redis_checks_its_pools_before_it_serves() {
    let app = spawn_app().await;
    app.live_sale("gone", &[("p", Some(10))], 0).await;
    let before = app.pool("sale/gone/p").await;
    assert_eq!(before.granted_to_redis, 5);
    let args = app.same_stores();
    let (mut con, prefix) = (app.redis().await, app.redis_prefix.clone());
    app.shutdown().await;

    // Redis loses everything of this daemon's while it is down (a restart
    // without persistence), the marker with it.
    let keys: Vec<String> = con.keys(format!("{prefix}:*")).await.unwrap();
    assert!(!keys.is_empty());
    let _: i64 = con.del(&keys).await.unwrap();

    // The first call after the restart already sees the recovery: the
    // lost grant in doubt, the pool in a new epoch (no waiting: the daemon
    // checked before it served).
    let again = crate::helpers::start(args).await;
    let after = again.pool("sale/gone/p").await;
    assert_eq!(after.epoch, before.epoch + 1, "{after:?}");
    assert_eq!(after.in_doubt, 5, "{after:?}");
    again.shutdown().await;
}

#[tokio::test]
async fn a_grant_that_finds_redis_without_what_postgres_delegated_loads_nothing() {
    // The race the engine cannot see from its own reads: it reads the pool
    // in Redis, Redis restarts empty, then the grant arrives. The script
    // must refuse it rather than load the old epoch afresh.
    let app = spawn_app().await;
    let store = app.redis_store().await;
    let dev = TenantId::parse("dev").unwrap();
    let pool = PoolId::parse("pool", "sale/race/p").unwrap();
    let key = app.pool_key("dev", pool.as_str()).await;
    let grant = |granted, prior| PoolGrant {
        epoch: 1,
        granted,
        prior,
        reported_sold: 0,
        full: false,
        unlimited: false,
        window_ms: (0, 0),
        low_stock_threshold: None,
        ceiling: None,
        low_water: 1,
        undelegated: 10,
    };
    let mut con = app.redis().await;

    let reply = store.grant(&dev, &pool, &grant(8, 5)).await.unwrap();
    assert_eq!(
        reply,
        GrantReply::Lost,
        "Redis lacks the 5 units delegated before"
    );
    let exists: bool = con.exists(&key).await.unwrap();
    assert!(!exists, "a refused grant loads nothing");

    let reply = store.grant(&dev, &pool, &grant(5, 0)).await.unwrap();
    assert_eq!(reply, GrantReply::Loaded, "a first grant loads the pool");
    let reply = store.grant(&dev, &pool, &grant(8, 5)).await.unwrap();
    assert_eq!(reply, GrantReply::Granted(8), "the next one raises it");

    let reply = store.grant(&dev, &pool, &grant(12, 9)).await.unwrap();
    assert_eq!(
        reply,
        GrantReply::Lost,
        "Redis holds 8 of the 9 delegated (an older AOF restored)"
    );
    let held: i64 = con.hget(&key, "grant").await.unwrap();
    assert_eq!(held, 8, "and the refused grant changed nothing");

    // Redis restored with older data may keep its grant and lose sales:
    // it has sold 2 where Postgres heard of 3.
    let _: i64 = con.hset(&key, "sold", 2).await.unwrap();
    let sold_3 = PoolGrant {
        reported_sold: 3,
        ..grant(8, 8)
    };
    let reply = store.grant(&dev, &pool, &sold_3).await.unwrap();
    assert_eq!(
        reply,
        GrantReply::Lost,
        "Redis forgot a sale Postgres heard of"
    );
    let even = PoolGrant {
        reported_sold: 2,
        ..grant(8, 8)
    };
    let reply = store.grant(&dev, &pool, &even).await.unwrap();
    assert_eq!(
        reply,
        GrantReply::Granted(8),
        "the drainer may lag behind Redis"
    );
    app.shutdown().await;
}

/// Redis loses everything of this daemon's, its marker too; returns once
/// the daemon noticed and reloaded `pool` in a new epoch.
pub(crate) async fn lose_everything(app: &TestApp, pool: &str) {
    let epoch = app.pool(pool).await.epoch;
    let mut con = app.redis().await;
    let keys: Vec<String> = con.keys(format!("{}:*", app.redis_prefix)).await.unwrap();
    let _: i64 = con.del(&keys).await.unwrap();
    app.eventually("the pool reloaded in a new epoch", || async {
        (app.pool(pool).await.epoch > epoch).then_some(())
    })
    .await;
}

/// `req`'s answer once the daemon has checked Redis after a loss: until
/// its circuit closes, the fallback answers UNAVAILABLE for an id Redis
/// served and for a sale with a customer limit (README), and the caller
/// retries, as a client would.
async fn claim_once_checked(app: &TestApp, req: pb::ClaimRequest) -> pb::ClaimResponse {
    app.eventually("the claim answered", || {
        let (mut flash, req) = (app.flash(), req.clone());
        async move {
            match flash.claim(req).await {
                Err(e) if e.code() == Code::Unavailable => None,
                answer => Some(answer.unwrap().into_inner()),
            }
        }
    })
    .await
}

/// Redis lost everything of this daemon's after a claim and a
/// reservation ended there (README, "Redis data loss"). Before it closes
/// its circuit the daemon writes the ended holds back from the audit log,
/// so a retried take of either id answers as it did before the loss and
/// takes nothing, and another request under the id is ALREADY_EXISTS.
/// Without that, the claim's retry sold a second unit to one customer.
#[tokio::test]
async fn takes_retried_after_redis_lost_its_data_answer_as_before_and_take_nothing() {
    use crate::reservations::{consume, reserve};
    use crate::stock::{level, set_stock};
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(10)), ("q", Some(10))], 0)
        .await;
    set_stock(&app, "mug", "", 10).await;
    let mut flash = app.flash();
    let mut res = app.reservations();
    let claimed = flash.claim(claim("c1", "s", &[("p", 1)])).await.unwrap();
    let claimed = claimed.into_inner();
    let two = flash
        .claim(claim("c3", "s", &[("q", 1), ("p", 1)]))
        .await
        .unwrap();
    let two = two.into_inner();
    res.reserve(reserve("r1", "cart", &[("mug", "", 2)], 600))
        .await
        .unwrap();
    res.consume_reservation(consume("r1", "o1")).await.unwrap();
    // The reservation's retry, as it answers now.
    let retry_r1 = || {
        let mut res = res.clone();
        async move {
            let r = res.reserve(reserve("r1", "cart", &[("mug", "", 2)], 600));
            r.await.unwrap().into_inner().reservation.unwrap()
        }
    };
    let reserved = retry_r1().await;
    let logged = |kind: &'static str, id: &'static str| {
        let pg = app.pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM audit_log WHERE hold_id = $1 AND kind = $2",
            )
            .bind(id)
            .bind(kind)
            .fetch_one(&pg)
            .await
            .unwrap()
        }
    };
    app.eventually("the claim and the consumption in the audit log", || async {
        (logged("claimed", "c1").await == 1
            && logged("claimed", "c3").await == 1
            && logged("committed", "r1").await == 1)
            .then_some(())
    })
    .await;

    lose_everything(&app, "sale/s/p").await;
    let again = claim_once_checked(&app, claim("c1", "s", &[("p", 1)])).await;
    assert_eq!(
        again, claimed,
        "the claim's retry answers as the first time"
    );
    let other = flash
        .claim(claim("c1", "s", &[("p", 2)]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");
    // A two-line claim's retry, its lines in another order (the digest
    // written back is the take's own: lua/restore.lua).
    let again = flash.claim(claim("c3", "s", &[("p", 1), ("q", 1)])).await;
    assert_eq!(again.unwrap().into_inner(), two);
    let again = retry_r1().await;
    // The audit log has no expiry of a reservation: one that ended reads
    // as expiring when it ended.
    assert_eq!(
        (
            again.state(),
            &again.order_id,
            &again.lines,
            &again.created_at
        ),
        (
            reserved.state(),
            &reserved.order_id,
            &reserved.lines,
            &reserved.created_at
        )
    );
    assert_eq!(level(&app, "mug", "").await.reserved, 0, "nothing held");

    // A claim after the retries, drained after anything they logged.
    let r = flash.claim(claim("c2", "s", &[("q", 1)])).await.unwrap();
    assert_eq!(r.get_ref().outcome(), Outcome::Ok);
    app.eventually("the later claim in the audit log", || async {
        (logged("claimed", "c2").await == 1).then_some(())
    })
    .await;
    assert_eq!(logged("claimed", "c1").await, 1, "the claim sold once");
    assert_eq!(logged("claimed", "c3").await, 1, "the two-line claim too");
    assert_eq!(
        logged("reserved", "r1").await,
        1,
        "the reservation held once"
    );
    app.shutdown().await;
}

/// A customer's claims before Redis lost its data still count against
/// their limit after it: the counter, lost with the claims, is written
/// back with them. Before, the customer could claim up to the limit again.
#[tokio::test]
async fn a_customers_claims_before_the_loss_count_against_their_limit_after_it() {
    let app = spawn_app().await;
    app.live_sale("lim", &[("a", Some(100)), ("b", Some(100))], 2)
        .await;
    let mut flash = app.flash();
    let by = |id: &str, who: &str, lines: &[(&str, i64)]| {
        let mut req = claim(id, "lim", lines);
        req.customer_id = who.into();
        req
    };
    let r = flash.claim(by("c1", "alice", &[("a", 2)])).await.unwrap();
    assert_eq!(r.get_ref().outcome(), Outcome::Ok);
    app.eventually("the claim in the audit log", || async {
        (app.pg_sold("lim", "a").await == 2).then_some(())
    })
    .await;

    lose_everything(&app, "sale/lim/a").await;
    let over = claim_once_checked(&app, by("c2", "alice", &[("b", 1)])).await;
    assert_eq!(over.outcome(), Outcome::CustomerLimit, "{over:?}");
    assert_eq!(over.customer_units, 2);
    let bob = flash.claim(by("c3", "bob", &[("b", 2)])).await.unwrap();
    assert_eq!(
        bob.get_ref().outcome(),
        Outcome::Ok,
        "another customer buys"
    );
    app.shutdown().await;
}
