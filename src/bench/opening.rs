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

use super::load::{Plan, Run, drive};
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
        let opening = open(channels, std::slice::from_ref(&counted), crowd, duration).await?;
        println!("probe: opening crowd={crowd} {}", opening.fields());
        lines.push(opening.checked()?);
    }
    Ok(lines)
}

/// One opening: a sale of [`workloads::SELLOUT_CAP`] for each shop of
/// `shops`, opened together, and what `crowd` clients claiming them for
/// `duration` came to.
pub(super) struct Opening {
    opened: Opened,
    run: Run,
    /// When the last unit of any shop's sale was claimed, after the first
    /// call.
    sold_out: Duration,
    /// Why a promise was broken, if one was.
    broken: Option<String>,
}

/// Opens a sale of [`workloads::SELLOUT_CAP`] for each of `shops` (each a
/// caller with a fresh tag, so the sales are the run's own) and has
/// `crowd` clients claim them flat out for `duration`, claim `n` going to
/// shop `n % shops` (the clients' calls are spread evenly).
pub(super) async fn open(
    channels: &[Channel],
    shops: &[Caller],
    crowd: usize,
    duration: Duration,
) -> anyhow::Result<Opening> {
    for shop in shops {
        workloads::setup(Workload::ClaimSellout, &channels[0], shop).await?;
    }
    let plan = Plan {
        clients: crowd,
        duration,
        rate: None,
        max_calls: None,
    };
    // When the last unit was claimed, µs after `opened`.
    let last_sale = Arc::new(AtomicU64::new(0));
    let opened = Instant::now();
    let (buying, stamp) = (Arc::new(shops.to_vec()), last_sale.clone());
    let run = drive(channels, &plan, move |ch, n| {
        let (shops, stamp) = (buying.clone(), stamp.clone());
        async move {
            let shop = &shops[n as usize % shops.len()];
            let done = workloads::claim(Workload::ClaimSellout, ch, n, shop).await?;
            if done.units > 0 {
                let at = u64::try_from(opened.elapsed().as_micros()).unwrap_or(u64::MAX);
                stamp.fetch_max(at, Ordering::Relaxed);
            }
            Ok(done)
        }
    })
    .await;
    let mut sold = 0;
    let mut over = Vec::new();
    for shop in shops {
        let n = workloads::sold(&channels[0], shop, Workload::ClaimSellout).await?;
        if n > workloads::SELLOUT_CAP {
            over.push(n);
        }
        sold += n;
    }
    let opened = Opened {
        crowd,
        claimed: run.outcomes.get("claimed").copied().unwrap_or(0),
        errors: run.errors(),
        sold,
    };
    // A call answered with an error may have sold its unit: then only
    // the caps can be checked.
    let broken = if !over.is_empty() {
        Some(format!("sold {over:?} of {}", workloads::SELLOUT_CAP))
    } else if opened.errors == 0 && sold != opened.claimed as i64 {
        Some(format!(
            "sold {sold}, its buyers told of {}",
            opened.claimed
        ))
    } else {
        None
    };
    Ok(Opening {
        opened,
        run,
        sold_out: Duration::from_micros(last_sale.load(Ordering::Relaxed)),
        broken,
    })
}

impl Opening {
    /// The line's fields after the crowd's.
    pub(super) fn fields(&self) -> String {
        let outcome = |k: &str| self.run.outcomes.get(k).copied().unwrap_or(0);
        format!(
            "cap={} sold_out_ms={:.1} calls={} claimed={} sold_out={} errors={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} sold={} promises={}",
            workloads::SELLOUT_CAP,
            self.sold_out.as_secs_f64() * 1000.0,
            self.run.calls,
            self.opened.claimed,
            outcome("sold_out"),
            errors_but(&self.run.outcomes, &[]),
            self.run.ms(0.5),
            self.run.ms(0.99),
            self.run.latency.max() as f64 / 1000.0,
            self.opened.sold,
            if self.broken.is_some() {
                "BROKEN"
            } else {
                "kept"
            },
        )
    }

    /// What it came to, or why a promise was broken.
    pub(super) fn checked(self) -> anyhow::Result<Opened> {
        match self.broken {
            Some(why) => anyhow::bail!("crowd {}: {why}", self.opened.crowd),
            None => Ok(self.opened),
        }
    }
}
