//! Every transaction that writes several pool rows takes its tenant's pool
//! lock first (store/postgres/pools.rs `lock_tenant_pools`), so the
//! drainer's write-back and grants (alone) and the fallback's takes and
//! commits (together, in pool order) never deadlock. Deadlocks only show
//! under load, so this runs the four side by side, many times, on rows
//! laid out against pool order, with holds whose lines run against it.
//! The same lock is where the drainer and the fallback meet over a hold
//! id that reached both stores.

use std::time::Duration;

use holdfast::domain::{Event, EventLine, HoldId, Job, Line, Lines, PoolId, Quantity, TenantId};
use holdfast::store::HoldReply;
use holdfast::store::postgres::{PgStore, PgTake};

use crate::helpers::spawn_app;

const POOLS: usize = 100;
const ROUNDS: usize = 12;

/// A claim `hold_id` of a unit from each of `pools`, as Redis logs it.
fn claimed(event_id: String, hold_id: &str, pools: &[PoolId]) -> Event {
    Event {
        event_id,
        kind: "claimed".into(),
        job: "flash".into(),
        hold_id: hold_id.into(),
        lines: pools
            .iter()
            .map(|p| EventLine {
                pool: p.as_str().into(),
                qty: 1,
                epoch: 1,
            })
            .collect(),
        reference: String::new(),
        order_id: String::new(),
        customer: String::new(),
        at: chrono::Utc::now(),
    }
}

/// One fallback take of a unit from each of `pools`, in their order: a
/// claim, or with a `ttl` a hold.
fn take_all(id: String, pools: &[PoolId], ttl: Option<Duration>) -> PgTake {
    let lines = pools
        .iter()
        .map(|p| Line {
            pool: p.clone(),
            quantity: Quantity::parse("quantity", 1, 1_000).unwrap(),
        })
        .collect();
    PgTake {
        id: HoldId::parse("id", &id, 128).unwrap(),
        job: Job::Flash,
        lines: Lines::parse("lines", lines, POOLS).unwrap(),
        ttl,
        reference: String::new(),
    }
}

/// A migrated database with the dev tenant and no daemon on it. These
/// tests drive the store directly: a running daemon would find their
/// pools granted in Postgres and absent from its Redis, take them for
/// lost, and open new epochs.
async fn quiet_database() -> sqlx::PgPool {
    let app = spawn_app().await;
    let pg = app.pg.clone();
    app.shutdown().await;
    pg
}

