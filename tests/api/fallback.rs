//! The Postgres fallback's batched takes (store/postgres/fallback/take.rs):
//! takes gathered into one transaction answer exactly as if each had run
//! alone, in order. The fault suite drives the same path end to end with
//! Redis frozen; these pin down the batch's own rules.

use holdfast::domain::{HoldId, Job, Line, Lines, PoolId, Quantity, TenantId};
use holdfast::error::Error;
use holdfast::grpc::pb::Outcome;
use holdfast::store::HoldReply;
use holdfast::store::postgres::{PgStore, PgTake, product_pool};

use crate::helpers::{TestApp, cart_hold, claim, live_sale_request, spawn_app_with, with_key};

pub(crate) fn take(id: &str, lines: &[(&PoolId, i64)], ttl_secs: Option<u64>) -> PgTake {
    let lines = lines
        .iter()
        .map(|(pool, q)| Line {
            pool: (*pool).clone(),
            quantity: Quantity::parse("quantity", *q, 1_000).unwrap(),
        })
        .collect();
    PgTake {
        id: HoldId::parse("id", id, 128).unwrap(),
        job: Job::Flash,
        lines: Lines::parse("lines", lines, 100).unwrap(),
        ttl: ttl_secs.map(std::time::Duration::from_secs),
        reference: String::new(),
    }
}

/// What the fallback may still give from `pool` (the share never granted
/// to Redis, less what it sold or holds itself).
async fn fallback_free(pg: &sqlx::PgPool, pool: &PoolId) -> i64 {
    sqlx::query_scalar(
        "SELECT capacity - sold_pg - held_pg - sold_prior - in_doubt - (granted - returned)
         FROM pools WHERE tenant = 'dev' AND pool_id = $1",
    )
    .bind(pool.as_str())
    .fetch_one(pg)
    .await
    .unwrap()
}

async fn pg_totals(pg: &sqlx::PgPool, pool: &PoolId) -> (i64, i64) {
    sqlx::query_as("SELECT sold_pg, held_pg FROM pools WHERE tenant = 'dev' AND pool_id = $1")
        .bind(pool.as_str())
        .fetch_one(pg)
        .await
        .unwrap()
}

