//! The clients: concurrent workers claiming, holding, committing and
//! releasing, retrying every call that failed in transit with the same id,
//! and keeping their own record of what was acknowledged. Then the checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient;
use holdfast::grpc::pb::{self, HoldState, Outcome};
use rand::Rng;
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;

const WORKERS: usize = 12;
const PRODUCTS: [&str; 3] = ["a", "b", "c"];
/// Caps: two products outlast the scenario (so a fault strikes while Redis
/// holds grants), one sells out early (so sell-out meets the fault too).
const CAPS: [i64; 3] = [4000, 4000, 100];
/// Holds live this long, so some expire during a scenario.
const HOLD_TTL_SECS: i64 = 2;
/// A call is retried for at most this long.
const RETRY_FOR: Duration = Duration::from_secs(15);

/// What one scenario's load and checks found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub successes: u64,
    pub errors: u64,
    pub oversold: i64,
    /// Acknowledged sales Postgres has no record of (neither an audit row
    /// nor a fallback hold) once the drainer caught up, whatever is in
    /// doubt.
    pub missing_acked: i64,
    /// Of those, more than the pools' units in doubt can account for.
    pub lost_acked: i64,
    pub in_doubt: i64,
    pub late_holds: i64,
    pub duplicates: i64,
    /// Units Redis reported sold beyond what its epoch was granted.
    pub beyond_grant: i64,
}

impl Report {
    pub fn add(&mut self, r: &Report) {
        self.requests += r.requests;
        self.successes += r.successes;
        self.errors += r.errors;
        self.oversold += r.oversold;
        self.missing_acked += r.missing_acked;
        self.lost_acked += r.lost_acked;
        self.in_doubt += r.in_doubt;
        self.late_holds += r.late_holds;
        self.duplicates += r.duplicates;
        self.beyond_grant += r.beyond_grant;
    }
}

#[derive(Default)]
struct Records {
    /// Acknowledged sales: id -> product (one unit each).
    acked: HashMap<String, &'static str>,
    successes_at: Vec<Instant>,
}

