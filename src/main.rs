//! The `holdfast` binary: parse the command line, set up logs, run.

use clap::Parser;
use holdfast::config::{Cli, Command, KeysCommand, RoleArg};
use holdfast::domain::TenantId;
use holdfast::startup::Application;
use holdfast::store::postgres::PgStore;
use holdfast::telemetry::{self, LogFormat};

/// mimalloc: per-request allocations (protobuf, Redis replies, strings)
/// cost a third less than with glibc's malloc (deploy/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime(&cli.command)?.block_on(run(cli))
}

/// tokio's multi-threaded runtime, as `#[tokio::main]` builds it, except
/// that the daemon and the load generator run without the LIFO slot.
///
/// With the slot, a task woken by the running task runs next. When a batch
/// of claims is answered, each answering stream wakes its HTTP/2
/// connection's task, which then ran before the next stream had written:
/// one `writev` per response. Without it the connection's task queues
/// behind the batch's streams and writes their responses together: under
/// claim-hot half the `writev` calls, the daemon's CPU per claim a fifth
/// less, and 7-16 % more claims a second (deploy/BENCHMARKS.md, "the LIFO
/// slot"). The switch is unstable in tokio, so `.cargo/config.toml` builds
/// with `--cfg tokio_unstable`; a build without it (RUSTFLAGS set by hand
/// replaces that file's flags) keeps the slot and says so at startup.
///
/// The load generator's clients are the same case from the other side:
/// each call wakes its connection's task to write the request. Without
/// the slot the requests of a round of calls go out together (under
/// claim-hot 0.35 write calls a call against 1.2-1.3), and the generator
/// took a quarter less CPU per call (15-16 µs against 20-23),
/// leaving that much more of a shared machine to the daemon it measures;
/// the no-op baseline, driven by the same generator, rose alike
/// (deploy/BENCHMARKS.md, "a lighter load generator").
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if matches!(command, Command::Serve(_) | Command::Bench(_)) {
        without_lifo_slot(&mut builder);
    }
    builder.build()
}

#[cfg(tokio_unstable)]
fn without_lifo_slot(builder: &mut tokio::runtime::Builder) {
    builder.disable_lifo_slot();
}

#[cfg(not(tokio_unstable))]
fn without_lifo_slot(_: &mut tokio::runtime::Builder) {}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            telemetry::init_tracing(args.log_format);
            #[cfg(not(tokio_unstable))]
            tracing::warn!(
                "built without --cfg tokio_unstable (RUSTFLAGS replaces .cargo/config.toml's): \
                 the runtime keeps its LIFO slot, and answers cost more CPU"
            );
            let app = Application::build(*args).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate(db) => {
            telemetry::init_tracing(LogFormat::Text);
            let pg =
                PgStore::connect(&db.database_url, 1, std::time::Duration::from_secs(5)).await?;
            pg.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Keys { command } => keys(command).await,
        Command::Bench(args) => {
            telemetry::init_tracing(LogFormat::Text);
            // Interrupted, the bench's future is dropped, and with it what
            // it started: the daemon child is killed and a frozen Redis
            // thawed.
            tokio::select! {
                done = holdfast::bench::run(*args) => done,
                _ = shutdown_signal() => anyhow::bail!("bench interrupted; the daemon it started is stopped"),
            }
        }
    }
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create { tenant, role, db } => {
            let tenant = TenantId::parse(&tenant)?;
            let pg =
                PgStore::connect(&db.database_url, 1, std::time::Duration::from_secs(5)).await?;
            pg.migrate().await?;
            let role = match role {
                RoleArg::Checkout => "checkout",
                RoleArg::Admin => "admin",
            };
            let (key_id, key, hash) = holdfast::grpc::auth::new_key();
            pg.insert_api_key(&key_id, &tenant, role, &hash).await?;
            eprintln!(
                "created key {key_id} for tenant {tenant} with role {role}; it is shown once, store it now:"
            );
            println!("{key}");
            Ok(())
        }
        KeysCommand::Revoke { key_id, db } => {
            let pg =
                PgStore::connect(&db.database_url, 1, std::time::Duration::from_secs(5)).await?;
            if pg.revoke_api_key(&key_id).await? {
                eprintln!(
                    "revoked key {key_id}; running daemons stop accepting it within 5 seconds"
                );
                Ok(())
            } else {
                anyhow::bail!("no live key with id {key_id}")
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
