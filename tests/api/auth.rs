//! Tenants are walled off: the tenant comes from the key, and another
//! tenant's things are NOT_FOUND.

use holdfast::grpc::pb::{self, Outcome};
use tonic::Code;

use crate::helpers::{
    STORE_A_ADMIN, STORE_A_CHECKOUT, STORE_B_ADMIN, claim, live_sale_request, spawn_app_with,
    spawn_two_stores, with_key,
};

fn sale(id: &str) -> pb::CreateSaleRequest {
    live_sale_request(id, &[("p", Some(5))])
}

#[tokio::test]
async fn a_key_for_one_store_cannot_see_or_touch_another_stores_sales() {
    let app = spawn_two_stores().await;
    let mut flash = app.flash();
    flash
        .create_sale(with_key(sale("spring"), STORE_A_ADMIN))
        .await
        .unwrap();
    let ok = flash
        .claim(with_key(
            claim("c1", "spring", &[("p", 1)]),
            STORE_A_CHECKOUT,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outcome(), Outcome::Ok);

    // Store B sees nothing of A's sale, and cannot claim from it.
    let err = flash
        .get_sale(with_key(
            pb::GetSaleRequest {
                sale_id: "spring".into(),
                ..Default::default()
            },
            STORE_B_ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = flash
        .claim(with_key(claim("c2", "spring", &[("p", 1)]), STORE_B_ADMIN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Nor read A's claim as a hold.
    let err = flash
        .get_cart_hold(with_key(
            pb::GetCartHoldRequest {
                hold_id: "c1".into(),
            },
            STORE_B_ADMIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // B may use the same ids for its own sale without touching A's.
    flash
        .create_sale(with_key(sale("spring"), STORE_B_ADMIN))
        .await
        .unwrap();
    let b = flash
        .claim(with_key(claim("c1", "spring", &[("p", 5)]), STORE_B_ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.outcome(), Outcome::Ok);
    let a_sale = flash
        .get_sale(with_key(
            pb::GetSaleRequest {
                sale_id: "spring".into(),
                ..Default::default()
            },
            STORE_A_ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a_sale.sale.unwrap().products[0].sold, 1);
    app.shutdown().await;
}

#[tokio::test]
async fn missing_or_wrong_keys_are_unauthenticated_and_roles_are_enforced() {
    let app = spawn_app_with(|a| {
        a.dev = false;
        a.api_keys = vec![STORE_A_ADMIN.into(), STORE_A_CHECKOUT.into()];
    })
    .await;
    let mut flash = app.flash();
    let err = flash
        .get_sale(pb::GetSaleRequest {
            sale_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = flash
        .get_sale(with_key(
            pb::GetSaleRequest {
                sale_id: "x".into(),
                ..Default::default()
            },
            "t:admin:not-a-real-key",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = flash
        .create_sale(with_key(sale("s"), STORE_A_CHECKOUT))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM sales")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(n, 0, "a refused call changed nothing");
    app.shutdown().await;
}

/// Runs `holdfast keys ...` against the test's database: (stdout, stderr).
async fn keys_cli(app: &crate::helpers::TestApp, args: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("keys")
        .args(args)
        .env("HOLDFAST_DATABASE_URL", &app.database_url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "holdfast keys {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

#[tokio::test]
async fn keys_made_by_the_cli_authenticate_until_revoked() {
    let app = spawn_app_with(|a| {
        a.dev = false;
        a.api_keys = vec![STORE_A_ADMIN.into()];
    })
    .await;
    let (stdout, stderr) =
        keys_cli(&app, &["create", "--tenant", "store-c", "--role", "admin"]).await;
    let key = stdout.trim().to_string();
    let key_id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "key")
        .nth(1)
        .expect("the key id is printed")
        .to_string();
    assert!(
        key.starts_with(&format!("hf_{key_id}_")),
        "{key} / {stderr}"
    );
    let (hash,): (Vec<u8>,) = sqlx::query_as("SELECT key_hash FROM api_keys WHERE key_id = $1")
        .bind(&key_id)
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(hash.len(), 32, "a SHA-256 digest, not the key, is stored");
    // Nothing in the key's row gives its secret away.
    let secret = &key[format!("hf_{key_id}_").len()..];
    let (row,): (String,) =
        sqlx::query_as("SELECT row_to_json(k)::text FROM api_keys k WHERE key_id = $1")
            .bind(&key_id)
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert!(!row.contains(secret), "{row}");
    let spec = format!("store-c:admin:{key}");
    let mut flash = app.flash();
    flash
        .create_sale(with_key(sale("c-sale"), &spec))
        .await
        .unwrap();
    keys_cli(&app, &["revoke", &key_id]).await;
    // The daemon trusts a looked-up key for a few seconds; then it is gone.
    app.eventually("the revoked key to be refused", || {
        let mut flash = flash.clone();
        let spec = spec.clone();
        async move {
            let r = flash
                .get_sale(with_key(
                    pb::GetSaleRequest {
                        sale_id: "c-sale".into(),
                        ..Default::default()
                    },
                    &spec,
                ))
                .await;
            matches!(r, Err(ref s) if s.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    app.shutdown().await;
}
