//! The benchmark's Postgres alternative (`holdfast bench`'s `pg_alt`) has
//! the shape of the workload it stands beside: run through the real
//! `pgbench` against the test Postgres, then read back what it did.

use holdfast::bench::{PgRun, Workload, pg_alternative, vacuum};
use holdfast::grpc::pb;
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

/// The bench vacuums its own Postgres before each measured run
/// (src/bench/drained.rs): every table comes out vacuumed and analysed.
#[tokio::test]
async fn the_bench_leaves_its_postgres_vacuumed_and_analysed() {
    let url = fresh_database().await;
    let pg = PgPool::connect(&url).await.expect("connect");
    sqlx::raw_sql("CREATE TABLE cards (id int); INSERT INTO cards SELECT generate_series(1, 1000)")
        .execute(&pg)
        .await
        .expect("make a table");
    vacuum(&url).await.expect("vacuum");
    let (vacuums, analyses): (i64, i64) = sqlx::query_as(
        "SELECT vacuum_count, analyze_count FROM pg_stat_user_tables WHERE relname = 'cards'",
    )
    .fetch_one(&pg)
    .await
    .expect("read the table's statistics");
    assert_eq!((vacuums, analyses), (1, 1));
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
    let app = app_granting_whole_pools().await;
    app.live_sale("b", &[("p", Some(100_000))], 0).await;
    let claim = one_step(&app, "sale/b/p", true).await;
    let url = crate::helpers::redis_url();
    let host_port = url.trim_start_matches("redis://");
    let host_port = host_port.split('/').next().unwrap();
    let (host, port) = host_port.rsplit_once(':').unwrap();
    let rate = holdfast::bench::redis_script(host, port.parse().unwrap(), 4, 1_000, &claim)
        .await
        .unwrap();
    assert!(rate > 0.0);
    // Random ids may meet once or twice in a thousand; one id for all
    // sold one.
    let sold = counter(&app, "sale/b/p", "sold").await;
    assert!(sold >= 990, "the calls sold {sold} units");
    app.shutdown().await;
}

/// The Redis limit of a two-step workload runs both steps of each
/// operation, the second on the hold the first made: 500 reserve-commit
/// operations sell 500 units and leave none held.
#[tokio::test]
async fn the_redis_driver_commits_the_hold_each_operation_made() {
    let app = app_granting_whole_pools().await;
    // Stock, and a first reserve through the daemon so that Redis has
    // its grant (the raw calls cannot ask for one).
    let key = || {
        Some(pb::StockKey {
            product_id: "sku".into(),
            variant_id: String::new(),
        })
    };
    let mut stock = app.reservations();
    stock
        .set_stock(pb::SetStockRequest {
            key: key(),
            on_hand: 100_000,
            adjustment_id: "a".into(),
            reason: "bench".into(),
        })
        .await
        .unwrap();
    stock
        .reserve(pb::ReserveRequest {
            reservation_id: "warm".into(),
            reference: String::new(),
            lines: vec![pb::ReservationLine {
                key: key(),
                quantity: 1,
            }],
            ttl: None,
        })
        .await
        .unwrap();
    let pool = "stock/sku";
    let reserve = one_step(&app, pool, false).await;
    let dev = holdfast::domain::TenantId::parse("dev").unwrap();
    let id = holdfast::domain::HoldId::from_store(format!("bench{}", holdfast::bench::OP_NUMBER));
    let commit = app
        .redis_store()
        .await
        .single_op_command(
            &dev,
            holdfast::store::redis::Op::Commit {
                id: &id,
                job: holdfast::domain::Job::Stock,
                order_id: "o",
            },
        )
        .await
        .unwrap();
    let (held, sold) = (
        counter(&app, pool, "held").await,
        counter(&app, pool, "sold").await,
    );
    let run =
        holdfast::bench::drive_steps(&crate::helpers::redis_url(), 4, 0..500, &[reserve, commit])
            .await
            .unwrap();
    assert_eq!(
        (run.done, run.failed),
        (500, 0),
        "refused: {:?}",
        run.refused
    );
    run.check().unwrap();
    assert_eq!(counter(&app, pool, "sold").await - sold, 500);
    assert_eq!(counter(&app, pool, "held").await, held);
    app.shutdown().await;
}

/// A daemon whose grants are large enough that Redis holds each pool of
/// these tests whole: the raw calls cannot ask for a grant.
async fn app_granting_whole_pools() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|a| {
        a.grant_chunk = 100_000;
        a.grant_max_chunk = 100_000;
    })
    .await
}

