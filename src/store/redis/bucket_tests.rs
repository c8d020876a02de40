//! The expiry buckets' sums (lua/lib.lua, "Ending an expired hold is two
//! things"), called as the store calls them at times of the test's
//! choosing: a hold's units go back once, with its bucket's or alone,
//! never both; a pool reloaded since gets nothing back; and the per-hold
//! writes are paced by the sweep's budget, not tied to the units.

use std::collections::HashMap;

use redis::Value;
use redis::aio::ConnectionManager;

use super::scripts::tests::{RETENTION_MS, batch_call_at, only_reply, pools, redis, state, tag};
use super::scripts::{BATCH, SWEEP, fcall};

/// A take's time: every hold of these tests is made at 1,000 s.
const T: i64 = 1_000_000;

fn reserve<'a>(id: &'a str, lines: &'a str, customer: &'a str) -> (&'static str, Vec<&'a str>) {
    (
        "reserve",
        vec![id, "stock", "1000", lines, customer, "10", "", "100000"],
    )
}

/// One sweep at `now`: (ended, still due, booked, still to book).
async fn sweep(con: &mut ConnectionManager, prefix: &str, now: i64, book: u32) -> [i64; 4] {
    let r: Vec<i64> = SWEEP
        .prepare_invoke()
        .arg(prefix)
        .arg(RETENTION_MS)
        .arg(now)
        .arg(500)
        .arg("0")
        .arg(book)
        .invoke_async(con)
        .await
        .expect("sweep runs");
    [r[0], r[1], r[3], r[5]]
}

/// A pool's `sold` and `held`, and the tenant's `active`.
async fn counts(con: &mut ConnectionManager, prefix: &str, pool: &str) -> (i64, i64, i64) {
    let p: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{prefix}pool:{pool}"))
        .query_async(con)
        .await
        .expect("HGETALL");
    let active: Option<i64> = redis::cmd("GET")
        .arg(format!("{prefix}active"))
        .query_async(con)
        .await
        .expect("GET");
    (p["sold"], p["held"], active.unwrap_or(0))
}

async fn get(con: &mut ConnectionManager, key: String) -> Option<i64> {
    redis::cmd("GET")
        .arg(key)
        .query_async(con)
        .await
        .expect("GET")
}

/// The state letter of a hold as Redis keeps it.
async fn st(con: &mut ConnectionManager, prefix: &str, id: &str) -> String {
    redis::cmd("HGET")
        .arg(format!("{prefix}hold:{id}"))
        .arg("st")
        .query_async(con)
        .await
        .expect("HGET")
}

