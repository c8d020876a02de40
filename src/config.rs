//! The command line. Every flag has an environment fallback
//! (`HOLDFAST_*`), shown by `--help`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::Limits;
use crate::telemetry::LogFormat;

/// holdfast: a gRPC daemon that never sells the same unit twice.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: migrate Postgres, then serve gRPC and /metrics.
    Serve(Box<ServeArgs>),
    /// Run the Postgres migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage API keys.
    Keys {
        /// create or revoke.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Load-test a daemon over gRPC beside its physical limits (see
    /// deploy/BENCHMARKS.md; deploy/bench.sh runs it with its own servers).
    Bench(Box<crate::bench::BenchArgs>),
}

/// `holdfast keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for one tenant and role; prints the key once (only its
    /// hash is stored).
    Create {
        /// The tenant (store or workspace) the key acts for: [a-z0-9_-].
        #[arg(long)]
        tenant: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Postgres.
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revoke a key by its id (the part after `hf_` and before the next `_`).
    Revoke {
        /// The key id printed by `keys create`.
        key_id: String,
        /// Postgres.
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// A key's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Claim, reserve, commit, release, lock: what a checkout backend does.
    Checkout,
    /// Everything, including creating sales and pools.
    Admin,
}

/// Where Postgres is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres URL, the system of record.
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL",
        default_value = "postgres://holdfast@127.0.0.1:5432/holdfast"
    )]
    pub database_url: String,
}

