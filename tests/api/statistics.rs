//! The statistics job (src/jobs/statistics.rs): a table that grew in a
//! burst is analysed within moments, so batch statements keep their index
//! plans.

use crate::helpers::*;

/// How long a test waits for the job to analyse a table that grew. The job
/// reads the growth from Postgres's cumulative statistics, which a backend
/// that goes idle after its writes reports up to 10 s later (Postgres 15's
/// idle flush interval), and the job looks every 2 s: one full run of the
/// suite once saw the 10 s `eventually` expire. A guard, not a target.
const STATS_LAG: std::time::Duration = std::time::Duration::from_secs(30);

#[tokio::test]
async fn every_table_is_watched() {
    let app = spawn_app().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_stat_user_tables
         WHERE schemaname = current_schema() AND relname NOT LIKE '\\_sqlx%'
         ORDER BY relname",
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    assert_eq!(tables, holdfast::store::postgres::TABLES);
    app.shutdown().await;
}

/// Loads `sales` live sales of 500 products each, `big0`, `big1`...: a
/// catalogue load, one pool per product.
async fn catalogue(app: &TestApp, sales: usize) {
    let products: Vec<String> = (0..500).map(|p| format!("p{p}")).collect();
    let caps: Vec<(&str, Option<i64>)> = products.iter().map(|p| (p.as_str(), Some(10))).collect();
    for s in 0..sales {
        app.live_sale(&format!("big{s}"), &caps, 0).await;
    }
}

/// Turns autovacuum off for `pools` in this test's database, so that only
/// the job analyses it. The suite makes a database per test, and
/// autovacuum visits each of them every `naptime / databases` (well under
/// a second with a hundred): when it analysed the grown table first, the
/// job saw no growth and the test waited for an analysis that never came.
async fn autovacuum_off(app: &TestApp) {
    sqlx::query("ALTER TABLE pools SET (autovacuum_enabled = false)")
        .execute(&app.pg)
        .await
        .unwrap();
}

/// The plan of the fallback's pool look-up (fallback/take.rs `lock_pools`,
/// the same shape as every batch's) for 16 of the tenant's pools.
async fn pool_lookup_plan(app: &TestApp) -> String {
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT pool_id FROM pools WHERE tenant = $1 AND pool_id = ANY($2)
         ORDER BY pool_id FOR UPDATE",
    )
    .bind("dev")
    .bind(
        (0..16)
            .map(|p| format!("sale/big0/p{p}"))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&app.pg)
    .await
    .unwrap();
    plan.join("\n")
}

#[tokio::test]
async fn a_catalogue_of_thousands_of_products_is_analysed_and_looked_up_by_key() {
    let app = spawn_app().await;
    let analysed = async || -> bool {
        sqlx::query_scalar(
            "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'pools'",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap()
    };
    assert!(!analysed().await);
    autovacuum_off(&app).await;
    catalogue(&app, 6).await;
    app.eventually_within(STATS_LAG, "the pools analysed", async || {
        analysed().await.then_some(())
    })
    .await;
    // With statistics the look-up probes the index once per pool: every
    // condition is an index condition. The planner that thought the
    // tenant had a few pools scanned all of its 3,000 and filtered them.
    let plan = pool_lookup_plan(&app).await;
    assert!(
        plan.lines()
            .any(|l| l.contains("Index Cond") && l.contains("pool_id")),
        "{plan}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_table_whose_rows_only_change_is_left_to_autovacuum() {
    let app = spawn_app().await;
    let last_analyze = async || -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'pools'")
            .fetch_one(&app.pg)
            .await
            .unwrap()
    };
    autovacuum_off(&app).await;
    catalogue(&app, 4).await;
    let first = app
        .eventually_within(STATS_LAG, "the pools analysed", async || {
            last_analyze().await
        })
        .await;
    // The write-back's kind of traffic: every pool's row updated, three
    // times over (6,000 changes on a table of 2,000 rows), counted at once.
    let mut con = app.pg.acquire().await.unwrap();
    for _ in 0..3 {
        sqlx::query("UPDATE pools SET reported_sold = reported_sold WHERE tenant = 'dev'")
            .execute(&mut *con)
            .await
            .unwrap();
    }
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *con)
        .await
        .unwrap();
    drop(con);
    let pg = holdfast::store::postgres::PgStore::from_pool(app.pg.clone());
    let analysed = pg.refresh_statistics().await.unwrap();
    assert!(!analysed.contains(&"pools".to_string()), "{analysed:?}");
    assert_eq!(last_analyze().await, Some(first));
    app.shutdown().await;
}
