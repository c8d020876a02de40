//! Reading the tenants' event streams.

use chrono::{DateTime, Utc};
use redis::streams::StreamId;

use crate::domain::{Event, EventLine};
use crate::error::Error;

/// Decodes one stream entry (fields written by `lua/lib.lua`'s `emit`).
pub fn decode_event(entry: &StreamId) -> Result<Event, Error> {
    let field = |name: &str| -> Option<String> { entry.get::<String>(name) };
    let bad = |what: &str| Error::internal(format!("event {} has no valid {what}", entry.id));
    let lines: Vec<(String, i64, i64)> =
        serde_json::from_str(&field("l").ok_or_else(|| bad("lines"))?).map_err(|_| bad("lines"))?;
    let ms: i64 = field("t")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("time"))?;
    Ok(Event {
        event_id: entry.id.clone(),
        kind: field("k").ok_or_else(|| bad("kind"))?,
        job: field("j").unwrap_or_default(),
        hold_id: field("h").unwrap_or_default(),
        lines: lines
            .into_iter()
            .map(|(pool, qty, epoch)| EventLine { pool, qty, epoch })
            .collect(),
        reference: field("r").unwrap_or_default(),
        order_id: field("o").unwrap_or_default(),
        customer: field("c").unwrap_or_default(),
        at: DateTime::<Utc>::from_timestamp_millis(ms).ok_or_else(|| bad("time"))?,
    })
}