fn held_id(answer: &Result<HoldReply, Error>) -> Option<String> {
    match answer {
        Ok(HoldReply::Hold(h)) => Some(h.id.as_str().to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn a_batch_of_fallback_takes_answers_as_if_each_ran_alone_in_order() {
    // A grant of one unit at a time leaves most of each pool to Postgres.
    let app = spawn_app_with(|a| {
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
    })
    .await;
    app.live_sale("s", &[("p", Some(10)), ("q", Some(10))], 0)
        .await;
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let (p, q) = (product_pool("s", "p"), product_pool("s", "q"));
    let free = fallback_free(&app.pg, &p).await;
    assert!(free >= 4, "the fallback has units of p to give ({free})");
    let unknown = product_pool("s", "nope");

    // `free` - 1 claims of one unit, a two-line hold that fits p's last
    // unit, a claim that no longer fits, a repeat of the first id, a
    // reused id with another request, and a pool that does not exist.
    let mut takes: Vec<PgTake> = (0..free - 1)
        .map(|i| take(&format!("c{i}"), &[(&p, 1)], None))
        .collect();
    takes.push(take("two-lines", &[(&q, 2), (&p, 1)], Some(60)));
    takes.push(take("late", &[(&p, 1)], None));
    takes.push(take("c0", &[(&p, 1)], None));
    takes.push(take("c1", &[(&p, 2)], None));
    takes.push(take("lost", &[(&unknown, 1)], None));
    let answers = pg.fallback_takes(&dev, &takes).await.unwrap();
    assert_eq!(answers.len(), takes.len());

    let n = takes.len();
    for (i, a) in answers[..free as usize - 1].iter().enumerate() {
        assert_eq!(held_id(a), Some(format!("c{i}")), "claim c{i}: {a:?}");
    }
    assert_eq!(held_id(&answers[n - 5]).as_deref(), Some("two-lines"));
    match &answers[n - 4] {
        Ok(HoldReply::Short(s)) => {
            assert_eq!((s.len(), s[0].requested, s[0].available), (1, 1, 0));
        }
        other => panic!("the claim after the last unit is short, not {other:?}"),
    }
    assert_eq!(
        held_id(&answers[n - 3]).as_deref(),
        Some("c0"),
        "a repeated id replays its hold"
    );
    assert!(
        matches!(answers[n - 2], Ok(HoldReply::IdReused)),
        "{:?}",
        answers[n - 2]
    );
    assert!(
        matches!(answers[n - 1], Err(Error::NotFound(_))),
        "{:?}",
        answers[n - 1]
    );

    // Written once each: p sold free - 1 and holds 1, q holds 2, and one
    // audit row per take.
    assert_eq!(pg_totals(&app.pg, &p).await, (free - 1, 1));
    assert_eq!(pg_totals(&app.pg, &q).await, (0, 2));
    assert_eq!(fallback_free(&app.pg, &p).await, 0);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE tenant = 'dev' AND event_id LIKE 'f%' AND kind IN ('claimed', 'reserved')",
    )
    .fetch_one(&app.pg)
    .await
    .unwrap();
    assert_eq!(audited, free);

    // The whole batch again (every client retrying) changes nothing.
    let again = pg.fallback_takes(&dev, &takes).await.unwrap();
    for (i, a) in again[..free as usize - 1].iter().enumerate() {
        assert_eq!(held_id(a), Some(format!("c{i}")));
    }
    assert_eq!(held_id(&again[n - 5]).as_deref(), Some("two-lines"));
    assert_eq!(pg_totals(&app.pg, &p).await, (free - 1, 1));
    assert_eq!(pg_totals(&app.pg, &q).await, (0, 2));

    // The two-line hold's lines in another order are the same request;
    // other quantities are not. Nor does either take anything.
    let reordered = [
        take("two-lines", &[(&p, 1), (&q, 2)], Some(60)),
        take("two-lines", &[(&p, 1), (&q, 3)], Some(60)),
    ];
    let answers = pg.fallback_takes(&dev, &reordered).await.unwrap();
    assert_eq!(held_id(&answers[0]).as_deref(), Some("two-lines"));
    assert!(matches!(answers[1], Ok(HoldReply::IdReused)), "{answers:?}");
    // A hold an earlier build made remembers its lines as they came.
    sqlx::query("UPDATE pg_holds SET request = $1 WHERE hold_id = 'two-lines'")
        .bind(format!("{q}=2,{p}=1|flash|hold"))
        .execute(&app.pg)
        .await
        .unwrap();
    let answers = pg.fallback_takes(&dev, &takes[n - 5..n - 4]).await.unwrap();
    assert_eq!(held_id(&answers[0]).as_deref(), Some("two-lines"));
    assert_eq!(pg_totals(&app.pg, &p).await, (free - 1, 1));
    assert_eq!(pg_totals(&app.pg, &q).await, (0, 2));
    app.shutdown().await;
}

#[tokio::test]
async fn an_id_the_fast_path_served_is_not_taken_again_by_the_fallback() {
    let app = spawn_app_with(|a| {
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
    })
    .await;
    app.live_sale("s", &[("p", Some(10))], 0).await;
    let p = product_pool("s", "p");
    let served = app
        .flash()
        .claim(claim("once", "s", &[("p", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.outcome(), Outcome::Ok);
    app.eventually("the claim's audit row", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE hold_id = 'once' AND kind = 'claimed'",
        )
        .fetch_one(&app.pg)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;

    // The client retries through a Redis outage: the fallback must answer
    // "retry later", not sell a second unit for the same id.
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let answers = pg
        .fallback_takes(&dev, &[take("once", &[(&p, 1)], None)])
        .await
        .unwrap();
    assert!(
        matches!(&answers[0], Err(Error::Unavailable(m)) if m.contains("fast path")),
        "{:?}",
        answers[0]
    );
    // Nothing sold or held by the fallback, and no hold of its own for the
    // id. (Not "what the fallback may give is unchanged": with a grant of
    // one unit at a time the refiller may grant Redis its next unit
    // meanwhile.)
    assert_eq!(pg_totals(&app.pg, &p).await, (0, 0));
    let fallback_holds: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_holds WHERE hold_id = 'once'")
            .fetch_one(&app.pg)
            .await
            .unwrap();
    assert_eq!(fallback_holds, 0);

    // That look-up has an index to use (migrations/0008): without one, every
    // fallback take would scan the whole audit log. The log is made large
    // first, as a sale leaves it, and is not analysed, as autovacuum has
    // not yet analysed it right after the sale.
    sqlx::query(
        "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, at)
         SELECT 'dev', 'bulk-' || g, 'committed', 'flash', 'bulk-' || g, '[]', now()
         FROM generate_series(1, 50000) AS g",
    )
    .execute(&app.pg)
    .await
    .unwrap();
    let mut tx = app.pg.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        holdfast::store::postgres::SERVED_BY_FAST_PATH
    ))
    .bind("dev")
    // A batch's worth of ids, as the fallback asks.
    .bind((0..16).map(|i| format!("id{i}")).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("audit_log_takes"), "{plan}");
    // And by that index alone: a tenant's rows are most of the log, and
    // with the stats of a log that has just grown (here: never analysed)
    // the planner once ANDed the tenant's whole range into the look-up.
    assert!(!plan.contains("audit_log_tenant_event_id_key"), "{plan}");
    app.shutdown().await;
}

/// The sweeper asks each store once a round which tenants have holds due,
/// and sweeps only those (src/jobs/sweeper.rs): among two hundred idle
/// tenants, two stores' holds, in Redis and in the fallback, still end
/// within the promise.
#[tokio::test]
async fn every_tenants_due_holds_are_swept_among_many_idle_tenants() {
    const STORES: [&str; 2] = [
        "store-a:admin:key-for-store-a-admin",
        "store-b:admin:key-for-store-b-admin",
    ];
    let app = spawn_app_with(|a| {
        a.dev = false;
        a.api_keys = STORES.iter().map(|s| s.to_string()).collect();
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
    })
    .await;
    sqlx::query("INSERT INTO tenants (id) SELECT 'idle' || g FROM generate_series(1, 200) g")
        .execute(&app.pg)
        .await
        .unwrap();
    let pg = PgStore::from_pool(app.pg.clone());
    let mut redis_holds = Vec::new();
    for spec in STORES {
        let tenant = TenantId::parse(spec.split(':').next().unwrap()).unwrap();
        app.flash()
            .create_sale(with_key(live_sale_request("s", &[("p", Some(10))]), spec))
            .await
            .unwrap();
        let held = app
            .flash()
            .create_cart_hold(with_key(cart_hold("in-redis", "s", &[("p", 1)], 1), spec))
            .await
            .unwrap()
            .into_inner();
        let expires = held.hold.unwrap().expires_at.unwrap();
        redis_holds.push((
            tenant.clone(),
            expires.seconds * 1000 + i64::from(expires.nanos) / 1_000_000,
        ));
        let p = product_pool("s", "p");
        let answer = pg
            .fallback_take(&tenant, &take("in-postgres", &[(&p, 1)], Some(1)))
            .await;
        assert_eq!(
            held_id(&answer).as_deref(),
            Some("in-postgres"),
            "{answer:?}"
        );
    }

    for (tenant, expires_ms) in &redis_holds {
        let at: chrono::DateTime<chrono::Utc> = app
            .eventually(
                "the Redis hold's expired event in the audit log",
                async || {
                    sqlx::query_scalar(
                        "SELECT at FROM audit_log
                     WHERE tenant = $1 AND hold_id = 'in-redis' AND kind = 'expired'",
                    )
                    .bind(tenant.as_str())
                    .fetch_optional(&app.pg)
                    .await
                    .unwrap()
                },
            )
            .await;
        // Both times are Redis's: the promise is an end within 1 s of expiry.
        let lag_ms = at.timestamp_millis() - expires_ms;
        assert!(
            (0..=1000).contains(&lag_ms),
            "{tenant}: ended {lag_ms} ms after expiry"
        );
    }
    for (tenant, _) in &redis_holds {
        app.eventually("the fallback hold's end", async || {
            let state: String = sqlx::query_scalar(
                "SELECT state FROM pg_holds WHERE tenant = $1 AND hold_id = 'in-postgres'",
            )
            .bind(tenant.as_str())
            .fetch_one(&app.pg)
            .await
            .unwrap();
            (state == "E").then_some(())
        })
        .await;
        let held: i64 = sqlx::query_scalar(
            "SELECT held_pg FROM pools WHERE tenant = $1 AND pool_id = 'sale/s/p'",
        )
        .bind(tenant.as_str())
        .fetch_one(&app.pg)
        .await
        .unwrap();
        assert_eq!(held, 0, "{tenant}: the fallback hold gave its unit back");
    }
    app.shutdown().await;
}

/// A batch that sells nothing locks no pool row (fallback/take.rs,
/// `lock_pools`): after a sell-out the stampede's answers do not queue for
/// the pool's lock behind a transaction that holds it, and a batch that can
/// sell still takes the lock and sells exactly what is left.
#[tokio::test]
async fn a_sold_out_answer_waits_for_no_pool_lock() {
    let app = spawn_app_with(|a| {
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
    })
    .await;
    app.live_sale("s", &[("p", Some(6)), ("q", Some(6))], 0)
        .await;
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let (p, q) = (product_pool("s", "p"), product_pool("s", "q"));
    let free = fallback_free(&app.pg, &p).await;
    assert!(free >= 1, "the fallback has units of p to give ({free})");
    let all = pg
        .fallback_take(&dev, &take("all", &[(&p, free)], None))
        .await;
    assert_eq!(held_id(&all).as_deref(), Some("all"), "{all:?}");

    // Another transaction holds both pools' rows, as a long write would.
    let mut blocker = app.pg.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pools WHERE tenant = 'dev' AND pool_id = ANY($1) FOR UPDATE")
        .bind(vec![p.as_str(), q.as_str()])
        .execute(&mut *blocker)
        .await
        .unwrap();
    let guard = std::time::Duration::from_secs(30);
    let late = tokio::time::timeout(
        guard,
        pg.fallback_take(&dev, &take("late", &[(&p, 1)], None)),
    )
    .await
    .expect("a sold-out answer does not wait for the pool's lock");
    match late {
        Ok(HoldReply::Short(s)) => assert_eq!((s[0].requested, s[0].available), (1, 0)),
        other => panic!("the claim after the sell-out is short, not {other:?}"),
    }
    // A take that can sell waits for the lock, then sells.
    let (pg2, dev2, q2) = (pg.clone(), dev.clone(), q.clone());
    let selling = tokio::spawn(async move {
        pg2.fallback_take(&dev2, &take("q1", &[(&q2, 1)], None))
            .await
    });
    app.waiting_for_lock().await;
    assert!(
        !selling.is_finished(),
        "a take that sells waits for the lock"
    );
    blocker.rollback().await.unwrap();
    let sold = tokio::time::timeout(guard, selling).await.unwrap().unwrap();
    assert_eq!(held_id(&sold).as_deref(), Some("q1"), "{sold:?}");
    assert_eq!(
        pg_totals(&app.pg, &p).await,
        (free, 0),
        "nothing more of p sold"
    );
    app.shutdown().await;
}

/// A one-unit claim of `s`/`p` under `id`: its outcome.
async fn claim_one(app: &TestApp, id: &str) -> Outcome {
    app.flash()
        .claim(claim(id, "s", &[("p", 1)]))
        .await
        .unwrap()
        .into_inner()
        .outcome()
}

/// A fallback hold that expires after Redis was told its pool is full
/// frees its units for Redis too: claims sell them (promise 3, expired
/// holds never block), and no more than the capacity.
#[tokio::test]
async fn units_a_fallback_hold_gave_back_sell_again_through_redis() {
    let app = spawn_app_with(|a| {
        a.grant_chunk = 5;
        a.grant_max_chunk = 5;
    })
    .await;
    app.live_sale("s", &[("p", Some(10))], 0).await;
    let p = product_pool("s", "p");
    assert_eq!(claim_one(&app, "first").await, Outcome::Ok);

    // An outage's cart hold takes every unit Redis was not given, for 2 s.
    let free = fallback_free(&app.pg, &p).await;
    assert!(free > 0, "the fallback has units of p to give ({free})");
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let held = pg
        .fallback_take(&dev, &take("outage", &[(&p, free)], Some(2)))
        .await;
    assert_eq!(held_id(&held).as_deref(), Some("outage"));

    // Redis sells its grant, asks for more and hears the pool is full.
    let mut sold = 1;
    loop {
        match claim_one(&app, &format!("c{sold}")).await {
            Outcome::Ok => sold += 1,
            Outcome::SoldOut => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sold, 10 - free, "Redis sold what it was granted");

    // The hold expires and the fallback's sweeper gives it back: Redis
    // sells those units too, once each.
    app.eventually("the fallback hold given back", || async {
        (pg_totals(&app.pg, &p).await.1 == 0).then_some(())
    })
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut tries = 0;
    while claim_one(&app, &format!("after{tries}")).await != Outcome::Ok {
        tries += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the units given back never sold ({tries} tries)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut more = 1;
    while claim_one(&app, &format!("more{more}")).await == Outcome::Ok {
        more += 1;
    }
    assert_eq!(sold + more, 10, "sold out at the capacity, not before");
    app.shutdown().await;
}

/// A fallback hold past its expiry, not yet swept, holds nothing: a grant
/// planned meanwhile gives its unit to Redis (planned as taken, the pool
/// was loaded full and the claim answered sold out).
#[tokio::test]
async fn a_grant_counts_a_fallback_hold_past_its_expiry_as_free() {
    let app = spawn_app_with(|a| {
        a.grant_chunk = 1;
        a.grant_max_chunk = 1;
        // No sweeper round within the test: only the grant can see it.
        a.sweep_interval_ms = 600_000;
    })
    .await;
    app.live_sale("s", &[("p", Some(2))], 0).await;
    // Redis was granted one unit; the fallback holds the other for 1 s.
    let pg = PgStore::from_pool(app.pg.clone());
    let dev = TenantId::parse("dev").unwrap();
    let pool = product_pool("s", "p");
    let held = pg
        .fallback_takes(&dev, &[take("f1", &[(&pool, 1)], Some(1))])
        .await
        .unwrap();
    assert!(matches!(held[0], Ok(HoldReply::Hold(_))), "{held:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    let both = app.flash().claim(claim("c", "s", &[("p", 2)])).await;
    assert_eq!(both.unwrap().into_inner().outcome(), Outcome::Ok);
    app.shutdown().await;
}
