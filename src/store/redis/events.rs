//! Reading the tenants' event streams.

use chrono::{DateTime, Utc};
use redis::streams::StreamId;

use crate::domain::{Event, EventLine};
use crate::error::Error;
use crate::store::redis::reply;

/// Decodes one stream entry (fields written by `lua/lib.lua`'s `emit`), in
/// one pass over its fields: the drainer decodes every event, and a look-up
/// per field (nine, most of them absent) showed in its profile.
pub fn decode_event(entry: &StreamId) -> Result<Event, Error> {
    let bad = |what: &str| Error::internal(format!("event {} has no valid {what}", entry.id));
    let mut event = Event {
        event_id: entry.id.clone(),
        kind: String::new(),
        job: String::new(),
        hold_id: String::new(),
        lines: Vec::new(),
        reference: String::new(),
        order_id: String::new(),
        customer: String::new(),
        at: DateTime::<Utc>::UNIX_EPOCH,
    };
    let (mut lines, mut ms) = (None, None);
    for (name, value) in &entry.map {
        let Some(text) = reply::text(value) else {
            continue;
        };
        match name.as_str() {
            "k" => event.kind = text,
            "j" => event.job = text,
            "h" => event.hold_id = text,
            "r" => event.reference = text,
            "o" => event.order_id = text,
            "c" => event.customer = text,
            "l" => lines = Some(text),
            "t" => ms = text.parse::<i64>().ok(),
            _ => {}
        }
    }
    if event.kind.is_empty() {
        return Err(bad("kind"));
    }
    let lines: Vec<(String, i64, i64)> =
        serde_json::from_str(&lines.ok_or_else(|| bad("lines"))?).map_err(|_| bad("lines"))?;
    event.lines = lines
        .into_iter()
        .map(|(pool, qty, epoch)| EventLine { pool, qty, epoch })
        .collect();
    event.at = ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .ok_or_else(|| bad("time"))?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
                .collect(),
            ..StreamId::default()
        }
    }

    #[test]
    fn every_field_emit_writes_is_read_and_absent_ones_are_empty() {
        let e = decode_event(&entry(&[
            ("k", "committed"),
            ("j", "stock"),
            ("h", "r1"),
            ("l", r#"[["stock/mug",2,3]]"#),
            ("t", "1700000000123"),
            ("o", "order-9"),
        ]))
        .unwrap();
        assert_eq!((e.event_id.as_str(), e.kind.as_str()), ("1-0", "committed"));
        assert_eq!((e.job.as_str(), e.hold_id.as_str()), ("stock", "r1"));
        assert_eq!(e.order_id, "order-9");
        assert_eq!((e.reference.as_str(), e.customer.as_str()), ("", ""));
        assert_eq!(
            e.lines,
            vec![EventLine {
                pool: "stock/mug".into(),
                qty: 2,
                epoch: 3
            }]
        );
        assert_eq!(e.at.timestamp_millis(), 1_700_000_000_123);
    }

    #[test]
    fn an_entry_without_its_kind_lines_or_time_is_refused() {
        let full = [("k", "claimed"), ("l", "[]"), ("t", "5")];
        assert!(decode_event(&entry(&full)).is_ok());
        for missing in ["k", "l", "t"] {
            let fields: Vec<_> = full.into_iter().filter(|(k, _)| *k != missing).collect();
            let err = decode_event(&entry(&fields)).unwrap_err();
            assert!(matches!(err, Error::Internal(_)), "{missing}: {err:?}");
        }
        assert!(decode_event(&entry(&[("k", "claimed"), ("l", "[]"), ("t", "x")])).is_err());
    }
}