/// The kinds of the events under `prefix`, with their hold ids.
async fn events(con: &mut ConnectionManager, prefix: &str) -> Vec<String> {
    state(con, prefix)
        .await
        .into_iter()
        .filter(|e| e.starts_with("event"))
        .filter_map(|e| {
            let kind = e.split(r#"("k", ""#).nth(1)?.split('"').next()?.to_owned();
            let id = e.split(r#"("h", ""#).nth(1)?.split('"').next()?.to_owned();
            Some(format!("{kind} {id}"))
        })
        .collect()
}

/// The kind of each answer (`HOLD`, `CLAIMED`, `SHORT`...) of one batch
/// call of `ops` under `prefix` at `now`.
async fn kinds(
    con: &mut ConnectionManager,
    prefix: &str,
    now: i64,
    ops: &[(&str, Vec<&str>)],
) -> Vec<String> {
    let replies: Vec<Value> = fcall(con, &BATCH, &batch_call_at(prefix, now, ops))
        .await
        .expect("the call runs");
    replies.iter().map(tag).collect()
}

/// Four holds of p1 in one expiry bucket, each of 2 units, two of them a
/// customer's: one committed, one released and one extended before the
/// bucket ends. When it ends only the fourth's units (and its customer's)
/// go back, and the extended one's go back with its new bucket's, to
/// nothing once its pool was reloaded under a new epoch. A bucket sum
/// that still counted the other three would give back units they no
/// longer hold: p1 would show fewer held than its holds hold, and sell
/// them twice.
#[tokio::test]
async fn a_hold_that_ends_before_its_bucket_does_is_not_given_back_twice() {
    let mut con = redis().await;
    let prefix = format!("libtest{}:{{bucket}}:", rand::random::<u32>());
    pools(&mut con, &prefix).await;
    let call = |now, ops: &[(&str, Vec<&str>)]| batch_call_at(&prefix, now, ops);
    let lines = r#"[["p1",2]]"#;
    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            T,
            &[
                reserve("h1", lines, "cust:s:u1"),
                reserve("h2", lines, ""),
                reserve("h3", lines, ""),
                reserve("h4", lines, "cust:s:u1"),
            ]
        )
        .await,
        ["HOLD"; 4]
    );
    assert_eq!(st(&mut con, &prefix, "h4").await, "Q");
    assert_eq!(counts(&mut con, &prefix, "p1").await, (0, 8, 4));

    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            T + 500,
            &[
                ("commit", vec!["h1", "stock", "o1"]),
                ("release", vec!["h2", "stock"]),
                ("extend", vec!["h3", "stock", "60000", "3", "x1"]),
            ]
        )
        .await,
        ["HOLD"; 3]
    );
    assert_eq!(counts(&mut con, &prefix, "p1").await, (2, 4, 2));
    let customer = format!("{prefix}cust:s:u1");
    assert_eq!(get(&mut con, customer.clone()).await, Some(4));

    // The bucket has ended: the next call (a claim elsewhere) gives back
    // h4's units alone, and h4 reads EXPIRED before the sweep books it.
    let claim = ("claim", vec!["c1", "flash", r#"[["p2",1]]"#, "", "0"]);
    let first = only_reply(&mut con, &call(T + 1_100, &[claim])).await;
    assert_eq!(tag(&first), "CLAIMED");
    assert_eq!(counts(&mut con, &prefix, "p1").await, (2, 2, 1));
    assert_eq!(
        get(&mut con, customer).await,
        Some(2),
        "h1's 2 stay counted"
    );
    assert_eq!(st(&mut con, &prefix, "h4").await, "Q", "not booked yet");
    let read = only_reply(
        &mut con,
        &call(T + 1_100, &[("get_hold", vec!["h4", "stock"])]),
    )
    .await;
    let Value::Array(view) = read else {
        panic!("a hold view: {read:?}")
    };
    assert_eq!(view[1], Value::BulkString(b"E".to_vec()), "read as expired");
    assert_eq!(
        counts(&mut con, &prefix, "p1").await,
        (2, 2, 1),
        "and not given back again"
    );

    // The sweep books what is left of the bucket: nothing (h4 was read).
    assert_eq!(sweep(&mut con, &prefix, T + 1_200, 500).await, [0, 0, 0, 0]);

    // p1 reloaded under epoch 2 (held 0): h3's bucket gives it nothing.
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}pool:p1"))
        .arg(&[("epoch", 2), ("held", 0)])
        .query_async(&mut con)
        .await
        .expect("HSET");
    assert_eq!(
        sweep(&mut con, &prefix, T + 60_600, 500).await,
        [0, 0, 1, 0]
    );
    assert_eq!(counts(&mut con, &prefix, "p1").await, (2, 0, 0));
    assert_eq!(st(&mut con, &prefix, "h3").await, "E");
    assert_eq!(
        events(&mut con, &prefix).await,
        [
            "reserved h1",
            "reserved h2",
            "low_stock ",
            "reserved h3",
            "reserved h4",
            "committed h1",
            "released h2",
            "extended h3",
            "claimed c1",
            "expired h4",
            "expired h3",
        ]
    );
}

