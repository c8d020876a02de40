//! Time-window slots: each window of a venue (15 minutes of its local wall
//! clock by default) is the pool `slot/<venue>/<window start, unix s>`,
//! created when first used with the capacity the venue's schedule gives it.
//! A reservation is a hold on one unit of its window; confirming it at
//! payment is a commit carrying the payment id. A reservation that expired
//! (or was released) before payment gets one try at a fresh slot in the same
//! window, so the confirmed count never exceeds the window's capacity. A
//! venue's zone and window length are fixed while it has slots booked in
//! windows that have not ended ([`Slots::set_venue`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::cache::Cache;
use crate::domain::{
    Hold, HoldId, HoldState, Job, Line, Lines, PoolId, Quantity, TakeOutcome, TenantId, Window,
    parse_zone, window_at, windows_between,
};
use crate::engine::{Capacity, Engine, Take};
use crate::error::Error;
use crate::store::postgres::{NewPool, ScheduleRows, VenueRow};

/// Most windows one availability read returns.
pub const MAX_WINDOWS: usize = 2000;

/// A venue's schedule, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    weekly: HashMap<(u32, u32), u32>,
    overrides: HashMap<NaiveDate, HashMap<i32, u32>>,
}

impl Schedule {
    /// Builds the lookups from stored rows.
    pub fn from_rows(rows: &ScheduleRows) -> Self {
        let mut s = Schedule::default();
        for (day, hour, slots) in &rows.weekly {
            s.weekly.insert((*day, *hour), *slots);
        }
        for (date, hour, slots) in &rows.overrides {
            s.overrides.entry(*date).or_default().insert(*hour, *slots);
        }
        s
    }

    /// Slots per hour at a window's local date and hour: a date override
    /// replaces the date's whole schedule (unlisted hours are closed).
    pub fn slots_per_hour(&self, w: &Window) -> u32 {
        match self.overrides.get(&w.local_date) {
            Some(hours) => hours.get(&(w.hour as i32)).copied().unwrap_or(0),
            None => self.weekly.get(&(w.weekday, w.hour)).copied().unwrap_or(0),
        }
    }

    /// A window's capacity: floor(slots per hour × window minutes / 60).
    pub fn capacity(&self, w: &Window, minutes: u32) -> i64 {
        i64::from(self.slots_per_hour(w)) * i64::from(minutes) / 60
    }
}

/// A venue, parsed.
#[derive(Debug, Clone)]
pub struct Venue {
    /// Its id.
    pub venue_id: String,
    /// Its zone.
    pub tz: Tz,
    /// Its window length in minutes.
    pub window_minutes: u32,
}

/// One window's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowView {
    /// The window.
    pub start: DateTime<Utc>,
    /// Its end.
    pub end: DateTime<Utc>,
    /// Slots the schedule gives it now.
    pub capacity: i64,
    /// Confirmed (paid) slots.
    pub confirmed: i64,
    /// Active, unexpired reservations.
    pub pending: i64,
    /// Slots that can be reserved (never negative, even when a schedule
    /// cut left more confirmed than capacity).
    pub available: i64,
}

/// What a reservation or confirmation came to.
#[derive(Debug, Clone)]
pub enum SlotOutcome {
    /// Reserved, or confirmed: the hold (and whether a late confirmation
    /// took a fresh slot).
    Done(Hold, bool),
    /// The window has no free slot.
    Full,
    /// The window has no slots at all in the schedule.
    Closed,
    /// The window is over.
    Over,
}

/// The slot use cases.
pub struct Slots {
    engine: Arc<Engine>,
    max_id_len: usize,
    /// Window pools known to exist in Postgres. Pools are never deleted
    /// and a schedule change updates existing windows itself, so a known
    /// window needs neither the schedule read nor the insert again: that
    /// was two Postgres round trips on every reservation.
    known_windows: RwLock<HashSet<(TenantId, PoolId)>>,
    /// Venues as a reservation last read them, for VENUE_FRESH: the read
    /// was a Postgres round trip on every reservation (its p99 at half load
    /// was 20× the no-op RPC's). A stale venue is read again once however
    /// many reservations ask (src/cache.rs).
    venues: Cache<(TenantId, String), Venue>,
    /// Schedules as an availability read last read them, for
    /// VENUE_FRESH: a booking page asks on every view, and each read of
    /// a venue and its schedule was three Postgres statements and ~0.3 ms
    /// of Postgres and of the daemon (deploy/BENCHMARKS.md, "storefront
    /// reads"). Only availability trusts them: a window's capacity is
    /// set from a schedule read when the window is made.
    schedules: Cache<(TenantId, String), Arc<Schedule>>,
}

