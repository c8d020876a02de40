//! A take whose Redis call times out may still run in Redis: the request
//! was sent, only its answer is late. The fallback must not then answer
//! "sold out" for it, which nothing would ever correct; the caller is told
//! UNAVAILABLE, and its retry finds what Redis did.

use std::time::{Duration, Instant};

use holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient;
use holdfast::grpc::pb::{self, Outcome};
use tonic::Code;
use tonic::transport::Channel;

use crate::TempDir;
use crate::cluster::{Daemon, Net, Postgres, Proxy, Redis};

fn claim(id: &str) -> pb::ClaimRequest {
    pb::ClaimRequest {
        claim_id: id.into(),
        sale_id: "s".into(),
        customer_id: String::new(),
        lines: vec![pb::ClaimLine {
            product_id: "p".into(),
            quantity: 1,
        }],
    }
}

/// What sale `s` counts sold of `p`.
async fn sold(flash: &mut FlashSaleServiceClient<Channel>) -> i64 {
    let sale = flash
        .get_sale(pb::GetSaleRequest {
            sale_id: "s".into(),
            product_ids: vec!["p".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .sale
        .unwrap();
    sale.products[0].sold
}

/// Creates sale `s`, live now, of two units of `p`.
async fn sale_of_two(flash: &mut FlashSaleServiceClient<Channel>) {
    flash
        .create_sale(crate::live_sale("s", &[("p", 2)]))
        .await
        .unwrap();
}

/// Waits until the daemon's circuit in front of Redis reads `open`.
pub(crate) async fn circuit_is(daemon: &Daemon, open: bool) {
    let line = format!("holdfast_redis_circuit_open {}", u8::from(open));
    let started = Instant::now();
    while !daemon.scrape().await.lines().any(|l| l == line) {
        assert!(started.elapsed() < Duration::from_secs(10), "never {line}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_redis_ran_after_its_timeout_is_never_answered_sold_out() {
    let tmp = TempDir::new("in-flight");
    let dir = tmp.0.clone();
    let redis = Redis::start(&dir);
    let pg = Postgres::start(&dir);
    let proxy = Proxy::start(redis.port).await;
    let daemon = Daemon::start(&dir, proxy.port, &pg.url());
    let channel = daemon.channel().await;
    let mut flash = FlashSaleServiceClient::new(channel);
    sale_of_two(&mut flash).await;
    let first = flash.claim(claim("c0")).await.unwrap().into_inner();
    assert_eq!(first.outcome(), Outcome::Ok);
    // The refiller hands Redis the last unit too: the fallback has none.
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let started = Instant::now();
    loop {
        let granted: i64 =
            sqlx::query_scalar("SELECT granted - returned FROM pools WHERE pool_id = 'sale/s/p'")
                .fetch_one(&db)
                .await
                .unwrap();
        if granted == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "granted {granted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every chunk to and from Redis now waits 700 ms, past the daemon's
    // 300 ms timeout: Redis sells the last unit to c1, and the answer
    // comes too late.
    // (A background job's call may time out first and open the circuit;
    // c1 then goes to the fallback alone, never reaches Redis, and "sold
    // out" is the truth.)
    proxy.set(Net::Slow { delay_ms: 700 });
    let answer = flash.claim(claim("c1")).await;
    let answered_at = chrono::Utc::now().timestamp_millis();
    let sold_out = match &answer {
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            false
        }
        Ok(r) => r.get_ref().outcome() == Outcome::SoldOut,
    };
    if !sold_out {
        // Still slow, the circuit opens, and a retry goes to the fallback
        // alone: it must not refuse an id Redis may have served.
        circuit_is(&daemon, true).await;
        match flash.claim(claim("c1")).await {
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
            Ok(r) => panic!("the fallback alone answered {r:?}"),
        }
    }
    proxy.set(Net::Clean);

    // Its retry, once the circuit is closed again (while it is open, the
    // answer is UNAVAILABLE, as above), finds the sale Redis made, if
    // Redis made it.
    circuit_is(&daemon, false).await;
    let started = Instant::now();
    let retried = loop {
        match flash.claim(claim("c1")).await {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::Unavailable => {
                assert!(started.elapsed() < Duration::from_secs(10), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    if sold_out && retried.outcome() == Outcome::Ok {
        // Then the sale is the retry's own, made after that answer.
        let at = retried.claimed_at.unwrap();
        let at_ms = at.seconds * 1000 + i64::from(at.nanos / 1_000_000);
        assert!(
            at_ms > answered_at,
            "c1 was answered sold out at {answered_at} but sold at {at_ms}"
        );
    }

    // What each claim was last told is what was sold: the audit log has a
    // sale for exactly the ids told OK (c1's retry would be told OK had
    // Redis sold it in the call that timed out).
    let told_ok: Vec<&str> = match retried.outcome() {
        Outcome::Ok => vec!["c0", "c1"],
        _ => vec!["c0"],
    };
    let started = Instant::now();
    let sold = loop {
        let sold: Vec<String> = sqlx::query_scalar(
            "SELECT hold_id FROM audit_log WHERE kind = 'claimed' ORDER BY hold_id",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        if sold.len() >= 2 || started.elapsed() > Duration::from_secs(5) {
            break sold;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sold, told_ok, "first answer {answer:?}, retry {retried:?}");
    drop(daemon);
}

/// The other way round: a claim the fallback served while Redis was
/// frozen, retried once Redis is back and sold out, repeats its answer.
/// Redis never saw its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_fallback_served_is_not_refused_by_redis_after() {
    let tmp = TempDir::new("fallback-served");
    let dir = tmp.0.clone();
    let redis = Redis::start(&dir);
    let pg = Postgres::start(&dir);
    let daemon = Daemon::start(&dir, redis.port, &pg.url());
    let channel = daemon.channel().await;
    let mut flash = FlashSaleServiceClient::new(channel);
    sale_of_two(&mut flash).await;

    // Once the circuit is open, c1 goes to the fallback alone (sent to a
    // frozen Redis, it would run there at the thaw: twins, which the
    // drainer settles).
    redis.freeze();
    circuit_is(&daemon, true).await;
    let served = flash.claim(claim("c1")).await.unwrap().into_inner();
    assert_eq!(served.outcome(), Outcome::Ok, "the fallback serves it");
    redis.thaw();
    circuit_is(&daemon, false).await;

    // Redis sells the other unit, and learns there is no more.
    let other = flash.claim(claim("c2")).await.unwrap().into_inner();
    assert_eq!(other.outcome(), Outcome::Ok);
    let none = flash.claim(claim("c3")).await.unwrap().into_inner();
    assert_eq!(none.outcome(), Outcome::SoldOut);

    let retried = flash.claim(claim("c1")).await.unwrap().into_inner();
    assert_eq!(retried, served, "the retry repeats the fallback's answer");
    drop(daemon);
}

/// A daemon whose Redis is frozen with the tenant's two calls in flight
/// (claims c1 and c2 of sale `s`, ten units of `p`, after c0 was sold):
/// a claim made now queues behind them until [`Redis::thaw`].
struct Frozen {
    _tmp: TempDir,
    redis: Redis,
    _pg: Postgres,
    daemon: Daemon,
    flash: FlashSaleServiceClient<Channel>,
    in_flight: Vec<Sent>,
}

/// A claim on its way, answered when awaited.
type Sent = tokio::task::JoinHandle<Result<tonic::Response<pb::ClaimResponse>, tonic::Status>>;

/// Sends `request` on a task of its own.
fn send(
    flash: &FlashSaleServiceClient<Channel>,
    request: impl tonic::IntoRequest<pb::ClaimRequest> + Send + 'static,
) -> Sent {
    let mut flash = flash.clone();
    tokio::spawn(async move { flash.claim(request).await })
}

/// Creates sale `s`, live now, of `cap` units of `p`, and sells one to
/// `c0`.
async fn sale_with_one_sold(flash: &mut FlashSaleServiceClient<Channel>, cap: i64) {
    flash
        .create_sale(crate::live_sale("s", &[("p", cap)]))
        .await
        .unwrap();
    let first = flash.claim(claim("c0")).await.unwrap().into_inner();
    assert_eq!(first.outcome(), Outcome::Ok);
}

/// Claims `ids` one after the other, 200 ms apart (together, they would
/// go as one call): each goes at once, and is left on its way.
async fn one_after_another(flash: &FlashSaleServiceClient<Channel>, ids: &[&str]) -> Vec<Sent> {
    let mut sent = Vec::new();
    for id in ids {
        sent.push(send(flash, claim(id)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sent
}

async fn two_claims_in_a_frozen_redis(name: &str) -> Frozen {
    let tmp = TempDir::new(name);
    let dir = tmp.0.clone();
    let redis = Redis::start(&dir);
    let pg = Postgres::start(&dir);
    // Redis's calls wait out the freeze without opening the circuit.
    let timeout = Duration::from_secs(10);
    let daemon = Daemon::start_with_redis_timeout(&dir, redis.port, &pg.url(), timeout);
    let mut flash = FlashSaleServiceClient::new(daemon.channel().await);
    sale_with_one_sold(&mut flash, 10).await;
    redis.freeze();
    let in_flight = one_after_another(&flash, &["c1", "c2"]).await;
    Frozen {
        _tmp: tmp,
        redis,
        _pg: pg,
        daemon,
        flash,
        in_flight,
    }
}

/// A claim whose caller gave up while it queued (its deadline passed
/// behind the tenant's two calls in flight, which a frozen Redis holds) is
/// never sent: nothing is sold to a checkout that was told its call
/// failed. The RPC is counted CANCELLED. Sent, it would have sold a unit
/// that only a retry by id would find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_caller_left_while_it_queued_sells_nothing() {
    let mut frozen = two_claims_in_a_frozen_redis("abandoned").await;
    // The third queues behind them, and its caller leaves at 200 ms.
    let mut gives_up = tonic::Request::new(claim("c3"));
    gives_up.set_timeout(Duration::from_millis(200));
    let left = frozen.flash.claim(gives_up).await.unwrap_err();
    assert!(
        matches!(left.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{left:?}"
    );
    frozen.redis.thaw();
    for call in frozen.in_flight.drain(..) {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.outcome(), Outcome::Ok);
    }

    // c1's and c2's slots are free: had c3 been kept, it went then.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sold = sold(&mut frozen.flash).await;
    assert_eq!(sold, 3, "c0, c1 and c2; not c3, whose caller had left");
    let metrics = frozen.daemon.scrape().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("holdfast_rpc_total{")
            && l.contains("method=\"Claim\"")
            && l.contains("code=\"CANCELLED\"")
            && l.ends_with(" 1")),
        "the call that was given up is counted:\n{metrics}"
    );
    drop(frozen);
}

/// A claim whose deadline would pass before Redis could answer it is
/// answered DEADLINE_EXCEEDED unsent, while its caller still waits: the
/// last call took the freeze's length, and the claim's deadline is closer
/// than twice that. A claim queued beside it without a deadline goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_cannot_be_answered_in_time_is_not_sent() {
    let mut frozen = two_claims_in_a_frozen_redis("doomed").await;
    // Both queue behind the two in flight: c3 with 3 s to go, c4 with no
    // deadline.
    let mut hurried = tonic::Request::new(claim("c3"));
    hurried.set_timeout(Duration::from_secs(3));
    let c3 = send(&frozen.flash, hurried);
    let c4 = send(&frozen.flash, claim("c4"));
    // Thawed after ~1.6 s frozen, c3 has ~1.8 s left, less than twice
    // what c1's call took.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    frozen.redis.thaw();
    for call in frozen.in_flight.drain(..) {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.outcome(), Outcome::Ok);
    }
    let refused = c3.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    let answered = c4.await.unwrap().unwrap().into_inner();
    assert_eq!(answered.outcome(), Outcome::Ok);

    assert_eq!(
        sold(&mut frozen.flash).await,
        4,
        "c0, c1, c2 and c4; c3 was not sent"
    );
    // Its retry by id, with time to spare, is served.
    let retried = frozen.flash.claim(claim("c3")).await.unwrap().into_inner();
    assert_eq!(retried.outcome(), Outcome::Ok);
    assert_eq!(sold(&mut frozen.flash).await, 5);
    drop(frozen);
}

/// The ids the fallback has taken, in order.
async fn fallback_took(db: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT hold_id FROM pg_holds ORDER BY hold_id")
        .fetch_all(db)
        .await
        .unwrap()
}

/// The same through the Postgres fallback, whose crowd's knee is lower
/// than Redis's: with Redis frozen and the circuit open, four claims hold
/// the fallback's four transactions on a locked table; a claim queued
/// behind them whose deadline is closer than twice what their
/// transactions took is answered DEADLINE_EXCEEDED and never taken, and a
/// claim beside it without a deadline is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_claim_that_cannot_be_answered_in_time_is_not_taken() {
    let tmp = TempDir::new("fallback-doomed");
    let dir = tmp.0.clone();
    let redis = Redis::start(&dir);
    let pg = Postgres::start(&dir);
    let daemon = Daemon::start(&dir, redis.port, &pg.url());
    let mut flash = FlashSaleServiceClient::new(daemon.channel().await);
    sale_with_one_sold(&mut flash, 100).await;
    redis.freeze();
    circuit_is(&daemon, true).await;

    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut blocker = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE pg_holds IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // Each its own transaction, each waiting.
    let in_flight = one_after_another(&flash, &["c1", "c2", "c3", "c4"]).await;
    let mut hurried = tonic::Request::new(claim("c5"));
    hurried.set_timeout(Duration::from_secs(3));
    let c5 = send(&flash, hurried);
    let c6 = send(&flash, claim("c6"));
    // Released after ~2 s held, c1's transaction took ~2 s and c4's
    // ~1.4 s; c5 has ~1.8 s left, less than twice either.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    blocker.rollback().await.unwrap();
    for call in in_flight {
        let answer = call.await.unwrap().unwrap().into_inner();
        assert_eq!(answer.outcome(), Outcome::Ok);
    }
    let refused = c5.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("postgres"), "{refused:?}");
    let answered = c6.await.unwrap().unwrap().into_inner();
    assert_eq!(answered.outcome(), Outcome::Ok);
    assert_eq!(
        fallback_took(&db).await,
        ["c1", "c2", "c3", "c4", "c6"],
        "c5 was not taken"
    );

    // Its retry by id, with time to spare, is.
    let retried = flash.claim(claim("c5")).await.unwrap().into_inner();
    assert_eq!(retried.outcome(), Outcome::Ok);
    assert_eq!(fallback_took(&db).await.len(), 6);
    redis.thaw();
    drop(daemon);
}
