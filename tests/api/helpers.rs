//! The test harness: `spawn_app()` runs the real daemon (the exact
//! production path, `Application::build` + `run_until_stopped`) on port 0
//! against the Redis and Postgres that `deploy/test.sh` started, with a
//! database and a Redis key prefix of its own for each test.

use std::time::Duration;

use holdfast::config::ServeArgs;
use holdfast::grpc::pb::admin_service_client::AdminServiceClient;
use holdfast::grpc::pb::channel_service_client::ChannelServiceClient;
use holdfast::grpc::pb::event_service_client::EventServiceClient;
use holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient;
use holdfast::grpc::pb::reservation_service_client::ReservationServiceClient;
use holdfast::grpc::pb::sale_lock_service_client::SaleLockServiceClient;
use holdfast::grpc::pb::slot_service_client::SlotServiceClient;
use holdfast::grpc::pb::{self, ClaimLine, SaleProduct};
use holdfast::startup::Application;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with deploy/test.sh, which starts Redis and Postgres for them")
    })
}

/// The Redis the tests share.
pub fn redis_url() -> String {
    env("HOLDFAST_TEST_REDIS_URL")
}

/// A fresh, empty database on the shared Postgres; returns its URL.
pub async fn fresh_database() -> String {
    let base = env("HOLDFAST_TEST_DATABASE_URL");
    let name = format!("t_{}", random_suffix());
    let admin = PgPool::connect(&base)
        .await
        .expect("connect to the test postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("a database url ends in /name");
    format!("{prefix}/{name}")
}

/// Runs `holdfast bench` (the binary, as a user runs it) with `args` on
/// the shared Redis and the database at `database_url`, asserts it
/// succeeded, and returns the line of its output that starts with
/// `line`.
pub async fn bench_line(args: &[&str], database_url: &str, line: &str) -> String {
    let stdout = bench_output(args, database_url).await;
    stdout
        .lines()
        .find(|l| l.starts_with(line))
        .unwrap_or_else(|| panic!("a line starting {line:?}: {stdout}"))
        .to_string()
}

/// As [`bench_line`], the whole of the bench's output.
pub async fn bench_output(args: &[&str], database_url: &str) -> String {
    let out = bench_run(args, database_url).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    stdout.into_owned()
}

/// Runs `holdfast bench` with `args` on the shared Redis and the database
/// at `database_url`, and returns how it ended, success or not.
pub async fn bench_run(args: &[&str], database_url: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("bench")
        .args(args)
        .env("HOLDFAST_REDIS_URL", redis_url())
        .env("HOLDFAST_DATABASE_URL", database_url)
        .env_remove("HOLDFAST_BENCH_ADDR")
        .env_remove("HOLDFAST_BENCH_API_KEY")
        .output()
        .await
        .expect("the bench runs")
}

/// Eight random lowercase letters and digits.
pub fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// A daemon under test.
pub struct TestApp {
    /// gRPC address.
    pub addr: std::net::SocketAddr,
    /// /metrics address.
    pub metrics_addr: std::net::SocketAddr,
    /// The test's own database.
    pub pg: PgPool,
    /// Its URL, to start another daemon on the same state.
    pub database_url: String,
    /// The test's own Redis key prefix.
    pub redis_prefix: String,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A daemon in development mode (tenant "dev", no auth), fresh state.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A daemon with settings changed by `configure`, fresh state.
pub async fn spawn_app_with(configure: impl FnOnce(&mut ServeArgs)) -> TestApp {
    let database_url = fresh_database().await;
    let prefix = format!("t{}", random_suffix());
    let mut args = ServeArgs::for_test(&redis_url(), &database_url, &prefix);
    configure(&mut args);
    start(args).await
}

/// API keys of two stores (tenants), as given to `--api-key`.
pub const STORE_A_ADMIN: &str = "store-a:admin:key-for-store-a-admin";
pub const STORE_B_ADMIN: &str = "store-b:admin:key-for-store-b-admin";
pub const STORE_A_CHECKOUT: &str = "store-a:checkout:key-for-store-a-checkout";

/// A daemon with keys for two stores (the three above) and no dev mode.
pub async fn spawn_two_stores() -> TestApp {
    spawn_two_stores_with(|_| {}).await
}

/// [`spawn_two_stores`], with settings changed by `configure`.
pub async fn spawn_two_stores_with(configure: impl FnOnce(&mut ServeArgs)) -> TestApp {
    spawn_app_with(|a| {
        a.dev = false;
        a.api_keys = vec![
            STORE_A_ADMIN.into(),
            STORE_B_ADMIN.into(),
            STORE_A_CHECKOUT.into(),
        ];
        configure(a);
    })
    .await
}

/// Starts a daemon with exactly these settings.
pub async fn start(args: ServeArgs) -> TestApp {
    let database_url = args.db.database_url.clone();
    let redis_prefix = args.redis_prefix.clone();
    let app = Application::build(args).await.expect("the daemon builds");
    let addr = app.grpc_addr();
    let metrics_addr = app.metrics_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the daemon");
    let pg = PgPool::connect(&database_url)
        .await
        .expect("connect to the test database");
    TestApp {
        addr,
        metrics_addr,
        pg,
        database_url,
        redis_prefix,
        channel,
        stop: Some(tx),
        task: Some(task),
    }
}

impl TestApp {
    /// A FlashSaleService client.
    pub fn flash(&self) -> FlashSaleServiceClient<Channel> {
        FlashSaleServiceClient::new(self.channel.clone())
    }

    /// A ReservationService client.
    pub fn reservations(&self) -> ReservationServiceClient<Channel> {
        ReservationServiceClient::new(self.channel.clone())
    }

    /// A SlotService client.
    pub fn slots(&self) -> SlotServiceClient<Channel> {
        SlotServiceClient::new(self.channel.clone())
    }

    /// A SaleLockService client.
    pub fn locks(&self) -> SaleLockServiceClient<Channel> {
        SaleLockServiceClient::new(self.channel.clone())
    }

    /// A ChannelService client.
    pub fn channels(&self) -> ChannelServiceClient<Channel> {
        ChannelServiceClient::new(self.channel.clone())
    }

    /// An EventService client.
    pub fn events(&self) -> EventServiceClient<Channel> {
        EventServiceClient::new(self.channel.clone())
    }

    /// An AdminService client.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    /// A new connection (for spreading concurrent calls).
    pub async fn new_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The channel all clients share.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Settings for a daemon on this one's stores (its database and Redis
    /// prefix): for a test that stops this one and starts another.
    pub fn same_stores(&self) -> ServeArgs {
        ServeArgs::for_test(&redis_url(), &self.database_url, &self.redis_prefix)
    }

    /// Stops the daemon and starts a new one on the same stores, as a
    /// restart does.
    pub async fn restart(self) -> TestApp {
        let args = self.same_stores();
        self.shutdown().await;
        start(args).await
    }

    /// Stops the daemon and asserts it shut down cleanly.
    pub async fn shutdown(mut self) {
        self.stop_and_wait().await;
    }

    async fn stop_and_wait(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the daemon stops within 30 s")
                .expect("the daemon task did not panic");
            result.expect("the daemon stopped without error");
        }
    }

    /// Another transaction holding `table` in lock `mode` (`EXCLUSIVE`
    /// lets reads through; `ACCESS EXCLUSIVE` holds them too): the
    /// statements it blocks wait in Postgres until it ends (roll it back).
    pub async fn hold_table(
        &self,
        table: &str,
        mode: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut blocker = self.pg.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN {mode} MODE"))
            .execute(&mut *blocker)
            .await
            .unwrap();
        blocker
    }

    /// Statements waiting for a lock whose text is `LIKE` `pattern`.
    pub async fn waiting_on_locks(&self, pattern: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(pattern)
        .fetch_one(&self.pg)
        .await
        .unwrap()
    }

    /// The Postgres backend of the call waiting for a lock, once one is.
    pub async fn waiting_for_lock(&self) -> i32 {
        self.eventually("a statement waits for a lock", async || {
            sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_optional(&self.pg)
            .await
            .unwrap()
        })
        .await
    }

    /// Polls `f` until it returns `Some`, for at most 10 s.
    pub async fn eventually<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.eventually_within(Duration::from_secs(10), what, f)
            .await
    }

    /// Polls `f` until it returns `Some`, for at most `within`: a guard
    /// against a hang, not a speed target.
    pub async fn eventually_within<T, F, Fut>(&self, within: Duration, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Postgres-recorded sold count of a sale product (what the drainer
    /// wrote back).
    pub async fn pg_sold(&self, sale: &str, product: &str) -> i64 {
        let (sold,): (i64,) = sqlx::query_as(
            "SELECT sold_pg + sold_prior + reported_sold FROM pools WHERE pool_id = $1",
        )
        .bind(format!("sale/{sale}/{product}"))
        .fetch_one(&self.pg)
        .await
        .expect("the pool exists");
        sold
    }

    /// How many audit rows exist.
    pub async fn audit_count(&self) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_log")
            .fetch_one(&self.pg)
            .await
            .unwrap();
        n
    }

    /// Creates a live sale (started a minute ago, ends in an hour) with
    /// `products` as (id, cap).
    pub async fn live_sale(
        &self,
        sale_id: &str,
        products: &[(&str, Option<i64>)],
        per_customer_limit: u32,
    ) -> pb::Sale {
        let now = chrono::Utc::now().timestamp();
        self.sale_between(sale_id, products, per_customer_limit, now - 60, now + 3600)
            .await
    }

    /// Creates a sale open between two unix times.
    pub async fn sale_between(
        &self,
        sale_id: &str,
        products: &[(&str, Option<i64>)],
        per_customer_limit: u32,
        from: i64,
        to: i64,
    ) -> pb::Sale {
        self.flash()
            .create_sale(sale_request(
                sale_id,
                products,
                per_customer_limit,
                from,
                to,
            ))
            .await
            .expect("create the sale")
            .into_inner()
            .sale
            .expect("a sale")
    }

    /// Reads a product's stock.
    pub async fn stock(&self, sale_id: &str, product: &str) -> pb::ProductStock {
        let sale = self
            .flash()
            .get_sale(pb::GetSaleRequest {
                sale_id: sale_id.into(),
                ..Default::default()
            })
            .await
            .expect("get the sale")
            .into_inner()
            .sale
            .expect("a sale");
        sale.products
            .into_iter()
            .find(|p| p.product_id == product)
            .expect("the product")
    }

    /// A pool as `AdminService.GetPool` shows it (both stores' counts).
    pub async fn pool(&self, pool_id: &str) -> pb::Pool {
        self.admin()
            .get_pool(pb::GetPoolRequest {
                pool_id: pool_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pool
            .unwrap()
    }

    /// A connection to the tests' Redis, to look at what the daemon stored
    /// (the test's keys are under `redis_prefix`).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(redis_url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// The daemon's own Redis store over the tests' Redis, to call a
    /// script as the daemon would.
    pub async fn redis_store(&self) -> holdfast::store::redis::RedisStore {
        holdfast::store::redis::RedisStore::connect(
            &redis_url(),
            &self.redis_prefix,
            std::time::Duration::from_secs(3600),
            holdfast::store::redis::RedisTimeouts::default(),
        )
        .await
        .unwrap()
    }

    /// The Redis key of one of `tenant`'s pools, to read or break it
    /// behind the daemon's back.
    pub async fn pool_key(&self, tenant: &str, pool: &str) -> String {
        let store = self.redis_store().await;
        let tenant = holdfast::domain::TenantId::parse(tenant).unwrap();
        format!("{}pool:{pool}", store.keys().tenant(&tenant))
    }

    /// The Redis server's clock, ms.
    pub async fn redis_now_ms(&self) -> i64 {
        let mut con = self.redis().await;
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut con).await.unwrap();
        s * 1000 + us / 1000
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A sale open between two unix times, as `TestApp::sale_between` creates it.
pub fn sale_request(
    sale_id: &str,
    products: &[(&str, Option<i64>)],
    per_customer_limit: u32,
    from: i64,
    to: i64,
) -> pb::CreateSaleRequest {
    pb::CreateSaleRequest {
        sale_id: sale_id.into(),
        name: format!("sale {sale_id}"),
        starts_at: Some(prost_types::Timestamp {
            seconds: from,
            nanos: 0,
        }),
        ends_at: Some(prost_types::Timestamp {
            seconds: to,
            nanos: 0,
        }),
        products: products
            .iter()
            .map(|(id, cap)| SaleProduct {
                product_id: (*id).into(),
                unit_cap: *cap,
            })
            .collect(),
        per_customer_limit,
    }
}

/// A sale open from a minute ago for an hour, with no per-customer limit.
pub fn live_sale_request(sale_id: &str, products: &[(&str, Option<i64>)]) -> pb::CreateSaleRequest {
    let now = chrono::Utc::now().timestamp();
    sale_request(sale_id, products, 0, now - 60, now + 3600)
}

/// A claim request.
pub fn claim(claim_id: &str, sale_id: &str, lines: &[(&str, i64)]) -> pb::ClaimRequest {
    pb::ClaimRequest {
        claim_id: claim_id.into(),
        sale_id: sale_id.into(),
        customer_id: String::new(),
        lines: lines_of(lines),
    }
}

/// Claim lines from (product, quantity) pairs.
pub fn lines_of(lines: &[(&str, i64)]) -> Vec<ClaimLine> {
    lines
        .iter()
        .map(|(p, q)| ClaimLine {
            product_id: (*p).into(),
            quantity: *q,
        })
        .collect()
}

/// A cart hold request with a TTL in seconds.
pub fn cart_hold(
    hold_id: &str,
    sale_id: &str,
    lines: &[(&str, i64)],
    ttl_secs: i64,
) -> pb::CreateCartHoldRequest {
    pb::CreateCartHoldRequest {
        hold_id: hold_id.into(),
        sale_id: sale_id.into(),
        customer_id: String::new(),
        lines: lines_of(lines),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

/// `msg` sent with the API key of a `TENANT:ROLE:KEY` spec (as given to
/// `--api-key`).
pub fn with_key<T>(msg: T, spec: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let secret = spec.rsplit(':').next().unwrap();
    req.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(format!("Bearer {secret}")).unwrap(),
    );
    req
}