/// How long a reservation trusts a venue it read, and an availability read
/// a venue and its schedule. A change of zone, window length or schedule
/// made through this daemon applies at once; through another daemon
/// sharing the database, within this long. Either way every window is its
/// own pool with its own capacity, so a reservation placed by the old
/// settings never oversells.
const VENUE_FRESH: Duration = Duration::from_secs(1);

/// The suffix of a late confirmation's own hold ([`Slots::confirm`]).
const LATE: &str = ".late";

/// How long a late confirmation's hold lasts before its commit, which
/// follows at once: long enough for a retry after a lost answer to find it.
const LATE_TTL: Duration = Duration::from_secs(60);

/// Known windows remembered at most; past it the set starts over (each
/// window then costs its two round trips once more).
const KNOWN_WINDOWS: usize = 100_000;

fn window_pool(venue_id: &str, w: &Window) -> PoolId {
    PoolId::from_parts(&["slot", venue_id, &w.start.timestamp().to_string()])
}

impl Slots {
    /// Slots on top of `engine`.
    pub fn new(engine: Arc<Engine>, max_id_len: usize) -> Self {
        Self {
            engine,
            max_id_len,
            known_windows: RwLock::default(),
            venues: Cache::new(VENUE_FRESH, KNOWN_WINDOWS),
            schedules: Cache::new(VENUE_FRESH, KNOWN_WINDOWS),
        }
    }

