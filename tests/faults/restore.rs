//! Redis restored with older data: a backup, an older AOF, a replica
//! promoted with less than its primary had. Its sales since that point are
//! gone from it while Postgres heard of them, so selling its old counts
//! again would sell those units twice. The daemon notices that Redis is
//! another process (the marker holds the run id of the one it was left
//! with), checks every pool, and puts what Redis was granted and may have
//! sold in doubt instead.

use std::time::{Duration, Instant};

use holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient;
use holdfast::grpc::pb::{self, Outcome};
use tonic::transport::Channel;

use crate::TempDir;
use crate::cluster::{Daemon, Postgres, Redis};

/// The sale's cap.
const CAP: i64 = 100;

/// Claims one tee under `id`, retrying while the daemon answers
/// UNAVAILABLE: true when it sold, false when sold out.
async fn claim(flash: &mut FlashSaleServiceClient<Channel>, id: &str) -> bool {
    let started = Instant::now();
    loop {
        let r = flash
            .claim(pb::ClaimRequest {
                claim_id: id.into(),
                sale_id: "drop".into(),
                customer_id: String::new(),
                lines: vec![pb::ClaimLine {
                    product_id: "tee".into(),
                    quantity: 1,
                }],
            })
            .await;
        match r {
            Ok(r) => return r.into_inner().outcome() == Outcome::Ok,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{id}: {e:?}");
                assert!(started.elapsed() < Duration::from_secs(20), "{id}: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The pool's row in Postgres: (reported_sold, in_doubt, epoch).
async fn pool_row(db: &sqlx::PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT reported_sold, in_doubt, epoch FROM pools WHERE pool_id = 'sale/drop/tee'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Waits until `f` holds of the pool's row.
async fn until(db: &sqlx::PgPool, what: &str, f: impl Fn((i64, i64, i64)) -> bool) {
    let started = Instant::now();
    while !f(pool_row(db).await) {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never {what}: {:?}",
            pool_row(db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_restored_with_older_data_does_not_sell_its_lost_sales_again() {
    let tmp = TempDir::new("restore");
    let mut redis = Redis::start(&tmp.0);
    let pg = Postgres::start(&tmp.0);
    let daemon = Daemon::start(&tmp.0, redis.port, &pg.url());
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut flash = FlashSaleServiceClient::new(daemon.channel().await);
    flash
        .create_sale(crate::live_sale("drop", &[("tee", CAP)]))
        .await
        .unwrap();

    // Five sold, written back; Redis's data is copied; five more sold and
    // written back. Redis then comes back from the copy: it has sold five
    // of its grant where Postgres heard of ten.
    let mut sold = 0;
    for i in 0..5 {
        sold += i64::from(claim(&mut flash, &format!("a{i}")).await);
    }
    until(&db, "five written back", |(reported, ..)| reported == 5).await;
    let snapshot = redis.snapshot();
    for i in 0..5 {
        sold += i64::from(claim(&mut flash, &format!("b{i}")).await);
    }
    assert_eq!(sold, 10);
    until(&db, "ten written back", |(reported, ..)| reported == 10).await;
    let (_, _, epoch) = pool_row(&db).await;
    redis.kill_and_restore(&snapshot);
    until(&db, "the lost epoch closed", |(_, _, e)| e > epoch).await;
    let (_, in_doubt, _) = pool_row(&db).await;
    assert!(in_doubt > 0, "what Redis may have sold is in doubt");

    // Selling out now sells what is left, and nothing twice.
    let mut n = 0;
    while claim(&mut flash, &format!("c{n}")).await {
        sold += 1;
        n += 1;
        assert!(sold <= CAP, "sold {sold} of a cap of {CAP}");
    }
    assert_eq!(sold + in_doubt, CAP, "every unit sold or in doubt");
}
