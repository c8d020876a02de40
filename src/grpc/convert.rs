//! Conversions between protobuf messages and domain types. Parsing happens
//! here, once: a bad field becomes INVALID_ARGUMENT naming the field.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::pb;
use crate::domain::{CardId, HoldState, Limits};
use crate::error::Error;

/// The range `google.protobuf.Timestamp` defines: 0001-01-01T00:00:00Z to
/// 9999-12-31T23:59:59Z, in seconds since the epoch.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A required timestamp, within the range protobuf defines. chrono
/// represents far more (to year 262,143), but an hour added to its last
/// instant overflows and panics, so nothing outside protobuf's range gets
/// in. Cut to whole microseconds, as Postgres keeps it: a finer one
/// (Go's `timestamppb.Now()`) would be stored cut, and its retry would not
/// match what was stored.
pub fn timestamp(field: &str, ts: Option<prost_types::Timestamp>) -> Result<DateTime<Utc>, Error> {
    let ts = ts.ok_or_else(|| Error::invalid(field, "is required"))?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| Error::invalid(field, "nanos must be 0 to 999,999,999"))?;
    if !TIMESTAMP_SECONDS.contains(&ts.seconds) {
        return Err(Error::invalid(
            field,
            "must lie between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        ));
    }
    DateTime::from_timestamp(ts.seconds, nanos - nanos % 1_000)
        .ok_or_else(|| Error::invalid(field, "is out of range"))
}

/// A point in time for a response.
pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Milliseconds since the epoch (Redis time) for a response.
pub fn ms_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A hold's time to live: absent means the server's default; otherwise it
/// must lie within the server's bounds.
pub fn ttl(
    field: &str,
    d: Option<prost_types::Duration>,
    limits: &Limits,
) -> Result<Duration, Error> {
    let Some(d) = d else {
        return Ok(limits.default_ttl);
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "nanos must be 0 to 999,999,999"));
    }
    let ttl = Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    );
    if ttl < limits.min_ttl || ttl > limits.max_ttl {
        return Err(Error::invalid(
            field,
            format!(
                "must be between {}s and {}s, got {:.3}s",
                limits.min_ttl.as_secs(),
                limits.max_ttl.as_secs(),
                ttl.as_secs_f64()
            ),
        ));
    }
    Ok(ttl)
}

/// A free-text field with a length limit, on one line.
pub fn text(field: &str, value: String, max: usize) -> Result<String, Error> {
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    printable(field, &value)?;
    Ok(value)
}

/// Refuses control characters (U+0000 to U+001F, U+007F to U+009F). Postgres
/// cannot store U+0000 at all, so one would fail as INTERNAL after
/// earlier writes; the rest have no place in a name, reason or secret.
pub fn printable(field: &str, value: &str) -> Result<(), Error> {
    match value.chars().position(char::is_control) {
        Some(at) => Err(Error::invalid(
            field,
            format!("must not contain control characters (one at character {at})"),
        )),
        None => Ok(()),
    }
}

/// An optional id-like field: empty, or a valid name.
pub fn optional_name(field: &str, value: String, max: usize) -> Result<String, Error> {
    if value.is_empty() {
        return Ok(value);
    }
    crate::domain::parse_name(field, &value, max)
}

/// A batch of card ids: 1 to `max`, each valid, none twice (reported at
/// its index). Returned sorted, so the same set is the same request
/// whatever the order it came in.
pub fn card_ids(field: &str, ids: Vec<String>, max: usize) -> Result<Vec<CardId>, Error> {
    crate::domain::check_batch(field, ids.len(), max, "card")?;
    let mut seen = HashSet::with_capacity(ids.len());
    let mut cards = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let card = CardId::parse(&format!("{field}[{i}]"), id)?;
        if !seen.insert(card.clone()) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("card {card} appears twice in the batch"),
            ));
        }
        cards.push(card);
    }
    cards.sort();
    Ok(cards)
}

/// A page size: 0 means 100; otherwise 1-1000.
pub fn page_size(value: u32) -> Result<i64, Error> {
    match value {
        0 => Ok(100),
        n @ 1..=1000 => Ok(i64::from(n)),
        n => Err(Error::invalid(
            "page_size",
            format!("must be 1-1000, got {n}"),
        )),
    }
}

/// A page token this server issued (a row id), or 0 for the first page.
pub fn page_token(value: &str) -> Result<i64, Error> {
    if value.is_empty() {
        return Ok(0);
    }
    value
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid("page_token", "is not a token this server issued"))
}

/// A hold state for a response.
pub fn hold_state(s: HoldState) -> pb::HoldState {
    match s {
        HoldState::Active => pb::HoldState::Active,
        HoldState::Committed => pb::HoldState::Committed,
        HoldState::Released => pb::HoldState::Released,
        HoldState::Expired => pb::HoldState::Expired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_ttl_is_the_default_and_one_out_of_bounds_is_refused() {
        let limits = Limits::default();
        assert_eq!(ttl("ttl", None, &limits).unwrap(), limits.default_ttl);
        let long = prost_types::Duration {
            seconds: 10 * 86_400,
            nanos: 0,
        };
        assert!(ttl("ttl", Some(long), &limits).is_err());
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(ttl("ttl", Some(negative), &limits).is_err());
    }

    #[test]
    fn card_batches_are_sorted_and_refuse_duplicates_at_their_index() {
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let cards = card_ids("card_ids", ids(&["b", "a"]), 10).unwrap();
        assert_eq!(
            cards,
            vec![
                CardId::from_store("a".into()),
                CardId::from_store("b".into())
            ]
        );
        let err = card_ids("card_ids", ids(&["a", "b", "a"]), 10).unwrap_err();
        assert!(err.to_string().starts_with("card_ids[2]"), "{err}");
        assert!(card_ids("card_ids", vec![], 10).is_err());
        assert!(card_ids("card_ids", ids(&["a", "b"]), 1).is_err());
    }

    #[test]
    fn ms_timestamps_keep_their_millis() {
        let ts = ms_timestamp(1_500);
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