    /// Creates or updates a venue. A change of zone or window length is
    /// refused while slots are booked ahead (`booked_ahead`), and
    /// brings the windows already made to the new shape's capacities.
    pub async fn set_venue(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        zone: &str,
        minutes: u32,
    ) -> Result<Venue, Error> {
        let tz = parse_zone(zone).ok_or_else(|| {
            Error::invalid(
                "time_zone",
                format!("{zone:?} is not an IANA time zone (e.g. Europe/Paris)"),
            )
        })?;
        if ![5, 10, 15, 20, 30, 60].contains(&minutes) {
            return Err(Error::invalid(
                "window_minutes",
                "must be 5, 10, 15, 20, 30 or 60",
            ));
        }
        let before = self.engine.pg().get_venue(tenant, venue_id).await?;
        let reshaped = before
            .as_ref()
            .is_some_and(|b| b.time_zone != zone || b.window_minutes != minutes);
        if let Some(before) = before.as_ref().filter(|_| reshaped) {
            let booked = self.booked_ahead(tenant, before).await?;
            if booked > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "venue {venue_id} has {booked} slots reserved or confirmed in windows that \
                     have not ended; its time zone and window length can change once they \
                     are over (or use a new venue id)"
                )));
            }
        }
        self.engine
            .pg()
            .upsert_venue(
                tenant,
                &VenueRow {
                    venue_id: venue_id.to_owned(),
                    time_zone: zone.to_owned(),
                    window_minutes: minutes,
                },
            )
            .await?;
        let venue = Venue {
            venue_id: venue_id.to_owned(),
            tz,
            window_minutes: minutes,
        };
        self.remember(tenant, &venue);
        if reshaped {
            // Windows made before and not yet used again keep a capacity
            // read on the old clock: read it on the new one.
            self.resync(tenant, &venue).await?;
        }
        Ok(venue)
    }

    /// The slots reserved or confirmed (or in doubt) in `venue`'s windows
    /// that have not ended. A change of zone or window length moves where
    /// windows begin and how many an hour has, so a slot booked under the
    /// old shape would count in no window of the new one, or one window's
    /// worth would stand in for a whole hour's: that is why SetVenue
    /// refuses such a change while this is not zero. A reservation racing
    /// the change (on another daemon, within VENUE_FRESH of it) is not
    /// seen; schedules are set by a shop's staff, not its checkout.
    async fn booked_ahead(&self, tenant: &TenantId, before: &VenueRow) -> Result<i64, Error> {
        let prefix = format!("slot/{}/", before.venue_id);
        let length = chrono::Duration::minutes(i64::from(before.window_minutes));
        let now = Utc::now();
        let ahead: Vec<PoolId> = self
            .engine
            .pg()
            .pool_ids_with_prefix(tenant, &prefix)
            .await?
            .into_iter()
            .map(PoolId::from_store)
            .filter(|p| window_start_of(p).is_some_and(|start| start + length > now))
            .collect();
        let views = self.engine.pools_if_any(tenant, &ahead).await?;
        Ok(views
            .iter()
            .flatten()
            .map(|v| v.sold + v.held + v.in_doubt)
            .sum())
    }

    /// The venue as read less than VENUE_FRESH ago, or read now.
    async fn recent_venue(&self, tenant: &TenantId, venue_id: &str) -> Result<Venue, Error> {
        let key = (tenant.clone(), venue_id.to_owned());
        self.venues
            .get_or_load(&key, || self.venue(tenant, venue_id))
            .await
    }

    fn remember(&self, tenant: &TenantId, venue: &Venue) {
        self.venues
            .put((tenant.clone(), venue.venue_id.clone()), venue.clone());
    }

    /// Reads a venue.
    pub async fn venue(&self, tenant: &TenantId, venue_id: &str) -> Result<Venue, Error> {
        let row = self
            .engine
            .pg()
            .get_venue(tenant, venue_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("venue {venue_id}")))?;
        let tz = parse_zone(&row.time_zone).ok_or_else(|| {
            Error::internal(format!("stored zone {} does not parse", row.time_zone))
        })?;
        Ok(Venue {
            venue_id: row.venue_id,
            tz,
            window_minutes: row.window_minutes,
        })
    }

    async fn schedule(&self, tenant: &TenantId, venue_id: &str) -> Result<Schedule, Error> {
        Ok(Schedule::from_rows(
            &self.engine.pg().schedule(tenant, venue_id).await?,
        ))
    }

    /// The schedule as read less than VENUE_FRESH ago, or read now.
    async fn recent_schedule(
        &self,
        tenant: &TenantId,
        venue_id: &str,
    ) -> Result<Arc<Schedule>, Error> {
        let key = (tenant.clone(), venue_id.to_owned());
        self.schedules
            .get_or_load(&key, || async {
                self.schedule(tenant, venue_id).await.map(Arc::new)
            })
            .await
    }

    /// Replaces the weekly schedule, then brings the venue's open windows
    /// to their new capacities.
    pub async fn set_weekly(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        hours: &[(u32, u32, u32)],
    ) -> Result<(), Error> {
        let venue = self.venue(tenant, venue_id).await?;
        self.engine
            .pg()
            .set_weekly_schedule(tenant, venue_id, hours)
            .await?;
        self.resync(tenant, &venue).await
    }

    /// Sets (or clears) one date's override, then resyncs open windows.
    pub async fn set_override(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        day: NaiveDate,
        hours: Option<&[(u32, u32)]>,
    ) -> Result<(), Error> {
        let venue = self.venue(tenant, venue_id).await?;
        self.engine
            .pg()
            .set_date_override(tenant, venue_id, day, hours)
            .await?;
        self.resync(tenant, &venue).await
    }

    /// Applies the schedule to every window pool of the venue that has not
    /// ended. A cut below what a window already has never cancels anything:
    /// the window gets a ceiling and sells nothing more.
    async fn resync(&self, tenant: &TenantId, venue: &Venue) -> Result<(), Error> {
        let schedule = Arc::new(self.schedule(tenant, &venue.venue_id).await?);
        let key = (tenant.clone(), venue.venue_id.clone());
        self.schedules.put(key, Arc::clone(&schedule));
        let prefix = format!("slot/{}/", venue.venue_id);
        let now = Utc::now();
        for id in self
            .engine
            .pg()
            .pool_ids_with_prefix(tenant, &prefix)
            .await?
        {
            let pool = PoolId::from_store(id);
            let Some(start) = window_start_of(&pool) else {
                continue;
            };
            let w = window_at(start, venue.tz, venue.window_minutes);
            if w.end <= now {
                continue;
            }
            self.set_window_capacity(tenant, &pool, schedule.capacity(&w, venue.window_minutes))
                .await?;
        }
        Ok(())
    }

    async fn set_window_capacity(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        capacity: i64,
    ) -> Result<(), Error> {
        let pg = self.engine.pg();
        let Some(row) = pg
            .get_pools(tenant, std::slice::from_ref(pool))
            .await?
            .pop()
        else {
            return Ok(());
        };
        let current = row.capacity.unwrap_or(0);
        let adjustment = format!(
            "schedule-{}-{}",
            pool.as_str().replace('/', "-"),
            Utc::now().timestamp_nanos_opt().unwrap_or(0)
        );
        let change = || {
            self.engine.adjust_capacity(
                tenant,
                pool,
                Capacity::To(capacity),
                &adjustment,
                "schedule",
                None,
            )
        };
        if capacity >= current {
            if capacity > current {
                change().await?;
            }
            pg.set_ceiling(tenant, pool, None).await?;
            return self.engine.sync(tenant, std::slice::from_ref(pool)).await;
        }
        // Stop sales beyond the new capacity first, then lower it if nothing
        // taken stands in the way.
        pg.set_ceiling(tenant, pool, Some(capacity)).await?;
        self.engine.sync(tenant, std::slice::from_ref(pool)).await?;
        match change().await {
            Ok(_) => {
                pg.set_ceiling(tenant, pool, None).await?;
                self.engine.sync(tenant, std::slice::from_ref(pool)).await
            }
            Err(Error::FailedPrecondition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Each window in `[from, to)` with its counts: the counts as they are
    /// now, the venue and its schedule as read within VENUE_FRESH.
    pub async fn availability(
        &self,
        tenant: &TenantId,
        venue_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<WindowView>, Error> {
        let venue = self.recent_venue(tenant, venue_id).await?;
        let schedule = self.recent_schedule(tenant, venue_id).await?;
        let windows = windows_between(from, to, venue.tz, venue.window_minutes, MAX_WINDOWS)
            .ok_or_else(|| {
                Error::invalid(
                    "to",
                    format!("the range spans more than {MAX_WINDOWS} windows"),
                )
            })?;
        let pools: Vec<PoolId> = windows.iter().map(|w| window_pool(venue_id, w)).collect();
        let views = self.engine.pools_if_any(tenant, &pools).await?;
        Ok(windows
            .iter()
            .zip(views)
            .map(|(w, v)| {
                let capacity = schedule.capacity(w, venue.window_minutes);
                let (confirmed, pending) = v.as_ref().map_or((0, 0), |v| (v.sold, v.held));
                WindowView {
                    start: w.start,
                    end: w.end,
                    capacity,
                    confirmed,
                    pending,
                    available: (capacity
                        - confirmed
                        - pending
                        - v.as_ref().map_or(0, |v| v.in_doubt))
                    .max(0),
                }
            })
            .collect())
    }

    /// Reserves a slot in the window containing `at`.
    pub async fn reserve(
        &self,
        tenant: &TenantId,
        id: HoldId,
        venue_id: &str,
        at: DateTime<Utc>,
        ttl: Duration,
        reference: String,
    ) -> Result<SlotOutcome, Error> {
        // Such an id could be some other reservation's late slot: its
        // confirmation would find this one and commit it.
        if id.as_str().ends_with(LATE) {
            return Err(Error::invalid(
                "reservation_id",
                format!("must not end in {LATE}, which names late confirmations' slots"),
            ));
        }
        let venue = self.recent_venue(tenant, venue_id).await?;
        let w = window_at(at, venue.tz, venue.window_minutes);
        let pool = self.ensure_window(tenant, &venue, &w).await?;
        self.take(tenant, id, pool, Some(ttl), reference).await
    }

    async fn ensure_window(
        &self,
        tenant: &TenantId,
        venue: &Venue,
        w: &Window,
    ) -> Result<PoolId, Error> {
        let pool = window_pool(&venue.venue_id, w);
        let key = (tenant.clone(), pool);
        // A poisoned lock only means a panic elsewhere mid-insert; the set
        // is a cache, so its contents are still usable.
        if self
            .known_windows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return Ok(key.1);
        }
        let pool = key.1.clone();
        let capacity = self
            .schedule(tenant, &venue.venue_id)
            .await?
            .capacity(w, venue.window_minutes);
        self.engine
            .pg()
            .ensure_pool(
                tenant,
                &NewPool {
                    pool_id: pool.clone(),
                    job: Job::Slot.as_str(),
                    capacity: Some(capacity),
                    starts_at: None,
                    ends_at: Some(w.end),
                },
            )
            .await?;
        let mut known = self
            .known_windows
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if known.len() >= KNOWN_WINDOWS {
            known.clear();
        }
        known.insert(key);
        Ok(pool)
    }

    async fn take(
        &self,
        tenant: &TenantId,
        id: HoldId,
        pool: PoolId,
        ttl: Option<Duration>,
        reference: String,
    ) -> Result<SlotOutcome, Error> {
        let one = Quantity::parse("quantity", 1, 1)?;
        let lines = Lines::parse(
            "lines",
            vec![Line {
                pool: pool.clone(),
                quantity: one,
            }],
            1,
        )?;
        let take = Take {
            id,
            job: Job::Slot,
            lines,
            ttl,
            customer: None,
            reference,
        };
        Ok(match self.engine.take(tenant, &take).await? {
            TakeOutcome::Taken(hold) => SlotOutcome::Done(hold, false),
            TakeOutcome::NotActive(_) => SlotOutcome::Over,
            TakeOutcome::SoldOut(_) | TakeOutcome::CustomerLimit(_) => {
                let capacity = self
                    .engine
                    .pools(tenant, std::slice::from_ref(&pool))
                    .await?
                    .pop()
                    .and_then(|v| v.capacity)
                    .unwrap_or(0);
                if capacity == 0 {
                    SlotOutcome::Closed
                } else {
                    SlotOutcome::Full
                }
            }
        })
    }

    /// Confirms a reservation at payment, exactly once per payment id. A
    /// reservation that expired or was released gets one try at a fresh
    /// slot in its window: a hold of its own under `<reservation>.late`,
    /// committed at once with the payment id. So a retry with the same
    /// payment repeats the answer, and another payment for the same
    /// reservation is refused (FAILED_PRECONDITION), as it is for a
    /// reservation confirmed in time: one reservation, one slot.
    pub async fn confirm(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        payment_id: &str,
    ) -> Result<SlotOutcome, Error> {
        self.confirm_or_late(tenant, id, payment_id)
            .await
            .map_err(slot_words)
    }

    /// [`Slots::confirm`], in the engine's words.
    async fn confirm_or_late(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        payment_id: &str,
    ) -> Result<SlotOutcome, Error> {
        match self.engine.commit(tenant, id, Job::Slot, payment_id).await {
            Ok(hold) => Ok(SlotOutcome::Done(hold, false)),
            Err(Error::FailedPrecondition(why)) => {
                let hold = self.engine.get_hold(tenant, id, Job::Slot).await?;
                if !matches!(hold.state, HoldState::Expired | HoldState::Released) {
                    return Err(Error::FailedPrecondition(why));
                }
                let (pool, _) = hold
                    .lines
                    .first()
                    .cloned()
                    .ok_or_else(|| Error::internal("a slot hold has one line"))?;
                let late = HoldId::parse(
                    "reservation_id",
                    &format!("{id}{LATE}"),
                    self.max_id_len + LATE.len(),
                )?;
                let taken = self
                    .take(tenant, late.clone(), pool, Some(LATE_TTL), String::new())
                    .await?;
                if !matches!(taken, SlotOutcome::Done(..)) {
                    return Ok(taken);
                }
                let hold = self
                    .engine
                    .commit(tenant, &late, Job::Slot, payment_id)
                    .await?;
                Ok(SlotOutcome::Done(hold, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Releases a reservation.
    pub async fn release(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        let released = self.engine.release(tenant, id, Job::Slot).await;
        released.map_err(slot_words)
    }

    /// Reads a reservation.
    pub async fn get(&self, tenant: &TenantId, id: &HoldId) -> Result<Hold, Error> {
        let hold = self.engine.get_hold(tenant, id, Job::Slot).await;
        hold.map_err(slot_words)
    }
}

/// An engine error about a hold, in a slot reservation's words.
fn slot_words(e: Error) -> Error {
    super::in_words(e, "reservation", "confirmed")
}

/// The window start of a slot pool id (`slot/<venue>/<unix s>`).
pub fn window_start_of(pool: &PoolId) -> Option<DateTime<Utc>> {
    pool.as_str()
        .rsplit('/')
        .next()?
        .parse::<i64>()
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
}
