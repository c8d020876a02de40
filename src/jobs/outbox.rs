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
//! acknowledged, until the next round is due: one round trip a webhook,
//! or, to a satellite that takes batches (`PutSatellite`'s `batch_size`),
//! one round trip for up to that many of its rows in order.
//! Until 2026-12-07 it was sent one row a round, five a second at the
//! default interval, so a run of card sales left the other channels
//! listing sold cards for minutes (deploy/BENCHMARKS.md, "webhooks").
//! A round does not wait for the satellites it started sending to, so one
//! that answers slowly delays no other.
//! A transaction that queues a webhook wakes the job when it commits
//! (`hear_queued`); the rounds are what is left when nothing does.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::Rounds;
use tokio::task::JoinSet;

use crate::error::Error;
use crate::satellite::{SatelliteClient, Webhook};
use crate::store::postgres::{Behind, DueDelivery, PgStore, queued_for};
use crate::telemetry::metric;

/// Most deliveries attempted at once.
const BATCH: i64 = 32;

/// Most bytes of bodies in one batch, past its first webhook (which goes
/// whatever its size): satellites' HTTP servers commonly refuse requests
/// of a few MiB, and one bulk-disengage of 5,000 cards is ~200 KB.
const BATCH_BYTES: usize = 1 << 20;

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
    /// How long an acknowledged delivery is kept; `None`: for good.
    pub retention: Option<Duration>,
}

/// The wait before the next attempt after `attempts` failed ones:
/// `base * 2^(attempts - 1)`, at most `max`.
pub fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    base.saturating_mul(1 << exp).min(max)
}

/// A satellite: (workspace, channel).
type SatelliteId = (String, String);

/// The satellites being sent to: a task each, which a round does not
/// wait for, and whom each is sending to; and the satellites whose last
/// attempt here failed, until their retry is due.
#[derive(Default)]
struct Sending {
    tasks: JoinSet<Result<Option<Instant>, Error>>,
    to: HashMap<tokio::task::Id, SatelliteId>,
    resting: HashMap<SatelliteId, Instant>,
}

impl Sending {
    /// Forgets the tasks that ended, reporting how, and the rests that
    /// are over.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            self.ended(done);
        }
        let now = Instant::now();
        self.resting.retain(|_, until| *until > now);
    }

    /// Waits for every task to end.
    async fn finish(&mut self) {
        while let Some(done) = self.tasks.join_next_with_id().await {
            self.ended(done);
        }
    }

    fn ended(
        &mut self,
        done: Result<(tokio::task::Id, Result<Option<Instant>, Error>), tokio::task::JoinError>,
    ) {
        let outcome = match done {
            Ok((id, outcome)) => {
                let to = self.to.remove(&id);
                if let (Some(to), Ok(Some(until))) = (to, &outcome) {
                    self.resting.insert(to, *until);
                }
                outcome
            }
            Err(e) => {
                self.to.remove(&e.id());
                if e.is_panic() {
                    tracing::error!(error = %e, "a delivery task panicked");
                }
                return;
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "recording a delivery failed; it will be retried");
        }
    }

    /// Whether a round could start sending to any of `named`: false when
    /// each is being sent to already, whose task takes its new rows, or
    /// resting after a failed attempt, whose head is not due. A satellite
    /// down through a sale is named by every commit that queues for it,
    /// and each such round would find nothing to send.
    fn would_start(&self, named: &HashSet<SatelliteId>) -> bool {
        let now = Instant::now();
        named.iter().any(|s| {
            !self.to.values().any(|t| t == s)
                && self.resting.get(s).is_none_or(|until| *until <= now)
        })
    }

    /// Starts sending to `to`.
    fn start(
        &mut self,
        to: SatelliteId,
        task: impl Future<Output = Result<Option<Instant>, Error>> + Send + 'static,
    ) {
        self.resting.remove(&to);
        let task = self.tasks.spawn(task);
        self.to.insert(task.id(), to);
    }
}

/// What woke the outbox since its last look: satellites that had rows
/// queued, and whether anything else asks for a round.
#[derive(Default)]
struct Woken {
    satellites: HashSet<SatelliteId>,
    any: bool,
}

/// Where wake-ups are left for the job's loop.
#[derive(Default)]
struct Wake {
    woken: Mutex<Woken>,
    notify: Notify,
}

impl Wake {
    /// A round is asked for: by a queued row of `satellite`, or (`None`)
    /// for any reason.
    fn ask(&self, satellite: Option<SatelliteId>) {
        {
            let mut woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
            match satellite {
                Some(s) => {
                    woken.satellites.insert(s);
                }
                None => woken.any = true,
            }
        }
        self.notify.notify_one();
    }

