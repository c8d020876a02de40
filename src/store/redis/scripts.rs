//! The Lua scripts, built once and called by SHA (`EVALSHA`, reloaded on
//! `NOSCRIPT` by [`redis::Script`]), and the batch library, loaded once and
//! called by name (`FCALL`, reloaded when Redis does not have it: see
//! [`fcall`]). Each operation's file under `lua/` is prefixed with
//! `lua/lib.lua`, the helpers they share; [`BATCH`] holds the hold
//! operations as functions, to run several in one call.

use std::sync::LazyLock;

use redis::{FromRedisValue, RedisError, RedisResult, Script};
use sha2::{Digest, Sha256};

/// A script: `lua/lib.lua`, then the operation's file as the body of a
/// function whose answer is returned once the writes it owes are made
/// (lib.lua, `settle`), even when the body raised an error after writing.
macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
                "\nbegin(ARGV)\nlocal ok, reply = pcall(function()\n",
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $file)),
                "\nend)\nsettle()\nif not ok then\n  error(reply, 0)\nend\nreturn reply\n"
            ))
        })
    };
}

/// An operation's file as a local function of its own `ARGV`, for
/// [`BATCH`]: its top-level `return` becomes the function's.
macro_rules! op {
    ($name:literal) => {
        concat!(
            "\nlocal function op_",
            $name,
            "(ARGV)\n",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $name, ".lua")),
            "\nend\n"
        )
    };
}

/// A Redis function library (Redis 7): its code runs once, when it is
/// loaded (`FUNCTION LOAD`), and each call (`FCALL`) only runs the
/// function. A script runs its whole text on every call, and for the batch
/// script defining lib.lua's functions cost more than a call with nothing
/// to do (deploy/BENCHMARKS.md, 2026-12-03, late).
///
/// The library and its function are named after a digest of the text, so
/// that daemons of two builds sharing a Redis (a rolling upgrade) each
/// call their own code. Earlier builds' libraries stay in Redis until
/// deleted (`FUNCTION DELETE holdfast_<digest>`); each is about 33 KB.
#[derive(Debug)]
pub struct Library {
    /// The function to call, `holdfast_batch_<digest>`.
    pub function: String,
    /// What `FUNCTION LOAD` takes; its first line names the library,
    /// `holdfast_<digest>`.
    pub text: String,
}

impl Library {
    /// The library of `source`, whose one function is registered under
    /// the placeholder `HOLDFAST_BATCH`.
    pub(super) fn new(source: &str) -> Self {
        let digest: String = Sha256::digest(source.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let function = format!("holdfast_batch_{digest}");
        let text = format!(
            "#!lua name=holdfast_{digest}\n{}",
            source.replace("'HOLDFAST_BATCH'", &format!("'{function}'"))
        );
        Self { function, text }
    }

    /// An `FCALL` of the function with no keys (see lua/reserve.lua),
    /// to which the caller adds the arguments.
    pub fn call(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.function).arg(0);
        cmd
    }
}

/// The hold operations in one function (`lua/batch.lua`): each runs as its
/// own script would, one after the other, in one atomic call.
pub static BATCH: LazyLock<Library> = LazyLock::new(|| {
    Library::new(concat!(
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/lib.lua")),
        op!("reserve"),
        op!("claim"),
        op!("commit"),
        op!("release"),
        op!("extend"),
        op!("get_hold"),
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/batch.lua"))
    ))
});

/// Runs `call` (from [`Library::call`]); when Redis does not have the
/// library (a Redis that lost its data, or a replica promoted before it
/// had the library), loads it and runs `call` once more, as
/// [`redis::Script`] does on `NOSCRIPT`.
pub async fn fcall<T: FromRedisValue>(
    con: &mut impl redis::aio::ConnectionLike,
    library: &Library,
    call: &redis::Cmd,
) -> RedisResult<T> {
    match call.query_async(con).await {
        Err(e) if is_missing_function(&e) => {
            load(con, library).await?;
            call.query_async(con).await
        }
        other => other,
    }
}

