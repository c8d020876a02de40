//! Tenants are walled off in every service, not only flash sales (auth.rs)
//! and sale locks (locks.rs): another store's stock, reservations, slots,
//! events and pools are NOT_FOUND or invisible to it, and what it tries on
//! them changes nothing of the owner's.

use holdfast::grpc::pb::{self, Outcome, ReservationState, ReserveOutcome, SlotOutcome};
use redis::AsyncCommands;
use tonic::Code;

use crate::events::next;
use crate::helpers::{
    STORE_A_ADMIN, STORE_A_CHECKOUT, STORE_B_ADMIN, TestApp, claim, live_sale_request,
    spawn_two_stores, spawn_two_stores_with, with_key,
};
use crate::reservations::{key, reserve};
use crate::slots::{tomorrow, venue_requests};

/// Sets a store's stock of `product` to `on_hand`.
async fn set_stock(app: &TestApp, store: &str, product: &str, on_hand: i64) -> pb::StockLevel {
    let set = pb::SetStockRequest {
        key: key(product, ""),
        on_hand,
        // The same id in every store: ids are the store's own.
        adjustment_id: format!("set-{product}"),
        reason: "initial".into(),
    };
    let r = app.reservations().set_stock(with_key(set, store)).await;
    r.unwrap().into_inner().level.unwrap()
}

/// A store's stock level of `product`.
async fn stock_level(app: &TestApp, store: &str, product: &str) -> pb::StockLevel {
    let get = pb::GetStockLevelsRequest {
        keys: vec![key(product, "").unwrap()],
    };
    let r = app
        .reservations()
        .get_stock_levels(with_key(get, store))
        .await;
    r.unwrap().into_inner().levels.remove(0)
}