    /// What asked since the last take.
    fn take(&self) -> Woken {
        std::mem::take(&mut *self.woken.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

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
    let wake = hear_queued(pg.clone(), stop.clone());
    let mut sending = Sending::default();
    let mut gauge = Gauge::default();
    let mut pruner = Pruner::default();
    let job = Job {
        pg: &pg,
        client: &client,
        settings: &settings,
        stop: &stop,
        wake: &wake,
    };
    loop {
        let tick = tokio::select! {
            go = rounds.next() => if go { true } else { break },
            () = wake.notify.notified() => if *stop.borrow() { break } else { false },
        };
        sending.reap();
        let woken = wake.take();
        // Rows queued only for satellites being sent to (their tasks take
        // them) or resting (their heads are not due) need no round.
        if !tick && !woken.any && !sending.would_start(&woken.satellites) {
            continue;
        }
        if let Err(e) = job.round(&mut sending).await {
            tracing::warn!(error = %e, "outbox round failed; deliveries stay pending");
        }
        if tick && let Err(e) = gauge.read_if_due(&pg).await {
            tracing::warn!(error = %e, "reading the outbox backlog failed");
        }
        if tick
            && let Some(retention) = settings.retention
            && let Err(e) = pruner.prune_if_due(&pg, retention).await
        {
            tracing::warn!(error = %e, "deleting old deliveries failed; they stay until the next try");
        }
    }
    sending.finish().await;
    tracing::debug!("outbox stopped");
}

/// Told when a transaction that queued a webhook commits: Postgres sends
/// its `NOTIFY` then to every daemon listening, naming the satellite, so
/// a sold card's other channels are told within a round trip or two,
/// where the next round would come up to `interval` later. [`Wake`]
/// keeps one wake-up however many arrive during a round. While the
/// listener cannot connect, it tries again each second and the rounds
/// alone go on.
fn hear_queued(pg: PgStore, mut stop: watch::Receiver<bool>) -> Arc<Wake> {
    let wake = Arc::new(Wake::default());
    let heard_by = wake.clone();
    tokio::spawn(async move {
        loop {
            let heard = async {
                let mut listener = pg.listen_for_queued().await?;
                loop {
                    let note = listener.recv().await.map_err(Error::from)?;
                    heard_by.ask(queued_for(note.payload()));
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
    wake
}

/// What a round needs.
struct Job<'a> {
    pg: &'a PgStore,
    client: &'a SatelliteClient,
    settings: &'a OutboxSettings,
    stop: &'a watch::Receiver<bool>,
    wake: &'a Arc<Wake>,
}

impl Job<'_> {
    /// Claims the due head of each satellite not being sent to (up to
    /// [`BATCH`] sent to at once) and starts sending each its rows, for
    /// up to an interval.
    ///
    /// A round does not wait for them: a satellite that answers slowly
    /// (each attempt may take the timeout) no longer holds up the next
    /// round, in which every other satellite's new rows go. One being
    /// sent to is never claimed twice: its row is leased, so not due.
    async fn round(&self, sending: &mut Sending) -> Result<(), Error> {
        let room = BATCH.saturating_sub(sending.tasks.len() as i64);
        let due = if room > 0 {
            self.pg.claim_deliveries(lease(self.settings), room).await?
        } else {
            Vec::new()
        };
        for d in due {
            let (pg, client) = (self.pg.clone(), self.client.clone());
            let (settings, stop) = (self.settings.clone(), self.stop.clone());
            let wake = self.wake.clone();
            let until = Instant::now() + settings.interval;
            let more = move || Instant::now() < until && !*stop.borrow();
            let to = (d.workspace.clone(), d.channel.clone());
            sending.start(to, async move {
                let sent = deliver_in_turn(&pg, &client, &settings, d, &more).await;
                // Its rows queued from now on are a round's to start: the
                // next one, at once.
                wake.ask(None);
                sent
            });
        }
        Ok(())
    }
}

/// How many times its own duration the backlog gauge waits between
/// reads: at most 1 % of a Postgres backend's time goes to it.
const GAUGE_SPACING: u32 = 100;

/// The backlog gauge, read on the ticks alone (a busy shop's commits wake
/// the outbox a hundred times a second) and then only as often as its
/// cost allows. Its `count(*)` walks every pending row, ~100 ms a
/// million, and a satellite down through an hour of sales leaves that
/// many: read on every tick, the gauge alone kept half a Postgres core
/// busy (deploy/BENCHMARKS.md, "a satellite that is down"). A small
/// backlog is still counted on every tick.
#[derive(Default)]
struct Gauge {
    next: Option<Instant>,
}

impl Gauge {
    async fn read_if_due(&mut self, pg: &PgStore) -> Result<(), Error> {
        if self.next.is_some_and(|next| Instant::now() < next) {
            return Ok(());
        }
        let started = Instant::now();
        let backlog = pg.outbox_backlog().await?;
        metrics::gauge!(metric::OUTBOX_BACKLOG).set(backlog as f64);
        self.next = Some(Instant::now() + started.elapsed() * GAUGE_SPACING);
        Ok(())
    }
}

/// Most acknowledged deliveries deleted by one statement: its locks and
/// WAL stay small, and a prune that deletes this many goes on at the next
/// tick rather than after [`PRUNE_EVERY`].
const PRUNE_BATCH: i64 = 10_000;

/// How often the acknowledged deliveries past their retention are
/// deleted (more often when the retention is shorter).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Deletes acknowledged deliveries past `--delivery-retention-secs`, on
/// the ticks alone: the outbox keeps every delivered row for
/// `ListDeliveries`, and without a retention it grew by each webhook's
/// ~650 bytes for good. A backlog of old rows (a first prune after an
/// upgrade) goes [`PRUNE_BATCH`] a tick.
#[derive(Default)]
struct Pruner {
    next: Option<Instant>,
}

impl Pruner {
    async fn prune_if_due(&mut self, pg: &PgStore, retention: Duration) -> Result<(), Error> {
        if self.next.is_some_and(|next| Instant::now() < next) {
            return Ok(());
        }
        let deleted = pg.prune_deliveries(retention, PRUNE_BATCH).await?;
        if deleted > 0 {
            tracing::debug!(
                deleted,
                ?retention,
                "deleted acknowledged deliveries past their retention"
            );
        }
        let wait = if deleted >= PRUNE_BATCH as u64 {
            Duration::ZERO
        } else {
            PRUNE_EVERY.min(retention)
        };
        self.next = Some(Instant::now() + wait);
        Ok(())
    }
}

/// How long a claimed row is this daemon's: an attempt's timeout, and
/// time to record it.
fn lease(settings: &OutboxSettings) -> Duration {
    settings.timeout + Duration::from_secs(5)
}

/// Delivers `d`, then its satellite's next rows one after another while
/// each is acknowledged and due, and while `more` says to go on; returns
/// when the next attempt is due if the last one failed.
async fn deliver_in_turn(
    pg: &PgStore,
    client: &SatelliteClient,
    settings: &OutboxSettings,
    mut d: DueDelivery,
    more: &impl Fn() -> bool,
) -> Result<Option<Instant>, Error> {
    loop {
        match deliver(pg, client, settings, d, more).await? {
            After::Next(next) => d = next,
            After::Stop => return Ok(None),
            After::Retry(at) => return Ok(Some(at)),
        }
    }
}

/// What follows an attempt.
enum After {
    /// The satellite's next row, claimed.
    Next(DueDelivery),
    /// Nothing more now: no row due, or `more` said to stop.
    Stop,
    /// The attempt failed; the next is due then.
    Retry(Instant),
}

/// Attempts `d` (with the rows behind it, to a satellite that takes
/// batches) and records the outcome; after an acknowledgement, if `more`
/// says so then, claims and returns the satellite's next row.
///
/// A batch is acknowledged or failed whole. A failure is recorded on its
/// head alone, whose backoff holds the rows behind it back, as it does
/// for a satellite sent one webhook at a time.
async fn deliver(
    pg: &PgStore,
    client: &SatelliteClient,
    settings: &OutboxSettings,
    d: DueDelivery,
    more: &impl Fn() -> bool,
) -> Result<After, Error> {
    let head = Webhook {
        id: d.id,
        event: &d.event,
        body: &d.body,
    };
    let (sent, ids) = if d.batch_size > 1 {
        let behind = pg.behind(&d, i64::from(d.batch_size - 1)).await?;
        let batch = batch_of(head, &behind);
        let ids: Vec<i64> = batch.iter().map(|w| w.id).collect();
        (client.post_batch(&d.base_url, &d.secret, &batch).await, ids)
    } else {
        (client.post(&d.base_url, &d.secret, &head).await, vec![d.id])
    };
    match sent {
        Ok(status) => {
            tracing::info!(delivery = d.id, workspace = %d.workspace, channel = %d.channel, event = %d.event,
                webhooks = ids.len(), status, "webhook delivered");
            let next = pg
                .delivered(&ids, status, more().then(|| lease(settings)))
                .await?;
            Ok(next.map_or(After::Stop, After::Next))
        }
        Err(failure) => {
            metrics::counter!(metric::OUTBOX_FAILURES, "event" => d.event.clone()).increment(1);
            let retry_in = backoff(d.attempts + 1, settings.backoff_base, settings.backoff_max);
            tracing::warn!(delivery = d.id, workspace = %d.workspace, channel = %d.channel, event = %d.event,
                attempt = d.attempts + 1, reason = %failure.reason, ?retry_in, "webhook delivery failed; will retry");
            // Taken before Postgres's clock starts the backoff, so that
            // this daemon's rest never outlasts it.
            let retry_at = Instant::now() + retry_in;
            pg.delivery_failed(d.id, failure.status, &failure.reason, retry_in)
                .await?;
            Ok(After::Retry(retry_at))
        }
    }
}

/// `head` and, in order, as many of the rows `behind` it as fit in
/// [`BATCH_BYTES`].
fn batch_of<'a>(head: Webhook<'a>, behind: &'a [Behind]) -> Vec<Webhook<'a>> {
    let mut bytes = 0;
    let fits = behind
        .iter()
        .take_while(|b| {
            bytes += b.body.len();
            bytes <= BATCH_BYTES
        })
        .map(|b| Webhook {
            id: b.id,
            event: &b.event,
            body: &b.body,
        });
    std::iter::once(head).chain(fits).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_head_and_the_rows_behind_it_that_fit() {
        let row = |id: i64, size: usize| Behind {
            id,
            event: "engage".into(),
            body: "x".repeat(size),
        };
        let big = "y".repeat(2 * BATCH_BYTES);
        let head = Webhook {
            id: 1,
            event: "bulk-disengage",
            body: &big,
        };
        let behind = [row(2, BATCH_BYTES / 2), row(3, BATCH_BYTES / 2), row(4, 1)];
        let ids = |batch: Vec<Webhook<'_>>| batch.iter().map(|w| w.id).collect::<Vec<_>>();
        // The head goes however large; the rows behind it while they fit,
        // and none after one that does not (the order is the promise).
        assert_eq!(ids(batch_of(head, &behind)), [1, 2, 3]);
        assert_eq!(ids(batch_of(head, &behind[1..])), [1, 3, 4]);
        let over = [row(2, BATCH_BYTES + 1), row(3, 1)];
        assert_eq!(ids(batch_of(head, &over)), [1]);
        assert_eq!(ids(batch_of(head, &[])), [1]);
    }

    #[tokio::test]
    async fn a_wake_up_is_skipped_only_when_each_named_satellite_is_being_sent_to_or_resting() {
        let named = |list: &[(&str, &str)]| -> HashSet<SatelliteId> {
            list.iter()
                .map(|(w, c)| ((*w).to_owned(), (*c).to_owned()))
                .collect()
        };
        let mut sending = Sending::default();
        sending.start(("dev".into(), "ebay".into()), std::future::pending());
        assert!(!sending.would_start(&named(&[("dev", "ebay")])));
        assert!(sending.would_start(&named(&[("dev", "ebay"), ("dev", "whatnot")])));
        assert!(sending.would_start(&named(&[("shop-2", "ebay")])));
        assert!(!sending.would_start(&named(&[])));
        sending.tasks.abort_all();
        sending.finish().await;
        assert!(
            sending.to.is_empty(),
            "an ended task's satellite is forgotten"
        );
        assert!(sending.would_start(&named(&[("dev", "ebay")])));

        // A satellite whose attempt failed rests until its retry is due;
        // one that failed with no retry ahead does not.
        let later = Instant::now() + Duration::from_secs(3600);
        sending.start(
            ("dev".into(), "ebay".into()),
            async move { Ok(Some(later)) },
        );
        sending.start(("dev".into(), "whatnot".into()), async {
            Ok(Some(Instant::now()))
        });
        sending.finish().await;
        sending.reap();
        assert!(!sending.would_start(&named(&[("dev", "ebay")])));
        assert!(sending.would_start(&named(&[("dev", "whatnot")])));
        assert_eq!(sending.resting.len(), 1, "a rest that is over is forgotten");
        // A round that claims its head (a tick's, when it is due) ends
        // the rest.
        sending.start(("dev".into(), "ebay".into()), async { Ok(None) });
        sending.finish().await;
        assert!(sending.would_start(&named(&[("dev", "ebay")])));
    }

    #[test]
    fn a_notification_names_the_satellite_it_queued_for() {
        assert_eq!(
            queued_for("dev ebay"),
            Some(("dev".to_owned(), "ebay".to_owned()))
        );
        assert_eq!(queued_for(""), None, "an older daemon's names none");
        assert_eq!(queued_for("dev "), None);
    }

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
