//! Strict decoding of the scripts' replies. A reply of a shape the scripts
//! never send is a bug, reported with the shape it had; never guessed at.

use redis::Value;

use crate::domain::{Hold, HoldId, HoldState, Job, Lines, PoolId, Shortage};
use crate::error::Error;
pub use crate::store::HoldReply;

/// One pool's counters in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisPool {
    /// Cumulative units granted by Postgres in this epoch.
    pub grant: i64,
    /// Cumulative units handed back to Postgres in this epoch.
    pub returned: i64,
    /// Units sold in Redis in this epoch.
    pub sold: i64,
    /// Units in active holds.
    pub held: i64,
    /// The epoch.
    pub epoch: i64,
    /// Nothing is left in Postgres to grant.
    pub full: bool,
    /// The pool has no capacity limit.
    pub unlimited: bool,
}

impl RedisPool {
    /// What Redis may still sell of its grant (lua/lib.lua `headroom_of`).
    pub fn headroom(&self) -> i64 {
        self.grant - self.returned - self.sold - self.held
    }
}

fn shape(what: &str, v: &Value) -> Error {
    Error::internal(format!("unexpected script reply for {what}: {v:?}"))
}

/// A reply item as text (a bulk or simple string, or an integer).
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

/// Decodes a hold script's reply for hold `id`.
pub fn hold_reply(id: &HoldId, v: &Value) -> Result<HoldReply, Error> {
    let bad = || shape("a hold operation", v);
    let items = items(v).ok_or_else(bad)?;
    let tag = items.first().and_then(text).ok_or_else(bad)?;
    let rest = &items[1..];
    let nested =
        |i: usize| -> Result<Hold, Error> { decode_hold(id, rest.get(i).ok_or_else(bad)?) };
    Ok(match tag.as_str() {
        "HOLD" => HoldReply::Hold(decode_hold(id, v)?),
        "NEED_GRANT" => HoldReply::NeedGrant(
            rest.iter()
                .map(|p| text(p).map(PoolId::from_store).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
        ),
        "NOT_ACTIVE" => HoldReply::NotActive(
            rest.first()
                .and_then(text)
                .map(PoolId::from_store)
                .ok_or_else(bad)?,
        ),
        "SHORT" => {
            if rest.is_empty() || rest.len() % 3 != 0 {
                return Err(bad());
            }
            let shortages = rest
                .chunks(3)
                .map(|c| {
                    Some(Shortage {
                        pool: PoolId::from_store(text(&c[0])?),
                        requested: int(&c[1])?,
                        available: int(&c[2])?,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?;
            HoldReply::Short(shortages)
        }
        "CUSTOMER_LIMIT" => HoldReply::CustomerLimit(rest.first().and_then(int).ok_or_else(bad)?),
        "ID_REUSED" => HoldReply::IdReused,
        "BUSY" => HoldReply::Busy,
        "UNLISTED" => HoldReply::Unlisted,
        "AGAIN" => HoldReply::Again(nested(0)?),
        "TOO_MANY_HOLDS" => HoldReply::TooManyHolds(rest.first().and_then(int).ok_or_else(bad)?),
        "NO_HOLD" => HoldReply::NoHold,
        "NOT_ACTIVE_HOLD" => HoldReply::NotActiveHold(nested(0)?),
        "ORDER_MISMATCH" => HoldReply::OrderMismatch(nested(0)?),
        "COMMITTED" => HoldReply::Committed(nested(0)?),
        "EXTEND_LIMIT" => HoldReply::ExtendLimit(nested(0)?),
        "STALE_EPOCH" => HoldReply::StaleEpoch(
            rest.first()
                .and_then(text)
                .map(PoolId::from_store)
                .ok_or_else(bad)?,
        ),
        _ => return Err(bad()),
    })
}

/// Decodes `lib.lua`'s hold view: `{ 'HOLD', st, job, lines_json,
/// expires_at, extensions, ref, order_id, created_at, finished_at, fence }`.
fn decode_hold(id: &HoldId, v: &Value) -> Result<Hold, Error> {
    let bad = || shape("a hold view", v);
    let f = items(v).ok_or_else(bad)?;
    if f.len() != 11 || text(&f[0]).as_deref() != Some("HOLD") {
        return Err(bad());
    }
    let state = match text(&f[1]).as_deref() {
        Some("A") => HoldState::Active,
        Some("C") => HoldState::Committed,
        Some("R") => HoldState::Released,
        Some("E") => HoldState::Expired,
        _ => return Err(bad()),
    };
    Ok(Hold {
        id: id.clone(),
        state,
        job: text(&f[2]).ok_or_else(bad)?,
        lines: hold_lines(&f[3]).ok_or_else(bad)?,
        expires_at_ms: int(&f[4]).ok_or_else(bad)?,
        extensions: int(&f[5])
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)?,
        reference: text(&f[6]).ok_or_else(bad)?,
        order_id: text(&f[7]).ok_or_else(bad)?,
        created_at_ms: int(&f[8]).ok_or_else(bad)?,
        finished_at_ms: int(&f[9]).ok_or_else(bad)?,
        fence: int(&f[10]).ok_or_else(bad)?,
    })
}

/// Decodes `claim.lua`'s reply for claim `id` of `lines` by `job`. A new
/// claim's answer is `{ 'CLAIMED', claimed_at }`: the rest of the view its
/// retry reads is what the caller sent. A claim is committed as it is
/// made, so it expires and finishes then, with no extension, reference,
/// order id or fence (`lib.lua`, `view_of`). Any other answer is a hold
/// script's ([`hold_reply`]).
pub fn claim_reply(id: &HoldId, job: Job, lines: &Lines, v: &Value) -> Result<HoldReply, Error> {
    let f = items(v).ok_or_else(|| shape("a claim", v))?;
    if f.first().and_then(text).as_deref() != Some("CLAIMED") {
        return hold_reply(id, v);
    }
    let at = match f {
        [_, at] => int(at),
        _ => None,
    }
    .ok_or_else(|| shape("a new claim", v))?;
    Ok(HoldReply::Hold(Hold {
        id: id.clone(),
        state: HoldState::Committed,
        job: job.as_str().to_owned(),
        lines: lines
            .as_slice()
            .iter()
            .map(|l| (l.pool.clone(), l.quantity.get()))
            .collect(),
        expires_at_ms: at,
        extensions: 0,
        reference: String::new(),
        order_id: String::new(),
        created_at_ms: at,
        finished_at_ms: at,
        fence: 0,
    }))
}

/// A hold's lines from their JSON, `[[pool_id, qty, epoch], ...]`.
fn hold_lines(v: &Value) -> Option<Vec<(PoolId, i64)>> {
    let lines: Vec<(String, i64, i64)> = serde_json::from_str(&text(v)?).ok()?;
    Some(
        lines
            .into_iter()
            .map(|(p, q, _)| (PoolId::from_store(p), q))
            .collect(),
    )
}

/// Who holds or sold a capacity-1 pool (`holders.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Units sold.
    pub sold: i64,
    /// Units held.
    pub held: i64,
    /// The hold that last took units, or empty.
    pub hold_id: String,
    /// That hold's state letter (A, C, R, E), or empty when forgotten.
    pub state: String,
    /// That hold's reference (for a sale lock: the channel), or empty.
    pub reference: String,
    /// That hold's job, or empty.
    pub job: String,
}

/// Decodes `holders.lua`: one entry per asked pool.
pub fn holders_reply(v: &Value, asked: usize) -> Result<Vec<Holder>, Error> {
    let bad = || shape("holders", v);
    let entries = items(v).ok_or_else(bad)?;
    if entries.len() != asked {
        return Err(bad());
    }
    entries
        .iter()
        .map(|e| match items(e).ok_or_else(bad)? {
            [sold, held, id, st, reference, job] => Ok(Holder {
                sold: int(sold).ok_or_else(bad)?,
                held: int(held).ok_or_else(bad)?,
                hold_id: text(id).ok_or_else(bad)?,
                state: text(st).ok_or_else(bad)?,
                reference: text(reference).ok_or_else(bad)?,
                job: text(job).ok_or_else(bad)?,
            }),
            _ => Err(bad()),
        })
        .collect()
}

/// Decodes a script that answers one integer.
pub fn int_reply(what: &str, v: &Value) -> Result<i64, Error> {
    int(v).ok_or_else(|| shape(what, v))
}

/// Decodes `get_pools.lua`: one entry per asked pool, empty when absent.
pub fn pools_reply(v: &Value, asked: usize) -> Result<Vec<Option<RedisPool>>, Error> {
    let bad = || shape("get_pools", v);
    let entries = items(v).ok_or_else(bad)?;
    if entries.len() != asked {
        return Err(bad());
    }
    entries
        .iter()
        .map(|e| {
            let f = items(e).ok_or_else(bad)?;
            if f.is_empty() {
                return Ok(None);
            }
            if f.len() != 7 {
                return Err(bad());
            }
            let n = |i: usize| int(&f[i]).ok_or_else(bad);
            Ok(Some(RedisPool {
                grant: n(0)?,
                returned: n(1)?,
                sold: n(2)?,
                held: n(3)?,
                epoch: n(4)?,
                full: text(&f[5]).as_deref() == Some("1"),
                unlimited: text(&f[6]).as_deref() == Some("1"),
            }))
        })
        .collect()
}

/// What `grant.lua` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum GrantReply {
    /// The pool was (re)loaded.
    Loaded,
    /// The grant now stands at this many units.
    Granted(i64),
    /// Redis runs a newer epoch than the one granted.
    Stale(i64),
    /// Redis holds less of this epoch than Postgres had delegated before
    /// this grant: it lost data, and nothing was changed.
    Lost,
}

/// Decodes `grant.lua`'s reply.
pub fn grant_reply(v: &Value) -> Result<GrantReply, Error> {
    let bad = || shape("grant", v);
    let f = items(v).ok_or_else(bad)?;
    match (f.first().and_then(text).as_deref(), f.get(1).and_then(int)) {
        (Some("LOADED"), None) => Ok(GrantReply::Loaded),
        (Some("GRANTED"), Some(n)) => Ok(GrantReply::Granted(n)),
        (Some("STALE"), Some(n)) => Ok(GrantReply::Stale(n)),
        (Some("LOST"), None) => Ok(GrantReply::Lost),
        _ => Err(bad()),
    }
}

/// What `return.lua` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum ReturnReply {
    /// Returned; the new cumulative count.
    Returned(i64),
    /// Redis has only this many free units.
    Short(i64),
    /// Redis does not run the pool in that epoch.
    NoPool,
}

/// Decodes `return.lua`'s reply.
pub fn return_reply(v: &Value) -> Result<ReturnReply, Error> {
    let bad = || shape("return", v);
    let f = items(v).ok_or_else(bad)?;
    match (f.first().and_then(text).as_deref(), f.get(1).and_then(int)) {
        (Some("RETURNED"), Some(n)) => Ok(ReturnReply::Returned(n)),
        (Some("SHORT"), Some(n)) => Ok(ReturnReply::Short(n)),
        (Some("NO_POOL"), None) => Ok(ReturnReply::NoPool),
        _ => Err(bad()),
    }
}

/// Decodes `sweep.lua`'s reply.
pub fn sweep_reply(v: &Value) -> Result<Swept, Error> {
    let bad = || shape("sweep", v);
    let f = items(v).ok_or_else(bad)?;
    let n = |i: usize| f.get(i).and_then(int).ok_or_else(bad);
    if f.len() != 6 {
        return Err(bad());
    }
    Ok(Swept {
        ended: n(0)?,
        still_due: n(1)? != 0,
        lag_ms: n(2)?,
        booked: n(3)?,
        book_lag_ms: n(4)?,
        still_to_book: n(5)? != 0,
    })
}

/// What one sweep did (`sweep.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Holds ended with their units (A holds, and Q holds of the partial
    /// buckets).
    pub ended: i64,
    /// Whether some units may still be out: full buckets over the budget.
    pub still_due: bool,
    /// How long the oldest of them, or of the buckets given back, had been
    /// due, ms.
    pub lag_ms: i64,
    /// Q holds whose units were back and whose EXPIRED state was written.
    pub booked: i64,
    /// How long the oldest of those had been due, ms.
    pub book_lag_ms: i64,
    /// Whether more such holds wait.
    pub still_to_book: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Line, Quantity};

    fn s(x: &str) -> Value {
        Value::BulkString(x.as_bytes().to_vec())
    }

    fn id() -> HoldId {
        HoldId::parse("id", "h1", 64).unwrap()
    }

    #[test]
    fn a_hold_view_decodes_with_its_lines() {
        let v = Value::Array(vec![
            s("HOLD"),
            s("A"),
            s("flash"),
            s(r#"[["sale/s/p",2,1]]"#),
            s("1000"),
            s("0"),
            s("cart-1"),
            s(""),
            s("900"),
            s("0"),
            s("7"),
        ]);
        let HoldReply::Hold(h) = hold_reply(&id(), &v).unwrap() else {
            panic!("not a hold")
        };
        assert_eq!(h.state, HoldState::Active);
        assert_eq!(h.lines, vec![(PoolId::from_store("sale/s/p".into()), 2)]);
        assert_eq!(h.expires_at_ms, 1000);
        assert_eq!(h.reference, "cart-1");
        assert_eq!(h.fence, 7);
    }

    #[test]
    fn a_new_claims_short_answer_decodes_as_the_view_its_retry_reads() {
        let lines = r#"[["sale/s/p",1,3]]"#;
        let sent = Lines::parse(
            "lines",
            vec![Line {
                pool: PoolId::from_store("sale/s/p".into()),
                quantity: Quantity::parse("q", 1, 10).unwrap(),
            }],
            10,
        )
        .unwrap();
        let new = Value::Array(vec![s("CLAIMED"), s("1700")]);
        // What view_of makes of the stored claim (st, job, ln, cat).
        let view = Value::Array(vec![
            s("HOLD"),
            s("C"),
            s("flash"),
            s(lines),
            s("1700"),
            s("0"),
            s(""),
            s(""),
            s("1700"),
            s("1700"),
            s("0"),
        ]);
        let hold = |v: &Value| match claim_reply(&id(), Job::Flash, &sent, v).unwrap() {
            HoldReply::Hold(h) => h,
            other => panic!("not a hold: {other:?}"),
        };
        assert_eq!(hold(&new), hold(&view));
        let long = Value::Array(vec![s("CLAIMED"), s("flash"), s(lines), s("1700")]);
        assert!(matches!(
            claim_reply(&id(), Job::Flash, &sent, &long),
            Err(Error::Internal(_))
        ));
        // Only a claim's reply may be CLAIMED.
        assert!(matches!(hold_reply(&id(), &new), Err(Error::Internal(_))));
    }

    #[test]
    fn a_short_reply_lists_every_short_line() {
        let v = Value::Array(vec![
            s("SHORT"),
            s("a"),
            Value::Int(3),
            Value::Int(1),
            s("b"),
            Value::Int(2),
            Value::Int(0),
        ]);
        let HoldReply::Short(short) = hold_reply(&id(), &v).unwrap() else {
            panic!("not short")
        };
        assert_eq!(short.len(), 2);
        assert_eq!(short[1].available, 0);
    }

    #[test]
    fn holders_decode_one_entry_per_pool() {
        let entry = |sold: i64, held: i64, id: &str, st: &str, r: &str, job: &str| {
            Value::Array(vec![
                Value::Int(sold),
                Value::Int(held),
                s(id),
                s(st),
                s(r),
                s(job),
            ])
        };
        let v = Value::Array(vec![
            entry(0, 1, "lock-a", "A", "storefront", "lock"),
            entry(0, 0, "", "", "", ""),
        ]);
        let h = holders_reply(&v, 2).unwrap();
        assert_eq!(h[0].reference, "storefront");
        assert_eq!(h[1].held, 0);
        assert!(holders_reply(&v, 3).is_err());
    }

    #[test]
    fn an_unknown_shape_is_an_error_not_a_guess() {
        assert!(hold_reply(&id(), &Value::Array(vec![s("WHAT")])).is_err());
        assert!(hold_reply(&id(), &Value::Int(1)).is_err());
        assert!(hold_reply(&id(), &Value::Array(vec![s("SHORT"), s("a")])).is_err());
    }
}
