//! Where Redis's time goes, per operation, by command: `INFO commandstats`
//! read around each measured run.
//!
//! Debian's `redis-server` is stripped, so a profiler sees no function
//! names in it; Redis's own per-command counters are the profile that is
//! always there, on any Redis the bench can reach (local or not). They
//! answer "is it the script call, or one command inside it?" and "what
//! does a call cost when the load is light?" (deploy/BENCHMARKS.md,
//! 2026-12-04). A script's time (`evalsha`) includes the commands it ran,
//! which are also listed on their own, so the entries do not add up.

use crate::store::redis::config_get;

/// A numeric field of Redis's `INFO <section>` (`used_memory` of
/// `memory`, `process_id` of `server`, `expired_keys` of `stats`); `None`
/// when Redis cannot be asked or does not say.
pub async fn info_number<T: std::str::FromStr>(
    con: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> Option<T> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// How many commands a report names: the costliest, by time.
const TOP: usize = 8;

/// Each command's calls and microseconds so far, at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot(Vec<(String, u64, u64)>);

impl Snapshot {
    /// Reads Redis's counters; `None` when Redis cannot be asked (the
    /// report then leaves the line out rather than failing the run).
    pub async fn read(con: &mut redis::aio::MultiplexedConnection) -> Option<Self> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(con)
            .await
            .ok()?;
        Some(Self::parse(&info))
    }

    /// Calls of `name` between `self` (before) and `after`.
    pub fn calls_between(&self, after: &Snapshot, name: &str) -> u64 {
        let calls = |s: &Snapshot| {
            s.0.iter()
                .find(|(n, ..)| n == name)
                .map_or(0, |(_, calls, _)| *calls)
        };
        calls(after).saturating_sub(calls(self))
    }

    /// `cmdstat_NAME:calls=C,usec=U,...` lines; others are skipped.
    fn parse(info: &str) -> Self {
        Self(
            info.lines()
                .filter_map(|l| {
                    let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                    let field = |key: &str| {
                        rest.split(',')
                            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    };
                    Some((name.to_string(), field("calls")?, field("usec")?))
                })
                .collect(),
        )
    }

    /// The costliest commands between `self` (before) and `after`, over
    /// `ops` operations, as `name=µs/calls` per operation:
    /// "evalsha=24.1/0.050 hset=2.3/1.000 ...".
    pub fn per_op(&self, after: &Snapshot, ops: u64) -> String {
        let ops = ops.max(1) as f64;
        let mut spent: Vec<(&str, u64, u64)> = after
            .0
            .iter()
            .map(|(name, calls, usec)| {
                let (c0, u0) = self
                    .0
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .map_or((0, 0), |(_, c, u)| (*c, *u));
                (
                    name.as_str(),
                    calls.saturating_sub(c0),
                    usec.saturating_sub(u0),
                )
            })
            .filter(|(_, calls, _)| *calls > 0)
            .collect();
        spent.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
        spent
            .iter()
            .take(TOP)
            .map(|(name, calls, usec)| {
                format!(
                    "{name}={:.1}/{:.3}",
                    *usec as f64 / ops,
                    *calls as f64 / ops
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// How the Redis under test persists writes, from `CONFIG GET`:
/// `aof-always` (the production setting the README documents),
/// `aof-everysec`, `aof-no`, `none`, or `unknown` when Redis will not say
/// (managed services often disable CONFIG). The same run's figures differ
/// by a third between `none` and `aof-always` (deploy/BENCHMARKS.md,
/// "what durable Redis costs"), so every report says which it was.
pub async fn persistence(con: Option<&mut redis::aio::MultiplexedConnection>) -> String {
    let Some(con) = con else {
        return "unknown".into();
    };
    let aof = config_get(con, "appendonly").await;
    let fsync = config_get(con, "appendfsync").await;
    describe_persistence(aof.as_deref(), fsync.as_deref())
}

/// [`persistence`]'s answer from the two settings.
fn describe_persistence(appendonly: Option<&str>, appendfsync: Option<&str>) -> String {
    match (appendonly, appendfsync) {
        (Some("yes"), Some(fsync)) => format!("aof-{fsync}"),
        (Some("no"), _) => "none".into(),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{Snapshot, describe_persistence};

    const BEFORE: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=10,usec=300,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_hset:calls=100,usec=200,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n";
    const AFTER: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=30,usec=2300,usec_per_call=76.67,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_hset:calls=300,usec=700,usec_per_call=2.33,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_xreadgroup:calls=4,usec=800,usec_per_call=200.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_ping:calls=5,usec=0,usec_per_call=0.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn a_report_gives_each_commands_time_and_calls_per_operation_costliest_first() {
        let (before, after) = (Snapshot::parse(BEFORE), Snapshot::parse(AFTER));
        assert_eq!(before.0.len(), 2);
        // 200 operations: evalsha 2000 µs over 20 calls, xreadgroup (new
        // since `before`) 800 over 4, hset 500 over 200; ping took no time
        // but was called, so it is listed last.
        assert_eq!(
            before.per_op(&after, 200),
            "evalsha=10.0/0.100 xreadgroup=4.0/0.020 hset=2.5/1.000 ping=0.0/0.025"
        );
    }

    #[test]
    fn commands_not_called_during_the_run_are_left_out() {
        let after = Snapshot::parse(AFTER);
        assert_eq!(after.per_op(&after, 100), "");
        assert_eq!(
            Snapshot::parse("# Commandstats\r\nnot a stat\r\n").0,
            vec![]
        );
    }

    #[test]
    fn persistence_is_named_by_both_settings_and_unknown_when_redis_will_not_say() {
        assert_eq!(
            describe_persistence(Some("yes"), Some("always")),
            "aof-always"
        );
        assert_eq!(
            describe_persistence(Some("yes"), Some("everysec")),
            "aof-everysec"
        );
        assert_eq!(describe_persistence(Some("no"), Some("always")), "none");
        assert_eq!(describe_persistence(None, None), "unknown");
        assert_eq!(describe_persistence(Some("yes"), None), "unknown");
    }
}
