//! Logs (tracing, human text or JSON) and metrics (Prometheus).
//!
//! Metric names are constants in [`metric`], each described once at start
//! by [`describe_metrics`]. The recorder is process-wide; the `/metrics`
//! endpoint is served by [`serve_metrics`] on a listener the caller bound,
//! so tests can use port 0.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Every metric's name.
pub mod metric {
    /// Counter: RPCs by service, method and gRPC code.
    pub const RPC_TOTAL: &str = "holdfast_rpc_total";
    /// Histogram: RPC latency by service and method.
    pub const RPC_SECONDS: &str = "holdfast_rpc_duration_seconds";
    /// Counter: engine outcomes by job (claimed, sold_out, reserved,
    /// committed, released, expired, ...).
    pub const ENGINE_OUTCOMES: &str = "holdfast_engine_outcomes_total";
    /// Histogram: Redis script latency by script.
    pub const REDIS_SCRIPT_SECONDS: &str = "holdfast_redis_script_duration_seconds";
    /// Histogram: hold operations per coalesced Redis call (store/redis/batch.rs).
    pub const REDIS_BATCH_OPS: &str = "holdfast_redis_batch_ops";
    /// Histogram: takes per coalesced fallback transaction (store/postgres/take_queue.rs).
    pub const PG_BATCH_TAKES: &str = "holdfast_fallback_batch_takes";
    /// Histogram: pool reads answered by one read of both stores (engine/reads.rs).
    pub const POOL_READ_BATCH_OPS: &str = "holdfast_pool_read_batch_ops";
    /// Counter: events the drainer wrote to Postgres.
    pub const DRAINED_EVENTS: &str = "holdfast_drainer_events_total";
    /// Gauge: events in the streams not yet written to Postgres.
    pub const DRAINER_LAG_EVENTS: &str = "holdfast_drainer_lag_events";
    /// Gauge: age of the newest event the drainer wrote, when written.
    pub const DRAINER_LAG_SECONDS: &str = "holdfast_drainer_lag_seconds";
    /// Counter: drainer batches that failed (and will be retried).
    pub const DRAINER_ERRORS: &str = "holdfast_drainer_errors_total";
    /// Histogram: how long after its expiry a hold's EXPIRED state was
    /// written (its units went back with its bucket's before: lua/lib.lua).
    pub const SWEEPER_LAG_SECONDS: &str = "holdfast_sweeper_lag_seconds";
    /// Gauge: units in doubt after a store failure, summed over pools.
    pub const IN_DOUBT_UNITS: &str = "holdfast_in_doubt_units";
    /// Counter: requests served, by path (`redis`, or `postgres` when the
    /// fallback served them).
    pub const SERVED_BY: &str = "holdfast_requests_served_total";
    /// Gauge: 1 while the Redis circuit is open (the fallback serves).
    pub const CIRCUIT_OPEN: &str = "holdfast_redis_circuit_open";
    /// Gauge: webhook deliveries waiting in the outbox.
    pub const OUTBOX_BACKLOG: &str = "holdfast_outbox_backlog";
    /// Counter: webhook delivery attempts that failed.
    pub const OUTBOX_FAILURES: &str = "holdfast_outbox_delivery_failures_total";
    /// Histogram: time spent waiting for a store connection, by pool.
    pub const POOL_WAIT_SECONDS: &str = "holdfast_pool_wait_seconds";
    /// Histogram: how long a take that Redis could not serve from its
    /// grant waited for more (its tenant's grant lock, and each grant its
    /// script asked for), once per such take.
    pub const GRANT_WAIT_SECONDS: &str = "holdfast_grant_wait_seconds";
    /// Gauge: Redis's clock minus the engine's, seconds, when Redis's clock
    /// was stepped (0 while they agree; see store/redis/clock.rs).
    pub const REDIS_CLOCK_OFFSET: &str = "holdfast_redis_clock_offset_seconds";
    /// Gauge: live `Watch` subscriptions.
    pub const WATCH_SUBSCRIBERS: &str = "holdfast_watch_subscribers";
    /// Gauge: tenants whose events a reader hands to live `Watch`
    /// subscribers (taps: src/grpc/event_tap.rs).
    pub const WATCH_TAPS: &str = "holdfast_watch_taps";
    /// Gauge: Redis connections reading the taps' streams, up to 16 taps
    /// each.
    pub const WATCH_READERS: &str = "holdfast_watch_readers";
    /// Counter: `Watch` subscriptions ended, by reason (`client_left`,
    /// `fell_behind`, `shutdown`, `error`).
    pub const WATCH_ENDED: &str = "holdfast_watch_ended_total";
}

/// Buckets for latency histograms: 50 µs to 60 s (the sweeper's lag after
/// a burst of expiries is paced over seconds: `--expired-states-per-sec`).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for batch sizes: 1 to the coalescer's most (128).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and describes every
/// metric. Returns the handle that renders the exposition text.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                // Only fails for an empty bucket list, which this is not.
                .expect("latency buckets are valid")
                .set_buckets_for_metric(Matcher::Suffix("_ops".into()), BATCH_BUCKETS)
                .expect("batch buckets are valid")
                .install_recorder()
                // Only fails if another recorder was installed; this is the one place.
                .expect("no other metrics recorder is installed");
            describe_metrics();
            handle
        })
        .clone()
}

/// Metric handles kept by their labels' values, for labels drawn from a
/// few fixed values (a job and an outcome, a script's name): made at first
/// use, then found by comparing the values. The registry finds a metric by
/// hashing its name and labels (and the macros allocate them), which cost
/// ~2.5 % of the daemon under claim-hot when every operation did it four
/// or five times. A label set past the first `N` is made on each use, as
/// without this. Kept in a `static`, so the recorder must be installed
/// before the first use: `serve` installs it before it listens.
pub struct Handles<K, T, const N: usize> {
    slots: [OnceLock<(K, T)>; N],
}

