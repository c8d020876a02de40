//! The outbox job: delivers the webhooks that channel changes wrote to the
//! outbox, signed, in order per satellite, retrying with exponential
//! backoff until the satellite answers 2xx.
//!
//! A row is claimed for a lease before it is sent, so a second daemon (or
//! this one after a crash) sends it again only once the lease ran out: a
//! satellite may see a delivery twice, never lose one, and can drop
//! repeats by the `X-Holdfast-Delivery` id.
//!
//! A satellite with a backlog is sent its next row as soon as the last is
//! acknowledged, until the next round is due: one round trip a webhook.
//! Until 2026-12-07 it was sent one row a round, five a second at the
//! default interval, so a run of card sales left the other channels
//! listing sold cards for minutes (deploy/BENCHMARKS.md, "webhooks").
//! A round does not wait for the satellites it started sending to, so one
//! that answers slowly delays no other.
//! A transaction that queues a webhook wakes the job when it commits
//! (`hear_queued`); the rounds are what is left when nothing does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::Rounds;
use tokio::task::JoinSet;

use crate::error::Error;
use crate::satellite::SatelliteClient;
use crate::store::postgres::{DueDelivery, PgStore};
use crate::telemetry::metric;

/// Most deliveries attempted at once.
const BATCH: i64 = 32;

/// How the outbox job paces itself.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// How often the outbox is polled.
    pub interval: Duration,
    /// One attempt's deadline (the client's timeout).
    pub timeout: Duration,
    /// The wait after the first failed attempt; doubled after each.
    pub backoff_base: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
}

/// The wait before the next attempt after `attempts` failed ones:
/// `base * 2^(attempts - 1)`, at most `max`.
pub fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    base.saturating_mul(1 << exp).min(max)
}

/// The satellites being sent to: a task each, which a round does not
/// wait for.
type Sending = JoinSet<Result<(), Error>>;

/// Runs until `stop` turns true; then each satellite being sent to
/// finishes the attempt it is in (bounded by the timeout) and begins no
/// more.
pub async fn run(
    pg: PgStore,
    client: SatelliteClient,
    settings: OutboxSettings,
    stop: watch::Receiver<bool>,
) {
    let mut rounds = Rounds::every(settings.interval, stop.clone());
    let queued = hear_queued(pg.clone(), stop.clone());
    let mut sending = Sending::new();
    let job = Job {
        pg: &pg,
        client: &client,
        settings: &settings,
        stop: &stop,
        queued: &queued,
    };
    loop {
        // The backlog gauge is read on the ticks alone: a busy shop's
        // commits wake the outbox a hundred times a second, and the count
        // walks the whole backlog.
        let tick = tokio::select! {
            go = rounds.next() => if go { true } else { break },
            () = queued.notified() => if *stop.borrow() { break } else { false },
        };
        while let Some(done) = sending.try_join_next() {
            report(done);
        }
        if let Err(e) = job.round(&mut sending, tick).await {
            tracing::warn!(error = %e, "outbox round failed; deliveries stay pending");
        }
    }
    while let Some(done) = sending.join_next().await {
        report(done);
    }
    tracing::debug!("outbox stopped");
}

/// Logs how a satellite's sending ended, if not well.
fn report(done: Result<Result<(), Error>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "recording a delivery failed; it will be retried")
        }
        Err(e) => tracing::error!(error = %e, "a delivery task panicked"),
    }
}

