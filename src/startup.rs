//! [`Application`]: build from configuration, bind the ports, run until a
//! shutdown signal. Tests run exactly this, on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::accept;
use crate::config::ServeArgs;
use crate::deadline::Deadlines;
use crate::engine::Engine;
use crate::grpc::auth::Auth;
use crate::grpc::pb::admin_service_server::AdminServiceServer;
use crate::grpc::pb::channel_service_server::ChannelServiceServer;
use crate::grpc::pb::flash_sale_service_server::FlashSaleServiceServer;
use crate::grpc::pb::reservation_service_server::ReservationServiceServer;
use crate::grpc::pb::sale_lock_service_server::SaleLockServiceServer;
use crate::grpc::pb::slot_service_server::SlotServiceServer;
use crate::grpc::{
    AdminApi, ChannelApi, EventApi, EventServer, FlashSaleApi, ReservationApi, SaleLockApi,
    SlotApi, pb,
};
use crate::jobs::{
    Tenants, drainer, outbox, reconciler, redis_watch, refiller, statistics, sweeper,
};
use crate::satellite::{AllowedHosts, SatelliteClient};
use crate::services::channels::Channels;
use crate::services::flash_sale::FlashSales;
use crate::services::reservations::Reservations;
use crate::services::sale_locks::SaleLocks;
use crate::services::slots::Slots;
use crate::store::postgres::PgStore;
use crate::store::redis::{RedisStore, RedisTimeouts};
use crate::telemetry;

/// The gRPC services, by full name, for health and logs.
pub const SERVICES: &[&str] = &[
    "holdfast.v1.FlashSaleService",
    "holdfast.v1.ReservationService",
    "holdfast.v1.SlotService",
    "holdfast.v1.SaleLockService",
    "holdfast.v1.ChannelService",
    "holdfast.v1.EventService",
    "holdfast.v1.AdminService",
];

/// Calls one connection's client may cancel before the daemon has taken
/// them up, at once, before HTTP/2's guard against rapid-reset floods
/// closes the connection (GOAWAY, ENHANCE_YOUR_CALM). h2's default, 20,
/// is what a stampede's own checkouts reach: past the peak, calls queue
/// in the connection before the daemon reads them, and each one whose
/// deadline passes there is cancelled. The guard then failed every call
/// on the connection, those already on their way to Redis too, whose
/// units were sold to callers told the call failed (deploy/BENCHMARKS.md,
/// "a stampede past the peak"). A cancelled call not yet taken up costs
/// the daemon a few hundred bytes until it is; this bounds that at about
/// a megabyte a connection.
const PENDING_RESETS: usize = 4096;

