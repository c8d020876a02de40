//! A sale's opening: the crowd that arrives as a flash sale starts and
//! buys it out, the moment the shop runs holdfast for. Every other run
//! here either never sells out (claim-hot) or measures what comes after
//! (claim-sellout's refusals); this one measures the selling. A pool is
//! given to Redis in grants of half what Postgres has left (ESCROW.md),
//! so a sale of 1,000 runs dry in Redis a dozen times on its way to sold
//! out, and each time every claim in flight asks for the next grant at
//! once.
//!
//! For each crowd of `--crowds`, a sale of its own of
//! [`workloads::SELLOUT_CAP`] units is claimed by that many clients for
//! `--duration` seconds, no deadline. Each crowd's line: how long the
//! sale took to sell out (from the first call to the last unit claimed),
//! the claims and refusals answered, errors by code, latency (p50, p99,
//! max), and what the sale counts sold beside what its buyers were told
//! (`sold` at most the cap, and equal to `claimed` when every call was
//! answered: a unit sold and not answered is one a buyer must retry to
//! learn of); `promises=BROKEN`, and the probe fails, when not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::load::{Plan, drive};
use super::stampede::errors_but;
use super::workloads::{self, Caller, Workload};

/// What one crowd's run came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Its clients.
    pub crowd: usize,
    /// Claims answered claimed.
    pub claimed: u64,
    /// Calls answered with a gRPC error.
    pub errors: u64,
    /// What the sale counts sold once the run ended.
    pub sold: i64,
}

/// Runs the probe: one line per crowd of `crowds`, each for `duration`.
/// Fails when a sale sold more than its cap, or (with every call
/// answered) other than the claims its buyers were told of.
pub async fn run(
    channels: &[Channel],
    caller: &Caller,
    crowds: &[usize],
    duration: Duration,
) -> anyhow::Result<Vec<Opened>> {
    let mut lines = Vec::with_capacity(crowds.len());
    for &crowd in crowds {
        let counted = caller.retagged();
        workloads::setup(Workload::ClaimSellout, &channels[0], &counted).await?;
        let plan = Plan {
            clients: crowd,
            duration,
            rate: None,
            max_calls: None,
        };
        // When the last unit was claimed, µs after `opened`.
        let last_sale = Arc::new(AtomicU64::new(0));
        let opened = Instant::now();
        let (buying, stamp) = (counted.clone(), last_sale.clone());
        let run = drive(channels, &plan, move |ch, n| {
            let (c, stamp) = (buying.clone(), stamp.clone());
            async move {
                let done = workloads::claim(Workload::ClaimSellout, ch, n, &c).await?;
                if done.units > 0 {
                    let at = u64::try_from(opened.elapsed().as_micros()).unwrap_or(u64::MAX);
                    stamp.fetch_max(at, Ordering::Relaxed);
                }
                Ok(done)
            }
        })
        .await;
        let outcome = |k: &str| run.outcomes.get(k).copied().unwrap_or(0);
        let sold = workloads::sold(&channels[0], &counted, Workload::ClaimSellout).await?;
        let this = Opened {
            crowd,
            claimed: outcome("claimed"),
            errors: run
                .outcomes
                .iter()
                .filter(|(k, _)| k.starts_with("error:"))
                .map(|(_, n)| n)
                .sum(),
            sold,
        };
        // A call answered with an error may have sold its unit: then only
        // the cap can be checked.
        let broken = if sold > workloads::SELLOUT_CAP {
            Some(format!("sold {sold} of {}", workloads::SELLOUT_CAP))
        } else if this.errors == 0 && sold != this.claimed as i64 {
            Some(format!("sold {sold}, its buyers told of {}", this.claimed))
        } else {
            None
        };
        println!(
            "probe: opening crowd={crowd} cap={} sold_out_ms={:.1} calls={} claimed={} sold_out={} errors={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} sold={sold} promises={}",
            workloads::SELLOUT_CAP,
            last_sale.load(Ordering::Relaxed) as f64 / 1000.0,
            run.calls,
            this.claimed,
            outcome("sold_out"),
            errors_but(&run.outcomes, &[]),
            run.ms(0.5),
            run.ms(0.99),
            run.latency.max() as f64 / 1000.0,
            if broken.is_some() { "BROKEN" } else { "kept" },
        );
        if let Some(why) = broken {
            anyhow::bail!("crowd {crowd}: {why}");
        }
        lines.push(this);
    }
    Ok(lines)
}
