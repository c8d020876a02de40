//! Bad input gets a clear gRPC status naming the field, and changes
//! nothing.

use holdfast::grpc::pb::{self, ClaimLine};
use tonic::Code;

use crate::helpers::{TestApp, cart_hold, claim, lines_of, spawn_app, spawn_app_with};

/// Runs a bad claim and checks its status, its message, and that the
/// stock of neither product moved. (An audit row is written after the
/// call, by the drainer: the test's end checks that none was.)
async fn refused(app: &TestApp, req: pb::ClaimRequest, code: Code, field: &str) {
    let snapshot = || async { (app.stock("s", "p").await, app.stock("s", "q").await) };
    let before = snapshot().await;
    let err = app
        .flash()
        .claim(req.clone())
        .await
        .expect_err("a bad request is refused");
    assert_eq!(err.code(), code, "{req:?}: {}", err.message());
    assert!(
        err.message().contains(field),
        "the message {:?} names {field}",
        err.message()
    );
    assert_eq!(
        before,
        snapshot().await,
        "a refused request changed nothing"
    );
}

#[tokio::test]
async fn bad_claims_are_refused_naming_the_field_and_change_nothing() {
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(10)), ("q", Some(10))], 0)
        .await;
    // One good claim so there is state that must not move.
    app.flash()
        .claim(claim("ok", "s", &[("p", 1)]))
        .await
        .unwrap();
    app.eventually("the good claim's audit row", || async {
        (app.audit_count().await == 1).then_some(())
    })
    .await;

    let inv = Code::InvalidArgument;
    refused(&app, claim("a", "s", &[("p", 0)]), inv, "lines[0].quantity").await;
    refused(
        &app,
        claim("a", "s", &[("p", -5)]),
        inv,
        "lines[0].quantity",
    )
    .await;
    refused(
        &app,
        claim("a", "s", &[("q", 1), ("p", i64::MAX)]),
        inv,
        "lines[1].quantity",
    )
    .await;
    refused(&app, claim("a", "s", &[]), inv, "lines").await;
    refused(
        &app,
        claim("a", "s", &[("p", 1), ("q", 1), ("p", 2)]),
        inv,
        "lines[2]",
    )
    .await;
    refused(&app, claim("", "s", &[("p", 1)]), inv, "claim_id").await;
    refused(
        &app,
        claim(&"x".repeat(129), "s", &[("p", 1)]),
        inv,
        "claim_id",
    )
    .await;
    refused(&app, claim("has:colon", "s", &[("p", 1)]), inv, "claim_id").await;
    refused(&app, claim("{tag}", "s", &[("p", 1)]), inv, "claim_id").await;
    refused(
        &app,
        claim("a", "s", &[("bad/product", 1)]),
        inv,
        "lines[0].product_id",
    )
    .await;
    refused(
        &app,
        claim("a", &"s".repeat(65), &[("p", 1)]),
        inv,
        "sale_id",
    )
    .await;
    let mut too_many = claim("a", "s", &[]);
    too_many.lines = (0..501)
        .map(|i| ClaimLine {
            product_id: format!("p{i}"),
            quantity: 1,
        })
        .collect();
    refused(&app, too_many, inv, "lines").await;

    refused(
        &app,
        claim("a", "nosuchsale", &[("p", 1)]),
        Code::NotFound,
        "nosuchsale",
    )
    .await;
    refused(
        &app,
        claim("a", "s", &[("p", 1), ("nosuchproduct", 1)]),
        Code::NotFound,
        "nosuchproduct",
    )
    .await;
    // The drainer writes events in the order Redis took them, so once a
    // later claim's row is in, any row a refused call had caused is too.
    app.flash()
        .claim(claim("last", "s", &[("q", 1)]))
        .await
        .unwrap();
    app.eventually("the last claim's audit row", || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log WHERE hold_id = 'last'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(
        app.audit_count().await,
        2,
        "refused calls left no audit row"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn bad_hold_requests_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(10))], 0).await;
    let before = app.stock("s", "p").await;
    for (req, field) in [
        (cart_hold("h", "s", &[("p", 1)], 0), "ttl"),
        (cart_hold("h", "s", &[("p", 1)], -3), "ttl"),
        (cart_hold("h", "s", &[("p", 1)], 100 * 86_400), "ttl"),
        (
            pb::CreateCartHoldRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 2_000_000_000,
                }),
                ..cart_hold("h", "s", &[("p", 1)], 60)
            },
            "ttl",
        ),
        (cart_hold("h h", "s", &[("p", 1)], 60), "hold_id"),
        (
            pb::CreateCartHoldRequest {
                customer_id: "a:b".into(),
                ..cart_hold("h", "s", &[("p", 1)], 60)
            },
            "customer_id",
        ),
        (cart_hold("h", "s", &[("p", 0)], 60), "lines[0].quantity"),
        (cart_hold("h", "s", &[("p", -1)], 60), "lines[0].quantity"),
        (
            cart_hold("h", "s", &[("p", i64::MAX)], 60),
            "lines[0].quantity",
        ),
        (cart_hold("h", "s", &[], 60), "at least one line"),
        (cart_hold("h", "s", &[("p", 1), ("p", 1)], 60), "lines[1]"),
        (
            pb::CreateCartHoldRequest {
                lines: (0..501)
                    .map(|i| lines_of(&[(&format!("p{i}"), 1)])[0].clone())
                    .collect(),
                ..cart_hold("h", "s", &[], 60)
            },
            "at most 500 lines",
        ),
    ] {
        let err = app.flash().create_cart_hold(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    assert_eq!(app.stock("s", "p").await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_sale_definitions_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let now = chrono::Utc::now().timestamp();
    let good = pb::CreateSaleRequest {
        sale_id: "s".into(),
        name: "Sale".into(),
        starts_at: Some(prost_types::Timestamp {
            seconds: now,
            nanos: 0,
        }),
        ends_at: Some(prost_types::Timestamp {
            seconds: now + 60,
            nanos: 0,
        }),
        products: vec![pb::SaleProduct {
            product_id: "p".into(),
            unit_cap: Some(1),
        }],
        per_customer_limit: 0,
    };
    let cases = [
        (
            pb::CreateSaleRequest {
                sale_id: String::new(),
                ..good.clone()
            },
            "sale_id",
        ),
        (
            pb::CreateSaleRequest {
                ends_at: good.starts_at,
                ..good.clone()
            },
            "ends_at",
        ),
        (
            pb::CreateSaleRequest {
                starts_at: None,
                ..good.clone()
            },
            "starts_at",
        ),
        (
            pb::CreateSaleRequest {
                products: vec![],
                ..good.clone()
            },
            "products",
        ),
        (
            pb::CreateSaleRequest {
                products: vec![pb::SaleProduct {
                    product_id: "p".into(),
                    unit_cap: Some(-1),
                }],
                ..good.clone()
            },
            "products[0].unit_cap",
        ),
        (
            pb::CreateSaleRequest {
                products: vec![
                    pb::SaleProduct {
                        product_id: "p".into(),
                        unit_cap: Some(1),
                    },
                    pb::SaleProduct {
                        product_id: "p".into(),
                        unit_cap: Some(2),
                    },
                ],
                ..good.clone()
            },
            "products[1].product_id",
        ),
        (
            pb::CreateSaleRequest {
                name: "a\0b".into(),
                ..good.clone()
            },
            "name",
        ),
        (
            pb::CreateSaleRequest {
                per_customer_limit: 3_000_000_000,
                ..good.clone()
            },
            "per_customer_limit",
        ),
        // Within one microsecond of the start: the same instant, as stored.
        (
            pb::CreateSaleRequest {
                starts_at: Some(prost_types::Timestamp {
                    seconds: now,
                    nanos: 100,
                }),
                ends_at: Some(prost_types::Timestamp {
                    seconds: now,
                    nanos: 900,
                }),
                ..good.clone()
            },
            "ends_at",
        ),
    ];
    for (req, field) in cases {
        let err = app.flash().create_sale(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    let (sales,): (i64,) = sqlx::query_as("SELECT count(*) FROM sales")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(sales, 0);
    let err = app
        .flash()
        .get_sale(pb::GetSaleRequest {
            sale_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    app.shutdown().await;
}

#[tokio::test]
async fn invalid_argument_carries_a_bad_request_detail_naming_the_field() {
    use tonic_types::StatusExt;
    let app = spawn_app().await;
    app.live_sale("s", &[("p", Some(1))], 0).await;
    let mut req = claim("a", "s", &[]);
    req.lines = lines_of(&[("p", 0)]);
    let err = app.flash().claim(req).await.unwrap_err();
    let details = err.get_error_details();
    let bad = details.bad_request().expect("a BadRequest detail");
    assert_eq!(bad.field_violations[0].field, "lines[0].quantity");
    app.shutdown().await;
}

#[tokio::test]
async fn a_tenant_over_its_active_hold_cap_is_told_resource_exhausted() {
    let app = spawn_app_with(|a| a.max_active_holds_per_tenant = 2).await;
    app.live_sale("s", &[("p", Some(100))], 0).await;
    for id in ["h1", "h2"] {
        app.flash()
            .create_cart_hold(cart_hold(id, "s", &[("p", 1)], 60))
            .await
            .unwrap();
    }
    let before = app.stock("s", "p").await;
    let err = app
        .flash()
        .create_cart_hold(cart_hold("h3", "s", &[("p", 1)], 60))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("active holds"), "{}", err.message());
    assert_eq!(
        app.stock("s", "p").await,
        before,
        "the refusal took nothing"
    );

    // Finishing a hold frees its place under the cap.
    app.flash()
        .release_cart_hold(pb::ReleaseCartHoldRequest {
            hold_id: "h1".into(),
        })
        .await
        .unwrap();
    app.flash()
        .create_cart_hold(cart_hold("h3", "s", &[("p", 1)], 60))
        .await
        .expect("a place freed by release is usable");
    app.shutdown().await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_it_is_parsed() {
    let app = spawn_app_with(|a| a.max_request_bytes = 4096).await;
    app.live_sale("s", &[("p", Some(10))], 0).await;
    let lines: Vec<(String, i64)> = (0..400).map(|i| (format!("product-{i:04}"), 1)).collect();
    let refs: Vec<(&str, i64)> = lines.iter().map(|(p, q)| (p.as_str(), *q)).collect();
    let before = (app.stock("s", "p").await, app.audit_count().await);
    let err = app
        .flash()
        .claim(claim("big", "s", &refs))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(err.message().contains("4096"), "{}", err.message());
    assert_eq!(
        (app.stock("s", "p").await, app.audit_count().await),
        before,
        "an oversized request changed nothing"
    );
    // A normal request on the same connection still works.
    app.flash()
        .claim(claim("small", "s", &[("p", 1)]))
        .await
        .unwrap();
    app.shutdown().await;
}