/// A built daemon with its listeners bound.
pub struct Application {
    args: ServeArgs,
    grpc: TcpListener,
    metrics: TcpListener,
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Application {
    /// Connects to Postgres (and migrates it), to Redis, checks the
    /// credentials set-up, and binds the gRPC and metrics ports.
    pub async fn build(args: ServeArgs) -> anyhow::Result<Self> {
        // The recorder first, so every metric set while building is kept.
        let _ = telemetry::metrics_handle();
        let tls = crate::tls::server_config(&args)?;
        let pg = PgStore::connect(
            &args.db.database_url,
            args.pg_max_connections,
            Duration::from_secs(5),
        )
        .await?;
        pg.migrate().await?;

        let auth = if args.dev {
            tracing::warn!(
                "DEVELOPMENT MODE: no authentication; every caller acts as admin of tenant \"dev\". Never expose this port."
            );
            Auth::dev()
        } else {
            let stored: (i64,) =
                sqlx::query_as("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
                    .fetch_one(pg.pool())
                    .await?;
            if args.api_keys.is_empty() && stored.0 == 0 {
                anyhow::bail!(
                    "no API key is configured: create one with `holdfast keys create --tenant T --role admin`, \
                     pass --api-key TENANT:ROLE:KEY, or run with --dev for a local, unauthenticated daemon"
                );
            }
            Auth::keys(&args.api_keys, pg.clone())?
        };
        for tenant in auth.configured_tenants() {
            pg.ensure_tenant(&tenant).await?;
        }

        let timeouts = RedisTimeouts {
            connect: Duration::from_millis(args.redis_timeout_ms),
            response: Duration::from_millis(args.redis_timeout_ms),
        };
        let redis = RedisStore::connect(
            &args.redis_url,
            &args.redis_prefix,
            Duration::from_secs(args.retention_secs),
            timeouts,
        )
        .await?;
        let redis = redis.with_max_active_holds(args.max_active_holds_per_tenant);
        warn_about_redis_settings(&redis).await;

        let engine = Engine::new(redis, pg, args.grant_policy(), args.max_extensions);
        let grpc = TcpListener::bind(args.grpc_addr).await?;
        let metrics = TcpListener::bind(args.metrics_addr).await?;
        Ok(Self {
            tls,
            args,
            grpc,
            metrics,
            engine,
            auth: Arc::new(auth),
        })
    }

    /// Where gRPC is served.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where /metrics is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The engine, for tools and tests that look beneath the API.
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Serves until `shutdown` completes; then health turns NOT_SERVING,
    /// the listener closes, Watch streams end (telling subscribers where to
    /// resume) and in-flight calls finish; then the jobs get the shutdown
    /// grace period to stop.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Before the first call is served: a Redis that is new to this
        // daemon or came back empty has every pool's grant checked, so no
        // call races that recovery and finds a pool as it was before it.
        // The Redis watch checks again every round; a Redis that does not
        // answer now is left to it.
        if let Ok(Some(run_id)) = self.engine.redis().check_marker().await {
            let _ = redis_watch::recover(&self.engine, &run_id).await;
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let metrics_addr = self.metrics_addr();
        let addr = self.grpc.local_addr()?;

        let (stop_tx, stop_rx) = watch::channel(false);
        let outbox_settings = self.args.outbox();
        let client = SatelliteClient::new(outbox_settings.timeout)
            .with_allowed_hosts(AllowedHosts::new(&self.args.satellite_hosts));
        let channels = Arc::new(Channels::new(self.engine.clone(), client.clone()));
        // The services first: a failure to build them stops the start
        // before any task runs.
        let handshake = Duration::from_secs(self.args.handshake_timeout_secs);
        let keepalive = (self.args.http2_keepalive_secs > 0)
            .then(|| Duration::from_secs(self.args.http2_keepalive_secs));
        let mut server = Server::builder()
            .http2_max_pending_accept_reset_streams(Some(PENDING_RESETS))
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(Duration::from_secs(
                self.args.http2_keepalive_timeout_secs,
            )))
            .layer(Deadlines);
        if let Some(tls) = &self.tls {
            server = server.tls_config(tls.clone().timeout(handshake))?;
        }
        let router = add_services(
            server,
            &self.args,
            &self.engine,
            &self.auth,
            channels.clone(),
            stop_rx.clone(),
        )?;
        let metrics_task = tokio::spawn(telemetry::serve_metrics(
            self.metrics,
            telemetry::metrics_handle(),
        ));
        let jobs = start_jobs(&self.args, &self.engine, &channels, client, &stop_rx);

        tracing::info!(%addr, metrics = %metrics_addr, tls = self.tls.is_some(), "holdfast serving");
        let signal = {
            let stop_tx = stop_tx.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
                set_health(&health, ServingStatus::NotServing).await;
                let _ = stop_tx.send(true);
            }
        };
        let serving = router
            .add_service(health_service)
            .serve_with_incoming_shutdown(accept::connections(self.grpc, handshake), signal);
        // Once stopping, connections get the grace period to finish their
        // calls and close. Without a bound, one whose client vanished (or
        // never answers HTTP/2's pings, which the graceful close waits on)
        // held the daemon until keepalive gave up on it, past any
        // orchestrator's patience.
        let grace = Duration::from_secs(self.args.shutdown_grace_secs);
        let mut stopping = stop_rx.clone();
        let served = tokio::select! {
            served = serving => served,
            _ = async {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "connections still open after the grace period; not waiting for them");
                Ok(())
            }
        };

        let _ = stop_tx.send(true);
        if tokio::time::timeout(grace, futures_join(jobs))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "background jobs did not stop within the grace period"
            );
        }
        metrics_task.abort();
        tracing::info!("holdfast stopped");
        Ok(served?)
    }
}

/// Sets every service's health (and the server's, "").
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in SERVICES.iter().chain(&[""]) {
        health.set_service_status(*service, status).await;
    }
}

