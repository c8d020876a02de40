//! Time-window slots: the window is the atomic unit, so payment
//! confirmation never has to guess.

use std::sync::Arc;

use holdfast::grpc::pb::slot_service_client::SlotServiceClient;
use holdfast::grpc::pb::{self, SlotOutcome};
use tokio::sync::Barrier;
use tonic::Code;

use crate::helpers::{TestApp, spawn_app};

fn ts(s: &str) -> prost_types::Timestamp {
    let t: chrono::DateTime<chrono::Utc> = s.parse().unwrap();
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// A time tomorrow at 10:05 UTC: inside a window that is not over.
pub(crate) fn tomorrow() -> prost_types::Timestamp {
    let day = chrono::Utc::now().date_naive() + chrono::Days::new(1);
    ts(&format!("{day}T10:05:00Z"))
}

/// A venue in `zone` selling `per_hour` slots every hour of every day.
async fn venue(app: &TestApp, id: &str, zone: &str, per_hour: i32) {
    let (set_venue, set_schedule) = venue_requests(id, zone, per_hour);
    let mut c = app.slots();
    c.set_venue(set_venue).await.unwrap();
    c.set_schedule(set_schedule).await.unwrap();
}

/// The two calls that make a venue in `zone` selling `per_hour` slots
/// every hour of every day.
pub(crate) fn venue_requests(
    id: &str,
    zone: &str,
    per_hour: i32,
) -> (pb::SetVenueRequest, pb::SetScheduleRequest) {
    let hours = (1..=7)
        .flat_map(|d| {
            (0..24).map(move |h| pb::HourSlots {
                weekday: d,
                hour: h,
                slots_per_hour: per_hour,
            })
        })
        .collect();
    let set_venue = pb::SetVenueRequest {
        venue_id: id.into(),
        time_zone: zone.into(),
        window_minutes: 0,
    };
    let set_schedule = pb::SetScheduleRequest {
        venue_id: id.into(),
        hours,
    };
    (set_venue, set_schedule)
}

pub(crate) fn reserve(
    id: &str,
    venue: &str,
    at: prost_types::Timestamp,
    ttl_secs: i64,
) -> pb::ReserveSlotRequest {
    pb::ReserveSlotRequest {
        reservation_id: id.into(),
        venue_id: venue.into(),
        at: Some(at),
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
        reference: String::new(),
    }
}

fn confirm(id: &str, payment: &str) -> pb::ConfirmSlotRequest {
    pb::ConfirmSlotRequest {
        reservation_id: id.into(),
        payment_id: payment.into(),
    }
}

async fn window(app: &TestApp, venue: &str, at: prost_types::Timestamp) -> pb::WindowAvailability {
    let to = prost_types::Timestamp {
        seconds: at.seconds + 1,
        nanos: 0,
    };
    app.slots()
        .get_availability(pb::GetAvailabilityRequest {
            venue_id: venue.into(),
            from: Some(at),
            to: Some(to),
        })
        .await
        .unwrap()
        .into_inner()
        .windows
        .remove(0)
}

#[tokio::test]
async fn one_slot_left_a_buys_it_and_b_is_refused() {
    let app = spawn_app().await;
    venue(&app, "club", "UTC", 4).await; // 1 slot per 15-minute window
    let at = tomorrow();
    let a = app
        .slots()
        .reserve_slot(reserve("a", "club", at, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.outcome(), SlotOutcome::Reserved);
    let paid = app
        .slots()
        .confirm_slot(confirm("a", "pay-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paid.outcome(), SlotOutcome::Confirmed);
    assert!(!paid.late);
    let b = app
        .slots()
        .reserve_slot(reserve("b", "club", at, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.outcome(), SlotOutcome::WindowFull);
    // The retry of A's payment repeats its answer; another payment is refused.
    let again = app
        .slots()
        .confirm_slot(confirm("a", "pay-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), SlotOutcome::Confirmed);
    let other = app
        .slots()
        .confirm_slot(confirm("a", "pay-other"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    let w = window(&app, "club", at).await;
    assert_eq!(
        (w.capacity, w.confirmed, w.pending, w.available),
        (1, 1, 0, 0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_slot_reservation_retried_read_and_released_is_one_reservation() {
    let app = spawn_app().await;
    venue(&app, "club", "UTC", 4).await; // 1 slot per 15-minute window
    let (at, mut c) = (tomorrow(), app.slots());
    let first = c.reserve_slot(reserve("a", "club", at, 600)).await;
    let first = first.unwrap().into_inner();
    assert_eq!(first.outcome(), SlotOutcome::Reserved);
    let again = c.reserve_slot(reserve("a", "club", at, 600)).await;
    let again = again.unwrap().into_inner();
    assert_eq!(again, first, "a retry repeats the first answer");
    let w = window(&app, "club", at).await;
    assert_eq!(
        (w.pending, w.available),
        (1, 0),
        "and took one slot, not two"
    );

    // The same id for another window is another request: refused, and
    // that window keeps its slot.
    let later = prost_types::Timestamp {
        seconds: at.seconds + 3600,
        nanos: 0,
    };
    let err = c.reserve_slot(reserve("a", "club", later, 600)).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(window(&app, "club", later).await.available, 1);

    let read = pb::GetSlotReservationRequest {
        reservation_id: "a".into(),
    };
    let got = c.get_slot_reservation(read.clone()).await.unwrap();
    assert_eq!(got.into_inner().reservation, first.reservation);

    // A release frees the slot once; its retry repeats the answer.
    let release = pb::ReleaseSlotRequest {
        reservation_id: "a".into(),
    };
    let released = c.release_slot(release.clone()).await.unwrap().into_inner();
    let released = released.reservation.unwrap();
    assert_eq!(released.state(), pb::HoldState::Released);
    let twice = c.release_slot(release).await.unwrap().into_inner();
    assert_eq!(twice.reservation.unwrap(), released);
    let got = c.get_slot_reservation(read).await.unwrap().into_inner();
    assert_eq!(got.reservation.unwrap(), released);
    let w = window(&app, "club", at).await;
    assert_eq!((w.pending, w.available), (0, 1));

    // A late retry of the reservation does not take the slot back: it is
    // another customer's to reserve.
    let late = c.reserve_slot(reserve("a", "club", at, 600)).await;
    let late = late.unwrap().into_inner().reservation.unwrap();
    assert_eq!(late.state(), pb::HoldState::Released);
    let b = c.reserve_slot(reserve("b", "club", at, 600)).await;
    assert_eq!(b.unwrap().into_inner().outcome(), SlotOutcome::Reserved);
    app.shutdown().await;
}

#[tokio::test]
async fn two_hundred_concurrent_reserve_and_confirm_for_a_window_of_three_confirm_exactly_three() {
    let app = spawn_app().await;
    venue(&app, "bar", "Europe/Paris", 12).await; // 3 per window
    let at = tomorrow();
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(SlotServiceClient::new(app.new_channel().await));
    }
    let barrier = Arc::new(Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let r = c
                    .reserve_slot(reserve(&format!("r{i}"), "bar", at, 600))
                    .await
                    .unwrap()
                    .into_inner();
                if r.outcome() != SlotOutcome::Reserved {
                    return false;
                }
                c.confirm_slot(confirm(&format!("r{i}"), &format!("pay{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .outcome()
                    == SlotOutcome::Confirmed
            })
        })
        .collect();
    let mut confirmed = 0;
    for t in tasks {
        confirmed += usize::from(t.await.unwrap());
    }
    assert_eq!(confirmed, 3);
    let w = window(&app, "bar", at).await;
    assert_eq!(
        (w.capacity, w.confirmed, w.pending, w.available),
        (3, 3, 0, 0)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_expired_reservation_frees_its_slot_and_late_confirmation_takes_one_only_if_free() {
    let app = spawn_app().await;
    venue(&app, "v", "UTC", 4).await; // 1 per window
    let at = tomorrow();
    let r = app
        .slots()
        .reserve_slot(reserve("slow", "v", at, 1))
        .await
        .unwrap()
        .into_inner();
    expired(&app, r).await;

    // The slot is free again: a late confirmation takes it.
    let late = app
        .slots()
        .confirm_slot(confirm("slow", "pay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.outcome(), SlotOutcome::Confirmed);
    assert!(late.late);
    assert_eq!(
        app.slots()
            .confirm_slot(confirm("slow", "pay-1"))
            .await
            .unwrap()
            .into_inner(),
        late,
        "a retry repeats it"
    );

    // Again, but this time a new customer takes the freed slot first.
    let at2 = prost_types::Timestamp {
        seconds: at.seconds + 3600,
        nanos: 0,
    };
    let r = app
        .slots()
        .reserve_slot(reserve("slow2", "v", at2, 1))
        .await
        .unwrap()
        .into_inner();
    expired(&app, r).await;
    let other = app
        .slots()
        .reserve_slot(reserve("fast", "v", at2, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        other.outcome(),
        SlotOutcome::Reserved,
        "the expired reservation does not block"
    );
    let refused = app
        .slots()
        .confirm_slot(confirm("slow2", "pay-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        refused.outcome(),
        SlotOutcome::WindowFull,
        "refund: the window is full"
    );
    let w = window(&app, "v", at2).await;
    assert_eq!((w.confirmed, w.pending), (0, 1));
    app.shutdown().await;
}

/// Reserves a slot at `at` under each of `ids` in turn (10-minute TTL):
/// the outcomes.
async fn reserve_each(
    app: &TestApp,
    venue: &str,
    at: prost_types::Timestamp,
    ids: &[&str],
) -> Vec<SlotOutcome> {
    let mut outcomes = Vec::new();
    for id in ids {
        let r = app
            .slots()
            .reserve_slot(reserve(id, venue, at, 600))
            .await
            .unwrap();
        outcomes.push(r.into_inner().outcome());
    }
    outcomes
}

/// Waits until `r`'s expiry has passed on Redis's clock.
async fn expired(app: &TestApp, r: pb::ReserveSlotResponse) {
    let exp = r.reservation.unwrap().expires_at.unwrap();
    let exp_ms = exp.seconds * 1000 + i64::from(exp.nanos / 1_000_000);
    app.eventually("the reservation's expiry on Redis's clock", || async {
        (app.redis_now_ms().await > exp_ms).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_expired_reservation_is_confirmed_late_once_whatever_the_payment() {
    let app = spawn_app().await;
    venue(&app, "v", "UTC", 8).await; // 2 per window: room for a second
    let at = tomorrow();
    let mut c = app.slots();
    let r = c.reserve_slot(reserve("slow", "v", at, 1)).await.unwrap();
    expired(&app, r.into_inner()).await;

    let late = c
        .confirm_slot(confirm("slow", "pay-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.outcome(), SlotOutcome::Confirmed);
    assert!(late.late);
    let slot = late.reservation.clone().unwrap();
    assert_eq!(slot.payment_id, "pay-1", "the late slot names its payment");
    assert_eq!(slot.state(), pb::HoldState::Committed);

    // A second payment for the same reservation takes no second slot,
    // though the window has one: it is refused, as it would be had the
    // reservation been confirmed in time.
    let err = c.confirm_slot(confirm("slow", "pay-2")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let w = window(&app, "v", at).await;
    assert_eq!((w.confirmed, w.pending, w.available), (1, 0, 1));
    // The first payment's retry still repeats its answer, and the late
    // slot reads back by the id the answer gave.
    let again = c.confirm_slot(confirm("slow", "pay-1")).await.unwrap();
    assert_eq!(again.into_inner(), late);
    let read = c
        .get_slot_reservation(pb::GetSlotReservationRequest {
            reservation_id: slot.reservation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap();
    assert_eq!(read.payment_id, "pay-1");

    // A reservation's own id cannot take a late slot's name, or the late
    // confirmation of "early" would find it and commit it.
    let early = c.reserve_slot(reserve("early", "v", at, 1)).await.unwrap();
    let err = c
        .reserve_slot(reserve("early.late", "v", at, 600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("reservation_id"), "{err:?}");
    expired(&app, early.into_inner()).await;
    let late = c.confirm_slot(confirm("early", "pay-3")).await.unwrap();
    assert_eq!(late.into_inner().outcome(), SlotOutcome::Confirmed);
    app.shutdown().await;
}

#[tokio::test]
async fn a_venue_cannot_change_its_clock_under_booked_slots() {
    let app = spawn_app().await;
    let mut c = app.slots();
    let set = |zone: &str, minutes: u32| pb::SetVenueRequest {
        venue_id: "hall".into(),
        time_zone: zone.into(),
        window_minutes: minutes,
    };
    c.set_venue(set("UTC", 60)).await.unwrap();
    c.set_schedule(venue_requests("hall", "UTC", 8).1)
        .await
        .unwrap();
    let at = tomorrow(); // the 10:00-11:00 UTC window
    for i in 0..8 {
        let r = c
            .reserve_slot(reserve(&format!("r{i}"), "hall", at, 600))
            .await
            .unwrap();
        assert_eq!(r.into_inner().outcome(), SlotOutcome::Reserved);
    }
    // Quarter-hour windows would give 10:00-10:15 the hour's eight and
    // sell 10:15, 10:30 and 10:45 again; another zone would move the hour.
    for (zone, minutes) in [("UTC", 15), ("Asia/Kolkata", 60)] {
        let err = c.set_venue(set(zone, minutes)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("8 slots"), "{}", err.message());
    }
    let w = window(&app, "hall", at).await;
    assert_eq!((w.capacity, w.pending), (8, 8));
    let minutes = w.end.unwrap().seconds - w.start.unwrap().seconds;
    assert_eq!(minutes, 60 * 60, "the venue kept its hour-long windows");

    // Once nothing is booked ahead the change goes through, and the window
    // already made takes the capacity of the new shape.
    for i in 0..8 {
        c.release_slot(pb::ReleaseSlotRequest {
            reservation_id: format!("r{i}"),
        })
        .await
        .unwrap();
    }
    c.set_venue(set("UTC", 15)).await.unwrap();
    let w = window(&app, "hall", at).await;
    assert_eq!((w.capacity, w.pending, w.available), (2, 0, 2));
    let taken = reserve_each(&app, "hall", at, &["q0", "q1", "q2"]).await;
    assert_eq!(
        taken,
        [
            SlotOutcome::Reserved,
            SlotOutcome::Reserved,
            SlotOutcome::WindowFull
        ],
        "the reused window sells a quarter's two, not the hour's eight"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_cut_window_counts_what_the_fallback_holds_against_its_ceiling() {
    use holdfast::domain::{HoldId, Job, Line, Lines, PoolId, Quantity, TenantId};
    use holdfast::store::postgres::{PgStore, PgTake};

    let app = spawn_app().await;
    venue(&app, "v", "UTC", 40).await; // 10 per window
    let at = tomorrow(); // in the 10:00-10:15 UTC window
    let mut c = app.slots();
    let first = c.reserve_slot(reserve("r0", "v", at, 600)).await.unwrap();
    assert_eq!(first.into_inner().outcome(), SlotOutcome::Reserved);

    // An outage: the fallback holds 3 of the units Redis was never given.
    let pool = PoolId::from_store(format!("slot/v/{}", at.seconds - 300));
    let take = PgTake {
        id: HoldId::parse("id", "outage", 128).unwrap(),
        job: Job::Slot,
        lines: Lines::parse(
            "lines",
            vec![Line {
                pool: pool.clone(),
                quantity: Quantity::parse("quantity", 3, 10).unwrap(),
            }],
            1,
        )
        .unwrap(),
        ttl: Some(std::time::Duration::from_secs(600)),
        reference: String::new(),
    };
    let dev = TenantId::parse("dev").unwrap();
    let answer = PgStore::from_pool(app.pg.clone())
        .fallback_take(&dev, &take)
        .await
        .unwrap();
    assert!(
        matches!(answer, holdfast::store::HoldReply::Hold(_)),
        "{answer:?}"
    );
    for i in 1..5 {
        let r = c
            .reserve_slot(reserve(&format!("r{i}"), "v", at, 600))
            .await
            .unwrap();
        assert_eq!(r.into_inner().outcome(), SlotOutcome::Reserved);
    }

    // Cut to 7 a window with 8 taken (5 in Redis, 3 in Postgres): nothing
    // is cancelled, and nothing more is sold, though Redis alone has 5.
    c.set_schedule(venue_requests("v", "UTC", 28).1)
        .await
        .unwrap();
    let full = c
        .reserve_slot(reserve("late-1", "v", at, 600))
        .await
        .unwrap();
    assert_eq!(full.into_inner().outcome(), SlotOutcome::WindowFull);

    // Two given back leave 6 taken: one more fits under the ceiling.
    for id in ["r1", "r2"] {
        c.release_slot(pb::ReleaseSlotRequest {
            reservation_id: id.into(),
        })
        .await
        .unwrap();
    }
    let outcomes = reserve_each(&app, "v", at, &["late-2", "late-3", "late-4"]).await;
    assert_eq!(
        outcomes,
        [
            SlotOutcome::Reserved,
            SlotOutcome::WindowFull,
            SlotOutcome::WindowFull
        ]
    );
    let w = window(&app, "v", at).await;
    assert_eq!((w.capacity, w.confirmed + w.pending), (7, 7));
    app.shutdown().await;
}

/// Reservations remember the venue they read for a second (src/services/
/// slots.rs); a change made through the daemon applies to the very next
/// one.
#[tokio::test]
async fn a_venues_new_time_zone_applies_to_the_next_reservation() {
    let app = spawn_app().await;
    let mut c = app.slots();
    let set_zone = |zone: &str| pb::SetVenueRequest {
        venue_id: "club".into(),
        time_zone: zone.into(),
        window_minutes: 15,
    };
    c.set_venue(set_zone("UTC")).await.unwrap();
    // Open 10:00-11:00 local time only, every day.
    let hours = (1..=7)
        .map(|d| pb::HourSlots {
            weekday: d,
            hour: 10,
            slots_per_hour: 4,
        })
        .collect();
    c.set_schedule(pb::SetScheduleRequest {
        venue_id: "club".into(),
        hours,
    })
    .await
    .unwrap();
    let at = tomorrow(); // 10:05 UTC
    let a = c.reserve_slot(reserve("a", "club", at, 600)).await.unwrap();
    assert_eq!(a.into_inner().outcome(), SlotOutcome::Reserved);
    // The zone can change once nothing is booked ahead (the test above).
    c.release_slot(pb::ReleaseSlotRequest {
        reservation_id: "a".into(),
    })
    .await
    .unwrap();

    // In Tokyo, 10:20 UTC is 19:20: closed.
    c.set_venue(set_zone("Asia/Tokyo")).await.unwrap();
    let later = prost_types::Timestamp {
        seconds: at.seconds + 15 * 60,
        nanos: 0,
    };
    let b = c
        .reserve_slot(reserve("b", "club", later, 600))
        .await
        .unwrap();
    assert_eq!(
        b.into_inner().outcome(),
        SlotOutcome::Closed,
        "the window is read on Tokyo's clock"
    );
    // So is the window reserved on UTC's clock before, 19:05 in Tokyo.
    let again = c.reserve_slot(reserve("c", "club", at, 600)).await.unwrap();
    assert_eq!(again.into_inner().outcome(), SlotOutcome::Closed);
    app.shutdown().await;
}

#[tokio::test]
async fn windows_follow_the_venues_clock_across_a_dst_change() {
    let app = spawn_app().await;
    let mut c = app.slots();
    c.set_venue(pb::SetVenueRequest {
        venue_id: "ny".into(),
        time_zone: "America/New_York".into(),
        window_minutes: 15,
    })
    .await
    .unwrap();
    // Sunday 2026-03-08: 01:00-02:00 EST sells 8/h (2 per window), 03:00 EDT 16/h (4).
    let hours = vec![
        pb::HourSlots {
            weekday: 7,
            hour: 1,
            slots_per_hour: 8,
        },
        pb::HourSlots {
            weekday: 7,
            hour: 2,
            slots_per_hour: 100,
        },
        pb::HourSlots {
            weekday: 7,
            hour: 3,
            slots_per_hour: 16,
        },
    ];
    c.set_schedule(pb::SetScheduleRequest {
        venue_id: "ny".into(),
        hours,
    })
    .await
    .unwrap();
    let windows = c
        .get_availability(pb::GetAvailabilityRequest {
            venue_id: "ny".into(),
            from: Some(ts("2026-03-08T06:30:00Z")),
            to: Some(ts("2026-03-08T07:30:00Z")),
        })
        .await
        .unwrap()
        .into_inner()
        .windows;
    let got: Vec<(i64, i64)> = windows
        .iter()
        .map(|w| (w.start.unwrap().seconds, w.capacity))
        .collect();
    let want = vec![
        (ts("2026-03-08T06:30:00Z").seconds, 2), // 01:30 EST
        (ts("2026-03-08T06:45:00Z").seconds, 2), // 01:45 EST
        (ts("2026-03-08T07:00:00Z").seconds, 4), // 03:00 EDT: 02:xx never happens
        (ts("2026-03-08T07:15:00Z").seconds, 4),
    ];
    assert_eq!(got, want);
    app.shutdown().await;
}

#[tokio::test]
async fn a_schedule_cut_below_confirmed_slots_keeps_them_and_sells_nothing_more() {
    let app = spawn_app().await;
    venue(&app, "cut", "UTC", 12).await; // 3 per window
    let at = tomorrow();
    for i in 0..3 {
        app.slots()
            .reserve_slot(reserve(&format!("r{i}"), "cut", at, 600))
            .await
            .unwrap();
        app.slots()
            .confirm_slot(confirm(&format!("r{i}"), &format!("p{i}")))
            .await
            .unwrap();
    }
    venue(&app, "cut", "UTC", 4).await; // now 1 per window
    let w = window(&app, "cut", at).await;
    assert_eq!((w.capacity, w.confirmed, w.available), (1, 3, 0));
    let r = app
        .slots()
        .reserve_slot(reserve("late", "cut", at, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), SlotOutcome::WindowFull);
    venue(&app, "cut", "UTC", 20).await; // 5 per window
    let w = window(&app, "cut", at).await;
    assert_eq!((w.capacity, w.confirmed, w.available), (5, 3, 2));
    app.shutdown().await;
}

#[tokio::test]
async fn a_date_override_closes_a_holiday() {
    let app = spawn_app().await;
    venue(&app, "h", "UTC", 8).await;
    let day = chrono::Utc::now().date_naive() + chrono::Days::new(1);
    app.slots()
        .set_date_override(pb::SetDateOverrideRequest {
            venue_id: "h".into(),
            date: day.to_string(),
            hours: vec![],
            clear: false,
        })
        .await
        .unwrap();
    let r = app
        .slots()
        .reserve_slot(reserve("x", "h", tomorrow(), 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), SlotOutcome::Closed);

    // Clearing it while naming hours is a contradiction: refused, and the
    // holiday stands.
    let clear = |hours: Vec<pb::HourSlots>| pb::SetDateOverrideRequest {
        venue_id: "h".into(),
        date: day.to_string(),
        hours,
        clear: true,
    };
    let ten = pb::HourSlots {
        weekday: 0,
        hour: 10,
        slots_per_hour: 8,
    };
    let err = app
        .slots()
        .set_date_override(clear(vec![ten]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("hours: "), "{err:?}");
    let r = app
        .slots()
        .reserve_slot(reserve("y", "h", tomorrow(), 600))
        .await
        .unwrap();
    assert_eq!(r.into_inner().outcome(), SlotOutcome::Closed);
    // Cleared, the weekly schedule sells the day again.
    app.slots().set_date_override(clear(vec![])).await.unwrap();
    let r = app
        .slots()
        .reserve_slot(reserve("z", "h", tomorrow(), 600))
        .await
        .unwrap();
    assert_eq!(r.into_inner().outcome(), SlotOutcome::Reserved);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_slot_input_gets_a_clear_error_and_changes_nothing() {
    let app = spawn_app().await;
    let mut c = app.slots();
    let err = c
        .reserve_slot(reserve("r", "nowhere", tomorrow(), 600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .set_venue(pb::SetVenueRequest {
            venue_id: "v".into(),
            time_zone: "Mars/Olympus_Mons".into(),
            window_minutes: 15,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("time_zone"), "{}", err.message());
    venue(&app, "v", "UTC", 4).await;
    let bad = pb::SetScheduleRequest {
        venue_id: "v".into(),
        hours: vec![pb::HourSlots {
            weekday: 1,
            hour: 9,
            slots_per_hour: -4,
        }],
    };
    let err = c.set_schedule(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("hours[0].slots_per_hour"),
        "{}",
        err.message()
    );
    for (weekday, hour, field) in [(0, 9, "hours[0].weekday"), (1, 24, "hours[0].hour")] {
        let err = c
            .set_schedule(pb::SetScheduleRequest {
                venue_id: "v".into(),
                hours: vec![pb::HourSlots {
                    weekday,
                    hour,
                    slots_per_hour: 4,
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    for minutes in [7, 120, 14] {
        let err = c
            .set_venue(pb::SetVenueRequest {
                venue_id: "v".into(),
                time_zone: "Europe/Paris".into(),
                window_minutes: minutes,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("window_minutes"), "{err:?}");
    }
    let ttl = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let bad_reserves = [
        (ttl(-1, 0), None, "r", "", "ttl"),
        (ttl(0, -1), None, "r", "", "ttl"),
        (ttl(0, 0), None, "r", "", "ttl"),
        (ttl(400 * 86_400, 0), None, "r", "", "ttl"),
        (None, at(i64::MAX, 0), "r", "", "at"),
        (None, at(tomorrow().seconds, -1), "r", "", "at"),
        (None, None, "", "", "reservation_id"),
        (None, None, "bad id!", "", "reservation_id"),
        (None, None, "r", &"x".repeat(129), "reference"),
    ];
    for (ttl, at, id, reference, field) in bad_reserves {
        let req = pb::ReserveSlotRequest {
            reservation_id: id.into(),
            venue_id: "v".into(),
            at: at.or(Some(tomorrow())),
            ttl,
            reference: reference.into(),
        };
        let err = c.reserve_slot(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        // The message starts with the field it names ("at" is also in
        // "reservation_id").
        let names = format!("{field}: ");
        assert!(err.message().starts_with(&names), "{field}: {err:?}");
    }
    // Past protobuf's last second (9999-12-31T23:59:59Z): chrono could
    // hold it, but the window's end would overflow.
    for seconds in [253_402_300_800, 8_210_298_412_799, -62_135_596_801] {
        let req = pb::ReserveSlotRequest {
            at: at(seconds, 0),
            ..reserve("r", "v", tomorrow(), 600)
        };
        let err = c.reserve_slot(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}: {err:?}");
        assert!(err.message().starts_with("at: "), "{err:?}");
    }
    // A range of eight thousand years is refused at once, counting no
    // further than the limit (it once built every window first), and the
    // daemon answers the next call.
    let err = c
        .get_availability(pb::GetAvailabilityRequest {
            venue_id: "v".into(),
            from: at(-62_135_596_800, 0),
            to: at(253_402_300_799, 0),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("to: "), "{err:?}");
    // The schedule and venue are as they were, and nothing was reserved:
    // 1 slot free in tomorrow's 15-minute window.
    let w = window(&app, "v", tomorrow()).await;
    assert_eq!((w.capacity, w.pending, w.available), (1, 0, 1));
    let minutes = w.end.unwrap().seconds - w.start.unwrap().seconds;
    assert_eq!(minutes, 15 * 60);
    // An unknown reservation is named as one, not as the engine's hold.
    let ghost = |err: tonic::Status| {
        assert_eq!(
            (err.code(), err.message()),
            (Code::NotFound, "reservation ghost not found")
        )
    };
    ghost(c.confirm_slot(confirm("ghost", "p")).await.unwrap_err());
    let reservation_id = "ghost".to_string();
    let release = pb::ReleaseSlotRequest {
        reservation_id: reservation_id.clone(),
    };
    ghost(c.release_slot(release).await.unwrap_err());
    let read = pb::GetSlotReservationRequest { reservation_id };
    ghost(c.get_slot_reservation(read).await.unwrap_err());
    // A confirmed one cannot be released, in a reservation's words too.
    let r = c.reserve_slot(reserve("paid", "v", tomorrow(), 600)).await;
    assert_eq!(r.unwrap().into_inner().outcome(), SlotOutcome::Reserved);
    c.confirm_slot(confirm("paid", "p1")).await.unwrap();
    let err = c
        .release_slot(pb::ReleaseSlotRequest {
            reservation_id: "paid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::FailedPrecondition,
            "reservation paid is confirmed; it cannot be released"
        )
    );
    app.shutdown().await;
}

#[tokio::test]
async fn availability_reads_taken_together_each_get_their_own_windows() {
    let app = spawn_app().await;
    venue(&app, "far", "UTC", 4).await; // 15-minute windows of 1 slot
    let start = tomorrow();
    let later = |hours: i64| prost_types::Timestamp {
        seconds: start.seconds + hours * 3600,
        nanos: 0,
    };
    // One slot confirmed in each of two ranges of 1,501 windows.
    for (id, at) in [("near", later(0)), ("next", later(400))] {
        app.slots()
            .reserve_slot(reserve(id, "far", at, 600))
            .await
            .unwrap();
        app.slots().confirm_slot(confirm(id, id)).await.unwrap();
    }
    let range = |from: i64, to: i64| pb::GetAvailabilityRequest {
        venue_id: "far".into(),
        from: Some(later(from)),
        to: Some(later(to)),
    };

    // Reads that wait while the pools are held go together: together they
    // name more windows than one call to the stores reads (2,000).
    let blocker = app.hold_table("pools", "ACCESS EXCLUSIVE").await;
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (from, to) = if i % 2 == 0 { (0, 375) } else { (375, 750) };
        let (mut slots, read) = (app.slots(), range(from, to));
        reads.spawn(async move {
            let r = slots.get_availability(read).await;
            (from, r.unwrap().into_inner().windows)
        });
    }
    app.eventually("a read waits for the pools", async || {
        (app.waiting_on_locks("%FROM pools WHERE tenant%").await > 0).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();

    for (from, windows) in reads.join_all().await {
        assert_eq!(windows.len(), 1501, "from hour {from}");
        let first = windows[0].start.unwrap().seconds;
        assert_eq!(
            first,
            later(from).seconds - 5 * 60,
            "the window holding `from`"
        );
        let booked: Vec<i64> = windows
            .iter()
            .filter(|w| w.confirmed > 0)
            .map(|w| w.start.unwrap().seconds)
            .collect();
        let mine = if from == 0 { later(0) } else { later(400) };
        assert_eq!(booked, [mine.seconds - 5 * 60], "from hour {from}");
        assert!(windows.iter().all(|w| w.capacity == 1), "from hour {from}");
    }
    app.shutdown().await;
}
