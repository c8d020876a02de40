//! Stock reservations: never more reserved than in stock, consume exactly
//! once, extend once, expiry frees stock, audit rows, low-stock alerts.

use std::sync::Arc;

use holdfast::grpc::pb::reservation_service_client::ReservationServiceClient;
use holdfast::grpc::pb::{self, ReservationState, ReserveOutcome, StockKey};
use tokio::sync::Barrier;
use tonic::Code;

use crate::helpers::spawn_app;
use crate::stock::{level, set_stock};

pub(crate) fn key(product: &str, variant: &str) -> Option<StockKey> {
    Some(StockKey {
        product_id: product.into(),
        variant_id: variant.into(),
    })
}

pub(crate) fn reserve(
    id: &str,
    reference: &str,
    lines: &[(&str, &str, i64)],
    ttl_secs: i64,
) -> pb::ReserveRequest {
    pb::ReserveRequest {
        reservation_id: id.into(),
        reference: reference.into(),
        lines: lines
            .iter()
            .map(|(p, v, q)| pb::ReservationLine {
                key: key(p, v),
                quantity: *q,
            })
            .collect(),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

pub(crate) fn consume(id: &str, order: &str) -> pb::ConsumeReservationRequest {
    pb::ConsumeReservationRequest {
        reservation_id: id.into(),
        order_id: order.into(),
    }
}

#[tokio::test]
async fn concurrent_reservations_never_exceed_stock() {
    let app = spawn_app().await;
    set_stock(&app, "gpu", "", 25).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(ReservationServiceClient::new(app.new_channel().await));
    }
    let barrier = Arc::new(Barrier::new(300));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let qty = 1 + (i as i64 % 3);
                let r = c
                    .reserve(reserve(
                        &format!("r{i}"),
                        &format!("cart-{i}"),
                        &[("gpu", "", qty)],
                        60,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                if r.outcome() == ReserveOutcome::Reserved {
                    qty
                } else {
                    0
                }
            })
        })
        .collect();
    let mut reserved = 0;
    for t in tasks {
        reserved += t.await.unwrap();
    }
    assert!(reserved <= 25, "reserved {reserved} of 25");
    assert!(
        reserved >= 23,
        "stock was not left idle: reserved {reserved}"
    );
    let l = level(&app, "gpu", "").await;
    assert_eq!(l.reserved, reserved);
    assert_eq!(l.available, 25 - reserved);
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_that_lacks_stock_on_any_line_names_each_short_line() {
    let app = spawn_app().await;
    set_stock(&app, "a", "", 5).await;
    set_stock(&app, "b", "x", 1).await;
    let r = app
        .reservations()
        .reserve(reserve("r", "cart", &[("a", "", 2), ("b", "x", 3)], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), ReserveOutcome::InsufficientStock);
    assert_eq!(r.shortages.len(), 1);
    let s = &r.shortages[0];
    assert_eq!(
        (
            s.key.as_ref().unwrap().variant_id.as_str(),
            s.requested,
            s.available
        ),
        ("x", 3, 1)
    );
    assert_eq!(level(&app, "a", "").await.reserved, 0, "nothing was taken");
    app.shutdown().await;
}