/// `holdfast serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address for the gRPC API (health and reflection included).
    #[arg(long, env = "HOLDFAST_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Address for Prometheus's /metrics.
    #[arg(long, env = "HOLDFAST_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    /// Redis URL, the fast path. Run Redis with `maxmemory-policy
    /// noeviction` and, in production, `appendonly yes` + `appendfsync
    /// always` (see the README).
    #[arg(
        long,
        env = "HOLDFAST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Postgres.
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Log format.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Prefix of every Redis key, so several instances can share a Redis.
    #[arg(long, env = "HOLDFAST_REDIS_PREFIX", default_value = "hf")]
    pub redis_prefix: String,

    /// Development mode: no authentication, every call acts for the tenant
    /// "dev" with the admin role. Never use it where others can connect.
    #[arg(long, env = "HOLDFAST_DEV")]
    pub dev: bool,

    /// API keys given by configuration, for small set-ups, each
    /// `TENANT:ROLE:KEY` (role checkout or admin); comma-separated in the
    /// environment. Keys created with `holdfast keys create` live in
    /// Postgres and need no flag.
    #[arg(
        long = "api-key",
        env = "HOLDFAST_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Time to live of a hold when the caller gives none, seconds.
    #[arg(long, env = "HOLDFAST_DEFAULT_HOLD_TTL_SECS", default_value_t = 900)]
    pub default_hold_ttl_secs: u64,

    /// Shortest time to live a caller may ask for, seconds.
    #[arg(long, env = "HOLDFAST_MIN_HOLD_TTL_SECS", default_value_t = 1)]
    pub min_hold_ttl_secs: u64,

    /// Longest time to live a caller may ask for, seconds.
    #[arg(long, env = "HOLDFAST_MAX_HOLD_TTL_SECS", default_value_t = 86_400)]
    pub max_hold_ttl_secs: u64,

    /// How many times a hold may be extended.
    #[arg(long, env = "HOLDFAST_MAX_EXTENSIONS", default_value_t = 1)]
    pub max_extensions: u32,

    /// Most lines (products) in one batch.
    #[arg(long, env = "HOLDFAST_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Largest quantity of one line.
    #[arg(long, env = "HOLDFAST_MAX_QUANTITY", default_value_t = 1_000_000)]
    pub max_quantity: i64,

    /// Most active holds one tenant may have at once (a memory bound);
    /// more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "HOLDFAST_MAX_ACTIVE_HOLDS_PER_TENANT",
        default_value_t = 1_000_000
    )]
    pub max_active_holds_per_tenant: u64,

    /// Largest request message, bytes; larger ones are refused by the gRPC
    /// layer with OUT_OF_RANGE before they are parsed (a memory bound).
    #[arg(long, env = "HOLDFAST_MAX_REQUEST_BYTES", default_value_t = 1 << 20)]
    pub max_request_bytes: usize,

    /// PEM certificate chain for TLS on the gRPC port (with --tls-key);
    /// without both, gRPC is plaintext (for loopback or a TLS-terminating
    /// proxy).
    #[arg(long, env = "HOLDFAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "HOLDFAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate(s): when set, every client must present a
    /// certificate signed by one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "HOLDFAST_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// How long a new connection to the gRPC port may take to open (the TLS
    /// handshake, or a plaintext client's first HTTP/2 bytes), seconds; one
    /// that has not by then is closed, so connections that never speak
    /// cannot use up the daemon's file descriptors.
    #[arg(
        long,
        env = "HOLDFAST_HANDSHAKE_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub handshake_timeout_secs: u64,

    /// Seconds between HTTP/2 pings on each gRPC connection; a client that
    /// does not answer one within --http2-keepalive-timeout-secs is
    /// disconnected, so the connections of clients that vanished (a host
    /// gone, a NAT or load balancer that forgot the flow) are closed rather
    /// than kept forever. 0 turns the pings off. gRPC clients answer pings
    /// by themselves.
    #[arg(long, env = "HOLDFAST_HTTP2_KEEPALIVE_SECS", default_value_t = 60)]
    pub http2_keepalive_secs: u64,

    /// How long a client may take to answer an HTTP/2 ping, seconds.
    #[arg(
        long,
        env = "HOLDFAST_HTTP2_KEEPALIVE_TIMEOUT_SECS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub http2_keepalive_timeout_secs: u64,

    /// How long finished holds and claims are remembered, so that a retry
    /// with the same id returns the first answer, seconds.
    #[arg(long, env = "HOLDFAST_RETENTION_SECS", default_value_t = 86_400)]
    pub retention_secs: u64,

    /// How long events stay in Redis's stream after they are written to
    /// Postgres, seconds. A Watch that resumes from a newer id reads Redis;
    /// from an older one, Postgres's audit log first. Each event costs about
    /// 90 bytes of Redis memory while kept.
    #[arg(long, env = "HOLDFAST_EVENT_KEEP_SECS", default_value_t = 60)]
    pub event_keep_secs: u64,

    /// How often the sweeper finalises expired holds, milliseconds.
    #[arg(long, env = "HOLDFAST_SWEEP_INTERVAL_MS", default_value_t = 100)]
    pub sweep_interval_ms: u64,

    /// Most expired holds a second, per tenant, whose EXPIRED state (event,
    /// audit row, webhook) this daemon's sweeper writes (daemons sharing a
    /// Redis each write as many). Their units go back as they
    /// expire, a 50 ms bucket at a time, whatever this is; it only paces
    /// the per-hold writes after a burst of expiries (100,000 at once take
    /// 10 s at the default). Higher: those events sooner; lower: more of
    /// Redis left to the sales made meanwhile. A tenant more than 30 s
    /// behind is caught up at once.
    #[arg(long, env = "HOLDFAST_EXPIRED_STATES_PER_SEC", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub expired_states_per_sec: u32,

    /// How long one Redis call may take before it fails with UNAVAILABLE,
    /// milliseconds.
    #[arg(long, env = "HOLDFAST_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,

    /// Time to live of a sale lock when the caller gives none, seconds.
    #[arg(long, env = "HOLDFAST_DEFAULT_LOCK_TTL_SECS", default_value_t = 600)]
    pub default_lock_ttl_secs: u64,

    /// Shortest sale-lock time to live a caller may ask for, seconds.
    #[arg(long, env = "HOLDFAST_MIN_LOCK_TTL_SECS", default_value_t = 1)]
    pub min_lock_ttl_secs: u64,

    /// Longest sale-lock time to live a caller may ask for, seconds (a
    /// day: a hosted checkout session's life).
    #[arg(long, env = "HOLDFAST_MAX_LOCK_TTL_SECS", default_value_t = 86_400)]
    pub max_lock_ttl_secs: u64,

    /// Most cards in one engage, disengage, reconcile or read of cards.
    #[arg(long, env = "HOLDFAST_MAX_CHANNEL_BATCH", default_value_t = 5000)]
    pub max_channel_batch: usize,

    /// How often the outbox is polled for webhooks to deliver,
    /// milliseconds; a satellite's backlog is sent one webhook after
    /// another for up to this long a round.
    #[arg(long, env = "HOLDFAST_OUTBOX_INTERVAL_MS", default_value_t = 200)]
    pub outbox_interval_ms: u64,

    /// How long one webhook delivery (or list pull) may take, milliseconds.
    #[arg(long, env = "HOLDFAST_WEBHOOK_TIMEOUT_MS", default_value_t = 5000)]
    pub webhook_timeout_ms: u64,

    /// Wait after a failed delivery, milliseconds; doubled after each
    /// further failure.
    #[arg(long, env = "HOLDFAST_WEBHOOK_BACKOFF_BASE_MS", default_value_t = 1000)]
    pub webhook_backoff_base_ms: u64,

    /// Longest wait between delivery attempts, seconds. Deliveries are
    /// retried until acknowledged. A satellite back from an outage waits
    /// up to this long for its backlog unless it calls RetryDeliveries,
    /// and its channel lists the cards sold elsewhere meanwhile; an
    /// attempt on a satellite that is down costs one request and one
    /// update.
    #[arg(long, env = "HOLDFAST_WEBHOOK_BACKOFF_MAX_SECS", default_value_t = 60)]
    pub webhook_backoff_max_secs: u64,

    /// How long an acknowledged webhook stays in the outbox, seconds, for
    /// ListDeliveries to show; then it is deleted. 0 keeps every one. A
    /// webhook row is ~650 bytes, and a shop selling a card a second
    /// with two satellites writes ~170,000 a day.
    #[arg(
        long,
        env = "HOLDFAST_DELIVERY_RETENTION_SECS",
        default_value_t = 604_800
    )]
    pub delivery_retention_secs: u64,

    /// Hosts satellites may be on, comma-separated: names, or `*.domain`
    /// for every name under it. Empty (the default): any host. Set it where
    /// tenants' admins are not the operator's own, so that a satellite URL
    /// cannot point the daemon at the operator's other services;
    /// PutSatellite refuses other hosts, and nothing is sent to them.
    #[arg(long, env = "HOLDFAST_SATELLITE_HOSTS", value_delimiter = ',')]
    pub satellite_hosts: Vec<String>,

    /// How often each satellite's canonical card list is pulled and
    /// reconciled, seconds; 0 turns the periodic pull off.
    #[arg(long, env = "HOLDFAST_RECONCILE_INTERVAL_SECS", default_value_t = 300)]
    pub reconcile_interval_secs: u64,
    /// Share of a pool's remaining capacity one grant moves to Redis; the
    /// rest stays in Postgres, for the fallback to sell while Redis is down.
    #[arg(long, env = "HOLDFAST_GRANT_FRACTION", default_value_t = 0.5)]
    pub grant_fraction: f64,

    /// Most units one grant moves to Redis, for a pool that sells slowly.
    #[arg(long, env = "HOLDFAST_GRANT_CHUNK", default_value_t = 1000)]
    pub grant_chunk: i64,

    /// Most units one grant moves to Redis for a pool that sells fast. A
    /// pool's grants grow toward a second of its recent sales (at most four
    /// times the last grant each time), so a flash sale's claims do not
    /// wait for grants. What Redis holds when it is lost goes in doubt
    /// until an operator resolves it, so this bounds that too; set it to
    /// --grant-chunk for grants of a fixed size.
    #[arg(long, env = "HOLDFAST_GRANT_MAX_CHUNK", default_value_t = 100_000)]
    pub grant_max_chunk: i64,

    /// Most Postgres connections.
    #[arg(long, env = "HOLDFAST_PG_MAX_CONNECTIONS", default_value_t = 16)]
    pub pg_max_connections: u32,

    /// On shutdown, how long in-flight calls may take to finish and their
    /// connections to close (those left are then closed), and then how
    /// long the background jobs (drainer, sweeper, outbox, ...) may take to
    /// stop, seconds.
    #[arg(long, env = "HOLDFAST_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl ServeArgs {
    /// The input limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_batch: self.max_batch,
            max_quantity: self.max_quantity,
            max_id_len: Limits::default().max_id_len,
            min_ttl: Duration::from_secs(self.min_hold_ttl_secs),
            max_ttl: Duration::from_secs(self.max_hold_ttl_secs),
            default_ttl: Duration::from_secs(self.default_hold_ttl_secs),
            max_extensions: self.max_extensions,
        }
    }

    /// The EXPIRED states one sweeper round writes per tenant
    /// (`--expired-states-per-sec` over the rounds of a second), at least
    /// one.
    pub fn expired_states_per_round(&self) -> i64 {
        (i64::from(self.expired_states_per_sec) * self.sweep_interval_ms as i64 / 1_000).max(1)
    }

    /// The limits of sale-lock requests: the input limits with the lock
    /// TTL bounds.
    pub fn lock_limits(&self) -> Limits {
        Limits {
            min_ttl: Duration::from_secs(self.min_lock_ttl_secs),
            max_ttl: Duration::from_secs(self.max_lock_ttl_secs),
            default_ttl: Duration::from_secs(self.default_lock_ttl_secs),
            ..self.limits()
        }
    }

    /// How the outbox job delivers webhooks.
    pub fn outbox(&self) -> crate::jobs::outbox::OutboxSettings {
        crate::jobs::outbox::OutboxSettings {
            interval: Duration::from_millis(self.outbox_interval_ms),
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            backoff_base: Duration::from_millis(self.webhook_backoff_base_ms),
            backoff_max: Duration::from_secs(self.webhook_backoff_max_secs),
            retention: (self.delivery_retention_secs > 0)
                .then(|| Duration::from_secs(self.delivery_retention_secs)),
        }
    }

    /// The escrow grant policy these flags set.
    pub fn grant_policy(&self) -> crate::engine::GrantPolicy {
        crate::engine::GrantPolicy {
            fraction: self.grant_fraction.clamp(0.01, 1.0),
            chunk: self.grant_chunk.max(1),
            max_chunk: self.grant_max_chunk.max(self.grant_chunk).max(1),
        }
    }

    /// Settings for a daemon on loopback ephemeral ports, for tests and
    /// tools: everything else at its default.
    pub fn for_test(redis_url: &str, database_url: &str, redis_prefix: &str) -> Self {
        let mut args = Cli::parse_from(["holdfast", "serve", "--dev"]);
        let Command::Serve(serve) = &mut args.command else {
            unreachable!("parsed a serve command")
        };
        serve.grpc_addr = "127.0.0.1:0".parse().expect("valid address");
        serve.metrics_addr = "127.0.0.1:0".parse().expect("valid address");
        serve.redis_url = redis_url.into();
        serve.db.database_url = database_url.into();
        serve.redis_prefix = redis_prefix.into();
        (**serve).clone()
    }
}
