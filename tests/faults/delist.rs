//! A delisting must reach the listing mirror in Redis before it counts
//! (src/services/listing_mirror.rs): while Redis is unreachable, Disengage
//! answers UNAVAILABLE and changes nothing, and once Redis is back the
//! card it takes off a channel cannot be locked there.

use std::time::Duration;

use holdfast::grpc::pb::channel_service_client::ChannelServiceClient;
use holdfast::grpc::pb::sale_lock_service_client::SaleLockServiceClient;
use holdfast::grpc::pb::{self, AcquireOutcome, CardConflictReason};
use tonic::Code;
use tonic::transport::Channel;

use crate::TempDir;
use crate::cluster::{Daemon, Postgres, Redis};

fn disengage(card: &str) -> pb::DisengageRequest {
    pb::DisengageRequest {
        channel: "storefront".into(),
        card_ids: vec![card.into()],
        all_cards: false,
    }
}

fn acquire(lock_ref: &str, card: &str) -> pb::AcquireSaleLocksRequest {
    pb::AcquireSaleLocksRequest {
        lock_ref: lock_ref.into(),
        channel: "storefront".into(),
        card_ids: vec![card.into()],
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
    }
}

/// Engages `card` on the storefront.
async fn engage(
    channels: &mut ChannelServiceClient<Channel>,
    card: &str,
) -> Result<tonic::Response<pb::EngageResponse>, tonic::Status> {
    channels
        .engage(pb::EngageRequest {
            channel: "storefront".into(),
            cards: vec![pb::EngageCard {
                card_id: card.into(),
                external_ref: String::new(),
                metadata_json: String::new(),
            }],
        })
        .await
}

/// A Redis, a Postgres and a daemon talking to that Redis directly, in
/// `tmp`, and clients of the daemon's channel and sale-lock services.
/// Bind every field (`_pg` too): a field left out is dropped, and its
/// server stopped, as soon as the struct is taken apart.
struct Setup {
    redis: Redis,
    _pg: Postgres,
    daemon: Daemon,
    channels: ChannelServiceClient<Channel>,
    locks: SaleLockServiceClient<Channel>,
}

impl Setup {
    async fn start(tmp: &TempDir) -> Self {
        let dir = tmp.0.clone();
        let redis = Redis::start(&dir);
        let pg = Postgres::start(&dir);
        let daemon = Daemon::start(&dir, redis.port, &pg.url());
        let channel = daemon.channel().await;
        Setup {
            redis,
            _pg: pg,
            daemon,
            channels: ChannelServiceClient::new(channel.clone()),
            locks: SaleLockServiceClient::new(channel),
        }
    }
}

async fn live_on_storefront(channels: &mut ChannelServiceClient<Channel>, card: &str) -> bool {
    channels
        .get_card_channels(pb::GetCardChannelsRequest {
            card_ids: vec![card.into()],
        })
        .await
        .unwrap()
        .into_inner()
        .cards
        .remove(0)
        .active_channels
        .iter()
        .any(|c| c == "storefront")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delisting_while_redis_is_frozen_changes_nothing() {
    let tmp = TempDir::new("delist");
    let Setup {
        redis,
        daemon,
        mut channels,
        mut locks,
        _pg,
    } = Setup::start(&tmp).await;
    engage(&mut channels, "card-1").await.unwrap();

    redis.freeze();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        channels.disengage(disengage("card-1")),
    )
    .await
    .expect("the disengage answers while Redis is frozen")
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        live_on_storefront(&mut channels, "card-1").await,
        "nothing changed in Postgres"
    );
    redis.thaw();

    // Retried with Redis back, it counts, and the mirror says so at once.
    let started = std::time::Instant::now();
    loop {
        match channels.disengage(disengage("card-1")).await {
            Ok(r) => {
                assert_eq!(r.into_inner().disengaged_card_ids, vec!["card-1"]);
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {
                assert!(started.elapsed() < Duration::from_secs(10), "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let r = locks
        .acquire_sale_locks(acquire("lock-a", "card-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), AcquireOutcome::Conflict, "{r:?}");
    assert_eq!(r.conflicts[0].reason(), CardConflictReason::NotListed);
    drop(daemon);
}

/// Who answered an acquire: its outcome, or the error's code.
async fn acquired(
    locks: &mut SaleLockServiceClient<Channel>,
    lock_ref: &str,
    card: &str,
) -> Result<pb::AcquireSaleLocksResponse, tonic::Status> {
    tokio::time::timeout(
        Duration::from_secs(10),
        locks.acquire_sale_locks(acquire(lock_ref, card)),
    )
    .await
    .expect("the acquire answers")
    .map(|r| r.into_inner())
}

/// A card engaged and locked while Redis was away lives in the fallback,
/// which Redis knows nothing of: once Redis is back, another checkout is
/// told who holds the card (and later, who sold it), not UNAVAILABLE
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_locked_in_the_fallback_is_a_conflict_once_redis_is_back() {
    let tmp = TempDir::new("fallback-lock");
    let Setup {
        redis,
        daemon,
        mut channels,
        mut locks,
        _pg,
    } = Setup::start(&tmp).await;
    engage(&mut channels, "card-0").await.unwrap();

    redis.freeze();
    let engaged = tokio::time::timeout(Duration::from_secs(10), engage(&mut channels, "card-1"))
        .await
        .expect("the engage answers while Redis is frozen");
    assert!(engaged.is_ok(), "{engaged:?}");
    let a = acquired(&mut locks, "lock-a", "card-1").await.unwrap();
    assert_eq!(a.outcome(), AcquireOutcome::Acquired, "{a:?}");
    let lock = a.lock.unwrap();
    assert_eq!(lock.fencing_token, 0, "the fallback's locks are unfenced");
    // A card engaged before the freeze has its unit in Redis: it waits.
    let held = acquired(&mut locks, "lock-z", "card-0").await.unwrap_err();
    assert_eq!(held.code(), Code::Unavailable, "{held:?}");
    redis.thaw();

    // Redis is back; the card's one unit is the fallback's lock.
    let started = std::time::Instant::now();
    let b = loop {
        match acquired(&mut locks, "lock-b", "card-1").await {
            Err(e)
                if e.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    let b = b.unwrap();
    assert_eq!(b.outcome(), AcquireOutcome::Conflict, "{b:?}");
    assert_eq!(b.conflicts[0].reason(), CardConflictReason::Locked);
    assert_eq!(b.conflicts[0].channel, "storefront");

    // Sold through the fallback's lock, it is a sold card.
    locks
        .complete_sale_locks(pb::CompleteSaleLocksRequest {
            lock_ref: "lock-a".into(),
            order_id: "order-1".into(),
        })
        .await
        .unwrap();
    let c = acquired(&mut locks, "lock-c", "card-1").await.unwrap();
    assert_eq!(c.outcome(), AcquireOutcome::Conflict, "{c:?}");
    assert_eq!(c.conflicts[0].reason(), CardConflictReason::Sold);
    assert_eq!(c.conflicts[0].channel, "storefront");
    drop(daemon);
}
