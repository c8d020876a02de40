//! Stock levels: set, adjusted and read per product and variant; never
//! below what is reserved; a change lands in both stores when its caller
//! gives up or Redis is away, and two changes at once set rather than add.

use holdfast::grpc::pb::{self, ReserveOutcome};
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};
use crate::reservations::{consume, key, reserve};

/// A count of `product`'s stock (no variant) under adjustment id `id`.
fn count(product: &str, on_hand: i64, id: &str) -> pb::SetStockRequest {
    pb::SetStockRequest {
        key: key(product, ""),
        on_hand,
        adjustment_id: id.into(),
        reason: "count".into(),
    }
}

/// A change of `delta` units of `product` / `variant` under adjustment id `id`.
fn adjust(product: &str, variant: &str, delta: i64, id: &str) -> pb::AdjustStockRequest {
    pb::AdjustStockRequest {
        key: key(product, variant),
        delta,
        adjustment_id: id.into(),
        reason: "adjust".into(),
    }
}

pub(crate) async fn set_stock(
    app: &TestApp,
    product: &str,
    variant: &str,
    on_hand: i64,
) -> pb::StockLevel {
    app.reservations()
        .set_stock(pb::SetStockRequest {
            key: key(product, variant),
            on_hand,
            adjustment_id: format!("set-{product}-{variant}-{on_hand}"),
            reason: "initial".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .level
        .unwrap()
}

pub(crate) async fn level(app: &TestApp, product: &str, variant: &str) -> pb::StockLevel {
    app.reservations()
        .get_stock_levels(pb::GetStockLevelsRequest {
            keys: vec![key(product, variant).unwrap()],
        })
        .await
        .unwrap()
        .into_inner()
        .levels
        .remove(0)
}

/// Another transaction holding the pools table, as a long write would:
/// the next stock change waits for it in Postgres.
async fn hold_pools(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    app.hold_table("pools", "EXCLUSIVE").await
}

/// Another transaction holding the stock adjustments' table: the next
/// change waits in Postgres to record its id.
async fn hold_adjustments(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    app.hold_table("stock_adjustments", "EXCLUSIVE").await
}

/// Waits until `n` statements like `query` wait for a lock.
async fn waiting_for_locks(app: &TestApp, n: i64, query: &str) {
    app.eventually("the statements wait for locks", async || {
        (app.waiting_on_locks(query).await == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn stock_is_set_adjusted_and_read_per_product_and_variant() {
    let app = spawn_app().await;
    let l = set_stock(&app, "tee", "red-m", 10).await;
    assert_eq!((l.on_hand, l.reserved, l.available, l.sold), (10, 0, 10, 0));
    set_stock(&app, "tee", "", 3).await;
    let restock = async || {
        let mut r = app.reservations();
        let level = r.adjust_stock(adjust("tee", "red-m", 5, "restock-1")).await;
        level.unwrap().into_inner().level.unwrap()
    };
    assert_eq!(restock().await.on_hand, 15);
    // The same adjustment id again changes nothing.
    assert_eq!(restock().await.on_hand, 15);
    let levels = app
        .reservations()
        .get_stock_levels(pb::GetStockLevelsRequest {
            keys: vec![key("tee", "").unwrap(), key("tee", "red-m").unwrap()],
        })
        .await
        .unwrap()
        .into_inner()
        .levels;
    assert_eq!(
        levels.iter().map(|l| l.on_hand).collect::<Vec<_>>(),
        vec![3, 15]
    );
    let unknown = app
        .reservations()
        .get_stock_levels(pb::GetStockLevelsRequest {
            keys: vec![key("ghost", "").unwrap()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    app.shutdown().await;
}

#[tokio::test]
async fn lowering_stock_below_what_is_reserved_is_refused_not_clamped() {
    let app = spawn_app().await;
    set_stock(&app, "mug", "", 5).await;
    let r = app
        .reservations()
        .reserve(reserve("r1", "cart-1", &[("mug", "", 4)], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), ReserveOutcome::Reserved);
    let err = app
        .reservations()
        .set_stock(count("mug", 3, "shrink"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let l = level(&app, "mug", "").await;
    assert_eq!((l.on_hand, l.reserved, l.available), (5, 4, 1));
    // Lowering to exactly what is reserved is fine, and takes effect for everyone.
    let l = app
        .reservations()
        .adjust_stock(adjust("mug", "", -1, "shrink-ok"))
        .await
        .unwrap()
        .into_inner()
        .level
        .unwrap();
    assert_eq!((l.on_hand, l.available), (4, 0));
    let r = app
        .reservations()
        .reserve(reserve("r2", "cart-2", &[("mug", "", 1)], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), ReserveOutcome::InsufficientStock);
    app.shutdown().await;
}

#[tokio::test]
async fn a_call_postgres_ends_mid_transaction_is_unavailable_and_changes_nothing() {
    let app = spawn_app().await;
    set_stock(&app, "lamp", "", 10).await;
    // Postgres ends the session of the next stock change while it waits
    // for a lock, as it does when it shuts down or restarts (SQLSTATE
    // 57P01): a caller must hear "retry", not "bug".
    let blocker = hold_pools(&app).await;
    let to_3 = || count("lamp", 3, "to-3");
    let mut client = app.reservations();
    let change = tokio::spawn(async move { client.set_stock(to_3()).await });
    let waiting = app.waiting_for_lock().await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(waiting)
        .execute(&app.pg)
        .await
        .unwrap();
    let err = change.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("retry"), "{err:?}");
    blocker.rollback().await.unwrap();
    assert_eq!(level(&app, "lamp", "").await.on_hand, 10, "nothing changed");
    // The retry, with the same adjustment id, applies it.
    let retried = app.reservations().set_stock(to_3()).await;
    let retried = retried.unwrap().into_inner();
    assert_eq!(retried.level.unwrap().on_hand, 3);
    app.shutdown().await;
}

#[tokio::test]
async fn a_stock_change_whose_caller_gave_up_still_lands_in_both_stores() {
    let app = spawn_app().await;
    set_stock(&app, "vase", "", 10).await;
    // Lowering 10 to 2 takes units back from Redis's grant, then records
    // that in Postgres. Postgres is held up between the two, and the
    // caller's deadline passes there: the change must still finish. Cut
    // off, the units Redis gave back would be sold by neither store.
    let blocker = hold_pools(&app).await;
    let mut shrink = tonic::Request::new(adjust("vase", "", -8, "breakage"));
    shrink.set_timeout(std::time::Duration::from_secs(1));
    let mut client = app.reservations();
    let change = tokio::spawn(async move { client.adjust_stock(shrink).await });
    app.waiting_for_lock().await;
    let err = change.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    blocker.rollback().await.unwrap();
    app.eventually("the change lands without its caller", async || {
        (level(&app, "vase", "").await.on_hand == 2).then_some(())
    })
    .await;
    let l = level(&app, "vase", "").await;
    assert_eq!((l.on_hand, l.available), (2, 2));
    // Both units can be sold, and no more: none were lost between the stores.
    let mut r = app.reservations();
    let two = r
        .reserve(reserve("v1", "cart-1", &[("vase", "", 2)], 60))
        .await;
    assert_eq!(
        two.unwrap().into_inner().outcome(),
        ReserveOutcome::Reserved
    );
    let one = r
        .reserve(reserve("v2", "cart-2", &[("vase", "", 1)], 60))
        .await;
    let one = one.unwrap().into_inner().outcome();
    assert_eq!(one, ReserveOutcome::InsufficientStock);
    // The retry by adjustment id finds the change made, and makes no other.
    let retried = r
        .adjust_stock(adjust("vase", "", -8, "breakage"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.level.unwrap().on_hand, 2);
    // The same id for another change is not a retry.
    let reused = r
        .adjust_stock(adjust("vase", "", -1, "breakage"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    assert!(
        reused.message().contains("-8 units of stock/vase"),
        "{reused:?}"
    );
    assert_eq!(level(&app, "vase", "").await.on_hand, 2, "nothing changed");
    // Nor for a product with no stock yet, which stays unknown.
    let reused = r.set_stock(count("jug", 3, "breakage")).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    // Nor a reason Postgres could not store.
    let unstorable = r
        .set_stock(pb::SetStockRequest {
            key: key("jug", ""),
            on_hand: 3,
            adjustment_id: "count-jug".into(),
            reason: "\0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unstorable.code(), Code::InvalidArgument, "{unstorable:?}");
    assert!(unstorable.message().contains("reason"), "{unstorable:?}");
    let unknown = r
        .get_stock_levels(pb::GetStockLevelsRequest {
            keys: vec![key("jug", "").unwrap()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    app.shutdown().await;
}

/// A restock whose sync to Redis failed (Redis unreachable after Postgres
/// recorded it) reaches Redis once Redis is back, though the pool was sold
/// out there: a full pool asks for no grant, so only the restock's own
/// mark in Postgres brings it up to date.
#[tokio::test]
async fn a_restock_made_while_redis_was_away_sells_once_it_is_back() {
    let (gate, app) = behind_redis_gate().await;
    set_stock(&app, "tee", "", 1).await;
    let mut r = app.reservations();
    let sold = r.reserve(reserve("r1", "c", &[("tee", "", 1)], 60)).await;
    assert_eq!(
        sold.unwrap().into_inner().outcome(),
        ReserveOutcome::Reserved
    );
    let none = r.reserve(reserve("r0", "c", &[("tee", "", 1)], 60)).await;
    let none = none.unwrap().into_inner().outcome();
    assert_eq!(
        none,
        ReserveOutcome::InsufficientStock,
        "Redis knows it is sold out"
    );

    gate.set(false);
    let restock = || adjust("tee", "", 5, "restock");
    let err = r.adjust_stock(restock()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    gate.set(true);

    app.eventually("the restock sells", || {
        let mut r = r.clone();
        async move {
            // The retry by id answers the change as made.
            r.adjust_stock(restock()).await.ok()?;
            let took = r.reserve(reserve("r2", "c", &[("tee", "", 1)], 60)).await;
            (took.ok()?.into_inner().outcome() == ReserveOutcome::Reserved).then_some(())
        }
    })
    .await;
    assert_eq!(level(&app, "tee", "").await.on_hand, 6);
    app.shutdown().await;
}

/// A daemon whose Redis is reached through a gate the test can close
/// (`gate.set(false)`: Redis stops answering), with a short Redis timeout.
async fn behind_redis_gate() -> (holdfast::gate::Gate, TestApp) {
    let redis = crate::helpers::redis_url();
    let server = redis.trim_start_matches("redis://");
    let (server, db) = server.split_once('/').unwrap_or((server, ""));
    let gate = holdfast::gate::Gate::start(server)
        .await
        .expect("a relay to the test Redis");
    let via_gate = format!("redis://127.0.0.1:{}/{db}", gate.port);
    let app = crate::helpers::spawn_app_with(|a| {
        a.redis_url = via_gate;
        a.redis_timeout_ms = 300;
    })
    .await;
    (gate, app)
}

/// While Redis is unreachable, stock levels answer from Postgres, as the
/// takes do (they were UNAVAILABLE while the fallback sold), and what they
/// call available is what the fallback can reserve: the part of the grant
/// Redis has is not.
#[tokio::test]
async fn stock_levels_answer_from_postgres_while_redis_is_away() {
    let (gate, app) = behind_redis_gate().await;
    set_stock(&app, "mug", "", 10).await;
    let mut r = app.reservations();
    let first = r.reserve(reserve("r1", "c", &[("mug", "", 1)], 60)).await;
    assert_eq!(
        first.unwrap().into_inner().outcome(),
        ReserveOutcome::Reserved
    );

    gate.set(false);
    let during = level(&app, "mug", "").await;
    assert_eq!((during.on_hand, during.sold), (10, 0));
    assert!(
        (1..9).contains(&during.available),
        "Redis's grant is not available while Redis is away: {during:?}"
    );
    for i in 0..during.available {
        let id = format!("f{i}");
        let took = r.reserve(reserve(&id, "c", &[("mug", "", 1)], 60)).await;
        assert_eq!(
            took.unwrap().into_inner().outcome(),
            ReserveOutcome::Reserved,
            "{id}"
        );
    }
    let mut n = 0;
    let refused = app
        .eventually("a reserve the fallback answers", || {
            n += 1;
            let mut r = r.clone();
            let id = format!("over{n}");
            async move {
                let took = r.reserve(reserve(&id, "c", &[("mug", "", 1)], 60)).await;
                Some(took.ok()?.into_inner().outcome())
            }
        })
        .await;
    assert_eq!(refused, ReserveOutcome::InsufficientStock);
    let after = level(&app, "mug", "").await;
    assert_eq!(after.available, 0, "{after:?}");
    assert_eq!(after.reserved, during.reserved + during.available);
    gate.set(true);
    app.shutdown().await;
}

/// Two SetStock calls at once: the stock ends at one of the two, not at
/// their sum (each was the change from the level it read first).
#[tokio::test]
async fn two_stock_counts_at_once_set_rather_than_add() {
    let app = spawn_app().await;
    set_stock(&app, "mat", "", 4).await;
    // One is sold: 3 on hand, and a count of 3 changes nothing.
    let mut c = app.reservations();
    c.reserve(reserve("order", "c", &[("mat", "", 1)], 60))
        .await
        .unwrap();
    c.consume_reservation(consume("order", "o1")).await.unwrap();
    let same = c
        .set_stock(count("mat", 3, "recount"))
        .await
        .unwrap()
        .into_inner();
    let same = same.level.unwrap();
    assert_eq!((same.on_hand, same.sold, same.available), (3, 1, 3));
    // The first waits for the adjustments' table; the second comes in
    // behind it, having read the same level.
    let blocker = hold_adjustments(&app).await;
    let mut c = app.reservations();
    let to_5 = tokio::spawn(async move { c.set_stock(count("mat", 5, "a")).await });
    app.waiting_for_lock().await;
    let mut c = app.reservations();
    let to_7 = tokio::spawn(async move { c.set_stock(count("mat", 7, "b")).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();
    to_5.await.unwrap().unwrap();
    to_7.await.unwrap().unwrap();
    let on_hand = level(&app, "mat", "").await.on_hand;
    assert!([5, 7].contains(&on_hand), "on hand {on_hand}");
    app.shutdown().await;
}

/// The same through two daemons, where neither's own lock orders them: the
/// second waits in Postgres for the first (`lock_capacity_changes`), then
/// reads the level it left. Before, both read 4 and the stock ended at 8.
#[tokio::test]
async fn two_stock_counts_through_two_daemons_set_rather_than_add() {
    let app = spawn_app().await;
    let other = crate::helpers::start(app.same_stores()).await;
    set_stock(&app, "mat", "", 4).await;
    let blocker = hold_adjustments(&app).await;
    let (mut here, mut there) = (app.reservations(), other.reservations());
    let to_5 = tokio::spawn(async move { here.set_stock(count("mat", 5, "a")).await });
    let to_7 = tokio::spawn(async move { there.set_stock(count("mat", 7, "b")).await });
    waiting_for_locks(&app, 2, "%").await;
    blocker.rollback().await.unwrap();
    to_5.await.unwrap().unwrap();
    to_7.await.unwrap().unwrap();
    let on_hand = level(&app, "mat", "").await.on_hand;
    assert!([5, 7].contains(&on_hand), "on hand {on_hand}");
    other.shutdown().await;
    app.shutdown().await;
}

/// Two first counts of different products under one adjustment id, through
/// two daemons (so no lock in either orders them), both past the check for
/// a repeat when Postgres records either: one is applied, the other is
/// ALREADY_EXISTS, and its product has no stock, as if never asked. Before,
/// the loser's product was created with no stock before its id was found
/// taken.
#[tokio::test]
async fn a_first_count_refused_for_its_id_leaves_no_stock_behind() {
    let app = spawn_app().await;
    let other = crate::helpers::start(app.same_stores()).await;
    let blocker = hold_adjustments(&app).await;
    let mut here = app.reservations();
    let mut there = other.reservations();
    let jug = tokio::spawn(async move { here.set_stock(count("jug", 3, "count-1")).await });
    let mug = tokio::spawn(async move { there.set_stock(count("mug", 5, "count-1")).await });
    waiting_for_locks(&app, 2, "%stock_adjustments%").await;
    blocker.rollback().await.unwrap();

    let (jug, mug) = (jug.await.unwrap(), mug.await.unwrap());
    let (won, lost) = match (&jug, &mug) {
        (Ok(_), Err(e)) => ("jug", e),
        (Err(e), Ok(_)) => ("mug", e),
        _ => panic!("one count must win: {jug:?} {mug:?}"),
    };
    assert_eq!(lost.code(), Code::AlreadyExists, "{lost:?}");
    let loser = if won == "jug" { "mug" } else { "jug" };
    let unknown = app
        .reservations()
        .get_stock_levels(pb::GetStockLevelsRequest {
            keys: vec![key(loser, "").unwrap()],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pools WHERE pool_id = $1")
        .bind(format!("stock/{loser}"))
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(left, 0, "no row for {loser}");
    assert_eq!(
        level(&app, won, "").await.on_hand,
        if won == "jug" { 3 } else { 5 }
    );
    other.shutdown().await;
    app.shutdown().await;
}