/// reserve.lua builds its answer from what it wrote; a retry and a read
/// rebuild it from the stored hold. All three must agree, field for field.
#[tokio::test]
async fn every_answer_about_a_reservation_agrees_with_its_retry_and_its_read() {
    let app = spawn_app().await;
    set_stock(&app, "book", "", 10).await;
    let req = reserve("r1", "cart-9", &[("book", "", 3)], 60);
    let first = app
        .reservations()
        .reserve(req.clone())
        .await
        .unwrap()
        .into_inner();
    let again = app.reservations().reserve(req).await.unwrap().into_inner();
    assert_eq!(again, first, "a retry answers exactly as the first call");
    let read = app
        .reservations()
        .get_reservation(pb::GetReservationRequest {
            reservation_id: "r1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.reservation, first.reservation);
    assert_eq!(first.reservation.unwrap().reference, "cart-9");

    // Extend, consume and release answer from what they read and wrote
    // (lua/lib.lua, HOLD_FIELDS): each answer is what a read then finds,
    // and a retry answers the same.
    let get = async |id: &str| {
        app.reservations()
            .get_reservation(pb::GetReservationRequest {
                reservation_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .reservation
            .unwrap()
    };
    let extend = pb::ExtendReservationRequest {
        reservation_id: "r1".into(),
        ttl: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        extension_id: "x1".into(),
    };
    let extended = app.reservations().extend_reservation(extend.clone()).await;
    let extended = extended.unwrap().into_inner().reservation.unwrap();
    assert!(extended.extended);
    assert_eq!(extended, get("r1").await);
    let again = app.reservations().extend_reservation(extend).await;
    assert_eq!(again.unwrap().into_inner().reservation.unwrap(), extended);

    let consumed = app
        .reservations()
        .consume_reservation(consume("r1", "order-5"))
        .await;
    let consumed = consumed.unwrap().into_inner().reservation.unwrap();
    assert_eq!(
        (consumed.state(), &*consumed.order_id),
        (ReservationState::Consumed, "order-5")
    );
    assert_eq!(consumed, get("r1").await);
    let again = app
        .reservations()
        .consume_reservation(consume("r1", "order-5"))
        .await;
    assert_eq!(again.unwrap().into_inner().reservation.unwrap(), consumed);

    app.reservations()
        .reserve(reserve("r2", "cart-9", &[("book", "", 1)], 60))
        .await
        .unwrap();
    let release = || pb::ReleaseReservationRequest {
        reservation_id: "r2".into(),
    };
    let released = app.reservations().release_reservation(release()).await;
    let released = released.unwrap().into_inner().reservation.unwrap();
    assert_eq!(released.state(), ReservationState::Released);
    assert_eq!(released, get("r2").await);
    let again = app.reservations().release_reservation(release()).await;
    assert_eq!(again.unwrap().into_inner().reservation.unwrap(), released);
    app.shutdown().await;
}

#[tokio::test]
async fn consume_decrements_stock_once_under_retries_and_concurrent_duplicates() {
    let app = spawn_app().await;
    set_stock(&app, "book", "", 10).await;
    app.reservations()
        .reserve(reserve("r1", "cart-9", &[("book", "", 3)], 60))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut c = app.reservations();
            tokio::spawn(async move { c.consume_reservation(consume("r1", "order-77")).await })
        })
        .collect();
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("every duplicate gets the same answer")
            .into_inner();
        let res = r.reservation.unwrap();
        assert_eq!(res.state(), ReservationState::Consumed);
        assert_eq!(res.order_id, "order-77");
    }
    let l = level(&app, "book", "").await;
    assert_eq!((l.on_hand, l.sold, l.reserved, l.available), (7, 3, 0, 7));

    let other = app
        .reservations()
        .consume_reservation(consume("r1", "order-78"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert!(other.message().contains("order-77"), "{}", other.message());
    assert_eq!(level(&app, "book", "").await.sold, 3);
    app.eventually("the consumed units written back", || async {
        let (sold,): (i64,) =
            sqlx::query_as("SELECT reported_sold FROM pools WHERE pool_id = 'stock/book'")
                .fetch_one(&app.pg)
                .await
                .unwrap();
        (sold == 3).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn released_or_expired_reservations_cannot_be_consumed_and_release_is_idempotent() {
    let app = spawn_app().await;
    set_stock(&app, "pen", "", 2).await;
    app.reservations()
        .reserve(reserve("r1", "c", &[("pen", "", 1)], 60))
        .await
        .unwrap();
    let release = || pb::ReleaseReservationRequest {
        reservation_id: "r1".into(),
    };
    let first = app
        .reservations()
        .release_reservation(release())
        .await
        .unwrap()
        .into_inner();
    let second = app
        .reservations()
        .release_reservation(release())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.reservation.as_ref().unwrap().state(),
        ReservationState::Released
    );
    assert_eq!(first, second);
    let err = app
        .reservations()
        .consume_reservation(consume("r1", "o1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let r = app
        .reservations()
        .reserve(reserve("r2", "c", &[("pen", "", 2)], 1))
        .await
        .unwrap()
        .into_inner();
    let exp = r.reservation.unwrap().expires_at.unwrap();
    let exp_ms = exp.seconds * 1000 + i64::from(exp.nanos / 1_000_000);
    app.eventually("expiry on Redis's clock", || async {
        (app.redis_now_ms().await > exp_ms).then_some(())
    })
    .await;
    let err = app
        .reservations()
        .consume_reservation(consume("r2", "o2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expired"), "{}", err.message());
    // Expiry freed the stock for the next cart.
    let r = app
        .reservations()
        .reserve(reserve("r3", "c2", &[("pen", "", 2)], 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), ReserveOutcome::Reserved);
    app.shutdown().await;
}

#[tokio::test]
async fn an_extension_moves_expiry_once_only() {
    let app = spawn_app().await;
    set_stock(&app, "hat", "", 2).await;
    let r = app
        .reservations()
        .reserve(reserve("r", "c", &[("hat", "", 1)], 60))
        .await
        .unwrap()
        .into_inner();
    let before = r.reservation.unwrap().expires_at.unwrap().seconds;
    let ext = |id: &str| pb::ExtendReservationRequest {
        reservation_id: "r".into(),
        ttl: Some(prost_types::Duration {
            seconds: 900,
            nanos: 0,
        }),
        extension_id: id.into(),
    };
    let once = app
        .reservations()
        .extend_reservation(ext("e1"))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert!(once.extended);
    assert!(once.expires_at.unwrap().seconds >= before + 800);
    let twice = app
        .reservations()
        .extend_reservation(ext("e2"))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let now = app
        .reservations()
        .get_reservation(pb::GetReservationRequest {
            reservation_id: "r".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        now.reservation.unwrap().expires_at,
        once.expires_at,
        "the refused extension moved nothing"
    );
    app.reservations()
        .consume_reservation(consume("r", "o"))
        .await
        .unwrap();
    let after = app
        .reservations()
        .extend_reservation(ext("e3"))
        .await
        .unwrap_err();
    assert_eq!(after.code(), Code::FailedPrecondition);
    app.shutdown().await;
}

#[tokio::test]
async fn every_transition_has_an_audit_row_readable_through_the_api() {
    let app = spawn_app().await;
    set_stock(&app, "lamp", "blue", 10).await;
    let mut c = app.reservations();
    c.reserve(reserve("r1", "cart-a", &[("lamp", "blue", 2)], 60))
        .await
        .unwrap();
    c.extend_reservation(pb::ExtendReservationRequest {
        reservation_id: "r1".into(),
        ttl: None,
        extension_id: "x".into(),
    })
    .await
    .unwrap();
    c.consume_reservation(consume("r1", "order-1"))
        .await
        .unwrap();
    c.reserve(reserve("r2", "cart-b", &[("lamp", "blue", 1)], 60))
        .await
        .unwrap();
    c.release_reservation(pb::ReleaseReservationRequest {
        reservation_id: "r2".into(),
    })
    .await
    .unwrap();
    c.reserve(reserve("r3", "cart-b", &[("lamp", "blue", 1)], 1))
        .await
        .unwrap();

    let list = |key: Option<StockKey>, reference: &str, page_size: u32, token: String| {
        pb::ListAuditLogRequest {
            key,
            reference: reference.into(),
            page_size,
            page_token: token,
        }
    };
    let entries: Vec<pb::AuditEntry> = app
        .eventually("all six transitions in the audit log", || {
            let mut c = c.clone();
            async move {
                let e = c
                    .list_audit_log(list(key("lamp", ""), "", 100, String::new()))
                    .await
                    .unwrap()
                    .into_inner()
                    .entries;
                (e.len() == 6).then_some(e)
            }
        })
        .await;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.reservation_id.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("created", "r1"),
            ("extended", "r1"),
            ("consumed", "r1"),
            ("created", "r2"),
            ("released", "r2"),
            ("created", "r3")
        ]
    );
    assert_eq!(entries[2].order_id, "order-1");
    assert_eq!(entries[0].lines[0].quantity, 2);
    assert_eq!(entries[0].lines[0].key.as_ref().unwrap().variant_id, "blue");

    // The expiry comes from the sweeper; filter by reference and page.
    let by_ref: Vec<pb::AuditEntry> = app
        .eventually("the expiry of r3", || {
            let mut c = c.clone();
            async move {
                let e = c
                    .list_audit_log(list(None, "cart-b", 100, String::new()))
                    .await
                    .unwrap()
                    .into_inner()
                    .entries;
                (e.len() == 4).then_some(e)
            }
        })
        .await;
    assert_eq!(by_ref.last().unwrap().action, "expired");
    let page1 = c
        .list_audit_log(list(None, "cart-b", 3, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.entries.len(), 3);
    let page2 = c
        .list_audit_log(list(None, "cart-b", 3, page1.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.entries.len(), 1);
    assert!(page2.next_page_token.is_empty());
    for (size, token, field) in [
        (3, "0", "page_token"),
        (3, "x", "page_token"),
        (1001, "", "page_size"),
    ] {
        let err = c
            .list_audit_log(list(None, "cart-b", size, token.into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(field), "{}", err.message());
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_low_stock_alert_fires_once_per_crossing_and_rearms() {
    let app = spawn_app().await;
    set_stock(&app, "cap", "", 10).await;
    app.reservations()
        .set_low_stock_threshold(pb::SetLowStockThresholdRequest {
            key: key("cap", ""),
            threshold: Some(3),
        })
        .await
        .unwrap();
    let mut c = app.reservations();
    // 10 -> 6 -> 3 (crossing: alert) -> 2 (still below: no alert)
    c.reserve(reserve("a", "c", &[("cap", "", 4)], 60))
        .await
        .unwrap();
    c.reserve(reserve("b", "c", &[("cap", "", 3)], 60))
        .await
        .unwrap();
    c.reserve(reserve("d", "c", &[("cap", "", 1)], 60))
        .await
        .unwrap();
    // Back above (re-arm), then down again (second alert).
    c.release_reservation(pb::ReleaseReservationRequest {
        reservation_id: "a".into(),
    })
    .await
    .unwrap();
    c.reserve(reserve("e", "c", &[("cap", "", 4)], 60))
        .await
        .unwrap();
    // Still below: no alert. Once this last reservation's row is in, every
    // alert before it is too (the drainer writes in the stream's order).
    c.reserve(reserve("last", "c", &[("cap", "", 1)], 60))
        .await
        .unwrap();
    app.eventually("the last reservation's audit row", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE hold_id = 'last'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    let alerts: Vec<(serde_json::Value,)> =
        sqlx::query_as("SELECT lines FROM audit_log WHERE kind = 'low_stock' ORDER BY id")
            .fetch_all(&app.pg)
            .await
            .unwrap();
    assert_eq!(alerts.len(), 2, "exactly one alert per crossing");
    let available: Vec<i64> = alerts
        .iter()
        .map(|(l,)| l[0]["qty"].as_i64().unwrap())
        .collect();
    assert_eq!(available, vec![3, 2]);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_reservation_input_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    set_stock(&app, "p", "", 5).await;
    let before = level(&app, "p", "").await;
    let cases = vec![
        (
            reserve("r", "c", &[("p", "", 0)], 60),
            Code::InvalidArgument,
            "lines[0].quantity",
        ),
        (
            reserve("r", "c", &[("p", "", -2)], 60),
            Code::InvalidArgument,
            "lines[0].quantity",
        ),
        (
            reserve("r", "c", &[("p", "", 1), ("p", "", 1)], 60),
            Code::InvalidArgument,
            "lines[1]",
        ),
        (reserve("r", "c", &[], 60), Code::InvalidArgument, "lines"),
        (
            reserve("r", "c", &[("p", "", 1)], 0),
            Code::InvalidArgument,
            "ttl",
        ),
        (
            reserve("r", "c", &[("p", "", 1)], 10 * 86_400),
            Code::InvalidArgument,
            "ttl",
        ),
        (
            reserve("r", "c", &[("p", "bad:variant", 1)], 60),
            Code::InvalidArgument,
            "lines[0].key.variant_id",
        ),
        (
            reserve("", "c", &[("p", "", 1)], 60),
            Code::InvalidArgument,
            "reservation_id",
        ),
        (
            reserve("r", "c", &[("p", "", i64::MAX)], 60),
            Code::InvalidArgument,
            "lines[0].quantity",
        ),
        (
            reserve(&"r".repeat(129), "c", &[("p", "", 1)], 60),
            Code::InvalidArgument,
            "reservation_id",
        ),
        (
            reserve("r", &"c".repeat(129), &[("p", "", 1)], 60),
            Code::InvalidArgument,
            "reference",
        ),
        (
            reserve("r", "c", &[("unknown", "", 1)], 60),
            Code::NotFound,
            "unknown",
        ),
    ];
    let variants: Vec<String> = (0..501).map(|i| format!("v{i}")).collect();
    let too_many: Vec<_> = variants.iter().map(|v| ("p", v.as_str(), 1)).collect();
    let mut cases = cases;
    cases.push((
        reserve("r", "c", &too_many, 60),
        Code::InvalidArgument,
        "at most 500 lines",
    ));
    for (req, code, field) in cases {
        let err = app.reservations().reserve(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(field),
            "{} should name {field}",
            err.message()
        );
    }
    let err = app
        .reservations()
        .consume_reservation(consume("nope", "o"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Zero, and the two ends of i64 (whose `abs` would overflow).
    for delta in [0, i64::MIN, i64::MAX] {
        let err = app
            .reservations()
            .adjust_stock(pb::AdjustStockRequest {
                key: key("p", ""),
                delta,
                adjustment_id: format!("z{delta}"),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "delta {delta}");
        assert!(err.message().contains("delta"), "{}", err.message());
    }
    assert_eq!(level(&app, "p", "").await, before);
    app.shutdown().await;
}

/// After Redis lost its data, a reservation it had is in neither store.
/// The retry of its consumption answers as before, from the audit log
/// (NOT_FOUND would tell the caller its order never was); one still live
/// at the loss is FAILED_PRECONDITION, its unit in doubt.
#[tokio::test]
async fn a_consumption_retried_after_redis_lost_its_data_answers_as_before() {
    let app = spawn_app().await;
    set_stock(&app, "mug", "", 10).await;
    let mut c = app.reservations();
    for id in ["r1", "r2"] {
        c.reserve(reserve(id, "cart", &[("mug", "", 1)], 600))
            .await
            .unwrap();
    }
    let first = c.consume_reservation(consume("r1", "o1")).await.unwrap();
    let first = first.into_inner().reservation.unwrap();
    app.eventually("the consumption in the audit log", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE hold_id = 'r1' AND kind = 'committed'",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;

    crate::redis_loss::lose_everything(&app, "stock/mug").await;

    // The daemon checks every pool with its circuit open (README, "Redis
    // data loss"): until it closes, a hold of Redis's is UNAVAILABLE, and
    // the caller retries, as a client would.
    let again = app
        .eventually("the retry answered", || {
            let mut c = c.clone();
            async move {
                match c.consume_reservation(consume("r1", "o1")).await {
                    Err(e) if e.code() == Code::Unavailable => None,
                    answer => Some(answer.unwrap()),
                }
            }
        })
        .await;
    let again = again.into_inner().reservation.unwrap();
    assert_eq!(again.state(), ReservationState::Consumed);
    assert_eq!(
        (again.order_id.as_str(), &again.lines),
        ("o1", &first.lines)
    );
    for (id, order, code) in [
        ("r1", "o2", Code::FailedPrecondition),
        ("r2", "o3", Code::FailedPrecondition),
        ("never", "o4", Code::NotFound),
    ] {
        let err = c.consume_reservation(consume(id, order)).await.unwrap_err();
        assert_eq!(err.code(), code, "{id}: {err:?}");
    }
    // A read of it answers as the audit log has it too, and an extension
    // is refused as of a reservation that ended.
    let read = |id: &str| pb::GetReservationRequest {
        reservation_id: id.into(),
    };
    let got = c.get_reservation(read("r1")).await.unwrap().into_inner();
    let got = got.reservation.unwrap();
    assert_eq!(
        (got.state(), got.order_id.as_str()),
        (ReservationState::Consumed, "o1")
    );
    let r2 = c.get_reservation(read("r2")).await.unwrap_err();
    assert_eq!(r2.code(), Code::FailedPrecondition, "{r2:?}");
    let never = c.get_reservation(read("never")).await.unwrap_err();
    assert_eq!(never.code(), Code::NotFound, "{never:?}");
    assert!(
        never.message().contains("reservation never"),
        "in a reservation's words: {never:?}"
    );
    let extend = c
        .extend_reservation(pb::ExtendReservationRequest {
            reservation_id: "r1".into(),
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            extension_id: "e1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(extend.code(), Code::FailedPrecondition, "{extend:?}");
    app.shutdown().await;
}

/// A batch names each product once, so a retry that sends its lines in
/// another order (a client building them from a map) is the same request:
/// it gets the first answer and reserves nothing more. Other quantities
/// under the id are another request. A hold made before lines were
/// digested in pool order keeps the digest of its lines as they came, and
/// a retry in that order still gets its answer.
#[tokio::test]
async fn a_retry_with_its_lines_in_another_order_is_the_same_request() {
    let app = spawn_app().await;
    set_stock(&app, "a", "", 10).await;
    set_stock(&app, "b", "", 10).await;
    let mut c = app.reservations();
    let lines = |a: i64, b: i64, b_first: bool| {
        let (a, b) = (("a", "", a), ("b", "", b));
        reserve("r1", "cart", &if b_first { [b, a] } else { [a, b] }, 60)
    };
    let first = c.reserve(lines(1, 2, true)).await.unwrap().into_inner();
    let again = c.reserve(lines(1, 2, false)).await.unwrap().into_inner();
    assert_eq!(again, first, "the same lines in another order are a retry");
    assert_eq!(level(&app, "a", "").await.reserved, 1);
    assert_eq!(level(&app, "b", "").await.reserved, 2);
    let other = c.reserve(lines(2, 2, false)).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");

    // As an earlier build stored it: the digest of the lines as sent.
    let store = app.redis_store().await;
    let dev = holdfast::domain::TenantId::parse("dev").unwrap();
    let key = format!("{}hold:r1", store.keys().tenant(&dev));
    let mut con = app.redis().await;
    let digest: String = redis::cmd("EVAL")
        .arg("return string.sub(redis.sha1hex(ARGV[1]), 1, 16)")
        .arg(0)
        .arg(r#"[["stock/b",2],["stock/a",1]]||stock"#)
        .query_async(&mut con)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("rq")
        .arg(&digest)
        .query_async(&mut con)
        .await
        .unwrap();
    let old = c.reserve(lines(1, 2, true)).await.unwrap().into_inner();
    assert_eq!(old, first, "a retry of an older build's hold, in its order");
    assert_eq!(level(&app, "b", "").await.reserved, 2);
    app.shutdown().await;
}
