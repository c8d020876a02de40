//! The benchmark's Postgres alternative (`holdfast bench`'s `pg_alt`) has
//! the shape of the workload it stands beside: run through the real
//! `pgbench` against the test Postgres, then read back what it did.

use holdfast::bench::{PgRun, Workload, pg_alternative};
use sqlx::PgPool;

use crate::helpers::{fresh_database, random_suffix};

/// Script runs of each alternative: 4 clients, 400 each.
const RUNS: i64 = 1_600;

/// Runs `w`'s alternative with 4 clients, 400 script runs each (a fixed
/// amount of work, not a time, so a slow machine sells as much); returns
/// the database it ran in.
async fn ran(w: Workload) -> PgPool {
    let url = fresh_database().await;
    let dir = std::env::temp_dir().join(format!("holdfast-alt-{}", random_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tps = pg_alternative(w, &url, &dir, 4, PgRun::PerClient(400)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let tps = tps.unwrap_or_else(|e| panic!("{} alternative: {e:#}", w.name()));
    assert!(tps > 0.0, "{} alternative ran nothing", w.name());
    PgPool::connect(&url).await.expect("connect")
}

/// (rows, rows sold from, units sold, units held)
async fn stock(pg: &PgPool) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE sold > 0), COALESCE(sum(sold), 0)::bigint, COALESCE(sum(held), 0)::bigint FROM bench_stock",
    )
    .fetch_one(pg)
    .await
    .expect("read bench_stock")
}

/// How many of the alternative's holds are in `state`.
async fn holds_in(pg: &PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM bench_holds WHERE state = $1")
        .bind(state)
        .fetch_one(pg)
        .await
        .expect("read bench_holds")
}

/// True when `sold` units picked at random among `rows` rows came from at
/// least half as many rows as could have been picked (uniform picks come
/// from ~63% or more); one hot row would be one.
fn spread(from: i64, sold: i64, rows: i64) -> bool {
    from * 2 >= sold.min(rows)
}

#[tokio::test]
async fn the_postgres_alternative_has_the_shape_of_its_workload() {
    // One hot row with claim-sellout's cap: sold out at exactly the cap.
    let (rows, from, sold, _) = stock(&ran(Workload::ClaimSellout).await).await;
    assert_eq!(
        (rows, from, sold),
        (1, 1, 1_000),
        "claim-sellout's alternative sells out"
    );

    // claim-10k's claims spread over 10,000 rows, one unit a claim.
    let (rows, from, sold, _) = stock(&ran(Workload::Claim10k).await).await;
    assert_eq!(rows, 10_000);
    assert_eq!(sold, RUNS, "every claim sells one unit");
    assert!(
        spread(from, sold, rows),
        "claims spread over the rows: {sold} units from {from} rows"
    );

    // claim-hot's: one row that never sells out.
    let (rows, from, sold, _) = stock(&ran(Workload::ClaimHot).await).await;
    assert_eq!((rows, from), (1, 1));
    assert_eq!(sold, RUNS, "claim-hot's alternative is not capped");

    // reserve-release's holds end released: nothing sold, nothing held.
    let pg = ran(Workload::ReserveRelease).await;
    let (_, _, sold, held) = stock(&pg).await;
    let released = holds_in(&pg, "R").await;
    assert_eq!((sold, held), (0, 0));
    assert_eq!(released, RUNS, "every hold was released");

    // lock-complete's: each card its own row, each lock sold.
    let pg = ran(Workload::LockComplete).await;
    let (rows, from, sold, held) = stock(&pg).await;
    let committed = holds_in(&pg, "C").await;
    assert_eq!((rows, held, sold, committed), (100_000, 0, RUNS, RUNS));
    assert!(
        spread(from, sold, rows),
        "locks spread over the cards: {sold} from {from}"
    );
}

/// The benchmark's Redis limit (`redis_limit`) is the engine's script
/// doing its work: each redis-benchmark call a new take, not a retry of
/// one id answered from the hold (as `-r` past an `int` made it).
#[tokio::test]
async fn the_redis_baseline_takes_a_unit_per_call() {
    use redis::AsyncCommands;
    let app = crate::helpers::spawn_app_with(|a| {
        a.grant_chunk = 100_000;
        a.grant_max_chunk = 100_000;
    })
    .await;
    app.live_sale("b", &[("p", Some(100_000))], 0).await;
    let dev = holdfast::domain::TenantId::parse("dev").unwrap();
    let argv = app
        .redis_store()
        .await
        .one_unit_command(&dev, true, "sale/b/p")
        .await
        .unwrap();
    let url = crate::helpers::redis_url();
    let host_port = url.trim_start_matches("redis://");
    let host_port = host_port.split('/').next().unwrap();
    let (host, port) = host_port.rsplit_once(':').unwrap();
    let rate = holdfast::bench::redis_script(host, port.parse().unwrap(), 4, 1_000, &argv)
        .await
        .unwrap();
    assert!(rate > 0.0);
    let key = app.pool_key("dev", "sale/b/p").await;
    let sold: i64 = app.redis().await.hget(&key, "sold").await.unwrap();
    // Random ids may meet once or twice in a thousand; one id for all
    // sold one.
    assert!(sold >= 990, "the calls sold {sold} units");
    app.shutdown().await;
}
