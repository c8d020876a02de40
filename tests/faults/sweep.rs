//! Promise 3 while Postgres hangs: the sweeper finalises Redis's expired
//! holds (state, `expired` event) within its bound though every read of
//! Postgres waits out the pool's timeout. It waited on Postgres in its own
//! loop (the tenant list, the fallback's due holds), 5 s at a time.

use std::time::{Duration, Instant};

use holdfast::gate::Gate;
use holdfast::grpc::pb;
use holdfast::grpc::pb::reservation_service_client::ReservationServiceClient;

use crate::TempDir;
use crate::cluster::{Daemon, Postgres, Redis};
use crate::twins::{reserve_mug, stock_five_mugs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_on_time_while_postgres_hangs() {
    let tmp = TempDir::new("pg-hangs");
    let redis = Redis::start(&tmp.0);
    let pg = Postgres::start(&tmp.0);
    let gate = Gate::start(&format!("127.0.0.1:{}", pg.port))
        .await
        .unwrap();
    let via_gate = format!("postgres://postgres@127.0.0.1:{}/holdfast", gate.port);
    let daemon = Daemon::start(&tmp.0, redis.port, &via_gate);
    let mut r = ReservationServiceClient::new(daemon.channel().await);
    stock_five_mugs(&mut r).await;

    // Postgres stops answering; Redis serves from its grant.
    gate.set(false);
    let held = r.reserve(reserve_mug("r1", 1)).await.unwrap().into_inner();
    assert_eq!(held.outcome(), pb::ReserveOutcome::Reserved);
    let expires = held.reservation.unwrap().expires_at.unwrap();
    let expires_ms = expires.seconds * 1000 + i64::from(expires.nanos / 1_000_000);

    // The `expired` event appears in the stream, from the sweeper alone
    // (nothing calls about r1): within the promise's second, with room
    // for a busy machine, and well short of the 5 s a wait on Postgres
    // took.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    let expired_at = loop {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg("hf:{dev}:events")
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .unwrap();
        let found = entries.iter().find(|(_, f)| {
            f.windows(2).any(|w| w[0] == "k" && w[1] == "expired")
                && f.windows(2).any(|w| w[0] == "h" && w[1].ends_with("r1"))
        });
        if let Some((id, _)) = found {
            break id.split('-').next().unwrap().parse::<i64>().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "r1 never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    gate.set(true);
    let late = expired_at - expires_ms;
    assert!(late < 3_000, "r1 was finalised {late} ms after its expiry");
    drop(daemon);
}
