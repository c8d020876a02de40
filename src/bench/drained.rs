//! Waiting for the daemon's drainer to catch up with Redis's event log
//! before a measurement starts.
//!
//! The drainer writes each event of a run to Postgres after the run's
//! calls are answered (src/jobs/drainer.rs). Until 2026-12-05 the next
//! measurement started at once, so it shared the machine with the last
//! one's write-back: the following workload, the Redis limit (100,000
//! events of its own) and `pgbench` (on the Postgres being written to)
//! each ran beside work that was not theirs. How long the wait takes is
//! itself a figure: how far Postgres's record trails a run at full load.
//!
//! The bench's own Postgres is also vacuumed before each measured run
//! ([`vacuum`]), so that what autovacuum owes for the last workload's
//! rows does not land in this one's five seconds.

use std::time::{Duration, Instant};

use redis::Value;
use redis::aio::MultiplexedConnection;
use sqlx::Connection;

use crate::store::redis::{Keys, text};

/// Waits until the drainer's consumer group has read every entry of
/// `stream` and acknowledged them all, for at most `limit`: how long it
/// waited, or `None` when it did not catch up in time (or the stream or
/// its group cannot be read: a daemon that never wrote there).
pub async fn settle(
    con: &mut MultiplexedConnection,
    stream: &str,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if caught_up(con, stream).await? {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`settle`] for the daemon the bench starts (`serve --dev` under the
/// default key prefix): its one tenant's stream, for at most a minute,
/// saying so when the drainer did not catch up (the run is measured
/// anyway).
pub async fn settle_dev(con: &mut MultiplexedConnection) -> Option<Duration> {
    let stream = Keys::new("hf").events(&super::dev_tenant());
    let waited = settle(con, &stream, Duration::from_secs(60)).await;
    if waited.is_none() {
        eprintln!(
            "bench: the drainer's progress could not be read, or it did not catch up within a minute; measuring anyway"
        );
    }
    waited
}

/// Vacuums and analyses every table of the database at `url`: how long
/// it took, or what went wrong. lock-complete makes 100,000 cards with
/// their listing rows; in run D (deploy/BENCHMARKS.md, 2026-12-06, 00:20)
/// the slot-confirm run after it found Postgres at 68 µs an operation
/// against 23 the run before, autovacuum and the statistics job still
/// working through those tables. Done here, that work happens between
/// measurements, and each workload starts on a Postgres with nothing
/// owed. A running shop's autovacuum comes when it comes; a figure to
/// set beside another run's should not depend on where it fell.
pub async fn vacuum(url: &str) -> Result<Duration, sqlx::Error> {
    let started = Instant::now();
    let mut con = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(&mut con).await?;
    con.close().await?;
    Ok(started.elapsed())
}

/// True when the group's last delivered entry is the stream's last one
/// and none is pending; `None` when either cannot be read.
async fn caught_up(con: &mut MultiplexedConnection, stream: &str) -> Option<bool> {
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(con)
        .await
        .ok()?;
    let last = field(&info, "last-generated-id")?;
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(con)
        .await
        .ok()?;
    let Value::Array(groups) = groups else {
        return None;
    };
    let group = groups
        .iter()
        .find(|g| field(g, "name").as_deref() == Some(crate::jobs::drainer::GROUP))?;
    let delivered = field(group, "last-delivered-id")?;
    let pending = field(group, "pending")?;
    Some(delivered == last && pending == "0")
}

/// `name`'s value in a reply of name-value pairs (a RESP2 flat array or a
/// RESP3 map), as text.
fn field(reply: &Value, name: &str) -> Option<String> {
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some(name))
            .and_then(|kv| kv.get(1).and_then(text)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_read_from_either_shape() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let flat = Value::Array(vec![
            bulk("name"),
            bulk("drainer"),
            bulk("pending"),
            Value::Int(3),
        ]);
        assert_eq!(field(&flat, "pending").as_deref(), Some("3"));
        assert_eq!(field(&flat, "name").as_deref(), Some("drainer"));
        assert_eq!(field(&flat, "lag"), None);
        let map = Value::Map(vec![(bulk("pending"), Value::Int(0))]);
        assert_eq!(field(&map, "pending").as_deref(), Some("0"));
    }
}