/// The command line of a one-unit claim (`claim`) or 60 s hold of `pool`
/// by the dev tenant, with the operation's number in its id.
async fn one_step(app: &crate::helpers::TestApp, pool: &str, claim: bool) -> Vec<String> {
    use holdfast::domain::{HoldId, Job, Line, Lines, PoolId, Quantity};
    use holdfast::store::redis::{NewHold, Op};
    let dev = holdfast::domain::TenantId::parse("dev").unwrap();
    let id = HoldId::from_store(format!("bench{}", holdfast::bench::OP_NUMBER));
    let line = Line {
        pool: PoolId::from_store(pool.into()),
        quantity: Quantity::parse("quantity", 1, 1).unwrap(),
    };
    let lines = Lines::parse("lines", vec![line], 1).unwrap();
    let op = if claim {
        Op::Claim {
            id: &id,
            job: Job::Flash,
            lines: &lines,
            customer: None,
        }
    } else {
        let hold = NewHold {
            id: &id,
            job: Job::Stock,
            ttl: std::time::Duration::from_secs(60),
            lines: &lines,
            customer: None,
            reference: "",
        };
        Op::Reserve(hold, None)
    };
    app.redis_store()
        .await
        .single_op_command(&dev, op)
        .await
        .unwrap()
}

/// A counter of `pool` in Redis (`sold`, `held`...), 0 when unset.
async fn counter(app: &crate::helpers::TestApp, pool: &str, field: &str) -> i64 {
    use redis::AsyncCommands;
    let key = app.pool_key("dev", pool).await;
    let v: Option<i64> = app.redis().await.hget(&key, field).await.unwrap();
    v.unwrap_or(0)
}

/// The opening probe's crowd buys from a sale of its own and is answered
/// for every unit the sale sold: a crowd of 32 for 2 s (a slow machine may
/// not sell all 1,000 in that time, so only what was told is compared).
#[tokio::test]
async fn the_opening_probe_counts_every_unit_its_crowd_was_sold() {
    use holdfast::bench::{Caller, opening};
    let app = crate::helpers::spawn_app().await;
    let runs = opening(
        &[app.channel()],
        &Caller::new(None),
        &[32],
        std::time::Duration::from_secs(2),
    )
    .await
    .expect("the probe runs and its promises hold");
    let [run] = runs.as_slice() else {
        panic!("one line per crowd: {runs:?}")
    };
    assert_eq!((run.crowd, run.errors), (32, 0));
    assert!(run.claimed > 0, "{run:?}");
    assert_eq!(run.sold, run.claimed as i64);
    app.shutdown().await;
}

/// The pg-growth probe counts what the run's own operations left in the
/// daemon's Postgres: every audit row of them (one a claim, two a
/// two-step operation) written before it reads the sizes, and the growth
/// of the audit log within what a row and its index entries can take.
#[tokio::test]
async fn the_pg_growth_probe_measures_what_each_operation_left_in_postgres() {
    use holdfast::bench::{Caller, Workload, pg_growth};
    let app = crate::helpers::spawn_app().await;
    let caller = Caller::new(None);
    let n = 400;
    let driven = [
        Workload::ClaimHot,
        Workload::ReserveCommit,
        Workload::SlotConfirm,
    ];
    let found = pg_growth(&driven, &[app.channel()], &caller, &app.database_url, 8, n)
        .await
        .expect("the probe runs");
    let counted: Vec<(Workload, u64, i64)> = found
        .iter()
        .map(|g| (g.workload, g.made, g.audit_rows))
        .collect();
    assert_eq!(
        counted,
        [
            (Workload::ClaimHot, n, 400),
            (Workload::ReserveCommit, n, 800),
            (Workload::SlotConfirm, n, 800)
        ],
        "every operation made and drained, and only the run's rows counted"
    );
    for g in &found {
        let audit_per_op = g.audit_bytes as f64 / n as f64;
        let rows_each = g.audit_rows as f64 / n as f64;
        assert!(
            (60.0 * rows_each..2_000.0 * rows_each).contains(&audit_per_op),
            "{g:?}: {audit_per_op} audit-log bytes an operation"
        );
        assert!(
            g.bytes >= g.audit_bytes,
            "{g:?}: the database holds the audit log"
        );
        assert!(
            g.wal_bytes > g.audit_bytes,
            "{g:?}: the rows went through the WAL"
        );
        let named = format!("workload={} made={n}", g.workload.name());
        assert!(g.line().contains(&named), "{}", g.line());
    }

    // A workload whose operations are mostly refusals is refused.
    let refused = pg_growth(
        &[Workload::ClaimSellout],
        &[app.channel()],
        &caller,
        &app.database_url,
        8,
        n,
    )
    .await;
    assert!(refused.is_err_and(|e| e.to_string().contains("claim-sellout")));
    app.shutdown().await;
}