/// Told when a transaction that queued a webhook commits: Postgres sends
/// its `NOTIFY` then to every daemon listening, so a sold card's other
/// channels are told within a round trip or two, where the next round
/// would come up to `interval` later. A `Notify` keeps one wake-up
/// however many arrive during a round. While the listener cannot
/// connect, it tries again each second and the rounds alone go on.
fn hear_queued(pg: PgStore, mut stop: watch::Receiver<bool>) -> Arc<Notify> {
    let queued = Arc::new(Notify::new());
    let wake = queued.clone();
    tokio::spawn(async move {
        loop {
            let heard = async {
                let mut listener = pg.listen_for_queued().await?;
                loop {
                    listener.recv().await.map_err(Error::from)?;
                    wake.notify_one();
                }
            };
            tokio::select! {
                Err::<(), Error>(e) = heard => {
                    tracing::debug!(error = %e, "not listening for queued webhooks; the outbox's rounds go on");
                }
                _ = stop.wait_for(|s| *s) => return,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
    queued
}

/// What a round needs.
struct Job<'a> {
    pg: &'a PgStore,
    client: &'a SatelliteClient,
    settings: &'a OutboxSettings,
    stop: &'a watch::Receiver<bool>,
    queued: &'a Arc<Notify>,
}

impl Job<'_> {
    /// Claims the due head of each satellite not being sent to (up to
    /// [`BATCH`] sent to at once) and starts sending each its rows, for
    /// up to an interval; returns how many it started.
    ///
    /// A round does not wait for them: a satellite that answers slowly
    /// (each attempt may take the timeout) no longer holds up the next
    /// round, in which every other satellite's new rows go. One being
    /// sent to is never claimed twice: its row is leased, so not due.
    /// With `gauge`, it also sets the backlog gauge.
    async fn round(&self, sending: &mut Sending, gauge: bool) -> Result<usize, Error> {
        let room = BATCH.saturating_sub(sending.len() as i64);
        let due = if room > 0 {
            self.pg.claim_deliveries(lease(self.settings), room).await?
        } else {
            Vec::new()
        };
        let started = due.len();
        for d in due {
            let (pg, client) = (self.pg.clone(), self.client.clone());
            let (settings, stop) = (self.settings.clone(), self.stop.clone());
            let wake = self.queued.clone();
            let until = Instant::now() + settings.interval;
            let more = move || Instant::now() < until && !*stop.borrow();
            sending.spawn(async move {
                // Stopped with rows perhaps left: the next round at once.
                if deliver_in_turn(&pg, &client, &settings, d, &more).await? {
                    wake.notify_one();
                }
                Ok(())
            });
        }
        if gauge {
            let backlog = self.pg.outbox_backlog().await?;
            metrics::gauge!(metric::OUTBOX_BACKLOG).set(backlog as f64);
        }
        Ok(started)
    }
}

/// How long a claimed row is this daemon's: an attempt's timeout, and
/// time to record it.
fn lease(settings: &OutboxSettings) -> Duration {
    settings.timeout + Duration::from_secs(5)
}

/// Delivers `d`, then its satellite's next rows one after another while
/// each is acknowledged and due, and while `more` says to go on; whether
/// it was `more` that stopped it.
async fn deliver_in_turn(
    pg: &PgStore,
    client: &SatelliteClient,
    settings: &OutboxSettings,
    mut d: DueDelivery,
    more: &impl Fn() -> bool,
) -> Result<bool, Error> {
    loop {
        match deliver(pg, client, settings, d, more).await? {
            Some(next) => d = next,
            None => return Ok(!more()),
        }
    }
}

/// Attempts `d` and records the outcome; after an acknowledgement, if
/// `more` says so then, claims and returns the satellite's next row.
async fn deliver(
    pg: &PgStore,
    client: &SatelliteClient,
    settings: &OutboxSettings,
    d: DueDelivery,
    more: &impl Fn() -> bool,
) -> Result<Option<DueDelivery>, Error> {
    match client
        .post(&d.base_url, &d.secret, &d.event, d.id, &d.body)
        .await
    {
        Ok(status) => {
            tracing::info!(delivery = d.id, workspace = %d.workspace, channel = %d.channel, event = %d.event, status, "webhook delivered");
            pg.delivered(d.id, status, more().then(|| lease(settings)))
                .await
        }
        Err(failure) => {
            metrics::counter!(metric::OUTBOX_FAILURES, "event" => d.event.clone()).increment(1);
            let retry_in = backoff(d.attempts + 1, settings.backoff_base, settings.backoff_max);
            tracing::warn!(delivery = d.id, workspace = %d.workspace, channel = %d.channel, event = %d.event,
                attempt = d.attempts + 1, reason = %failure.reason, ?retry_in, "webhook delivery failed; will retry");
            pg.delivery_failed(d.id, failure.status, &failure.reason, retry_in)
                .await?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(1, base, max), Duration::from_secs(1));
        assert_eq!(backoff(2, base, max), Duration::from_secs(2));
        assert_eq!(backoff(4, base, max), Duration::from_secs(8));
        assert_eq!(backoff(10, base, max), max);
        assert_eq!(backoff(i32::MAX, base, max), max);
    }
}
