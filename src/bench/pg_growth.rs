//! What each sale leaves in Postgres (`--probe pg-growth`): the bytes its
//! tables and their indexes grow by, and the WAL written, per operation of
//! each workload named (a claim and a consumed reservation when none is).
//!
//! Redis forgets a finished hold after `--retention-secs`; Postgres keeps
//! its audit rows for good (the log is append-only, the system of record),
//! so a shop sizing its database, its backups and its replication link
//! asks what a sale costs there. Measured through the daemon, after its
//! drainer has written every audit row of the run: the growth of every table
//! of the database (heap, indexes, TOAST), of `audit_log` alone, and the
//! WAL between the two reads. Tables grow by whole 8 kB pages, so the
//! figures are exact only over many operations (the probe makes
//! `--holds`, 100,000 by default); WAL includes the full-page images a
//! checkpoint in the middle causes, as it would in a shop.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tonic::transport::Channel;

use super::load::Plan;
use super::workloads::{self, Caller, Workload};

/// How long the drainer may take to write a run's events before the probe
/// gives up on it.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// What `made` operations of one workload left in Postgres.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    /// The workload.
    pub workload: Workload,
    /// Operations that finished (the per-operation figures divide by it).
    pub made: u64,
    /// Audit rows the run added (a claim makes one, a two-step operation
    /// two).
    pub audit_rows: i64,
    /// Growth of every table of the database, indexes and TOAST included.
    pub bytes: i64,
    /// Growth of `audit_log`, its indexes included.
    pub audit_bytes: i64,
    /// WAL written meanwhile.
    pub wal_bytes: i64,
}

impl Growth {
    /// `value` per operation made.
    fn per(&self, value: i64) -> f64 {
        value as f64 / self.made.max(1) as f64
    }

    /// The probe's report line.
    pub fn line(&self) -> String {
        format!(
            "bench-probe: pg-growth workload={} made={} audit_rows={} bytes_per_op={:.0} audit_log_bytes_per_op={:.0} wal_bytes_per_op={:.0}",
            self.workload.name(),
            self.made,
            self.audit_rows,
            self.per(self.bytes),
            self.per(self.audit_bytes),
            self.per(self.wal_bytes)
        )
    }
}

/// The workloads the probe runs when none is named: a claim, and a
/// reservation that is consumed.
pub const DEFAULT: [Workload; 2] = [Workload::ClaimHot, Workload::ReserveCommit];

/// Runs `n` operations of each of `driven` (one after the other) through
/// the daemon at `channels`, whose Postgres is `database_url`, and
/// measures what each workload's finished operations left there. Nothing
/// else should write to that database meanwhile: the growth is the whole
/// database's.
pub async fn run(
    driven: &[Workload],
    channels: &[Channel],
    caller: &Caller,
    database_url: &str,
    clients: usize,
    n: u64,
) -> anyhow::Result<Vec<Growth>> {
    let mut pg = PgConnection::connect(database_url).await?;
    let mut found = Vec::new();
    for &w in driven {
        if w.audit_trail().is_none() {
            anyhow::bail!(
                "pg-growth measures workloads whose operations finish; {} mostly refuses",
                w.name()
            );
        }
        // A tag of its own, so that the audit rows counted below are this
        // run's (not an earlier measurement's, nor another workload's with
        // the same letter). What the workload needs (its cards, sales,
        // venue) is made before the first size is read: the probe measures
        // the operations.
        let caller = &caller.retagged();
        workloads::setup(w, &channels[0], caller).await?;
        let before = Sizes::read(&mut pg).await?;
        let (made, audit_rows) = run_written(w, channels, caller, clients, n, &mut pg).await?;
        let after = Sizes::read(&mut pg).await?;
        found.push(Growth {
            workload: w,
            made,
            audit_rows,
            bytes: after.tables - before.tables,
            audit_bytes: after.audit - before.audit,
            wal_bytes: after.wal - before.wal,
        });
    }
    pg.close().await?;
    Ok(found)
}

/// Runs `n` operations of `w` (set up already) as `caller`, and waits
/// until the drainer has written their audit rows to `pg`: how many
/// operations finished, and their rows. The caller's tag must be the
/// run's own (see [`Caller::retagged`]): the rows are counted by it.
pub(super) async fn run_written(
    w: Workload,
    channels: &[Channel],
    caller: &Caller,
    clients: usize,
    n: u64,
    pg: &mut PgConnection,
) -> anyhow::Result<(u64, i64)> {
    let Some((letter, finished, rows_each)) = w.audit_trail() else {
        anyhow::bail!("{} leaves no audit rows to wait for", w.name());
    };
    let plan = Plan {
        clients,
        duration: Duration::from_secs(600),
        rate: None,
        max_calls: Some(n),
    };
    let run = workloads::run(w, channels, &plan, caller).await;
    let made = run.outcomes.get(finished).copied().unwrap_or(0);
    // Each operation's hold id starts with its letter and the tag
    // (workloads.rs).
    let pattern = format!("{letter}{}n%", caller.tag);
    let rows = audit_rows_written(pg, &pattern, made as i64 * rows_each).await?;
    Ok((made, rows))
}

/// Waits until `audit_log` holds `expected` rows of holds whose id is
/// LIKE `pattern`: the drainer has written the run. Returns how many it
/// holds.
async fn audit_rows_written(
    pg: &mut PgConnection,
    pattern: &str,
    expected: i64,
) -> anyhow::Result<i64> {
    let started = Instant::now();
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE hold_id LIKE $1")
            .bind(pattern)
            .fetch_one(&mut *pg)
            .await?;
        if rows >= expected {
            return Ok(rows);
        }
        if started.elapsed() > DRAIN_LIMIT {
            anyhow::bail!(
                "the drainer wrote {rows} of the run's {expected} audit rows in {} s; is the daemon's Postgres the one given by --database-url?",
                DRAIN_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The database's size and WAL position at one moment.
struct Sizes {
    tables: i64,
    audit: i64,
    wal: i64,
}

impl Sizes {
    async fn read(pg: &mut PgConnection) -> anyhow::Result<Self> {
        let (tables, audit, wal): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint
                       FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                      WHERE c.relkind IN ('r', 'm') AND s.nspname NOT IN ('pg_catalog', 'information_schema')),
                    pg_total_relation_size('audit_log'),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        )
        .fetch_one(&mut *pg)
        .await?;
        Ok(Self { tables, audit, wal })
    }
}