/// `holdfast bench --probe restart` (the binary, as a user runs it):
/// claims go on while its daemon is sent SIGTERM and started again on the
/// same port, and the probe's own check holds: the new daemon served,
/// and the sale sold exactly what its callers were told (a call cut by the
/// restart sold nothing). A call the shutdown dropped would show as a
/// failure before the SIGTERM.
#[tokio::test]
async fn a_restart_mid_sale_loses_no_claim_and_serves_again() {
    let database_url = fresh_database().await;
    // The bench's daemon on a prefix of its own in the shared Redis.
    let prefix = format!("--serve-arg=--redis-prefix=t{}", random_suffix());
    let fixed =
        "--probe restart --duration 2 --rate 200 --clients 4 --connections 1 --no-baselines";
    let mut args: Vec<&str> = fixed.split(' ').collect();
    args.push(&prefix);
    let line = crate::helpers::bench_line(&args, &database_url, "bench-probe: restart ").await;
    let field = |name: &str| field(&line, name);
    assert_eq!(field("promises"), "kept", "{line}");
    assert_eq!(field("failed_before"), "0", "{line}");
    assert_ne!(field("start_ms"), "never", "{line}");
    assert_ne!(field("answered_again_ms"), "never", "{line}");
    let claimed: u64 = field("claimed").parse().expect("a count");
    assert!(claimed > 0, "{line}");
}

/// `holdfast bench --probe connections` (the binary): the idle connections
/// it opens are each one descriptor of the daemon while open, and the
/// daemon lets them go when their clients close them; claims are served
/// beside them.
#[tokio::test]
async fn the_connections_probe_measures_open_idle_connections() {
    let database_url = fresh_database().await;
    let prefix = format!("--serve-arg=--redis-prefix=t{}", random_suffix());
    let fixed = "--probe connections --idle-connections 200 --duration 1 --clients 4 --connections 1 --no-baselines";
    let mut args: Vec<&str> = fixed.split(' ').collect();
    args.push(&prefix);
    let line = crate::helpers::bench_line(&args, &database_url, "probe: connections ").await;
    let field = |name: &str| -> f64 { number(&line, name) };
    assert_eq!(field("idle"), 200.0, "{line}");
    let per = field("fds_per_connection");
    assert!((0.95..=1.05).contains(&per), "{line}");
    assert!(
        field("fds_closed") < 20.0,
        "the closed connections were let go: {line}"
    );
    assert!(
        field("claims_alone_rps") > 0.0 && field("claims_beside_rps") > 0.0,
        "{line}"
    );
    assert_eq!(field("errors"), 0.0, "{line}");
}

/// `holdfast bench --probe watch` (the binary): beside claims, every
/// subscriber gets one event for each claim made, and none is ended early.
#[tokio::test]
async fn the_watch_probe_counts_every_claims_event_at_every_subscriber() {
    let database_url = fresh_database().await;
    let prefix = format!("--serve-arg=--redis-prefix=t{}", random_suffix());
    let fixed =
        "--probe watch --watchers 3 --duration 1 --clients 4 --connections 1 --no-baselines";
    let mut args: Vec<&str> = fixed.split(' ').collect();
    args.push(&prefix);
    let line = crate::helpers::bench_line(&args, &database_url, "probe: watch watchers=3 ").await;
    let field = |name: &str| -> u64 { number(&line, name) };
    let claimed = field("claimed");
    assert!(claimed > 0, "{line}");
    assert_eq!(field("got_min"), claimed, "{line}");
    assert_eq!(field("got_max"), claimed, "{line}");
    assert_eq!(field("ended_early"), 0, "{line}");
}