#[tokio::test]
async fn pool_writers_of_one_tenant_never_deadlock() {
    let db = quiet_database().await;
    let dev = TenantId::parse("dev").unwrap();
    // Inserted last id first: a statement that visits rows as they lie on
    // disk visits them against pool order.
    sqlx::query(
        "INSERT INTO pools (tenant, pool_id, job, capacity)
         SELECT 'dev', 'w/' || lpad(g::text, 3, '0'), 'flash', 1000000 FROM generate_series($1, 1, -1) g",
    )
    .bind(POOLS as i32)
    .execute(&db)
    .await
    .unwrap();
    let pools: Vec<PoolId> = (1..=POOLS)
        .map(|i| PoolId::from_store(format!("w/{i:03}")))
        .collect();

    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let (pg, dev, pools) = (PgStore::from_pool(db.clone()), dev.clone(), pools.clone());
        tasks.spawn(async move {
            for round in 0..ROUNDS {
                let done = match writer % 4 {
                    // The drainer recording a batch that sold from every pool.
                    0 => pg
                        .record_events(
                            &dev,
                            &[claimed(format!("{}-{round}", 1_000 + writer), "h", &pools)],
                        )
                        .await
                        .map(|_| ()),
                    // A grant of one unit to every pool, asked in reverse.
                    1 => {
                        let asks: Vec<(&PoolId, i64, i64)> =
                            pools.iter().rev().map(|p| (p, 1, 1)).collect();
                        pg.grant(&dev, &asks)
                            .await
                            .map(|g| assert_eq!(g.len(), POOLS))
                    }
                    // A fallback claim of one unit from every pool.
                    2 => pg
                        .fallback_take(&dev, &take_all(format!("f{writer}-{round}"), &pools, None))
                        .await
                        .map(|r| assert!(matches!(r, HoldReply::Hold(_)), "{r:?}")),
                    // A fallback hold on every pool, in reverse, then its
                    // commit.
                    _ => {
                        let id = format!("h{writer}-{round}");
                        let reversed: Vec<PoolId> = pools.iter().rev().cloned().collect();
                        let hold = take_all(id.clone(), &reversed, Some(Duration::from_secs(60)));
                        let held = pg.fallback_take(&dev, &hold).await;
                        assert!(matches!(held, Ok(HoldReply::Hold(_))), "{held:?}");
                        let id = HoldId::parse("id", &id, 128).unwrap();
                        pg.fallback_commit(&dev, &id, Job::Flash, "o")
                            .await
                            .map(|r| assert!(matches!(r, HoldReply::Hold(_)), "{r:?}"))
                    }
                };
                done.unwrap_or_else(|e| panic!("writer {writer}, round {round}: {e}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a writer failed");
    }

    // Each wrote every pool exactly as often as it ran; the fallback's
    // claims and its commits both sold.
    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT reported_sold, granted, sold_pg, held_pg FROM pools WHERE tenant = 'dev' AND pool_id LIKE 'w/%'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let each = (2 * ROUNDS) as i64;
    assert_eq!(rows.len(), POOLS);
    assert!(
        rows.iter().all(|r| *r == (each, each, 2 * each, 0)),
        "{:?}",
        rows[0]
    );
}

/// The write-back takes no row lock before it writes, so a pool's epoch
/// can move between its statement's snapshot and its write. It must then
/// count the report against the epoch it finds on the row: a report for
/// the epoch just closed takes units out of doubt rather than adding to
/// the new epoch's sales.
#[tokio::test]
async fn a_write_back_racing_a_new_epoch_counts_against_the_epoch_it_meets() {
    let db = quiet_database().await;
    let dev = TenantId::parse("dev").unwrap();
    let pool = PoolId::from_store("e/1".into());
    sqlx::query(
        "INSERT INTO pools (tenant, pool_id, job, capacity, granted) VALUES ('dev', 'e/1', 'flash', 100, 10)",
    )
    .execute(&db)
    .await
    .unwrap();

    // Redis is lost: a new epoch opens (as `open_epoch` does), and holds
    // its row until it commits.
    let mut opening = db.begin().await.unwrap();
    sqlx::query(
        "UPDATE pools SET epoch = epoch + 1, in_doubt = in_doubt + granted - returned - reported_sold,
             sold_prior = sold_prior + reported_sold, granted = 0, returned = 0, reported_sold = 0
         WHERE tenant = 'dev' AND pool_id = 'e/1'",
    )
    .execute(&mut *opening)
    .await
    .unwrap();

    // Meanwhile the drainer records a unit sold in epoch 1, and waits for
    // the row.
    let pg = PgStore::from_pool(db.clone());
    let recording = tokio::spawn({
        let (dev, pool) = (dev.clone(), pool.clone());
        async move {
            pg.record_events(&dev, &[claimed("1-1".into(), "h", &[pool])])
                .await
        }
    });
    // Until the write-back waits for the row.
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'UPDATE pools p SET%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            !recording.is_finished(),
            "the write-back did not wait for the row"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    opening.commit().await.unwrap();
    recording.await.unwrap().unwrap();

    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT epoch, reported_sold, sold_prior, in_doubt FROM pools WHERE tenant = 'dev' AND pool_id = 'e/1'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        row,
        (2, 0, 1, 9),
        "(epoch, reported_sold, sold_prior, in_doubt)"
    );
}

/// A claim that reached both stores (Redis served it, the caller, unsure,
/// retried while Redis was unreachable, and the fallback served it too) is
/// sold once, however the drainer's recording of Redis's claim and the
/// fallback's take interleave: the fallback refuses an id the drainer has
/// recorded, and the drainer undoes a fallback claim it finds. The drainer
/// takes no lock per hold id for this (`audit.rs` `twins`): both sides
/// meet at the tenant's pool lock, so this races them, many times.
#[tokio::test]
async fn a_claim_the_drainer_records_as_the_fallback_serves_it_is_sold_once() {
    const CLAIMS: usize = 400;
    let db = quiet_database().await;
    let dev = TenantId::parse("dev").unwrap();
    sqlx::query("INSERT INTO pools (tenant, pool_id, job, capacity) VALUES ('dev', 't/1', 'flash', 1000000)")
        .execute(&db)
        .await
        .unwrap();
    let pool = [PoolId::from_store("t/1".into())];

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLAIMS {
        let id = format!("twin-{i}");
        let (pg, tenant) = (PgStore::from_pool(db.clone()), dev.clone());
        let recorded = claimed(format!("{}-1", i + 1), &id, &pool);
        tasks.spawn(async move {
            pg.record_events(&tenant, &[recorded])
                .await
                .unwrap_or_else(|e| panic!("recording a claim: {e}"));
            None
        });
        let (pg, tenant) = (PgStore::from_pool(db.clone()), dev.clone());
        let take = take_all(id.clone(), &pool, None);
        tasks.spawn(async move {
            match pg.fallback_take(&tenant, &take).await {
                Ok(HoldReply::Hold(_)) => Some(true),
                Err(holdfast::error::Error::Unavailable(m)) if m.contains("fast path") => {
                    Some(false)
                }
                other => panic!("the fallback's take of {id}: {other:?}"),
            }
        });
    }
    let (mut served, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.expect("a task failed") {
            Some(true) => served += 1,
            Some(false) => refused += 1,
            None => {}
        }
    }

    // Every fallback claim the drainer found is undone, so the pool counts
    // Redis's sales alone, each once.
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_holds WHERE tenant = 'dev' AND hold_id LIKE 'twin-%' AND state <> 'D'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let (reported, sold_pg): (i64, i64) = sqlx::query_as(
        "SELECT reported_sold, sold_pg FROM pools WHERE tenant = 'dev' AND pool_id = 't/1'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (left, reported, sold_pg),
        (0, CLAIMS as i64, 0),
        "fallback claims still standing, sold through Redis, sold through the fallback \
         ({served} served by the fallback, {refused} refused)"
    );
}