/// Starts the background jobs; each stops when `stop` turns true.
fn start_jobs(
    args: &ServeArgs,
    engine: &Arc<Engine>,
    channels: &Arc<Channels>,
    client: SatelliteClient,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let tenants = Arc::new(Tenants::new(engine.pg().clone()));
    let mut jobs = vec![
        tokio::spawn(drainer::run(
            engine.redis().clone(),
            engine.pg().clone(),
            tenants.clone(),
            format!("holdfast-{}", args.redis_prefix),
            Duration::from_secs(args.event_keep_secs),
            stop.clone(),
        )),
        tokio::spawn(sweeper::run(
            engine.clone(),
            tenants.clone(),
            Duration::from_millis(args.sweep_interval_ms),
            args.expired_states_per_round(),
            stop.clone(),
        )),
        tokio::spawn(sweeper::run_fallback(
            engine.clone(),
            Duration::from_millis(args.sweep_interval_ms),
            stop.clone(),
        )),
        tokio::spawn(refiller::run(engine.clone(), tenants, stop.clone())),
        tokio::spawn(redis_watch::run(engine.clone(), stop.clone())),
        tokio::spawn(statistics::run(engine.pg().clone(), stop.clone())),
        tokio::spawn(outbox::run(
            engine.pg().clone(),
            client,
            args.outbox(),
            stop.clone(),
        )),
    ];
    if args.reconcile_interval_secs > 0 {
        jobs.push(tokio::spawn(reconciler::run(
            channels.clone(),
            Duration::from_secs(args.reconcile_interval_secs),
            stop.clone(),
        )));
    }
    jobs
}

/// The layers in front of every service: each call's deadline.
type Layered = tower_layer::Stack<Deadlines, tower_layer::Identity>;

/// The API's services, each behind its adapter (which checks the caller
/// and the input) and the request size limit, and reflection in both
/// versions (grpcurl 1.8 speaks only v1alpha).
fn add_services(
    mut server: Server<Layered>,
    args: &ServeArgs,
    engine: &Arc<Engine>,
    auth: &Arc<Auth>,
    channels: Arc<Channels>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tonic::transport::server::Router<Layered>> {
    let limits = args.limits();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let flash = FlashSaleApi::new(
        Arc::new(FlashSales::new(engine.clone(), limits.max_batch)),
        auth.clone(),
        limits.clone(),
    );
    let reservations = ReservationApi::new(
        Arc::new(Reservations::new(engine.clone(), limits.max_batch)),
        auth.clone(),
        limits.clone(),
    );
    let slots = SlotApi::new(
        Arc::new(Slots::new(engine.clone(), limits.max_id_len)),
        auth.clone(),
        limits.clone(),
    );
    let sale_locks = SaleLockApi::new(
        Arc::new(SaleLocks::new(
            engine.clone(),
            channels.clone(),
            limits.max_batch,
        )),
        auth.clone(),
        args.lock_limits(),
    );
    let channel_api = ChannelApi::new(channels, auth.clone(), args.max_channel_batch);
    let events = EventApi::new(
        engine.redis().clone(),
        engine.pg().clone(),
        auth.clone(),
        stop,
    );
    let admin = AdminApi::new(engine.clone(), auth.clone(), limits.max_id_len);
    let max = args.max_request_bytes;
    Ok(server
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(FlashSaleServiceServer::new(flash).max_decoding_message_size(max))
        .add_service(ReservationServiceServer::new(reservations).max_decoding_message_size(max))
        .add_service(SlotServiceServer::new(slots).max_decoding_message_size(max))
        .add_service(SaleLockServiceServer::new(sale_locks).max_decoding_message_size(max))
        .add_service(ChannelServiceServer::new(channel_api).max_decoding_message_size(max))
        .add_service(EventServer::new(events, max))
        .add_service(AdminServiceServer::new(admin).max_decoding_message_size(max)))
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// The promises rely on Redis keeping what it acknowledged and never
/// evicting keys; say so loudly when it is set up otherwise.
async fn warn_about_redis_settings(redis: &RedisStore) {
    let con = redis.multiplexed();
    let get = |name: &'static str| {
        let mut con = con.clone();
        async move { crate::store::redis::config_get(&mut con, name).await }
    };
    match get("maxmemory-policy").await.as_deref() {
        Some("noeviction") | None => {}
        Some(policy) => tracing::error!(
            policy,
            "Redis maxmemory-policy is not noeviction: Redis may evict holds and pools; set `maxmemory-policy noeviction`"
        ),
    }
    match (
        get("appendonly").await.as_deref(),
        get("appendfsync").await.as_deref(),
    ) {
        (Some("yes"), Some("always")) | (None, _) => {}
        (aof, fsync) => tracing::warn!(
            appendonly = aof.unwrap_or("?"),
            appendfsync = fsync.unwrap_or("?"),
            "Redis does not fsync every write (appendonly yes + appendfsync always): a Redis crash can lose acknowledged commits, and a Redis that restarts with a pool as it was a moment earlier sells again what it sold after (see README, Durability)"
        ),
    }
}
