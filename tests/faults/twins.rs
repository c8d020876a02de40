//! Twins: one reservation id held by both the fallback and Redis. The
//! fallback serves an id while Redis is away; once Redis is back, a retry
//! that reaches a daemon which did not serve it (or a call that timed out
//! but ran in Redis later) makes a second hold under the id in Redis. The
//! drainer keeps one, and what the fallback's twin was told (an extension,
//! a consumption) must survive in the one it keeps.

use std::time::{Duration, Instant};

use holdfast::grpc::pb::reservation_service_client::ReservationServiceClient;
use holdfast::grpc::pb::{self, ReservationState};
use tonic::transport::Channel;

use crate::TempDir;
use crate::cluster::{Daemon, Postgres, Redis};
use crate::in_flight::circuit_is;

const ID: &str = "cart-1";

/// The stock the fault tests reserve from.
pub(crate) fn key() -> Option<pb::StockKey> {
    Some(pb::StockKey {
        product_id: "mug".into(),
        variant_id: String::new(),
    })
}

/// The reservation `id` of one mug for `ttl_secs`.
pub(crate) fn reserve_mug(id: &str, ttl_secs: i64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        reservation_id: id.into(),
        reference: "cart".into(),
        lines: vec![pb::ReservationLine {
            key: key(),
            quantity: 1,
        }],
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

/// Sets the mugs' stock to 5.
pub(crate) async fn stock_five_mugs(r: &mut ReservationServiceClient<Channel>) {
    r.set_stock(pb::SetStockRequest {
        key: key(),
        on_hand: 5,
        adjustment_id: "count".into(),
        reason: "count".into(),
    })
    .await
    .unwrap();
}

/// The reservation of one mug for a minute.
fn reserve() -> pb::ReserveRequest {
    reserve_mug(ID, 60)
}

fn expires_at(r: &pb::Reservation) -> i64 {
    r.expires_at.as_ref().unwrap().seconds
}

/// Two daemons on one Redis and one Postgres, and a shop with 5 mugs.
struct Shop {
    redis: Redis,
    db: sqlx::PgPool,
    a: Daemon,
    b: Daemon,
    _pg: Postgres,
    _tmp: TempDir,
}

impl Shop {
    async fn open(name: &str) -> Self {
        let tmp = TempDir::new(name);
        let redis = Redis::start(&tmp.0);
        let pg = Postgres::start(&tmp.0);
        let a = Daemon::start(&tmp.0, redis.port, &pg.url());
        let b = Daemon::start(&tmp.0, redis.port, &pg.url());
        let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
        let shop = Shop {
            redis,
            db,
            a,
            b,
            _pg: pg,
            _tmp: tmp,
        };
        stock_five_mugs(&mut shop.client(&shop.a).await).await;
        shop
    }

    async fn client(&self, daemon: &Daemon) -> ReservationServiceClient<Channel> {
        ReservationServiceClient::new(daemon.channel().await)
    }

    /// Reserves through daemon A while Redis is frozen (the fallback serves
    /// it), runs `then` on A meanwhile, thaws Redis, and retries the
    /// reservation through daemon B, which never saw the id: Redis makes
    /// its twin. Returns A's first answer.
    async fn twins_with(
        &self,
        then: impl AsyncFnOnce(&mut ReservationServiceClient<Channel>),
    ) -> pb::Reservation {
        let mut a = self.client(&self.a).await;
        self.redis.freeze();
        circuit_is(&self.a, true).await;
        let first = a.reserve(reserve()).await.unwrap().into_inner();
        assert_eq!(first.outcome(), pb::ReserveOutcome::Reserved);
        then(&mut a).await;
        self.redis.thaw();
        circuit_is(&self.a, false).await;
        circuit_is(&self.b, false).await;
        let mut b = self.client(&self.b).await;
        let twin = b.reserve(reserve()).await.unwrap().into_inner();
        assert_eq!(twin.outcome(), pb::ReserveOutcome::Reserved);
        first.reservation.unwrap()
    }

    /// Waits until the drainer has settled the twins: the fallback's is
    /// marked a duplicate.
    async fn settled(&self) {
        let started = Instant::now();
        loop {
            let state: String =
                sqlx::query_scalar("SELECT state::text FROM pg_holds WHERE hold_id = $1")
                    .bind(ID)
                    .fetch_one(&self.db)
                    .await
                    .unwrap();
            if state == "D" {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the fallback's twin is still {state}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reservation(&self) -> pb::Reservation {
        self.client(&self.b)
            .await
            .get_reservation(pb::GetReservationRequest {
                reservation_id: ID.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .reservation
            .unwrap()
    }
}

/// The retry of a reservation the fallback made, once Redis is back,
/// reaching the daemon that made it: the first answer, and no second hold
/// in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_reservation_the_fallback_made_repeats_its_answer() {
    let shop = Shop::open("twin-retry").await;
    let mut a = shop.client(&shop.a).await;
    shop.redis.freeze();
    circuit_is(&shop.a, true).await;
    let first = a.reserve(reserve()).await.unwrap().into_inner();
    assert_eq!(first.outcome(), pb::ReserveOutcome::Reserved);
    shop.redis.thaw();
    circuit_is(&shop.a, false).await;

    let retried = a.reserve(reserve()).await.unwrap().into_inner();
    assert_eq!(retried, first, "Redis made a second hold under the id");
}

/// An extension the fallback acknowledged is kept by Redis's twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_the_fallback_acknowledged_outlives_its_twin() {
    let shop = Shop::open("twin-extended").await;
    let mut extended = None;
    shop.twins_with(async |a| {
        let r = a
            .extend_reservation(pb::ExtendReservationRequest {
                reservation_id: ID.into(),
                ttl: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                extension_id: "x1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .reservation
            .unwrap();
        extended = Some(r);
    })
    .await;
    let extended = extended.unwrap();
    shop.settled().await;

    let kept = shop.reservation().await;
    assert_eq!(kept.state(), ReservationState::Active);
    assert!(
        expires_at(&kept) >= expires_at(&extended) - 1,
        "acknowledged until {}, kept until {}",
        expires_at(&extended),
        expires_at(&kept)
    );
}

/// A consumption the fallback acknowledged is kept by Redis's twin, and
/// the mug is sold once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumption_the_fallback_acknowledged_is_sold_once_by_its_twin() {
    let shop = Shop::open("twin-consumed").await;
    shop.twins_with(async |a| {
        a.consume_reservation(pb::ConsumeReservationRequest {
            reservation_id: ID.into(),
            order_id: "order-1".into(),
        })
        .await
        .unwrap();
    })
    .await;
    shop.settled().await;

    let kept = shop.reservation().await;
    assert_eq!(kept.state(), ReservationState::Consumed);
    assert_eq!(kept.order_id, "order-1");
    let started = Instant::now();
    loop {
        let level = shop
            .client(&shop.a)
            .await
            .get_stock_levels(pb::GetStockLevelsRequest {
                keys: vec![key().unwrap()],
            })
            .await
            .unwrap()
            .into_inner()
            .levels
            .remove(0);
        if (level.sold, level.reserved, level.available) == (1, 0, 4) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{level:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
