//! One workload's figures, printed as a detail line and the summary line
//! the issue asks for:
//! `bench: workload=W rps=X redis_limit=R grpc_limit=G pg_alt=P ratio_limit=... ratio_pg=...`

use super::load::Run;
use super::workloads::Workload;

/// The server process's CPU time and peak memory, from /proc.
pub struct ServerStats {
    /// CPU seconds (user + system).
    pub cpu_secs: f64,
    /// Peak resident memory (VmHWM) since the last [`ServerStats::reset_peak`], KiB.
    pub peak_rss_kib: u64,
}

impl ServerStats {
    /// Reads `pid`'s counters (Linux).
    pub fn read(pid: u32) -> std::io::Result<Self> {
        let own = super::cpu::stat(pid)
            .ok_or_else(|| std::io::Error::other(format!("no /proc/{pid}/stat")))?
            .own;
        let peak_rss_kib = status_kib(pid, "VmHWM:").unwrap_or(0);
        Ok(Self {
            // USER_HZ is 100 on Linux.
            cpu_secs: own as f64 / 100.0,
            peak_rss_kib,
        })
    }

    /// Starts `pid`'s peak memory again from its memory now (Linux: 5 to
    /// `clear_refs`), so that the peak read after a run is that run's, not
    /// the largest since the daemon started (a setup of 100,000 cards, an
    /// earlier workload). Best effort: a peak that cannot be reset stays
    /// the lifetime's, which can only overstate it.
    pub fn reset_peak(pid: u32) {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }

    /// CPU used since `before`; the peak as it stands now.
    pub fn since(self, before: &ServerStats) -> ServerStats {
        ServerStats {
            cpu_secs: self.cpu_secs - before.cpu_secs,
            peak_rss_kib: self.peak_rss_kib,
        }
    }
}

/// A field of `/proc/PID/status` given in KiB (`VmRSS:`, `VmHWM:`).
pub(super) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One workload's report.
pub struct Line {
    pub workload: Workload,
    /// Operations per second (a two-step workload's pair counts once).
    pub rps: f64,
    pub units_per_sec: f64,
    pub p: [f64; 5],
    pub outcomes: String,
    pub server: Option<ServerStats>,
    pub elapsed_secs: f64,
    pub redis_limit: Option<f64>,
    pub grpc_limit: Option<f64>,
    pub pg_alt: Option<f64>,
    /// CPU µs per operation by process, "loadgen:30,daemon:45,..."
    /// (src/bench/cpu.rs).
    pub cpu_us_per_op: String,
    /// Redis's time and calls per operation by command, costliest first,
    /// "evalsha=24.1/0.050 ..." (src/bench/redis_time.rs); empty when
    /// Redis's counters could not be read.
    pub redis_us_per_op: String,
    /// p99 at half the peak rate: (holdfast, no-op), ms.
    pub half_load_p99: Option<(f64, f64)>,
    /// Seconds the daemon's drainer took, once the measured run ended, to
    /// write back to Postgres what the run logged (src/bench/drained.rs).
    pub drained_secs: Option<f64>,
}

impl Line {
    pub fn new(workload: Workload, run: &Run, server: Option<ServerStats>) -> Self {
        let secs = run.elapsed.as_secs_f64();
        Self {
            workload,
            // Calls that failed are not operations done: they count in
            // `outcomes`, not in the rate (refusals, such as claim-sellout's
            // sold-out answers, do: they are the answer a shopper gets).
            rps: run.answered_rate(),
            units_per_sec: run.units as f64 / secs,
            p: [0.5, 0.9, 0.99, 0.999, 1.0].map(|q| run.ms(q)),
            outcomes: run
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            server,
            elapsed_secs: secs,
            redis_limit: None,
            grpc_limit: None,
            pg_alt: None,
            half_load_p99: None,
            drained_secs: None,
            cpu_us_per_op: String::new(),
            redis_us_per_op: String::new(),
        }
    }

    pub fn print(&self) {
        let w = self.workload.name();
        let server = self
            .server
            .as_ref()
            .map_or(String::from("server=external"), |s| {
                format!(
                    "server_cpu={:.0}% server_peak_rss_mib={:.1}",
                    100.0 * s.cpu_secs / self.elapsed_secs,
                    s.peak_rss_kib as f64 / 1024.0
                )
            });
        // Redis and the gRPC stack share this machine's cores with the
        // load generator: holdfast pays both costs at once, so beside
        // min(R, G) the report gives the bound of doing both in series.
        let serial = match (self.redis_limit, self.grpc_limit) {
            (Some(r), Some(g)) => format!(
                " serial_limit={:.0} ratio_serial={:.2}",
                1.0 / (1.0 / r + 1.0 / g),
                self.rps * (1.0 / r + 1.0 / g)
            ),
            _ => String::new(),
        };
        let half = self.half_load_p99.map_or(String::new(), |(h, n)| {
            format!(
                " p99_at_half_ms={h:.2} noop_p99_at_half_ms={n:.2} ratio_p99_half={:.2}",
                h / n
            )
        });
        let drained = self
            .drained_secs
            .map_or(String::new(), |s| format!(" drained_after_s={s:.1}"));
        println!(
            "bench-detail: workload={w} ops_per_sec={:.0} units_per_sec={:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} outcomes={} {server} cpu_us_per_op={}{serial}{half}{drained}",
            self.rps,
            self.units_per_sec,
            self.p[0],
            self.p[1],
            self.p[2],
            self.p[3],
            self.p[4],
            self.outcomes,
            self.cpu_us_per_op
        );
        if !self.redis_us_per_op.is_empty() {
            println!(
                "bench-redis: workload={w} us/calls_per_op: {}",
                self.redis_us_per_op
            );
        }
        let num = |v: Option<f64>| v.map_or("NaN".to_string(), |v| format!("{v:.0}"));
        let ratio =
            |v: Option<f64>| v.map_or("NaN".to_string(), |v| format!("{:.2}", self.rps / v));
        let limit = match (self.redis_limit, self.grpc_limit) {
            (Some(r), Some(g)) => Some(r.min(g)),
            (r, g) => r.or(g),
        };
        println!(
            "bench: workload={w} rps={:.0} redis_limit={} grpc_limit={} pg_alt={} ratio_limit={} ratio_pg={}",
            self.rps,
            num(self.redis_limit),
            num(self.grpc_limit),
            num(self.pg_alt),
            ratio(limit),
            ratio(self.pg_alt)
        );
    }
}