/// Loads `library` into Redis; one that is already there (another daemon
/// of the same build loaded it) is as good.
pub async fn load(con: &mut impl redis::aio::ConnectionLike, library: &Library) -> RedisResult<()> {
    let loaded: RedisResult<String> = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&library.text)
        .query_async(con)
        .await;
    match loaded {
        Err(e) if !e.detail().is_some_and(|d| d.ends_with("already exists")) => Err(e),
        _ => Ok(()),
    }
}

fn is_missing_function(e: &RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.starts_with("Function not found"))
}

/// Read pools' counts.
pub static GET_POOLS: LazyLock<Script> = script!("get_pools.lua");
/// Record a pool's grant from Postgres.
pub static GRANT: LazyLock<Script> = script!("grant.lua");
/// Hand units of a grant back to Postgres.
pub static RETURN: LazyLock<Script> = script!("return.lua");
/// Finalise expired holds.
pub static SWEEP: LazyLock<Script> = script!("sweep.lua");
/// Read who holds or sold capacity-1 pools (cards).
pub static HOLDERS: LazyLock<Script> = script!("holders.lua");
/// Write cards' listing mirror on a channel, unless newer.
pub static SET_LISTINGS: LazyLock<Script> = script!("set_listings.lua");
/// Count active holds past their expiry (a check, see [`super::overdue_holds`]).
pub static OVERDUE: LazyLock<Script> = script!("overdue.lua");
/// Remember again holds Redis lost with its data (`restore.rs`).
pub static RESTORE: LazyLock<Script> = script!("restore.lua");

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use redis::Value;
    use redis::aio::ConnectionManager;

    use super::*;

    /// The Redis the test command starts (deploy/test.sh); other modules'
    /// tests reach it as `crate::store::redis::test_redis`. Its calls wait
    /// up to 10 s for an answer, not the client's default 500 ms: a test's
    /// setup may pipeline tens of thousands of commands, and the whole
    /// suite shares two cores (a drainer test's 25,000 XADDs timed out so).
    pub(crate) async fn redis() -> ConnectionManager {
        let url = std::env::var("HOLDFAST_TEST_REDIS_URL")
            .expect("HOLDFAST_TEST_REDIS_URL: run the tests with ./deploy/test.sh");
        let client = redis::Client::open(url).expect("a valid Redis URL");
        let patient = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(10)));
        ConnectionManager::new_with_config(client, patient)
            .await
            .expect("Redis is up")
    }

    /// A batch call under `prefix` at a fixed now (1,000 s), as the store
    /// makes one (src/store/redis/mod.rs), with `ops` appended.
    fn batch_call(prefix: &str, ops: &[(&str, Vec<&str>)]) -> redis::Cmd {
        batch_call_at(prefix, 1_000_000, ops)
    }

    /// The same at `now_ms`, with a retention of 60 s.
    pub(in crate::store::redis) fn batch_call_at(
        prefix: &str,
        now_ms: i64,
        ops: &[(&str, Vec<&str>)],
    ) -> redis::Cmd {
        let mut call = BATCH.call();
        call.arg(prefix).arg(RETENTION_MS).arg(now_ms);
        for (name, args) in ops {
            call.arg(*name).arg(args.len()).arg(args);
        }
        call
    }

    pub(in crate::store::redis) const RETENTION_MS: i64 = 60_000;

    /// The reply of the one operation `call` carries.
    pub(in crate::store::redis) async fn only_reply(
        con: &mut ConnectionManager,
        call: &redis::Cmd,
    ) -> Value {
        let mut replies: Vec<Value> = fcall(con, &BATCH, call).await.expect("the call runs");
        replies.remove(0)
    }

    /// What a run left in Redis under `prefix`: each pool's hash, the
    /// tenant's counters and refill set, and its events without their ids
    /// (which are Redis's clock).
    pub(in crate::store::redis) async fn state(
        con: &mut ConnectionManager,
        prefix: &str,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for pool in ["p1", "p2"] {
            let mut h: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(format!("{prefix}pool:{pool}"))
                .query_async(con)
                .await
                .expect("HGETALL");
            h.sort();
            out.push(format!("{pool} {h:?}"));
        }
        for key in ["active", "fence"] {
            let v: Option<String> = redis::cmd("GET")
                .arg(format!("{prefix}{key}"))
                .query_async(con)
                .await
                .expect("GET");
            out.push(format!("{key} {v:?}"));
        }
        let mut refill: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{prefix}refill"))
            .query_async(con)
            .await
            .expect("SMEMBERS");
        refill.sort();
        out.push(format!("refill {refill:?}"));
        let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(format!("{prefix}events"))
            .arg("-")
            .arg("+")
            .query_async(con)
            .await
            .expect("XRANGE");
        for (_, fields) in events {
            let mut fields: Vec<_> = fields.into_iter().collect();
            fields.sort();
            out.push(format!("event {fields:?}"));
        }
        out
    }

    /// Two pools: p1 sold out for good past its grant of 10 (`full`), with
    /// a low-stock alert at 6; p2 asks for more (a refill) at 2 left.
    pub(in crate::store::redis) async fn pools(con: &mut ConnectionManager, prefix: &str) {
        for (pool, grant, full, low, lw) in [("p1", 10, 1, 6, 0), ("p2", 5, 0, -1, 2)] {
            let _: () = redis::cmd("HSET")
                .arg(format!("{prefix}pool:{pool}"))
                .arg(&[("grant", grant), ("ret", 0), ("sold", 0), ("held", 0)])
                .arg(&[("epoch", 1), ("full", full), ("unl", 0), ("from", 0)])
                .arg(&[("until", 0), ("low", low), ("armed", 1), ("lim", -1)])
                .arg(&[("pgf", 0), ("lw", lw)])
                .query_async(con)
                .await
                .expect("HSET");
        }
    }

    /// An answer's first element (its kind, e.g. `CLAIMED`), or the
    /// whole value when it has none.
    pub(in crate::store::redis) fn tag(v: &Value) -> String {
        match v {
            Value::Array(items) => match items.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        }
    }

    /// The library keeps what a call read of a pool, the `active` count and
    /// the fence for the rest of the call (lib.lua, `read_pool`), so each
    /// operation of a batch must see every earlier one's writes: the same
    /// operations in one call answer, and leave Redis, exactly as they do
    /// one call each.
    #[tokio::test]
    async fn a_batch_answers_and_writes_as_its_operations_one_call_each() {
        let reserve = |id, lines| vec![id, "stock", "60000", lines, "", "0", "", "1000"];
        let claim = |id, lines| vec![id, "flash", lines, "", "0"];
        let ops = [
            ("claim", claim("c1", r#"[["p1",3]]"#)),
            ("reserve", reserve("h1", r#"[["p1",2]]"#)),
            ("claim", claim("c2", r#"[["p1",3]]"#)),
            ("commit", vec!["h1", "stock", "o1"]),
            ("reserve", reserve("h2", r#"[["p1",3]]"#)),
            ("reserve", reserve("h3", r#"[["p1",1]]"#)),
            ("release", vec!["h3", "stock"]),
            ("claim", claim("c3", r#"[["p1",2]]"#)),
            ("claim", claim("c4", r#"[["p1",1]]"#)),
            ("claim", claim("c1", r#"[["p1",3]]"#)),
            ("claim", claim("c5", r#"[["p2",4]]"#)),
        ];
        let mut con = redis().await;
        let run = rand::random::<u32>();
        let (one, each) = (
            format!("libtest{run}:{{one}}:"),
            format!("libtest{run}:{{each}}:"),
        );
        pools(&mut con, &one).await;
        pools(&mut con, &each).await;

        let batched: Vec<Value> = fcall(&mut con, &BATCH, &batch_call(&one, &ops))
            .await
            .expect("the batch runs");
        let mut alone = Vec::new();
        for op in &ops {
            let call = batch_call(&each, std::slice::from_ref(op));
            alone.push(only_reply(&mut con, &call).await);
        }

        let tags: Vec<_> = batched.iter().map(tag).collect();
        assert_eq!(
            tags,
            [
                "CLAIMED", "HOLD", "CLAIMED", "HOLD", "SHORT", "HOLD", "HOLD", "CLAIMED", "SHORT",
                "HOLD", "CLAIMED"
            ]
        );
        assert_eq!(batched, alone, "one call answers as one call each");
        let after = state(&mut con, &one).await;
        assert_eq!(after, state(&mut con, &each).await, "and leaves the same");
        // What both left: p1 sold out exactly (3 + 3 + 2 committed + 2),
        // nothing held, one low-stock alert, p2 flagged for a refill.
        assert!(after[0].contains(r#"("held", "0")"#), "{after:?}");
        assert!(after[0].contains(r#"("sold", "10")"#), "{after:?}");
        assert!(after[0].contains(r#"("armed", "0")"#), "{after:?}");
        assert!(after[1].contains(r#"("sold", "4")"#), "{after:?}");
        assert_eq!(after[2], r#"active Some("0")"#);
        assert_eq!(after[4], r#"refill ["p2"]"#);
        let kinds: Vec<_> = after[5..]
            .iter()
            .filter_map(|e| e.split(r#"("k", ""#).nth(1)?.split('"').next())
            .collect();
        assert_eq!(
            kinds,
            [
                "claimed",
                "reserved",
                "low_stock",
                "claimed",
                "committed",
                "reserved",
                "released",
                "claimed",
                "claimed"
            ]
        );
    }

    /// A customer's counter (`cust:<sale>:<customer>`) is made with an
    /// expiry a retention after its sale ends, keeps it as it counts, and
    /// a hold that ends after the counter expired does not bring the
    /// counter back (as a negative count, with no expiry).
    #[tokio::test]
    async fn a_customer_counter_expires_a_retention_after_its_sale_ends() {
        let mut con = redis().await;
        let prefix = format!("libtest{}:{{cust}}:", rand::random::<u32>());
        pools(&mut con, &prefix).await;
        let now = chrono::Utc::now().timestamp_millis();
        let ends = now + 3_600_000;
        let _: () = redis::cmd("HSET")
            .arg(format!("{prefix}pool:p2"))
            .arg("until")
            .arg(ends)
            .query_async(&mut con)
            .await
            .expect("HSET");
        let run = |op: (&'static str, Vec<&'static str>)| batch_call_at(&prefix, now, &[op]);
        let claim = |id| vec![id, "flash", r#"[["p2",1]]"#, "cust:s:u1", "3"];
        let hold = |id| {
            let lines = r#"[["p2",1]]"#;
            vec![id, "flash", "60000", lines, "cust:s:u2", "3", "", "1000"]
        };
        let counter = |who: &str| format!("{prefix}cust:s:{who}");
        async fn read(con: &mut ConnectionManager, key: &str) -> (Option<i64>, i64) {
            let v: Option<i64> = redis::cmd("GET")
                .arg(key)
                .query_async(con)
                .await
                .expect("GET");
            let at: i64 = redis::cmd("PEXPIRETIME")
                .arg(key)
                .query_async(con)
                .await
                .expect("PEXPIRETIME");
            (v, at)
        }

        let first = only_reply(&mut con, &run(("claim", claim("c1")))).await;
        assert_eq!(tag(&first), "CLAIMED");
        assert_eq!(
            read(&mut con, &counter("u1")).await,
            (Some(1), ends + RETENTION_MS),
            "made with the sale's end plus the retention"
        );
        only_reply(&mut con, &run(("claim", claim("c2")))).await;
        assert_eq!(
            read(&mut con, &counter("u1")).await,
            (Some(2), ends + RETENTION_MS),
            "counted on, the expiry kept"
        );

        let held = only_reply(&mut con, &run(("reserve", hold("h1")))).await;
        assert_eq!(tag(&held), "HOLD");
        assert_eq!(read(&mut con, &counter("u2")).await.0, Some(1));
        let _: () = redis::cmd("DEL")
            .arg(counter("u2"))
            .query_async(&mut con)
            .await
            .expect("DEL");
        let released = only_reply(&mut con, &run(("release", vec!["h1", "flash"]))).await;
        assert_eq!(tag(&released), "HOLD");
        assert_eq!(
            read(&mut con, &counter("u2")).await,
            (None, -2),
            "an expired counter stays gone"
        );
    }

    /// `restore.lua` writes back a hold Redis has not, for what is left of
    /// its retention, with the digest its take made: a retry of the take
    /// then answers the hold, another request under its id is ID_REUSED.
    /// A hold Redis has is left alone, and one past its retention is not
    /// written.
    #[tokio::test]
    async fn restore_writes_back_only_the_holds_redis_lacks_and_still_remembers() {
        let mut con = redis().await;
        let prefix = format!("libtest{}:{{restore}}:", rand::random::<u32>());
        let hold = |id: &str| format!("{prefix}hold:{id}");
        let _: () = redis::cmd("HSET")
            .arg(hold("h1"))
            .arg(&[("st", "A"), ("job", "stock")])
            .query_async(&mut con)
            .await
            .expect("HSET");
        let now = 1_000_000;
        let mut call = RESTORE.prepare_invoke();
        call.arg(&prefix).arg(RETENTION_MS).arg(now);
        let lines = r#"[["p1",2]]"#;
        let stored = r#"[["p1",2,1]]"#;
        for (id, kind, st, fin, oid) in [
            ("h1", "hold", "C", now - 1_000, "o1"),
            ("h2", "hold", "R", now - RETENTION_MS - 1, ""),
            ("h3", "hold", "C", now - 10_000, "o3"),
            ("c1", "claim", "C", now - 20_000, ""),
        ] {
            call.arg(id)
                .arg(kind)
                .arg("flash")
                .arg(lines)
                .arg(stored)
                .arg("");
            call.arg(st)
                .arg(fin - 5_000)
                .arg(fin)
                .arg(oid)
                .arg("")
                .arg(0);
        }
        let written: i64 = call.invoke_async(&mut con).await.expect("restore runs");
        assert_eq!(written, 2, "h3 and c1");
        let fields = |id: &'static str| {
            let mut con = con.clone();
            let key = hold(id);
            async move {
                let h: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .expect("HGETALL");
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .expect("PTTL");
                (h, ttl)
            }
        };
        assert_eq!(
            fields("h1").await.0.get("st").map(String::as_str),
            Some("A"),
            "left alone"
        );
        assert!(fields("h2").await.0.is_empty(), "past its retention");
        let (h3, ttl) = fields("h3").await;
        assert_eq!(
            (h3["st"].as_str(), h3["oid"].as_str(), h3["exp"].as_str()),
            ("C", "o3", "990000")
        );
        assert!(
            (RETENTION_MS - 10_000 - 1_000..=RETENTION_MS - 10_000).contains(&ttl),
            "{ttl}"
        );
        let (c1, _) = fields("c1").await;
        assert!(!c1.contains_key("exp"), "a claim keeps no expiry: {c1:?}");

        let claim = |lines: &'static str| vec!["c1", "flash", lines, "", "0"];
        let call = batch_call_at(&prefix, now, &[("claim", claim(lines))]);
        let again = only_reply(&mut con, &call).await;
        assert_eq!(tag(&again), "HOLD", "{again:?}");
        let call = batch_call_at(&prefix, now, &[("claim", claim(r#"[["p1",3]]"#))]);
        assert_eq!(tag(&only_reply(&mut con, &call).await), "ID_REUSED");
        let commit = batch_call_at(&prefix, now, &[("commit", vec!["h3", "flash", "o3"])]);
        assert_eq!(
            tag(&only_reply(&mut con, &commit).await),
            "HOLD",
            "a retried commit"
        );
    }
}
