//! What live `Watch` subscribers cost a sale, and how fresh their events
//! are: the question of a shop whose storefront pods each watch the
//! tenant's events to show stock as it moves.
//!
//! For each count of `--watchers`, that many subscribers watch from now
//! on a connection of their own, while claim-hot runs flat out for
//! `--duration` seconds; then each is given a second to catch up and is
//! stopped. The line: the claims' rate beside the first count's
//! (`claims_vs_first`), the events each subscriber got against the claims
//! made (`got_min`, `got_max`), how long after its event an event reached
//! a subscriber (`lag_p50_ms`, `lag_p99_ms`, `lag_max_ms`: the event's
//! Redis time to the probe's clock, both on this machine), subscribers
//! ended early (ABORTED when one falls behind), and each process's CPU a
//! claim.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::cpu::Watched;
use super::load::Plan;
use super::workloads::{self, Caller, Workload};
use crate::grpc::pb;
use crate::grpc::pb::event_service_client::EventServiceClient;

/// How long the subscribers get to be subscribed before the claims
/// start, and to catch up after they end.
const SETTLE: Duration = Duration::from_secs(1);

/// What one subscriber saw.
pub(super) struct Seen {
    events: u64,
    /// Milliseconds from each event's time to its arrival.
    lag: Histogram<u64>,
    /// How the stream ended before it was stopped, if it did.
    ended: Option<String>,
}

/// Runs the probe and prints a line per count of watchers.
pub async fn run(
    channels: &[Channel],
    own: Channel,
    caller: &Caller,
    watched: &Watched,
    plan: &Plan,
    counts: &[usize],
) -> anyhow::Result<()> {
    let warm = Plan {
        duration: Duration::from_secs(1),
        ..plan.clone()
    };
    workloads::run(Workload::ClaimHot, channels, &warm, caller).await;
    let mut first_rate = None;
    for &count in counts {
        let (stop, stopped) = watch::channel(false);
        let watchers: Vec<_> = (0..count)
            .map(|_| tokio::spawn(subscribe(own.clone(), caller.clone(), stopped.clone())))
            .collect();
        tokio::time::sleep(SETTLE).await;
        let before = watched.sample();
        let claims = workloads::run(Workload::ClaimHot, channels, plan, caller).await;
        let cpu = before.per_op(&watched.sample(), claims.calls);
        tokio::time::sleep(SETTLE).await;
        let _ = stop.send(true);
        let seen = Tally::of(watchers).await?;
        let rate = claims.rate();
        let first = *first_rate.get_or_insert(rate);
        println!(
            "probe: watch watchers={count} claims_rps={rate:.0} claims_vs_first={:.2} claimed={} {} claim_errors={} cpu_us_per_claim={cpu}{}",
            rate / first,
            claims.calls - claims.errors(),
            seen.fields(),
            claims.errors(),
            seen.first_end(),
        );
    }
    Ok(())
}

/// What a probe's subscribers saw, together.
pub(super) struct Tally {
    got: Vec<u64>,
    lag: Histogram<u64>,
    ended: Vec<String>,
}

impl Tally {
    /// Waits for each subscriber (stopped already) and adds up what it saw.
    pub(super) async fn of(subscribers: Vec<JoinHandle<Seen>>) -> anyhow::Result<Self> {
        let mut tally = Self {
            got: Vec::with_capacity(subscribers.len()),
            lag: Histogram::new(3)?,
            ended: Vec::new(),
        };
        for s in subscribers {
            let seen = s.await?;
            tally.got.push(seen.events);
            tally.lag.add(&seen.lag)?;
            tally.ended.extend(seen.ended);
        }
        Ok(tally)
    }

    /// The fewest and most events a subscriber got, how late they came,
    /// and how many subscribers ended early, as a probe line's fields.
    pub(super) fn fields(&self) -> String {
        format!(
            "got_min={} got_max={} lag_p50_ms={} lag_p99_ms={} lag_max_ms={} ended_early={}",
            self.got.iter().min().unwrap_or(&0),
            self.got.iter().max().unwrap_or(&0),
            self.lag.value_at_quantile(0.5),
            self.lag.value_at_quantile(0.99),
            self.lag.max(),
            self.ended.len(),
        )
    }

    /// How the first subscriber that ended early was ended, as the line's
    /// last field (empty when none did).
    pub(super) fn first_end(&self) -> String {
        self.ended
            .first()
            .map(|e| format!(" first_end={e:?}"))
            .unwrap_or_default()
    }
}

/// One subscriber, watching from now until `stopped`.
pub(super) async fn subscribe(
    channel: Channel,
    caller: Caller,
    mut stopped: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen {
        events: 0,
        lag: Histogram::new(3).expect("3 significant figures"),
        ended: None,
    };
    let mut client = EventServiceClient::new(channel);
    let mut stream = match client.watch(caller.req(pb::WatchRequest::default())).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            seen.ended = Some(status.to_string());
            return seen;
        }
    };
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return seen,
            next = stream.message() => match next {
                Ok(Some(event)) => {
                    seen.events += 1;
                    if let Some(at) = event.at {
                        let at_ms = at.seconds * 1_000 + i64::from(at.nanos) / 1_000_000;
                        let now_ms = chrono::Utc::now().timestamp_millis();
                        let _ = seen.lag.record((now_ms - at_ms).max(0) as u64);
                    }
                }
                Ok(None) => {
                    seen.ended = Some("the stream ended".into());
                    return seen;
                }
                Err(status) => {
                    seen.ended = Some(status.to_string());
                    return seen;
                }
            }
        }
    }
}