pub struct Load {
    redis_port: u16,
    sale: String,
    pg_url: String,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Records>>,
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

impl Load {
    pub async fn start(grpc_port: u16, redis_port: u16, sale: &str, pg_url: &str) -> Self {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .unwrap()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let mut client = FlashSaleServiceClient::new(channel.clone());
        let products: Vec<(&str, i64)> = PRODUCTS.iter().copied().zip(CAPS).collect();
        let create = crate::live_sale(sale, &products);
        let started = Instant::now();
        while let Err(e) = client.create_sale(create.clone()).await {
            assert!(started.elapsed() < RETRY_FOR, "cannot create the sale: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let load = Load {
            redis_port,
            sale: sale.into(),
            pg_url: pg_url.into(),
            stop: Arc::new(AtomicBool::new(false)),
            records: Arc::default(),
            requests: Arc::default(),
            errors: Arc::default(),
            workers: Vec::new(),
        };
        let workers = (0..WORKERS)
            .map(|w| {
                let worker = Worker {
                    client: FlashSaleServiceClient::new(channel.clone()),
                    sale: sale.to_owned(),
                    prefix: format!("{sale}-w{w}-"),
                    stop: load.stop.clone(),
                    records: load.records.clone(),
                    requests: load.requests.clone(),
                    errors: load.errors.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Load { workers, ..load }
    }

    /// The first success at or after `t`, waiting up to 10 s for one.
    pub async fn first_success_after(&self, t: Instant) -> Option<Instant> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(at) = self
                .records
                .lock()
                .unwrap()
                .successes_at
                .iter()
                .find(|s| **s >= t)
            {
                return Some(*at);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops the workers and checks the invariants.
    pub async fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            let _ = w.await;
        }
        let records = std::mem::take(&mut *self.records.lock().unwrap());
        let pg = loop {
            match PgPool::connect(&self.pg_url).await {
                Ok(p) => break p,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let acked: Vec<String> = records.acked.keys().cloned().collect();
        // Let the drainer catch up: until every event in Redis's stream has
        // been written to Postgres and acknowledged (what Redis lost never
        // comes, so a slow machine must not count a late event as lost).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut present: Vec<String>;
        loop {
            let drained = self.stream_drained().await;
            present = present_ids(&pg, &acked).await;
            if present.len() == acked.len() || drained || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Holds end within their TTL plus the sweep bound (1 s): give the
        // last ones time to reach it.
        tokio::time::sleep(Duration::from_secs(HOLD_TTL_SECS as u64 + 2)).await;

        let mut report = Report {
            requests: self.requests.load(Ordering::Relaxed),
            successes: records.successes_at.len() as u64,
            errors: self.errors.load(Ordering::Relaxed),
            ..Report::default()
        };
        for product in PRODUCTS {
            let pool = format!("sale/{}/{product}", self.sale);
            let (recorded, in_doubt, capacity, beyond_grant): (i64, i64, i64, i64) =
                sqlx::query_as(
                    "SELECT sold_pg + sold_prior + reported_sold, in_doubt, capacity,
                            GREATEST(reported_sold - (granted - returned), 0)
                     FROM pools WHERE pool_id = $1",
                )
                .bind(&pool)
                .fetch_one(&pg)
                .await
                .unwrap();
            let acked_units = records.acked.values().filter(|p| **p == product).count() as i64;
            let lost: Vec<&String> = records
                .acked
                .iter()
                .filter(|(id, p)| **p == product && !present.contains(id))
                .map(|(id, _)| id)
                .collect();
            let lost_units = lost.len() as i64;
            report.oversold +=
                (recorded + in_doubt - capacity).max(0) + (acked_units - capacity).max(0);
            report.missing_acked += lost_units;
            report.lost_acked += (lost_units - in_doubt).max(0);
            report.in_doubt += in_doubt;
            // Escrow: Redis never sells more of an epoch than it was granted.
            report.beyond_grant += beyond_grant;
            if lost_units > in_doubt {
                explain_lost(&pg, &pool, &lost).await;
            }
        }
        let prefix = format!("{}-%", self.sale);
        let (late,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_holds WHERE state = 'A' AND expires_at < now() - interval '1 second' AND hold_id LIKE $1",
        )
        .bind(&prefix)
        .fetch_one(&pg)
        .await
        .unwrap();
        report.late_holds += late + self.late_in_redis().await;
        let dupes: Vec<(String, i64)> = sqlx::query_as(
            "SELECT hold_id, count(*) FROM (
                 SELECT hold_id FROM audit_log WHERE kind IN ('claimed', 'committed') AND event_id NOT LIKE 'f%' AND hold_id LIKE $1
                 UNION ALL
                 SELECT hold_id FROM pg_holds WHERE state = 'C' AND hold_id LIKE $1
             ) x GROUP BY hold_id HAVING count(*) > 1",
        )
        .bind(&prefix)
        .fetch_all(&pg)
        .await
        .unwrap();
        report.duplicates += dupes.len() as i64;
        report
    }
}

impl Load {
    /// Active holds in Redis whose expiry is more than the sweep bound (1 s)
    /// past, by Redis's clock.
    /// True when the drainer has read and acknowledged every event in the
    /// tenant's stream (it acknowledges only after Postgres committed).
    async fn stream_drained(&self) -> bool {
        use redis::AsyncCommands;
        use redis::streams::{StreamInfoGroupsReply, StreamInfoStreamReply};
        let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{}", self.redis_port))
        else {
            return false;
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        let key = "hf:{dev}:events";
        let stream: redis::RedisResult<StreamInfoStreamReply> = con.xinfo_stream(key).await;
        let groups: redis::RedisResult<StreamInfoGroupsReply> = con.xinfo_groups(key).await;
        match (stream, groups) {
            (Ok(stream), Ok(groups)) => groups
                .groups
                .iter()
                .any(|g| g.pending == 0 && g.last_delivered_id == stream.last_generated_id),
            _ => false,
        }
    }

    async fn late_in_redis(&self) -> i64 {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.redis_port)).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
        let now_ms = s * 1000 + us / 1000;
        holdfast::store::redis::overdue_holds(
            &mut con,
            "hf:{dev}:",
            now_ms - 1000,
            &format!("{}-", self.sale),
        )
        .await
        .unwrap()
    }
}

/// Prints what Postgres knows of acknowledged sales it lacks, so that a
/// failed run says where to look.
async fn explain_lost(pg: &PgPool, pool: &str, lost: &[&String]) {
    let counts: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT epoch, granted, returned, reported_sold, sold_prior, sold_pg, held_pg, in_doubt FROM pools WHERE pool_id = $1",
    )
    .bind(pool)
    .fetch_one(pg)
    .await
    .unwrap();
    let audit: Vec<(String, String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT hold_id, kind, event_id, lines FROM audit_log WHERE hold_id = ANY($1) ORDER BY id",
    )
    .bind(lost)
    .fetch_all(pg)
    .await
    .unwrap();
    let fallback: Vec<(String, String)> =
        sqlx::query_as("SELECT hold_id, state::text FROM pg_holds WHERE hold_id = ANY($1)")
            .bind(lost)
            .fetch_all(pg)
            .await
            .unwrap();
    println!(
        "lost: pool={pool} acked_but_absent={lost:?} \
         (epoch, granted, returned, reported_sold, sold_prior, sold_pg, held_pg, in_doubt)={counts:?} \
         audit={audit:?} pg_holds={fallback:?}"
    );
}

async fn present_ids(pg: &PgPool, ids: &[String]) -> Vec<String> {
    let rows: Result<Vec<(String,)>, _> = sqlx::query_as(
        "SELECT hold_id FROM audit_log WHERE kind IN ('claimed', 'committed') AND event_id NOT LIKE 'f%' AND hold_id = ANY($1)
         UNION
         SELECT hold_id FROM pg_holds WHERE state = 'C' AND hold_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pg)
    .await;
    rows.map(|r| r.into_iter().map(|(id,)| id).collect())
        .unwrap_or_default()
}

struct Worker {
    client: FlashSaleServiceClient<Channel>,
    sale: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Records>>,
    requests: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Worker {
    /// Calls `f` until it answers something other than a transit failure,
    /// for at most RETRY_FOR; every attempt uses the same request (id).
    async fn retry<T, F, Fut>(&mut self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(FlashSaleServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            match f(self.client.clone()).await {
                Ok(v) => {
                    self.records
                        .lock()
                        .unwrap()
                        .successes_at
                        .push(Instant::now());
                    return Ok(v);
                }
                Err(s) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if !retryable(s.code()) || started.elapsed() > RETRY_FOR {
                        return Err(s);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn run(mut self) {
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let id = format!("{}{n}", self.prefix);
            let product = PRODUCTS[rand::rng().random_range(0..PRODUCTS.len())];
            let line = vec![pb::ClaimLine {
                product_id: product.into(),
                quantity: 1,
            }];
            let claim = rand::rng().random_bool(0.6);
            if claim {
                let req = pb::ClaimRequest {
                    claim_id: id.clone(),
                    sale_id: self.sale.clone(),
                    customer_id: String::new(),
                    lines: line,
                };
                if let Ok(r) = self
                    .retry(|mut c| {
                        let req = req.clone();
                        async move { c.claim(req).await }
                    })
                    .await
                    && r.get_ref().outcome() == Outcome::Ok
                {
                    self.records.lock().unwrap().acked.insert(id, product);
                }
                continue;
            }
            let req = pb::CreateCartHoldRequest {
                hold_id: id.clone(),
                sale_id: self.sale.clone(),
                customer_id: String::new(),
                lines: line,
                ttl: Some(prost_types::Duration {
                    seconds: HOLD_TTL_SECS,
                    nanos: 0,
                }),
            };
            let Ok(r) = self
                .retry(|mut c| {
                    let req = req.clone();
                    async move { c.create_cart_hold(req).await }
                })
                .await
            else {
                continue;
            };
            if r.get_ref().outcome() != Outcome::Ok {
                continue;
            }
            if rand::rng().random_bool(0.7) {
                let req = pb::CommitCartHoldRequest {
                    hold_id: id.clone(),
                };
                if let Ok(r) = self
                    .retry(|mut c| {
                        let req = req.clone();
                        async move { c.commit_cart_hold(req).await }
                    })
                    .await
                    && r.get_ref()
                        .hold
                        .as_ref()
                        .is_some_and(|h| h.state() == HoldState::Committed)
                {
                    self.records.lock().unwrap().acked.insert(id, product);
                }
            } else {
                let req = pb::ReleaseCartHoldRequest {
                    hold_id: id.clone(),
                };
                let _ = self
                    .retry(|mut c| {
                        let req = req.clone();
                        async move { c.release_cart_hold(req).await }
                    })
                    .await;
            }
        }
    }
}