/// `holdfast bench --probe watch-tenants` (the binary): each quiet shop's
/// subscriber has its shop's tap, the 20 taps two readers (a Redis
/// connection each 16 taps), every subscriber gets its shop's claim, none
/// is ended early, and the taps and their readers are gone when the
/// subscribers leave.
#[tokio::test]
async fn the_watch_tenants_probe_gives_each_shop_a_tap_and_each_tap_its_event() {
    let database_url = fresh_database().await;
    let prefix = format!("--serve-arg=--redis-prefix=t{}", random_suffix());
    let fixed = "--probe watch-tenants --tenants 20 --duration 1 --clients 4 --connections 2 --no-baselines";
    let mut args: Vec<&str> = fixed.split(' ').collect();
    args.push(&prefix);
    let line = crate::helpers::bench_line(&args, &database_url, "probe: watch-tenants ").await;
    assert_eq!(field(&line, "subscribed"), "true", "{line}");
    let count = |name: &str| -> u64 { number(&line, name) };
    assert_eq!(count("taps"), 20, "{line}");
    assert_eq!(count("readers"), 2, "{line}");
    // The readers', and room for pooled connections opened meanwhile.
    assert!((2..=6).contains(&count("daemon_fds_added")), "{line}");
    assert_eq!(count("claimed"), 20, "{line}");
    assert_eq!(count("got_min"), 1, "{line}");
    assert_eq!(count("got_max"), 1, "{line}");
    assert_eq!(count("ended_early"), 0, "{line}");
    assert_eq!(count("taps_left"), 0, "{line}");
    assert_eq!(count("readers_left"), 0, "{line}");
}

/// `holdfast bench --probe tls,connections` (the binary): certificates
/// made, each workload and the no-op RPC answered over plaintext and TLS
/// in every turn, and the idle connections measured over both transports,
/// one descriptor each, none refused.
#[tokio::test]
async fn the_tls_probe_drives_both_transports_and_measures_their_connections() {
    let database_url = fresh_database().await;
    let prefix = format!("--serve-arg=--redis-prefix=t{}", random_suffix());
    let fixed = "--probe tls,connections --idle-connections 50 --duration 1 --clients 4 --connections 1 --no-baselines";
    let mut args: Vec<&str> = fixed.split(' ').collect();
    args.push(&prefix);
    let out = crate::helpers::bench_output(&args, &database_url).await;
    let lines =
        |prefix: &str| -> Vec<&str> { out.lines().filter(|l| l.starts_with(prefix)).collect() };
    let runs = lines("probe: tls-run ");
    // Three turns of claim-hot and the no-op, each over both transports.
    assert_eq!(runs.len(), 12, "{out}");
    for run in &runs {
        assert_eq!(number::<u64>(run, "errors"), 0, "{run}");
        assert!(number::<f64>(run, "rps") > 0.0, "{run}");
    }
    for transport in ["plain", "tls"] {
        let found = runs.iter().filter(|r| field(r, "transport") == transport);
        assert_eq!(found.count(), 6, "{out}");
    }
    let summaries = lines("probe: tls ");
    assert_eq!(summaries.len(), 2, "{out}");
    for summary in &summaries {
        assert!(number::<f64>(summary, "rps_tls") > 0.0, "{summary}");
    }
    let connections = lines("probe: connections ");
    let transports: Vec<&str> = connections.iter().map(|l| field(l, "transport")).collect();
    assert_eq!(transports, ["plain", "tls"], "{out}");
    for line in &connections {
        assert_eq!(number::<u64>(line, "idle"), 50, "{line}");
        let per: f64 = number(line, "fds_per_connection");
        assert!((0.95..=1.05).contains(&per), "{line}");
        assert_eq!(number::<u64>(line, "errors"), 0, "{line}");
    }
}

/// The value of `name=` in a bench line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{name} in {line}"))
}

/// The value of `name=` in a bench line, as a number.
fn number<T: std::str::FromStr>(line: &str, name: &str) -> T {
    field(line, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number in {line}"))
}

/// `holdfast bench --listings` lists the bench's cards on other channels,
/// whose satellites would be told of every sale: a workspace with a
/// satellite on one of them is refused, naming it, before a card is
/// engaged.
#[tokio::test]
async fn the_listings_option_refuses_a_workspace_with_a_satellite_on_its_channels() {
    let app = crate::helpers::spawn_app().await;
    let _ebay = crate::cards::satellite(&app, "ebay").await;
    let addr = format!("http://{}", app.addr);
    let args = [
        "--addr",
        &addr,
        "--workload",
        "lock-complete",
        "--listings",
        "3",
        "--duration",
        "1",
        "--no-baselines",
    ];
    let out = crate::helpers::bench_run(&args, &app.database_url).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ebay") && stderr.contains("--listings 1"),
        "{stderr}"
    );
    let cards: i64 = sqlx::query_scalar("SELECT count(*) FROM cards")
        .fetch_one(&app.pg)
        .await
        .unwrap();
    assert_eq!(cards, 0, "nothing was engaged");
    app.shutdown().await;
}