/// 1,000 holds in one bucket: their units are back in the first call
/// after it ends, whatever the sweep's budget, and the sweep writes their
/// EXPIRED state as many a call as it is given, saying when more wait.
#[tokio::test]
async fn a_burst_gives_its_units_back_at_once_and_its_states_as_paced() {
    let mut con = redis().await;
    let prefix = format!("libtest{}:{{burst}}:", rand::random::<u32>());
    pools(&mut con, &prefix).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}pool:p1"))
        .arg("grant")
        .arg(1_000)
        .query_async(&mut con)
        .await
        .expect("HSET");
    let ids: Vec<String> = (0..1_000).map(|i| format!("h{i}")).collect();
    let ops: Vec<_> = ids
        .iter()
        .map(|id| reserve(id, r#"[["p1",1]]"#, ""))
        .collect();
    let _: Vec<Value> = fcall(&mut con, &BATCH, &batch_call_at(&prefix, T, &ops))
        .await
        .expect("the holds are made");
    assert_eq!(counts(&mut con, &prefix, "p1").await, (0, 1_000, 1_000));

    let all = ("claim", vec!["c1", "flash", r#"[["p1",1000]]"#, "", "0"]);
    let claimed = only_reply(&mut con, &batch_call_at(&prefix, T + 1_050, &[all])).await;
    assert_eq!(tag(&claimed), "CLAIMED", "every unit is back");
    assert_eq!(counts(&mut con, &prefix, "p1").await, (1_000, 0, 0));

    assert_eq!(
        sweep(&mut con, &prefix, T + 1_100, 300).await,
        [0, 0, 300, 1]
    );
    assert_eq!(
        sweep(&mut con, &prefix, T + 1_200, 300).await,
        [0, 0, 300, 1]
    );
    assert_eq!(sweep(&mut con, &prefix, T + 1_300, 0).await, [0, 0, 0, 0]);
    assert_eq!(
        sweep(&mut con, &prefix, T + 1_400, 500).await,
        [0, 0, 400, 0]
    );
    let expired = events(&mut con, &prefix)
        .await
        .iter()
        .filter(|e| e.starts_with("expired"))
        .count();
    assert_eq!(expired, 1_000);
    assert_eq!(counts(&mut con, &prefix, "p1").await, (1_000, 0, 0));
}

/// A refusal looks at the holds due in the bucket that holds "now" only
/// when the bucket's sum says some hold there holds what was refused.
/// h1 holds all of p1 and is due 20 ms into its bucket; p3 is sold out by
/// a claim. A claim refused on p3 does not read the bucket (h1 is still
/// unfinalised after it: nothing it could free is p3's), and a claim on
/// p1 in the same call as another refused on p3 still finds h1 due, ends
/// it and takes its units: skipping the bucket for one refusal does not
/// skip it for the rest of the call.
#[tokio::test]
async fn a_refusal_reads_the_partial_bucket_only_for_what_its_holds_hold() {
    let mut con = redis().await;
    let prefix = format!("libtest{}:{{partial}}:", rand::random::<u32>());
    pools(&mut con, &prefix).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}pool:p3"))
        .arg(&[("grant", 5), ("ret", 0), ("sold", 0), ("held", 0)])
        .arg(&[("epoch", 1), ("full", 1), ("unl", 0), ("from", 0)])
        .arg(&[("until", 0), ("low", -1), ("armed", 1), ("lim", -1)])
        .query_async(&mut con)
        .await
        .expect("HSET");
    let claim = |id, lines| ("claim", vec![id, "flash", lines, "", "0"]);
    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            T,
            &[
                reserve("h1", r#"[["p1",10]]"#, ""),
                claim("c1", r#"[["p3",5]]"#),
            ]
        )
        .await,
        ["HOLD", "CLAIMED"]
    );

    let due = T + 1_020;
    let refused = only_reply(
        &mut con,
        &batch_call_at(&prefix, due, &[claim("c2", r#"[["p3",1]]"#)]),
    )
    .await;
    assert_eq!(tag(&refused), "SHORT");
    assert_eq!(
        st(&mut con, &prefix, "h1").await,
        "Q",
        "p3's refusal left h1 alone"
    );

    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            due,
            &[claim("c3", r#"[["p3",1]]"#), claim("c4", r#"[["p1",1]]"#)]
        )
        .await,
        ["SHORT", "CLAIMED"]
    );
    assert_eq!(
        st(&mut con, &prefix, "h1").await,
        "E",
        "p1's refusal ended h1"
    );
    assert_eq!(counts(&mut con, &prefix, "p1").await, (1, 0, 0));
}

/// The same for a customer's limit: h1, u1's hold of 2 units, is due in
/// the partial bucket. u2, at its limit of 2 by a claim, is refused
/// without the bucket being read (h1 is still unfinalised after); u1, at
/// its limit by h1, in the same call as u2's refusal, gets h1 ended and
/// its units back, and its claim goes through.
#[tokio::test]
async fn a_customer_refused_reads_the_partial_bucket_only_for_its_own_holds() {
    let mut con = redis().await;
    let prefix = format!("libtest{}:{{customer}}:", rand::random::<u32>());
    pools(&mut con, &prefix).await;
    let claim = |id, who| ("claim", vec![id, "flash", r#"[["p1",1]]"#, who, "2"]);
    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            T,
            &[
                reserve("h1", r#"[["p1",2]]"#, "cust:s:u1"),
                claim("c1", "cust:s:u2"),
                claim("c2", "cust:s:u2"),
            ]
        )
        .await,
        ["HOLD", "CLAIMED", "CLAIMED"]
    );

    let due = T + 1_020;
    let refused = only_reply(
        &mut con,
        &batch_call_at(&prefix, due, &[claim("c3", "cust:s:u2")]),
    )
    .await;
    assert_eq!(tag(&refused), "CUSTOMER_LIMIT");
    assert_eq!(
        st(&mut con, &prefix, "h1").await,
        "Q",
        "u2's refusal left u1's hold alone"
    );

    assert_eq!(
        kinds(
            &mut con,
            &prefix,
            due,
            &[claim("c4", "cust:s:u2"), claim("c5", "cust:s:u1")]
        )
        .await,
        ["CUSTOMER_LIMIT", "CLAIMED"]
    );
    assert_eq!(
        st(&mut con, &prefix, "h1").await,
        "E",
        "u1's refusal ended h1"
    );
    assert_eq!(get(&mut con, format!("{prefix}cust:s:u1")).await, Some(1));
}
