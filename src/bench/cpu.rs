//! CPU time by process, per operation: the daemon, Redis, Postgres and
//! the load generator itself, read from /proc around each measured run.
//!
//! A rate on a shared machine moves with whatever else runs; the CPU one
//! operation costs each process moves much less, and it is what a user
//! sizes their machines by ("how many cores of Redis and of Postgres does
//! 5,000 claims a second need?"). It also shows where a change's gain came
//! from without a profiler. Redis and Postgres are found by asking them
//! for their process id, so this works only when they run on this machine
//! (as with deploy/bench.sh); otherwise their figures are left out.

use std::collections::HashMap;

use sqlx::Connection;

/// The processes to watch; each a root whose children count too
/// (Postgres's backends, Redis's forks).
#[derive(Debug, Default, Clone)]
pub struct Watched {
    roots: Vec<(&'static str, u32)>,
}

impl Watched {
    /// The load generator (this process), the daemon when the bench
    /// started it, and Redis and Postgres when they are local.
    pub async fn find(daemon: Option<u32>, redis_url: &str, database_url: &str) -> Self {
        let mut roots = vec![("loadgen", std::process::id())];
        if let Some(pid) = daemon {
            roots.push(("daemon", pid));
        }
        if let Some(pid) = redis_pid(redis_url).await.filter(|p| is_local(*p)) {
            roots.push(("redis", pid));
        }
        if let Some(pid) = postmaster_pid(database_url).await.filter(|p| is_local(*p)) {
            roots.push(("postgres", pid));
        }
        Self { roots }
    }

    /// Every root's CPU so far, in clock ticks.
    pub fn sample(&self) -> Sample {
        let mut children = children_by_parent();
        // A root is counted once, as itself: the daemon the bench started
        // is the load generator's child, not part of the load generator.
        for kids in children.values_mut() {
            kids.retain(|k| !self.roots.iter().any(|(_, r)| r == k));
        }
        Sample(
            self.roots
                .iter()
                .map(|(name, pid)| (*name, tree_ticks(*pid, &children)))
                .collect(),
        )
    }
}

/// CPU ticks by process name, at one instant.
#[derive(Debug, Clone)]
pub struct Sample(Vec<(&'static str, u64)>);

impl Sample {
    /// `name:µs` per operation for each process, between `self` (before)
    /// and `after`, over `ops` operations: "loadgen:30,daemon:45,...".
    pub fn per_op(&self, after: &Sample, ops: u64) -> String {
        let ops = ops.max(1) as f64;
        self.0
            .iter()
            .zip(&after.0)
            .map(|((name, b), (_, a))| {
                // USER_HZ is 100 on Linux: a tick is 10 ms.
                let us = a.saturating_sub(*b) as f64 * 10_000.0 / ops;
                format!("{name}:{us:.0}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `name:percent` of one core for each process, between `self`
    /// (before) and `after`, `elapsed` apart: "daemon:7.1,redis:5.2,...".
    pub fn share(&self, after: &Sample, elapsed: std::time::Duration) -> String {
        let secs = elapsed.as_secs_f64().max(0.001);
        self.0
            .iter()
            .zip(&after.0)
            .map(|((name, b), (_, a))| {
                // A tick is 10 ms: a hundred a second is one core.
                let pct = a.saturating_sub(*b) as f64 / secs;
                format!("{name}:{pct:.1}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A pid whose /proc entry this process can read.
pub(super) fn is_local(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
}

/// Redis's `process_id` from `INFO server`.
pub(super) async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    super::redis_time::info_number(&mut con, "server", "process_id").await
}

/// The postmaster: the parent of the backend serving a connection.
pub(super) async fn postmaster_pid(url: &str) -> Option<u32> {
    let mut con = sqlx::PgConnection::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut con)
        .await
        .ok()?;
    let parent = stat(u32::try_from(backend).ok()?).map(|s| s.ppid);
    let _ = con.close().await;
    parent
}

/// What /proc/PID/stat says that matters here (also to
/// `report::ServerStats`).
pub(super) struct Stat {
    ppid: u32,
    /// utime + stime: the process's own CPU, in ticks.
    pub own: u64,
    /// utime + stime + cutime + cstime: the process's own CPU and that of
    /// its children that have exited (a backend that ended mid-run still
    /// counts, through the postmaster).
    ticks: u64,
}

pub(super) fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses):
    // state, ppid, ... utime is the 14th field overall, so index 11 here.
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let own = n(11)? + n(12)?;
    Some(Stat {
        ppid: u32::try_from(n(1)?).ok()?,
        own,
        ticks: own + n(13)? + n(14)?,
    })
}

/// `pid`'s live children.
pub(super) fn children_of(pid: u32) -> Vec<u32> {
    children_by_parent().remove(&pid).unwrap_or_default()
}

/// Every live process's children, by parent pid.
fn children_by_parent() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(s) = stat(pid) {
            map.entry(s.ppid).or_default().push(pid);
        }
    }
    map
}

/// `pid`'s ticks and its live children's (one level: Postgres's backends
/// are the postmaster's children; the load generator's baselines have
/// ended before a run starts). A child that exited is in its parent's
/// cutime, so it is counted before and after alike. (The daemon's
/// exit is not: it is stopped after the last sample.)
fn tree_ticks(pid: u32, children: &HashMap<u32, Vec<u32>>) -> u64 {
    let own = stat(pid).map_or(0, |s| s.ticks);
    let kids: u64 = children.get(&pid).map_or(0, |k| {
        k.iter().filter_map(|c| stat(*c)).map(|s| s.ticks).sum()
    });
    own + kids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_this_process_burns_is_counted_per_operation() {
        let w = Watched {
            roots: vec![("loadgen", std::process::id())],
        };
        let before = w.sample();
        // Burn CPU until the kernel's count moves by a tick (10 ms); the
        // deadline only stops a hang, it measures nothing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        while w.sample().0[0].1 == before.0[0].1 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(std::time::Instant::now() < deadline, "CPU time never moved");
        }
        let line = before.per_op(&w.sample(), 2);
        let us: f64 = line
            .strip_prefix("loadgen:")
            .unwrap_or_else(|| panic!("{line}"))
            .parse()
            .unwrap();
        assert!(us >= 5_000.0, "a tick over two operations: {line}");
    }

    #[test]
    fn a_missing_process_counts_nothing() {
        let children = HashMap::new();
        assert_eq!(tree_ticks(u32::MAX, &children), 0);
        assert!(!is_local(u32::MAX));
    }
}