impl<K: Copy + PartialEq, T: Clone, const N: usize> Handles<K, T, N> {
    /// No handle made yet.
    pub const fn new() -> Self {
        Self {
            slots: [const { OnceLock::new() }; N],
        }
    }

    /// The handle for `key`, made by `make` the first time. Borrowed, so
    /// that using it touches no reference count shared across threads.
    pub fn get(&self, key: K, make: impl Fn(K) -> T) -> Cow<'_, T> {
        for slot in &self.slots {
            let (k, handle) = slot.get_or_init(|| (key, make(key)));
            if *k == key {
                return Cow::Borrowed(handle);
            }
        }
        Cow::Owned(make(key))
    }
}

impl<K: Copy + PartialEq, T: Clone, const N: usize> Default for Handles<K, T, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Describes every metric, so a scrape shows HELP lines from the start.
pub fn describe_metrics() {
    use metric::*;
    describe_counter!(RPC_TOTAL, "RPCs by service, method and gRPC code");
    describe_histogram!(
        RPC_SECONDS,
        Unit::Seconds,
        "RPC latency by service and method"
    );
    describe_counter!(ENGINE_OUTCOMES, "Engine outcomes by job and outcome");
    describe_histogram!(
        REDIS_SCRIPT_SECONDS,
        Unit::Seconds,
        "Redis Lua script latency by script (per operation: from queued to answered)"
    );
    describe_histogram!(
        REDIS_BATCH_OPS,
        "Hold operations sent to Redis in one coalesced script call"
    );
    describe_histogram!(
        PG_BATCH_TAKES,
        "Takes the Postgres fallback ran in one coalesced transaction"
    );
    describe_histogram!(
        POOL_READ_BATCH_OPS,
        "Pool reads (GetSale, GetStockLevels, availability...) answered by one read of both stores"
    );
    describe_counter!(DRAINED_EVENTS, "Events the drainer wrote to Postgres");
    describe_gauge!(
        DRAINER_LAG_EVENTS,
        "Events read from Redis but not yet written to Postgres"
    );
    describe_gauge!(
        DRAINER_LAG_SECONDS,
        Unit::Seconds,
        "Age of the newest event when the drainer wrote it"
    );
    describe_counter!(
        DRAINER_ERRORS,
        "Drainer batches that failed and will be retried"
    );
    describe_histogram!(
        SWEEPER_LAG_SECONDS,
        Unit::Seconds,
        "Time from a hold's expiry to its EXPIRED state (its units go back within its 50 ms bucket's end)"
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Webhook deliveries waiting in the outbox (not yet acknowledged)"
    );
    describe_counter!(
        OUTBOX_FAILURES,
        "Webhook delivery attempts that failed, by event (each is retried)"
    );
    describe_gauge!(
        IN_DOUBT_UNITS,
        "Units kept unavailable after a store failure, awaiting an operator"
    );
    describe_counter!(
        SERVED_BY,
        "Requests served, by path (redis, or postgres while the fallback serves)"
    );
    describe_gauge!(
        CIRCUIT_OPEN,
        "1 while the Redis circuit is open and the Postgres fallback serves"
    );
    describe_histogram!(
        POOL_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent waiting for a store connection, by pool"
    );
    describe_gauge!(WATCH_SUBSCRIBERS, "Live Watch subscriptions");
    describe_gauge!(
        WATCH_TAPS,
        "Tenants with live Watch subscribers, each tenant's stream read once for all of them"
    );
    describe_gauge!(
        WATCH_READERS,
        "Redis connections reading the watched tenants' streams, up to 16 tenants each"
    );
    describe_counter!(
        WATCH_ENDED,
        "Watch subscriptions ended, by reason (client_left, fell_behind: ABORTED, shutdown, error: the stream could not be read)"
    );
    describe_histogram!(
        GRANT_WAIT_SECONDS,
        Unit::Seconds,
        "Time a take waited for Postgres to grant Redis more units (its shop's grant lock included)"
    );
    describe_gauge!(
        REDIS_CLOCK_OFFSET,
        Unit::Seconds,
        "Redis's clock minus the engine's when Redis's clock was stepped (not followed)"
    );
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until the task
/// is dropped. A few lines of HTTP/1.1 instead of a web framework: the
/// endpoint has one page.
pub async fn serve_metrics(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // The request itself does not matter; read it so the client is happy.
            let _ = socket.read(&mut buf).await;
            let body = handle.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// (default `info`). Calling it twice is harmless.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// Where a bound listener really listens (for port 0).
pub fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::Handles;

    #[test]
    fn a_handle_is_made_once_per_key_and_past_the_slots_on_each_use() {
        let made = AtomicUsize::new(0);
        let make = |k: &'static str| {
            made.fetch_add(1, Ordering::Relaxed);
            format!("handle of {k}")
        };
        let handles: Handles<&str, String, 2> = Handles::new();
        for _ in 0..3 {
            assert_eq!(*handles.get("claim", make), "handle of claim");
            assert_eq!(*handles.get("reserve", make), "handle of reserve");
        }
        assert_eq!(made.load(Ordering::Relaxed), 2);
        // A third key finds the slots taken: right handle, made each time.
        assert_eq!(*handles.get("commit", make), "handle of commit");
        assert_eq!(*handles.get("commit", make), "handle of commit");
        assert_eq!(made.load(Ordering::Relaxed), 4);
        assert_eq!(*handles.get("claim", make), "handle of claim");
    }
}