#[tokio::test]
async fn another_stores_stock_and_reservations_are_not_found() {
    let app = spawn_two_stores().await;
    let mut res = app.reservations();
    set_stock(&app, STORE_A_ADMIN, "sku", 5).await;
    let a = res
        .reserve(with_key(
            reserve("r1", "cart-a", &[("sku", "", 2)], 60),
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), ReserveOutcome::Reserved);

    let id = || "r1".to_string();
    let codes = [
        res.get_reservation(with_key(
            pb::GetReservationRequest {
                reservation_id: id(),
            },
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
        res.consume_reservation(with_key(
            pb::ConsumeReservationRequest {
                reservation_id: id(),
                order_id: "order-b".into(),
            },
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
        res.release_reservation(with_key(
            pb::ReleaseReservationRequest {
                reservation_id: id(),
            },
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
        res.extend_reservation(with_key(
            pb::ExtendReservationRequest {
                reservation_id: id(),
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                extension_id: "ext-b".into(),
            },
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
        res.get_stock_levels(with_key(
            pb::GetStockLevelsRequest {
                keys: vec![key("sku", "").unwrap()],
            },
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
        res.reserve(with_key(
            reserve("r2", "cart-b", &[("sku", "", 1)], 60),
            STORE_B_ADMIN,
        ))
        .await
        .map(drop),
    ]
    .map(|r| r.expect_err("another store's call must fail").code());
    assert_eq!(codes, [Code::NotFound; 6]);

    // A's reservation and stock are as A left them.
    let mine = res
        .get_reservation(with_key(
            pb::GetReservationRequest {
                reservation_id: id(),
            },
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(mine.state(), ReservationState::Active);
    let level = stock_level(&app, STORE_A_ADMIN, "sku").await;
    assert_eq!((level.on_hand, level.reserved), (5, 2), "{level:?}");

    // B's stock of the same product id is its own: setting it leaves A's.
    let b = set_stock(&app, STORE_B_ADMIN, "sku", 1).await;
    assert_eq!((b.on_hand, b.reserved), (1, 0), "{b:?}");
    let level = stock_level(&app, STORE_A_ADMIN, "sku").await;
    assert_eq!((level.on_hand, level.reserved), (5, 2), "{level:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn another_stores_venues_and_slot_reservations_are_not_found() {
    let app = spawn_two_stores().await;
    let mut slots = app.slots();
    let (set_venue, set_schedule) = venue_requests("hall", "UTC", 4); // 1 per window
    slots
        .set_venue(with_key(set_venue, STORE_A_ADMIN))
        .await
        .unwrap();
    slots
        .set_schedule(with_key(set_schedule, STORE_A_ADMIN))
        .await
        .unwrap();
    let slot = |id: &str| crate::slots::reserve(id, "hall", tomorrow(), 60);
    let a = slots
        .reserve_slot(with_key(slot("s1"), STORE_A_CHECKOUT))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), SlotOutcome::Reserved);

    let id = || "s1".to_string();
    let codes = [
        slots
            .get_slot_reservation(with_key(
                pb::GetSlotReservationRequest {
                    reservation_id: id(),
                },
                STORE_B_ADMIN,
            ))
            .await
            .map(drop),
        slots
            .confirm_slot(with_key(
                pb::ConfirmSlotRequest {
                    reservation_id: id(),
                    payment_id: "pay-b".into(),
                },
                STORE_B_ADMIN,
            ))
            .await
            .map(drop),
        slots
            .release_slot(with_key(
                pb::ReleaseSlotRequest {
                    reservation_id: id(),
                },
                STORE_B_ADMIN,
            ))
            .await
            .map(drop),
        slots
            .get_availability(with_key(
                pb::GetAvailabilityRequest {
                    venue_id: "hall".into(),
                    from: Some(tomorrow()),
                    to: Some(prost_types::Timestamp {
                        seconds: tomorrow().seconds + 1,
                        nanos: 0,
                    }),
                },
                STORE_B_ADMIN,
            ))
            .await
            .map(drop),
        slots
            .reserve_slot(with_key(slot("s2"), STORE_B_ADMIN))
            .await
            .map(drop),
    ]
    .map(|r| r.expect_err("another store's call must fail").code());
    assert_eq!(codes, [Code::NotFound; 5]);

    // A's reservation is still A's to confirm.
    let done = slots
        .confirm_slot(with_key(
            pb::ConfirmSlotRequest {
                reservation_id: id(),
                payment_id: "pay-a".into(),
            },
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.outcome(), SlotOutcome::Confirmed);
    app.shutdown().await;
}

#[tokio::test]
async fn a_watch_sees_only_its_own_stores_events_live_and_replayed() {
    // Events leave Redis once drained, so a resume from the start is
    // replayed from Postgres's audit log.
    let app = spawn_two_stores_with(|a| a.event_keep_secs = 0).await;
    let mut flash = app.flash();
    for store in [STORE_A_ADMIN, STORE_B_ADMIN] {
        let sale = live_sale_request("spring", &[("p", Some(1_000))]);
        flash.create_sale(with_key(sale, store)).await.unwrap();
    }
    let watch = |after: &str| {
        let req = pb::WatchRequest {
            after_event_id: after.into(),
        };
        let mut events = app.events();
        async move {
            let r = events.watch(with_key(req, STORE_A_CHECKOUT)).await;
            r.unwrap().into_inner()
        }
    };
    let sell = |id: String, store: &'static str| {
        let mut flash = app.flash();
        async move {
            let r = flash.claim(with_key(claim(&id, "spring", &[("p", 1)]), store));
            assert_eq!(r.await.unwrap().get_ref().outcome(), Outcome::Ok);
        }
    };
    let mut live = watch("").await;

    // B sells first, then A: A's first event must be its own.
    sell("claim-b".into(), STORE_B_ADMIN).await;
    sell("claim-a0".into(), STORE_A_CHECKOUT).await;
    assert_eq!(next(&mut live).await.hold_id, "claim-a0");

    // Once A's first events are drained and trimmed from Redis (the trim
    // takes whole stream nodes of 100 entries, oldest first), a resume
    // from the start replays them from Postgres, then reads the rest from
    // the stream: A's, in order, and none of B's.
    let mine: Vec<String> = (0..150).map(|i| format!("claim-a{i}")).collect();
    for id in &mine[1..] {
        sell(id.clone(), STORE_A_CHECKOUT).await;
    }
    let con = app.redis().await;
    let a_stream = format!("{}:{{store-a}}:events", app.redis_prefix);
    app.eventually("A's first claims trimmed from Redis", || {
        let (mut con, key) = (con.clone(), a_stream.clone());
        async move {
            let len: usize = con.xlen(&key).await.unwrap();
            (len < 150).then_some(())
        }
    })
    .await;
    let mut replayed = watch("0-0").await;
    for id in &mine {
        assert_eq!(&next(&mut replayed).await.hold_id, id);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn another_stores_pools_are_not_found_and_its_units_in_doubt_are_not_listed() {
    let app = spawn_two_stores().await;
    let mut flash = app.flash();
    let sale = live_sale_request("spring", &[("p", Some(10))]);
    flash
        .create_sale(with_key(sale, STORE_A_ADMIN))
        .await
        .unwrap();
    let sell = |id: &str| with_key(claim(id, "spring", &[("p", 1)]), STORE_A_CHECKOUT);
    flash.claim(sell("before")).await.unwrap();
    // Written to Postgres before the loss: a sale drained after it takes
    // its unit out of doubt, between the two reads of in_doubt below.
    app.eventually("the drainer to write A's sale", || async {
        (app.pg_sold("spring", "p").await == 1).then_some(())
    })
    .await;

    // Redis loses A's pool: the next claim puts A's grant in doubt.
    let key = app.pool_key("store-a", "sale/spring/p").await;
    let gone: i64 = app.redis().await.del(&key).await.unwrap();
    assert_eq!(gone, 1, "A's pool was in Redis");
    flash.claim(sell("after")).await.unwrap();

    let mut admin = app.admin();
    let in_doubt = |store: &str| with_key(pb::ListInDoubtPoolsRequest {}, store);
    let a_list = admin.list_in_doubt_pools(in_doubt(STORE_A_ADMIN)).await;
    let a_list = a_list.unwrap().into_inner().pools;
    assert_eq!(a_list.len(), 1, "{a_list:?}");
    let doubt = a_list[0].in_doubt;
    assert!(doubt > 0, "{a_list:?}");
    let b_list = admin.list_in_doubt_pools(in_doubt(STORE_B_ADMIN)).await;
    assert!(b_list.unwrap().into_inner().pools.is_empty());

    let get = pb::GetPoolRequest {
        pool_id: "sale/spring/p".into(),
    };
    let resolve = pb::ResolveInDoubtRequest {
        pool_id: "sale/spring/p".into(),
        in_doubt_units: doubt,
        sold_units: 0,
        resolution_id: "b-resolves".into(),
    };
    let codes = [
        admin
            .get_pool(with_key(get.clone(), STORE_B_ADMIN))
            .await
            .map(drop),
        admin
            .resolve_in_doubt(with_key(resolve, STORE_B_ADMIN))
            .await
            .map(drop),
    ]
    .map(|r| r.expect_err("another store's call must fail").code());
    assert_eq!(codes, [Code::NotFound; 2]);
    let mine = admin.get_pool(with_key(get, STORE_A_ADMIN)).await;
    let mine = mine.unwrap().into_inner().pool.unwrap();
    assert_eq!(mine.in_doubt, doubt, "B's resolve changed nothing of A's");
    app.shutdown().await;
}

#[tokio::test]
async fn reads_arriving_together_share_a_read_and_each_gets_its_own_stores_counts() {
    let app = spawn_two_stores().await;
    // The same product id in both stores, with different counts.
    set_stock(&app, STORE_A_ADMIN, "sku", 5).await;
    set_stock(&app, STORE_B_ADMIN, "sku", 9).await;
    let held = app
        .reservations()
        .reserve(with_key(
            reserve("r1", "cart-a", &[("sku", "", 2)], 600),
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.outcome(), ReserveOutcome::Reserved);

    // Hold every read of the pools in Postgres, so that the reads pile up.
    let blocker = app.hold_table("pools", "ACCESS EXCLUSIVE").await;
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = if i % 2 == 0 {
            STORE_A_ADMIN
        } else {
            STORE_B_ADMIN
        };
        let mut res = app.reservations();
        let get = pb::GetStockLevelsRequest {
            keys: vec![key("sku", "").unwrap()],
        };
        reads.spawn(async move {
            let r = res.get_stock_levels(with_key(get, store)).await;
            (store, r.unwrap().into_inner().levels.remove(0))
        });
    }
    let waiting = || app.waiting_on_locks("%FROM pools WHERE tenant = $1 AND pool_id = ANY%");
    app.eventually("a read waits for the lock", async || {
        (waiting().await > 0).then_some(())
    })
    .await;
    // Time for every read to reach the stores; each read alone would be a
    // statement waiting on the lock (the daemon has 16 connections).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let statements = waiting().await;
    assert!(
        (1..=4).contains(&statements),
        "two reads of the pools a store at once for twenty reads, not {statements}"
    );
    blocker.rollback().await.unwrap();

    for (store, level) in reads.join_all().await {
        let got = (level.on_hand, level.reserved, level.available);
        if store == STORE_A_ADMIN {
            assert_eq!(got, (5, 2, 3), "store A's own counts");
        } else {
            assert_eq!(got, (9, 0, 9), "store B's own counts");
        }
    }
    app.shutdown().await;
}

/// One store's grant stuck on Postgres does not hold up another store's:
/// each tenant's grants are serialised by a lock of its own. Store A's
/// pool row is locked (an operator's long transaction, say), so A's claim
/// of more than Redis was granted waits in its grant; store B creates a
/// sale (which loads its pools into Redis, a grant) and sells from it
/// meanwhile. With one lock for the daemon, B's sale waited for A's.
#[tokio::test]
async fn one_stores_grant_stuck_on_postgres_does_not_hold_up_anothers() {
    let app = spawn_two_stores().await;
    let mut flash = app.flash();
    let sale = live_sale_request("a-sale", &[("p", Some(10))]);
    flash
        .create_sale(with_key(sale, STORE_A_ADMIN))
        .await
        .unwrap();
    let mut blocker = app.pg.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pools WHERE tenant = 'store-a' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // All ten: more than the part Redis was granted.
    let a_claim = {
        let mut flash = app.flash();
        let all = with_key(claim("a-all", "a-sale", &[("p", 10)]), STORE_A_CHECKOUT);
        tokio::spawn(async move { flash.claim(all).await })
    };
    app.waiting_for_lock().await;

    // A bound to see a hang by, not a speed: B's two calls take
    // milliseconds, and waited forever behind A's grant before.
    let b_sells = async {
        let sale = live_sale_request("b-sale", &[("q", Some(10))]);
        flash
            .create_sale(with_key(sale, STORE_B_ADMIN))
            .await
            .unwrap();
        let sell = with_key(claim("b-1", "b-sale", &[("q", 10)]), STORE_B_ADMIN);
        flash.claim(sell).await.unwrap().into_inner()
    };
    let b_sold = tokio::time::timeout(std::time::Duration::from_secs(30), b_sells)
        .await
        .expect("B's sale is not held up by A's grant");
    assert_eq!(b_sold.outcome(), Outcome::Ok);
    assert!(
        !a_claim.is_finished(),
        "A's claim still waits for its grant"
    );

    blocker.rollback().await.unwrap();
    let a_sold = a_claim.await.unwrap().unwrap().into_inner();
    assert_eq!(
        a_sold.outcome(),
        Outcome::Ok,
        "A's grant went on once let go"
    );
    app.shutdown().await;
}
