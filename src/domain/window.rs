//! Time windows of a venue: consecutive slices of the venue's local wall
//! clock (15 minutes by default), each its own pool.
//!
//! A window is identified by its start instant (UTC), so the two local
//! 01:15s of a night when clocks go back are two windows, and the local hour
//! that does not exist when clocks go forward has none. Offsets change on
//! whole hours (and are multiples of 15 minutes) in every zone that matters
//! here, so a window never straddles a change.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Timelike, Utc};
use chrono_tz::Tz;

/// One window of a venue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First instant of the window.
    pub start: DateTime<Utc>,
    /// First instant after it.
    pub end: DateTime<Utc>,
    /// The local date of its start.
    pub local_date: NaiveDate,
    /// The ISO weekday (1 = Monday) of its start.
    pub weekday: u32,
    /// The local hour of its start.
    pub hour: u32,
}

/// The window of `minutes` (a divisor of 60) containing instant `t` in zone
/// `tz`.
pub fn window_at(t: DateTime<Utc>, tz: Tz, minutes: u32) -> Window {
    let local = t.with_timezone(&tz);
    let into = i64::from(local.minute() % minutes) * 60 + i64::from(local.second());
    let start = t
        - Duration::seconds(into)
        - Duration::nanoseconds(i64::from(local.nanosecond() % 1_000_000_000));
    let local_start = start.with_timezone(&tz);
    Window {
        start,
        end: start + Duration::minutes(i64::from(minutes)),
        local_date: local_start.date_naive(),
        weekday: local_start.weekday().number_from_monday(),
        hour: local_start.hour(),
    }
}

/// Every window overlapping `[from, to)`, in order; `None` if there are
/// more than `at_most`. It stops counting there, so a range of centuries
/// costs no more than one of `at_most` windows.
pub fn windows_between(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    tz: Tz,
    minutes: u32,
    at_most: usize,
) -> Option<Vec<Window>> {
    let mut out = Vec::new();
    let mut w = window_at(from, tz, minutes);
    while w.start < to {
        if out.len() == at_most {
            return None;
        }
        out.push(w);
        w = window_at(w.end, tz, minutes);
    }
    Some(out)
}

/// Parses an IANA zone name (`Europe/Paris`).
pub fn parse_zone(name: &str) -> Option<Tz> {
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_window_starts_on_the_local_quarter_hour() {
        let tz: Tz = "Asia/Kolkata".parse().unwrap(); // UTC+5:30
        let w = window_at(utc("2026-06-01T04:40:10Z"), tz, 15); // 10:10:10 local
        assert_eq!(w.start, utc("2026-06-01T04:30:00Z")); // 10:00 local
        assert_eq!(w.hour, 10);
        assert_eq!(w.end - w.start, Duration::minutes(15));
    }

    #[test]
    fn the_hour_skipped_in_spring_has_no_window() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00Z).
        let ws = windows_between(
            utc("2026-03-08T06:30:00Z"),
            utc("2026-03-08T07:30:00Z"),
            tz,
            15,
            100,
        )
        .unwrap();
        let hours: Vec<u32> = ws.iter().map(|w| w.hour).collect();
        assert_eq!(hours, vec![1, 1, 3, 3]);
        assert_eq!(
            ws[1].end, ws[2].start,
            "no gap and no overlap across the change"
        );
    }

    #[test]
    fn the_hour_repeated_in_autumn_has_two_sets_of_windows() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // 2026-11-01: 02:00 EDT becomes 01:00 EST (06:00Z); 01:xx happens twice.
        let ws = windows_between(
            utc("2026-11-01T05:00:00Z"),
            utc("2026-11-01T07:00:00Z"),
            tz,
            15,
            100,
        )
        .unwrap();
        assert_eq!(ws.len(), 8);
        assert!(ws.iter().all(|w| w.hour == 1));
        assert!(ws.windows(2).all(|p| p[0].end == p[1].start));
    }

    #[test]
    fn a_range_of_more_windows_than_asked_for_is_none_however_long() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        let from = utc("2026-06-01T10:00:00Z");
        let hour = windows_between(from, utc("2026-06-01T11:00:00Z"), tz, 15, 4);
        assert_eq!(hour.map(|w| w.len()), Some(4));
        assert!(windows_between(from, utc("2026-06-01T11:00:01Z"), tz, 15, 4).is_none());
        let ages = DateTime::<Utc>::MAX_UTC;
        assert!(windows_between(from, ages, tz, 5, 2000).is_none());
    }

    #[test]
    fn weekday_and_date_are_local() {
        let tz: Tz = "Pacific/Auckland".parse().unwrap();
        let w = window_at(utc("2026-06-07T12:05:00Z"), tz, 15); // Monday 00:05 NZST
        assert_eq!(w.weekday, 1);
        assert_eq!(w.local_date, NaiveDate::from_ymd_opt(2026, 6, 8).unwrap());
    }
}
