//! Reading the tenants' event streams.

use chrono::{DateTime, Utc};
use redis::Value;
use redis::streams::StreamId;

use crate::domain::{Event, EventLine};
use crate::error::Error;
use crate::store::redis::reply;

/// The events one stream gave in an XREADGROUP reply.
pub struct StreamEvents {
    /// The stream's key.
    pub key: String,
    /// Its entries, in stream order.
    pub events: Vec<Event>,
}

/// Decodes an XREAD or XREADGROUP reply (nil when a blocking read timed
/// out) in one pass, taking its strings rather than copying them. The
/// drainer reads every event this way: the redis crate's `StreamReadReply`
/// built a map per entry first, 3% of the daemon's time under claim-hot
/// (deploy/BENCHMARKS.md, 2026-12-04, morning).
pub fn decode_read(reply: Value) -> Result<Vec<StreamEvents>, Error> {
    let bad = || Error::internal("a stream read answered an unexpected shape");
    let streams: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        // RESP3 answers a map of key -> entries.
        Value::Map(pairs) => pairs,
        Value::Array(items) => items
            .into_iter()
            .map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => {
                    let mut kv = kv.into_iter();
                    Ok((
                        kv.next().unwrap_or(Value::Nil),
                        kv.next().unwrap_or(Value::Nil),
                    ))
                }
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    streams
        .into_iter()
        .map(|(key, entries)| {
            let (Some(key), Value::Array(entries)) = (owned_text(key), entries) else {
                return Err(bad());
            };
            let events = entries
                .into_iter()
                .map(|entry| {
                    let Value::Array(parts) = entry else {
                        return Err(bad());
                    };
                    let mut parts = parts.into_iter();
                    let id = parts.next().and_then(owned_text).ok_or_else(bad)?;
                    // A pending entry that was deleted reads as nil fields,
                    // and is refused below for want of a kind.
                    let fields = match parts.next() {
                        Some(Value::Array(f)) => f,
                        _ => Vec::new(),
                    };
                    let mut fields = fields.into_iter();
                    let pairs = std::iter::from_fn(|| Some((fields.next()?, fields.next()?))).map(
                        |(name, value)| (owned_text(name).unwrap_or_default(), owned_text(value)),
                    );
                    event_of(id, pairs)
                })
                .collect::<Result<_, _>>()?;
            Ok(StreamEvents { key, events })
        })
        .collect()
}

/// A reply string, taken rather than copied.
fn owned_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Decodes one stream entry read as a `StreamId` (XRANGE), as
/// `decode_read` decodes the drainer's.
pub fn decode_event(entry: &StreamId) -> Result<Event, Error> {
    event_of(
        entry.id.clone(),
        entry
            .map
            .iter()
            .map(|(name, value)| (name, reply::text(value))),
    )
}

/// The event of entry `id` from its fields (written by `lua/lib.lua`'s
/// `emit`), in one pass: a look-up per field (nine, most of them absent)
/// showed in the drainer's profile. Absent fields are empty.
fn event_of<N: AsRef<str>>(
    id: String,
    fields: impl IntoIterator<Item = (N, Option<String>)>,
) -> Result<Event, Error> {
    let bad = |what: &str| Error::internal(format!("event {id} has no valid {what}"));
    let (mut lines, mut ms) = (None, None);
    let (mut kind, mut job, mut hold_id) = (String::new(), String::new(), String::new());
    let (mut reference, mut order_id, mut customer) = (String::new(), String::new(), String::new());
    for (name, value) in fields {
        let Some(text) = value else {
            continue;
        };
        match name.as_ref() {
            "k" => kind = text,
            "j" => job = text,
            "h" => hold_id = text,
            "r" => reference = text,
            "o" => order_id = text,
            "c" => customer = text,
            "l" => lines = Some(text),
            "t" => ms = text.parse::<i64>().ok(),
            _ => {}
        }
    }
    if kind.is_empty() {
        return Err(bad("kind"));
    }
    let lines: Vec<(String, i64, i64)> =
        serde_json::from_str(&lines.ok_or_else(|| bad("lines"))?).map_err(|_| bad("lines"))?;
    let at = ms
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .ok_or_else(|| bad("time"))?;
    Ok(Event {
        event_id: id,
        kind,
        job,
        hold_id,
        lines: lines
            .into_iter()
            .map(|(pool, qty, epoch)| EventLine { pool, qty, epoch })
            .collect(),
        reference,
        order_id,
        customer,
        at,
    })
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

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry_value(id: &str, fields: &[(&str, &str)]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    #[test]
    fn a_read_reply_decodes_stream_by_stream_in_order_in_either_protocol() {
        let claim = |h: &'static str| {
            [
                ("k", "claimed"),
                ("j", "flash"),
                ("h", h),
                ("l", "[]"),
                ("t", "7"),
            ]
        };
        let streams = || {
            vec![
                (
                    bulk("a"),
                    Value::Array(vec![
                        entry_value("1-0", &claim("x")),
                        entry_value("2-0", &claim("y")),
                    ]),
                ),
                (
                    bulk("b"),
                    Value::Array(vec![entry_value("3-0", &claim("z"))]),
                ),
            ]
        };
        let resp2 = Value::Array(
            streams()
                .into_iter()
                .map(|(k, v)| Value::Array(vec![k, v]))
                .collect(),
        );
        for reply in [resp2, Value::Map(streams())] {
            let read = decode_read(reply).unwrap();
            let got: Vec<(&str, Vec<(&str, &str)>)> = read
                .iter()
                .map(|s| {
                    let events = s
                        .events
                        .iter()
                        .map(|e| (e.event_id.as_str(), e.hold_id.as_str()));
                    (s.key.as_str(), events.collect())
                })
                .collect();
            assert_eq!(
                got,
                vec![
                    ("a", vec![("1-0", "x"), ("2-0", "y")]),
                    ("b", vec![("3-0", "z")])
                ]
            );
            assert_eq!(read[0].events[0].at.timestamp_millis(), 7);
        }
        assert!(decode_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn a_read_reply_of_another_shape_or_a_deleted_entry_is_refused() {
        let deleted = Value::Array(vec![Value::Array(vec![
            bulk("a"),
            Value::Array(vec![Value::Array(vec![bulk("1-0"), Value::Nil])]),
        ])]);
        assert!(matches!(decode_read(deleted), Err(Error::Internal(_))));
        assert!(matches!(
            decode_read(Value::Int(1)),
            Err(Error::Internal(_))
        ));
        let no_entries = Value::Array(vec![Value::Array(vec![bulk("a"), Value::Int(0)])]);
        assert!(decode_read(no_entries).is_err());
    }
}
